"""`train.py engine=spark` on a real Spark standalone cluster (issue 25): a master and two
one-core workers on loopback (tests/spark_cluster.py). The embeddings equal `engine=local`'s;
a worker killed during the embed stage does not stop the job (Spark runs its tasks again on the
other worker) nor change the output; each task's torch uses the cores Spark gave the task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_PLANTCLEF_RUN, compose_config
from vitlab.data.shards import ShardedStage, arrow_to_embeddings
from vitlab.pipelines.plantclef import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Java is not installed: Spark needs a JVM")
    pytest.importorskip("pyspark", reason="pyspark is not installed (pip install vitlab[spark])")
    from tests.spark_cluster import start_spark_cluster

    running = start_spark_cluster(n_workers=2)
    yield running
    running.stop()


def _overrides(data: Path, root: Path) -> list[str]:
    return [
        *TINY_PLANTCLEF_RUN,
        f"dataset.root={data}",
        f"paths.root_dir={root}",
        f"paths.cache_dir={root}/cache",
        f"hydra.run.dir={root}/run",
        "prepare.shard_size=4",  # ~22 shards: a job long enough to lose a worker in
        "predict.test=false",
        "trainer.max_epochs=1",
        "logger=csv",
        "print_config=false",
    ]


def _spark_train(data: Path, root: Path, master: str) -> subprocess.Popen:
    """train.py in a process of its own: a fresh Spark driver (a test session's local[2]
    session would otherwise be reused whatever the master)."""
    args = [*_overrides(data, root), "engine=spark", f"engine.master={master}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _embed_stage(root: Path) -> ShardedStage:
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    key = summary["cache_keys"]["embed"]
    return ShardedStage(root / "cache" / "embed" / key, key, {})


def _embeddings(stage: ShardedStage) -> tuple[list[str], np.ndarray]:
    table = stage.read_table(["image_name", "embedding"]).sort_by("image_name")
    return table.column("image_name").to_pylist(), arrow_to_embeddings(table.column("embedding"))


@pytest.fixture(scope="module")
def local_run(tiny_plantclef, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    train(compose_config("train", _overrides(tiny_plantclef, root), root))
    return _embed_stage(root)


def test_a_standalone_cluster_gives_the_local_embeddings(
    cluster, local_run, tiny_plantclef, tmp_path
):
    job = _spark_train(tiny_plantclef, tmp_path, cluster.master_url)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err.decode()[-3000:]
    stage = _embed_stage(tmp_path)
    assert stage.key == local_run.key and stage.manifest["report"]["engine"] == "spark"
    names, vectors = _embeddings(stage)
    local_names, local_vectors = _embeddings(local_run)
    assert names == local_names
    np.testing.assert_allclose(vectors, local_vectors, rtol=1e-5, atol=1e-5)
    # each task's torch used the one core Spark gave it (spark.task.cpus=1), not the machine's
    threads = {entry.get("torch_threads") for entry in stage.manifest["shards"].values()}
    assert threads == {1}


def test_a_worker_killed_during_embed_does_not_stop_the_job(
    cluster, local_run, tiny_plantclef, tmp_path
):
    job = _spark_train(tiny_plantclef, tmp_path, cluster.master_url)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "cache" / "embed").glob("*/part-*.parquet")):
        if job.poll() is not None:
            pytest.fail(f"train.py ended before its embed stage: {job.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the embed stage never wrote a shard"
        time.sleep(0.05)
    cluster.kill_worker(0)
    written_at_kill = len(list((tmp_path / "cache" / "embed").glob("*/part-*.parquet")))
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err.decode()[-3000:]
    assert cluster.alive_workers() <= 1
    stage = _embed_stage(tmp_path)
    assert written_at_kill < len(stage.shard_indices()), "killed after the stage had ended"
    names, vectors = _embeddings(stage)
    local_names, local_vectors = _embeddings(local_run)
    assert names == local_names
    np.testing.assert_allclose(vectors, local_vectors, rtol=1e-5, atol=1e-5)
