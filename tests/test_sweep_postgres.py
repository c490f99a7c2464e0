"""Sweeps on a real PostgreSQL server (issue 25): several `sweep.py` workers share one study,
a password given literally is never written, and a server that cannot be used stops the sweep
with exit 2 naming `sweep.storage`, in seconds, without printing the password."""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pytest

from tests.postgres_server import PASSWORD
from tests.test_sweep import _base, _kill_when_started, _param_sets, _start_sweep

STATES = optuna.trial.TrialState
REPO = Path(__file__).resolve().parents[1]


def test_three_workers_share_one_study_and_no_file_holds_the_password(
    postgres, tiny_plantclef, tmp_path
):
    url = postgres.url(postgres.create_database())
    args = _base(
        tiny_plantclef,
        tmp_path,
        "sweep.n_trials=6",
        "sweep.study_name=shared",
        f"sweep.storage={url}",
    )
    workers = [_start_sweep(args, tmp_path, keep_stdout=True) for _ in range(3)]
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=400)
        assert worker.returncode == 0, err.decode()[-2000:]
        outputs.append(out.decode() + err.decode())
    study = optuna.load_study(study_name="shared", storage=url)
    finished = study.get_trials(states=(STATES.COMPLETE, STATES.PRUNED))
    assert len(finished) == 6
    assert len(set(_param_sets(finished))) == 6, [t.params for t in finished]
    best = json.loads((tmp_path / "sweeps" / "shared" / "best_params.json").read_text())
    assert best["params"] == study.best_params and best["value"] == study.best_value
    # the literal password: in no file vitlab wrote, nor in what the workers printed
    written = [p for p in (tmp_path / "sweeps").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written)
    holding = [str(p) for p in written if PASSWORD.encode() in p.read_bytes()]
    assert not holding, holding
    assert not [o for o in outputs if PASSWORD in o]
    config = (tmp_path / "sweeps" / "shared" / "trial_0000" / ".hydra" / "config.yaml").read_text()
    assert f"{url.split(':')[0]}://vit:***@127.0.0.1" in config


def test_a_killed_worker_s_trial_is_retried_and_n_trials_complete(
    postgres, tiny_plantclef, tmp_path
):
    url = postgres.url(postgres.create_database())
    args = _base(
        tiny_plantclef,
        tmp_path,
        "sweep.n_trials=3",
        "sweep.study_name=killed",
        f"sweep.storage={url}",
    )
    worker = _start_sweep(args, tmp_path, keep_stdout=True)
    _kill_when_started(worker, tmp_path / "sweeps" / "killed" / "trial_0001")
    killed = optuna.load_study(study_name="killed", storage=url).trials
    assert [t.state for t in killed] == [STATES.COMPLETE, STATES.RUNNING]
    rerun = _start_sweep(args, tmp_path, keep_stdout=True)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()[-2000:]
    trials = optuna.load_study(study_name="killed", storage=url).trials
    finished = [t for t in trials if t.state in (STATES.COMPLETE, STATES.PRUNED)]
    assert len(finished) == 3
    assert trials[1].state == STATES.FAIL and trials[1].user_attrs.get("stale")
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert [t.params for t in retries] == [killed[1].params] and retries[0] in finished


@pytest.mark.parametrize("problem", ["wrong password", "no server there"])
def test_a_storage_that_cannot_be_used_exits_2_naming_the_key(
    postgres, tiny_plantclef, tmp_path, problem
):
    database = postgres.create_database()
    if problem == "wrong password":
        url, secret = postgres.url(database, password="Not-The-Pw-42"), "Not-The-Pw-42"
    else:  # a loopback port nothing listens on
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url, secret = f"postgresql+psycopg://vit:{PASSWORD}@127.0.0.1:{port}/{database}", PASSWORD
    args = _base(tiny_plantclef, tmp_path, "sweep.study_name=bad", f"sweep.storage={url}")
    start = time.monotonic()
    worker = _start_sweep(args, tmp_path, keep_stdout=True)
    out, err = worker.communicate(timeout=60)
    printed = out.decode() + err.decode()
    assert worker.returncode == 2, printed[-2000:]
    assert time.monotonic() - start < 10 + 15  # the storage's own answer: < 10 s after start-up
    assert "sweep.storage" in printed and "Traceback" not in printed
    assert secret not in printed
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
