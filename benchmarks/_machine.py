"""Noise indicators shared by the benchmarks: how busy the machine was while a figure was taken.

Not a benchmark itself. `CpuMeter` reads /proc (Linux) to tell how much of the machine's CPU time
went to *other* processes during a measurement; elsewhere it reports nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
QUIET_THRESHOLD = 0.05  # others' share of the machine's CPU regarded as quiet
_quiet_wait = 0.0  # seconds timed_with_noise waits (at most) for a quiet machine; set_quiet_wait


def set_quiet_wait(seconds: float) -> None:
    global _quiet_wait
    _quiet_wait = max(0.0, seconds)


@dataclass(frozen=True)
class CpuSample:
    total: int  # all CPU time of the machine, in clock ticks
    busy: int  # non-idle CPU time of the machine
    own: int  # CPU time of this process (all threads)


def cpu_sample() -> CpuSample | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        own_fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user..steal; guest time is already counted in user
    own = int(own_fields[11]) + int(own_fields[12])  # utime + stime
    return CpuSample(total, total - idle, own)


def others_share(before: CpuSample | None, after: CpuSample | None) -> float | None:
    """Fraction of the machine's CPU time used by other processes between two samples."""
    if before is None or after is None or after.total <= before.total:
        return None
    other = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, other / (after.total - before.total))


def wait_for_quiet(max_seconds: float, window: float = 1.0) -> bool:
    """Wait (at most max_seconds) until other processes use < QUIET_THRESHOLD of the machine's
    CPU over a `window`-second interval, this process being idle. True when it got quiet."""
    deadline = time.monotonic() + max_seconds
    while True:
        before = cpu_sample()
        time.sleep(window)
        share = others_share(before, cpu_sample())
        if share is None or share < QUIET_THRESHOLD:
            return True
        if time.monotonic() >= deadline:
            return False


def timed_with_noise(fn: Callable[[], T]) -> tuple[T, float, float | None]:
    """(result, seconds, share of the machine's CPU used by other processes meanwhile); first
    waits up to set_quiet_wait() seconds for the machine to be quiet."""
    if _quiet_wait > 0:
        wait_for_quiet(_quiet_wait)
    before = cpu_sample()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, others_share(before, cpu_sample())


def is_quiet(share: float | None) -> bool:
    """Whether a run's others' CPU share is low enough for a clean figure (unknown: yes)."""
    return share is None or share < QUIET_THRESHOLD


def format_share(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def report_load(when: str) -> None:
    """Other processes on the machine skew the figures: show the 1-minute load average."""
    import torch

    load = os.getloadavg()[0]
    note = "" if load < 0.5 else " (machine busy: expect noisy figures)"
    print(
        f"load average at {when}: {load:.2f} on {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads{note}",
        flush=True,
    )
