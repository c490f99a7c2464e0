"""`train.py ckpt_path=<last.ckpt>` resumes a killed run (model, optimiser, epoch, callbacks)
and ends with the metrics of the run that was never interrupted (deterministic mode)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl

from tests.conftest import TINY_PLANTCLEF_RUN, compose_config, run_entry_point
from vitlab.errors import ConfigError
from vitlab.pipelines import load
from vitlab.pipelines.plantclef import train

RUN = [
    "trainer.max_epochs=6",
    "head.batch_size=32",
    "optimizer.lr=1e-2",
    *TINY_PLANTCLEF_RUN,
    "fit.early_stopping_patience=3",
    "print_config=false",
]


class KillAfterEpoch(pl.Callback):
    """SIGKILL this process when epoch `epoch` (1-based) has ended and been checkpointed."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_run_resumes_to_the_uninterrupted_runs_metrics(tiny_plantclef, tmp_path):
    cache = tmp_path / "cache"
    common = [*RUN, f"dataset.root={tiny_plantclef}"]

    def cfg(name: str, *extra: str):
        config = compose_config("train", [*common, *extra], tmp_path / name)
        config.paths.cache_dir = str(cache)
        return config

    uninterrupted = train(cfg("whole", "logger=csv"))

    killed_root = tmp_path / "killed"
    killed_root.mkdir()
    out = run_entry_point(
        "train.py",
        [
            *common,
            f"paths.cache_dir={cache}",
            "extra_target_prefixes=[tests.]",
            "+callbacks.kill={_target_: tests.test_resume.KillAfterEpoch, epoch: 3}",
        ],
        killed_root,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    last = killed_root / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()

    resumed = train(cfg("resumed", "logger=csv", f"ckpt_path={last}"))
    for key, value in uninterrupted["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert Path(resumed["best_checkpoint"]).parent == tmp_path / "resumed" / "run" / "checkpoints"


def test_resume_from_a_missing_file_or_in_fungiclef_is_refused_before_any_stage(tmp_path):
    cfg = compose_config("train", ["ckpt_path=/nonexistent/last.ckpt"], tmp_path)
    with pytest.raises(ConfigError, match="ckpt_path=/nonexistent/last.ckpt: no such"):
        load("plantclef").validate_train(cfg)
    (tmp_path / "x.ckpt").write_bytes(b"")
    fungi = compose_config(
        "train", ["experiment=quickstart_fungiclef", f"ckpt_path={tmp_path / 'x.ckpt'}"], tmp_path
    )
    with pytest.raises(ConfigError, match="cannot resume"):
        load("fungiclef").validate_train(fungi)


def test_a_file_that_is_not_a_training_checkpoint_is_refused_before_any_stage(tmp_path):
    import torch

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    weights = tmp_path / "weights.ckpt"
    torch.save({"model": {"w": torch.zeros(1)}}, weights)
    for path, match in ((text, "not a checkpoint"), (weights, "not a Lightning training")):
        cfg = compose_config("train", [f"ckpt_path={path}"], tmp_path)
        with pytest.raises(ConfigError, match=match):
            load("plantclef").validate_train(cfg)
