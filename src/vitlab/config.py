"""Config helpers: every `instantiate` goes through `instantiate_node` (one place to add Hydra
1.4's target whitelist), and validation that fails before any work, naming the key."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from vitlab.errors import ConfigError

__all__ = ["ConfigError"]  # re-exported: `from vitlab.config import ConfigError` keeps working

ALLOWED_TARGET_PREFIXES = ("vitlab.", "torch.nn.", "torch.optim.", "pytorch_lightning.")
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


def check_targets(node: Any, key: str) -> None:
    """Every `_target_` in the tree under `node` (nested nodes and lists too) must be in an
    allowed package; the error names the offending key path."""
    plain = _plain_tree(node)
    allowed = allowed_target_prefixes()
    for path, target in _targets_in(plain, key):
        if not str(target).startswith(allowed):
            raise ConfigError(
                f"{path}._target_={target!r} is outside the allowed packages {list(allowed)}; "
                "to allow your own package add it to extra_target_prefixes (e.g. "
                "extra_target_prefixes=[mylab.])"
            )


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
            yield from _targets_in(child, f"{path}.{name}")
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
