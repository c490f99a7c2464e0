"""GroupViT fine-tuning: component freezing, optimiser recipe, loss wiring and the quickstart."""

from __future__ import annotations

import json
import logging
import math
import random
import re

import pytest
import torch

from tests.conftest import compose_config
from vitlab.data.coco_captions import collate_captions
from vitlab.errors import ConfigError
from vitlab.models.groupvit.checkpoints import load_groupvit
from vitlab.models.groupvit.model import GroupViT, tiny_spec
from vitlab.models.groupvit.text import CaptionLabeler
from vitlab.optim import warmup_cosine_factor
from vitlab.pipelines.groupvit import train_groupvit, validate_groupvit
from vitlab.tasks.groupvit import (
    COMPONENTS,
    GroupViTFineTuner,
    LossWeights,
    select_trainable,
    weight_decay_groups,
)

ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2}
WORDS = {"cat": "NN", "cats": "NNS", "dog": "NN", "car": "NN", "red": "JJ", "big": "JJ"}


def word_tagger(words):
    return [(w, WORDS.get(w, "DT")) for w in words]


def _batch(n: int = 4, pad: str = "pad", seed: int = 0) -> dict:
    captions = ["a red car and a cat", "two cats", "a big dog", "a cat near a red car"]
    labeler = CaptionLabeler(k=3, kind="nouns", pad=pad, tagger=word_tagger)
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        item = labeler(captions[i % len(captions)], random.Random(i))
        item["image"] = torch.randn(3, 64, 64, generator=gen)
        items.append(item)
    return collate_captions(items)


def test_warmup_then_cosine_cycles():
    f = [warmup_cosine_factor(s, warmup_steps=10, total_steps=110, cycles=2) for s in range(110)]
    assert f[0] == pytest.approx(0.0025)
    assert f[10] == pytest.approx(1.0)  # peak right after warm-up
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # linear ramp up
    assert f[60] == pytest.approx(1.0)  # second cycle restarts at the peak
    assert f[59] < 0.01 and f[109] < 0.01
    assert f[35] == pytest.approx(0.5, abs=0.02)  # half way down the first cosine
    single = warmup_cosine_factor(60, 10, 110, cycles=1, min_factor=0.1)
    assert single == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_split_follows_the_reference():
    model = GroupViT(tiny_spec())
    groups = {group["weight_decay"]: group for group in weight_decay_groups(model, 0.05)}
    decay, no_decay = groups[0.05], groups[0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "img_encoder.layers.0.blocks.0.attn.qkv.weight" in decayed
    for name in (
        "img_encoder.pos_embed",
        "img_encoder.layers.0.group_token",
        "logit_scale",
        "text_encoder.positional_embedding",
        "img_encoder.norm.weight",
        "img_projector.fc1.bias",
    ):
        assert name in skipped
    assert decayed.isdisjoint(skipped)
    assert len(decayed) + len(skipped) == len(names)


def test_component_selection_counts_and_rejects_unknown_names():
    model = GroupViT(tiny_spec())
    block1 = sum(p.numel() for p in model.img_encoder.layers[0].downsample.parameters())
    projector = sum(p.numel() for p in model.text_projector.parameters())
    assert select_trainable(model, ["grouping_block_1"]) == block1
    assert select_trainable(model, ["grouping_block_1", "text_projector"]) == block1 + projector
    total = sum(p.numel() for p in model.parameters())
    assert select_trainable(model, ["everything"]) == total
    with pytest.raises(ValueError, match="grouping_block_3"):
        select_trainable(model, ["grouping_block_3"])
    assert set(COMPONENTS) >= {"grouping_block_1", "grouping_block_2", "image_projector"}


def test_frozen_weights_and_buffers_stay_bit_identical_after_a_step():
    torch.manual_seed(0)
    model = GroupViT(tiny_spec())
    module = GroupViTFineTuner(
        model,
        ["grouping_block_2", "text_projector"],
        {"contrastive": 1.0, "multi_label": 1.0, "entropy": {"group": 1.0, "segment": 1.0}},
        ADAMW,
    )
    module.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.05), lr=1e-2)
    terms, _ = module.loss_terms(_batch())
    sum(terms.values()).backward()
    optimizer.step()
    trainable = ("img_encoder.layers.1.downsample.", "text_projector.")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "the trainable components did not move"
    assert all(k.startswith(trainable) for k in changed), sorted(changed)[:5]
    # the frozen image projector's BatchNorm statistics did not move either
    assert "img_projector.bn.running_mean" not in changed
    assert any(k.startswith("text_projector.bn.running") for k in changed)


