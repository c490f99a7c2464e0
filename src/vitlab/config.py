"""Config helpers: every `instantiate` goes through `instantiate_node` (one place to add Hydra
1.4's target whitelist), and validation that fails before any work, naming the key."""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from hydra._internal.utils import _locate
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from vitlab.errors import ConfigError

__all__ = ["ConfigError"]  # re-exported: `from vitlab.config import ConfigError` keeps working

ALLOWED_TARGET_PREFIXES = ("vitlab.", "torch.nn.", "torch.optim.", "pytorch_lightning.")
"""Where a `_target_` path may start. The path is then resolved as Hydra would (it follows
attribute chains: `vitlab.safe_load.torch.load` is `torch.load`), and the object it names must
be one a config may build (`target_refusal`)."""
VITLAB_FACTORIES = ("vitlab.models.backbones.create_backbone", "vitlab.engines.create_engine")
"""The vitlab functions a `_target_` may name; any other vitlab target must be a class."""
# Packages a user adds with the `extra_target_prefixes` key (set by each pipeline at its start).
_extra_target_prefixes: tuple[str, ...] = ()


def to_container(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def set_extra_target_prefixes(prefixes: Iterable[str] | None) -> None:
    """Allow `_target_`s in these packages too (config key `extra_target_prefixes`). Each must be
    a dotted package prefix ending in '.', so no entry can allow everything by accident."""
    global _extra_target_prefixes
    checked = []
    for prefix in prefixes or ():
        if not isinstance(prefix, str) or not prefix.endswith(".") or len(prefix) < 3:
            raise ConfigError(
                f"extra_target_prefixes: {prefix!r} is not a package prefix ending in '.' "
                "(e.g. extra_target_prefixes=[mylab.])"
            )
        checked.append(prefix)
    _extra_target_prefixes = tuple(checked)


def allowed_target_prefixes() -> tuple[str, ...]:
    return ALLOWED_TARGET_PREFIXES + _extra_target_prefixes


def _third_party_bases() -> tuple[type, ...]:
    """What a config may build from torch and Lightning: modules (heads, losses), optimisers,
    schedulers and the Trainer with its callbacks, loggers, plugins, strategies, profilers."""
    import pytorch_lightning as pl
    import torch
    from lightning_fabric.plugins import CheckpointIO, ClusterEnvironment
    from pytorch_lightning.accelerators import Accelerator
    from pytorch_lightning.loggers import Logger
    from pytorch_lightning.plugins import LayerSync, Precision
    from pytorch_lightning.profilers import Profiler
    from pytorch_lightning.strategies import Strategy

    return (
        torch.nn.Module,
        torch.optim.Optimizer,
        torch.optim.lr_scheduler.LRScheduler,
        torch.optim.lr_scheduler.ReduceLROnPlateau,
        pl.Trainer,
        pl.Callback,
        Logger,
        Precision,
        CheckpointIO,
        ClusterEnvironment,
        LayerSync,
        Strategy,
        Accelerator,
        Profiler,
    )


@functools.lru_cache(maxsize=512)
def target_refusal(target: Any, extra_prefixes: tuple[str, ...] = ()) -> str | None:
    """Why `target` may not be built (None: it may). Allowed: any object defined in a package of
    `extra_prefixes` (the user's own, trusted code); in vitlab a class or a `VITLAB_FACTORIES`
    function; in torch/Lightning a subclass of `_third_party_bases`. The path must start with an
    allowed prefix before anything is imported, so checking imports nothing foreign."""
    if not isinstance(target, str):
        return "is not a dotted path"
    prefixes = ALLOWED_TARGET_PREFIXES + extra_prefixes
    if not target.startswith(prefixes):
        return "is outside the allowed packages"
    try:
        obj = _locate(target)
    except Exception as err:  # ImportError, or a missing attribute along the path
        return f"cannot be imported ({str(err).strip().splitlines()[-1]})"
    module = getattr(obj, "__module__", None) or ""
    defined = f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"
    if extra_prefixes and f"{module}.".startswith(extra_prefixes):  # `mylab.` holds `mylab`
        return None
    if module.startswith("vitlab."):
        if inspect.isclass(obj) or defined in VITLAB_FACTORIES:
            return None
        return f"is {defined}, a vitlab function that is not a config factory"
    if inspect.isclass(obj) and issubclass(obj, _third_party_bases()):
        return None
    kind = "class" if inspect.isclass(obj) else type(obj).__name__
    return (
        f"resolves to {defined} ({kind}), which is not a module, optimizer, scheduler or "
        "Lightning component"
    )


def locate_target(target: Any) -> Any:
    """The object a `_target_` dotted path names, resolved as Hydra resolves it (attribute chains
    too: `vitlab.losses.SeesawLoss` and `vitlab.losses.classification.SeesawLoss` are one class);
    None when `target_refusal` refuses it, so nothing outside the allowed packages is imported."""
    if target_refusal(target, _extra_target_prefixes) is not None:
        return None
    return _locate(target)


def check_targets(node: Any, key: str) -> None:
    """Every `_target_` in the tree under `node` (nested nodes and lists too) must name an object
    a config may build (`target_refusal`); the error names the offending key path."""
    plain = _plain_tree(node)
    for path, target in _targets_in(plain, key):
        refusal = target_refusal(target, _extra_target_prefixes)
        if refusal:
            raise ConfigError(
                f"{path}._target_={target!r} {refusal}; allowed packages: "
                f"{list(allowed_target_prefixes())}. To allow your own package add it to "
                "extra_target_prefixes (e.g. extra_target_prefixes=[mylab.])"
            )


def check_config_targets(cfg: DictConfig) -> None:
    """Every `_target_` of a run's config, and Hydra's own callbacks, checked before any stage
    rather than when each node is first built (Hydra's launcher and sweeper nodes are Hydra's)."""
    from hydra.core.hydra_config import HydraConfig

    plain = _plain_tree(cfg)
    hydra_node = plain.pop("hydra", None) if isinstance(plain, dict) else None
    check_targets(plain, "")
    callbacks = (hydra_node or {}).get("callbacks")
    if callbacks is None and HydraConfig.initialized():
        callbacks = _plain_tree(HydraConfig.get().get("callbacks"))
    check_targets(callbacks, "hydra.callbacks")


def guard_hydra_callbacks() -> None:
    """Hydra builds `hydra.callbacks` itself, before the task function (and `prepare_run`)
    runs: wrap its `Callbacks` so their `_target_`s pass `check_targets` first; a refused one
    exits 2."""
    from hydra._internal import callbacks as hydra_callbacks

    original = hydra_callbacks.Callbacks.__init__
    if getattr(original, "vitlab_checked", False):
        return

    @functools.wraps(original)
    def checked_init(self: Any, config: DictConfig | None = None) -> None:
        if config is not None:
            try:
                set_extra_target_prefixes(OmegaConf.select(config, "extra_target_prefixes"))
                check_targets(OmegaConf.select(config, "hydra.callbacks"), "hydra.callbacks")
            except ConfigError as err:
                logging.getLogger("vitlab").error("ConfigError: %s", err)
                sys.exit(2)
        original(self, config)

    checked_init.vitlab_checked = True  # type: ignore[attr-defined]
    hydra_callbacks.Callbacks.__init__ = checked_init  # type: ignore[method-assign]


def _plain_tree(node: Any) -> Any:
    if isinstance(node, DictConfig | ListConfig):
        try:
            return OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
        except Exception:  # an interpolation that cannot resolve yet: check the raw strings
            return OmegaConf.to_container(node, resolve=False)
    return node


def _targets_in(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield path, node["_target_"]
        for name, child in node.items():
            yield from _targets_in(child, f"{path}.{name}" if path else str(name))
    elif isinstance(node, list | tuple):
        for index, child in enumerate(node):
            yield from _targets_in(child, f"{path}[{index}]")


def instantiate_node(node: Mapping[str, Any] | DictConfig, key: str, **kwargs: Any) -> Any:
    """Instantiate a config node whose `_target_`s (its own and every nested one) live in allowed
    packages; errors name `key`."""
    target = node.get("_target_") if node is not None else None
    if not target:
        raise ConfigError(f"{key}: missing _target_")
    check_targets(node, key)
    check_targets(list(kwargs.values()), f"{key}(arguments)")
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: {cause}") from err
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(f"{key}: {err}") from err


def fill_runtime(node: dict[str, Any], runtime: Mapping[str, Any], key: str) -> dict[str, Any]:
    """`node` with its `???` values set from `runtime` (values only known when the run starts,
    e.g. the trainer's step count or the run's monitored metric); any other `???` is an error
    naming `key`."""
    filled = dict(node)
    for name, value in node.items():
        if value == "???":
            if name not in runtime:
                raise ConfigError(f"{key}.{name} is not set (???)")
            filled[name] = runtime[name]
    return filled


def require_choice(cfg: DictConfig, key: str, allowed: Iterable[Any]) -> None:
    value = OmegaConf.select(cfg, key)
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {allowed}")


def require_positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}")


def require_positive_or_auto(cfg: DictConfig, *keys: str) -> None:
    """Batch sizes that may be `auto` (sized for the device when the run starts)."""
    require_positive(cfg, *(key for key in keys if OmegaConf.select(cfg, key) != "auto"))


SET_HINTS = {
    "dataset.root": "the dataset folder in its official layout (dataset.root=/path/to/data)",
    "backbone.name": "a timm model name (backbone.name=vit_base_patch14_dinov2.lvd142m)",
    "backbone.checkpoint_path": "the checkpoint file (backbone.checkpoint_path=/path/model.pth)",
    "groupvit.model.source": "the NVlabs release file (groupvit.model.source=/path/model.pth)",
}
"""What to set for the `???` keys of the shipped configs, named in `require_set`'s error."""


def require_set(cfg: DictConfig, *keys: str) -> None:
    """A ConfigError naming the first of `keys` that the config leaves `???` (mandatory, not
    set), and what to set, instead of OmegaConf's MissingMandatoryValue at first access. Keys
    absent from this composition (e.g. `backbone.checkpoint_path` of a hub backbone) pass."""
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if (
            isinstance(node, DictConfig)
            and leaf in node.keys()
            and OmegaConf.is_missing(node, leaf)
        ):
            hint = SET_HINTS.get(key, f"a value on the command line ({key}=...)")
            raise ConfigError(f"{key} is not set (??? in its config): set {hint}")


def added_top_level_keys(overrides: Iterable[str]) -> dict[str, str]:
    """The top-level keys that `+a.b=...` / `++a.b=...` overrides add to, each with its override
    (dotted keys only: `+group=option` selects a config group)."""
    added = {}
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if "." in key:
            added.setdefault(key.split(".", 1)[0], override)
    return added


def check_added_keys(cfg: DictConfig) -> None:
    """A `+key.sub=value` override whose top-level key exists nowhere else in the composition is
    a typo (`+optimzer.lr=0.1`): the run would go on with the key unread. Refused naming it and
    the closest known key. Compares with the same composition without the dotted `+`
    overrides; outside a Hydra app or sweep (nothing to recompose) it checks nothing."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not GlobalHydra.instance().is_initialized():
        return
    hydra_cfg = HydraConfig.get()
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    added = {k: o for k, o in added_top_level_keys(overrides).items() if k in cfg and k != "hydra"}
    if not added:
        return
    kept = [o for o in overrides if o not in added.values()]
    try:
        base = compose(hydra_cfg.job.config_name, overrides=kept)
    except Exception:  # cannot recompose here (e.g. an override needs the dropped one)
        return
    for key, override in added.items():
        if key not in base:
            close = difflib.get_close_matches(key, [str(k) for k in base], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{override}: {key!r} is not a key of this config{hint}; a `+` override adds a "
                "key that nothing reads"
            )
