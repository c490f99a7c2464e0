"""Cache faults of issue 23: `vitlab cache rm` touches only what vitlab wrote (a user's folder,
or a user's file dropped into an entry, survives), and an input replaced by other bytes with
the same size and mtime is a cache miss."""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import vitlab.cache as cache_module
from vitlab.cli import main as vitlab_cli
from vitlab.data.shards import MANIFEST, ShardedStage, shard_report_path
from vitlab.errors import ConfigError
from vitlab.pipelines.plantclef.prepare import prepare_training_images
from vitlab.stages.prepare import PrepareParams

# ---------------------------------------------------------------------------------------------
# cache rm / ls / verify: only vitlab's own entries


def _entry(cache: Path, stage: str, key: str, legacy: bool = False) -> Path:
    """A stage entry written by vitlab's own writer (two shards, complete). `legacy`: its
    manifest as a vitlab from before the `written_by` marker wrote it."""
    written = ShardedStage(cache / stage / key, key, {"image_size": 64})
    for index in range(2):
        written.write_shard(index, pa.table({"image_name": [f"{key}-{index}"]}))
    shard_report_path(written.directory, 1).write_text("{}")  # as a Spark worker leaves it
    temp = written.directory / ".part-00002.parquet.tmp-otherhost.ns1-4242-7"
    temp.write_bytes(b"half a shard")  # a killed writer's leftover
    written.finish({"images_written": 2})
    if legacy:
        path = written.directory / MANIFEST
        manifest = json.loads(path.read_text())
        manifest.pop("written_by", None)  # (absent before the marker existed)
        path.write_text(json.dumps(manifest, indent=1))
    return written.directory


def _user_tree(root: Path) -> dict[Path, bytes]:
    """A user's folder with `*/*/manifest.json` files, one of them even shaped like a stage
    manifest, one in a stage-like layout; returns every file with its bytes."""
    files = {
        root / "a" / "b" / MANIFEST: b'{"name": "my experiment", "version": 3}',
        root / "a" / "b" / "results.csv": b"epoch,acc\n1,0.5\n",
        root / "a" / "c" / MANIFEST: b'{"key": "c", "shards": {"x": {"rows": 1}}}',
        root / "a" / "c" / "part-00000.parquet": b"mine",
        root / "embed" / "0123456789abcdef" / MANIFEST: b'{"shards": {}, "owner": "me"}',
        root / "embed" / "0123456789abcdef" / "notes.txt": b"keep me",
        # the key of its folder, but no marker and not the stage schema (params, complete)
        root / "tiles" / "00000000deadbeef" / MANIFEST: b'{"key": "00000000deadbeef"}',
        # not JSON, in a stage-like layout, but no shard beside it: not a damaged vitlab entry
        root / "prepare" / "aaaaaaaaaaaaaaaa" / MANIFEST: b"name = my manifest",
        root / "photos" / "2023" / "IMG_0001.jpg": b"\xff\xd8 not really",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _assert_intact(files: dict[Path, bytes]) -> None:
    missing = [str(p) for p in files if not p.is_file()]
    assert not missing, f"user files deleted: {missing}"
    assert all(p.read_bytes() == data for p, data in files.items())


def test_cache_rm_all_on_a_user_folder_deletes_nothing(tmp_path, capsys):
    user = tmp_path / "my_project"
    files = _user_tree(user)
    assert vitlab_cli(["cache", "rm", "--all", "--cache-dir", str(user)]) == 0
    _assert_intact(files)
    err = capsys.readouterr().err
    skipped = ("a/b", "a/c", "embed/0123456789abcdef", "tiles/00000000deadbeef", "prepare/aa")
    for folder in skipped:  # each skipped folder is named
        assert str(user / folder) in err
    assert "not a vitlab cache entry" in err


def test_cache_rm_all_removes_entries_and_spares_user_files(tmp_path, capsys):
    """Real entries (marked, and written before the marker) are removed; a user's folders in
    the same cache dir survive; a user's file dropped into an entry survives with its folder."""
    cache = tmp_path / "cache"
    files = _user_tree(cache)
    marked = _entry(cache, "prepare", "00112233445566aa")
    legacy = _entry(cache, "tiles", "00112233445566bb", legacy=True)
    crowded = _entry(cache, "embed", "00112233445566cc")
    dropped = {crowded / "my_notes.txt": b"do not delete", crowded / "sub" / "x.npy": b"x"}
    for path, data in dropped.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)

    assert vitlab_cli(["cache", "rm", "--all", "--cache-dir", str(cache)]) == 0
    out, err = capsys.readouterr()
    assert not marked.exists() and not legacy.exists()
    _assert_intact(files)
    _assert_intact(dropped)
    assert sorted(p.name for p in crowded.iterdir()) == ["my_notes.txt", "sub"]  # shards gone
    for stage, key in (("prepare", "aa"), ("tiles", "bb"), ("embed", "cc")):
        assert f"removed {stage} 00112233445566{key}" in out
    assert str(crowded) in out + err and "my_notes.txt" in out + err  # says what it kept


