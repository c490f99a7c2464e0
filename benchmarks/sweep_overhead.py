"""A head sweep on the quickstart: per-trial overhead of sweep.py, and embeddings computed once.

Runs `python sweep.py sweep=quickstart_head sweep.n_trials=N` in a temp folder (cold cache), then
reads the study: per trial, wall time of the trial (ask -> tell) minus the time inside the
training run = the sweep's own overhead; and the stage timings each run reported (embed should
cost time in the first trial only).

Run: python benchmarks/sweep_overhead.py [--trials 20 --epochs 10]   (from the repo root)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from statistics import mean, median

import optuna
from _runs import run_entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_entry(
            "sweep.py",
            Path(tmp),
            "sweep=quickstart_head",
            f"sweep.n_trials={args.trials}",
            f"trainer.max_epochs={args.epochs}",
        )
        total = time.perf_counter() - start
        study = optuna.load_study(
            study_name="quickstart_plantclef_head", storage=f"sqlite:///{tmp}/sweeps/optuna.db"
        )
    trials = sorted(study.trials, key=lambda t: t.number)
    overhead = [t.user_attrs["wall_seconds"] - t.user_attrs["train_seconds"] for t in trials]
    embed = [t.user_attrs["stage_seconds"].get("embed", 0.0) for t in trials]
    train = [t.user_attrs["train_seconds"] for t in trials]
    print(
        f"{len(trials)} trials, {args.epochs} epochs each, total {total:.1f} s "
        f"(includes dataset generation and process start-up)"
    )
    print("| trial | state | train s | sweep overhead s | embed s |\n|---|---|---|---|---|")
    for t, o, e in zip(trials, overhead, embed):
        print(
            f"| {t.number} | {t.state.name} | {t.user_attrs['train_seconds']:.2f} | {o:.3f} | "
            f"{e:.3f} |"
        )
    print(
        f"sweep overhead per trial: mean {mean(overhead):.3f} s, median {median(overhead):.3f} s"
        f" (mean training run {mean(train):.2f} s)"
    )
    print(
        f"trials whose embed stage took > 0.1 s: {sum(e > 0.1 for e in embed)} "
        f"(first trial {embed[0]:.2f} s, others max {max(embed[1:], default=0):.3f} s)"
    )


if __name__ == "__main__":
    main()
