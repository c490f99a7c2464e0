"""PlantCLEF inference strategies on the quickstart data: F1 of full image vs grid argmax vs
grid top-K, all with the same trained head.

Runs the real quickstart once (`train.py logger=csv`, synthetic PlantCLEF + tiny random-init ViT +
linear head) in a temp dir, takes `best_checkpoint` from its summary.json, then runs
`infer.py ckpt_path=<best> inference=<strategy> logger=csv` for each strategy and prints a
Markdown table of the scores (macro F1 per plot, macro F1 per species, micro F1) from each run's
summary.json. Subprocesses run with cwd = the temp dir (data, cache and outputs land there),
VITLAB_ROOT / VITLAB_CACHE unset and PYTHONPATH = <repo>/src.

Run (from the repo root; takes a few minutes on 2 CPU cores):
    python benchmarks/plantclef_strategies.py
    python benchmarks/plantclef_strategies.py --work-dir benchmarks/results/strategies --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("full_image", "grid_argmax", "grid_topk")
SCORES = ("macro_f1_per_plot", "macro_f1_per_species", "micro_f1")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("VITLAB_ROOT", "VITLAB_CACHE"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(REPO / "src")
    env["WANDB_MODE"] = "disabled"  # logger=csv already; belt and braces
    return env


def run(script: str, overrides: list[str], cwd: Path, python: str) -> tuple[float, str]:
    """Run a Hydra entry point; raise with its output tail when it fails."""
    command = [python, str(REPO / script), *overrides]
    print("$ (cd", cwd, "&&", " ".join(command) + ")", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"{script} failed with exit code {proc.returncode}:\n{tail}")
    return elapsed, proc.stdout + proc.stderr


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"no summary.json in {run_dir}")
    return json.loads(path.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (temp dir only)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the runs")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument(
        "--train-override",
        action="append",
        default=[],
        help="extra Hydra override for train.py (repeatable), e.g. trainer.max_epochs=10",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="vitlab-strategies-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    try:
        train_dir = work / "train"
        seconds, _ = run(
            "train.py",
            ["logger=csv", f"hydra.run.dir={train_dir}", *args.train_override],
            work,
            args.python,
        )
        train = read_summary(train_dir)
        best = train.get("best_checkpoint")
        if not best or not Path(best).is_file():
            raise RuntimeError(f"train summary has no usable best_checkpoint: {best!r}")
        print(f"train: {seconds:.0f} s, best checkpoint {best}", flush=True)
        rows: list[tuple[str, dict[str, float], int, float]] = []
        for strategy in args.strategies:
            run_dir = work / strategy
            seconds, _ = run(
                "infer.py",
                [
                    f"ckpt_path={best}",
                    f"inference={strategy}",
                    "logger=csv",
                    f"hydra.run.dir={run_dir}",
                ],
                work,
                args.python,
            )
            summary = read_summary(run_dir)
            if "scores" not in summary:
                raise RuntimeError(f"{run_dir}/summary.json has no scores (no ground truth?)")
            tiles = int(summary.get("predict_report", {}).get("tiles", 0))
            rows.append((strategy, summary["scores"], tiles, seconds))
    finally:
        if args.work_dir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    train_scores = {k: round(v, 4) for k, v in train.get("scores", {}).items() if k in SCORES}
    print(f"\nCheckpoint {best}\ntrain.py's own test scores (default inference): {train_scores}\n")
    print("| inference | " + " | ".join(SCORES) + " | tiles | infer.py s |")
    print("|---|" + "---:|" * (len(SCORES) + 2))
    for strategy, scores, tiles, seconds in rows:
        cells = " | ".join(f"{scores[k]:.4f}" for k in SCORES)
        print(f"| {strategy} | {cells} | {tiles} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
