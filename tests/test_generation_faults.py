"""Faults around synthetic-data generation and engine start-up (issue 23): two generators on one
`dataset.root` at once, a generator killed half-way, a read-only generated folder, and an
unreachable Spark master. Each ends in usable data or a ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vitlab.data.synthetic.markers import LOCK_FILE, OWNER_MARKER, is_complete
from vitlab.data.synthetic.plantclef import PlantClefSyntheticSpec, generate_plantclef
from vitlab.errors import ConfigError
from vitlab.pipelines.base import ensure_generated

REPO = Path(__file__).resolve().parents[1]
# ~1 s of generation: long enough for two processes started together to overlap
RACE_SPEC = PlantClefSyntheticSpec(
    seed=3, n_species=40, n_rare_species=1, max_images_per_species=6, min_images_per_species=3,
    n_quadrats=3, quadrat_size=(120, 150),
)  # fmt: skip
SMALL_SPEC = PlantClefSyntheticSpec(
    seed=1, n_species=6, n_rare_species=1, max_images_per_species=4, min_images_per_species=3,
    n_quadrats=1, quadrat_size=(120, 150),
)  # fmt: skip

# One `train.py` on first use, reduced to its generation step: waits at a barrier so that the
# two processes call ensure_generated together, then prints what it found in dataset.root.
_GENERATOR_PROCESS = """
import hashlib, json, logging, sys, time
from pathlib import Path
from omegaconf import OmegaConf
from vitlab.data.synthetic.plantclef import PlantClefSyntheticSpec, generate_plantclef
from vitlab.pipelines.base import ensure_generated

logging.basicConfig(level=logging.INFO)  # train.py shows vitlab's INFO lines
root, spec, barrier, name = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
(barrier / f"ready-{name}").touch()
while not (barrier / "go").exists():
    time.sleep(0.01)
ensure_generated(OmegaConf.create({"root": root, "synthetic": spec}), generate_plantclef,
                 PlantClefSyntheticSpec, "PlantCLEF")
digest = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != sys.argv[5]}
print("DIGEST " + json.dumps(digest))
"""


def folder_digest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file a generator wrote (the lock file holds a pid)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def _dataset(root: Path, spec) -> OmegaConf:
    return OmegaConf.create({"root": str(root), "synthetic": dataclasses.asdict(spec)})


def _reference(tmp_path: Path, spec) -> dict[str, str]:
    return folder_digest(generate_plantclef(tmp_path / "reference", spec))


def test_two_generators_on_one_root_both_get_the_data_of_one_generation(tmp_path):
    root, barrier = tmp_path / "data", tmp_path / "barrier"
    barrier.mkdir()
    spec = json.dumps(dataclasses.asdict(RACE_SPEC))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _GENERATOR_PROCESS,
                str(root),
                spec,
                str(barrier),
                name,
                LOCK_FILE,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 120
    while not all((barrier / f"ready-{n}").exists() for n in ("a", "b")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    (barrier / "go").touch()
    outputs = [p.communicate(timeout=180) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    reference = _reference(tmp_path, RACE_SPEC)
    for out, _ in outputs:
        digest = json.loads(out.split("DIGEST ", 1)[1])
        assert digest == reference, "a process saw data other than one clean generation"
    assert folder_digest(root) == reference
    logs = "".join(err for _, err in outputs)
    assert "waiting for another vitlab generator" in logs  # the second one waited, no rewrite
    assert logs.count("generating synthetic PlantCLEF data") == 1


# A generator SIGKILLed half-way: it holds the lock, claimed the folder and wrote a part of it.
_KILLED_GENERATOR = """
import os, signal, sys
from vitlab.data.synthetic.markers import claim_output_dir, generation_lock

