"""Optuna studies over any experiment, driven through Hydra's compose API (see sweep.py).

A search space is declared in `configs/sweep/<name>.yaml` under `params`, each entry a config
key with `type: float|int|categorical`, `low`/`high`/`log`/`step` or `choices`, and optionally
`when: {other.key: value}` to sample it only when an earlier choice matches (conditional
parameters). Storage, sampler and pruner come from the same file; each trial is a normal
training run whose value is the metric the experiment optimises.

Killed workers: a running trial carries a lease in its user attributes (`worker`: host, node,
pid, process start; `heartbeat`: the time of its last sign of life, refreshed by a thread every
`heartbeat_interval` seconds). `fail_stale_trials` closes as FAIL the RUNNING trials whose worker
is certainly dead (same node, process gone) or silent for `grace_period` seconds (any other host),
and enqueues each again with the same parameters (up to `max_retries` times). One mechanism for
every storage: Optuna 5's JournalStorage has no heartbeat, and RDBStorage's heartbeat only runs
inside `study.optimize`, not with ask/tell. Clocks of hosts sharing a study must agree to well
within `grace_period` (NTP).

Sampling: a fixed `sampler.seed` seeds the draw of each trial from (seed, trial number), so a
resumed study continues the sequence instead of replaying the first parameters, and workers
sharing a study draw different parameters.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
import pytorch_lightning as pl
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

PARAM_TYPES = ("float", "int", "categorical")
log = logging.getLogger(__name__)


def suggest_overrides(trial: optuna.Trial, params: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Hydra overrides `key=value` for one trial; a conditional parameter is sampled only when
    its `when` conditions hold for the values already chosen in this trial."""
    chosen: dict[str, Any] = {}
    for key, spec in params.items():
        when = dict(spec.get("when") or {})
        if any(chosen.get(k) != v for k, v in when.items()):
            continue
        kind = spec.get("type")
        if kind == "float":
            value = trial.suggest_float(
                key,
                float(spec["low"]),
                float(spec["high"]),
                log=bool(spec.get("log", False)),
                step=spec.get("step"),
            )
        elif kind == "int":
            value = trial.suggest_int(
                key,
                int(spec["low"]),
                int(spec["high"]),
                log=bool(spec.get("log", False)),
                step=int(spec.get("step", 1)),
            )
        elif kind == "categorical":
            value = trial.suggest_categorical(key, list(spec["choices"]))
        else:
            raise ValueError(f"sweep.params.{key}.type={kind!r} is not one of {list(PARAM_TYPES)}")
        chosen[key] = value
    return [f"{k}={v}" for k, v in chosen.items()]


def build_sampler(spec: Mapping[str, Any] | None) -> optuna.samplers.BaseSampler:
    """The configured sampler; with a `seed`, one seeded per trial number (`TrialSeededSampler`)."""
    spec = dict(spec or {"name": "tpe"})
    name, seed = spec.pop("name", "tpe"), spec.pop("seed", None)
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    if name not in samplers:
        raise ValueError(f"sweep.sampler.name={name!r} is not one of {sorted(samplers)}")
    sampler = samplers[name](seed=seed, **spec)  # also checks the arguments now
    if seed is None:
        return sampler
    return TrialSeededSampler(lambda s: samplers[name](seed=s, **spec), int(seed))


