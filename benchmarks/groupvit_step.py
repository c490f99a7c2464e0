"""GroupViT training step on CPU: our `GroupViT` vs `transformers.GroupViTModel`, same weights.

Both models hold the same weights: `GroupViTModel(GroupViTConfig())` is built under a fixed seed
and copied into ours with `load_hf_state_dict` (spec from `spec_from_hf_config`, so no drop-path,
as in `transformers`); before timing, the script checks that both give the same logits in eval
mode. A training step is forward + loss + backward in train mode, fp32 (Gumbel hard assignment,
BatchNorm batch statistics; no optimizer update), on one fixed batch: images [B, 3, 224, 224]
and CLIP token ids [B, 77] (SOT 49406 first, random ids, EOT 49407 at a random length, zero
padding). The loss is CLIP's symmetric image-text cross-entropy on the normalised projected
embeddings: `return_loss=True` for `transformers`, the same CE over `model(pixels, tokens)`
logits for ours. Gradients are set to None before each step, so allocating them is part of it.

Measured, in one process:
1. step time of ours and of `transformers`, after a warm-up, interleaved: pairs of steps, the
   order alternating (ours, hf, hf, ours, ...) so that drift and other processes' load hit both
   sides alike. Each step records the share of the machine's CPU other processes used meanwhile
   (/proc, via benchmarks/_machine.py); a pair is quiet when it is below 5% for both steps.
   Before each pair the script waits (up to --quiet-wait s) for the machine to be idle, and it
   runs pairs until --repeats quiet pairs or --budget seconds (on a 2-core machine a busy
   neighbour makes a step several times slower: such steps say nothing about either model).
   Headline figures use the quiet pairs when there are >= 3 of them, else all pairs (flagged):
   median and min of each side, ratio ours/HF of the medians (target <= 1.1), of the mins, and
   the median of the per-pair ratios. All raw step times are in the JSON line.
2. peak memory of one training step. Primary figure: the peak of tensor memory held by the step
   above what was held before it (weights, optimizer-free), from `torch.profiler` with
   profile_memory=True: every CPU allocation and free of the step, in time order, summed; the
   running maximum is the peak. It counts the new gradients, the activations saved for backward
   and the temporaries, is deterministic (immune to other processes' load) and does not depend
   on the malloc implementation. Cross-check: each model's step in a fresh subprocess, glibc's
   mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_, so freed tensors leave the resident
   set instead of lingering in malloc arenas), one warm-up step, then the kernel's peak-RSS
   counter reset (`/proc/self/clear_refs` <- 5) and peak RSS (VmHWM) minus RSS before the step.
   (`ru_maxrss` cannot be reset, so its delta would be hidden by the peak of building the
   models.) Both should agree within a few MiB; RSS also counts allocator and library overhead.
3. our step time at 384 px vs 224 px (same batch size; position embeddings interpolated bicubic
   in every forward, as our model does for any input size), interleaved and selected the same
   way (--res-repeats, --res-budget). Its peak memory by the profiler, too.

If ours misses the target on quiet pairs (or with --profile always), --profile-rounds steps of
each are profiled with `torch.profiler`: per-op self CPU time of both (median over the rounds),
the ops where they differ most, and the forward time of the top-level components.

Default run: about 3 minutes on 2 idle cores. On a busy machine every step is several times
slower; the budgets bound the timed pairs, not the warm-up, memory and profile steps.

Prints a table and one JSON line (prefix `JSON `) with all figures.

Run (from the repo root):
    PYTHONPATH=src python benchmarks/groupvit_step.py
    PYTHONPATH=src python benchmarks/groupvit_step.py --quick
    PYTHONPATH=src python benchmarks/groupvit_step.py --batch 16 --repeats 8 --profile always
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from _machine import (
    add_noise_arguments,
    format_share,
    is_quiet,
    report_load,
    timed_with_noise,
    wait_for_quiet,
)
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import GroupViTConfig, GroupViTModel

from vitlab.models.groupvit.checkpoints import load_hf_state_dict, spec_from_hf_config
from vitlab.models.groupvit.model import GroupViT

TARGET_RATIO = 1.1  # ours / transformers step time
MIN_QUIET_PAIRS = 3  # headline figures use the quiet pairs when there are this many (or all wanted)
SOT, EOT = 49406, 49407  # CLIP start- and end-of-text ids (EOT is the largest id)
CONTEXT = 77
MiB = 2**20
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- setup


def build_models(seed: int) -> tuple[GroupViT, GroupViTModel]:
    """`transformers` GroupViT with seeded random weights, and ours holding the same weights."""
    torch.manual_seed(seed)
    hf = GroupViTModel(GroupViTConfig())
    ours = GroupViT(spec_from_hf_config(hf.config))
    load_hf_state_dict(ours, hf.state_dict(), origin="GroupViTModel(GroupViTConfig())")
    return ours.train(), hf.train()


def make_batch(batch: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random images [B, 3, size, size] and CLIP-style token ids [B, 77]."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    tokens = torch.zeros(batch, CONTEXT, dtype=torch.long)
    for i in range(batch):
        eot = int(torch.randint(4, CONTEXT, (1,), generator=generator))
        tokens[i, 0] = SOT
        tokens[i, 1:eot] = torch.randint(1, SOT, (eot - 1,), generator=generator)
        tokens[i, eot] = EOT
    return pixels, tokens


def clip_loss(logits_per_image: Tensor) -> Tensor:
    """Symmetric image-text cross-entropy (what `transformers` computes with return_loss)."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (
        F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.t(), target)
    ) / 2


