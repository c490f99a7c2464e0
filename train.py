"""Train: `python train.py [experiment=<name>] [key=value ...]` (see configs/train.yaml).
Returns the experiment's `optimized_metric` to Hydra sweepers."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from vitlab.config import guard_hydra_callbacks
from vitlab.errors import USER_ERRORS

log = logging.getLogger("vitlab")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from vitlab.pipelines import get_pipeline

    try:
        summary = get_pipeline(cfg.pipeline, "train").train(cfg)
    except USER_ERRORS as err:
        log.error("%s: %s", type(err).__name__, err)
        from vitlab.run_tables import failed_multirun_job

        if failed_multirun_job(err):  # --multirun: recorded; the next jobs run, exit 2 at the end
            return None
        sys.exit(2)
    metric = summary.get("metrics", {}).get(cfg.optimized_metric)
    return float(metric) if metric is not None else None


if __name__ == "__main__":
    guard_hydra_callbacks()  # Hydra builds hydra.callbacks before main(): checked first
    main()
