"""The Optuna sweep driver behind `sweep.py` (see it for the command line).

Composes the training config with Hydra's compose API, creates or resumes the study in the
configured storage, and runs trials (each the pipeline's `train`, pruned from its per-epoch
validation metric) until the study holds `sweep.n_trials` finished (complete or pruned) trials.
Several processes pointed at the same storage share the study and finish `n_trials` in total.
A trial left RUNNING by a killed worker is closed as FAIL and re-run with the same parameters
(`vitlab.sweeps.fail_stale_trials`: at once for a dead process of this node, after
`sweep.grace_period` seconds without heartbeat for another host). Writes `best_params.json` and
`param_importance.png` to `<paths.root_dir>/sweeps/<study_name>/`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from vitlab.atomic import atomic_write_text
from vitlab.config import to_container
from vitlab.deprecations import renamed_error, renamed_keys
from vitlab.errors import ConfigError
from vitlab.run_tables import format_table, write_table
from vitlab.secrets import mask_log_handlers, mask_secrets
from vitlab.sweeps import (
    PARAM_TYPES,
    SUSPECT,
    OptunaPruning,
    StaleTrialPolicy,
    TrialHeartbeat,
    build_pruner,
    build_sampler,
    build_storage,
    fail_stale_trials,
    is_loss_metric,
    loss_weight_params,
    reported_value,
    retry_trial,
    suggest_overrides,
    trial_liveness,
)
from vitlab.tracking import name_part, use_wandb_mode

log = logging.getLogger("vitlab.sweep")
# the repository's configs (sweep.py passes its own folder)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
STATES = optuna.trial.TrialState
FINISHED = (STATES.COMPLETE, STATES.PRUNED)  # what counts towards sweep.n_trials


def compose_trial(overrides: list[str], output_dir: Path) -> DictConfig:
    cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a Hydra app: `${hydra:...}` resolves from HydraConfig
    return cfg


def save_trial_config(cfg: DictConfig, output_dir: Path) -> None:
    """What Hydra writes in a run folder, for a trial: `.hydra/config.yaml` (the composed config),
    `.hydra/overrides.yaml` (the command line's overrides + the trial's parameters) and
    `.hydra/hydra.yaml`, so the folder alone tells what ran (and `infer.py ckpt_path=` finds
    the run's dataset as for a train.py run)."""
    hydra_cfg = HydraConfig.get()
    folder = output_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    # a password in sweep.storage (or any URL) is written as *** (vitlab.secrets)
    atomic_write_text(folder / "config.yaml", mask_secrets(OmegaConf.to_yaml(cfg)))
    overrides = OmegaConf.to_yaml(hydra_cfg.overrides.task)
    atomic_write_text(folder / "overrides.yaml", mask_secrets(overrides))
    atomic_write_text(folder / "hydra.yaml", mask_secrets(OmegaConf.to_yaml({"hydra": hydra_cfg})))


@contextmanager
def trial_log(path: Path) -> Iterator[None]:
    """The trial's log lines (vitlab's and Lightning's) also go to `path`, as `train.py`'s do."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def run_sweep(overrides: list[str], config_dir: str | Path = CONFIG_DIR) -> optuna.Study:
    """Create or resume the study of `sweep=<name>` and run trials (each a pipeline's `train`,
    with Optuna's pruning callback) until it holds `sweep.n_trials` finished trials."""
    mask_log_handlers()
    from vitlab.pipelines import get_pipeline

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            base = compose_trial(overrides, Path(os.getcwd()))
        except HydraException as err:  # a missing sweep file or key: a message, no traceback
            raise ConfigError(str(err).split("\nConfig search path")[0].strip()) from None
        if base.get("sweep") is None:
            raise ConfigError("sweep=<name> is required (a file in configs/sweep/)")
        pipeline = get_pipeline(base.pipeline, "train")  # an unknown name fails before trial 0
        spec = base.sweep
        try:
            policy = StaleTrialPolicy.from_spec(spec)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        metric = objective_metric(spec, base)
        where = sweep_source(overrides, HydraConfig.get().runtime.choices.get("sweep"), config_dir)
        check_sweep(spec, metric, where, lambda extra: compose("train", [*overrides, *extra]))
        trial_predicts_test(spec, metric)  # a bad value fails before trial 0
        sweep_dir = Path(base.paths.root_dir) / "sweeps" / spec.study_name
        sweep_dir.mkdir(parents=True, exist_ok=True)
        study = create_or_load_study(spec)

        def objective(trial: optuna.Trial) -> float:
            trial_overrides = suggest_overrides(trial, to_container(spec.params))
            out = sweep_dir / trial_folder(trial.number)
            cfg = compose_trial([*overrides, *trial_overrides], out)
            with open_dict(cfg):
                cfg.print_config = False  # each trial's config is in its .hydra/ folder
                if cfg.logger and cfg.logger.get("wandb"):
                    cfg.logger.wandb.group = spec.study_name  # one W&B group per study
                    if not cfg.logger.wandb.get("name"):  # the trial and what it varies
                        params = ",".join(name_part(o) for o in trial_overrides)
                        cfg.logger.wandb.name = f"{trial_folder(trial.number)} {params}"
                if OmegaConf.select(cfg, "predict.test") is not None:
                    cfg.predict.test = trial_predicts_test(spec, metric)
            save_trial_config(cfg, out)
            same_way = (cfg.fit.mode == "max") == (spec.direction == "maximize")
            sign = 1.0 if same_way else -1.0
            pruning = OptunaPruning(trial, cfg.fit.monitor, sign, objective=metric)
            start = time.perf_counter()
            try:
                with trial_log(out / "train.log"):
                    summary = pipeline.train(cfg, callbacks=(pruning,))
            finally:
                # time inside the training run; wall_seconds - this = the sweep's own overhead
                trial.set_user_attr("train_seconds", time.perf_counter() - start)
            trial.set_user_attr("stage_seconds", summary.get("stage_seconds", {}))
            if pruning.pruned:
                raise optuna.TrialPruned()
            value = summary.get("metrics", {}).get(metric)
            if value is None:
                known = sorted(summary.get("metrics", {}))
                key = "sweep.metric" if spec.get("metric") else "optimized_metric"
                raise ConfigError(
                    f"{key}={metric!r}: the {cfg.pipeline} run reported no such metric; it "
                    f"reports {known}"
                )
            return float(value)

        ran = 0
        while (step := next_step(study, spec.n_trials, policy)) != "done":
            if step == "wait":
                time.sleep(policy.heartbeat_interval)
            else:
                ran += run_one_trial(study, objective, spec.n_trials, policy)
        _write_trials_table(study, sweep_dir, metric)
        # a rerun of a finished study adds nothing: no new W&B summary run
        _write_results(study, sweep_dir, base, log_to_wandb=ran > 0)
    return study


def objective_metric(spec: DictConfig, cfg: DictConfig) -> str:
    """The metric the study optimises: `sweep.metric`, else the experiment's `optimized_metric`."""
    return str(spec.get("metric") or cfg.optimized_metric)


def sweep_source(
    overrides: Sequence[str], sweep_name: str | None, config_dir: str | Path
) -> Callable[[str], str]:
    """`where(key)`: where sweep key `key` (`params.optimizer.lr`) is set, for messages: the
    command-line override that sets it (`++sweep.params={head.lr: ...}`), else the sweep file."""
    file = f"{Path(config_dir).name}/sweep/{sweep_name}.yaml"

    def where(key: str) -> str:
        full = f"sweep.{key}"
        for override in overrides:
            name, _, value = override.lstrip("~+").partition("=")
            # `++sweep.params={head.lr: ...}`: the key's rest is a key of the override's dict
            inside = full.startswith(f"{name}.") and f"{full[len(name) + 1 :]}:" in value
            if name == full or name.startswith(f"{full}.") or inside:
                return f"override {override!r}"
        return file

    return where


def check_sweep(
    spec: DictConfig,
    metric: str,
    where: Callable[[str], str],
    probe: Callable[[list[str]], Any],
) -> None:
    """Everything a trial would otherwise fail on (or silently get wrong), before trial 0: the
    sampler's and pruner's settings, every parameter's spec and key (`probe` composes the
    config with the given overrides), and a loss objective over swept loss weights."""
    build_sampler(to_container(spec.sampler))
    build_pruner(to_container(spec.pruner))
    params = to_container(spec.params) or {}
    check_params(params, where, probe)
    check_loss_objective(metric, params, spec.get("allow_loss_objective", False), where)


def check_params(
    params: Mapping[str, Any], where: Callable[[str], str], probe: Callable[[list[str]], Any]
) -> None:
    """Each `sweep.params` entry: a key that exists (a renamed one names its new place, from
    `vitlab.deprecations`), a valid spec, `when` conditions on earlier parameters, and values that
    compose (every choice; the low bound) with its conditions."""
    earlier: list[str] = []
    for key, p in params.items():
        here = f"{where(f'params.{key}')}: sweep.params.{key}"
        name = key.lstrip("~+")
        if name in renamed_keys():
            raise ConfigError(f"{here}: {renamed_error(name)}")
        kind = p.get("type") if isinstance(p, Mapping) else None
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{here}.type={kind!r} is not one of {list(PARAM_TYPES)}")
        needed = ("choices",) if kind == "categorical" else ("low", "high")
        missing = [k for k in needed if p.get(k) is None]
        if missing:
            raise ConfigError(f"{here}: a {kind} parameter needs {', '.join(missing)}")
        when = dict(p.get("when") or {})
        for other in when:
            if other not in earlier:
                raise ConfigError(
                    f"{here}.when.{other}: not a parameter declared before {key} "
                    f"(declared: {earlier}); the condition would never hold"
                )
        conditions = [f"{k}={v}" for k, v in when.items()]
        for value in list(p["choices"]) if kind == "categorical" else [p["low"]]:
            try:
                probe([*conditions, f"{key}={value}"])
            except HydraException as err:
                reason = str(err).split("\nConfig search path")[0].strip()
                raise ConfigError(f"{here}: {key}={value} does not compose: {reason}") from None
        earlier.append(key)


def check_loss_objective(
    metric: str, params: Mapping[str, Any], allow: bool, where: Callable[[str], str]
) -> None:
    """A loss as objective while the sweep varies that loss (its weights, its kind) compares
    trials on different scales: refused unless `sweep.allow_loss_objective=true`."""
    weights = loss_weight_params(params)
    if allow or not weights or not is_loss_metric(metric):
        return
    raise ConfigError(
        f"{where(f'params.{weights[0]}')}: the study optimises {metric!r}, a loss, while "
        f"sweep.params varies the loss itself ({', '.join(weights)}): the trials' values are not "
        "comparable. Optimise a metric that does not depend on them (sweep.metric=..., e.g. "
        "GroupViT's val/contrastive), or set sweep.allow_loss_objective=true"
    )


def trial_predicts_test(spec: DictConfig, optimized_metric: str) -> bool:
    """`sweep.predict_test`: whether a trial predicts the test set (PlantCLEF's `predict.test`).
    auto (default): only when the objective is a test metric; a trial that skips it saves the
    tile forwards and the submission no one reads (the best trial is rerun with train.py)."""
    choice = spec.get("predict_test", "auto")
    if choice == "auto":
        return optimized_metric.startswith("test/")
    if isinstance(choice, bool):
        return choice
    raise ConfigError(f"sweep.predict_test must be auto, true or false, got {choice!r}")


def trial_folder(number: int) -> str:
    return f"trial_{number:04d}"


def _write_trials_table(study: optuna.Study, sweep_dir: Path, metric: str) -> None:
    """`trials.csv` in the study's folder and on the console: every trial's number, state,
    parameters (the overrides it ran with), value of the optimised metric and folder."""
    trials = study.get_trials(deepcopy=False)
    if not trials:
        return
    columns, rows = trials_table(trials, metric)
    path = write_table(sweep_dir / "trials.csv", columns, rows)
    table = format_table(columns, rows)
    print(f"\nstudy {study.study_name}: {len(rows)} trial(s) ({path}):\n{table}")


def trials_table(
    trials: Sequence[optuna.trial.FrozenTrial], metric: str
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of `trials.csv`. Only a complete trial has a value of `metric`: Optuna
    gives a pruned one its last intermediate value, which is what the pruning callback reported
    (maybe another metric, negated to face the study's direction). That value, with its own
    sign, is in `last_<reported metric>` for every trial that reported one."""
    names: list[str] = []
    for t in trials:
        names += [n for n in t.params if n not in names]
    reported = {t.number: reported_value(t) for t in trials}
    reported_metrics = sorted({r[0] for r in reported.values() if r is not None})
    if len(reported_metrics) == 1:
        report_columns = [f"last_{reported_metrics[0]}"]
    else:  # no trial reported (no column) or several metrics: say which one
        report_columns = ["reported_metric", "last_reported"] if reported_metrics else []
    columns = ["trial", "state", *names, metric, *report_columns, "folder"]
    rows = []
    for t in trials:
        value = t.value if t.state == STATES.COMPLETE else None
        last = reported[t.number]
        if len(report_columns) == 1:
            report = [last[1] if last else None]
        else:
            report = [*(last or (None, None))][: len(report_columns)]
        params = [t.params.get(n) for n in names]
        rows.append([t.number, t.state.name, *params, value, *report, trial_folder(t.number)])
    return columns, rows


def create_or_load_study(spec: DictConfig, attempts: int = 5) -> optuna.Study:
    """Create or load the study. Workers started together can race to create the storage's
    schema (SQLite: "UNIQUE constraint failed: alembic_version"); the loser retries."""
    import random

    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    for attempt in range(attempts):
        try:
            return optuna.create_study(
                study_name=spec.study_name,
                storage=build_storage(spec.storage),
                sampler=build_sampler(to_container(spec.sampler)),
                pruner=build_pruner(to_container(spec.pruner)),
                direction=spec.direction,
                load_if_exists=True,
            )
        except OperationalError as err:  # a server that cannot be reached or refuses us
            if str(spec.storage).startswith("sqlite") and attempt < attempts - 1:
                time.sleep(0.2 + random.random())  # SQLite: "database is locked" by a peer
                continue
            reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
            raise ConfigError(
                f"sweep.storage={mask_secrets(str(spec.storage))}: cannot open the study's "
                f"storage: {mask_secrets(reason)}"
            ) from None
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def next_step(study: optuna.Study, n_trials: int, policy: StaleTrialPolicy) -> str:
    """`run` another trial, `wait` or `done`, after closing (and re-enqueuing) stale trials.

    Only complete and pruned trials count towards `n_trials`. The study is done when it holds
    `n_trials` of them, or when the trials running in live workers will bring it there. While a
    running trial is suspect (its worker missed heartbeats, but not for `grace_period` yet) this
    worker waits: the trial either finishes or becomes stale, is failed and this worker retries
    it. Enqueued trials (retries) are always run: `run_one_trial` closes any beyond `n_trials`."""
    fail_stale_trials(study, policy)
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in FINISHED for t in trials)
    if finished >= n_trials:
        return "done"
    running = [t for t in trials if t.state == STATES.RUNNING]
    if finished + len(running) < n_trials or any(t.state == STATES.WAITING for t in trials):
        return "run"
    suspect = [t.number for t in running if trial_liveness(t, policy) == SUSPECT]
    if suspect:
        log.info(
            "waiting: trials %s missed heartbeats; failed after %ss", suspect, policy.grace_period
        )
        return "wait"
    log.info("%d trials finished, %d running in other workers", finished, len(running))
    return "done"


def run_one_trial(
    study: optuna.Study, objective, n_trials: int, policy: StaleTrialPolicy | None = None
) -> bool:
    """Ask for a trial (an enqueued retry first) and run it, unless the study already has
    `n_trials` trials with smaller numbers that are running, enqueued or finished (trial numbers
    come from the shared storage, so several workers never run more than `n_trials` in total);
    such an excess trial is closed as FAIL with user attribute `excess` and not counted. While
    it runs, the trial holds a lease (`TrialHeartbeat`). Returns False for an excess trial."""
    trial = study.ask()
    earlier = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number < trial.number and t.state != STATES.FAIL
    ]
    if len(earlier) >= n_trials:
        trial.set_user_attr("excess", True)
        study.tell(trial, state=STATES.FAIL)
        return False
    start = time.perf_counter()
    state, value = STATES.COMPLETE, None
    try:
        with TrialHeartbeat(trial, policy or StaleTrialPolicy()):
            value = objective(trial)
    except optuna.TrialPruned:
        state = STATES.PRUNED
    except optuna.exceptions.UpdateFinishedTrialError:
        _closed_elsewhere(trial)
        return True
    except Exception:
        study.tell(trial, state=STATES.FAIL, skip_if_finished=True)
        raise
    except BaseException as stop:  # SIGTERM (Terminated), Ctrl-C: not the trial's own failure
        _close_interrupted(study, trial, stop, policy or StaleTrialPolicy())
        raise
    if study._storage.get_trial(trial._trial_id).state.is_finished():
        _closed_elsewhere(trial)
        return True
    trial.set_user_attr("wall_seconds", time.perf_counter() - start)
    study.tell(trial, value, state=state, skip_if_finished=True)
    return True


def _close_interrupted(
    study: optuna.Study, trial: optuna.Trial, stop: BaseException, policy: StaleTrialPolicy
) -> None:
    """Close a trial stopped from outside as FAIL (user attribute `interrupted`) and enqueue it
    again with its parameters, as a dead worker's trial is: the next `sweep.py` on the study
    runs it first, and FAIL trials do not count towards `sweep.n_trials`. Never masks `stop`."""
    try:
        trial.set_user_attr("interrupted", str(stop) or type(stop).__name__)
        study.tell(trial, state=STATES.FAIL, skip_if_finished=True)
        frozen = study._storage.get_trial(trial._trial_id)
        if frozen.state == STATES.FAIL:  # not closed meanwhile as stale by another worker
            retry_trial(study, frozen, policy.max_retries)
        log.warning("trial %d stopped (%s): closed as FAIL, to be re-run", trial.number, stop)
    except Exception as err:  # the storage may be what is failing: a dead worker's trial then
        log.warning("trial %d stopped but not closed: %s", trial.number, err)


def _closed_elsewhere(trial: optuna.Trial) -> None:
    log.warning(
        "trial %d was closed as stale by another worker (no heartbeat for sweep.grace_period); "
        "its result is dropped and its retry counts instead",
        trial.number,
    )


def _write_results(
    study: optuna.Study, sweep_dir: Path, base: DictConfig, log_to_wandb: bool = True
) -> None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        log.warning("no complete trial yet in study %s", study.study_name)
        return
    best = {
        "study": study.study_name,
        "value": study.best_value,
        "params": study.best_params,
        "trial": study.best_trial.number,
        "states": {
            s.name: len(study.get_trials(deepcopy=False, states=(s,)))
            for s in optuna.trial.TrialState
        },
    }
    atomic_write_text(sweep_dir / "best_params.json", json.dumps(best, indent=2))
    log.info("best of %s: %s", study.study_name, best)
    if len(complete) >= 2:
        try:
            importance = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError) as err:  # e.g. a parameter that never varied
            log.warning("parameter importance not computed: %s", err)
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh(list(importance), list(importance.values()), color="tab:blue")
        ax.set_xlabel("importance (fANOVA)")
        ax.set_title(study.study_name)
        fig.tight_layout()
        # temp + rename: a reader (or another worker writing it) never sees half a PNG
        image = sweep_dir / "param_importance.png"
        tmp = image.with_name(f".{image.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        try:
            fig.savefig(tmp, dpi=100, format="png")
            os.replace(tmp, image)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)
    if log_to_wandb:
        _log_to_wandb(best, sweep_dir, base)


def _log_to_wandb(best: dict[str, Any], sweep_dir: Path, base: DictConfig) -> None:
    """The study's result as one W&B run in the study's group (when W&B is on)."""
    wandb_cfg = base.logger.get("wandb") if base.logger else None
    if not wandb_cfg or wandb_cfg.get("mode") == "disabled":
        return
    import wandb

    use_wandb_mode(wandb_cfg.mode)  # offline: no network at all
    run = wandb.init(
        project=wandb_cfg.project,
        entity=wandb_cfg.get("entity"),
        group=best["study"],
        job_type="sweep-summary",
        mode=wandb_cfg.mode,
        dir=str(sweep_dir),
        config={"best_params": best["params"]},
    )
    run.summary.update(
        {
            "best_value": best["value"],
            "best_trial": best["trial"],
            **{f"trials/{k}": v for k, v in best["states"].items()},
        }
    )
    image = sweep_dir / "param_importance.png"
    if image.is_file():
        run.log({"param_importance": wandb.Image(str(image))})
    run.finish()
