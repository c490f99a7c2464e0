"""Local vs Spark engines, kill-and-resume of the embed stage, and the cache CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from vitlab.cli import main as vitlab_cli
from vitlab.engines import LocalEngine, SparkEngine, create_engine
from vitlab.models.backbones import create_backbone
from vitlab.models.features import ClsToken
from vitlab.pipelines.plantclef.prepare import prepare_training_images
from vitlab.stages.embed import embed_prepared
from vitlab.stages.prepare import PrepareParams

TINY = {
    "name": "vit_tiny_patch16_224",
    "model_kwargs": {"img_size": 64, "depth": 2},
    "input_size": 64,
}
PARAMS = PrepareParams(image_size=64, shard_size=24)


def _prepare_and_embed(data: Path, cache: Path, engine):
    prepared = prepare_training_images(
        data / "PlantCLEF2024_single_plant_training_metadata.csv",
        data / "images_max_side_800",
        cache,
        PARAMS,
        engine,
    )
    backbone = create_backbone("timm", **TINY)
    return prepared, embed_prepared(prepared, backbone, ClsToken(), cache, 16, engine)


def _rows(stage):
    table = stage.read_table().sort_by("image_name")
    return table


@pytest.fixture(scope="session")
def spark_engine():
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Java is not installed: Spark needs a JVM")
    pytest.importorskip("pyspark", reason="pyspark is not installed (pip install vitlab[spark])")
    engine = SparkEngine(
        master="local[2]", conf={"spark.ui.enabled": "false", "spark.driver.memory": "1g"}
    )
    spark = engine.session()
    yield engine
    spark.stop()


def test_local_and_spark_give_the_same_rows_and_embeddings(tiny_plantclef, tmp_path, spark_engine):
    local_prep, local_emb = _prepare_and_embed(tiny_plantclef, tmp_path / "local", LocalEngine())
    spark_prep, spark_emb = _prepare_and_embed(tiny_plantclef, tmp_path / "spark", spark_engine)
    assert len(local_prep.shard_indices()) > 2  # several partitions
    assert local_prep.key == spark_prep.key and local_emb.key == spark_emb.key
    a, b = _rows(local_prep), _rows(spark_prep)
    assert a.column("image_name").to_pylist() == b.column("image_name").to_pylist()
    assert a.column("image").to_pylist() == b.column("image").to_pylist()
    ea, eb = _rows(local_emb), _rows(spark_emb)
    assert ea.column("image_name").equals(eb.column("image_name"))
    np.testing.assert_allclose(
        np.stack(ea.column("embedding").to_numpy(zero_copy_only=False)),
        np.stack(eb.column("embedding").to_numpy(zero_copy_only=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert spark_emb.manifest["report"]["engine"] == "spark"
    for stage in (spark_prep, spark_emb):  # executors' reports carry size and checksum
        assert all("sha256" in s and "bytes" in s for s in stage.manifest["shards"].values())
        assert not stage.verify(checksum=True)


def test_collages_on_spark_equal_the_local_ones(tiny_plantclef, tmp_path, spark_engine):
    from vitlab.pipelines.plantclef.collages import CollageParams, build_collages

    settings = CollageParams(enabled=True, per_image=0.5, species=(0, 2))
    stages = {}
    for name, engine in (("local", LocalEngine()), ("spark", spark_engine)):
        prepared, _ = _prepare_and_embed(tiny_plantclef, tmp_path / name, LocalEngine())
        stages[name] = build_collages(
            prepared, tmp_path / name, settings, PARAMS.image_size, engine
        )
    local, spark = (_rows(stages[n]) for n in ("local", "spark"))
    assert len(local) > 0 and stages["local"].key == stages["spark"].key
    for column in ("image_name", "species_ids", "learn_tag", "image"):
        assert local.column(column).equals(spark.column(column)), column


def test_test_tiles_on_spark_equal_the_local_ones(tiny_plantclef, tmp_path, spark_engine):
    from vitlab.data.plantclef import list_test_images
    from vitlab.inference.plantclef import GridArgmax
    from vitlab.pipelines.plantclef.tiles import embed_test_tiles

    folder = tiny_plantclef / "PlantCLEF2024test"
    images = list_test_images(folder)
    stages = {}
    for name, engine in (("local", LocalEngine()), ("spark", spark_engine)):
        backbone = create_backbone("timm", **TINY)
        stages[name], embedded = embed_test_tiles(
            images, folder, GridArgmax(2), backbone, ClsToken(), tmp_path / name, engine=engine
        )
        assert embedded == len(images)
    local, spark = (stages[n].read_table() for n in ("local", "spark"))
    assert local.column("image").equals(spark.column("image"))
    assert local.column("tile").equals(spark.column("tile"))
    np.testing.assert_allclose(
        np.stack(local.column("embedding").to_numpy(zero_copy_only=False)),
        np.stack(spark.column("embedding").to_numpy(zero_copy_only=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert stages["spark"].manifest["report"]["engine"] == "spark"


def test_unknown_engine_names_the_key():
    with pytest.raises(ValueError, match="engine.kind"):
        create_engine("dask")


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import vitlab.stages.embed as embed
original = embed.embed_pixels
def slow(*args):
    time.sleep(0.15)  # room to be killed mid-stage
    return original(*args)
embed.embed_pixels = slow
from tests.test_engines import _prepare_and_embed
from vitlab.engines import LocalEngine
_prepare_and_embed(Path(sys.argv[1]), Path(sys.argv[2]), LocalEngine())
"""


