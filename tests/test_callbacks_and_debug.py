"""The `callbacks=` group, `debug=` presets, the per-epoch log line and the trainer keys that
need no `+`."""

from __future__ import annotations

import inspect

import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor

from tests.conftest import REPO, TINY_PLANTCLEF_RUN, compose_config, run_entry_point
from vitlab.callbacks import EpochLog, epoch_line
from vitlab.errors import ConfigError
from vitlab.pipelines.base import configured_callbacks
from vitlab.pipelines.plantclef import train, validate

SMALL = [
    *TINY_PLANTCLEF_RUN,
    "print_config=false",
    "logger=csv",
]


def test_epoch_line_shows_metrics_rate_and_eta():
    line = epoch_line(2, 40, {"val/loss": 1.23456, "train/loss": 2.0}, 2.0, 10, 2.5)
    assert line == (
        "epoch 3/40 | train/loss 2 val/loss 1.235 | 2.0 s/epoch, 5.0 samples/s | ETA 1m32s"
    )
    assert "ETA" not in epoch_line(0, -1, {}, 1.0, 1, 1.0)  # max_epochs=-1: unbounded


def test_default_callbacks_follow_the_runs_monitor_and_none_drops_them(tmp_path):
    cfg = compose_config("train", ["fit.early_stopping_patience=4"], tmp_path)
    built = configured_callbacks(cfg, "train/loss", "min")
    stopper = next(c for c in built if isinstance(c, EarlyStopping))
    assert (stopper.monitor, stopper.mode, stopper.patience) == ("train/loss", "min", 4)
    assert any(isinstance(c, LearningRateMonitor) for c in built)
    assert any(isinstance(c, EpochLog) for c in built)
    off = compose_config("train", ["fit.early_stopping_patience=0"], tmp_path)
    assert not any(isinstance(c, EarlyStopping) for c in configured_callbacks(off, "a", "max"))
    assert (
        configured_callbacks(compose_config("train", ["callbacks=none"], tmp_path), "a", "max")
        == []
    )
    rich = compose_config("train", ["callbacks=rich"], tmp_path)
    assert "rich_progress_bar" in rich.callbacks and "epoch_log" in rich.callbacks


def test_a_bad_callback_fails_before_any_stage_naming_it(tmp_path):
    cfg = compose_config(
        "train", ["+callbacks.mine={_target_: pytorch_lightning.callbacks.EarlyStopping}"], tmp_path
    )
    with pytest.raises(ConfigError, match=r"callbacks\.mine"):
        train(cfg)  # EarlyStopping without monitor
    outside = compose_config("train", ["+callbacks.mine={_target_: mylab.Thing}"], tmp_path)
    with pytest.raises(ConfigError, match="extra_target_prefixes"):
        train(outside)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_trainer_keys_of_pl_trainer_are_settable_without_plus(tmp_path):
    trainer_args = set(inspect.signature(pl.Trainer.__init__).parameters)
    for option in ("auto", "cpu", "gpu", "gpu_amp", "gpu_ddp", "default"):
        cfg = OmegaConf.load(REPO / "configs" / "trainer" / f"{option}.yaml")
        assert set(cfg) - {"_target_", "defaults"} <= trainer_args, option
    cfg = compose_config(
        "train", ["trainer.fast_dev_run=true", "trainer.limit_val_batches=2"], tmp_path
    )
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.limit_val_batches == 2


@pytest.mark.parametrize("preset", ["fdr", "overfit", "limit"])
def test_debug_presets_compose_over_the_experiment(preset, tmp_path):
    cfg = compose_config("train", [f"debug={preset}", "experiment=quickstart_fungiclef"], tmp_path)
    assert cfg.task_name == "debug"
    expected = {
        "fdr": ("fast_dev_run", True),
        "overfit": ("overfit_batches", 3),
        "limit": ("limit_train_batches", 5),
    }[preset]
    assert cfg.trainer[expected[0]] == expected[1]
    validate(compose_config("train", [f"debug={preset}"], tmp_path))


def test_fast_dev_run_goes_through_the_whole_pipeline(tiny_plantclef, tmp_path):
    """fast_dev_run saves no checkpoint through callbacks: the trained state is saved as
    final.ckpt and predicted from."""
    cfg = compose_config("train", [*SMALL, "debug=fdr", f"dataset.root={tiny_plantclef}"], tmp_path)
    summary = train(cfg)
    assert summary["best_checkpoint"].endswith("final.ckpt")
    assert "test/macro_f1_per_plot" in summary["metrics"]


def test_a_log_file_shows_one_line_per_epoch(tiny_plantclef, tmp_path):
    out = run_entry_point(
        "train.py", [*SMALL, "debug=limit", f"dataset.root={tiny_plantclef}"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    for epoch in (1, 2, 3):
        assert f"epoch {epoch}/3 | " in log and "samples/s" in log
    assert "ETA 0m00s" in log


class PatientStopping(pl.callbacks.EarlyStopping):
    """A user's EarlyStopping subclass, whose name does not say EarlyStopping."""


def test_early_stopping_is_recognised_by_class_not_by_name():
    from vitlab.pipelines.base import is_early_stopping

    assert is_early_stopping("pytorch_lightning.callbacks.EarlyStopping")
    assert is_early_stopping("tests.test_callbacks_and_debug.PatientStopping")
    assert not is_early_stopping("tests.test_callbacks_and_debug.NotEarlyStoppingAtAll")
    assert not is_early_stopping("pytorch_lightning.callbacks.LearningRateMonitor")


class NotEarlyStoppingAtAll(pl.Callback):
    """Its name holds `EarlyStopping`; patience 0 must not drop it."""
