"""Is the hardware a config asks for there, and where do the frozen forwards run? Checked before
any work, in every pipeline: `require_accelerator(cfg.get("trainer"))`;
`resolve_device("auto"|"cpu"|"cuda"|"cuda:1")` is the one rule for a plain torch device setting
(`runtime.device`, `segmentation.device`, `--device`); `compute_from_config(cfg)` turns
`runtime.device` and `embed.precision` into the `Compute` every torch stage outside a Lightning
Trainer runs on; `trainer_for_device` makes `trainer=auto` follow the same rule."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
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
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{text!r} but this machine has no MPS device; use auto or cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{text!r}: vitlab runs on cpu, cuda, cuda:N or mps")
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


# ----------------------------------------------------------------------------- frozen forwards

PRECISIONS = ("fp32", "bf16", "fp16")
"""`embed.precision`: autocast dtype of the frozen forwards (embed, tiles, backbone_classifier)."""
DECODERS = ("auto", "cpu", "device")
"""`embed.decode`: where the embed and tile loaders decode JPEGs; auto = on a CUDA device when
the run is on one (nvJPEG measured 4.5-12x the node's 16 CPU threads), else the CPU."""


@dataclass(frozen=True)
class Compute:
    """Where and how the frozen backbone forwards run (`runtime.device`, `embed.precision`).
    `devices` holds one torch device name per worker: several on a node with several GPUs
    (`runtime.device=auto`), the shards split between them."""

    devices: tuple[str, ...] = ("cpu",)
    precision: str = "fp32"
    decode: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {list(PRECISIONS)}")
        if self.decode not in DECODERS:
            raise ValueError(f"decode {self.decode!r} is not one of {list(DECODERS)}")
        if not self.devices:
            raise ValueError("Compute needs at least one device")

    @property
    def device(self) -> torch.device:
        """The first (or only) device: the one a single-device stage uses."""
        import torch

        return torch.device(self.devices[0])

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def decode_on_device(self) -> bool:
        """JPEGs decoded (and tiles cut) on the GPU by the loaders (`embed.decode`)."""
        return self.on_gpu and self.decode in ("auto", "device")

    def on(self, device: str) -> Compute:
        """The same settings on one device (a worker's share of a multi-device run)."""
        return replace(self, devices=(str(device),))

    def autocast(self) -> AbstractContextManager:
        """Autocast to the precision's dtype on this device type (no-op for fp32). Autocast is
        per thread: enter it in the thread that runs the forward."""
        import torch

        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def cache_params(self) -> dict[str, str]:
        """What enters the embedding and tile cache keys: the precision, not the device (CPU
        and GPU fp32 embeddings agree within the tolerance the README states). fp32 adds
        nothing, so caches written before precision existed still hit."""
        return {} if self.precision == "fp32" else {"precision": self.precision}

    def record(self) -> dict[str, Any]:
        """`summary.json` -> runtime: the devices actually used (with the GPU's name)."""
        import torch

        names = []
        for name in self.devices:
            device = torch.device(name)
            if device.type == "cuda":
                names.append(torch.cuda.get_device_name(device))
        return {
            "device": list(self.devices) if len(self.devices) > 1 else self.devices[0],
            "gpu": names or None,
            "embed_precision": self.precision,
            "decode": "device" if self.decode_on_device else "cpu",
        }


CPU = Compute()


def resolve_devices(name: str | None = "auto") -> tuple[str, ...]:
    """`runtime.device`: `auto` is every CUDA device torch sees (none: `cpu`); `cuda` is the
    current one; `cuda:N` that one; `cpu`. ValueError as `resolve_device`."""
    import torch

    text = "auto" if name is None else str(name).strip().lower()
    if text in ("auto", "") and torch.cuda.is_available():
        return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    device = resolve_device(text)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return (str(device),)


def compute_from_config(cfg: Mapping[str, Any]) -> Compute:
    """`runtime.device` and `embed.precision` of a run config (either may be absent: auto,
    fp32). ConfigError naming the key, before any stage."""
    runtime = cfg.get("runtime") or {}
    embed = cfg.get("embed") or {}
    setting = runtime.get("device", "auto")
    try:
        devices = resolve_devices(setting)
    except ValueError as err:
        raise ConfigError(f"runtime.device={setting!r}: {err}") from err
    precision = embed.get("precision", "fp32") or "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"embed.precision={precision!r} is not one of {list(PRECISIONS)}")
    decode = embed.get("decode", "auto") or "auto"
    if decode not in DECODERS:
        raise ConfigError(f"embed.decode={decode!r} is not one of {list(DECODERS)}")
    if decode == "device" and not devices[0].startswith("cuda"):
        raise ConfigError(
            f"embed.decode=device needs a CUDA device (runtime.device gives {devices[0]}): "
            "use auto or cpu"
        )
    return Compute(devices, str(precision), str(decode))


def trainer_for_device(trainer: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """`trainer=auto` (accelerator `auto`) follows `runtime.device`: the CPU, or that one GPU.
    `deterministic: true` becomes `warn` on a GPU (some CUDA kernels have no deterministic
    version; Lightning would stop at the first). Any other trainer is returned unchanged."""
    out = dict(trainer)
    if str(out.get("accelerator", "")).lower() != "auto":
        return out
    if device.type == "cuda":
        out["accelerator"] = "gpu"
        out["devices"] = [device.index or 0]
        if out.get("deterministic") is True:
            out["deterministic"] = "warn"
    else:
        out["accelerator"] = device.type
        out["devices"] = 1
    return out
