"""Head training throughput: the Lightning path vs a bare PyTorch loop, same data and model.

Both train the FungiCLEF MLP head (embedding + metadata -> hidden -> species + poison/genus
outputs, seesaw + poison loss) for the same number of epochs over the same in-memory tensors with
the same batch size and optimizer. Lightning = `FungiClassifier` + `batch_loader` + a Trainer
as the pipeline builds it (no logger, checkpointing or progress bar, which are I/O, not the
framework); bare = a hand-written loop over shuffled index slices. Alternating pairs; prints
the median of the per-pair throughput ratios Lightning/bare with its spread and the load
(target >= 0.8, i.e. time ratio <= 1.25).

Run: PYTHONPATH=src python benchmarks/head_training_overhead.py [--rows 20000 --dim 1024]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from _machine import paired_ratio, report_load

from vitlab.data.embedding_rows import Rows, RowsDataset, batch_loader
from vitlab.tasks.fungiclef import FungiClassifier

HEAD = {"_target_": "vitlab.models.heads.MetadataMLPHead", "hidden": 4096, "dropout": 0.1}
LOSS = {"_target_": "vitlab.losses.SeesawPoisonLoss", "alpha": 0.1}
GROUPS = {"date": (0, 4), "geo": (4, 8), "substrate": (8, 40)}


def make_module(dim: int, classes: int) -> FungiClassifier:
    torch.manual_seed(0)
    return FungiClassifier(
        HEAD,
        LOSS,
        dim,
        GROUPS,
        list(range(classes)),
        [10] * classes,
        [0, 1],
        {"poisonous": 1, "genus": 20},
        {"poisonous": 0.1, "genus": 0.1},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4},
    )


def lightning_fit(dataset: RowsDataset, dim: int, classes: int, batch: int, epochs: int) -> float:
    module = make_module(dim, classes)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, batch_loader(dataset, batch, shuffle=True))
    return time.perf_counter() - start


def bare_fit(dataset: RowsDataset, dim: int, classes: int, batch: int, epochs: int) -> float:
    module = make_module(dim, classes)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    tensors = dataset.tensors
    n = len(dataset)
    start = time.perf_counter()
    module.train()
    for _ in range(epochs):
        order = torch.randperm(n)
        for i in range(0, n, batch):
            index = order[i : i + batch]
            loss, _, _ = module._losses({k: v[index] for k, v in tensors.items()})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="alternating pairs")
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)
    rows = Rows(
        pd.DataFrame(index=range(args.rows)),
        rng.normal(size=(args.rows, args.dim)).astype(np.float32),
        rng.random((args.rows, 40)).astype(np.float32),
    )
    targets = {
        "species": rng.integers(0, args.classes, args.rows),
        "poisonous": rng.integers(0, 2, args.rows),
        "genus": rng.integers(0, 20, args.rows),
    }
    dataset = RowsDataset(rows, targets)
    samples = args.rows * args.epochs
    report_load("start")
    shape = (dataset, args.dim, args.classes, args.batch_size, args.epochs)
    ratio = paired_ratio(
        lambda: samples / lightning_fit(*shape), lambda: samples / bare_fit(*shape), args.repeats
    )
    print(
        f"{args.rows} rows x {args.dim}-d, {args.classes} classes, MLP hidden 4096, batch "
        f"{args.batch_size}, {args.epochs} epochs, {args.repeats} alternating pairs"
    )
    print(f"throughput Lightning / bare loop, median of per-pair ratios = {ratio} (target >= 0.8)")
    report_load("end")


if __name__ == "__main__":
    main()
