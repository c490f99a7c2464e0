"""The Spark engine: the same per-shard tasks, one Spark partition per range of shards.

Work rows are range-partitioned by shard number and processed with `mapInPandas`; the task
builds its model once per Python worker process (never pickled from the driver), writes each
output shard atomically into the stage folder and returns a one-row report, which the driver
records in the manifest as partitions finish (logging partitions done, rate and ETA). The stage
folder must be on a file system every executor sees (local disk for `local[*]`, NFS/shared
storage on a cluster).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from vitlab.data.shards import ShardedStage, write_shard_file
from vitlab.engines.local import ShardTask

log = logging.getLogger(__name__)
RESULT_SCHEMA = "shard long, rows long, report string"


class SparkEngine:
    name = "spark"

    def __init__(
        self,
        master: str = "local[*]",
        app_name: str = "vitlab",
        conf: dict[str, Any] | None = None,
        shards_per_partition: int = 1,
    ):
        self.master, self.app_name = master, app_name
        self.conf = dict(conf or {})
        self.shards_per_partition = max(1, int(shards_per_partition))

    def session(self):
        from pyspark.sql import SparkSession

        builder = SparkSession.builder.master(self.master).appName(self.app_name)
        # Python workers run this interpreter (and so this environment's vitlab) unless the user
        # set PYSPARK_PYTHON; local masters read it from the environment, clusters from the conf
        python = os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = builder.config("spark.pyspark.python", python)
        builder = builder.config("spark.sql.execution.arrow.pyspark.enabled", "true")
        for key, value in self.conf.items():
            builder = builder.config(key, str(value))
        return builder.getOrCreate()

    def map_shards(
        self, stage: ShardedStage, work: pd.DataFrame, task: ShardTask, desc: str, total_rows: int
    ) -> None:
        spark = self.session()
        n_shards = work["shard"].nunique()
        partitions = max(1, -(-n_shards // self.shards_per_partition))
        frame = spark.createDataFrame(work).repartitionByRange(partitions, "shard")
        directory = str(stage.directory)
        run = _partition_runner(task, directory)
        results = frame.mapInPandas(run, schema=RESULT_SCHEMA)
        start, done_rows, done = time.perf_counter(), 0, 0
        for row in results.toLocalIterator():
            stage.record_shard(int(row.shard), int(row.rows), json.loads(row.report))
            done += 1
            done_rows += int(row.rows)
            elapsed = time.perf_counter() - start
            rate = done_rows / elapsed if elapsed > 0 else 0.0
            eta = (total_rows - done_rows) / rate if rate > 0 else float("nan")
            log.info(
                "%s [spark %s]: shard %d done (%d/%d), %.1f rows/s, ETA %.0f s",
                desc,
                self.master,
                row.shard,
                done,
                n_shards,
                rate,
                eta,
            )


def _partition_runner(task: ShardTask, directory: str):
    """The function Spark ships to executors: only the task (configs, paths) is pickled."""

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        work = pd.concat(list(frames), ignore_index=True) if frames else pd.DataFrame()
        if work.empty:
            return
        for shard_no, rows in work.groupby("shard", sort=True):
            table, report = task(int(shard_no), rows, None)
            write_shard_file(Path(directory), int(shard_no), table)
            yield pd.DataFrame(
                {"shard": [int(shard_no)], "rows": [table.num_rows], "report": [json.dumps(report)]}
            )

    return run
