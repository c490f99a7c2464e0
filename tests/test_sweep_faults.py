"""Sweep and multirun faults (issue 23): every pruner works with the shipped sweep files and a
bad setting is a ConfigError naming it; trials.csv gives a pruned trial no objective value; a
loss objective over swept loss weights is refused; bad parameter keys fail before trial 0 naming
the sweep file; SIGTERM closes the running trial as FAIL and exits 143; a multirun goes on past
a job's user error and records it."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from sweep import run_sweep
from tests.test_pipeline import FAST
from tests.test_sweep import _base, _start_sweep
from vitlab.errors import ConfigError
from vitlab.sweeps import PRUNERS, build_pruner, build_sampler

STATES = optuna.trial.TrialState
REPO = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((REPO / "configs" / "sweep").glob("*.yaml"))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- 1. pruners -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRUNERS))
@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_pruner_builds_from_every_shipped_sweep_file(sweep_file, name):
    spec = {**yaml.safe_load(sweep_file.read_text())["pruner"], "name": name}
    if name == "threshold":  # needs a bound no sweep file can guess: refused, naming the key
        with pytest.raises(ConfigError, match=r"sweep\.pruner\.lower"):
            build_pruner(spec)
        assert isinstance(build_pruner({**spec, "lower": 0.1}), PRUNERS[name])
    else:
        assert isinstance(build_pruner(spec), PRUNERS[name])


@pytest.mark.parametrize("name", ["none", "hyperband", "percentile", "median"])
def test_every_pruner_runs_a_sweep(tiny_plantclef, tmp_path, name):
    args = _base(tiny_plantclef, tmp_path, "sweep.n_trials=2", f"sweep.pruner.name={name}")
    study = run_sweep(args)
    assert len(study.get_trials(states=(STATES.COMPLETE, STATES.PRUNED))) == 2


@pytest.mark.parametrize(
    "override, key",
    [
        ("+sweep.pruner.n_startup=3", "sweep.pruner.n_startup"),  # a typo
        ("+sweep.pruner.reduction_factor=3", "sweep.pruner.reduction_factor"),  # hyperband's
        ("+sweep.sampler.n_startup=3", "sweep.sampler.n_startup"),
        ("sweep.pruner.name=medain", "sweep.pruner.name"),
    ],
)
def test_a_bad_pruner_or_sampler_setting_fails_before_trial_0(
    tiny_plantclef, tmp_path, override, key
):
    args = _base(tiny_plantclef, tmp_path, "sweep.n_trials=1", "sweep.study_name=bad", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_sweep(args)
    assert not (tmp_path / "sweeps" / "bad").exists()


def test_sampler_settings_are_checked():
    with pytest.raises(ConfigError, match=r"sweep\.sampler\.gama"):
        build_sampler({"name": "tpe", "seed": 0, "gama": 0.1})
    with pytest.raises(ConfigError, match=r"sweep\.sampler\.n_startup_trials"):
        build_sampler({"name": "random", "n_startup_trials": 3})


# --- 2. trials.csv: a pruned trial has no objective value -----------------------------------


def test_pruned_trials_have_no_objective_value_in_trials_csv(tiny_plantclef, tmp_path):
    """direction=minimize against a monitor that is maximised: the callback reports the negated
    val/macro_f1, and Optuna gives a pruned trial its last report as value. trials.csv must not
    show that under the objective's name; the last report is in `last_val/macro_f1`, positive."""
    study = run_sweep(
        _base(
            tiny_plantclef,
            tmp_path,
            "sweep.n_trials=2",
            "sweep.study_name=pruned",
            "sweep.direction=minimize",
            "sweep.pruner.name=threshold",
            "~sweep.pruner.n_startup_trials",  # as before this fix: threshold has none
            "+sweep.pruner.lower=2.0",  # every reported value (<= 0) is below: all pruned
            "sweep.pruner.n_warmup_steps=0",
        )
    )
    assert [t.state for t in study.trials] == [STATES.PRUNED, STATES.PRUNED]
    assert all(t.value <= 0 for t in study.trials)  # Optuna's value: the negated report
    rows = _read_csv(tmp_path / "sweeps" / "pruned" / "trials.csv")
    assert [r["state"] for r in rows] == ["PRUNED", "PRUNED"]
    assert [r["val_images/macro_f1"] for r in rows] == ["", ""]
    for row, trial in zip(rows, study.trials):
        assert float(row["last_val/macro_f1"]) == pytest.approx(-trial.value)
        assert 0 <= float(row["last_val/macro_f1"]) <= 1


# --- 3. a loss objective over swept loss weights --------------------------------------------


def _groupvit(root, *extra):
    return [
        "experiment=quickstart_groupvit",
        "sweep=quickstart_groupvit",
        "logger=csv",
        f"paths.root_dir={root}",
        f"paths.cache_dir={root}/cache",
        "sweep.storage=null",
        "trainer.max_epochs=1",
        "dataset.synthetic.n_train=16",
        "dataset.synthetic.n_val=8",
        "groupvit.batch_size=8",
        *extra,
    ]


