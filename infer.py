"""Predict test quadrats: `python infer.py ckpt_path=outputs/.../checkpoints/best.ckpt
[inference=grid_topk] [dataset=plantclef dataset.root=...]`, or evaluate GroupViT zero-shot
segmentation: `python infer.py pipeline=segmentation dataset=pascal_voc dataset.root=...
ckpt_path=...` (see configs/infer.yaml)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from vitlab.config import guard_hydra_callbacks
from vitlab.errors import USER_ERRORS

log = logging.getLogger("vitlab")


@hydra.main(version_base="1.3", config_path="configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    from vitlab.pipelines import get_pipeline

    try:
        name = cfg.get("task") or cfg.pipeline  # `task=` is the older name of `pipeline=`
        get_pipeline(name, "infer").infer(cfg)
    except USER_ERRORS as err:
        log.error("%s: %s", type(err).__name__, err)
        from vitlab.run_tables import failed_multirun_job

        if failed_multirun_job(err):  # --multirun: recorded; the next jobs run, exit 2 at the end
            return None
        sys.exit(2)


if __name__ == "__main__":
    guard_hydra_callbacks()  # Hydra builds hydra.callbacks before main(): checked first
    main()
