"""Train: `python train.py [experiment=<name>] [key=value ...]` (see configs/train.yaml)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from vitlab.config import ConfigError
from vitlab.data.plantclef import DatasetFormatError

# errors whose message says what to fix: no traceback needed
USER_ERRORS = (ConfigError, DatasetFormatError, MissingMandatoryValue)

log = logging.getLogger("vitlab")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from vitlab.run import train

    try:
        if cfg.pipeline == "fungiclef":
            from vitlab.run_fungiclef import train_fungiclef

            summary = train_fungiclef(cfg)
        elif cfg.pipeline == "groupvit":
            from vitlab.run_groupvit import train_groupvit

            summary = train_groupvit(cfg)
        elif cfg.pipeline == "plantclef":
            summary = train(cfg)
        else:
            raise ConfigError(
                f"pipeline={cfg.pipeline!r} is not one of ['plantclef', 'fungiclef', 'groupvit']"
            )
    except USER_ERRORS as err:
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)
    metric = summary.get("fit_metrics", {}).get(cfg.optimized_metric)
    return float(metric) if metric is not None else None


if __name__ == "__main__":
    main()
