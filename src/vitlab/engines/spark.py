"""The Spark engine: the same per-shard tasks, one Spark partition per range of shards.

Work rows are range-partitioned by shard number and processed with `mapInPandas`; the task
builds its model once per Python worker process (never pickled from the driver), writes each
output shard atomically (its report, with the shard's size and SHA-256, beside it) into the
stage folder; the driver records each shard in the manifest as its file appears (logging shards
done, rate and ETA). The stage folder must be on a file system every executor sees (local disk
for `local[*]`, NFS/shared storage on a cluster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from vitlab.atomic import atomic_write_bytes, atomic_write_text
from vitlab.data.shards import (
    ShardedStage,
    encode_shard,
    shard_name,
    shard_report_path,
)
from vitlab.engines.local import ShardTask
from vitlab.errors import ConfigError

log = logging.getLogger(__name__)
RESULT_SCHEMA = "shard long, rows long, report string"
MASTER_CONNECT_TIMEOUT_S = 5.0
MASTER_HINT = (
    "Start the master or fix engine.master (spark://HOST:PORT, port 7077 by default); "
    "engine.master='local[*]' runs Spark on this machine."
)


def spark_conf(conf: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Spark settings as `spark.x.y -> value`. A command line `engine.conf.spark.executor.memory=
    16g` arrives nested ({spark: {executor: {memory: 16g}}}); YAML keys may hold the dots."""
    flat: dict[str, str] = {}
    for key, value in conf.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(spark_conf(value, f"{name}."))
        else:
            flat[name] = value
    return flat


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
        self.conf = spark_conf(conf or {})
        self.shards_per_partition = max(1, int(shards_per_partition))

    def session(self):
        from pyspark.sql import SparkSession

        # a standalone master that cannot be reached: say so in seconds, not after Spark's
        # 3 x 20 s registration retries and a 300-line Py4J traceback
        check_master_reachable(self.master)
        builder = SparkSession.builder.master(self.master).appName(self.app_name)
        # Python workers run this interpreter (and so this environment's vitlab) unless the user
        # set PYSPARK_PYTHON; local masters read it from the environment, clusters from the conf
        python = os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = builder.config("spark.pyspark.python", python)
        builder = builder.config("spark.sql.execution.arrow.pyspark.enabled", "true")
        for key, value in self.conf.items():
            builder = builder.config(key, str(value))
        try:
            return builder.getOrCreate()
        except Exception as err:  # Py4JJavaError and friends; only the master's are user errors
            reason = master_failure(self.master, str(err))
            if reason is None:
                raise
            raise ConfigError(f"engine.master={self.master}: {reason}. {MASTER_HINT}") from None

    def map_shards(
        self, stage: ShardedStage, work: pd.DataFrame, task: ShardTask, desc: str, total_rows: int
    ) -> None:
        spark = self.session()
        n_shards = int(work["shard"].nunique())
        partitions = max(1, -(-n_shards // self.shards_per_partition))
        frame = spark.createDataFrame(work).repartitionByRange(partitions, "shard")
        results = frame.mapInPandas(
            _partition_runner(task, str(stage.directory)), schema=RESULT_SCHEMA
        )
        # The job runs in a thread; the driver records shards as executors finish them (their
        # files appear atomically), so a killed job keeps the shards it completed.
        outcome: list = []
        job = threading.Thread(target=lambda: outcome.append(results.collect()), daemon=True)
        job.start()
        progress = _ShardProgress(desc, self.master, n_shards, total_rows)
        pending = {int(s) for s in work["shard"].unique()}
        while pending:
            finished = not job.is_alive()
            for shard_no in sorted(pending):
                rows_report = read_shard_report(stage.directory, shard_no)
                if rows_report is not None:
                    stage.record_shard(shard_no, *rows_report)
                    pending.discard(shard_no)
                    progress.done(shard_no, rows_report[0])
            if finished and pending:
                reason = "failed (see the Spark log above)" if not outcome else "lost shards"
                raise RuntimeError(f"{desc}: the Spark job {reason}: {sorted(pending)} not done")
            job.join(timeout=0.5)


def check_master_reachable(master: str, timeout: float = MASTER_CONNECT_TIMEOUT_S) -> None:
    """ConfigError naming engine.master unless a `spark://host:port[,host:port...]` master
    (several for a high-availability standby) accepts a TCP connection on one of its
    addresses. Other masters (local[*], yarn, k8s://...) are left to Spark."""
    if not master.startswith("spark://"):
        return
    problems = []
    for address in master[len("spark://") :].split(","):
        host, port = _host_port(address)
        if host is None or port is None:
            raise ConfigError(f"engine.master={master}: expected spark://HOST:PORT. {MASTER_HINT}")
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return
        except socket.gaierror:
            problems.append(f"host {host} does not resolve")
        except TimeoutError:
            problems.append(f"{host}:{port} did not answer within {timeout:.0f} s")
        except OSError as err:
            problems.append(f"{host}:{port}: {err.strerror or err}")
    raise ConfigError(
        f"engine.master={master}: no Spark master reachable ({'; '.join(problems)}). " + MASTER_HINT
    )


def _host_port(address: str) -> tuple[str | None, int | None]:
    """(host, port) of `host:port` or `[ipv6]:port`; None for a part that is missing."""
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return (host or None, None)
    return host, int(port)


def master_failure(master: str, error: str) -> str | None:
    """Why Spark could not use `master`, from the text of the error building the session
    raised; None for an error that is not about the master (left as it is)."""
    if "Invalid master URL" in error or "Could not parse Master URL" in error:
        return "Spark does not understand this master URL"
    if "All masters are unresponsive" in error:
        return "Spark gave up: all masters are unresponsive"
    if master.startswith("spark://") and "stopped SparkContext" in error:
        # the port answered, but no standalone master accepted the application: Spark stops
        # the context after its registration retries and building the session fails on that
        return "no Spark master accepted the application there (Spark gave up registering)"
    return None


class _ShardProgress:
    def __init__(self, desc: str, master: str, shards: int, rows: int):
        self.desc, self.master, self.shards, self.rows = desc, master, shards, rows
        self.start, self.done_rows, self.done_shards = time.perf_counter(), 0, 0

    def done(self, shard_no: int, rows: int) -> None:
        self.done_shards += 1
        self.done_rows += rows
        elapsed = time.perf_counter() - self.start
        rate = self.done_rows / elapsed if elapsed > 0 else 0.0
        eta = (self.rows - self.done_rows) / rate if rate > 0 else float("nan")
        log.info(
            "%s [spark %s]: shard %d done (%d/%d), %.1f rows/s, ETA %.0f s",
            self.desc,
            self.master,
            shard_no,
            self.done_shards,
            self.shards,
            rate,
            eta,
        )


def read_shard_report(directory: Path, shard_no: int) -> tuple[int, dict] | None:
    """(rows, report) of a shard an executor finished, or None while it is not there. The
    report carries the size and SHA-256 of the bytes the executor wrote; a file of another
    size is a leftover of an earlier run that the executor has not replaced yet."""
    try:
        size = (Path(directory) / shard_name(shard_no)).stat().st_size
        report = json.loads(shard_report_path(directory, shard_no).read_text())
    except FileNotFoundError:
        return None
    if "bytes" in report and report["bytes"] != size:
        return None
    return int(report.pop("rows")), report


def task_threads() -> int:
    """Torch's threads in a Spark task: the cores Spark gave the task (`spark.task.cpus`,
    default 1), so that the tasks an executor runs side by side do not each take every core of
    the machine. Set here, in the Python worker, before the task's forwards."""
    import torch
    from pyspark import TaskContext

    context = TaskContext.get()
    cpus = int(context.cpus()) if context is not None else 0
    if cpus > 0:
        torch.set_num_threads(cpus)
    return torch.get_num_threads()


def _partition_runner(task: ShardTask, directory: str):
    """The function Spark ships to executors: only the task (configs, paths) is pickled."""

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        parts = list(frames)
        if not parts:
            return
        threads = task_threads()
        work = pd.concat(parts, ignore_index=True)
        for shard_no, rows in work.groupby("shard", sort=True):
            table, report = task(int(shard_no), rows, None)
            report = {**report, "torch_threads": threads}
            data = encode_shard(table)
            digest = hashlib.sha256(memoryview(data)).hexdigest()
            # the report goes first: a shard file that exists always has its report beside it
            atomic_write_text(
                shard_report_path(Path(directory), int(shard_no)),
                json.dumps(
                    {"rows": table.num_rows, "bytes": data.size, "sha256": digest, **report}
                ),
            )
            atomic_write_bytes(Path(directory) / shard_name(int(shard_no)), data)
            yield pd.DataFrame(
                {"shard": [int(shard_no)], "rows": [table.num_rows], "report": [json.dumps(report)]}
            )

    return run