def trial_seed(seed: int, number: int) -> int:
    """A 32-bit seed for trial `number` of a study sampled with `seed`."""
    digest = hashlib.sha256(f"vitlab-sweep:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Samples trial `n` with a fresh sampler seeded by `trial_seed(seed, n)`.

    A sampler seeded once replays its random sequence from the start in every new process: a
    resumed study (or a second worker) would draw the parameters of trials 0, 1, ... again. Here
    the draw depends on the trial number (and, for TPE, on the finished trials it reads from the
    study), so a rerun is as deterministic as the first run and never repeats earlier numbers.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self._seed = make, seed
        self._number: int | None = None
        self._sampler: optuna.samplers.BaseSampler | None = None

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if self._sampler is None or self._number != trial.number:
            self._number, self._sampler = (
                trial.number,
                self._make(trial_seed(self._seed, trial.number)),
            )
        return self._sampler

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # the seed of each trial is fixed by design
        pass


def build_pruner(spec: Mapping[str, Any] | None) -> optuna.pruners.BasePruner:
    spec = dict(spec or {"name": "median"})
    name = spec.pop("name", "median")
    pruners = {
        "median": optuna.pruners.MedianPruner,
        "none": optuna.pruners.NopPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "threshold": optuna.pruners.ThresholdPruner,
    }
    if name not in pruners:
        raise ValueError(f"sweep.pruner.name={name!r} is not one of {sorted(pruners)}")
    return pruners[name](**spec)


SERVER_CONNECT_TIMEOUT_S = 5  # a PostgreSQL storage that does not answer: exit 2 within 10 s


def build_storage(url: str | None) -> optuna.storages.BaseStorage | str | None:
    """An RDB URL (sqlite:///..., postgresql://...) as is; `journal:<path>` for a journal file
    shared by many workers on one file system; None for in-memory."""
    if url and url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    if url and url.startswith("postgresql"):  # a host that does not answer fails in seconds
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"connect_timeout": SERVER_CONNECT_TIMEOUT_S}}
        )
    return url


class OptunaPruning(pl.Callback):
    """Report the monitored validation metric each epoch; stop the run when Optuna prunes.
    `sign=-1` when the monitor improves the other way than the study's objective (FungiCLEF:
    `val/loss` monitored, macro F1 maximised), so the pruner compares like with like.

    The step is the count of validations reported so far, not `trainer.current_epoch`: a
    FungiCLEF trial fits one head per fold with this callback, the epoch restarts at 0 for each,
    and Optuna ignores a step reported twice (fold 2 was never seen by the pruner)."""

    def __init__(self, trial: optuna.Trial, monitor: str, sign: float = 1.0):
        self.trial, self.monitor, self.sign, self.pruned = trial, monitor, sign, False
        self.step = 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        try:
            value = self.sign * float(trainer.callback_metrics[self.monitor])
            self.trial.report(value, self.step)
            self.step += 1
            prune = self.trial.should_prune()
        except UpdateFinishedTrialError:  # closed as stale by another worker: stop, result dropped
            trainer.should_stop = True
            return
        if prune:
            self.pruned = True
            trainer.should_stop = True


# --- leases of running trials: who runs them, are they still alive -------------------------


@dataclass(frozen=True)
class StaleTrialPolicy:
    """`sweep.heartbeat_interval`, `sweep.grace_period` (seconds), `sweep.max_retries`."""

    heartbeat_interval: float = 30.0
    grace_period: float = 300.0
    max_retries: int = 3

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> StaleTrialPolicy:
        default = cls()
        values = {
            "heartbeat_interval": spec.get("heartbeat_interval", default.heartbeat_interval),
            "grace_period": spec.get("grace_period", default.grace_period),
            "max_retries": spec.get("max_retries", default.max_retries),
        }
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"sweep.{key}={value!r} must be a number >= 0")
        if values["heartbeat_interval"] <= 0:
            raise ValueError("sweep.heartbeat_interval must be > 0 (seconds)")
        if values["grace_period"] < 2 * values["heartbeat_interval"]:
            raise ValueError(
                f"sweep.grace_period={values['grace_period']} must be at least twice "
                f"sweep.heartbeat_interval={values['heartbeat_interval']} (a live worker's "
                "trial would be failed between two heartbeats)"
            )
        if values["max_retries"] != int(values["max_retries"]):
            raise ValueError(f"sweep.max_retries={values['max_retries']!r} must be an integer")
        return cls(
            float(values["heartbeat_interval"]),
            float(values["grace_period"]),
            int(values["max_retries"]),
        )


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def node_id() -> str:
    """This machine and process namespace: hostname, kernel boot id and PID namespace (Linux), so
    that two containers that share a hostname are not mistaken for one another."""
    parts = [socket.gethostname(), _read("/proc/sys/kernel/random/boot_id") or ""]
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("")
    return "/".join(parts)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc (Linux)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0], fields[19]


