"""What every pipeline shares: the run skeleton (`RunContext`), the Trainer with vitlab's
checkpoints, synthetic-data generation on first use, and the `Pipeline` contract the entry points
(`train.py`, `infer.py`, `sweep.py`) dispatch on. No pipeline imports another pipeline."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from vitlab.cache import content_key, directory_fingerprint, set_fingerprint_mode
from vitlab.callbacks import BestCheckpoint, last_epoch_checkpoint
from vitlab.config import (
    check_added_keys,
    check_config_targets,
    fill_runtime,
    instantiate_node,
    require_choice,
    require_positive,
    require_positive_or_auto,
    require_set,
    set_extra_target_prefixes,
    to_container,
)
from vitlab.console import print_config
from vitlab.data.missing_images import FRACTION_KEY, check_max_missing_fraction
from vitlab.data.synthetic.markers import (
    ForeignFolderError,
    generate_once,
    is_complete,
    require_claimable,
)
from vitlab.deprecations import refuse_renamed, renamed_keys, warn_deprecated_groups
from vitlab.devices import Compute, compute_from_config, require_accelerator, trainer_for_device
from vitlab.errors import ConfigError
from vitlab.quiet import quiet_known_noise
from vitlab.runtime import apply_threads, local_spark_master, resolve_threads, runtime_record
from vitlab.safe_load import UnsafeCheckpointError, vitlab_checkpoint
from vitlab.secrets import mask_log_handlers
from vitlab.signals import sigterm_as_exception
from vitlab.stages.embed import embed_prepared
from vitlab.tracking import RunTracker, recorded_run, set_aside_previous

log = logging.getLogger(__name__)

RunSummary = dict[str, Any]
"""What every pipeline returns (and writes as `summary.json`): `status`, `stage_seconds`,
`metrics` (flat name -> number, holding the experiment's `optimized_metric`), `cache_keys` and
the artifacts (paths) of the run, plus the pipeline's own reports."""


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


class RunContext:
    """One run: its folder, stage timer, tracker (CSV + W&B) and `summary.json`, written
    atomically with `status: running|completed|failed` (see `vitlab.tracking.recorded_run`).

        with RunContext(cfg, "train") as run:
            with run.stage("fit"):
                ...
            run.summary["metrics"] = {...}
    """

    def __init__(self, cfg: DictConfig, job_type: str, **summary: Any):
        self.cfg = cfg
        self.run_dir = run_dir_of(cfg)
        self.timer = StageTimer()
        self.summary: RunSummary = {
            "task": job_type,
            "pipeline": cfg.get("pipeline"),
            "run_dir": str(self.run_dir),
            "runtime": {
                **runtime_record(OmegaConf.select(cfg, "runtime.threads")),
                **run_compute(cfg).record(),
            },
            **summary,
        }
        self.tracker = RunTracker(cfg.logger, self.run_dir, job_type, cfg)
        self._record = recorded_run(self.run_dir, self.summary, self.timer, self.tracker)
        self._sigterm = sigterm_as_exception()  # a killed run fails (exit 143), never exits 0

    def __enter__(self) -> RunContext:
        if self.cfg.get("print_config") and self.is_global_zero:
            print_config(self.cfg)
        self._record.__enter__()
        self._sigterm.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> bool | None:
        self._sigterm.__exit__(*exc_info)
        try:
            return self._record.__exit__(*exc_info)
        finally:  # every run ends saying where its results are, failed or not
            if self.is_global_zero:
                log.info(
                    "%s run %s; results in %s (summary.json)",
                    self.summary["task"],
                    self.summary.get("status", "ended"),
                    self.run_dir,
                )

    def stage(self, name: str):
        return self.timer.stage(name)

    @property
    def is_global_zero(self) -> bool:
        """Rank 0 of a (possibly distributed) run: the one that writes files."""
        return rank_zero_only.rank == 0


def run_dir_of(cfg: DictConfig) -> Path:
    path = Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


RENAMED_KEYS = renamed_keys()
"""Keys of earlier versions -> their place now, from the one table `vitlab.deprecations`
(README: "Renamed keys"). Hydra refuses the old key and suggests `+key=...`, which would add it
unread: `prepare_run` names the new one instead."""


def prepare_run(cfg: DictConfig) -> None:
    """Quiet logs; refuse old keys; set allow-list, fingerprint, threads; check targets, device."""
    quiet_known_noise()
    mask_log_handlers()  # a password in a URL (sweep.storage) is logged as ***
    refuse_renamed(cfg)
    warn_deprecated_groups()  # task=<pipeline>
    set_extra_target_prefixes(cfg.get("extra_target_prefixes"))
    set_fingerprint_mode(cfg.get("cache_fingerprint", "stat"))  # before any cache key
    check_config_targets(cfg)  # callbacks, loggers, trainer plugins, hydra.callbacks: now
    check_added_keys(cfg)
    threads = resolve_threads(OmegaConf.select(cfg, "runtime.threads"))
    apply_threads(threads)
    run_compute(cfg)  # runtime.device / embed.precision: refused here, before any stage
    if threads is not None and OmegaConf.select(cfg, "engine.master"):
        with open_dict(cfg):
            cfg.engine.master = local_spark_master(cfg.engine.master, threads)
    if cfg.get("callbacks") and "fit" in cfg:  # a bad callbacks= node fails before any stage
        require_choice(cfg, "fit.mode", ("min", "max"))
        configured_callbacks(cfg, cfg.fit.monitor, cfg.fit.mode)


def run_compute(cfg: DictConfig) -> Compute:
    """Where this run's frozen forwards run (`runtime.device`, `embed.precision`)."""
    return compute_from_config(cfg)


def validate_embedding_training(
    cfg: DictConfig, resume_supported: bool = True
) -> dict[str, Any] | None:
    """The training checks every embedding pipeline (PlantCLEF, FungiCLEF) makes before any
    work: the dataset and backbone set, `ckpt_path` (see `check_resume`), `fit.mode`, the head
    and embed batch sizes, the trainer's accelerator, the missing-image fraction. Returns the
    `ckpt_path` checkpoint (None without one) for the pipeline's own resume checks."""
    require_set(cfg, "dataset.root", "backbone.name", "backbone.checkpoint_path")
    resumed = check_resume(cfg, supported=resume_supported)
    require_choice(cfg, "fit.mode", ("min", "max"))
    require_positive(cfg, "head.batch_size")
    require_positive_or_auto(cfg, "embed.batch_size")
    require_accelerator(cfg.get("trainer"))
    check_max_missing_fraction(OmegaConf.select(cfg, FRACTION_KEY))
    return resumed


@dataclass(frozen=True)
class EmbeddingComponents:
    """What an embedding pipeline's training run builds before its first stage: where frozen
    forwards run, the backbone (placed, frozen), the feature reducer and the engine."""

    cfg: DictConfig
    compute: Compute
    backbone: Any
    features: Any
    engine: Any

    def embed(self, prepared: Any) -> Any:
        """The embed stage's work (cached) on prepared images: see `embed_training_images`."""
        return embed_training_images(
            self.cfg, prepared, self.backbone, self.features, self.engine, self.compute
        )

    def embed_and_record(self, run: RunContext, prepared: Any) -> Any:
        """The run's `embed` stage on the prepared training images; records both stages'
        `cache_keys` and prepare's `prepare_report` in the run's summary."""
        with run.stage("embed"):
            embedded = self.embed(prepared)
        run.summary["cache_keys"] = {"prepare": prepared.key, "embed": embedded.key}
        run.summary["prepare_report"] = prepared.manifest.get("report", {})
        return embedded


def embedding_components(cfg: DictConfig) -> EmbeddingComponents:
    """Seed the run (`seed`), then build its compute, backbone (once per process, placed on the
    run's device), features and engine: the opening of every embedding pipeline's training."""
    pl.seed_everything(cfg.seed, workers=True)
    compute = run_compute(cfg)
    backbone = place_backbone(build_backbone(cfg.backbone), compute)
    features = instantiate_node(cfg.features, "features")
    engine = instantiate_node(cfg.engine, "engine")
    return EmbeddingComponents(cfg, compute, backbone, features, engine)


def embed_training_images(
    cfg: DictConfig, prepared: Any, backbone: Any, features: Any, engine: Any, compute: Compute
) -> Any:
    """The embed stage of the embedding pipelines (cached), with the run's batch size, cache
    folder, engine and compute."""
    return embed_prepared(
        prepared, backbone, features, cfg.paths.cache_dir, cfg.embed.batch_size, engine, compute
    )


def place_backbone(backbone: Any, compute: Compute) -> Any:
    """The backbone on the run's (first) device, in eval mode (frozen)."""
    return backbone.to(compute.device).eval()


def ensure_generated(dataset: DictConfig, generate, spec_type, what: str) -> None:
    """Generate a synthetic dataset (`generate(root, spec_type(**dataset.synthetic))`) on first
    use, or again when its spec changed; real datasets must exist. Only a new, empty or
    generated folder is written: a user's folder, or a read-only one whose data must change, is
    refused (ConfigError naming dataset.root). Two runs generating into one folder at once are
    serialised: the second waits and uses the first's data (markers.generate_once)."""
    synthetic = dataset.get("synthetic")
    if synthetic:
        spec = spec_type(**to_container(synthetic))
        if not is_complete(dataset.root, spec):  # complete data is only read (may be read-only)
            try:
                require_claimable(dataset.root)  # a user's folder: refused before any log
                generate_once(dataset.root, spec, generate, what)
            except ForeignFolderError as err:
                raise ConfigError(f"dataset.root={dataset.root}: {err}") from err
    if not Path(dataset.root).is_dir():
        raise ConfigError(f"dataset.root={dataset.root} is not a folder")


def build_trainer(
    cfg: DictConfig,
    run: RunContext,
    checkpoint_dir: Path,
    monitor: str,
    mode: str,
    callbacks: Sequence[pl.Callback] = (),
) -> pl.Trainer:
    """The configured Trainer with `best.ckpt` (best `monitor`, ties broken by
    `fit.tie_breaker`), `last.ckpt` (the last epoch), the `callbacks` group's callbacks (early
    stopping on `monitor`, LR monitor, a log line per epoch, ...) and the caller's `callbacks`
    (e.g. Optuna pruning from sweep.py), logging to the run's loggers."""
    set_aside_previous(checkpoint_dir)  # this run owns best.ckpt / last.ckpt (never best-v1)
    all_callbacks: list[pl.Callback] = [
        BestCheckpoint(  # first: it is `trainer.checkpoint_callback`
            dirpath=checkpoint_dir,
            filename="best",
            monitor=monitor,
            mode=mode,
            tie_breaker=cfg.fit.get("tie_breaker"),
        ),
        last_epoch_checkpoint(str(checkpoint_dir)),
        *configured_callbacks(cfg, monitor, mode),
        *callbacks,
    ]
    # trainer=auto follows runtime.device; an explicit trainer=cpu|gpu|... is kept as it is
    trainer = trainer_for_device(to_container(cfg.trainer), run_compute(cfg).device)
    return instantiate_node(
        trainer,
        "trainer",
        callbacks=all_callbacks,
        logger=run.tracker.loggers,
        default_root_dir=str(run.run_dir),
    )


def configured_callbacks(cfg: DictConfig, monitor: str, mode: str) -> list[pl.Callback]:
    """The `callbacks` group's nodes, their `???` monitor/mode set to this run's (train/loss
    when a run has no validation split); early stopping with patience 0 is off."""
    built = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        key = f"callbacks.{name}"
        plain = fill_runtime(to_container(node), {"monitor": monitor, "mode": mode}, key)
        if is_early_stopping(plain.get("_target_")) and plain.get("patience") == 0:
            continue
        built.append(instantiate_node(plain, key))
    return built


def is_early_stopping(target: Any) -> bool:
    """Whether a (checked) `_target_` names Lightning's EarlyStopping or a subclass of it."""
    from hydra._internal.utils import _locate

    try:
        found = _locate(str(target))
    except Exception:  # not importable: instantiating it will name the key
        return False
    return isinstance(found, type) and issubclass(found, pl.callbacks.EarlyStopping)


def check_resume(cfg: DictConfig, supported: bool = True) -> dict[str, Any] | None:
    """`ckpt_path` (train.py: resume training) names an existing Lightning training checkpoint;
    returns it (None without `ckpt_path`) for the pipeline's own checks."""
    path = cfg.get("ckpt_path")
    if not path:
        return None
    if not supported:
        raise ConfigError(
            f"ckpt_path={path}: pipeline={cfg.pipeline} cannot resume a run (rerun it: the "
            "stage cache keeps its embeddings)"
        )
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path={path}: no such checkpoint file (a .ckpt to resume from)")
    try:  # read now, not after prepare/embed: a wrong file fails before any stage
        with vitlab_checkpoint(f"ckpt_path={path}"):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # not a torch file at all
        raise ConfigError(f"ckpt_path={path}: not a checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or not {"state_dict", "loops"} <= set(checkpoint):
        raise ConfigError(
            f"ckpt_path={path}: not a Lightning training checkpoint (no state_dict/loops; "
            "resume from a run's checkpoints/last.ckpt)"
        )
    return checkpoint


_built_backbone: dict[str, Any] = {}  # the last backbone built in this process, by its key


def build_backbone(node: DictConfig | dict[str, Any], key: str = "backbone") -> Any:
    """The backbone `node` describes, built once per process: a sweep's trials (and a multirun's
    jobs, which Hydra's basic launcher runs in one process) reuse the one built for the same
    config and the same files (a weights file or folder that changed is a new backbone). Safe to
    share: backbones are frozen feature extractors here (eval mode, used under inference_mode).
    Only the last one is kept, so a sweep over backbones does not pile them up in memory."""
    container = to_container(node) if isinstance(node, DictConfig) else dict(node)
    memo_key = content_key(container, [_path_state(v) for v in container.values()])
    if memo_key not in _built_backbone:
        _built_backbone.clear()
        _built_backbone[memo_key] = instantiate_node(node, key)
    else:
        log.info("%s: reusing the one built earlier in this process", key)
    return _built_backbone[memo_key]


def _path_state(value: Any) -> Any:
    """(size, mtime, ctime) of a file, the fingerprint of a folder; None for anything else."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    try:
        if path.is_file():
            stat = path.stat()  # ctime: a file replaced with its size and mtime set back
            return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
        if path.is_dir():
            return directory_fingerprint(path)
    except OSError:
        return None
    return None


def numeric_metrics(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested score dicts to `a/b/c -> float` (what `RunSummary.metrics` holds)."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(numeric_metrics(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


@dataclass(frozen=True)
class Pipeline:
    """A pipeline's entry points; `train(cfg, callbacks)` / `infer(cfg)` return a RunSummary.
    `validate_train` / `validate_infer` are the checks (no work) of `train` / `infer` (None
    where the pipeline has no such entry); each entry point runs its own."""

    name: str
    train: Callable[..., RunSummary] | None = None
    infer: Callable[[DictConfig], RunSummary] | None = None
    validate_train: Callable[[DictConfig], None] | None = None
    validate_infer: Callable[[DictConfig], None] | None = None

    @property
    def validate(self) -> Callable[[DictConfig], None] | None:
        """The checks of the pipeline's first entry: `validate_train`, else `validate_infer`
        (the one `validate` of earlier versions, kept for its callers)."""
        return self.validate_train or self.validate_infer