def test_groupvit_sweep_optimises_the_unweighted_contrastive_term(tmp_path):
    """The GroupViT sweep varies the multi-label weight: its objective (and what the pruner
    compares) is val/contrastive, not val/loss (the weighted sum)."""
    study = run_sweep(_groupvit(tmp_path, "sweep.n_trials=1"))
    (trial,) = study.trials
    assert trial.state == STATES.COMPLETE
    assert trial.user_attrs["reported"]["metric"] == "val/contrastive"
    folder = tmp_path / "sweeps" / study.study_name
    summary = json.loads((folder / "trial_0000" / "summary.json").read_text())
    assert trial.value == pytest.approx(summary["metrics"]["val/contrastive"])
    assert trial.value != pytest.approx(summary["metrics"]["val/loss"])
    rows = _read_csv(folder / "trials.csv")
    assert float(rows[0]["val/contrastive"]) == pytest.approx(trial.value)


def test_a_loss_objective_over_swept_loss_weights_is_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        run_sweep(_groupvit(tmp_path, "sweep.metric=val/loss", "sweep.n_trials=1"))
    message = str(err.value)
    for part in (
        "configs/sweep/quickstart_groupvit.yaml",
        "groupvit.losses.multi_label",
        "val/loss",
        "sweep.allow_loss_objective=true",
    ):
        assert part in message
    assert not (tmp_path / "sweeps").exists()  # before trial 0
    # the explicit opt-in passes the check (n_trials=0: nothing to run)
    run_sweep(
        _groupvit(
            tmp_path, "sweep.metric=val/loss", "sweep.allow_loss_objective=true", "sweep.n_trials=0"
        )
    )


def test_loss_objective_check_finds_loss_keys():
    from vitlab.sweep_driver import check_loss_objective

    def where(key):
        return "configs/sweep/x.yaml"

    focal = {"loss.gamma": {}, "optimizer.lr": {}}
    with pytest.raises(ConfigError, match=r"configs/sweep/x\.yaml.*loss\.gamma"):
        check_loss_objective("val/loss", focal, False, where)
    with pytest.raises(ConfigError, match="loss"):
        check_loss_objective("val/loss", {"loss": {"type": "categorical"}}, False, where)
    check_loss_objective("val/loss", focal, True, where)  # opted in
    check_loss_objective("val/macro_f1", focal, False, where)  # not a loss
    check_loss_objective("val/loss", {"optimizer.lr": {}}, False, where)  # no loss weight


# --- 4. parameter keys: renamed, missing, bad choices -> before trial 0 ---------------------


@pytest.fixture
def config_dir(tmp_path):
    """A copy of the repository's configs, to add sweep files to."""
    return Path(shutil.copytree(REPO / "configs", tmp_path / "configs"))


def _sweep_file(config_dir: Path, name: str, params: dict) -> None:
    spec = yaml.safe_load((config_dir / "sweep" / "quickstart_head.yaml").read_text())
    spec["params"] = params
    (config_dir / "sweep" / f"{name}.yaml").write_text(yaml.safe_dump(spec))


FLOAT = {"type": "float", "low": 1.0e-4, "high": 1.0e-2}


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"head.lr": FLOAT}, ["sweep.params.head.lr", "renamed", "use optimizer.lr"]),
        ({"optimizer.lrr": FLOAT}, ["sweep.params.optimizer.lrr", "optimizer.lrr"]),
        (
            {"optimizer": {"type": "categorical", "choices": ["adam", "sgdd"]}},
            ["sweep.params.optimizer", "optimizer=sgdd"],
        ),
        (
            {"optimizer.weight_decay": {**FLOAT, "when": {"optimizer": "adamw"}}},
            ["sweep.params.optimizer.weight_decay.when.optimizer"],
        ),
        ({"optimizer.lr": {"type": "floot", "low": 0.1, "high": 1}}, ["optimizer.lr.type"]),
    ],
    ids=["renamed", "missing", "bad choice", "when on no parameter", "bad type"],
)
def test_bad_parameter_keys_fail_before_trial_0_naming_the_sweep_file(
    tiny_plantclef, tmp_path, config_dir, params, expected
):
    _sweep_file(config_dir, "faulty", params)
    args = _base(tiny_plantclef, tmp_path, "sweep=faulty", "sweep.study_name=faulty")
    with pytest.raises(ConfigError) as err:
        run_sweep(args, config_dir)
    message = str(err.value)
    assert "configs/sweep/faulty.yaml" in message
    for part in expected:
        assert part in message
    assert not (tmp_path / "sweeps").exists()


def test_a_renamed_key_in_a_params_override_names_the_override(tiny_plantclef, tmp_path):
    override = "++sweep.params={head.lr:{type:float,low:0.0001,high:0.01}}"
    args = _base(tiny_plantclef, tmp_path, override, "sweep.study_name=faulty")
    with pytest.raises(ConfigError) as err:
        run_sweep(args)
    assert override in str(err.value) and "use optimizer.lr" in str(err.value)
    assert not (tmp_path / "sweeps").exists()


