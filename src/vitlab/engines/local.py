"""The in-process engine: shards one after another, each task batched and pipelined inside."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow as pa

from vitlab.data.shards import ShardedStage
from vitlab.progress import progress

ShardTask = Callable[[int, pd.DataFrame, Callable[[int], Any] | None], tuple[pa.Table, dict]]


class LocalEngine:
    name = "local"

    def map_shards(
        self, stage: ShardedStage, work: pd.DataFrame, task: ShardTask, desc: str, total_rows: int
    ) -> None:
        """Run `task` for every shard in `work` (column `shard`), writing each output shard
        atomically and recording it in the stage manifest as soon as it is done."""
        bar = progress(total_rows, desc)
        try:
            for shard_no, rows in work.groupby("shard", sort=True):
                table, report = task(int(shard_no), rows, bar.update)
                stage.write_shard(int(shard_no), table, report)
        finally:
            bar.close()