def test_sigkill_during_embed_then_rerun_finishes_only_the_rest(
    tiny_plantclef, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tiny_plantclef), str(cache)],
        cwd=repo,
        # the repo first, then whatever the environment already puts on the path (a GPU node
        # carries its missing packages there)
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(repo), str(repo / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        },
    )
    deadline = time.time() + 120
    manifest = None
    while time.time() < deadline:
        found = (
            list((cache / "embed").glob("*/manifest.json")) if (cache / "embed").exists() else []
        )
        if found:
            shards = json.loads(found[0].read_text())["shards"]
            if len(shards) >= 2:
                manifest = found[0]
                break
        if proc.poll() is not None:
            pytest.fail("the embed process ended before it could be killed")
        time.sleep(0.02)
    assert manifest is not None, "embed never wrote two shards"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = json.loads(manifest.read_text())
    assert not done_before.get("complete")

    import vitlab.stages.embed as embed_module

    embedded_rows = []
    original = embed_module.embed_pixels
    monkeypatch.setattr(
        embed_module,
        "embed_pixels",
        lambda b, f, p: embedded_rows.append(len(p)) or original(b, f, p),
    )
    _, resumed = _prepare_and_embed(tiny_plantclef, cache, LocalEngine())
    resumed_rows = sum(embedded_rows)
    _, fresh = _prepare_and_embed(tiny_plantclef, tmp_path / "fresh", LocalEngine())
    total = fresh.manifest["report"]["rows"]
    rows_before = sum(s["rows"] for s in done_before["shards"].values())
    # the rerun embedded the rest only: at most what the killed run had not recorded
    assert 0 < resumed_rows <= total - rows_before
    a, b = _rows(resumed), _rows(fresh)
    assert a.num_rows == b.num_rows
    assert a.column("image_name").to_pylist() == b.column("image_name").to_pylist()
    assert len(set(a.column("image_name").to_pylist())) == a.num_rows  # no duplicates
    np.testing.assert_allclose(
        np.stack(a.column("embedding").to_numpy(zero_copy_only=False)),
        np.stack(b.column("embedding").to_numpy(zero_copy_only=False)),
        rtol=1e-5,
        atol=1e-6,
    )
    assert not list(resumed.directory.glob(".part-*"))  # no temp file left behind
    for path in resumed.shard_paths():
        pq.read_table(path)  # every shard is a whole Parquet file


