"""The run's thread policy (`runtime.threads`) and what a summary records about the machine.

On a shared machine two torch threads can run slower than one (issue 16 measured 2.2-2.4x slower
at load 13-15 on 2 cores), so a run may ask for `auto`: the cores not busy when it starts."""

from __future__ import annotations

import os
from typing import Any

import torch

from vitlab.errors import ConfigError


def machine_load() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return None


def resolve_threads(
    setting: Any, cores: int | None = None, load_1min: float | None = None
) -> int | None:
    """`runtime.threads`: null -> None (torch's default: every core), N -> N, auto -> the cores
    not busy at start, max(1, cores - round(1-minute load average))."""
    if setting is None:
        return None
    if setting == "auto":
        cores = cores or os.cpu_count() or 1
        if load_1min is None:
            load = machine_load()
            load_1min = load[0] if load else 0.0
        return max(1, min(cores, cores - round(load_1min)))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(f"runtime.threads={setting!r} must be null, auto or a whole number >= 1")
    return setting


_threads: int | None = None  # what the run set (runtime.threads), for the decode pools


def apply_threads(threads: int | None) -> None:
    """torch's intra-op threads (the backbone forward, the head's matmuls), and the size of the
    image-decode pools (`decode_pool_size`)."""
    global _threads
    _threads = threads
    if threads is not None:
        torch.set_num_threads(threads)


def decode_pool_size(default: int = 2) -> int:
    """Threads that decode images beside the model: `default`, at most the run's thread count
    (`runtime.threads=1` on a busy machine: one decoding thread, not two)."""
    return default if _threads is None else max(1, min(default, _threads))


def local_spark_master(master: str, threads: int | None) -> str:
    """`local[*]` becomes `local[threads]` when the run sets a thread count."""
    return f"local[{threads}]" if threads is not None and master == "local[*]" else master


def runtime_record(setting: Any = None) -> dict[str, Any]:
    """What `summary.json` and the benchmarks record: the threads used and how busy it was."""
    load = machine_load()
    return {
        "threads_setting": setting,
        "torch_threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in load] if load else None,
    }
