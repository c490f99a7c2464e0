"""The table a researcher reads at the end of a sweep: every job's overrides and its optimised
metric, as a CSV file in the sweep's folder and on the console.

- `python train.py --multirun ...`: `MultirunTable`, a Hydra callback (`hydra.callbacks` in
  configs/hydra/default.yaml), writes `<hydra.sweep.dir>/multirun_results.csv` when the multirun
  ends, from each job's folder (`.hydra/overrides.yaml`, `.hydra/config.yaml`, `summary.json`),
  so it works for any launcher whose jobs write to the sweep folder (local, SLURM).
- `python sweep.py ...`: `vitlab.sweep_driver` writes `sweeps/<study>/trials.csv` the same way.

Kept free of torch/Lightning imports: Hydra imports callbacks before any job starts.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
RESULTS_FILE = "multirun_results.csv"


def override_key_value(override: str) -> tuple[str, str]:
    """`+optimizer.amsgrad=true` -> (`optimizer.amsgrad`, `true`); `~key` -> (`key`, `~`)."""
    if override.startswith("~"):
        return override[1:].split("=", 1)[0], "~"
    key, _, value = override.lstrip("+").partition("=")
    return key, value


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (floats to 4 significant digits)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_table(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """The table as CSV (atomically: temp + rename)."""
    from vitlab.data.shards import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    atomic_write_text(path, buffer.getvalue())
    return path


def multirun_table(sweep_dir: Path) -> tuple[list[str], list[list[Any]]]:
    """One row per job folder of a Hydra multirun: job number, the value of each overridden key
    (blank where a job did not override it), the optimised metric, status and folder."""
    jobs = []
    for overrides_file in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml")):
        folder = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        config = _read_yaml(folder / ".hydra" / "config.yaml")
        summary = _read_json(folder / "summary.json")
        metric = config.get("optimized_metric")
        value = (summary.get("metrics") or {}).get(metric) if metric else None
        status = summary.get("status", "no summary.json")
        jobs.append((folder.name, dict(map(override_key_value, overrides)), metric, value, status))
    jobs.sort(key=lambda j: (not j[0].isdigit(), int(j[0]) if j[0].isdigit() else 0, j[0]))
    keys: list[str] = []
    for _, values, *_ in jobs:
        keys += [k for k in values if k not in keys and _varies(k, jobs)]
    metrics = {j[2] for j in jobs}
    one_metric = len(metrics) == 1 and None not in metrics
    metric_columns = [next(iter(metrics))] if one_metric else ["optimized_metric", "value"]
    columns = ["job", *keys, *metric_columns, "status"]
    rows = []
    for name, values, metric, value, status in jobs:
        scored = [value] if one_metric else [metric, value]
        rows.append([name, *(values.get(k) for k in keys), *scored, status])
    return columns, rows


def _varies(key: str, jobs) -> bool:
    """Keys every job overrides with the same value are the multirun's common settings: the
    table shows what differs (all keys when there is a single job)."""
    return len(jobs) == 1 or len({j[1].get(key) for j in jobs}) > 1


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class MultirunTable(Callback):
    """Hydra callback: at the end of `--multirun`, `<sweep dir>/multirun_results.csv` and the
    same table on the console."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            columns, rows = multirun_table(sweep_dir)
            if not rows:
                return
            path = write_table(sweep_dir / RESULTS_FILE, columns, rows)
        except Exception as err:  # a results table must never turn finished jobs into an error
            log.warning("multirun results table not written: %s", err)
            return
        print(f"\n{len(rows)} job(s) in {sweep_dir} ({path.name}):\n{format_table(columns, rows)}")
