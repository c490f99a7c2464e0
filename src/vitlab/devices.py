"""Is the hardware a config asks for there? Checked before any work, in every pipeline:
`require_accelerator(cfg.get("trainer"))`; `resolve_device("auto"|"cpu"|"cuda"|"cuda:1")` is
the one rule for a plain torch device setting (`segmentation.device`, `--device`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vitlab.errors import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")

if TYPE_CHECKING:
    import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """The torch device a setting names: `auto` (or empty) is `cuda` when torch sees a CUDA
    device, else `cpu`; anything else as torch spells it (`cpu`, `cuda`, `cuda:1`, `mps`).

    ValueError (the caller names its key or flag) for a name torch does not parse and for a
    CUDA device this machine does not have, before a model is moved there."""
    import torch

    text = "auto" if name is None else str(name).strip()
    if text.lower() in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(
            f"{text!r} is not a torch device (auto, cpu, cuda, cuda:N, mps): {err}"
        ) from err
    if device.type == "cuda":
        available, why = _visible_cuda()
        if available == 0:
            raise ValueError(f"{text!r} but there is no CUDA device: {why}; use auto or cpu")
        if device.index is not None and device.index >= available:
            raise ValueError(f"{text!r} but only {available} CUDA device(s) are visible")
    return device


def _visible_cuda() -> tuple[int, str]:
    """(CUDA devices torch sees, why there are none)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), ""
    return 0, _why_no_gpu()


def _visible_gpus() -> tuple[int, str]:
    """(CUDA devices torch sees, a short description of why there are none)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), ""
    if torch.backends.mps.is_available():
        return 1, ""  # Lightning's `gpu` is MPS on Apple silicon (one device)
    return 0, _why_no_gpu()


def _why_no_gpu() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    return "torch.cuda.is_available() is False (no driver or no device visible)"


def _requested_devices(devices: Any) -> int | None:
    """How many devices `trainer.devices` asks for; None when Lightning decides (auto, -1)."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, list | tuple):
        return max((int(d) for d in devices), default=-1) + 1  # device indices
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return max(int(d) for d in devices.split(",") if d.strip()) + 1
    return None


def require_accelerator(trainer: Mapping[str, Any] | None, key: str = "trainer") -> None:
    """A Trainer config asking for GPUs (`accelerator: gpu|cuda`, `devices: N`) on a machine
    that has none, or fewer than N, fails with a ConfigError naming the key, before any work
    (Lightning would only notice when the Trainer is built, after prepare and embed)."""
    if not trainer:
        return
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator not in GPU_ACCELERATORS:
        return
    available, why = _visible_gpus()
    if available == 0:
        raise ConfigError(
            f"{key}.accelerator={accelerator} but there is no GPU: {why}. Use trainer=cpu, "
            "or run on a GPU node"
        )
    try:
        wanted = _requested_devices(trainer.get("devices"))
    except ValueError:
        return  # a form Lightning parses itself (and rejects with its own message)
    if wanted is not None and wanted > available:
        raise ConfigError(
            f"{key}.devices={trainer.get('devices')} asks for {wanted} GPU(s) but {available} "
            f"visible; set {key}.devices={available} or fewer"
        )
