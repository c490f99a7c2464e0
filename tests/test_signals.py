"""Issue 23: SIGTERM (a scheduler's kill, preemption) ends a run as failed with exit 143, in
any stage; Lightning's own handler alone ended a fit with exit 0."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl

from tests.conftest import REPO, TINY_PLANTCLEF_RUN, compose_config
from vitlab.pipelines.base import RunContext
from vitlab.signals import Terminated, deferred_sigterm, sigterm_as_exception


class HangAtEpoch(pl.Callback):
    """Write `marker` when epoch `epoch` starts, then wait there (to be killed)."""

    def __init__(self, marker: str, epoch: int = 1):
        self.marker, self.epoch = marker, epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            Path(self.marker).write_text("fitting")
            time.sleep(120)


def test_sigterm_in_any_stage_fails_the_run_and_restores_the_handler(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = compose_config("train", ["logger=csv", "print_config=false"], tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as raised:
        with RunContext(cfg, "train") as run, run.stage("embed"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert raised.value.code == 143
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == "Terminated: received SIGTERM"
    assert "embed" in summary["stage_seconds"]
    assert signal.getsignal(signal.SIGTERM) == before
    # a failed run too ends saying where its results are
    assert f"train run failed; results in {tmp_path / 'run'}" in caplog.text


def test_the_handler_is_left_alone_outside_the_main_thread():
    import threading

    seen = []

    def worker():
        with sigterm_as_exception():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]


def test_a_sigterm_inside_a_deferred_block_is_raised_when_the_block_ends():
    finished = []
    with pytest.raises(Terminated) as raised, sigterm_as_exception():
        with deferred_sigterm():
            with deferred_sigterm():  # nested: held until the outermost block ends
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler has run by now, and did not raise
                finished.append("inner")
            finished.append("outer")
    assert finished == ["inner", "outer"] and raised.value.code == 143
    with sigterm_as_exception(), deferred_sigterm():  # nothing pending is left behind
        pass


def test_a_sigterm_during_a_storage_call_lets_the_call_complete():
    """The sweep's failure in CI: SIGTERM landed inside a trial's SQLite commit, the session
    broke, and closing the trial failed (exit 1, not 143)."""
    import optuna

    from vitlab.sweeps import SigtermSafeStorage

    class KilledMidCommit(optuna.storages.InMemoryStorage):
        def set_trial_user_attr(self, trial_id, key, value):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            super().set_trial_user_attr(trial_id, key, value)

    study = optuna.create_study(storage=SigtermSafeStorage(KilledMidCommit()))
    trial = study.ask()
    with pytest.raises(Terminated), sigterm_as_exception():
        trial.set_user_attr("epoch", 3)
    assert study.trials[0].user_attrs == {"epoch": 3}
    study.tell(trial, 1.0)  # the storage still works
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE


def test_sigterm_mid_fit_exits_143_with_a_failed_summary(tiny_plantclef, tmp_path):
    marker = tmp_path / "fitting"
    args = [
        *TINY_PLANTCLEF_RUN,
        f"dataset.root={tiny_plantclef}",
        "trainer.max_epochs=4",
        "extra_target_prefixes=[tests.]",
        f"+callbacks.hang={{_target_: tests.test_signals.HangAtEpoch, marker: '{marker}'}}",
        "logger=csv",
        f"hydra.run.dir={tmp_path}/run",
    ]
    env = {**os.environ, "VITLAB_ROOT": str(tmp_path), "WANDB_MODE": "disabled"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), process.communicate()[0][-3000:]
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "Terminated" in summary["error"]