def process_alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` of this node runs; with `start` (its start time), also that the pid
    was not reused by another process since. A zombie (killed, not yet reaped) is dead."""
    if os.path.isdir("/proc/self"):
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        return start is None or stat[1] == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_worker(policy: StaleTrialPolicy) -> dict[str, Any]:
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {
        "host": socket.gethostname(),
        "node": node_id(),
        "pid": pid,
        "start": stat[1] if stat else None,
        "heartbeat_interval": policy.heartbeat_interval,
    }


ALIVE, SUSPECT, STALE = "alive", "suspect", "stale"


def trial_liveness(trial: FrozenTrial, policy: StaleTrialPolicy, now: float | None = None) -> str:
    """For a RUNNING trial: `alive`, `stale` (its worker is dead: fail it) or `suspect` (its
    worker missed heartbeats but may still be alive: not yet `grace_period` without one).

    A trial of this node is judged by its process; of another host, by the age of its last
    heartbeat. A trial without a lease (just asked, or started by an older vitlab) counts from its
    start time."""
    now = time.time() if now is None else now
    worker = trial.user_attrs.get("worker")
    if isinstance(worker, dict) and worker.get("node") == node_id() and "pid" in worker:
        return ALIVE if process_alive(int(worker["pid"]), worker.get("start")) else STALE
    last = trial.user_attrs.get("heartbeat")
    if not isinstance(last, int | float):
        start = trial.datetime_start
        last = start.timestamp() if start is not None else now
    age = now - float(last)
    interval = policy.heartbeat_interval  # the trial's worker may beat at another interval
    if isinstance(worker, dict) and isinstance(worker.get("heartbeat_interval"), int | float):
        interval = float(worker["heartbeat_interval"])
    if age > max(policy.grace_period, 2 * interval):
        return STALE
    return SUSPECT if age > 2 * interval else ALIVE


def retry_trial(study: optuna.Study, failed: FrozenTrial, max_retries: int) -> bool:
    """Enqueue a failed trial again with its parameters (the next `ask` of any worker takes it),
    unless it was already retried `max_retries` times. System attributes `failed_trial` (the
    original number) and `retry_history` as Optuna's `RetryHeartbeatStaleTrialCallback` writes
    them; user attribute `retry_of` names the trial this one re-runs."""
    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    if len(history) > max_retries:
        log.warning(
            "trial %d failed %d times as stale; not retried again (sweep.max_retries=%d)",
            history[0],
            len(history),
            max_retries,
        )
        return False
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs={"retry_of": failed.number},
            system_attrs={
                **failed.system_attrs,
                "failed_trial": failed.system_attrs.get("failed_trial", failed.number),
                "retry_history": history,
            },
        )
    )
    return True


def fail_stale_trials(study: optuna.Study, policy: StaleTrialPolicy) -> list[FrozenTrial]:
    """Close every stale RUNNING trial of the study as FAIL (user attribute `stale`) and enqueue
    it again (`retry_trial`). When several workers find the same trial, the storage lets one
    close it; only that one enqueues the retry. Returns the trials this call closed."""
    closed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial_liveness(trial, policy, now) != STALE:
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "stale", True)
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # finished meanwhile, or closed by another worker
        log.warning(
            "trial %d was left RUNNING by a dead worker (%s): closed as FAIL",
            trial.number,
            trial.user_attrs.get("worker", "no lease"),
        )
        closed.append(trial)
        retry_trial(study, trial, policy.max_retries)
    return closed


class TrialHeartbeat:
    """While a trial runs: its lease (`worker`, `heartbeat`) in its user attributes, refreshed
    every `heartbeat_interval` seconds by a daemon thread."""

    def __init__(self, trial: optuna.Trial, policy: StaleTrialPolicy):
        self.trial, self.policy = trial, policy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sweep-heartbeat", daemon=True)

    def __enter__(self) -> TrialHeartbeat:
        self.trial.set_user_attr("worker", this_worker(self.policy))
        self.trial.set_user_attr("heartbeat", time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        storage, trial_id = self.trial.storage, self.trial._trial_id
        while not self._stop.wait(self.policy.heartbeat_interval):
            try:
                storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
            except UpdateFinishedTrialError:
                log.warning("trial %d was closed by another worker", self.trial.number)
                return
            except Exception as err:  # a storage hiccup: the next beat may get through
                log.warning("heartbeat of trial %d not recorded: %s", self.trial.number, err)
