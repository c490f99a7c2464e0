"""GroupViT options of issue 12 (item 9): where the non-noisy loss finds its pairs (the global
multi-GPU batch or each GPU's mini-batch, the thesis's choice), and a `transformers` export that
loads as a full HF model (config token ids, tokenizer, image processor), offline."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

# only what the spawned ranks need at import time (they re-import this module)
from vitlab.data.coco_captions import collate_captions, eval_transform
from vitlab.models.groupvit.model import GroupViT, tiny_spec
from vitlab.models.groupvit.text import EOT_TOKEN, SOT_TOKEN, CaptionLabeler, ClipTokenizer
from vitlab.tasks.groupvit import GroupViTFineTuner, LossWeights

# --- non-noisy scope -----------------------------------------------------------------------------

ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2}
TAGS = {"cat": "NN", "car": "NN", "dog": "NN", "boat": "NN", "sky": "NN"}
# rank 0 holds images 0-1, rank 1 images 2-3: "cat" and "car" repeat across the two ranks only,
# so the global and the per-rank non-noisy positives differ
CAPTIONS = ["a car and a cat", "a dog", "a boat under the sky", "a cat near a car"]


def _tagger(words):
    return [(w, TAGS.get(w, "DT")) for w in words]


def _batch(rows: slice = slice(None)) -> dict:
    labeler = CaptionLabeler(k=2, kind="nouns", pad="pad", tagger=_tagger)
    gen = torch.Generator().manual_seed(0)
    items = []
    for i, caption in enumerate(CAPTIONS):
        item = labeler(caption, random.Random(i))
        item["image"] = torch.randn(3, 64, 64, generator=gen)
        items.append(item)
    return collate_captions(items[rows])


def _module(scope: str, memory_bank: int = 0) -> GroupViTFineTuner:
    torch.manual_seed(0)  # identical weights on every rank and in the parent
    losses = {"contrastive": 1.0, "multi_label": 1.0, "non_noisy": True, "non_noisy_scope": scope}
    losses["memory_bank"] = memory_bank
    # eval: no Gumbel noise, BatchNorm on running statistics, so every embedding depends on its
    # own sample only and a half batch embeds exactly as inside the full batch
    return GroupViTFineTuner(GroupViT(tiny_spec()), ["everything"], losses, ADAMW).eval()


def _scope_worker(rank, world, init_file, result_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        half = _batch(slice(2 * rank, 2 * rank + 2))
        out = {}
        for scope in ("global", "local"):
            with torch.no_grad():
                terms, _ = _module(scope).loss_terms(half)
            out[scope] = {name: float(value) for name, value in terms.items()}
        # training with a bank: each rank's loss is local, but every rank enqueues the global
        # batch, so the banks stay identical
        banked = _module("local", memory_bank=16).train()
        with torch.no_grad():
            banked.loss_terms(half)
        out["bank"] = {
            "labels": banked.memory_bank.labels(),
            "queue": banked.memory_bank.negatives().tolist(),
        }
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_non_noisy_scope_local_uses_each_rank_mini_batch(tmp_path):
    """Two gloo ranks, two images each. global: every rank's non-noisy loss is the loss of the
    4-image batch; local: each rank's loss is that of its own 2 images (what the thesis's code
    computes on each GPU), while the image-caption loss stays global in both."""
    import torch.multiprocessing as mp

    with torch.no_grad():
        full, _ = _module("global").loss_terms(_batch())
        halves = [_module("local").loss_terms(_batch(slice(r, r + 2)))[0] for r in (0, 2)]
    full_ml, half_ml = float(full["multi_label"]), [float(h["multi_label"]) for h in halves]
    assert abs(full_ml - sum(half_ml) / 2) > 1e-3  # the two scopes are different losses

    mp.spawn(_scope_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["global"]["multi_label"] == pytest.approx(full_ml, abs=1e-5)
        assert got["local"]["multi_label"] == pytest.approx(half_ml[rank], abs=1e-5)
        for scope in ("global", "local"):
            assert got[scope]["contrastive"] == pytest.approx(float(full["contrastive"]), abs=1e-5)
    banks = [json.loads((tmp_path / f"rank{r}.json").read_text())["bank"] for r in (0, 1)]
    assert banks[0] == banks[1]
    assert banks[0]["labels"] == ["car", "cat", "dog", "boat", "sky", "cat", "car"]  # no <PAD>


def test_non_noisy_scope_is_validated():
    assert LossWeights.from_config({}).non_noisy_scope == "global"
    local = LossWeights.from_config({"non_noisy": True, "non_noisy_scope": "local"})
    assert local.local_multi_label
    with pytest.raises(ValueError, match="non_noisy_scope must be one of"):
        LossWeights.from_config({"non_noisy": True, "non_noisy_scope": "node"})
    with pytest.raises(ValueError, match="non_noisy=true"):
        LossWeights.from_config({"non_noisy_scope": "local"})


def test_groupvit_final_uses_per_gpu_pairs_and_the_default_stays_global(tmp_path):
    from tests.conftest import compose_config
    from vitlab.errors import ConfigError
    from vitlab.pipelines.groupvit import validate_groupvit

    cfg = compose_config("train", ["experiment=groupvit_final", "dataset.root=/coco"], tmp_path)
    validate_groupvit(cfg)
    assert cfg.groupvit.losses.non_noisy and cfg.groupvit.losses.non_noisy_scope == "local"
    base = compose_config(
        "train", ["experiment=groupvit_finetune_baseline", "dataset.root=/coco"], tmp_path
    )
    assert base.groupvit.losses.non_noisy_scope == "global"
    bad = compose_config(
        "train",
        [
            "experiment=groupvit_finetune_baseline",
            "dataset.root=/coco",
            "groupvit.losses.non_noisy_scope=local",
        ],
        tmp_path,
    )
    with pytest.raises(ConfigError, match="non_noisy_scope"):
        validate_groupvit(bad)


# --- transformers export -------------------------------------------------------------------------

EXPORT_CAPTIONS = [
    "A red car and a cat.",
    "two cats, sleeping on 3 sofas!",
    "Don't   stop:  a café's X-ray of 1984 (naïve résumé)",
    " ".join(["word"] * 100),  # longer than the context: cut, EOT kept last
]


def test_transformers_export_is_a_full_hf_model_offline(tmp_path, monkeypatch):
    from transformers import (
        AutoProcessor,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPTokenizer,
        CLIPTokenizerFast,
        GroupViTModel,
    )

    from vitlab.cli import main
    from vitlab.models.backbones import IMAGENET_MEAN, IMAGENET_STD
    from vitlab.models.groupvit.checkpoints import load_groupvit, save_groupvit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(5)
    ours = GroupViT(tiny_spec()).eval()
    out = tmp_path / "hf"
    assert main(["groupvit", "export", str(save_groupvit(ours, tmp_path / "m.pt")), str(out)]) == 0
    assert {"config.json", "vocab.json", "merges.txt"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # staging removed

    tokenizer = CLIPTokenizer.from_pretrained(out)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (SOT_TOKEN, EOT_TOKEN)
    assert tokenizer.model_max_length == ours.spec.context_length
    text_config = json.loads((out / "config.json").read_text())["text_config"]
    assert text_config["bos_token_id"] == SOT_TOKEN
    assert text_config["eos_token_id"] == EOT_TOKEN
    assert text_config["pad_token_id"] == tokenizer.pad_token_id

    # the tokenizer gives our ids: identical up to EOT, then padding
    ids = ClipTokenizer()(EXPORT_CAPTIONS)
    for loaded in (
        tokenizer,
        CLIPTokenizerFast.from_pretrained(out),
        AutoTokenizer.from_pretrained(out),
    ):
        hf_ids = loaded(EXPORT_CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
        hf_ids = hf_ids["input_ids"]
        assert hf_ids.shape == ids.shape
        for row in range(len(EXPORT_CAPTIONS)):
            n = int((ids[row] == EOT_TOKEN).nonzero()[0]) + 1
            assert hf_ids[row, :n].tolist() == ids[row, :n].tolist(), EXPORT_CAPTIONS[row]
            assert (hf_ids[row, n:] == tokenizer.pad_token_id).all()

    processor = AutoProcessor.from_pretrained(out)
    image_processor = processor.image_processor
    assert isinstance(image_processor, CLIPImageProcessor)
    size = ours.spec.image_size
    assert dict(image_processor.crop_size) == {"height": size, "width": size}
    assert dict(image_processor.size) == {"shortest_edge": size}
    assert list(image_processor.image_mean) == pytest.approx(list(IMAGENET_MEAN))
    assert list(image_processor.image_std) == pytest.approx(list(IMAGENET_STD))

    # processor + HF model = our pipeline + our model
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in "ab"]
    inputs = processor(
        text=EXPORT_CAPTIONS,
        images=images,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    pixels = torch.stack([eval_transform(size)(image) for image in images])
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-5, rtol=0)
    hf = GroupViTModel.from_pretrained(out).eval()
    with torch.no_grad():
        expected = ours(pixels, ids)
        got = hf(**inputs)
    torch.testing.assert_close(got.text_embeds, expected["text_embeds"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.image_embeds, expected["image_embeds"], atol=1e-5, rtol=0)

    again = load_groupvit(out)  # the extra files do not disturb strict loading
    for key, value in ours.state_dict().items():
        if key != "multi_label_logit_scale":
            assert torch.equal(again.state_dict()[key], value)


def test_transformers_export_without_processor_and_with_a_foreign_vocabulary(tmp_path, capsys):
    from vitlab.cli import main
    from vitlab.models.groupvit.checkpoints import save_groupvit

    source = save_groupvit(GroupViT(tiny_spec()), tmp_path / "m.pt")
    assert main(["groupvit", "export", str(source), str(tmp_path / "w"), "--no-processor"]) == 0
    assert not (tmp_path / "w" / "vocab.json").exists()
    assert (tmp_path / "w" / "config.json").is_file()
    odd = save_groupvit(GroupViT(tiny_spec(vocab_size=1000)), tmp_path / "odd.pt")
    assert main(["groupvit", "export", str(odd), str(tmp_path / "o")]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_logit_scale_max_plain_overrides_reach_the_model(tmp_path):
    """`groupvit.model.overrides.logit_scale_max` composes without `+` in every model config:
    `default` is DEFAULT_LOGIT_SCALE_MAX and wins over the clamp an older vitlab checkpoint
    saved (the config won before the key became a sentinel); a number or null (no clamp) reach
    the model; a bad value is a ConfigError naming the key."""
    import re
    from pathlib import Path

    import yaml

    from tests.conftest import compose_config
    from vitlab.errors import ConfigError
    from vitlab.models.groupvit.model import DEFAULT_LOGIT_SCALE_MAX
    from vitlab.pipelines.groupvit import build_groupvit, validate_groupvit

    models = Path(__file__).resolve().parents[1] / "configs" / "groupvit" / "model"
    for path in models.glob("*.yaml"):
        overrides = yaml.safe_load(path.read_text()).get("overrides")
        inherited = "defaults" in path.read_text()
        assert inherited or overrides["logit_scale_max"] == "default", path.name

    key = "groupvit.model.overrides.logit_scale_max"
    base = ["experiment=quickstart_groupvit"]
    cfg = compose_config("train", base, tmp_path)
    assert build_groupvit(cfg.groupvit.model).logit_scale_max == DEFAULT_LOGIT_SCALE_MAX == 100.0
    for value, clamp in [("50", 50.0), ("null", None)]:
        cfg = compose_config("train", [*base, f"{key}={value}"], tmp_path)
        assert build_groupvit(cfg.groupvit.model).logit_scale_max == clamp

    # an older vitlab checkpoint saved its clamp in its spec: the config's clamp wins
    model = GroupViT(tiny_spec())
    legacy = {"groupvit_spec": {**model.spec.to_dict(), "logit_scale_max": 50.0}}
    torch.save({**legacy, "state_dict": model.state_dict()}, tmp_path / "old.pt")
    source = [*base, f"groupvit.model.source={tmp_path / 'old.pt'}", "groupvit.model.kind=vitlab"]
    cfg = compose_config("train", source, tmp_path)
    assert build_groupvit(cfg.groupvit.model).logit_scale_max == 100.0
    cfg = compose_config("train", [*source, f"{key}=null"], tmp_path)
    assert build_groupvit(cfg.groupvit.model).logit_scale_max is None

    for bad in ("0", "-3", "huge"):
        cfg = compose_config("train", [*base, "dataset.root=/coco", f"{key}={bad}"], tmp_path)
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}="):
            validate_groupvit(cfg)
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}="):
            build_groupvit(cfg.groupvit.model)
