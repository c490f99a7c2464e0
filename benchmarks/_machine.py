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
from typing import Any, TypeVar

T = TypeVar("T")
QUIET_THRESHOLD = 0.05  # others' share of the machine's CPU regarded as quiet
_quiet_wait = 0.0  # seconds timed_with_noise waits (at most) for a quiet machine; set_quiet_wait


def add_noise_arguments(parser: Any, quiet_wait: float = 30.0, timed: str = "run") -> None:
    """The arguments every paired benchmark shares: `--seed` and `--quiet-wait`."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=quiet_wait,
        help=f"before each timed {timed}, wait up to this many seconds for other processes to "
        "leave the CPUs idle (0: do not wait)",
    )


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


@dataclass(frozen=True)
class PairedRatio:
    """Ratio a/b of two alternately measured rates: the median of the per-pair ratios with its
    spread (min-max and interquartile), the number of pairs, and the load average over them."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    pairs: int
    load: tuple[float, float]  # 1-minute load average at the first and the last pair

    def __str__(self) -> str:
        return (
            f"{self.median:.3f} [IQR {self.q1:.3f}-{self.q3:.3f}, range {self.low:.3f}-"
            f"{self.high:.3f}, {self.pairs} pairs, load {self.load[0]:.2f}->{self.load[1]:.2f}]"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "median": self.median,
            "range": [self.low, self.high],
            "iqr": [self.q1, self.q3],
            "pairs": self.pairs,
            "load": list(self.load),
        }


def paired_ratio(a: Callable[[], float], b: Callable[[], float], pairs: int) -> PairedRatio:
    """Run `a` and `b` alternately `pairs` times (order swapped every pair, so neither side
    always runs first) and return the per-pair ratios' median a/b. Each callable returns a rate
    (items per second): a pair shares the machine's load, so its ratio cancels most of the noise
    a shared machine adds; the median, not the best, because best-of-N favours the side whose
    best moment was luckier."""
    import statistics

    ratios = []
    load_start = os.getloadavg()[0]
    for i in range(pairs):
        if i % 2:
            rate_b, rate_a = b(), a()
        else:
            rate_a, rate_b = a(), b()
        ratios.append(rate_a / rate_b)
    ratios.sort()
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return PairedRatio(
        statistics.median(ratios),
        ratios[0],
        ratios[-1],
        quartiles[0],
        quartiles[2],
        len(ratios),
        (load_start, os.getloadavg()[0]),
    )