with generation_lock(sys.argv[1]):
    out = claim_output_dir(sys.argv[1])
    (out / "PlantCLEF2024" / "half").mkdir(parents=True)
    (out / "PlantCLEF2024" / "half" / "written.jpg").write_bytes(b"half a picture")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_generators_leftover_is_regenerated(tmp_path):
    root = tmp_path / "data"
    killed = subprocess.run([sys.executable, "-c", _KILLED_GENERATOR, str(root)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert (root / OWNER_MARKER).is_file() and (root / LOCK_FILE).is_file()
    assert not is_complete(root)
    started = time.monotonic()
    ensure_generated(_dataset(root, SMALL_SPEC), generate_plantclef, PlantClefSyntheticSpec, "P")
    assert time.monotonic() - started < 60  # the dead holder's lock did not block
    assert is_complete(root, SMALL_SPEC)
    assert folder_digest(root) == _reference(tmp_path, SMALL_SPEC)


needs_permissions = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions"
)


def _set_writable(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


@pytest.fixture
def read_only_generated(tmp_path):
    root = tmp_path / "data"
    generate_plantclef(root, SMALL_SPEC)
    _set_writable(root, False)
    yield root
    _set_writable(root, True)  # so that pytest can remove tmp_path


@needs_permissions
def test_read_only_folder_with_another_spec_is_a_config_error(read_only_generated):
    before = folder_digest(read_only_generated)
    other = dataclasses.replace(SMALL_SPEC, seed=2)
    with pytest.raises(ConfigError, match=r"dataset\.root=.*read-only") as err:
        ensure_generated(_dataset(read_only_generated, other), generate_plantclef,
                         PlantClefSyntheticSpec, "PlantCLEF")  # fmt: skip
    assert "another spec" in str(err.value) and "writable dataset.root" in str(err.value)
    assert folder_digest(read_only_generated) == before


@needs_permissions
def test_read_only_folder_with_the_same_spec_is_only_read(read_only_generated):
    before = folder_digest(read_only_generated)
    ensure_generated(_dataset(read_only_generated, SMALL_SPEC), generate_plantclef,
                     PlantClefSyntheticSpec, "PlantCLEF")  # fmt: skip
    assert folder_digest(read_only_generated) == before


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid"])
def test_an_unreachable_spark_master_is_a_config_error_within_seconds(host):
    pytest.importorskip("pyspark", reason="pyspark is not installed (pip install vitlab[spark])")
    from vitlab.engines.spark import SparkEngine

    master = f"spark://{host}:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^engine\.master={master}: no Spark master") as err:
        SparkEngine(master=master, conf={"spark.ui.enabled": "false"}).session()
    assert time.monotonic() - started < 30  # Spark itself retries for a minute
    assert ("does not resolve" if host.endswith(".invalid") else "refused") in str(err.value)


def test_train_py_with_an_unreachable_spark_master_exits_2_without_a_traceback(
    tiny_plantclef, tmp_path
):
    pytest.importorskip("pyspark", reason="pyspark is not installed (pip install vitlab[spark])")
    from tests.conftest import TINY_PLANTCLEF_RUN, run_entry_point

    master = f"spark://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    result = run_entry_point(
        "train.py",
        [
            *TINY_PLANTCLEF_RUN,
            f"dataset.root={tiny_plantclef}",
            f"paths.root_dir={tmp_path}",
            f"paths.cache_dir={tmp_path}/cache",
            "engine=spark",
            f"engine.master={master}",
            "print_config=false",
        ],
        tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"ConfigError: engine.master={master}: no Spark master reachable" in output
    assert "Traceback" not in output and "Py4J" not in output
    assert time.monotonic() - started < 120


# What building the session raises when the port answers but no Spark master is there (after
# Spark's ~60 s of registration retries; pyspark 4, seen against a plain TCP listener)
_STOPPED_CONTEXT = (
    "An error occurred while calling None.org.apache.spark.sql.classic.SparkSession.\n"
    ": java.lang.IllegalStateException: Cannot call methods on a stopped SparkContext.\n"
    "This stopped SparkContext was created at:"
)


def test_spark_giving_up_on_a_master_is_told_as_the_masters_fault():
    from vitlab.engines.spark import master_failure

    assert "no Spark master accepted" in master_failure("spark://h:7077", _STOPPED_CONTEXT)
    assert master_failure("local[2]", _STOPPED_CONTEXT) is None  # not about a master there
    assert master_failure("spark://h:7077", "java.lang.OutOfMemoryError") is None
    assert "unresponsive" in master_failure(
        "spark://h:7077", "Reason: All masters are unresponsive"
    )
