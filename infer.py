"""Predict test quadrats: `python infer.py ckpt_path=outputs/.../checkpoints/best.ckpt
[inference=grid_topk] [dataset=plantclef dataset.root=...]`, or evaluate GroupViT zero-shot
segmentation: `python infer.py task=segmentation dataset=pascal_voc dataset.root=... ckpt_path=...`
(see configs/infer.yaml)."""

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
    try:
        if cfg.task == "segmentation":
            from vitlab.run_segmentation import evaluate_segmentation

            evaluate_segmentation(cfg)
        elif cfg.task == "plantclef":
            from vitlab.run import infer

            infer(cfg)
        else:
            raise ConfigError(f"task={cfg.task!r} is not one of ['plantclef', 'segmentation']")
    except USER_ERRORS as err:
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)


if __name__ == "__main__":
    main()
