"""sweep.py: a study completes, resumes without repeating trials, and records pruned trials."""

import json

import optuna
import pytest

from sweep import run_sweep
from tests.test_pipeline import FAST

STATES = optuna.trial.TrialState


def _base(data, root, *extra):
    fast = [o for o in FAST if not o.startswith(("trainer.max_epochs", "head.lr"))]
    return [
        *fast,
        "trainer.max_epochs=3",
        f"dataset.root={data}",
        f"paths.root_dir={root}",
        f"paths.cache_dir={root}/cache",
        "sweep=quickstart_head",
        *extra,
    ]


def test_study_runs_then_resumes_with_more_trials(tiny_plantclef, tmp_path):
    study = run_sweep(_base(tiny_plantclef, tmp_path, "sweep.n_trials=4"))
    first = study.get_trials(states=(STATES.COMPLETE,))
    assert len(first) == 4
    best = json.loads((tmp_path / "sweeps" / study.study_name / "best_params.json").read_text())
    assert best["value"] == pytest.approx(study.best_value)
    # same storage and study: resumes, adds only the missing trials, keeps the finished ones
    again = run_sweep(_base(tiny_plantclef, tmp_path, "sweep.n_trials=6"))
    trials = again.get_trials(states=(STATES.COMPLETE, STATES.PRUNED))
    assert len(trials) == 6
    assert [t.params for t in trials[:4]] == [t.params for t in first]
    # conditional parameter: weight decay only sampled with adamw
    for t in trials:
        assert ("head.weight_decay" in t.params) == (t.params["head.optimizer"] == "adamw")
    assert run_sweep(_base(tiny_plantclef, tmp_path, "sweep.n_trials=6")).trials == again.trials


def test_pruned_trials_are_recorded_as_pruned(tiny_plantclef, tmp_path):
    study = run_sweep(
        _base(
            tiny_plantclef,
            tmp_path,
            "sweep.n_trials=2",
            "sweep.study_name=always_pruned",
            "sweep.pruner.name=threshold",
            "~sweep.pruner.n_startup_trials",
            "+sweep.pruner.lower=2.0",
            "sweep.pruner.n_warmup_steps=0",
        )
    )
    assert [t.state for t in study.trials] == [STATES.PRUNED, STATES.PRUNED]


def test_two_processes_on_one_storage_finish_n_trials_in_total(tiny_plantclef, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    # a journal file: Optuna's storage for many workers on one file system (SQLite is not
    # meant for concurrent writers)
    journal = tmp_path / "study.log"
    args = _base(
        tiny_plantclef,
        tmp_path,
        "sweep.n_trials=4",
        "sweep.study_name=shared",
        f"sweep.storage=journal:{journal}",
    )
    env = {**os.environ, "WANDB_MODE": "disabled"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(repo / "sweep.py"), *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err.decode()[-2000:]
    from vitlab.sweeps import build_storage

    study = optuna.load_study(study_name="shared", storage=build_storage(f"journal:{journal}"))
    finished = study.get_trials(states=(STATES.COMPLETE, STATES.PRUNED))
    assert len(finished) == 4
    excess = [t for t in study.trials if t.user_attrs.get("excess")]
    assert all(t.state == STATES.FAIL for t in excess)
    # both workers took part
    assert {t.user_attrs.get("train_seconds") is not None for t in finished} == {True}