def ours_loss(model: GroupViT, pixels: Tensor, tokens: Tensor) -> Tensor:
    return clip_loss(model(pixels, tokens)["logits_per_image"])


def hf_loss(model: GroupViTModel, pixels: Tensor, tokens: Tensor) -> Tensor:
    return model(input_ids=tokens, pixel_values=pixels, return_loss=True).loss


@dataclass
class TrainingStep:
    """forward + loss + backward of `model` on one batch. `prepare` sets the gradients to None
    (outside the timed part), `run` is the step itself; calling does both."""

    model: nn.Module
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor]
    pixels: Tensor
    tokens: Tensor

    def prepare(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def run(self) -> None:
        self.loss_fn(self.model, self.pixels, self.tokens).backward()

    def __call__(self) -> None:
        self.prepare()
        self.run()


def same_function_check(ours: GroupViT, hf: GroupViTModel, pixels: Tensor, tokens: Tensor):
    """Max |logits ours - logits HF| in eval mode (no Gumbel noise) on the first 2 samples."""
    ours.eval()
    hf.eval()
    with torch.no_grad():
        a = ours(pixels[:2], tokens[:2])["logits_per_image"]
        b = hf(input_ids=tokens[:2], pixel_values=pixels[:2]).logits_per_image
    ours.train()
    hf.train()
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- timing


@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)
    others: list[float | None] = field(default_factory=list)  # others' CPU share per step

    def add(self, seconds: float, others: float | None) -> None:
        self.seconds.append(seconds)
        self.others.append(others)

    def select(self, mask: list[bool]) -> Timings:
        keep = [i for i, m in enumerate(mask) if m]
        return Timings([self.seconds[i] for i in keep], [self.others[i] for i in keep])

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median_others(self) -> float | None:
        known = [x for x in self.others if x is not None]
        return statistics.median(known) if known else None


@dataclass
class Pairs:
    """Interleaved steps of two settings a and b; pair i = the i-th step of each (adjacent)."""

    a: Timings
    b: Timings
    min_quiet: int = MIN_QUIET_PAIRS

    @property
    def quiet(self) -> list[bool]:
        """Pairs during which other processes left the machine quiet for both steps."""
        return [is_quiet(x) and is_quiet(y) for x, y in zip(self.a.others, self.b.others)]

    @property
    def use_quiet(self) -> bool:
        return sum(self.quiet) >= self.min_quiet

    def headline(self) -> tuple[Timings, Timings]:
        """The quiet pairs when there are enough of them, else all pairs."""
        if self.use_quiet:
            return self.a.select(self.quiet), self.b.select(self.quiet)
        return self.a, self.b

    @property
    def basis(self) -> str:
        n, quiet = len(self.a.seconds), sum(self.quiet)
        if self.use_quiet:
            return f"{quiet} quiet pairs of {n}"
        return f"all {n} pairs (only {quiet} quiet: noisy figures)"

    def ratios(self) -> dict[str, float]:
        a, b = self.headline()
        paired = [x / y for x, y in zip(a.seconds, b.seconds)]
        return {
            "median": a.median / b.median,
            "min": a.best / b.best,
            "paired_median": statistics.median(paired),
        }


