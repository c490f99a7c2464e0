"""Loading checkpoint files without running code from them.

`torch.load(weights_only=True)` unpickles tensors and plain containers only. The release formats
users bring hold a few more objects, which are allow-listed here and nothing else:
- timm / PlantNet training checkpoints (`model_best.pth.tar`): `args` is an argparse.Namespace,
  metrics may be numpy scalars;
- NVlabs GroupViT `.pth`: `config` is an omegaconf DictConfig (optimizer/scheduler states and
  metrics are plain containers).
Any other object in a file fails with an error that names it and the key that opts in to a full
unpickle (which runs whatever code the file contains: only for files one trusts).
"""

from __future__ import annotations

import argparse
import collections
import logging
import pickle
import re
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitlab.errors import ConfigError

log = logging.getLogger(__name__)


class UnsafeCheckpointError(ConfigError):
    """A checkpoint holds objects outside the allow-list; loading it would run its code."""


def _allowed_globals() -> list[Any]:
    from omegaconf import base, dictconfig, listconfig, nodes

    omegaconf_types = [
        dictconfig.DictConfig,
        listconfig.ListConfig,
        base.ContainerMetadata,
        base.Metadata,
        nodes.AnyNode,
        nodes.StringNode,
        nodes.IntegerNode,
        nodes.FloatNode,
        nodes.BooleanNode,
        nodes.BytesNode,
        nodes.PathNode,
    ]
    numpy_types = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32))]
    numpy_types += [type(np.dtype(np.int64)), type(np.dtype(np.int32)), type(np.dtype(np.bool_))]
    scalar = getattr(np, "_core", np.core).multiarray.scalar
    builtins_types = [dict, list, tuple, set, int, float, str, bool]
    return [
        argparse.Namespace,
        collections.defaultdict,  # omegaconf's (empty) resolver cache
        collections.OrderedDict,
        typing.Any,
        scalar,
        *numpy_types,
        *omegaconf_types,
        *builtins_types,
    ]


@contextmanager
def allowlisted_globals() -> Iterator[None]:
    """Within this block `torch.load(weights_only=True)` also accepts the allow-listed types."""
    with torch.serialization.safe_globals(_allowed_globals()):
        yield


def unsafe_global_in(err: BaseException) -> str | None:
    """The `module.name` torch's weights-only unpickler refused, when its message says."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else None


def load_checkpoint_file(path: str | Path, *, trust: bool = False, opt_in: str) -> Any:
    """`torch.load` a file with the allow-listed unpickler; with `trust`, fall back to a full
    unpickle (logged). Without it, objects outside the allow-list raise UnsafeCheckpointError
    naming the object and `opt_in`, the config key or flag that sets `trust`."""
    try:
        with allowlisted_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = unsafe_global_in(err) or "an object outside the allow-list"
        if not trust:
            how = f"pass {opt_in}" if opt_in.startswith("--") else f"set {opt_in}=true"
            raise UnsafeCheckpointError(
                f"{path} holds {culprit}, which the safe loader does not accept: unpickling it "
                f"could run code from the file. If you trust where the file comes from, {how} "
                "to load it with a full unpickle."
            ) from err
        log.warning("%s holds %s: loading it with a full unpickle (%s=true)", path, culprit, opt_in)
        return torch.load(path, map_location="cpu", weights_only=False)


@contextmanager
def vitlab_checkpoint(what: str) -> Iterator[None]:
    """Unpickle only the allow-list inside; anything else is refused naming `what`."""
    try:
        with allowlisted_globals():
            yield
    except pickle.UnpicklingError as err:
        culprit = unsafe_global_in(err) or "an object outside the allow-list"
        raise UnsafeCheckpointError(
            f"{what} holds {culprit}: not a checkpoint vitlab wrote, and unpickling it could "
            "run code from the file; refused"
        ) from err


def distrusted(tree: Any, trust: bool = False) -> Any:
    """A config read from a checkpoint with every `trust_*` key set to `trust` (the current run's
    own choice): a crafted file must not opt itself in to a full unpickle of another file."""
    if isinstance(tree, dict):
        return {
            k: trust if str(k).startswith("trust") else distrusted(v, trust)
            for k, v in tree.items()
        }
    if isinstance(tree, list | tuple):
        return [distrusted(v, trust) for v in tree]
    return tree


def load_lightning_module(module_type: type, path: str | Path) -> Any:
    """A vitlab LightningModule from its checkpoint, loaded with the allow-listed unpickler."""
    with vitlab_checkpoint(str(path)):
        return module_type.load_from_checkpoint(path, map_location="cpu", weights_only=True)


def fit_resumable(
    trainer: Any, module: Any, train_loader: Any, val_loader: Any, ckpt_path: str | None
) -> None:
    """`trainer.fit`, resuming (model, optimiser, epoch, callbacks) from `ckpt_path` when set,
    read with the allow-listed unpickler like every checkpoint vitlab loads."""
    if not ckpt_path:
        trainer.fit(module, train_loader, val_loader)
        return
    with vitlab_checkpoint(f"ckpt_path={ckpt_path}"):
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    require_same_model(module, checkpoint, f"ckpt_path={ckpt_path}")
    with vitlab_checkpoint(f"ckpt_path={ckpt_path}"):
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path, weights_only=True)


def require_same_model(module: Any, checkpoint: dict[str, Any], what: str) -> None:
    """A training checkpoint resumes only the model it was written for: the same parameter
    names and shapes, and the same class list (a checkpoint of another dataset with as many
    classes would load, train on, and score every prediction against the wrong classes)."""
    state = checkpoint.get("state_dict") or {}
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(getattr(t, "shape", ())) for name, t in state.items()}
    problems = [f"missing {n}" for n in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {n}" for n in sorted(found.keys() - expected.keys())]
    problems += [
        f"{n} has shape {list(found[n])}, this run's model {list(expected[n])}"
        for n in sorted(expected.keys() & found.keys())
        if found[n] != expected[n]
    ]
    if problems:
        shown = "; ".join(problems[:4]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 4 else ""
        )
        raise ConfigError(
            f"{what} was written for another model than this run's: {shown}. Resume with the "
            "settings of the run that wrote it (its .hydra/config.yaml)"
        )
    ours = dict(getattr(module, "hparams", {}) or {}).get("species_ids")
    theirs = (checkpoint.get("hyper_parameters") or {}).get("species_ids")
    if ours is not None and theirs is not None and list(ours) != list(theirs):
        raise ConfigError(
            f"{what} was trained on other classes ({len(theirs)} species, "
            f"{len(set(theirs) - set(ours))} not in this run's {len(ours)}): resume it on the "
            "dataset it was trained on"
        )
