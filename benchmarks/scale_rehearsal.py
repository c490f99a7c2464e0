"""Scale rehearsal: a synthetic PlantCLEF at the real class and plot counts, end to end.

At `--scale 1` the dataset has PlantCLEF 2024's 7,806 species (`--images-per-species`, >= 8
small JPEGs each) and 1,695 test plots with ground truth, in the official layout, and a training
metadata CSV of the official 1,408,033 rows (official columns; the rows beyond the written
images list images that are not written: train.py skips them as missing, with
`dataset.max_missing_fraction` raised to allow it; `--metadata-rows images` writes one row per
image instead). `--scale f` scales species, plots and CSV rows by f (images per species fixed),
so per-item costs at two or three scales show which stage grows faster than linearly.

Stages, each in a child process (one heavy process at a time; 1 torch thread):
  generate   the dataset (`generate_plantclef`), timed with the child's peak RSS (wait4)
  train.py   experiment=quickstart_plantclef (the tiny ViT) on it: prepare / embed / fit /
             predict / score from summary.json's stage_seconds; each stage's peak RSS from the
             child's VmHWM, reset at each stage start (/proc/self/clear_refs); each validation
             loop's wall time (the per-epoch validation cost, macro-F1 over every class)
Then, in this process: the label map, submission, metric and chart at that size (sizes, times)
and MacroF1 at the label map's class count on the run's validation size.
Prints a markdown table (stage, items, seconds, items/s, peak RSS) with the load average, and
writes everything to <work>/rehearsal.json.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/scale_rehearsal.py --scale 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

REAL_SPECIES = 7_806
REAL_PLOTS = 1_695
REAL_METADATA_ROWS = 1_408_033  # PlantCLEF2024_single_plant_training_metadata.csv
TILES_PER_PLOT = 9  # grid 3x3 (the quickstart's inference=grid_argmax)
# embed_tiles: the test tiles through the backbone (cached); predict: the head over them
STAGES = ("generate", "prepare", "embed", "fit", "embed_tiles", "predict", "score")


def _rss_mib(field: str = "VmHWM") -> float:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: less sensitive than wall time to
    the other processes on a shared machine (they take cores, not this process's CPU time)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


# ----------------------------------------------------------------------------- child processes
def child_generate(args: list[str]) -> None:
    from vitlab.data.synthetic.plantclef import PlantClefSyntheticSpec, generate_plantclef

    out, spec_json = args
    spec = json.loads(spec_json)
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    generate_plantclef(out, PlantClefSyntheticSpec(**spec))


def child_train(args: list[str]) -> None:
    """train.py with its overrides, instrumented from outside the library: each stage's peak
    RSS and the wall time of every validation loop go to `record` (a JSON file)."""
    import runpy
    from contextlib import contextmanager

    from pytorch_lightning.loops.evaluation_loop import _EvaluationLoop

    from vitlab.pipelines.base import StageTimer

    record_path, overrides = Path(args[0]), args[1:]
    record: dict[str, Any] = {
        "stage_peak_rss_mib": {},
        "stage_start_rss_mib": {},
        "stage_cpu_seconds": {},
        "validation_seconds": [],
    }

    def save() -> None:
        record_path.write_text(json.dumps(record, indent=1))

    original_stage = StageTimer.stage

    @contextmanager
    def stage(self, name):
        _reset_peak()
        record["stage_start_rss_mib"][name] = round(_rss_mib("VmRSS"), 1)
        cpu = _cpu_seconds()
        try:
            with original_stage(self, name):
                yield
        finally:
            record["stage_peak_rss_mib"][name] = round(_rss_mib(), 1)
            record["stage_cpu_seconds"][name] = round(_cpu_seconds() - cpu, 3)
            save()

    StageTimer.stage = stage
    original_run = _EvaluationLoop.run

    def run(self, *a, **k):
        start = time.perf_counter()
        try:
            return original_run(self, *a, **k)
        finally:
            record["validation_seconds"].append(round(time.perf_counter() - start, 4))

    _EvaluationLoop.run = run
    sys.argv = [str(REPO / "train.py"), *overrides]
    try:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    finally:
        save()


def run_child(mode: str, args: list[str], log_path: Path) -> tuple[float, float, int, float]:
    """(wall seconds, peak RSS MiB, exit code, CPU seconds) of `python this_script --_child
    mode args`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env.setdefault("WANDB_MODE", "disabled")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", mode, *args]
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024, proc.returncode, usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------- the rehearsal
def spec_for(scale: float, images_per_species: int, metadata_rows: str) -> dict[str, Any]:
    n_species = max(8, round(REAL_SPECIES * scale))
    spec: dict[str, Any] = {
        "seed": 0,
        "n_species": n_species,
        "n_rare_species": 0,
        # a short head of larger species, then `images_per_species` each
        "max_images_per_species": 5 * images_per_species,
        "min_images_per_species": images_per_species,
        "n_quadrats": max(2, round(REAL_PLOTS * scale)),
        "image_side": (128, 192),
    }
    if metadata_rows == "official":
        spec["metadata_rows"] = max(1, round(REAL_METADATA_ROWS * scale))
    return spec


