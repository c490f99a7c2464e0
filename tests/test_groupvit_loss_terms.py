"""The GroupViT loss terms are declared once (`TERMS`): each declaration's weight key is a key of
the recipe, reads the term's weight under every name users set, and the loss sums the weighted
terms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vitlab.tasks.groupvit import TERMS, LossWeights

FINETUNE = Path(__file__).resolve().parents[1] / "configs" / "groupvit" / "finetune.yaml"


def _nested(key: str, value: float) -> dict:
    section, _, leaf = key.rpartition(".")
    return {section: {leaf: value}} if section else {leaf: value}


def test_every_declared_weight_key_is_in_the_recipe_with_the_declared_default():
    losses = OmegaConf.load(FINETUNE).losses
    names = [term.name for term in TERMS]
    assert len(set(names)) == len(names)
    for term in TERMS:
        assert OmegaConf.select(losses, term.weight_key) == term.default, term.weight_key
        assert LossWeights.from_config({}).weight[term.name] == term.default
        if "affinity" in term.needs:
            assert "labels" in term.needs, term.name


@pytest.mark.parametrize("term", TERMS, ids=lambda term: term.name)
def test_a_term_weight_is_read_under_its_key_and_its_name(term):
    section = term.weight_key.rpartition(".")[0]
    spellings = [_nested(term.weight_key, 0.5), {term.name: 0.5}]
    if section:
        spellings.append({section: {term.name: 0.5}})
    for losses in spellings:
        weights = LossWeights.from_config({"contrastive": 1.0, "multi_label": 1.0, **losses})
        assert weights.weight[term.name] == 0.5 and getattr(weights, term.name) == 0.5
    if section:  # the section's value wins over a top-level one
        both = {term.name: 0.25, **_nested(term.weight_key, 0.5)}
        assert LossWeights.from_config(both).weight[term.name] == 0.5


def test_the_loss_is_the_sum_of_the_weighted_terms():
    from tests.test_groupvit_training import ADAMW, _batch
    from vitlab.models.groupvit.model import GroupViT, tiny_spec
    from vitlab.tasks.groupvit import GroupViTFineTuner

    torch.manual_seed(0)
    losses = {"multi_label": 2.0, "entropy": {"group": 0.5, "label": 0.25, "segment": 0.125}}
    module = GroupViTFineTuner(GroupViT(tiny_spec()), ["everything"], losses, ADAMW).eval()
    with torch.no_grad():
        terms, _ = module.loss_terms(_batch())
    assert list(terms) == [term.name for term in TERMS]
    weighted = module.weighted_terms(terms)
    for term in TERMS:
        expected = module.weights.weight[term.name] * terms[term.name]
        assert torch.equal(weighted[term.name], expected)
    assert torch.equal(module._weighted_total(terms), sum(weighted.values()))
