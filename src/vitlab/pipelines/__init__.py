"""The pipelines behind train.py, infer.py and sweep.py, by name.

    plantclef     train + infer   DINOv2 embeddings, linear head, grid-of-tiles inference
    fungiclef     train           embeddings + metadata, fold heads, ensemble, official tracks
    groupvit      train           GroupViT fine-tuning on captions
    segmentation  infer           GroupViT zero-shot segmentation, mIoU

Each module (plantclef: a package, with its own stages) defines `PIPELINE` (a
`base.Pipeline`); they are imported on first use, so `python train.py` for one pipeline does
not import the others' dependencies.
"""

from __future__ import annotations

import importlib

from vitlab.errors import ConfigError
from vitlab.pipelines.base import Pipeline

PIPELINES: dict[str, str] = {
    "plantclef": "vitlab.pipelines.plantclef",
    "fungiclef": "vitlab.pipelines.fungiclef",
    "groupvit": "vitlab.pipelines.groupvit",
    "segmentation": "vitlab.pipelines.segmentation",
}
ACTIONS = ("train", "infer")


def get_pipeline(name: str | None, action: str) -> Pipeline:
    """The pipeline `name` if it can `action` (train|infer); a ConfigError listing the choices
    otherwise."""
    able = [n for n in PIPELINES if getattr(load(n), action) is not None]
    if name not in able:
        raise ConfigError(f"pipeline={name!r} cannot {action}: choose one of {able}")
    return load(name)


def load(name: str) -> Pipeline:
    return importlib.import_module(PIPELINES[name]).PIPELINE


__all__ = ["ACTIONS", "PIPELINES", "get_pipeline", "load"]
