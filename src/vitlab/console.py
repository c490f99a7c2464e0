"""What a run prints for a person at its start: the resolved config as a tree (rich)."""

from __future__ import annotations

from typing import IO

import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from vitlab.secrets import mask_secrets

FIRST = ("pipeline", "experiment_name", "dataset", "backbone", "features", "head", "loss")


def config_tree(cfg: DictConfig) -> rich.tree.Tree:
    """One branch per top-level key (the pipeline's main groups first), each as YAML; Hydra's
    own settings are left out (they are in <run>/.hydra/hydra.yaml)."""
    tree = rich.tree.Tree("config", style="bold")
    keys = [k for k in FIRST if k in cfg] + sorted(k for k in cfg if k not in (*FIRST, "hydra"))
    for key in keys:
        node = cfg[key]
        if isinstance(node, DictConfig):
            text = OmegaConf.to_yaml(node, resolve=True)
        else:
            text = str(node)
        branch = tree.add(str(key), style="bold cyan")
        shown = mask_secrets(text.rstrip()) or "null"  # a password in a URL is printed as ***
        branch.add(rich.syntax.Syntax(shown, "yaml", theme="ansi_dark"))
    return tree


def print_config(cfg: DictConfig, file: IO[str] | None = None) -> None:
    Console(file=file, soft_wrap=True).print(config_tree(cfg))
