"""Stage timings of the same experiment run twice: the second run's embed should be ~0 s.

Runs `train.py` (the quickstart, CSV logger) twice in a temp folder with the same overrides and
prints `stage_seconds` of both runs' summary.json, plus a third run with only a head override
(`optimizer.lr`) as a multirun/sweep would change it.

Run: python benchmarks/cache_rerun.py   (from the repo root, vitlab installed or PYTHONPATH=src)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from _runs import train_summary


def run(tmp: Path, name: str, *overrides: str) -> dict:
    return train_summary(tmp, name, *overrides)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run(root, "generate", "trainer.max_epochs=1")  # dataset generation out of the timings
        shutil.rmtree(root / ".cache" / "vitlab")  # cold cache for the first timed run
        rows = [
            ("first run (cold cache)", run(root, "first")),
            ("second run, same config", run(root, "second")),
            ("third run, optimizer.lr=1e-2", run(root, "third", "optimizer.lr=1e-2")),
        ]
    stages = ["prepare", "embed", "fit", "predict", "score"]
    print("| run | " + " | ".join(f"{s} s" for s in stages) + " |")
    print("|---|" + "---|" * len(stages))
    for name, summary in rows:
        secs = summary["stage_seconds"]
        print(f"| {name} | " + " | ".join(f"{secs.get(s, 0):.3f}" for s in stages) + " |")
    keys = {json.dumps(s["cache_keys"]) for _, s in rows}
    print(f"cache keys identical across runs: {len(keys) == 1}")


if __name__ == "__main__":
    main()