WORK_MARKER = ".vitlab-scale-rehearsal"


def claim_work_dir(work: Path) -> None:
    """The rehearsal deletes its cache and run folders before each run: only in a folder it
    made (marked), a new one or an empty one; a user's folder is refused."""
    if work.is_dir() and any(work.iterdir()) and not (work / WORK_MARKER).is_file():
        sys.exit(f"--work {work}: not empty and not a scale rehearsal's folder; choose another")
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).touch()


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (5 min {five:.2f}) on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.1, help="fraction of the real sizes")
    parser.add_argument("--images-per-species", type=int, default=8)
    parser.add_argument(
        "--metadata-rows",
        choices=("official", "images"),
        default="official",
        help="official: the CSV padded to 1,408,033 x scale rows; images: one row per image",
    )
    parser.add_argument("--epochs", type=int, default=10, help="trainer.max_epochs")
    parser.add_argument(
        "--work", type=Path, default=None, help="default <temp dir>/vitlab-scale-<s>"
    )
    parser.add_argument("--reuse-data", action="store_true", help="keep a generated dataset")
    parser.add_argument("--print", type=Path, default=None, help="reprint a rehearsal.json")
    parser.add_argument("extra", nargs="*", help="more train.py overrides (key=value)")
    args = parser.parse_args()
    if args.print:
        print_report(json.loads(args.print.read_text()), args)
        return

    work = args.work or Path(tempfile.gettempdir()) / f"vitlab-scale-{args.scale:g}"
    claim_work_dir(work)
    data, run_dir, cache = work / "data", work / "run", work / "cache"
    spec = spec_for(args.scale, args.images_per_species, args.metadata_rows)
    print(f"scale {args.scale:g}: {json.dumps(spec)}", flush=True)
    results: dict[str, Any] = {"scale": args.scale, "spec": spec, "load": {}}
    results["load"]["start"] = load_line()

    marker = data / ".complete"
    stored_spec = json.loads(marker.read_text()) if marker.is_file() else None
    wanted = json.loads(json.dumps(spec))  # tuples as lists, as the marker records them
    if args.reuse_data and stored_spec and {k: stored_spec.get(k) for k in wanted} == wanted:
        print("generate: reusing", data, flush=True)
        gen = (float("nan"), float("nan"), 0, float("nan"))
    else:
        gen = run_child("generate", [str(data), json.dumps(spec)], work / "generate.log")
        if gen[2]:
            sys.exit(f"generate failed: see {work / 'generate.log'}")
    results["load"]["after_generate"] = load_line()

    from vitlab.data.plantclef import index_images

    n_images = len(index_images(data / "images_max_side_800"))
    csv_rows = sum(1 for _ in open(data / "PlantCLEF2024_single_plant_training_metadata.csv")) - 1
    missing = 1 - n_images / csv_rows
    max_missing = min(1.0, round(missing + 0.02, 3)) if missing > 0.05 else 0.05

    for stale in (cache, run_dir):  # a cold run: every stage computes
        if stale.exists():
            subprocess.run(["rm", "-rf", str(stale)], check=True)
    overrides = [
        "experiment=quickstart_plantclef",
        f"dataset.root={data}",
        "dataset.synthetic=null",
        "dataset.min_images_per_species=2",  # every species has >= 2 training images: all kept
        f"dataset.max_missing_fraction={max_missing}",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        "runtime.threads=1",
        "logger=csv",
        "print_config=false",
        "prepare.workers=1",  # one thread, like runtime.threads (a shared 2-core machine)
        f"trainer.max_epochs={args.epochs}",
        *args.extra,
    ]
    results["train_overrides"] = overrides
    record_path = work / "train_record.json"
    train = run_child("train", [str(record_path), *overrides], work / "train.log")
    results["load"]["after_train"] = load_line()
    if train[2]:
        sys.exit(f"train.py failed (exit {train[2]}): see {work / 'train.log'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    record = json.loads(record_path.read_text())
    # the child's ru_maxrss is its VmHWM, which each stage resets: the run's peak is the largest
    # of the stage peaks and what wait4 saw (the peak since the last reset)
    results["train_wall_seconds"] = train[0]
    results["train_peak_rss_mib"] = max([train[1], *record["stage_peak_rss_mib"].values()])

    # items per stage
    fit_data = summary.get("fit_data", {})
    n_train, n_val = fit_data.get("images_train", 0), fit_data.get("images_val", 0)
    val_seconds = record["validation_seconds"]
    # the first validation loop is Lightning's sanity check (trainer.num_sanity_val_steps)
    epochs_run = max(1, len(val_seconds) - 1)
    stage_seconds = {"generate": gen[0], **summary["stage_seconds"]}
    peaks = {"generate": gen[1], **record["stage_peak_rss_mib"]}
    cpu = {"generate": gen[3], **record["stage_cpu_seconds"]}
    n_plots = spec["n_quadrats"]
    items = {
        "generate": (n_images + n_plots, "images + plots"),
        "prepare": (n_images, "images"),
        "embed": (n_images, "images"),
        "fit": (n_train * epochs_run, f"image-epochs ({n_train} x {epochs_run})"),
        "embed_tiles": (n_plots * TILES_PER_PLOT, f"tiles ({n_plots} plots)"),
        "predict": (n_plots * TILES_PER_PLOT, f"tiles ({n_plots} plots)"),
        "score": (n_plots, "plots"),
    }
    rows = []
    for name in STAGES:
        seconds = stage_seconds.get(name)
        count, what = items[name]
        rate = count / seconds if seconds and seconds == seconds else float("nan")
        rows.append(
            {
                "stage": name,
                "items": count,
                "what": what,
                "seconds": seconds,
                "items_per_s": rate,
                "cpu_seconds": cpu.get(name),
                "cpu_ms_per_item": 1000 * cpu[name] / count if cpu.get(name) and count else None,
                "peak_rss_mib": peaks.get(name),
            }
        )
    results["stages"] = rows
    results["validation_seconds_per_epoch"] = val_seconds[1:]
    results["fit_data"] = fit_data
    results["prepare_report"] = {
        k: v for k, v in summary.get("prepare_report", {}).items() if "examples" not in k
    }
    results["scores"] = summary.get("scores")
    results["csv_rows"], results["images"] = csv_rows, n_images

    # the label map, submission, metric and chart at this size
    results["artifacts"] = artifacts(run_dir, data, summary, n_val)
    results["load"]["end"] = load_line()
    (work / "rehearsal.json").write_text(json.dumps(results, indent=1, default=str))
    print_report(results, args)


def artifacts(run_dir: Path, data: Path, summary: dict[str, Any], n_val: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from vitlab.data.plantclef import read_ground_truth, read_species_names, read_submission
    from vitlab.metrics.classification import MacroF1
    from vitlab.metrics.plantclef import plantclef_scores
    from vitlab.pipelines.plantclef.score import plot_per_species_f1

    out: dict[str, Any] = {}
    label_map = run_dir / "checkpoints" / "label_map.json"
    species_ids = json.loads(label_map.read_text())["species_ids"]
    out["label_map"] = {"classes": len(species_ids), "bytes": label_map.stat().st_size}
    submission_path = Path(summary["submission"])
    start = time.perf_counter()
    submission = read_submission(submission_path)
    truth = read_ground_truth(data / "test_ground_truth.csv")
    out["submission"] = {
        "rows": len(submission),
        "bytes": submission_path.stat().st_size,
        "species_per_plot_mean": round(float(np.mean([len(v) for v in submission.values()])), 2),
        "read_seconds": round(time.perf_counter() - start, 4),
    }
    start = time.perf_counter()
    scores = plantclef_scores(truth, submission)
    out["metric"] = {"seconds": round(time.perf_counter() - start, 4), **scores}
    start = time.perf_counter()
    names = read_species_names(data / "PlantCLEF2024_single_plant_training_metadata.csv")
    names_seconds = time.perf_counter() - start
    start = time.perf_counter()
    chart = plot_per_species_f1(truth, submission, run_dir / "per_species_f1_again.png", names)
    out["chart"] = {
        "path": str(run_dir / "per_species_f1.png"),
        "seconds": round(time.perf_counter() - start, 3),
        "species_names_seconds": round(names_seconds, 3),
        "bytes": chart.stat().st_size,
    }
    # the per-epoch validation metric alone: MacroF1 over the label map's classes
    classes, rows = len(species_ids), max(n_val, 1)
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, classes, (rows,), generator=gen)
    pred = torch.where(
        torch.rand(rows, generator=gen) < 0.5,
        target,
        torch.randint(0, classes, (rows,), generator=gen),
    )
    metric = MacroF1(classes)
    start = time.perf_counter()
    for i in range(0, rows, 64):  # head.batch_size: one update per validation batch
        metric.update(pred[i : i + 64], target[i : i + 64])
    metric.compute()
    out["val_macro_f1_metric"] = {
        "classes": classes,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 4),
    }
    return out


def fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def print_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    spec = results["spec"]
    print()
    print(
        f"### scale {results['scale']:g}: {spec['n_species']} species, {results['images']} "
        f"images, {results['csv_rows']} CSV rows, {spec['n_quadrats']} plots"
    )
    print()
    print("| stage | items | seconds | items/s | CPU s | CPU ms/item | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in results["stages"]:
        print(
            f"| {row['stage']} | {row['items']} {row['what']} | {fmt(row['seconds'], '.1f')} | "
            f"{fmt(row['items_per_s'], '.1f')} | {fmt(row.get('cpu_seconds'), '.1f')} | "
            f"{fmt(row.get('cpu_ms_per_item'), '.3f')} | {fmt(row['peak_rss_mib'], '.0f')} |"
        )
    in_stages = sum(r["seconds"] for r in results["stages"] if r["stage"] != "generate")
    other = results["train_wall_seconds"] - in_stages
    print(
        f"| train.py outside the stages (start-up, dataset checks, writes) | - | {other:.1f} | "
        f"- | - | - | {results['train_peak_rss_mib']:.0f} (whole run) |"
    )
    val = results["validation_seconds_per_epoch"]
    art = results["artifacts"]
    print()
    if val:
        print(
            f"validation loop per epoch: median {sorted(val)[len(val) // 2]:.3f} s over "
            f"{len(val)} epochs ({results['fit_data'].get('images_val')} images, "
            f"{art['label_map']['classes']} classes); MacroF1 alone: "
            f"{art['val_macro_f1_metric']['seconds']:.4f} s"
        )
    print(
        f"label map: {art['label_map']['classes']} classes, {art['label_map']['bytes']} B; "
        f"submission: {art['submission']['rows']} rows, {art['submission']['bytes']} B; "
        f"metric: {art['metric']['seconds']:.4f} s; chart: {art['chart']['seconds']:.2f} s "
        f"(+ species names {art['chart']['species_names_seconds']:.2f} s) -> "
        f"{art['chart']['path']}"
    )
    print(f"scores: {results['scores']}")
    print(
        f"train.py wall {results['train_wall_seconds']:.1f} s, peak RSS "
        f"{results['train_peak_rss_mib']:.0f} MiB"
    )
    for when, line in results["load"].items():
        print(f"load average {when}: {line}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_child":
        {"generate": child_generate, "train": child_train}[sys.argv[2]](sys.argv[3:])
    else:
        main()
