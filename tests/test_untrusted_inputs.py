"""Untrusted code never runs by default: checkpoints load with the allow-listed unpickler, every
`_target_` in a config tree is checked, and the hub/W&B never hang or phone home when offline."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf

from tests.conftest import run_entry_point
from vitlab.cli import main as vitlab_cli
from vitlab.config import instantiate_node, set_extra_target_prefixes
from vitlab.errors import ConfigError
from vitlab.models.backbones import create_backbone
from vitlab.models.groupvit.checkpoints import (
    CheckpointError,
    load_groupvit,
    nvlabs_payload,
    save_groupvit,
)
from vitlab.models.groupvit.model import GroupViT, tiny_spec
from vitlab.pipelines.plantclef import load_head_predictor
from vitlab.safe_load import UnsafeCheckpointError

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = {"img_size": 64, "depth": 2, "reg_tokens": 4}


class RunsCode:
    """Unpickling this runs `os.mkdir(path)`: a harmless stand-in for a crafted payload."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _timm_release_checkpoint(path: Path, extra: dict | None = None) -> Path:
    """timm's train.py format (the PlantNet release): args Namespace, numpy metric."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY_VIT)
    payload = {
        "epoch": 3,
        "arch": "vit_tiny_patch16_224",
        "state_dict": model.state_dict(),
        "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
        "version": 2,
        "args": argparse.Namespace(lr=0.1, model="vit", crop_pct=None, mean=(0.5, 0.5, 0.5)),
        "metric": np.float64(71.5),
        **(extra or {}),
    }
    torch.save(payload, path)
    return path


def test_timm_release_checkpoint_loads_without_opt_in(tmp_path):
    path = _timm_release_checkpoint(tmp_path / "model_best.pth.tar")
    backbone = create_backbone(
        "timm", name="vit_tiny_patch16_224", checkpoint_path=str(path), model_kwargs=TINY_VIT
    )
    assert backbone.num_classes == 3


def test_crafted_backbone_checkpoint_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "code-ran"
    path = _timm_release_checkpoint(tmp_path / "crafted.pth", {"x": RunsCode(marker)})
    kwargs = {
        "name": "vit_tiny_patch16_224",
        "checkpoint_path": str(path),
        "model_kwargs": TINY_VIT,
    }
    with pytest.raises(UnsafeCheckpointError, match=r"posix.mkdir.*backbone.trust_checkpoint=true"):
        create_backbone("timm", **kwargs)
    assert not marker.exists()
    # through the config path the user gets a ConfigError naming the key (exit 2)
    node = OmegaConf.create({"_target_": "vitlab.models.backbones.create_backbone", "kind": "timm"})
    node.merge_with(kwargs)
    with pytest.raises(ConfigError, match="backbone.trust_checkpoint"):
        instantiate_node(node, "backbone")
    assert not marker.exists()
    backbone = create_backbone("timm", trust_checkpoint=True, **kwargs)  # explicit opt-in
    assert marker.is_dir() and backbone.num_classes == 3


def test_nvlabs_release_format_loads_and_crafted_groupvit_files_are_refused(tmp_path, capsys):
    model = GroupViT(tiny_spec()).eval()
    config = OmegaConf.create({"model": {"type": "MultiLabelContrastive"}, "train": {"lr": 1e-3}})
    payload = {**nvlabs_payload(model), "config": config, "epoch": 29, "metrics": {"miou": 0.5}}
    torch.save(payload, tmp_path / "group_vit_gcc_yfcc_30e.pth")
    loaded = load_groupvit(tmp_path / "group_vit_gcc_yfcc_30e.pth")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)

    marker = tmp_path / "code-ran"
    torch.save({**payload, "x": RunsCode(marker)}, tmp_path / "crafted.pth")
    save_groupvit(model, tmp_path / "ours.pt")
    crafted_ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    torch.save({**crafted_ours, "x": RunsCode(marker)}, tmp_path / "crafted.pt")
    for name in ("crafted.pth", "crafted.pt"):
        with pytest.raises(CheckpointError, match="trust_checkpoint"):
            load_groupvit(tmp_path / name)
        assert vitlab_cli(["groupvit", "info", str(tmp_path / name)]) == 2
        assert "pass --trust-checkpoint" in capsys.readouterr().err
    assert not marker.exists()
    assert vitlab_cli(["groupvit", "info", str(tmp_path / "crafted.pt"), "--trust-checkpoint"]) == 0
    assert marker.is_dir()


def test_segmentation_with_crafted_checkpoint_exits_2_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    save_groupvit(GroupViT(tiny_spec()), tmp_path / "ours.pt")
    payload = torch.load(tmp_path / "ours.pt", weights_only=True)
    torch.save({**payload, "x": RunsCode(marker)}, tmp_path / "crafted.pt")
    args = [
        "pipeline=segmentation",
        "experiment=segment_synthetic_voc",
        f"ckpt_path={tmp_path / 'crafted.pt'}",
        "dataset.synthetic.n_train=2",
        "dataset.synthetic.n_val=2",
        "dataset.synthetic.image_size=40",
    ]
    out = run_entry_point("infer.py", args, tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "segmentation.trust_checkpoint=true" in out.stdout + out.stderr
    assert not marker.exists()


def test_crafted_lightning_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"x": RunsCode(marker)}}, tmp_path / "best.ckpt"
    )
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_head_predictor(tmp_path / "best.ckpt")
    assert not marker.exists()


def test_every_nested_target_is_checked(tmp_path):
    victim = tmp_path / "opened-by-config"
    node = OmegaConf.create(
        {
            "_target_": "vitlab.inference.plantclef.GridArgmax",
            "grid_size": 3,
            "extra": {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
        }
    )
    with pytest.raises(ConfigError, match=r"inference\.extra\._target_='builtins.open'"):
        instantiate_node(node, "inference")
    listed = OmegaConf.create(
        {"_target_": "torch.nn.Sequential", "_args_": [{"_target_": "os.getcwd"}]}
    )
    with pytest.raises(ConfigError, match=r"layers\._args_\[0\]\._target_='os.getcwd'"):
        instantiate_node(listed, "layers")
    assert not victim.exists()


def test_extra_target_prefixes_extend_the_allow_list():
    node = OmegaConf.create({"_target_": "collections.OrderedDict", "a": 1})
    with pytest.raises(ConfigError, match="extra_target_prefixes"):
        instantiate_node(node, "thing")
    try:
        set_extra_target_prefixes(["collections."])
        assert instantiate_node(node, "thing") == {"a": 1}
        for bad in ("", "c", "collections"):
            with pytest.raises(ConfigError, match="package prefix ending in"):
                set_extra_target_prefixes([bad])
    finally:
        set_extra_target_prefixes([])


def test_nested_target_on_the_command_line_exits_2(tmp_path):
    victim = tmp_path / "opened-by-config"
    target = f"+inference.extra={{_target_:builtins.open,file:{victim},mode:w}}"
    out = run_entry_point("train.py", [target], tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "inference.extra._target_" in out.stdout + out.stderr
    assert not victim.exists()


@pytest.fixture
def silent_endpoint():
    """A server that accepts connections and never answers (a black-holing proxy)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


