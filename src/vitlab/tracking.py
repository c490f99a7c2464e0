"""Experiment tracking: a local CSV/JSON record always, W&B and TensorBoard when configured
(W&B offline by default).

Lightning loggers are built here so fit, predict and score log to the same runs; W&B media
(tables, images, segmentation masks) go through `log_table` / `log_image` / `log_masks`, which
also write local files where they have a local form.

What a W&B run holds:
- config: the run's resolved Hydra config as composed (`head`, `loss`, ... exactly as on the
  command line), logged once when the run starts; the LightningModule's hyperparameters, which
  Lightning logs at every `fit`, go under `module` (`<scope>/module` inside a `scope`) so they
  never replace a Hydra group of the same name.
- name: the run's command-line overrides (`optimizer.lr=1e-3,loss=seesaw`), see `run_name`.
- metrics logged inside `RunTracker.scope("fold1")` are `fold1/<key>` in W&B and TensorBoard and
  carry a `fold` column in the CSV (one run per experiment; see the FungiCLEF pipeline).
- checkpoints as `model` artifacts when `logger.wandb.log_model` is true (offline too).
An online run whose W&B server does not answer within `logger.wandb.init_timeout` seconds (no
network) is logged offline instead, and says how to upload it (`wandb sync <dir>`).

`recorded_run` is the body of every run: `summary.json` with its status, the earlier run's result
files set aside when a run folder is reused, and write errors (a full disk) naming the path.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from argparse import Namespace
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from vitlab.atomic import (
    OutOfSpaceError,
    atomic_output,
    atomic_write_text,
    is_out_of_space,
    raise_naming,
    temp_path,
    write_error,
)
from vitlab.config import to_container
from vitlab.errors import ConfigError
from vitlab.secrets import mask_secrets, mask_tree

log = logging.getLogger(__name__)
WANDB_MODES = ("online", "offline", "disabled")
WANDB_INIT_TIMEOUT_S = 15.0
"""How long an online run waits for W&B's server before it logs offline (W&B's own: 90 s)."""


class ScopedLogging:
    """What `RunTracker.scope` sets on its loggers: a key prefix (W&B, TensorBoard) and extra
    CSV columns, so several trainings in one run (FungiCLEF's folds) keep apart."""

    key_prefix: str = ""
    columns: dict[str, Any]

    def scoped(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        prefix = self.key_prefix
        return {f"{prefix}/{k}" if prefix else k: v for k, v in metrics.items()}


class VitlabWandbLogger(ScopedLogging, WandbLogger):
    """Lightning's WandbLogger, except that the module's hyperparameters go under `module`
    (Lightning logs them with `config.update(..., allow_val_change=True)`, which replaced the
    Hydra config's `head` and `loss` groups by the module's arguments of the same names) and
    that metrics logged inside a scope get its prefix."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.columns = {}
        # Lightning always passes `anonymous=None` to wandb.init, for which wandb >= 0.19
        # prints "The anonymous setting has no effect" on every run: pass nothing instead
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        from lightning_fabric.utilities.logger import (
            _convert_json_serializable,
            _convert_params,
            _sanitize_callable_params,
        )

        params = _convert_json_serializable(_sanitize_callable_params(_convert_params(params)))
        key = f"{self.key_prefix}/module" if self.key_prefix else "module"
        self.experiment.config.update({key: params}, allow_val_change=True)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(self.scoped(metrics), step)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Only `best.ckpt` becomes the `model` artifact. Lightning would also log `last.ckpt`
        (its own "best" of a monitor-less callback) as a later version with the alias `best`."""
        from vitlab.callbacks import BestCheckpoint

        if isinstance(checkpoint_callback, BestCheckpoint):
            super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Log the fit's checkpoints (Lightning calls this when a fit ends), then forget their
        callbacks: the run's own `finish` finalizes again after their Trainer is gone."""
        try:
            super().finalize(status)
        finally:
            self._checkpoint_callbacks.clear()

    def set_scope(self, prefix: str) -> None:
        self.key_prefix = prefix
        # one checkpoint artifact per scope (fold), not versions of one that overwrite "best"
        self._checkpoint_name = f"model-{self.experiment.id}" + (f"-{prefix}" if prefix else "")


class VitlabCSVLogger(ScopedLogging, CSVLogger):
    """Lightning's CSVLogger with the scope's columns (e.g. `fold`) on every row."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.columns = {}

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics({**metrics, **self.columns}, step)


def _tensorboard_logger_class():
    from pytorch_lightning.loggers import TensorBoardLogger

    class VitlabTensorBoardLogger(ScopedLogging, TensorBoardLogger):
        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.columns = {}

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            super().log_metrics(self.scoped(metrics), step)

    return VitlabTensorBoardLogger


class RunTracker:
    def __init__(self, logger_cfg: DictConfig, run_dir: Path, job_type: str, config: DictConfig):
        check_logger_config(logger_cfg)  # before anything is written
        self.run_dir = run_dir
        set_aside_previous(run_dir / "csv")  # CSVLogger would delete an earlier run's log
        self.csv = VitlabCSVLogger(save_dir=str(run_dir), name="csv", version="")
        self.loggers: list[Logger] = [self.csv]
        self.wandb: VitlabWandbLogger | None = None
        self.wandb_fallback: dict[str, str] | None = None  # online asked, offline logged
        self.result_files: set[str] = set()  # names of the tables written (`log_table`)
        self.tensorboard: Logger | None = None
        tb_cfg = logger_cfg.get("tensorboard") if logger_cfg else None
        if tb_cfg is not None:
            set_aside_previous(run_dir / "tensorboard")  # its events would mix with the new run's
            self.tensorboard = _tensorboard_logger_class()(
                save_dir=str(run_dir), name="tensorboard", version="", **to_container(tb_cfg)
            )
            self.loggers.append(self.tensorboard)
        wandb_cfg = logger_cfg.get("wandb") if logger_cfg else None
        if wandb_cfg and wandb_cfg.get("mode", "offline") != "disabled":
            self.wandb, self.wandb_fallback = start_wandb(wandb_cfg, run_dir, job_type, config)
            self.loggers.append(self.wandb)

    @contextmanager
    def scope(self, prefix: str, **columns: Any) -> Iterator[None]:
        """Inside, metrics go to W&B and TensorBoard as `<prefix>/<key>` (and the module's
        hyperparameters as `<prefix>/module`), to the CSV with `columns` on each row:
        `with tracker.scope("fold1", fold="fold1"): trainer.fit(...)`."""
        scoped = [lg for lg in self.loggers if isinstance(lg, ScopedLogging)]
        for logger in scoped:
            if isinstance(logger, VitlabWandbLogger):
                logger.set_scope(prefix)
            else:
                logger.key_prefix = prefix
            logger.columns = dict(columns)
        try:
            yield
        finally:
            for logger in scoped:
                if isinstance(logger, VitlabWandbLogger):
                    logger.set_scope("")
                else:
                    logger.key_prefix = ""
                logger.columns = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        if self.wandb is not None:
            self.wandb.experiment.summary.update(self.wandb.scoped(metrics))

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
        path = self.run_dir / f"{name}.csv"
        with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows)
        self.result_files.add(path.name)
        if self.wandb is not None:
            import wandb

            self.wandb.experiment.log(
                {name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}
            )
        return path

    def log_image(self, name: str, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.experiment.log({name: wandb.Image(str(path))})

    def log_masks(
        self, name: str, items: Sequence[MaskedImage], class_labels: dict[int, str]
    ) -> None:
        """Images with prediction / ground-truth masks under one W&B key (W&B's mask overlay:
        toggle the masks and classes in the UI)."""
        if self.wandb is None or not items:
            return
        import wandb

        images = []
        for item in items:
            masks = {"prediction": {"mask_data": item.prediction, "class_labels": class_labels}}
            if item.truth is not None:
                masks["ground_truth"] = {"mask_data": item.truth, "class_labels": class_labels}
            images.append(wandb.Image(item.image, masks=masks, caption=item.caption))
        self.wandb.experiment.log({name: images})

    def finish(self, failed: bool = False) -> None:
        """Close the loggers; a failed run ends its W&B run with exit code 1 (shown as failed)."""
        for logger in self.loggers:
            logger.finalize("failed" if failed else "success")
        if self.wandb is not None:
            import wandb

            wandb.finish(exit_code=1 if failed else 0)  # each multirun job gets its own run


def start_wandb(
    wandb_cfg: DictConfig, run_dir: Path, job_type: str, config: DictConfig
) -> tuple[VitlabWandbLogger, dict[str, str] | None]:
    """The run's W&B logger, started now (its config and name are set), and what the run records
    when it fell back to offline (else None). Online, W&B's server has `logger.wandb.init_timeout`
    seconds to answer; when it does not (no network, a firewall) the run is logged offline and
    says how to upload it later, rather than failing after W&B's own 90 s."""
    from wandb.errors import CommError

    mode, timeout = wandb_cfg.mode, wandb_init_timeout(wandb_cfg)
    if mode == "online":
        log.info("starting the W&B run online (up to %g s: logger.wandb.init_timeout)", timeout)
    try:
        return _started_wandb(wandb_cfg, mode, timeout, run_dir, job_type, config), None
    except CommError as err:
        if mode != "online":
            raise
        reason = str(err).splitlines()[0]
    logger = _started_wandb(wandb_cfg, "offline", timeout, run_dir, job_type, config)
    sync_dir = Path(logger.experiment.dir).parent  # <run_dir>/wandb/offline-run-<time>-<id>
    log.warning(
        "W&B did not answer within logger.wandb.init_timeout=%g s (%s): this run is logged "
        "offline in %s; upload it when the network is back with `wandb sync %s`",
        timeout,
        reason,
        sync_dir,
        sync_dir,
    )
    return logger, {
        "mode": "offline",
        "asked": "online",
        "reason": reason,
        "sync": f"wandb sync {sync_dir}",
    }


def _started_wandb(
    wandb_cfg: DictConfig,
    mode: str,
    timeout: float,
    run_dir: Path,
    job_type: str,
    config: DictConfig,
) -> VitlabWandbLogger:
    import wandb

    use_wandb_mode(mode)
    logger = VitlabWandbLogger(
        project=wandb_cfg.project,
        entity=wandb_cfg.get("entity"),
        group=wandb_cfg.get("group"),
        tags=list(wandb_cfg.get("tags") or []),
        name=run_name(config),
        mode=mode,
        save_dir=str(run_dir),
        job_type=job_type,
        log_model=bool(wandb_cfg.get("log_model", False)),
        # the artifact references the checkpoint in place (no copy in W&B's staging
        # folder): it is not rewritten after its fit ends
        add_file_policy="immutable",
        config=run_config(config),  # once, as composed: never replaced by the module's
        settings=wandb.Settings(init_timeout=timeout),
    )
    logger.experiment  # noqa: B018 - start the run now: its config and name are set
    return logger


def wandb_init_timeout(wandb_cfg: DictConfig) -> float:
    """`logger.wandb.init_timeout`: seconds (> 0) an online run waits for W&B's server;
    WANDB_INIT_TIMEOUT_S when unset."""
    value = wandb_cfg.get("init_timeout")
    if value is None:
        return WANDB_INIT_TIMEOUT_S
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(
            f"logger.wandb.init_timeout={value!r}: a number of seconds > 0 (how long an online "
            "run waits for W&B's server before it logs offline)"
        )
    return seconds


@dataclass
class MaskedImage:
    """One image for `RunTracker.log_masks`: RGB array [H, W, 3], label maps [H, W]."""

    image: np.ndarray
    prediction: np.ndarray
    truth: np.ndarray | None
    caption: str


def run_config(config: DictConfig) -> dict[str, Any]:
    """The config as W&B records it: resolved, without Hydra's own node (a Hydra app's config
    has none; one composed by a test or the sweep driver may, with keys only a launcher sets)."""
    if "hydra" in config:
        config = config.copy()
        with open_dict(config):
            del config["hydra"]
    return mask_tree(OmegaConf.to_container(config, resolve=True))  # URL passwords: ***


NAME_EXCLUDED = ("hydra.", "logger", "paths.", "dataset.root", "ckpt_path", "sweep")
"""Overrides left out of run names: where things are, how they are logged, which sweep."""
NAME_LENGTH = 128


def run_name(config: DictConfig) -> str | None:
    """`logger.wandb.name` when set, else the run's command-line overrides as typed
    (`optimizer.lr=0.001,loss=seesaw`; paths, logger and sweep settings left out, floats
    shortened to 4 significant digits), else the experiment's name."""
    explicit = OmegaConf.select(config, "logger.wandb.name")
    if explicit:
        return str(explicit)
    parts = {}  # a key given twice: Hydra applies the last one
    for override in task_overrides():
        if not _excluded_from_name(override):
            part = name_part(override)
            parts.pop(part.partition("=")[0], None)
            parts[part.partition("=")[0]] = part
    name = ",".join(parts.values())
    if len(name) > NAME_LENGTH:
        name = name[: NAME_LENGTH - 3] + "..."
    return name or config.get("experiment_name") or None


def task_overrides() -> list[str]:
    """This run's command-line overrides (Hydra's `hydra.overrides.task`); [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def _excluded_from_name(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return any(
        key == p.rstrip(".") or key.startswith(p if p.endswith(".") else p + ".")
        for p in NAME_EXCLUDED
    )


def name_part(override: str) -> str:
    """`+optimizer.amsgrad=true` -> `optimizer.amsgrad=true`; `lr=0.0012345678` ->
    `lr=0.001235`."""
    override = override.lstrip("+")
    key, sep, value = override.partition("=")
    if sep and "." in value:
        try:
            value = f"{float(value):.4g}"
        except ValueError:
            pass
    return f"{key}{sep}{value}"


def check_logger_config(logger_cfg: DictConfig | None) -> None:
    """`logger.tensorboard` needs tensorboard (or tensorboardX) importable; `logger.wandb.mode`
    one of WANDB_MODES, `logger.wandb.init_timeout` seconds > 0. Named before any work."""
    if not logger_cfg:
        return
    wandb_cfg = logger_cfg.get("wandb")
    if wandb_cfg and wandb_cfg.get("mode", "offline") not in WANDB_MODES:
        raise ConfigError(
            f"logger.wandb.mode={wandb_cfg.get('mode')!r}: choose one of {list(WANDB_MODES)}"
        )
    if wandb_cfg:
        wandb_init_timeout(wandb_cfg)
    if logger_cfg.get("tensorboard") is not None and not tensorboard_available():
        raise ConfigError(
            "logger.tensorboard: TensorBoard logging needs the `tensorboard` package (a vitlab "
            "dependency: pip install -e .) or `tensorboardX`; or use logger=wandb|csv"
        )


def tensorboard_available() -> bool:
    from importlib.util import find_spec

    return find_spec("tensorboard") is not None or find_spec("tensorboardX") is not None


def use_wandb_mode(mode: str) -> None:
    """Set before W&B starts: the mode passed to `wandb.init` alone still let an offline run look
    up W&B's API host (telemetry); with WANDB_MODE in the environment offline means no network."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = mode


RESULT_FILES = (
    "submission.csv",  # plantclef, fungiclef
    "scores.json",
    "per_plot_predictions.csv",  # plantclef
    "per_species_f1.png",
    "held_out_scores.csv",  # fungiclef
    "poison_confusion.csv",
    "worst_classes_f1.csv",
    "embedding_map.png",
    "per_class_iou.csv",  # segmentation
    "per_class_iou.png",
    "predictions",
    "overlays",
    "media",  # groupvit's entropy maps
)
"""What pipelines write into a run folder as results (besides `checkpoints/`, `csv/`,
`tensorboard/` and `wandb/`, set aside or kept apart by their writers): a summary records the
ones its run wrote as `result_files`, and a rerun into the folder sets those aside. Model exports
(`groupvit.pt`) are not in it: a later run may read them by path. Add a name here when a
pipeline writes a new result file."""
RUN_STATUSES = ("running", "completed", "failed")


@contextmanager
def recorded_run(
    run_dir: Path, summary: dict[str, Any], timer: Any, tracker: RunTracker
) -> Iterator[dict[str, Any]]:
    """The body of a run: `summary.json` says `status: running` while it works (what a killed
    run leaves), then `completed`, or `failed` with the error; W&B gets the matching exit code.
    `timer.seconds` goes in as `stage_seconds`, the result files the run wrote as `result_files`.
    A reused run folder's earlier results are set aside first (`set_aside_results`). A full disk
    fails the run with an `OutOfSpaceError` naming the path; a summary that cannot be replaced
    is rewritten in place (`write_summary`). Under DDP only rank zero writes files."""
    path = run_dir / "summary.json"
    writer = rank_zero_only.rank == 0  # Lightning knows the rank by now
    failed, before = False, {}
    try:
        if writer:
            set_aside_results(run_dir)
            before = _signatures(run_dir, RESULT_FILES)
        if getattr(tracker, "wandb_fallback", None):
            summary["wandb"] = tracker.wandb_fallback  # asked online, logged offline: sync later
        summary["status"] = "running"
        if writer:
            write_json(path, summary)
        yield summary
    except BaseException as err:
        failed = True
        if is_out_of_space(err) and not isinstance(err, OutOfSpaceError):
            named = write_error(err, run_dir)  # the file when it was named, else the run folder
            summary["error"] = f"{type(named).__name__}: {named}"
            raise named from err
        summary["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        summary["status"] = "failed" if failed else "completed"
        summary["stage_seconds"] = dict(timer.seconds)
        unwritten = None
        if writer:
            summary["result_files"] = written_results(run_dir, before, tracker)
            unwritten = write_summary(path, summary)
        tracker.finish(failed=failed or unwritten is not None)
        if unwritten is not None and not failed:
            raise unwritten  # a run whose summary could not be written did not complete


def written_results(run_dir: Path, before: dict[str, tuple[int, int]], tracker: Any) -> list[str]:
    """The result files this run wrote: its tables, and the RESULT_FILES names that are new or
    replaced since it started (`before`: their signatures then, a user's file left alone)."""
    now = _signatures(run_dir, RESULT_FILES)
    changed = {name for name, signature in now.items() if before.get(name) != signature}
    tables = {n for n in getattr(tracker, "result_files", ()) if (run_dir / n).exists()}
    return sorted(changed | tables)


def _signatures(run_dir: Path, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of the `names` present: an atomic replace changes the inode, a write into
    a folder its mtime."""
    found = {}
    for name in names:
        try:
            stat = (run_dir / name).stat()
        except OSError:
            continue
        found[name] = (stat.st_ino, stat.st_mtime_ns)
    return found


def set_aside_results(run_dir: Path) -> list[Path]:
    """A rerun into a run folder (`hydra.run.dir` or `paths.output_dir` given again): move the
    earlier run's result files and its summary to `<name>.previous-<time>` (the time its summary
    was last written), so they are not read as the new run's, whatever it does. Which files: the
    earlier summary's `result_files`, or RESULT_FILES for a summary written before that list. A
    folder without a vitlab summary is the user's: nothing in it moves. Returns the new paths."""
    summary_path = run_dir / "summary.json"
    earlier = _earlier_summary(summary_path)
    if rank_zero_only.rank != 0 or earlier is None:
        return []
    listed = earlier.get("result_files")
    names = [n for n in listed if _plain_name(n)] if isinstance(listed, list) else RESULT_FILES
    present = [run_dir / n for n in names if os.path.lexists(run_dir / n)]
    if not present:
        return []
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(summary_path.stat().st_mtime))
    moved = [_move_aside(path, stamp) for path in [*present, summary_path]]
    log.warning(
        "%s holds an earlier run's results: moved %s to *.previous-%s",
        run_dir,
        ", ".join(p.name for p in present + [summary_path]),
        stamp,
    )
    return moved


def _earlier_summary(path: Path) -> dict[str, Any] | None:
    """The summary a vitlab run left at `path` (a status vitlab writes), else None."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(earlier, dict) and earlier.get("status") in RUN_STATUSES:
        return earlier
    return None


def _plain_name(name: Any) -> bool:
    """A name of a file directly in the run folder (a summary's list is never followed out)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", "summary.json")
        and "/" not in name
        and "\\" not in name
    )


def _move_aside(path: Path, stamp: str) -> Path:
    target = path.with_name(f"{path.name}.previous-{stamp}")
    suffix = 1
    while os.path.lexists(target):
        suffix += 1
        target = path.with_name(f"{path.name}.previous-{stamp}-{suffix}")
    os.replace(path, target)
    return target


def set_aside_previous(path: Path) -> Path | None:
    """A rerun into the same run folder: move the earlier run's `path` (its checkpoints or CSV
    log, which Lightning would version or delete) to `<name>.previous-<time>` so the new run
    owns the names `best.ckpt` / `last.ckpt` and nothing is lost."""
    if rank_zero_only.rank != 0 or not path.is_dir() or not any(path.iterdir()):
        return None  # DDP: rank zero moves it
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    target = _move_aside(path, stamp)
    log.warning("%s holds an earlier run's files: moved to %s", path, target)
    return target


def json_text(payload: dict[str, Any]) -> str:
    """`payload` as the JSON vitlab writes, URL passwords masked."""
    return mask_secrets(json.dumps(payload, indent=2, default=str))


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """`payload` as JSON, atomically, with URL passwords masked (summaries, scores). An OSError
    names `path`; a full disk is an `OutOfSpaceError`."""
    try:
        atomic_write_text(path, json_text(payload))
    except OSError as err:
        raise_naming(err, path, temp_path(path))
    return path


SUMMARY_CORE = ("status", "error", "task", "pipeline", "run_dir")
"""What a summary keeps when only a few bytes can be written (`write_summary`)."""


def write_summary(path: Path, summary: dict[str, Any]) -> OSError | None:
    """`summary` as `path`, atomically; None when written. When that fails (a full disk: the
    temp file cannot be written) the run failed: the summary says so with the write's error
    (unless the run had failed already) and is rewritten in place, whole or else its core
    keys, so it never keeps `status: running`. Returns the write's error; logs an error naming
    the file when not even that worked."""
    try:
        write_json(path, summary)
        return None
    except OSError as err:
        failure = err
    summary["status"] = "failed"
    summary.setdefault("error", f"{type(failure).__name__}: {failure}")
    core = {key: summary[key] for key in SUMMARY_CORE if key in summary}
    attempts = (summary, {**core, "truncated": f"{path} could not be written in full"})
    for payload in attempts:
        try:
            rewrite_in_place(path, json_text(payload))
        except OSError as err:
            last = err
            continue
        log.error("%s (%s): rewritten in place", failure, path)
        return failure
    log.error(
        "%s: could not write %s, not even in place (%s): it may still say status 'running'; "
        "this run %s",
        failure,
        path,
        last,
        summary["error"],
    )
    return failure


def rewrite_in_place(path: Path, text: str) -> None:
    """`text` written over `path`'s own bytes (opened without truncating, cut after), so a full
    disk can still take it in the blocks the file holds; no file yet: a plain small write. Not
    atomic: `write_summary`'s fallback when a temp file cannot be written."""
    try:
        try:
            handle = open(path, "r+b")
        except FileNotFoundError:
            handle = open(path, "wb")
        with handle:
            handle.write(text.encode())
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise_naming(err, path)
