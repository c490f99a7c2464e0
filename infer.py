"""Predict test quadrats: `python infer.py ckpt_path=outputs/.../checkpoints/best.ckpt
[inference=grid_topk] [dataset=plantclef dataset.root=...]` (see configs/infer.yaml)."""

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


@hydra.main(version_base="1.3", config_path="configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    from vitlab.run import infer

    try:
        infer(cfg)
    except USER_ERRORS as err:
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)


if __name__ == "__main__":
    main()