def timed(step: TrainingStep) -> tuple[float, float | None]:
    step.prepare()
    _, seconds, others = timed_with_noise(step.run)
    return seconds, others


def interleaved(
    label: str,
    a: tuple[str, TrainingStep],
    b: tuple[str, TrainingStep],
    want_quiet: int,
    budget: float,
    quiet_wait: float,
) -> Pairs:
    """Pairs of one step of each setting, the order alternating (a b, b a, a b, ...), until
    `want_quiet` pairs ran on a quiet machine or `budget` seconds are spent (one pair at least).
    Before each pair, waits up to `quiet_wait` s for other processes to leave the CPUs idle."""
    out = Pairs(Timings(), Timings(), min(MIN_QUIET_PAIRS, want_quiet))
    start, r = time.monotonic(), 0
    while r == 0 or (sum(out.quiet) < want_quiet and time.monotonic() - start < budget):
        if quiet_wait > 0:
            wait_for_quiet(quiet_wait)
        line = []
        for (name, step), timings in ((a, out.a), (b, out.b))[:: 1 if r % 2 == 0 else -1]:
            seconds, others = timed(step)
            timings.add(seconds, others)
            line.append(f"{name} {seconds:.3f}s (others {format_share(others)})")
        r += 1
        state = "quiet" if out.quiet[-1] else "noisy"
        print(
            f"[{label}] pair {r} ({state}; {sum(out.quiet)}/{want_quiet} quiet): "
            + ", ".join(line),
            flush=True,
        )
    return out


# ----------------------------------------------------------------------------- memory


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Kineto prints start/stop lines (and a GPU probe error) on fd 2; hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profiler_peak_bytes(step: TrainingStep) -> int | None:
    """Peak of CPU tensor memory the step holds above what was held before it: running sum of
    the profiler's allocation (+) and free (-) records, in time order."""
    step.prepare()
    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        step.run()
    try:
        events = [e for e in p.profiler.kineto_results.events() if e.name() == "[memory]"]
        events = [e for e in events if str(e.device_type()).endswith("CPU")]
    except AttributeError:  # private API changed
        return None
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def _status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def rss_probe(which: str, batch: int, size: int, seed: int) -> dict:
    """Child side of the RSS cross-check: peak RSS of one step above RSS before it."""
    ours, hf = build_models(seed)
    pixels, tokens = make_batch(batch, size, seed + 1)
    model, loss_fn = (ours, ours_loss) if which == "ours" else (hf, hf_loss)
    del ours, hf
    step = TrainingStep(model, loss_fn, pixels, tokens)
    step()  # warm-up: one-time allocations (thread pools, oneDNN) are not the step's
    step.prepare()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError as error:
        return {"error": f"cannot reset the peak RSS counter: {error}"}
    before = _status_bytes("VmRSS")
    step.run()
    return {"before": before, "peak": _status_bytes("VmHWM")}


