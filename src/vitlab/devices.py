"""Is the hardware a config asks for there? Checked before any work, in every pipeline:
`require_accelerator(cfg.get("trainer"))`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vitlab.errors import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")


def _visible_gpus() -> tuple[int, str]:
    """(CUDA devices torch sees, a short description of why there are none)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), ""
    if torch.backends.mps.is_available():
        return 1, ""  # Lightning's `gpu` is MPS on Apple silicon (one device)
    why = (
        f"this torch {torch.__version__} is a CPU-only build"
        if torch.version.cuda is None
        else "torch.cuda.is_available() is False (no driver or no device visible)"
    )
    return 0, why


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
