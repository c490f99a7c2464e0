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

import abc
import hashlib
import inspect
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

from vitlab.errors import ConfigError
from vitlab.signals import deferred_sigterm

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
            raise ConfigError(f"sweep.params.{key}.type={kind!r} is not one of {list(PARAM_TYPES)}")
        chosen[key] = value
    return [f"{k}={v}" for k, v in chosen.items()]


SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}


def build_sampler(spec: Mapping[str, Any] | None) -> optuna.samplers.BaseSampler:
    """The configured sampler; with a `seed`, one seeded per trial number (`TrialSeededSampler`).
    A name or setting the sampler does not have is a `ConfigError` naming `sweep.sampler.<key>`."""
    spec = dict(spec or {"name": "tpe"})
    name, seed = spec.pop("name", "tpe"), spec.pop("seed", None)
    if name not in SAMPLERS:
        raise ConfigError(f"sweep.sampler.name={name!r} is not one of {sorted(SAMPLERS)}")
    _check_settings("sampler", name, SAMPLERS[name], spec)
    try:
        sampler = SAMPLERS[name](seed=seed, **spec)  # also checks the values now
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sweep.sampler ({name}): {err}") from None
    if seed is None:
        return sampler
    return TrialSeededSampler(lambda s: SAMPLERS[name](seed=s, **spec), int(seed))


def _check_settings(group: str, name: str, cls: type, settings: Mapping[str, Any]) -> None:
    """Every key of `sweep.<group>` (but `name`) must be an argument of the chosen class: a typo
    or another pruner's setting would otherwise be a TypeError in the middle of Optuna."""
    known = [p for p in inspect.signature(cls).parameters if p not in ("self", "seed")]
    for key in settings:
        if key not in known:
            raise ConfigError(
                f"sweep.{group}.{key} is not a setting of the {name} {group} "
                f"(sweep.{group}.name={name}); its settings: {known or 'none'}"
            )


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


PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}
# The pruning schedule the sweep files set (for the median pruner): a pruner that has such a
# setting takes it, one without (hyperband, none; threshold has no startup trials) leaves it, so
# `sweep.pruner.name=<any>` works with every sweep file. Any other key must be the pruner's own.
PRUNER_SCHEDULE_KEYS = ("n_startup_trials", "n_warmup_steps", "interval_steps")
# Optuna requires a percentile; the lower quartile (prune trials worse than 3/4 of the others at
# the same step) unless `sweep.pruner.percentile` says otherwise.
DEFAULT_PERCENTILE = 25.0


