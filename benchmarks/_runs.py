"""Run vitlab's entry points (train.py, sweep.py) as a user would, offline, in a temp root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_entry(script: str, root: Path, *overrides: str) -> None:
    """`python <script> overrides...` in `root` (cwd and VITLAB_ROOT), W&B off; raises on error."""
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "VITLAB_ROOT": str(root),
        "PYTHONPATH": str(REPO / "src"),
    }
    cmd = [sys.executable, str(REPO / script), "logger=csv", *overrides]
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)


def train_summary(root: Path, name: str, *overrides: str) -> dict:
    """Run train.py into `root/name` and return its summary.json."""
    run_entry("train.py", root, f"hydra.run.dir={root}/{name}", *overrides)
    return json.loads((root / name / "summary.json").read_text())
