"""Shared fixtures: Hydra composition outside a Hydra app, and small synthetic datasets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from vitlab.data.synthetic.plantclef import PlantClefSyntheticSpec, generate_plantclef

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "configs")
os.environ.setdefault("WANDB_MODE", "disabled")

TINY_SPEC = PlantClefSyntheticSpec(
    seed=3,
    n_species=7,
    n_rare_species=1,
    max_images_per_species=18,
    min_images_per_species=12,
    n_quadrats=4,
    quadrat_size=(300, 380),
)
# a PlantCLEF run on `tiny_plantclef` with a 2-block 64 px ViT: seconds, not minutes
TINY_PLANTCLEF_RUN = [
    "prepare.image_size=64",
    "backbone.model_kwargs.img_size=64",
    "backbone.input_size=64",
    "backbone.model_kwargs.depth=2",
    "dataset.min_images_per_species=6",
    "dataset.synthetic=null",
]


def compose_config(config_name: str, overrides: list[str], root: Path) -> DictConfig:
    """Compose like `python <entry>.py overrides...` would, with `${hydra:...}` resolvable and
    every path under `root`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name,
            overrides=[f"hydra.run.dir={root}/run", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.cache_dir = str(root / "cache")
        cfg.paths.output_dir = str(root / "run")
    return cfg


@pytest.fixture(scope="session")
def tiny_plantclef(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic PlantCLEF dataset in the official layout (read-only for tests)."""
    return generate_plantclef(tmp_path_factory.mktemp("plantclef") / "data", TINY_SPEC)


def run_entry_point(entry: str, args: list[str], root: Path) -> subprocess.CompletedProcess:
    """`python <entry> args...` as a user runs it, offline, with every path under `root`."""
    return subprocess.run(
        [sys.executable, str(REPO / entry), *args, "logger=csv", f"hydra.run.dir={root}/run"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "VITLAB_ROOT": str(root), "WANDB_MODE": "disabled"},
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs CUDA (skipped where torch sees no GPU; benchmarks/gpu_check.py)"
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where torch sees a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback for the session (tests/postgres_server.py)."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install vitlab[postgres])")
    from tests.postgres_server import start_postgres

    try:
        server = start_postgres()
    except FileNotFoundError as err:
        pytest.skip(f"{err} (.ci/run installs Debian's postgresql)")
    yield server
    server.stop()
