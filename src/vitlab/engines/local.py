"""The in-process engine: shards one after another, each task batched and pipelined inside.

A task that can `load` a shard ahead (the embed and tile stages) gets the next shard's reading
and decoding started while this one is on the device, and each finished shard is written by a
background writer; a task with `replicas` (one per GPU of a multi-GPU run) runs one worker per
replica, the shards split between them (each shard's output does not depend on who ran it)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
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
        shards = [(int(s), rows) for s, rows in work.groupby("shard", sort=True)]
        replicas = task.replicas() if hasattr(task, "replicas") else [task]
        bar = progress(total_rows, desc)
        try:
            with ThreadPoolExecutor(1, "vitlab-write") as writer:
                if len(replicas) == 1:
                    _run_in_order(replicas[0], iter(shards), stage, writer, bar.update)
                    return
                todo: queue.Queue = queue.Queue()
                for item in shards:
                    todo.put(item)
                with ThreadPoolExecutor(len(replicas), "vitlab-device") as workers:
                    runs = [
                        workers.submit(_run_in_order, r, _drain(todo), stage, writer, bar.update)
                        for r in replicas
                    ]
                    wait(runs, return_when=FIRST_EXCEPTION)
                    if any(run.done() and run.exception() for run in runs):
                        list(_drain(todo))  # the other workers stop after their shard
                    for run in runs:
                        run.result()
        finally:
            bar.close()


def _drain(todo: queue.Queue) -> Iterator[tuple[int, pd.DataFrame]]:
    while True:
        try:
            yield todo.get_nowait()
        except queue.Empty:
            return


def _run_in_order(
    task: Any,
    shards: Iterator[tuple[int, pd.DataFrame]],
    stage: ShardedStage,
    writer: ThreadPoolExecutor,
    update: Callable[[int], Any],
) -> None:
    """One worker: its shards in order, the next one loading while this one runs (tasks with
    `load`), each written by the shared `writer` (one thread: the manifest is updated in
    order of completion, never concurrently)."""
    loads = hasattr(task, "load")
    written: list[Future] = []
    current = next(shards, None)
    loaded = task.load(*current) if loads and current is not None else None
    try:
        while current is not None:
            shard_no, rows = current
            following = next(shards, None)
            ahead = task.load(*following) if loads and following is not None else None
            if loads:
                table, report = task.run(loaded, update)
            else:
                table, report = task(shard_no, rows, update)
            written.append(writer.submit(stage.write_shard, shard_no, table, report))
            if len(written) > 1:
                written.pop(0).result()  # a failed write stops the run here
            current, loaded = following, ahead
    finally:
        for pending in written:
            pending.result()
        if loaded is not None and hasattr(loaded, "close"):
            loaded.close()