def rss_peak_subprocess(which: str, batch: int, size: int, seed: int) -> dict:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    cmd = [sys.executable, __file__, "--rss-probe", which, "--batch", str(batch)]
    cmd += ["--seed", str(seed), "--probe-size", str(size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"probe failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}"}
    return json.loads(lines[-1][len("PROBE ") :])


# ----------------------------------------------------------------------------- profile


def component_labels(model: nn.Module, components: dict[str, nn.Module]) -> list:
    """Forward hooks that open a `record_function` range around each component's forward."""
    handles = []
    for label, module in components.items():
        ranges: list = []

        def pre(_m, _args, label=label, ranges=ranges):
            ranges.append(record_function(f"fwd: {label}"))
            ranges[-1].__enter__()

        def post(_m, _args, _out, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def profile_steps(steps: dict[str, TrainingStep], rounds: int, components: dict) -> dict:
    """Per op (and per labelled range): median over `rounds` profiled steps of self CPU time
    (ops) / total CPU time (ranges), in ms, with the call count; plus the step's wall time."""
    per_run: dict[str, list[dict[str, tuple[float, int]]]] = {name: [] for name in steps}
    walls: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name in steps if r % 2 == 0 else reversed(list(steps)):
            steps[name].prepare()
            handles = component_labels(*components[name])
            try:
                with stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as p:
                    start = time.perf_counter()
                    steps[name].run()
                    walls[name].append(time.perf_counter() - start)
            finally:
                for h in handles:
                    h.remove()
            table = {}
            for e in p.key_averages():
                is_range = e.key.startswith("fwd: ")
                us = e.cpu_time_total if is_range else e.self_cpu_time_total
                table[e.key] = (us / 1e3, e.count)
            per_run[name].append(table)
    out = {}
    for name, runs in per_run.items():
        keys = set().union(*runs)
        out[name] = {
            "wall_s": statistics.median(walls[name]),
            "ops": {
                k: (
                    statistics.median(run.get(k, (0.0, 0))[0] for run in runs),
                    runs[0].get(k, (0, 0))[1],
                )
                for k in keys
            },
        }
    return out


def print_profile(prof: dict, top: int) -> None:
    ours, hf = prof["ours"]["ops"], prof["hf"]["ops"]
    print(
        f"\nprofiled step wall time (median): ours {prof['ours']['wall_s']:.3f}s, "
        f"HF {prof['hf']['wall_s']:.3f}s (profiler overhead included)"
    )
    ranges = sorted(k for k in set(ours) | set(hf) if k.startswith("fwd: "))
    print("\nforward time of the components (CPU total, ms; backward not split):")
    print("| component | ours ms | HF ms | diff ms |")
    print("|---|---:|---:|---:|")
    for k in ranges:
        a, b = ours.get(k, (0.0, 0))[0], hf.get(k, (0.0, 0))[0]
        print(f"| {k[5:]} | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
    for name, ops in (("ours", ours), ("HF", hf)):
        rows = sorted(
            ((k, v) for k, v in ops.items() if not k.startswith("fwd: ")), key=lambda kv: -kv[1][0]
        )
        total = sum(v[0] for _, v in rows)
        print(
            f"\n{name}: top {top} ops by self CPU time (total {total:.0f} ms on the main threads)"
        )
        print("| op | self ms | calls |")
        print("|---|---:|---:|")
        for k, (ms, calls) in rows[:top]:
            print(f"| {k} | {ms:.1f} | {calls} |")
    keys = {k for k in set(ours) | set(hf) if not k.startswith("fwd: ")}
    diffs = sorted(keys, key=lambda k: -(ours.get(k, (0.0, 0))[0] - hf.get(k, (0.0, 0))[0]))
    print(
        f"\nops where ours spends the most more (+) / less (-) self CPU time than HF (top {top}):"
    )
    print("| op | ours ms (calls) | HF ms (calls) | diff ms |")
    print("|---|---:|---:|---:|")
    shown = diffs[:top] + [k for k in diffs[-top:] if k not in diffs[:top]]
    for k in shown:
        (a, ca), (b, cb) = ours.get(k, (0.0, 0)), hf.get(k, (0.0, 0))
        if abs(a - b) >= 0.5:
            print(f"| {k} | {a:.1f} ({ca}) | {b:.1f} ({cb}) | {a - b:+.1f} |")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="images and texts per step")
    parser.add_argument(
        "--repeats", type=int, default=10, help="ours/HF step pairs wanted on a quiet machine"
    )
    parser.add_argument(
        "--budget", type=float, default=120.0, help="seconds at most for the ours/HF pairs"
    )
    parser.add_argument(
        "--res-repeats", type=int, default=5, help="ours 224/384 px pairs wanted on a quiet machine"
    )
    parser.add_argument(
        "--res-budget", type=float, default=60.0, help="seconds at most for the 224/384 px pairs"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each setting")
    parser.add_argument("--high-res", type=int, default=384, help="the larger input size")
    add_noise_arguments(parser, quiet_wait=10.0, timed="pair")
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="per-op profile of both models: auto = when ours misses the target ratio",
    )
    parser.add_argument("--profile-rounds", type=int, default=2, help="profiled steps of each")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS cross-check")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: B=2, 1 pair each, 1 warm-up, no waiting"
    )
    parser.add_argument("--rss-probe", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-size", type=int, default=224, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.res_repeats, args.warmup = 2, 1, 1, 1
        args.budget = args.res_budget = args.quiet_wait = 0.0
        args.profile_rounds = 1
    return args


def mib(value: int | None) -> float | None:
    return None if value is None else round(value / MiB, 1)


def fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_probe:
        result = rss_probe(args.rss_probe, args.batch, args.probe_size, args.seed)
        print("PROBE " + json.dumps(result), flush=True)
        return 0
    started = time.perf_counter()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; batch {args.batch}, fp32, train mode"
    )
    report_load("start")
    load_start = os.getloadavg()[0]

    ours, hf = build_models(args.seed)
    n_params = sum(p.numel() for p in ours.parameters())
    pixels, tokens = make_batch(args.batch, 224, args.seed + 1)
    pixels_hi, _ = make_batch(args.batch, args.high_res, args.seed + 1)
    max_diff = same_function_check(ours, hf, pixels, tokens)
    print(f"{n_params / 1e6:.1f} M parameters; eval-mode max |logits ours - HF| = {max_diff:.1e}")
    if max_diff > 1e-3:
        raise SystemExit("the two models do not compute the same function: check the loader")

    step_ours = TrainingStep(ours, ours_loss, pixels, tokens)
    step_hf = TrainingStep(hf, hf_loss, pixels, tokens)
    step_hi = TrainingStep(ours, ours_loss, pixels_hi, tokens)
    print(f"warm-up: {args.warmup} step(s) of each ...", flush=True)
    for _ in range(args.warmup):
        for step in (step_ours, step_hf, step_hi):
            step()

    # 1. ours vs HF
    vs = interleaved(
        "224 px",
        ("ours", step_ours),
        ("hf", step_hf),
        args.repeats,
        args.budget,
        args.quiet_wait,
    )
    t_ours, t_hf = vs.headline()
    ratio = vs.ratios()

    # 3. ours at 384 px vs 224 px
    hi = args.high_res
    res = interleaved(
        f"ours {hi} vs 224 px",
        (str(hi), step_hi),
        ("224", step_ours),
        args.res_repeats,
        args.res_budget,
        args.quiet_wait,
    )
    t_hi, t_lo = res.headline()
    res_ratio = res.ratios()

    # 2. peak memory
    print("peak memory: profiler (in process) ...", flush=True)
    peak = {
        "ours": profiler_peak_bytes(step_ours),
        "hf": profiler_peak_bytes(step_hf),
        "ours_hi": profiler_peak_bytes(step_hi),
    }
    rss: dict[str, dict] = {}
    if not args.no_rss:
        for which in ("ours", "hf"):
            print(f"peak memory: RSS cross-check, {which} in a fresh subprocess ...", flush=True)
            rss[which] = rss_peak_subprocess(which, args.batch, 224, args.seed)
    rss_delta = {k: (v["peak"] - v["before"]) if "peak" in v else None for k, v in rss.items()}
    for k, v in rss.items():
        if "error" in v:
            print(f"RSS cross-check {k}: {v['error']}")

    prof = None
    misses = ratio["median"] > TARGET_RATIO
    if args.profile == "auto" and misses and not vs.use_quiet:
        print(
            "\nours misses the target on noisy figures only: not profiled (a profile under load "
            "shows contention, not the models); rerun on a quieter machine or --profile always"
        )
    if args.profile == "always" or (args.profile == "auto" and misses and vs.use_quiet):
        print(f"\nprofiling {args.profile_rounds} step(s) of each ...", flush=True)
        components = {
            "ours": (
                ours,
                {
                    "image encoder": ours.img_encoder,
                    "text encoder": ours.text_encoder,
                    "image projector": ours.img_projector,
                    "text projector": ours.text_projector,
                },
            ),
            "hf": (
                hf,
                {
                    "image encoder": hf.vision_model,
                    "text encoder": hf.text_model,
                    "image projector": hf.visual_projection,
                    "text projector": hf.text_projection,
                },
            ),
        }
        prof = profile_steps({"ours": step_ours, "hf": step_hf}, args.profile_rounds, components)

    report_load("end")
    elapsed = time.perf_counter() - started
    print(f"\nGroupViT training step (forward + CLIP loss + backward), B={args.batch}, CPU fp32\n")
    print(
        "| setting | median s | min s | steps used / run | median s, all steps | "
        "others' CPU (median, all steps) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, t, t_all in (
        ("ours 224 px", t_ours, vs.a),
        ("transformers 224 px", t_hf, vs.b),
        ("ours 224 px (resolution pairs)", t_lo, res.b),
        (f"ours {hi} px", t_hi, res.a),
    ):
        print(
            f"| {label} | {t.median:.3f} | {t.best:.3f} | {len(t.seconds)} / {len(t_all.seconds)} "
            f"| {t_all.median:.3f} | {format_share(t_all.median_others)} |"
        )
    verdict = "meets" if ratio["median"] <= TARGET_RATIO else "MISSES"
    print(
        f"\nours / transformers: {ratio['median']:.3f} (medians; {verdict} the target <= "
        f"{TARGET_RATIO}), {ratio['min']:.3f} (mins), {ratio['paired_median']:.3f} (median of "
        f"the per-pair ratios); from {vs.basis}"
    )
    print(
        f"ours {hi} / 224 px: {res_ratio['median']:.2f} (medians), {res_ratio['min']:.2f} (mins), "
        f"{res_ratio['paired_median']:.2f} (per-pair median); from {res.basis}; patch tokens "
        f"{(hi // 16) ** 2} vs {(224 // 16) ** 2}"
    )
    print("\npeak memory of one training step above the memory held before it (MiB):")
    print("| model | profiler: tensor memory | RSS in fresh process (cross-check) |")
    print("|---|---:|---:|")
    for label, key in (("ours 224 px", "ours"), ("transformers 224 px", "hf")):
        print(f"| {label} | {fmt_mib(mib(peak[key]))} | {fmt_mib(mib(rss_delta.get(key)))} |")
    print(f"| ours {hi} px | {fmt_mib(mib(peak['ours_hi']))} | n/a |")
    print(
        f"(includes the new gradients: {n_params * 4 / MiB:.0f} MiB; weights not counted. Profiler "
        "= running sum of the step's CPU allocations/frees; RSS = peak RSS - RSS before the step, "
        "malloc mmap threshold 64 KiB)"
    )
    print(
        "others' CPU = share of the machine's CPU time used by other processes during a step "
        "(~0% for clean figures); interleaving makes their load hit both sides alike"
    )
    if prof is not None:
        print_profile(prof, top=15)
    record = {
        "benchmark": "groupvit_step",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "params_m": round(n_params / 1e6, 2),
        "eval_max_abs_logit_diff": max_diff,
        "timing_basis": vs.basis,
        "ours_median_s": round(t_ours.median, 4),
        "ours_min_s": round(t_ours.best, 4),
        "hf_median_s": round(t_hf.median, 4),
        "hf_min_s": round(t_hf.best, 4),
        "ratio_ours_hf_median": round(ratio["median"], 4),
        "ratio_ours_hf_min": round(ratio["min"], 4),
        "ratio_ours_hf_paired_median": round(ratio["paired_median"], 4),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio["median"] <= TARGET_RATIO,
        "pairs": len(vs.quiet),
        "quiet_pairs": sum(vs.quiet),
        "ours_step_s_all": [round(x, 4) for x in vs.a.seconds],
        "hf_step_s_all": [round(x, 4) for x in vs.b.seconds],
        "others_cpu_ours_all": [None if x is None else round(x, 3) for x in vs.a.others],
        "others_cpu_hf_all": [None if x is None else round(x, 3) for x in vs.b.others],
        "high_res": hi,
        "res_basis": res.basis,
        "ours_224_median_s": round(t_lo.median, 4),
        "ours_224_min_s": round(t_lo.best, 4),
        f"ours_{hi}_median_s": round(t_hi.median, 4),
        f"ours_{hi}_min_s": round(t_hi.best, 4),
        f"ratio_{hi}_224_median": round(res_ratio["median"], 4),
        f"ratio_{hi}_224_min": round(res_ratio["min"], 4),
        f"ratio_{hi}_224_paired_median": round(res_ratio["paired_median"], 4),
        "peak_mib_profiler_ours": mib(peak["ours"]),
        "peak_mib_profiler_hf": mib(peak["hf"]),
        f"peak_mib_profiler_ours_{hi}": mib(peak["ours_hi"]),
        "peak_mib_rss_ours": mib(rss_delta.get("ours")),
        "peak_mib_rss_hf": mib(rss_delta.get("hf")),
        "grad_mib": round(n_params * 4 / MiB, 1),
        "profiled": prof is not None,
        "load_avg_start": round(load_start, 2),
        "load_avg_end": round(os.getloadavg()[0], 2),
        "elapsed_s": round(elapsed, 1),
    }
    print("\nJSON " + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
