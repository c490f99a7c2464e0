"""Hydra launchers (issue 25): `train.py -m hydra/launcher=submitit_local` runs a two-job
multirun, each job in a process of its own, each a complete run; the SLURM launcher config
shares its keys (tests/test_config.py composes it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_PLANTCLEF_RUN

REPO = Path(__file__).resolve().parents[1]


def test_submitit_local_runs_a_two_job_multirun(tiny_plantclef, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install vitlab[slurm]")
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={tmp_path}/multi",
        "optimizer.lr=1e-3,1e-2",
        *TINY_PLANTCLEF_RUN,
        f"dataset.root={tiny_plantclef}",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.max_epochs=2",
        "logger=csv",
        "print_config=false",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    summaries = sorted((tmp_path / "multi").glob("*/summary.json"))
    assert len(summaries) == 2
    runs = [json.loads(path.read_text()) for path in summaries]
    assert [r["status"] for r in runs] == ["completed", "completed"]
    assert len({r["run_dir"] for r in runs}) == 2
    assert list((tmp_path / "multi" / ".submitit").glob("*/*_log.out"))  # submitit ran them
