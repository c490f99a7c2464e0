"""The table a researcher reads at the end of a sweep: every job's overrides and its optimised
metric, as a CSV file in the sweep's folder and on the console.

- `python train.py --multirun ...`: `MultirunTable`, a Hydra callback (`hydra.callbacks` in
  configs/hydra/default.yaml), writes `<hydra.sweep.dir>/multirun_results.csv` when the multirun
  ends, from each job's folder (`.hydra/overrides.yaml`, `.hydra/config.yaml`, `summary.json`),
  so it works for any launcher whose jobs write to the sweep folder (local, SLURM). A job that
  fails with a user error (`failed_multirun_job`) or an exception (`on_job_end`) leaves
  `job_status.json` in its folder: the table shows it failed, with its error, the other jobs
  still run, and the multirun exits 2 at its end.
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
JOB_STATUS_FILE = "job_status.json"  # in a multirun job's folder: how a failed job ended
MULTIRUN_FAILED_EXIT = 2  # a multirun with a failed job: the user-error exit, at its end


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
    from vitlab.atomic import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    atomic_write_text(path, buffer.getvalue())
    return path


def multirun_table(sweep_dir: Path) -> tuple[list[str], list[list[Any]]]:
    """One row per job folder of a Hydra multirun: job number, the value of each overridden key
    (blank where a job did not override it), the optimised metric, status and folder; and the
    error of each failed job when one failed."""
    jobs = []
    for overrides_file in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml")):
        folder = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        config = _read_yaml(folder / ".hydra" / "config.yaml")
        summary = _read_json(folder / "summary.json")
        ended = _read_json(folder / JOB_STATUS_FILE)  # a job that failed before/outside its run
        metric = config.get("optimized_metric")
        value = (summary.get("metrics") or {}).get(metric) if metric else None
        status = ended.get("status") or summary.get("status", "no summary.json")
        error = ended.get("error") or summary.get("error")
        jobs.append(
            (folder.name, dict(map(override_key_value, overrides)), metric, value, status, error)
        )
    jobs.sort(key=lambda j: (not j[0].isdigit(), int(j[0]) if j[0].isdigit() else 0, j[0]))
    keys: list[str] = []
    for _, values, *_ in jobs:
        keys += [k for k in values if k not in keys and _varies(k, jobs)]
    metrics = {j[2] for j in jobs}
    one_metric = len(metrics) == 1 and None not in metrics
    metric_columns = [next(iter(metrics))] if one_metric else ["optimized_metric", "value"]
    any_error = any(j[5] for j in jobs)
    columns = ["job", *keys, *metric_columns, "status", *(["error"] if any_error else [])]
    rows = []
    for name, values, metric, value, status, error in jobs:
        scored = [value] if one_metric else [metric, value]
        errors = [error] if any_error else []
        rows.append([name, *(values.get(k) for k in keys), *scored, status, *errors])
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


def failed_multirun_job(err: BaseException) -> bool:
    """For an entry point that caught a user error: in a `--multirun` job, record it in the job's
    folder (`job_status.json`) and return True, so the job ends and the launcher runs the next
    ones (`sys.exit(2)` there would stop the whole multirun, with no results table); the table
    shows the job failed and the multirun exits 2 at its end. Outside a multirun: False."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    _write_job_status(Path(HydraConfig.get().runtime.output_dir), err)
    return True


def _write_job_status(folder: Path, err: BaseException | None) -> None:
    from vitlab.atomic import atomic_write_text

    error = f"{type(err).__name__}: {err}" if err is not None else "unknown error"
    status = {"status": "failed", "error": error}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / JOB_STATUS_FILE, json.dumps(status, indent=2))


def failed_jobs(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """The job names of the table's rows whose status is `failed`."""
    status = list(columns).index("status")
    return [str(row[0]) for row in rows if row[status] == "failed"]


class MultirunTable(Callback):
    """Hydra callback: at the end of `--multirun`, `<sweep dir>/multirun_results.csv` and the
    same table on the console; exit 2 when a job failed. Each job's end also rewrites the file,
    so it exists even when Hydra stops the multirun on a job's exception (a bug, not a user
    error: Hydra raises it after the last job, and `on_multirun_end` never comes)."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        try:
            if job_return.status == JobStatus.FAILED:
                # the exception itself (the public `return_value` re-raises it)
                error = getattr(job_return, "_return_value", None)
                folder = Path(config.hydra.runtime.output_dir)
                _write_job_status(folder, error if isinstance(error, BaseException) else None)
            self._write(Path(config.hydra.sweep.dir))
        except Exception as err:  # a results table must never turn a finished job into an error
            log.warning("multirun results table not written: %s", err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            written = self._write(sweep_dir)
        except Exception as err:  # a results table must never turn finished jobs into an error
            log.warning("multirun results table not written: %s", err)
            return
        if written is None:
            return
        path, columns, rows = written
        print(f"\n{len(rows)} job(s) in {sweep_dir} ({path.name}):\n{format_table(columns, rows)}")
        failed = failed_jobs(columns, rows)
        if failed:  # after every job ran and the table is written: a failure is not a success
            log.error("%d of %d job(s) failed: %s (see %s)", len(failed), len(rows), failed, path)
            raise SystemExit(MULTIRUN_FAILED_EXIT)

    @staticmethod
    def _write(sweep_dir: Path) -> tuple[Path, list[str], list[list[Any]]] | None:
        columns, rows = multirun_table(sweep_dir)
        if not rows:
            return None
        return write_table(sweep_dir / RESULTS_FILE, columns, rows), columns, rows
