"""Backbones behind one interface: timm models (by name, optional local training checkpoint) and
`transformers` DINOv2 models (hub id or local directory).

Every backbone maps normalised pixels to a token matrix (B, T, D) whose first
`num_prefix_tokens` tokens are CLS/register tokens; a timm model that has a classifier can also
be used directly as a classifier (`classify`), with its class index -> species id map.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.cache import directory_fingerprint, file_sha256
from vitlab.hub import hub_load_error, use_hub
from vitlab.safe_load import load_checkpoint_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def preprocess_batch(images: np.ndarray | torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """(N, H, W, 3) uint8 images of one size -> normalised (N, 3, S, S) float32 tensor, on the
    images' device (a GPU normalises its own copy of the uint8 batch: a quarter of the bytes
    cross the bus)."""
    uint8 = torch.as_tensor(images).permute(0, 3, 1, 2)
    mean = torch.tensor(spec.mean, device=uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=uint8.device).view(1, 3, 1, 1)
    if uint8.shape[-2:] != (spec.size, spec.size):
        pixels = uint8.float()
        pixels = F.interpolate(
            pixels.div_(255.0),
            size=(spec.size, spec.size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        ).clamp_(0, 1)
        return pixels.sub_(mean).div_(std)
    # (x / 255 - mean) / std as one fused multiply-add straight from uint8 into a contiguous
    # (N, 3, S, S) tensor: the embed stage's largest cost after the forward for a small model
    # (8.6% of its wall time as three passes); a channels-last input also slows the forward.
    out = torch.empty(uint8.shape, dtype=torch.float32, device=uint8.device)
    return torch.addcmul(-mean / std, uint8, 1.0 / (255.0 * std), out=out)


class Backbone(nn.Module, ABC):
    """Common interface; subclasses set the attributes below."""

    num_prefix_tokens: int
    embed_dim: int
    input_spec: InputSpec
    class_ids: list[int] | None = None  # species id of each classifier output, when known
    build_args: dict[str, Any] | None = None  # set by create_backbone

    @abstractmethod
    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, S, S) -> tokens (B, T, D)."""

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"backbone {type(self).__name__} has no classifier head")

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything that determines the weights, for cache keys."""


def _load_state_dict_file(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Weights from a timm training checkpoint (dict with `state_dict`), a `model` dict, or a
    bare state dict; DDP `module.` prefixes removed. Loaded with the allow-listed unpickler
    (timm's `args` Namespace passes); anything else needs `backbone.trust_checkpoint=true`."""
    checkpoint = load_checkpoint_file(path, trust=trust, opt_in="backbone.trust_checkpoint")
    state = checkpoint
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and key in checkpoint:
            state = checkpoint[key]
            break
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: no state dict found (keys: {list(checkpoint)[:10]})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_class_mapping(path: str | Path) -> list[int]:
    """`class_mapping.txt`: line i holds the species id of class index i."""
    lines = Path(path).read_text().split()
    try:
        return [int(x) for x in lines]
    except ValueError as err:
        raise ValueError(f"{path}: every line must be an integer species id ({err})") from err