def test_a_missing_sweep_file_is_a_config_error(tiny_plantclef, tmp_path):
    with pytest.raises(ConfigError, match="sweep/nosuch"):
        run_sweep(_base(tiny_plantclef, tmp_path, "sweep=nosuch"))


# --- 5. SIGTERM: the trial closed as FAIL, exit 143, a rerun completes n_trials -------------


def _signal_when_fitting(worker, trial_dir: Path, signum: int, timeout: float = 240) -> None:
    """Send `signum` to `worker` once the trial in `trial_dir` is fitting (its last.ckpt)."""
    deadline = time.monotonic() + timeout
    while not (trial_dir / "checkpoints" / "last.ckpt").exists():
        if worker.poll() is not None:
            pytest.fail(f"sweep.py exited early: {worker.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, f"{trial_dir.name} never started fitting"
        time.sleep(0.05)
    worker.send_signal(signum)


def test_sigterm_fails_the_running_trial_exits_143_and_a_rerun_completes(tiny_plantclef, tmp_path):
    url = f"sqlite:///{tmp_path}/study.db"
    args = _base(
        tiny_plantclef,
        tmp_path,
        "sweep.n_trials=2",
        "sweep.study_name=term",
        f"sweep.storage={url}",
        "trainer.max_epochs=40",
    )
    worker = _start_sweep(args, tmp_path)
    _signal_when_fitting(worker, tmp_path / "sweeps" / "term" / "trial_0000", signal.SIGTERM)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 143, err.decode()[-2000:]
    assert "Traceback" not in err.decode()
    stopped = optuna.load_study(study_name="term", storage=url).trials
    assert stopped[0].state == STATES.FAIL
    assert stopped[0].user_attrs["interrupted"] == "received SIGTERM"
    assert not [t for t in stopped if t.state == STATES.RUNNING]

    rerun = _start_sweep(args, tmp_path)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()[-2000:]
    trials = optuna.load_study(study_name="term", storage=url).trials
    finished = [t for t in trials if t.state in (STATES.COMPLETE, STATES.PRUNED)]
    assert len(finished) == 2
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert [t.params for t in retries] == [stopped[0].params] and retries[0] in finished


def test_an_interrupted_trial_is_failed_retried_and_the_interrupt_goes_on():
    from sweep import run_one_trial

    study = optuna.create_study()

    def interrupted(trial):
        trial.suggest_float("x", 0.0, 1.0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_one_trial(study, interrupted, n_trials=2)
    assert [t.state for t in study.trials] == [STATES.FAIL, STATES.WAITING]
    assert study.trials[1].params == study.trials[0].params


# --- 6. multirun: a job's user error does not stop the others -------------------------------


def test_multirun_goes_on_past_a_user_error_and_records_it(tiny_plantclef, tmp_path):
    sweep_dir = tmp_path / "multirun"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "--multirun",
        "embed.precision=fp32,fp8,fp32",  # job 1: a ConfigError before any stage
        *[o for o in FAST if not o.startswith("trainer.max_epochs")],
        "trainer.max_epochs=2",
        "print_config=false",
        f"dataset.root={tiny_plantclef}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {**os.environ, "VITLAB_ROOT": str(tmp_path), "WANDB_MODE": "disabled"}
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    printed = out.stdout + out.stderr
    assert out.returncode == 2, printed[-3000:]
    assert "Traceback" not in printed
    rows = _read_csv(sweep_dir / "multirun_results.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert [r["status"] for r in rows] == ["completed", "failed", "completed"]
    assert "embed.precision" in rows[1]["error"] and "ConfigError" in rows[1]["error"]
    assert rows[0]["error"] == rows[2]["error"] == ""
    assert float(rows[2]["val_images/macro_f1"]) >= 0  # the job after the failed one ran
    assert "1 job(s) failed" in printed or "1 of 3 job(s) failed" in printed


def test_multirun_table_records_a_job_that_raised(tmp_path):
    """A job that fails with an exception (not a user error): Hydra stops the multirun after
    the last job without `on_multirun_end`; each job's end has written the table already."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from vitlab.run_tables import MultirunTable

    callback = MultirunTable()
    for job, failure in enumerate([None, RuntimeError("out of memory")]):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"a={job}"]))
        (folder / ".hydra" / "config.yaml").write_text("optimized_metric: val/f1\n")
        if failure is None:
            summary = {"status": "completed", "metrics": {"val/f1": 0.5}}
            (folder / "summary.json").write_text(json.dumps(summary))
        ret = JobReturn()
        ret.status = JobStatus.FAILED if failure else JobStatus.COMPLETED
        ret.return_value = failure or 0.5
        config = OmegaConf.create(
            {"hydra": {"runtime": {"output_dir": str(folder)}, "sweep": {"dir": str(tmp_path)}}}
        )
        callback.on_job_end(config=config, job_return=ret)
    rows = _read_csv(tmp_path / "multirun_results.csv")
    assert [(r["job"], r["status"], r["error"]) for r in rows] == [
        ("0", "completed", ""),
        ("1", "failed", "RuntimeError: out of memory"),
    ]
    with pytest.raises(SystemExit) as exit_:
        callback.on_multirun_end(config=config)
    assert exit_.value.code == 2