def test_cache_cli_lists_and_removes(tiny_plantclef, tmp_path, capsys):
    cache = tmp_path / "cache"
    prepared, embedded = _prepare_and_embed(tiny_plantclef, cache, LocalEngine())
    assert vitlab_cli(["cache", "ls", "--cache-dir", str(cache), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert {(e["stage"], e["key"]) for e in entries} == {
        ("prepare", prepared.key),
        ("embed", embedded.key),
    }
    assert all(e["complete"] for e in entries)
    assert vitlab_cli(["cache", "rm", "--cache-dir", str(cache), embedded.key[:6]]) == 0
    assert not embedded.directory.exists() and prepared.directory.exists()
    assert vitlab_cli(["cache", "rm", "--cache-dir", str(cache), "nosuchkey"]) == 2
    assert vitlab_cli(["cache", "rm", "--cache-dir", str(cache), "--all"]) == 0
    assert not prepared.directory.exists()


def test_interrupted_prepare_resumes_with_the_missing_shards(tiny_plantclef, tmp_path, monkeypatch):
    import vitlab.stages.prepare as prepare_module

    calls, crashed = [], []
    original = prepare_module.PrepareShardTask.__call__

    def crash_on_third(self, shard_no, rows, progress):
        calls.append(shard_no)
        if len(calls) == 3 and not crashed:
            crashed.append(shard_no)
            raise SimulatedKill("simulated interruption")
        return original(self, shard_no, rows, progress)

    monkeypatch.setattr(prepare_module.PrepareShardTask, "__call__", crash_on_third)
    args = (
        tiny_plantclef / "PlantCLEF2024_single_plant_training_metadata.csv",
        tiny_plantclef / "images_max_side_800",
        tmp_path / "cache",
        PARAMS,
    )
    with pytest.raises(SimulatedKill):
        prepare_training_images(*args)
    calls.clear()
    stage = prepare_training_images(*args)
    resumed = list(calls)
    fresh = prepare_training_images(*args[:2], tmp_path / "fresh", PARAMS)
    n_shards = len(fresh.shard_indices())
    assert stage.complete and resumed == list(range(2, n_shards))  # finished shards were kept
    a, b = _rows(stage), _rows(fresh)
    assert a.column("image_name").to_pylist() == b.column("image_name").to_pylist()


class SimulatedKill(Exception):
    pass


class _UnstartableSpark:
    """A Spark engine that must not start: a cache hit runs nothing."""

    name = "spark"

    def map_shards(self, *args, **kwargs):
        raise AssertionError("the engine was started on a cache hit")


def test_a_cache_hit_starts_no_engine_and_says_so(tiny_plantclef, tmp_path, caplog):
    _prepare_and_embed(tiny_plantclef, tmp_path, LocalEngine())
    with caplog.at_level("INFO"):
        _prepare_and_embed(tiny_plantclef, tmp_path, _UnstartableSpark())
    hits = [r.getMessage() for r in caplog.records if "cache hit" in r.getMessage()]
    assert len(hits) == 2
    assert all(m.endswith(", engine=spark not started") for m in hits)
    assert hits[0].startswith("prepare: cache hit (key ") and hits[1].startswith("embed: ")


def test_spark_settings_from_the_command_line_reach_spark_flat(tmp_path):
    """`engine.conf.spark.executor.memory=16g` arrives nested; Spark needs the dotted name."""
    from tests.conftest import compose_config
    from vitlab.config import instantiate_node

    cfg = compose_config(
        "train",
        [
            "engine=spark",
            "+engine.conf.spark.executor.memory=16g",
            "+engine.conf.spark.archives='e.tgz#environment'",  # quoted: # is grammar
        ],
        tmp_path,
    )
    engine = instantiate_node(cfg.engine, "engine")
    assert engine.conf == {
        "spark.driver.memory": "4g",
        "spark.ui.showConsoleProgress": "false",
        "spark.executor.memory": "16g",
        "spark.archives": "e.tgz#environment",
    }