HUB_SCRIPT = """
import time
from vitlab.errors import ConfigError
from vitlab.models.backbones import create_backbone
from vitlab.models.groupvit.checkpoints import CheckpointError, load_groupvit
start = time.perf_counter()
for load in (lambda: create_backbone("hf", model_id="facebook/dinov2-small"),
             lambda: load_groupvit("nvidia/groupvit-gcc-yfcc")):
    try:
        load()
        print("LOADED")
    except (ConfigError, CheckpointError) as err:
        print("ERROR", err)
print("SECONDS", time.perf_counter() - start)
"""


@pytest.mark.parametrize("route", ["endpoint", "proxy"])
def test_unreachable_hub_fails_fast_naming_the_offline_way(route, silent_endpoint, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    if route == "endpoint":
        env["HF_ENDPOINT"] = silent_endpoint
    else:
        env.update(HTTPS_PROXY=silent_endpoint, HTTP_PROXY=silent_endpoint, NO_PROXY="")
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    wall = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED" not in out.stdout
    assert "backbone.model_id=facebook/dinov2-small" in out.stdout
    assert "backbone.model_id=<its folder>" in out.stdout
    assert "nvidia/groupvit-gcc-yfcc" in out.stdout and "--local-dir" in out.stdout
    assert wall < 30, f"took {wall:.1f} s"


WANDB_SCRIPT = """
import tempfile
from pathlib import Path
from omegaconf import OmegaConf
from vitlab.tracking import RunTracker
cfg = OmegaConf.create({"wandb": {"mode": "offline", "project": "p", "entity": None,
                                  "group": None, "tags": [], "name": None}})
tracker = RunTracker(cfg, Path(tempfile.mkdtemp()), "train", OmegaConf.create({"a": 1}))
tracker.log_metrics({"x": 1.0})
tracker.finish()
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_offline_wandb_makes_no_network_call(tmp_path):
    """With WANDB_MODE unset and the config's offline default, no process W&B starts resolves or
    connects to anything off this machine (it looked up its API host before)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    trace = tmp_path / "trace"
    out = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace), sys.executable]
        + ["-c", WANDB_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    calls = [line for line in trace.read_text().splitlines() if "AF_INET" in line]
    remote = [c for c in calls if "127.0.0.1" not in c and "::1" not in c]
    assert not remote, remote[:5]
