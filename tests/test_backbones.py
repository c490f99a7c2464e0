import argparse

import numpy as np
import pytest
import timm
import torch

from vitlab.models.backbones import create_backbone, preprocess_batch
from vitlab.pipelines.plantclef.predict import BackboneClassifierPredictor

TINY_VIT = {"img_size": 64, "depth": 2, "reg_tokens": 4}  # the PlantNet model's shape, tiny


def _plantnet_checkpoint(tmp_path, num_classes=7, prefix=""):
    """A timm training checkpoint in the PlantNet format: dict with state_dict (+ training
    extras) and class_mapping.txt beside it."""
    torch.manual_seed(1)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY_VIT
    )
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "model_best.pth.tar"
    torch.save(
        {"epoch": 3, "arch": "vit", "state_dict": state, "args": argparse.Namespace(lr=0.1)}, path
    )
    species = [1390000 + 7 * i for i in range(num_classes)]
    (tmp_path / "class_mapping.txt").write_text("\n".join(map(str, species)) + "\n")
    return model.eval(), path, species


@pytest.mark.parametrize("prefix", ["", "module."])
def test_plantnet_checkpoint_logits_equal_timm(tmp_path, prefix):
    reference, path, species = _plantnet_checkpoint(tmp_path, prefix=prefix)
    backbone = create_backbone(
        "timm", name="vit_tiny_patch16_224", checkpoint_path=str(path), model_kwargs=TINY_VIT
    )
    assert backbone.num_classes == 7  # read from the checkpoint, not configured
    assert backbone.class_ids == species
    assert backbone.num_prefix_tokens == 5  # CLS + 4 registers
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(backbone.classify(x), reference(x))
        torch.testing.assert_close(
            backbone.forward_tokens(x)[:, 0], reference.forward_features(x)[:, 0]
        )
    predictor = BackboneClassifierPredictor(backbone)
    assert predictor.species_ids == species
    probs = predictor.probabilities(x)
    assert probs.shape == (2, 7) and torch.allclose(probs.sum(1), torch.ones(2))


def test_checkpoint_errors(tmp_path):
    _, path, _ = _plantnet_checkpoint(tmp_path)
    (tmp_path / "class_mapping.txt").write_text("1\n2\n")
    with pytest.raises(ValueError, match="lists 2 species but the classifier has 7"):
        create_backbone(
            "timm", name="vit_tiny_patch16_224", checkpoint_path=str(path), model_kwargs=TINY_VIT
        )
    with pytest.raises(ValueError, match="does not fit"):
        create_backbone(
            "timm",
            name="vit_tiny_patch16_224",
            checkpoint_path=str(path),
            model_kwargs={"img_size": 64, "depth": 3},
        )
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        create_backbone(
            "timm", name="vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "nope.pth")
        )
    with pytest.raises(ValueError, match="backbone.kind"):
        create_backbone("onnx", name="x")


def test_random_init_is_reproducible_and_identified():
    a = create_backbone(
        "timm", name="vit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 1}
    )
    b = create_backbone(
        "timm", name="vit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 1}
    )
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(a.forward_tokens(x), b.forward_tokens(x))
    assert a.identity() == b.identity()
    c = create_backbone(
        "timm", name="vit_tiny_patch16_224", seed=1, model_kwargs={"img_size": 32, "depth": 1}
    )
    assert c.identity() != a.identity()


def test_cnn_backbone_tokens():
    backbone = create_backbone("timm", name="resnet18", input_size=64)
    with torch.inference_mode():
        tokens = backbone.forward_tokens(torch.randn(1, 3, 64, 64))
    assert tokens.shape == (1, 4, 512) and backbone.num_prefix_tokens == 0


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_from_local_directory(tmp_path, registers):
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=56,
        patch_size=14,
    )
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs))
    else:
        model = Dinov2Model(Dinov2Config(**kwargs))
    model.save_pretrained(tmp_path / "dinov2")
    backbone = create_backbone("hf", model_id=str(tmp_path / "dinov2"), input_size=56)
    assert backbone.num_prefix_tokens == 1 + registers and backbone.embed_dim == 32
    pixels = preprocess_batch(np.zeros((2, 40, 40, 3), np.uint8), backbone.input_spec)
    assert pixels.shape == (2, 3, 56, 56)
    with torch.inference_mode():
        tokens = backbone.forward_tokens(pixels)
        expected = model.eval()(pixel_values=pixels).last_hidden_state
    assert tokens.shape == (2, 1 + registers + 16, 32)
    torch.testing.assert_close(tokens, expected)
    assert "weights" in backbone.identity()
    with pytest.raises(ValueError, match="no classifier"):
        backbone.classify(pixels)


def test_preprocess_matches_torchvision_to_tensor_then_normalize():
    """The fused uint8 multiply-add equals the reference transform, per image, and is a
    contiguous NCHW tensor (a channels-last one slows the patch embedding)."""
    from torchvision.transforms import Normalize, ToTensor

    from vitlab.models.backbones import InputSpec

    spec = InputSpec(size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    images = np.random.default_rng(0).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    reference = torch.stack([Normalize(spec.mean, spec.std)(ToTensor()(im)) for im in images])
    pixels = preprocess_batch(images, spec)
    assert pixels.dtype == torch.float32 and pixels.is_contiguous()
    torch.testing.assert_close(pixels, reference, atol=1e-5, rtol=0)