class TimmBackbone(Backbone):
    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        class_mapping: str | None = None,
        num_classes: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        input_size: int | None = None,
        seed: int = 0,
        trust_checkpoint: bool = False,
    ):
        import timm

        super().__init__()
        self.name, self.pretrained, self.seed = name, pretrained, seed
        self.model_kwargs = dict(model_kwargs or {})
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        state = None
        if self.checkpoint_path is not None:
            if not self.checkpoint_path.is_file():
                raise FileNotFoundError(f"backbone.checkpoint_path not found: {checkpoint_path}")
            state = _load_state_dict_file(self.checkpoint_path, trust=trust_checkpoint)
        if num_classes is None:
            num_classes = self._classes_in(state) if state is not None else 0
        if pretrained:
            use_hub(name)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # random-init weights are reproducible, so cacheable
            try:
                self.model = timm.create_model(
                    name, pretrained=pretrained, num_classes=num_classes, **self.model_kwargs
                )
            except OSError as err:  # the pretrained weights could not be fetched
                raise hub_load_error(
                    name,
                    "backbone.name",
                    "backbone.pretrained=false backbone.checkpoint_path=<the weights file>",
                    err,
                ) from err
        if state is not None:
            try:
                missing, unexpected = self.model.load_state_dict(state, strict=False)
            except RuntimeError as err:  # shape mismatches
                raise ValueError(
                    f"{checkpoint_path} does not fit timm model {name} with "
                    f"model_kwargs={self.model_kwargs}: {err}"
                ) from err
            if missing or unexpected:
                raise ValueError(
                    f"{checkpoint_path} does not fit timm model {name}: missing "
                    f"{missing[:5]}, unexpected {unexpected[:5]}"
                )
        self.model.eval()
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.embed_dim = int(self.model.num_features)
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        self.input_spec = InputSpec(
            size=int(input_size or data_cfg["input_size"][-1]),
            mean=tuple(data_cfg["mean"]),
            std=tuple(data_cfg["std"]),
        )
        self.num_classes = num_classes
        if class_mapping is None and self.checkpoint_path is not None:
            beside = self.checkpoint_path.parent / "class_mapping.txt"
            class_mapping = str(beside) if beside.is_file() else None
        self.class_ids = read_class_mapping(class_mapping) if class_mapping else None
        if self.class_ids is not None and len(self.class_ids) != num_classes:
            raise ValueError(
                f"{class_mapping} lists {len(self.class_ids)} species but the "
                f"classifier has {num_classes} outputs"
            )

    def _classes_in(self, state: dict[str, torch.Tensor]) -> int:
        import timm

        classifier = timm.models.get_pretrained_cfg_value(self.name, "classifier") or "head"
        weight = state.get(f"{classifier}.weight")
        return int(weight.shape[0]) if weight is not None else 0

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(pixels)
        if feats.ndim == 4:  # CNN feature map (B, C, H, W) -> tokens (B, HW, C)
            feats = feats.flatten(2).transpose(1, 2)
        return feats

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.num_classes:
            raise ValueError(
                f"timm model {self.name} was built without a classifier "
                "(set backbone.checkpoint_path or backbone.num_classes)"
            )
        return self.model(pixels)

    def identity(self) -> dict[str, Any]:
        weights: Any = "random-init" if not self.pretrained else "timm-hub"
        if self.checkpoint_path is not None:
            weights = file_sha256(self.checkpoint_path)
        return {
            "kind": "timm",
            "name": self.name,
            "pretrained": self.pretrained,
            "weights": weights,
            "seed": self.seed,
            "model_kwargs": self.model_kwargs,
            "input": self.input_spec.__dict__,
        }


class HfDinov2Backbone(Backbone):
    """`transformers` DINOv2 (with or without registers): hub id or local directory."""

    def __init__(
        self,
        model_id: str,
        pretrained: bool = True,
        input_size: int = 224,
        config: dict[str, Any] | None = None,
        revision: str | None = None,
        seed: int = 0,
    ):
        from transformers import AutoConfig, AutoModel, Dinov2Config

        super().__init__()
        self.model_id, self.pretrained, self.revision, self.seed = (
            model_id,
            pretrained,
            revision,
            seed,
        )
        self.config_overrides = dict(config or {})
        if pretrained:
            use_hub(model_id)
            try:
                self.model = AutoModel.from_pretrained(
                    model_id, revision=revision, **self.config_overrides
                )
            except OSError as err:  # not found, no network, not in the cache
                raise hub_load_error(
                    model_id,
                    "backbone.model_id",
                    "backbone.model_id=<its folder> (`hf download "
                    f"{model_id} --local-dir <folder>`)",
                    err,
                ) from err
        else:
            if Path(model_id).is_dir():
                hf_config = AutoConfig.from_pretrained(model_id, **self.config_overrides)
            else:
                hf_config = Dinov2Config(**self.config_overrides)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.model = AutoModel.from_config(hf_config)
        self.model.eval()
        cfg = self.model.config
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.embed_dim = int(cfg.hidden_size)
        self.input_spec = InputSpec(size=int(input_size))

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state

    def identity(self) -> dict[str, Any]:
        if not self.pretrained:
            weights: Any = {"random-init": self.seed}
        elif Path(self.model_id).is_dir():
            weights = directory_fingerprint(self.model_id)
        else:
            weights = {"hub": self.model_id, "revision": self.revision or "main"}
        return {
            "kind": "hf",
            "model_id": self.model_id,
            "weights": weights,
            "config": self.config_overrides,
            "input": self.input_spec.__dict__,
        }


BACKBONE_KINDS = {"timm": TimmBackbone, "hf": HfDinov2Backbone}


def create_backbone(kind: str, **kwargs: Any) -> Backbone:
    """One entry point: `kind` is `timm` or `hf`, the rest goes to that backbone."""
    if kind not in BACKBONE_KINDS:
        raise ValueError(f"backbone.kind={kind!r} is not one of {sorted(BACKBONE_KINDS)}")
    backbone = BACKBONE_KINDS[kind](**kwargs)
    # how to build it again elsewhere (a Spark executor builds its own copy, never unpickles one)
    backbone.build_args = {"kind": kind, **kwargs}
    return backbone


_PROCESS_BACKBONES: dict[str, Backbone] = {}


def backbone_in_process(build_args: dict[str, Any]) -> Backbone:
    """The backbone for these arguments, built once per process and reused."""
    key = json.dumps(build_args, sort_keys=True, default=str)
    if key not in _PROCESS_BACKBONES:
        _PROCESS_BACKBONES[key] = create_backbone(**build_args)
    return _PROCESS_BACKBONES[key]
