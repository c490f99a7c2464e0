"""Honest run records: summary.json says whether a run completed, W&B gets the exit code, a rerun
into the same folder owns its checkpoint names, and outputs are replaced atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

import vitlab.pipelines.plantclef.pipeline as run_module
from tests.test_pipeline import _train_cfg
from vitlab.atomic import atomic_output
from vitlab.pipelines.base import StageTimer
from vitlab.pipelines.plantclef import train
from vitlab.pipelines.plantclef.fit import write_label_map
from vitlab.tracking import RunTracker, recorded_run


@pytest.fixture(scope="module")
def shared_cache(tiny_plantclef, tmp_path_factory):
    """One prepared+embedded cache for the runs below (they differ after the embed stage)."""
    root = tmp_path_factory.mktemp("records")
    train(_train_cfg(root, tiny_plantclef, "trainer.max_epochs=2"))
    return root / "cache"


def _cfg(root: Path, data: Path, cache: Path, *extra: str):
    cfg = _train_cfg(root, data, "trainer.max_epochs=2", *extra)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(cache)
    return cfg


def test_failed_run_says_so_in_summary(tiny_plantclef, shared_cache, tmp_path, monkeypatch):
    def broken_predict(*args, **kwargs):
        raise RuntimeError("predict exploded")

    monkeypatch.setattr(run_module, "_predict_and_score", broken_predict)
    with pytest.raises(RuntimeError, match="predict exploded"):
        train(_cfg(tmp_path, tiny_plantclef, shared_cache))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == "RuntimeError: predict exploded"
    assert "fit" in summary["stage_seconds"]  # what ran before the failure is recorded


def test_completed_run_and_rerun_owns_its_checkpoint_names(tiny_plantclef, shared_cache, tmp_path):
    first = train(_cfg(tmp_path, tiny_plantclef, shared_cache))
    checkpoints = tmp_path / "run" / "checkpoints"
    first_bytes = (checkpoints / "best.ckpt").read_bytes()
    second = train(_cfg(tmp_path, tiny_plantclef, shared_cache, "optimizer.lr=3e-3"))
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert first["status"] == second["status"] == on_disk["status"] == "completed"
    assert "error" not in on_disk
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "best.ckpt",
        "label_map.json",
        "last.ckpt",
    ]
    assert second["best_checkpoint"] == str(checkpoints / "best.ckpt")
    previous = sorted((tmp_path / "run").glob("checkpoints.previous-*"))
    assert len(previous) == 1 and (previous[0] / "best.ckpt").read_bytes() == first_bytes
    assert len(sorted((tmp_path / "run").glob("csv.previous-*"))) == 1  # Lightning deleted it


def test_running_status_is_what_a_killed_run_leaves(tmp_path):
    class Tracker:
        finished: list[bool] = []

        def finish(self, failed: bool = False) -> None:
            self.finished.append(failed)

    tracker, summary = Tracker(), {"task": "train"}
    with recorded_run(tmp_path, summary, StageTimer(), tracker):
        during = json.loads((tmp_path / "summary.json").read_text())
    assert during["status"] == "running" and summary["status"] == "completed"
    with pytest.raises(KeyboardInterrupt), recorded_run(tmp_path, {}, StageTimer(), tracker):
        raise KeyboardInterrupt
    after = json.loads((tmp_path / "summary.json").read_text())
    assert after["status"] == "failed" and after["error"].startswith("KeyboardInterrupt")
    assert tracker.finished == [False, True]


def test_failed_run_finishes_wandb_with_nonzero_exit_code(tmp_path, monkeypatch):
    import wandb

    codes: list[int] = []
    original = wandb.finish

    def recording_finish(exit_code=None, **kwargs):
        codes.append(exit_code)
        return original(exit_code=exit_code, **kwargs)

    monkeypatch.setattr(wandb, "finish", recording_finish)
    logger = OmegaConf.create(
        {"wandb": {"mode": "offline", "project": "p", "group": None, "tags": [], "name": None}}
    )
    for index, fail in enumerate((False, True)):
        run_dir = tmp_path / str(index)
        run_dir.mkdir()
        tracker = RunTracker(logger, run_dir, "train", OmegaConf.create({"a": 1}))
        try:
            with recorded_run(run_dir, {}, StageTimer(), tracker):
                if fail:
                    raise ValueError("no species left")
        except ValueError:
            pass
    assert codes == [0, 1]


def test_outputs_are_replaced_atomically(tmp_path, monkeypatch):
    """If the final rename never happens (a kill mid-write), the previous file is intact and no
    half-written file sits under the real name."""
    write_label_map(tmp_path, [1, 2, 3])
    table = RunTracker(OmegaConf.create({}), tmp_path, "t", OmegaConf.create({}))
    table.log_table("per_plot_predictions", ["plot_id", "f1"], [["a", 1.0]])
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.*")}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_label_map(tmp_path, list(range(10_000)))
    with pytest.raises(KeyboardInterrupt):
        table.log_table("per_plot_predictions", ["plot_id", "f1"], [["b", 0.0]] * 1000)
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "chart.png") as tmp:
        tmp.write_bytes(b"half a png")
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.glob("*.*")}
    assert after == before  # nothing changed, no temp left behind