def test_cache_ls_and_verify_skip_foreign_folders(tmp_path, capsys):
    cache = tmp_path / "cache"
    _user_tree(cache)
    marked = _entry(cache, "prepare", "00112233445566aa")
    legacy = _entry(cache, "embed", "00112233445566bb", legacy=True)

    assert vitlab_cli(["cache", "ls", "--cache-dir", str(cache), "--json"]) == 0
    out, err = capsys.readouterr()
    listed = {(e["stage"], e["key"], e["legacy"]) for e in json.loads(out)}
    assert listed == {("prepare", marked.name, False), ("embed", legacy.name, True)}
    assert str(cache / "a" / "b") in err and str(cache / "embed" / "0123456789abcdef") in err

    assert vitlab_cli(["cache", "ls", "--cache-dir", str(cache)]) == 0
    out, err = capsys.readouterr()
    assert "2 cached stage output(s)" in out and "skipped 5" in err

    # the foreign manifests are neither entries nor "corrupt": verify passes
    assert vitlab_cli(["cache", "verify", "--cache-dir", str(cache)]) == 0
    out, err = capsys.readouterr()
    assert marked.name in out and legacy.name in out and "BAD" not in out
    assert "CORRUPT" not in out and str(cache / "a" / "b") in err


def test_a_stage_writes_the_vitlab_marker(tmp_path):
    directory = _entry(tmp_path / "cache", "prepare", "00112233445566aa")
    assert json.loads((directory / MANIFEST).read_text())["written_by"] == "vitlab"


# ---------------------------------------------------------------------------------------------
# fingerprints: replaced pixels with the same size and mtime are a miss


@pytest.fixture
def fingerprint_mode():
    """Set the module's fingerprint mode for one test; back to the default after it."""
    yield cache_module.set_fingerprint_mode
    cache_module.set_fingerprint_mode("stat")


def _image(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="BMP")  # uncompressed: same size, other pixels


def _replace_keeping_size_and_mtime(path: Path, seed: int) -> None:
    """Other pixels in the same file, its size and mtime (and atime) set back as they were."""
    before = path.stat()
    ctime = before.st_ctime_ns
    while time.time_ns() <= ctime + 20_000_000:  # the kernel's ctime clock is coarse (ms)
        time.sleep(0.005)
    old = path.read_bytes()
    _image(path, seed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert path.read_bytes() != old and after.st_size == before.st_size
    assert after.st_mtime_ns == before.st_mtime_ns


def _images(root: Path) -> list[Path]:
    root.mkdir(parents=True)
    for seed in range(3):
        _image(root / f"{seed}.bmp", seed)
    return sorted(root.glob("*.bmp"))


@pytest.mark.parametrize("mode", ["stat", "content"])
def test_replaced_pixels_with_same_size_and_mtime_change_the_fingerprint(
    tmp_path, fingerprint_mode, mode
):
    fingerprint_mode(mode)
    root = tmp_path / "images"
    images = _images(root)
    first = cache_module.files_fingerprint(images, root)
    first_dir = cache_module.directory_fingerprint(root)
    assert cache_module.files_fingerprint(images, root) == first  # unchanged files: same
    assert cache_module.directory_fingerprint(root) == first_dir
    _replace_keeping_size_and_mtime(images[1], seed=99)
    assert cache_module.files_fingerprint(images, root) != first
    assert cache_module.directory_fingerprint(root) != first_dir


def test_content_mode_ignores_a_touch_and_differs_from_stat_mode(tmp_path, fingerprint_mode):
    root = tmp_path / "images"
    images = _images(root)
    fingerprint_mode("content")
    content = cache_module.files_fingerprint(images, root)
    fingerprint_mode("stat")
    stat = cache_module.files_fingerprint(images, root)
    assert stat != content  # switching modes never reuses the other mode's keys
    os.utime(images[0], ns=(1, 1))  # `touch` (to any time)
    assert cache_module.files_fingerprint(images, root) != stat
    fingerprint_mode("content")
    assert cache_module.files_fingerprint(images, root) == content
    # a copy of the folder elsewhere (new mtimes and ctimes) has the same content fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert cache_module.directory_fingerprint(copy) == cache_module.directory_fingerprint(root)


def test_an_unknown_fingerprint_mode_names_the_config_key(fingerprint_mode):
    with pytest.raises(ConfigError, match="cache_fingerprint"):
        fingerprint_mode("sha1")
    assert cache_module.fingerprint_mode() == "stat"  # unchanged by the refused value


def test_a_replaced_training_image_is_a_prepare_cache_miss(tiny_plantclef, tmp_path):
    """End to end: the prepared shards of a training image replaced by other bytes of the
    same size with its mtime set back are recomputed, not served from the cache."""
    data = tmp_path / "data"
    shutil.copytree(tiny_plantclef, data)
    csv = data / "PlantCLEF2024_single_plant_training_metadata.csv"
    images = data / "images_max_side_800"
    params = PrepareParams(image_size=16, shard_size=64, workers=1)
    first = prepare_training_images(csv, images, tmp_path / "cache", params)
    image = sorted(images.rglob("*.jpg"))[0]
    before = image.stat()
    while time.time_ns() <= before.st_ctime_ns + 20_000_000:
        time.sleep(0.005)
    data_bytes = bytearray(image.read_bytes())
    middle = len(data_bytes) // 2  # other entropy-coded bytes: other pixels, same size
    data_bytes[middle : middle + 8] = bytes(b ^ 0x5A for b in data_bytes[middle : middle + 8])
    image.write_bytes(bytes(data_bytes))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    second = prepare_training_images(csv, images, tmp_path / "cache", params)
    assert second.key != first.key