def test_all_loss_terms_with_pad_labels_non_noisy_and_memory_bank():
    torch.manual_seed(1)
    module = GroupViTFineTuner(
        GroupViT(tiny_spec()),
        ["everything"],
        {
            "contrastive": 1.0,
            "multi_label": 1.0,
            "non_noisy": True,
            "memory_bank": 16,
            "entropy": {"group": 0.5, "label": 0.5, "segment": 0.5},
        },
        ADAMW,
    ).train()
    batch = _batch()
    assert not batch["label_mask"].all()  # some captions have fewer than 3 nouns -> <PAD>
    terms, _ = module.loss_terms(batch)
    assert set(terms) == {
        "contrastive",
        "multi_label",
        "group_entropy",
        "label_entropy",
        "segment_entropy",
    }
    assert all(torch.isfinite(v) for v in terms.values())
    assert 0 <= terms["group_entropy"] <= math.log(4) + 1e-5
    assert len(module.memory_bank) == int(batch["label_mask"].sum())
    second, _ = module.loss_terms(_batch(seed=1))  # now with bank negatives
    module._weighted_total(second).backward()
    grads = [p.grad for p in module.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_loss_weights_validation():
    assert LossWeights.from_config({"entropy": {"group": 2.0}}).group_entropy == 2.0
    with pytest.raises(ValueError, match="both 0"):
        LossWeights.from_config({"contrastive": 0, "multi_label": 0})
    with pytest.raises(ValueError, match="groupvit.losses"):
        LossWeights.from_config({"entropy": {"groups": 1.0}})
    with pytest.raises(ValueError, match="memory_bank"):
        LossWeights.from_config({"multi_label": 0, "memory_bank": 8})


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("groupvit.trainable=[grouping_block_3]", "groupvit.trainable"),
        ("groupvit.labels.kind=verbs", "groupvit.labels.kind"),
        ("groupvit.labels.pad=zero", "groupvit.labels.pad"),
        ("groupvit.labels.tagger=spacy", "groupvit.labels.tagger"),
        ("groupvit.labels.k=0", "groupvit.labels.k"),
        ("+groupvit.losses.entropy.groups=1", "groupvit.losses"),
    ],
)
def test_bad_overrides_fail_before_any_work(tmp_path, override, key):
    cfg = compose_config("train", ["experiment=quickstart_groupvit", override], tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_groupvit(cfg)


@pytest.mark.parametrize(
    "experiment",
    [
        "groupvit_finetune_baseline",
        "groupvit_labels_noun_phrases",
        "groupvit_labels_phrases_nouns_k5",
        "groupvit_labels_caption",
        "groupvit_refined_extraction",
        "groupvit_entropy_group",
        "groupvit_entropy_label",
        "groupvit_entropy_segment",
        "groupvit_entropy_all",
        "groupvit_384_group_entropy",
        "groupvit_final",
    ],
)
def test_thesis_recipes_compose_and_validate(tmp_path, experiment):
    cfg = compose_config("train", [f"experiment={experiment}", "dataset.root=/coco"], tmp_path)
    validate_groupvit(cfg)
    assert cfg.pipeline == "groupvit" and cfg.experiment_name == experiment
    if experiment == "groupvit_final":
        assert cfg.groupvit.losses.non_noisy and cfg.groupvit.image_size == 384
        assert cfg.groupvit.losses.entropy.group > 0


def test_quickstart_trains_and_writes_a_loadable_checkpoint(tmp_path, caplog):
    overrides = [
        "experiment=quickstart_groupvit",
        "trainer.max_epochs=2",
        "dataset.synthetic.n_train=48",
        "dataset.synthetic.n_val=16",
        "groupvit.batch_size=16",
        "groupvit.losses.entropy.group=0.1",
        "logger=csv",
    ]
    cfg = compose_config("train", overrides, tmp_path)
    with caplog.at_level(logging.INFO, logger="vitlab.progress"):
        summary = train_groupvit(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["groupvit_checkpoint"]
    assert summary["data"]["train"]["images"] == 48
    assert summary["parameters"]["trainable"] == summary["parameters"]["total"]
    for key in ("val/loss", "train/contrastive", "train/multi_label", "train/group_entropy"):
        assert math.isfinite(summary["fit_metrics"][key])
    model = load_groupvit(run / "groupvit.pt")
    assert model.spec == tiny_spec(  # groupvit/model=tiny_one_stage
        depths=(0, 0),
        num_group_tokens=(8, 0),
        num_output_groups=(8,),
        gumbel=False,
        projection_layers=1,
        group_residual=0.0,
    )
    untrained = load_groupvit(run / "groupvit_untrained.pt")
    assert untrained.spec == model.spec
    assert summary["groupvit_untrained_checkpoint"] == str(run / "groupvit_untrained.pt")
    assert any(not torch.equal(untrained.state_dict()[k], v) for k, v in model.state_dict().items())
    # a line per epoch, readable when output goes to a file: loss terms, rate, ETA
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2, lines
    assert re.search(
        r"^epoch 2/2 \| .*train/contrastive \d.*val/loss \d.* samples/s \| ETA 0m00s$", lines[-1]
    )
    from_lightning = load_groupvit(summary["best_checkpoint"])
    for key, value in model.state_dict().items():
        assert torch.equal(from_lightning.state_dict()[key], value)
    assert (run / "media" / "entropy_maps_epoch001.png").is_file()


def test_fit_trains_a_loaded_checkpoint_in_train_mode_and_keeps_frozen_statistics(tmp_path):
    import pytorch_lightning as pl

    from vitlab.models.groupvit.checkpoints import save_groupvit

    torch.manual_seed(2)
    model = load_groupvit(save_groupvit(GroupViT(tiny_spec()), tmp_path / "m.pt"))
    assert not model.training  # checkpoints load in eval mode
    module = GroupViTFineTuner(model, ["grouping_block_1"], {"contrastive": 1.0}, ADAMW)
    assert not model.multi_label_logit_scale.requires_grad  # its loss is off
    frozen_bn = model.img_projector.bn.running_mean.clone()
    block = model.img_encoder.layers[0].downsample.mlp_channels.fc1.weight.clone()
    modes = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((pl_module.model.training, pl_module.model.img_projector.bn.training))

    batches = torch.utils.data.DataLoader([_batch(seed=s) for s in range(2)], batch_size=None)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Record()],
        accelerator="cpu",
    )
    trainer.fit(module, train_dataloaders=batches)
    assert modes == [(True, False), (True, False)]  # Gumbel/drop-path on, frozen BN in eval
    assert torch.equal(model.img_projector.bn.running_mean, frozen_bn)
    assert not torch.equal(model.img_encoder.layers[0].downsample.mlp_channels.fc1.weight, block)


