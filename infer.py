"""Predict test quadrats: `python infer.py ckpt_path=outputs/.../checkpoints/best.ckpt
[inference=grid_topk] [dataset=plantclef dataset.root=...]` (see configs/infer.yaml)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from vitlab.config import ConfigError

log = logging.getLogger("vitlab")


@hydra.main(version_base="1.3", config_path="configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    from vitlab.run import infer

    try:
        infer(cfg)
    except ConfigError as err:
        log.error("invalid configuration: %s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