def pruner_settings(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of pruner `name` from `sweep.pruner` (without `name`): schedule keys it
    lacks are left out, any other key it lacks is a `ConfigError` naming `sweep.pruner.<key>`."""
    accepted = set(inspect.signature(PRUNERS[name]).parameters)
    settings = {k: v for k, v in spec.items() if k in accepted or k not in PRUNER_SCHEDULE_KEYS}
    _check_settings("pruner", name, PRUNERS[name], settings)
    if name == "percentile":
        settings.setdefault("percentile", DEFAULT_PERCENTILE)
    if name == "threshold" and settings.get("lower") is None and settings.get("upper") is None:
        raise ConfigError(
            "sweep.pruner.name=threshold needs a bound: +sweep.pruner.lower=... (prune a trial "
            "whose reported value is below it) or +sweep.pruner.upper=..."
        )
    return settings


def build_pruner(spec: Mapping[str, Any] | None) -> optuna.pruners.BasePruner:
    """The configured pruner (`sweep.pruner.name`: median | percentile | hyperband | threshold |
    none); a setting it does not have or a bad value is a `ConfigError` naming the key."""
    spec = dict(spec or {"name": "median"})
    name = spec.pop("name", "median")
    if name not in PRUNERS:
        raise ConfigError(f"sweep.pruner.name={name!r} is not one of {sorted(PRUNERS)}")
    settings = pruner_settings(name, spec)
    ignored = sorted(set(spec) - set(settings))
    if ignored:
        log.info("sweep.pruner.name=%s has no %s: not used", name, ", ".join(ignored))
    try:
        return PRUNERS[name](**settings)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sweep.pruner ({name}, settings {settings}): {err}") from None


SERVER_CONNECT_TIMEOUT_S = 5  # a PostgreSQL storage that does not answer: exit 2 within 10 s


class SigtermSafeStorage(optuna.storages.BaseStorage):
    """A study's storage whose every call completes before a SIGTERM is raised in the main
    thread (`vitlab.signals.deferred_sigterm`): a `Terminated` raised inside an SQLAlchemy
    commit (a trial's per-epoch report) left the session broken, and closing the interrupted
    trial then failed with StorageInternalError instead of exit 143."""

    def __init__(self, inner: optuna.storages.BaseStorage):
        self.inner = inner


def _deferring_sigterm(name: str) -> Callable[..., Any]:
    def call(self: SigtermSafeStorage, *args: Any, **kwargs: Any) -> Any:
        with deferred_sigterm():
            return getattr(self.inner, name)(*args, **kwargs)

    call.__name__ = name
    return call


for _name, _member in vars(optuna.storages.BaseStorage).items():
    if callable(_member) and not _name.startswith("_"):
        setattr(SigtermSafeStorage, _name, _deferring_sigterm(_name))
abc.update_abstractmethods(SigtermSafeStorage)


def build_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """The storage behind `sweep.storage`: an RDB URL (sqlite:///..., postgresql://...);
    `journal:<path>` for a journal file shared by many workers on one file system; None for
    in-memory. Shared storages are wrapped so that SIGTERM never cuts a call in half."""
    if not url:
        return None
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        journal = JournalFileBackend(url.removeprefix("journal:"))
        return SigtermSafeStorage(optuna.storages.JournalStorage(journal))
    engine_kwargs = {}
    if url.startswith("postgresql"):  # a host that does not answer fails in seconds
        engine_kwargs = {"connect_args": {"connect_timeout": SERVER_CONNECT_TIMEOUT_S}}
    rdb = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    return SigtermSafeStorage(optuna.storages.get_storage(rdb))


class OptunaPruning(pl.Callback):
    """Report the monitored validation metric each epoch; stop the run when Optuna prunes.
    `sign=-1` when the monitor improves the other way than the study's objective (FungiCLEF:
    `val/loss` monitored, macro F1 maximised), so the pruner compares like with like. With
    `objective` (the study's metric), that metric is reported instead whenever validation logs
    it: the pruner then compares the trials on what the study optimises (GroupViT: the
    contrastive term, not a loss whose weights the sweep varies).

    The step is the count of validations reported so far, not `trainer.current_epoch`: a
    FungiCLEF trial fits one head per fold with this callback, the epoch restarts at 0 for each,
    and Optuna ignores a step reported twice (fold 2 was never seen by the pruner).

    The trial's user attribute `reported` ({metric, sign}) says what its intermediate values
    are: Optuna gives a pruned trial its last one as value, signed for the pruner's sake
    (`reported_value` undoes it for tables)."""

    def __init__(
        self, trial: optuna.Trial, monitor: str, sign: float = 1.0, objective: str | None = None
    ):
        self.trial, self.monitor, self.sign, self.pruned = trial, monitor, sign, False
        self.objective = objective
        self.step = 0

    def _reported(self, metrics: Mapping[str, Any]) -> tuple[str, float] | None:
        if self.objective is not None and self.objective in metrics:
            return self.objective, 1.0
        if self.monitor in metrics:
            return self.monitor, self.sign
        return None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reported = None if trainer.sanity_checking else self._reported(trainer.callback_metrics)
        if reported is None:
            return
        metric, sign = reported
        try:
            if self.step == 0:
                self.trial.set_user_attr("reported", {"metric": metric, "sign": sign})
            value = sign * float(trainer.callback_metrics[metric])
            self.trial.report(value, self.step)
            self.step += 1
            prune = self.trial.should_prune()
        except UpdateFinishedTrialError:  # closed as stale by another worker: stop, result dropped
            trainer.should_stop = True
            return
        if prune:
            self.pruned = True
            trainer.should_stop = True


def reported_value(trial: FrozenTrial) -> tuple[str, float] | None:
    """(metric, value) of the last intermediate value `OptunaPruning` reported for the trial,
    with the metric's own sign; None when it reported none (or the trial predates `reported`)."""
    reported = trial.user_attrs.get("reported")
    if not isinstance(reported, dict) or not trial.intermediate_values:
        return None
    last = trial.intermediate_values[max(trial.intermediate_values)]
    return str(reported["metric"]), float(reported["sign"]) * last


def is_loss_metric(metric: str) -> bool:
    """A metric named like a loss (`val/loss`, `train/loss_epoch`, `val/total_loss`)."""
    return "loss" in metric.lower()


def loss_weight_params(params: Mapping[str, Any]) -> list[str]:
    """Sweep parameters that change the loss itself: the `loss` group and its keys (`loss.*`),
    GroupViT's loss weights (`groupvit.losses.*`), any key under a `loss` or `losses` node."""
    found = []
    for key in params:
        parts = key.lstrip("+~").split(".")
        if any(part in ("loss", "losses") for part in parts):
            found.append(key)
    return found


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