def test_sample_tagger_does_not_depend_on_the_global_random_state():
    from vitlab.models.groupvit import tagged_sample

    tags = []
    for seed in (1, 2):
        random.seed(seed)
        tagged_sample._trained_perceptron.cache_clear()
        tags.append(tagged_sample.SampleTrainedTagger()("a giraffe eats leaves".split()))
    assert tags[0] == tags[1]


def test_quickstart_model_and_findings_rows_compose(tmp_path):
    """The quickstart builds the one-stage tiny GroupViT with a linear projector and no group
    token in the segments; every row of experiments/groupvit_findings.py composes and validates
    (no training: the script itself is the benchmark)."""
    import importlib.util
    from pathlib import Path

    from vitlab.pipelines.groupvit import build_groupvit
    from vitlab.tasks.groupvit import select_trainable

    cfg = compose_config("train", ["experiment=quickstart_groupvit"], tmp_path)
    model = build_groupvit(cfg.groupvit.model)
    assert model.spec.projection_layers == 1 and model.spec.group_residual == 0.0
    assert model.spec.num_group_tokens == (8, 0) and not model.spec.gumbel
    assert cfg.dataset.synthetic.empty_fraction == 0.25
    seg = compose_config("infer", ["experiment=segment_synthetic_voc"], tmp_path)
    assert dict(seg.dataset.synthetic) == dict(cfg.dataset.synthetic)  # same generated folder

    path = Path(__file__).resolve().parents[1] / "experiments" / "groupvit_findings.py"
    module_spec = importlib.util.spec_from_file_location("groupvit_findings", path)
    findings = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(findings)
    for _, _, overrides in findings.ROWS + findings.FINETUNE_ROWS:
        row = compose_config("train", ["experiment=quickstart_groupvit", *overrides], tmp_path)
        validate_groupvit(row)
        assert select_trainable(build_groupvit(cfg.groupvit.model), list(row.groupvit.trainable))
