"""A worker of tests/test_metrics_classification.py's DDP test, in a module of its own so that
each spawned process imports torch and the metric only (not the test module's imports)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vitlab.metrics.classification import MacroF1


def worker(rank: int, world: int, port: int, truth: np.ndarray, pred: np.ndarray, out: str):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        metric = MacroF1(50)
        shard = slice(rank, None, world)  # each rank sees a different part of the rows
        metric.update(torch.as_tensor(pred[shard]), torch.as_tensor(truth[shard]))
        value = metric.compute().item()
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(value))
