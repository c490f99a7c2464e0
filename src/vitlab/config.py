"""Config helpers: every `instantiate` goes through `instantiate_node` (one place to add Hydra
1.4's target whitelist), and validation that fails before any work, naming the key."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

ALLOWED_TARGET_PREFIXES = ("vitlab.", "torch.nn.", "torch.optim.", "pytorch_lightning.")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


def to_container(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def instantiate_node(node: Mapping[str, Any] | DictConfig, key: str, **kwargs: Any) -> Any:
    """Instantiate a config node whose `_target_` lives in an allowed package; errors name `key`."""
    target = node.get("_target_") if node is not None else None
    if not target:
        raise ConfigError(f"{key}: missing _target_")
    if not str(target).startswith(ALLOWED_TARGET_PREFIXES):
        raise ConfigError(
            f"{key}._target_={target!r} is outside the allowed packages "
            f"{list(ALLOWED_TARGET_PREFIXES)}"
        )
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: {cause}") from err
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(f"{key}: {err}") from err


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


def accepted_kwargs(target: str, **candidates: Any) -> dict[str, Any]:
    """The subset of `candidates` that the `_target_` callable accepts (runtime values such as
    num_classes or class counts that only some heads/losses take)."""
    from hydra.utils import get_method

    try:
        params = inspect.signature(get_method(target)).parameters
    except (ValueError, TypeError, ImportError) as err:
        raise ConfigError(f"cannot inspect {target}: {err}") from err
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return candidates
    return {k: v for k, v in candidates.items() if k in params}
