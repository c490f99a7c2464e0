"""sweep.py: a study completes, resumes without repeating trials, and records pruned trials."""

import json

import optuna
import pytest

from sweep import run_sweep
from tests.test_pipeline import FAST

STATES = optuna.trial.TrialState


def _base(data, root, *extra):
    fast = [o for o in FAST if not o.startswith(("trainer.max_epochs", "optimizer.lr"))]
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
        assert ("optimizer.weight_decay" in t.params) == (t.params["optimizer"] == "adamw")
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


# --- killed workers: stale RUNNING trials are failed and retried; no replayed parameters ---


def _start_sweep(args, cwd, keep_stdout: bool = False):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, str(repo / "sweep.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE if keep_stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_when_started(worker, trial_dir, timeout: float = 240) -> None:
    """SIGKILL `worker` as soon as the trial folder `trial_dir` appears (it is training)."""
    import time

    deadline = time.monotonic() + timeout
    while not trial_dir.exists():
        if worker.poll() is not None:
            pytest.fail(f"sweep.py exited early: {worker.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, f"{trial_dir.name} never started"
        time.sleep(0.05)
    worker.kill()
    worker.communicate()  # reaped: its pid is gone


def _param_sets(trials):
    return [tuple(sorted(t.params.items())) for t in trials]


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_sweep_killed_during_a_trial_resumes_to_exactly_n_trials(tiny_plantclef, tmp_path, kind):
    """SIGKILL sweep.py while trial 1 trains, rerun: the orphaned RUNNING trial is closed as FAIL
    and re-run with its parameters, the study ends with exactly n_trials finished trials, and
    the seeded sampler does not replay the parameters of trials already in the study."""

    from vitlab.sweeps import build_storage

    url = f"sqlite:///{tmp_path}/study.db" if kind == "sqlite" else f"journal:{tmp_path}/study.log"
    args = _base(
        tiny_plantclef,
        tmp_path,
        "sweep.n_trials=4",
        "sweep.study_name=killed",
        f"sweep.storage={url}",
    )
    worker = _start_sweep(args, tmp_path)
    _kill_when_started(worker, tmp_path / "sweeps" / "killed" / "trial_0001")
    killed = optuna.load_study(study_name="killed", storage=build_storage(url)).trials
    assert [t.state for t in killed] == [STATES.COMPLETE, STATES.RUNNING]

    study = run_sweep(args)  # same machine, the killed pid is dead: failed at once, not after grace
    trials = study.trials
    finished = [t for t in trials if t.state in (STATES.COMPLETE, STATES.PRUNED)]
    assert len(finished) == 4
    assert trials[1].state == STATES.FAIL and trials[1].user_attrs.get("stale")
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert [t.params for t in retries] == [killed[1].params]
    assert retries[0] in finished
    assert len(set(_param_sets(finished))) == 4, [t.params for t in finished]
    assert not [t for t in trials if t.user_attrs.get("excess")]
    assert not [t for t in trials if t.state == STATES.RUNNING]
    assert trials[1].user_attrs["worker"]["pid"] == worker.pid  # its lease named the killed pid
    # rerun: nothing to do
    assert run_sweep(args).trials == trials


def test_seeded_sampler_does_not_replay_parameters_on_resume(tmp_path):
    from vitlab.sweeps import build_sampler

    def objective(trial):
        return trial.suggest_float("x", 0.0, 1.0) + trial.suggest_int("n", 0, 10**6)

    url = f"sqlite:///{tmp_path}/study.db"
    for spec in ({"name": "tpe", "seed": 0}, {"name": "random", "seed": 0}):
        name = spec["name"]
        for _ in range(2):  # a first run, then a resumed one with a fresh sampler of the same seed
            study = optuna.create_study(
                study_name=name, storage=url, sampler=build_sampler(spec), load_if_exists=True
            )
            study.optimize(objective, n_trials=3)
        resumed = _param_sets(study.trials)
        assert len(set(resumed)) == 6
        # deterministic: one uninterrupted run draws the same parameters
        once = optuna.create_study(sampler=build_sampler(spec))
        once.optimize(objective, n_trials=6)
        assert _param_sets(once.trials) == resumed


def _running_trial(study, worker=None, heartbeat=None):
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    if worker is not None:
        trial.set_user_attr("worker", worker)
    if heartbeat is not None:
        trial.set_user_attr("heartbeat", heartbeat)
    return trial


def test_stale_trials_failed_and_retried_live_ones_kept():
    import os
    import subprocess
    import sys
    import time

    from sweep import next_step
    from vitlab.sweeps import (
        ALIVE,
        STALE,
        SUSPECT,
        StaleTrialPolicy,
        fail_stale_trials,
        this_worker,
        trial_liveness,
    )

    policy = StaleTrialPolicy(heartbeat_interval=30, grace_period=300, max_retries=1)
    now = time.time()
    me = this_worker(policy)
    elsewhere = {**me, "node": "other-host/boot/pid:[1]", "pid": 1}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.create_study()
    trials = {
        "silent other host": _running_trial(study, elsewhere, now - 1000),
        "late other host": _running_trial(study, elsewhere, now - 100),
        "beating other host": _running_trial(study, elsewhere, now - 5),
        "slow beats other host": _running_trial(
            study, {**elsewhere, "heartbeat_interval": 400}, now - 350
        ),
        "this process, old beat": _running_trial(study, me, now - 1000),
        "dead process here": _running_trial(study, {**me, "pid": dead.pid}, now),
        "reused pid here": _running_trial(study, {**me, "start": "-1"}, now),
        "just asked": _running_trial(study),
    }
    expected = {
        "silent other host": STALE,
        "late other host": SUSPECT,
        "beating other host": ALIVE,
        "slow beats other host": ALIVE,  # its own interval, not ours, says when it is late
        "this process, old beat": ALIVE,
        "dead process here": STALE,
        "reused pid here": STALE,
        "just asked": ALIVE,
    }
    frozen = {t.number: t for t in study.trials}
    got = {k: trial_liveness(frozen[t.number], policy, now) for k, t in trials.items()}
    assert got == expected
    assert os.getpid() == me["pid"]

    closed = fail_stale_trials(study, policy)
    stale = [trials[k].number for k, v in expected.items() if v == STALE]
    assert sorted(t.number for t in closed) == stale
    states = {t.number: t.state for t in study.trials}
    assert [states[n] for n in stale] == [STATES.FAIL] * 3
    waiting = study.get_trials(states=(STATES.WAITING,))
    assert [(t.user_attrs["retry_of"], t.params) for t in waiting] == [
        (n, study.trials[n].params) for n in stale
    ]
    assert fail_stale_trials(study, policy) == []  # closed once

    # a retry left stale again is retried at most max_retries times
    retry = study.ask()  # pops the first retry, same parameters
    assert retry.params == study.trials[stale[0]].params
    retry.set_user_attr("worker", elsewhere)
    retry.set_user_attr("heartbeat", now - 1000)
    assert [t.number for t in fail_stale_trials(study, policy)] == [retry.number]
    assert len(study.get_trials(states=(STATES.WAITING,))) == 2  # not enqueued again

    # the study is full only with live trials: a suspect one makes the worker wait, not stop
    small = optuna.create_study()
    small.tell(small.ask(), 1.0)
    _running_trial(small, elsewhere, now - 100)
    assert next_step(small, 2, policy) == "wait"
    assert next_step(small, 3, policy) == "run"
    _running_trial(small, elsewhere, now - 5)
    assert next_step(small, 3, policy) == "wait"  # full counting a live and a suspect trial
    small.tell(small.ask(), 1.0)  # the late trial still runs, but n_trials are finished
    assert next_step(small, 2, policy) == "done"
    live = optuna.create_study()
    live.tell(live.ask(), 1.0)
    _running_trial(live, elsewhere, now - 5)
    assert next_step(live, 2, policy) == "done"  # its worker is alive and will finish it


def test_heartbeat_refreshes_lease_until_the_trial_is_closed():
    import time

    from vitlab.sweeps import StaleTrialPolicy, TrialHeartbeat

    study = optuna.create_study()
    trial = study.ask()
    with TrialHeartbeat(trial, StaleTrialPolicy(heartbeat_interval=0.05, grace_period=1)):
        first = study.trials[0].user_attrs["heartbeat"]
        time.sleep(0.3)
        assert study.trials[0].user_attrs["heartbeat"] > first
        assert study.trials[0].user_attrs["worker"]["pid"] > 0
        study.tell(trial, state=STATES.FAIL)  # closed by another worker: the thread stops quietly
        time.sleep(0.15)


def test_stale_trial_settings_are_checked(tiny_plantclef, tmp_path):
    from vitlab.errors import ConfigError

    with pytest.raises(ConfigError, match="grace_period"):
        run_sweep(_base(tiny_plantclef, tmp_path, "sweep.grace_period=10"))
    with pytest.raises(ConfigError, match="max_retries"):
        run_sweep(_base(tiny_plantclef, tmp_path, "sweep.max_retries=-1"))


def test_trial_closed_as_stale_by_another_worker_is_dropped():
    """A worker wrongly taken for dead (e.g. suspended past the grace period) finds its trial
    closed: it drops the result and goes on, without a crash."""
    from sweep import run_one_trial

    study = optuna.create_study()

    def closed_then_returns(trial):
        study._storage.set_trial_state_values(trial._trial_id, state=STATES.FAIL)
        return 1.0

    def closed_then_writes(trial):
        study._storage.set_trial_state_values(trial._trial_id, state=STATES.FAIL)
        trial.report(1.0, 0)  # raises UpdateFinishedTrialError
        return 1.0

    assert run_one_trial(study, closed_then_returns, n_trials=3)
    assert run_one_trial(study, closed_then_writes, n_trials=3)
    assert [t.state for t in study.trials] == [STATES.FAIL, STATES.FAIL]
    assert [t.value for t in study.trials] == [None, None]


def _two_trials(root, *overrides):
    study = run_sweep(
        [
            *overrides,
            "logger=csv",
            f"paths.root_dir={root}",
            f"paths.cache_dir={root}/cache",
            "sweep.n_trials=2",
            "sweep.storage=null",
        ]
    )
    best = root / "sweeps" / study.study_name / "best_params.json"
    return study, json.loads(best.read_text())


def test_fungiclef_quickstart_sweeps(tmp_path, tmp_path_factory):
    """The pipeline's metric reaches the study (it used to fail: no val_images/macro_f1)."""
    from tests.test_fungiclef_pipeline import FAST as FUNGI_FAST
    from vitlab.data.synthetic.fungiclef import FungiSyntheticSpec, generate_fungiclef

    spec = FungiSyntheticSpec(seed=2, n_species=8, n_unknown=2, max_observations=10)
    data = generate_fungiclef(tmp_path / "data", spec)
    fast = [o for o in FUNGI_FAST if not o.startswith("trainer.max_epochs")]
    study, best = _two_trials(
        tmp_path, *fast, "trainer.max_epochs=3", f"dataset.root={data}", "sweep=quickstart_head"
    )
    assert len(study.get_trials(states=(STATES.COMPLETE,))) == 2
    assert 0 <= best["value"] <= 1  # held_out/ensemble/macro_f1


def test_groupvit_quickstart_sweeps(tmp_path):
    """It used to run the PlantCLEF pipeline and die on a missing PlantCLEF key."""
    study, best = _two_trials(
        tmp_path,
        "experiment=quickstart_groupvit",
        "sweep=quickstart_groupvit",
        "trainer.max_epochs=1",
        "dataset.synthetic.n_train=16",
        "dataset.synthetic.n_val=8",
        "groupvit.batch_size=8",
    )
    assert len(study.get_trials(states=(STATES.COMPLETE,))) == 2
    assert best["value"] > 0  # val/loss
    assert set(best["params"]) == {"optimizer.lr", "groupvit.losses.multi_label"}


def test_pruning_sees_every_fold_of_a_trial_as_its_own_steps():
    """A FungiCLEF trial fits one head per fold with the same callback; the epoch restarts at 0
    for each fold, but the pruner must see fold 2's values too (as later steps)."""
    from types import SimpleNamespace

    import torch

    from vitlab.sweeps import OptunaPruning

    study = optuna.create_study(direction="minimize")
    trial = study.ask()
    pruning = OptunaPruning(trial, "val/loss")
    for fold_losses in ([3.0, 2.0], [2.5, 1.5]):
        for epoch, loss in enumerate(fold_losses):
            trainer = SimpleNamespace(
                sanity_checking=False,
                current_epoch=epoch,
                callback_metrics={"val/loss": torch.tensor(loss)},
                should_stop=False,
            )
            pruning.on_validation_end(trainer, None)
    frozen = study._storage.get_trial(trial._trial_id)
    assert frozen.intermediate_values == {0: 3.0, 1: 2.0, 2: 2.5, 3: 1.5}
