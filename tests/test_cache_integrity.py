"""Cache integrity: shards are verified against the manifest before they are reused; a bad or
missing shard is recomputed alone (with a warning), a corrupt manifest means a recompute, and
temp files of live writers survive the cleanup of dead writers' temps."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import vitlab.stages.embed as embed_module
import vitlab.stages.prepare as prepare_module
from tests.test_engines import _prepare_and_embed, _rows
from vitlab.atomic import WRITER_HOST, temp_path
from vitlab.cache import file_sha256
from vitlab.cli import main as vitlab_cli
from vitlab.data.shards import MANIFEST, STALE_TEMP_AGE_S, ShardedStage, shard_name
from vitlab.engines import LocalEngine


@pytest.fixture(scope="module")
def clean(tiny_plantclef, tmp_path_factory):
    """A complete, untouched cache of the tiny dataset (read-only: tests work on copies)."""
    cache = tmp_path_factory.mktemp("clean") / "cache"
    prepared, embedded = _prepare_and_embed(tiny_plantclef, cache, LocalEngine())
    assert len(embedded.shard_indices()) >= 4
    return cache, prepared, embedded


@pytest.fixture
def rerun(tiny_plantclef, clean, tmp_path, monkeypatch, caplog):
    """A copy of the clean cache, and a function that reruns prepare + embed on it returning
    (prepared, embedded, prepared shard numbers computed, embedded shard numbers computed)."""
    cache = tmp_path / "cache"
    shutil.copytree(clean[0], cache)
    computed: dict[str, list[int]] = {"prepare": [], "embed": []}
    # the local engine calls a task that loads ahead (embed) through `load(shard_no, rows)`
    for name, cls, method in (
        ("prepare", prepare_module.PrepareShardTask, "__call__"),
        ("embed", embed_module.EmbedShardTask, "load"),
    ):

        def spy(self, shard_no, *rest, _original=cls.__dict__[method], _name=name):
            computed[_name].append(shard_no)
            return _original(self, shard_no, *rest)

        monkeypatch.setattr(cls, method, spy)
    caplog.set_level(logging.WARNING)

    def run():
        computed["prepare"].clear()
        computed["embed"].clear()
        prepared, embedded = _prepare_and_embed(tiny_plantclef, cache, LocalEngine())
        return prepared, embedded, list(computed["prepare"]), list(computed["embed"])

    return cache, run


def _stage_dir(cache: Path, stage) -> Path:
    return cache / stage.directory.parent.name / stage.directory.name


def _assert_same_as_clean(clean, prepared, embedded):
    _, clean_prepared, clean_embedded = clean
    for new, old in ((prepared, clean_prepared), (embedded, clean_embedded)):
        assert new.complete and new.shard_indices() == old.shard_indices()
        for index in old.shard_indices():  # recomputed shards are bit-identical
            assert file_sha256(new.path_of(index)) == file_sha256(old.path_of(index))
    a, b = _rows(embedded), _rows(clean_embedded)
    assert a.column("image_name").equals(b.column("image_name"))
    np.testing.assert_array_equal(
        np.stack(a.column("embedding").to_numpy(zero_copy_only=False)),
        np.stack(b.column("embedding").to_numpy(zero_copy_only=False)),
    )


def _warnings_naming(caplog, path: Path) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and str(path) in r.getMessage()
    ]


def _flip_one_float(path: Path) -> None:
    """Overwrite one embedding value in the file with 3.4e38, keeping the size (as the four
    flipped bytes of the incident did)."""
    value = pq.read_table(path).column("embedding").combine_chunks().flatten()[5].as_py()
    data = bytearray(path.read_bytes())
    offset = data.find(np.float32(value).tobytes())
    assert offset > 0, "the value is not stored verbatim"
    data[offset : offset + 4] = np.float32(3.4e38).tobytes()
    path.write_bytes(bytes(data))
    assert pq.read_table(path).num_rows  # still a readable Parquet file: silent corruption


def test_flipped_bytes_in_an_embed_shard_are_recomputed_alone(clean, rerun, caplog):
    cache, run = rerun
    shard = _stage_dir(cache, clean[2]) / shard_name(1)
    _flip_one_float(shard)
    prepared, embedded, prepared_done, embedded_done = run()
    assert _warnings_naming(caplog, shard), "no warning names the corrupt shard"
    assert prepared_done == [] and embedded_done == [1]
    _assert_same_as_clean(clean, prepared, embedded)
    assert vitlab_cli(["cache", "verify", "--cache-dir", str(cache)]) == 0


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_deleted_embed_shard_is_recomputed_alone(clean, rerun, caplog, damage):
    cache, run = rerun
    shard = _stage_dir(cache, clean[2]) / shard_name(2)
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        shard.unlink()
    assert vitlab_cli(["cache", "verify", "--cache-dir", str(cache)]) == 1
    prepared, embedded, prepared_done, embedded_done = run()
    assert _warnings_naming(caplog, shard)
    assert prepared_done == [] and embedded_done == [2]
    _assert_same_as_clean(clean, prepared, embedded)


def test_truncated_prepared_shard_is_recomputed_on_a_hit(clean, rerun, caplog):
    cache, run = rerun
    shard = _stage_dir(cache, clean[1]) / shard_name(0)
    shard.write_bytes(shard.read_bytes()[:100])
    prepared, embedded, prepared_done, embedded_done = run()
    assert _warnings_naming(caplog, shard)
    assert prepared_done == [0] and embedded_done == []
    _assert_same_as_clean(clean, prepared, embedded)


def test_corrupt_prepared_shard_is_rebuilt_before_embed_reads_it(clean, rerun, caplog):
    """A prepared shard with the right size but other bytes passes the cheap check of a
    prepare hit; embed verifies its checksum before reading it and has it recomputed."""
    cache, run = rerun
    prepared_shard = _stage_dir(cache, clean[1]) / shard_name(3)
    data = bytearray(prepared_shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    prepared_shard.write_bytes(bytes(data))
    (_stage_dir(cache, clean[2]) / shard_name(3)).unlink()  # so embed has to read it
    prepared, embedded, prepared_done, embedded_done = run()
    assert _warnings_naming(caplog, prepared_shard)
    assert prepared_done == [3] and embedded_done == [3]
    _assert_same_as_clean(clean, prepared, embedded)


@pytest.mark.parametrize("stage", ["prepare", "embed"])
def test_truncated_manifest_warns_and_recomputes(clean, rerun, caplog, capsys, stage):
    cache, run = rerun
    stage_obj = clean[1] if stage == "prepare" else clean[2]
    manifest = _stage_dir(cache, stage_obj) / MANIFEST
    manifest.write_text(manifest.read_text()[:40])
    # `cache ls` shows it as corrupt instead of crashing
    assert vitlab_cli(["cache", "ls", "--cache-dir", str(cache)]) == 0
    assert "CORRUPT" in capsys.readouterr().out
    assert vitlab_cli(["cache", "ls", "--cache-dir", str(cache), "--json"]) == 0
    states = {e["stage"]: e["state"] for e in json.loads(capsys.readouterr().out)}
    assert states == {stage: "corrupt", ({"prepare", "embed"} - {stage}).pop(): "complete"}
    assert vitlab_cli(["cache", "verify", "--cache-dir", str(cache)]) == 1
    prepared, embedded, prepared_done, embedded_done = run()
    assert _warnings_naming(caplog, manifest)
    n_shards = len(stage_obj.shard_indices())
    if stage == "embed":
        assert (prepared_done, embedded_done) == ([], list(range(n_shards)))
    else:  # the prepared shards are recomputed (same key); the embeddings are a cache hit
        assert (prepared_done, embedded_done) == (list(range(n_shards)), [])
    _assert_same_as_clean(clean, prepared, embedded)


def test_manifest_without_checksums_is_checked_and_adopted(clean, rerun, caplog):
    """A manifest written before checksums existed: a truncated shard is still caught (by its
    Parquet footer), the others are hashed once and their checksums recorded."""
    cache, run = rerun
    embed_dir = _stage_dir(cache, clean[2])
    manifest = json.loads((embed_dir / MANIFEST).read_text())
    for entry in manifest["shards"].values():
        del entry["bytes"], entry["sha256"]
    (embed_dir / MANIFEST).write_text(json.dumps(manifest))
    shard = embed_dir / shard_name(0)
    shard.write_bytes(shard.read_bytes()[:-10])
    prepared, embedded, prepared_done, embedded_done = run()
    assert _warnings_naming(caplog, shard)
    assert prepared_done == [] and embedded_done == [0]
    recorded = json.loads((embed_dir / MANIFEST).read_text())["shards"]
    clean_recorded = clean[2].manifest["shards"]
    assert {n: e["sha256"] for n, e in recorded.items()} == {
        n: e["sha256"] for n, e in clean_recorded.items()
    }
    _assert_same_as_clean(clean, prepared, embedded)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path):
    stage = ShardedStage(tmp_path / "stage", "k", {})
    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = WRITER_HOST
        final = stage.directory / shard_name(0)
        mine = temp_path(final)  # this (live) process
        live = final.with_name(f".{final.name}.tmp-{host}-{live_writer.pid}-1")
        dead = final.with_name(f".{final.name}.tmp-{host}-{_dead_pid()}-1")
        dead_manifest = stage.directory / f".{MANIFEST}.tmp-{host}-{_dead_pid()}-7"
        other_host_recent = final.with_name(f".{final.name}.tmp-elsewhere.ns1-{os.getpid()}-1")
        other_host_old = final.with_name(f".{final.name}.tmp-elsewhere.ns1-{os.getpid()}-2")
        old_style_recent = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        old_style_old = final.with_name(f".{final.name}.tmp-12345-678")
        for path in (mine, live, dead, dead_manifest, other_host_recent, other_host_old):
            path.write_bytes(b"partial")
        for path in (old_style_recent, old_style_old):
            path.write_bytes(b"partial")
        old = time.time() - STALE_TEMP_AGE_S - 60
        for path in (other_host_old, old_style_old):
            os.utime(path, (old, old))
        assert stage.remove_stale_temporaries() == 4
        left = {p.name for p in stage.directory.iterdir()}
        assert left == {p.name for p in (mine, live, other_host_recent, old_style_recent)}, (
            "a live writer's temp was removed, or a dead one's kept"
        )
    finally:
        live_writer.kill()
        live_writer.wait()


def test_shard_writes_record_size_and_checksum(clean):
    for stage in clean[1:]:
        for index in stage.shard_indices():
            entry = stage.manifest["shards"][shard_name(index)]
            path = stage.path_of(index)
            assert entry["bytes"] == path.stat().st_size
            assert entry["sha256"] == file_sha256(path)
        assert not list(stage.directory.glob(".*.tmp-*"))
