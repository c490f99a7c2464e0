"""Our GroupViT against `transformers.GroupViTModel` as an independent oracle, checkpoint
round trips, interpolation, straight-through assignment and the logit-scale clamp."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GroupViTConfig, GroupViTModel

from vitlab.models.groupvit.checkpoints import (
    CheckpointError,
    export_transformers,
    hf_config_from_spec,
    load_groupvit,
    load_hf_state_dict,
    save_groupvit,
    spec_from_hf_config,
    to_hf_state_dict,
    to_nvlabs_state_dict,
)
from vitlab.models.groupvit.model import (
    GroupViT,
    GroupViTSpec,
    gumbel_hard_assignment,
    hard_one_hot,
    interpolate_pos_embed,
    patch_group_attention,
    tiny_spec,
)

SOT, EOT = 49406, 49407


def _tokens(n: int, length: int = 77, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, length, dtype=torch.long)
    for row in range(n):
        words = 2 + row % 5
        tokens[row, 0] = SOT
        tokens[row, 1 : 1 + words] = torch.randint(1, 49000, (words,), generator=gen)
        tokens[row, 1 + words] = EOT
    return tokens


def _compare_with_oracle(hf: GroupViTModel, ours: GroupViT, image_size: int) -> None:
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    tokens = _tokens(3)
    with torch.no_grad():
        expected = hf(input_ids=tokens, pixel_values=pixels, output_attentions=True)
        got = ours(pixels, tokens)
        encoding = ours.encode_image(pixels)
    torch.testing.assert_close(got["image_embeds"], expected.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["text_embeds"], expected.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        got["logits_per_image"], expected.logits_per_image, atol=1e-4, rtol=1e-5
    )
    oracle_maps = expected.vision_model_output.attentions
    assert len(oracle_maps) == len(encoding.soft_maps) == 2
    for oracle, ours_map in zip(oracle_maps, encoding.soft_maps):
        torch.testing.assert_close(ours_map, oracle, atol=1e-5, rtol=0)


def test_released_architecture_matches_transformers_oracle():
    torch.manual_seed(0)
    hf = GroupViTModel(GroupViTConfig()).eval()
    spec = spec_from_hf_config(hf.config)
    assert spec.depths == (6, 3, 3) and spec.num_group_tokens == (64, 8, 0)
    ours = load_hf_state_dict(GroupViT(spec), hf.state_dict()).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in hf.parameters()) + 1  # + multi-label scale
    assert 55e6 < n_params < 56.5e6
    _compare_with_oracle(hf, ours, 224)


def test_tiny_spec_round_trips_through_transformers_config():
    spec = tiny_spec()
    hf = GroupViTModel(hf_config_from_spec(spec)).eval()
    assert spec_from_hf_config(hf.config).to_dict() == {**spec.to_dict(), "drop_path_rate": 0.0}
    ours = load_hf_state_dict(GroupViT(spec), hf.state_dict()).eval()
    _compare_with_oracle(hf, ours, spec.image_size)


def test_export_to_transformers_and_load_back(tmp_path):
    torch.manual_seed(3)
    ours = GroupViT(tiny_spec()).eval()
    out = export_transformers(ours, tmp_path / "hf")
    hf = GroupViTModel.from_pretrained(str(out)).eval()
    _compare_with_oracle(hf, ours, 64)
    again = load_groupvit(out)  # auto-detects a transformers directory
    for key, value in ours.state_dict().items():
        if key != "multi_label_logit_scale":
            torch.testing.assert_close(again.state_dict()[key], value, atol=0, rtol=0)


def test_nvlabs_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(4)
    ours = GroupViT(tiny_spec()).eval()
    state = to_nvlabs_state_dict(ours)
    assert state["img_projector.linear_hidden.0.weight"].ndim == 3  # Conv1d(k=1) as released
    assert "text_encoder.transformer.resblocks.0.attn.in_proj_weight" in state
    path = tmp_path / "group_vit_gcc_yfcc_30e.pth"
    torch.save({"model": state, "epoch": 29}, path)
    loaded = load_groupvit(path, spec_overrides={"num_heads": 2, "text_heads": 2})
    # drop-path is a training setting, not in the weights: NVlabs' 0.1 unless overridden
    assert loaded.spec.to_dict() == {**ours.spec.to_dict(), "drop_path_rate": 0.1}
    pixels, tokens = torch.randn(2, 3, 64, 64), _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels, tokens), ours(pixels, tokens))

    torch.save({"model": {**state, "img_encoder.extra.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="img_encoder.extra.weight"):
        load_groupvit(path, spec_overrides={"num_heads": 2, "text_heads": 2})
    del state["img_encoder.norm.bias"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="img_encoder.norm.bias"):
        load_groupvit(path, spec_overrides={"num_heads": 2, "text_heads": 2})


def test_transformers_state_dict_with_wrong_shapes_is_refused():
    hf_state = to_hf_state_dict(GroupViT(tiny_spec()))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_hf_state_dict(GroupViT(tiny_spec(embed_dim=32)), hf_state)


def test_vitlab_checkpoint_round_trip(tmp_path):
    model = GroupViT(tiny_spec(), logit_scale_max=50.0).eval()
    loaded = load_groupvit(save_groupvit(model, tmp_path / "m.pt"))
    assert loaded.spec == model.spec
    assert "logit_scale_max" not in model.spec.to_dict()  # a runtime setting, not architecture
    assert loaded.logit_scale_max == 100.0
    clamp = {"logit_scale_max": None}
    assert load_groupvit(tmp_path / "m.pt", spec_overrides=clamp).logit_scale_max is None
    # a checkpoint written when the clamp was in the spec keeps its clamp
    legacy = {"groupvit_spec": {**model.spec.to_dict(), "logit_scale_max": 50.0}}
    torch.save({**legacy, "state_dict": model.state_dict()}, tmp_path / "old.pt")
    assert load_groupvit(tmp_path / "old.pt").logit_scale_max == 50.0
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_position_embedding_interpolation():
    pos = torch.randn(1, 196, 8)
    assert interpolate_pos_embed(pos, (14, 14)) is pos  # identity at 224
    resized = interpolate_pos_embed(pos, (24, 24))
    assert resized.shape == (1, 576, 8)
    # bicubic with align_corners=False on a constant field stays constant
    flat = torch.ones(1, 196, 8)
    torch.testing.assert_close(interpolate_pos_embed(flat, (24, 20)), torch.ones(1, 480, 8))


def test_model_runs_at_384_with_interpolated_positions():
    spec = tiny_spec(image_size=64, patch_size=16)  # 4x4 grid at 64 px, 24x24 at 384
    model = GroupViT(spec).eval()
    with torch.no_grad():
        encoding = model.encode_image(torch.randn(1, 3, 384, 384))
    assert encoding.grid == (24, 24)
    assert encoding.soft_maps[0].shape == (1, spec.num_group_tokens[0], 576)
    attn = patch_group_attention(encoding.soft_maps)
    assert attn.shape == (1, 576, spec.num_output_groups[-1])
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 576))


def test_hard_assignment_is_one_hot_forward_with_soft_gradients():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    for hard in (gumbel_hard_assignment(logits, dim=1), hard_one_hot(logits.softmax(1), dim=1)):
        assert torch.all((hard == 0) | (hard == 1))
        torch.testing.assert_close(hard.sum(dim=1), torch.ones(2, 7))
        weights = torch.randn(2, 5, 7)
        (grad,) = torch.autograd.grad((hard * weights).sum(), logits)
        # straight-through: every logit gets a gradient, not only the chosen ones
        assert (grad != 0).float().mean() > 0.9


def test_gumbel_only_in_training_and_eval_is_deterministic():
    model = GroupViT(tiny_spec())
    pixels = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        a, b = model.encode_image(pixels), model.encode_image(pixels)
    assert torch.equal(a.hard_maps[0], b.hard_maps[0])
    torch.testing.assert_close(a.hard_maps[0], hard_one_hot(a.soft_maps[0], dim=1))


def test_without_gumbel_training_assigns_like_eval_and_single_stage_works():
    """spec.gumbel=False (the reference's option): training's hard assignment is the argmax of
    the plain softmax, as at inference; a single grouping stage (patch -> groups) encodes."""
    spec = tiny_spec(gumbel=False, depths=(0, 0), num_group_tokens=(8, 0), num_output_groups=(8,))
    model = GroupViT(spec)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        trained = model.train().encode_image(pixels)
        evaluated = model.eval().encode_image(pixels)
    assert len(trained.assignments) == 1 and trained.segment_tokens.shape == (2, 8, 64)
    torch.testing.assert_close(trained.hard_maps[0], evaluated.hard_maps[0])
    torch.testing.assert_close(trained.hard_maps[0], hard_one_hot(trained.soft_maps[0], dim=1))
    assert GroupViTSpec.from_dict(spec.to_dict()) == spec and not spec.gumbel


def test_linear_projector_pools_to_the_mean_of_projected_segments(tmp_path):
    """projection_layers=1 (the reference's proj_num_layers=1): one Linear, so the pooled image
    embedding is exactly the mean of the projected segments; it survives a save/load round trip
    and the NVlabs state-dict layout (`linear_out` only) reads back as a 1-layer spec, while the
    transformers port (2-layer projectors only) refuses it."""
    spec = tiny_spec(projection_layers=1)
    model = GroupViT(spec).eval()
    assert model.img_projector.fc1 is None and model.text_projector.bn is None
    with torch.no_grad():
        encoding = model.encode_image(torch.randn(2, 3, 64, 64))
        pooled, segments = model.project_image(encoding), model.project_segments(encoding)
    torch.testing.assert_close(pooled, segments.mean(dim=1))
    nvlabs = to_nvlabs_state_dict(model)
    assert "img_projector.linear_out.weight" in nvlabs
    assert not any("linear_hidden" in k for k in nvlabs)
    torch.save({"model": nvlabs}, tmp_path / "one_layer.pth")
    loaded = load_groupvit(
        tmp_path / "one_layer.pth", spec_overrides={"num_heads": 2, "text_heads": 2}
    )
    assert loaded.spec.projection_layers == 1
    pixels, tokens = torch.randn(2, 3, 64, 64), _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixels, tokens), model(pixels, tokens))
    assert GroupViTSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(CheckpointError, match="projection_layers"):
        hf_config_from_spec(spec)
    with pytest.raises(ValueError, match="projection_layers"):
        tiny_spec(projection_layers=3)


def test_group_residual_scales_the_group_token_in_each_segment():
    """group_residual=1 is the reference (`new_x += projected_group_tokens`); 0 leaves a segment
    only what its tokens bring, so every EMPTY group gets the same segment token."""
    single = dict(depths=(0, 0), num_group_tokens=(8, 0), num_output_groups=(8,), gumbel=False)
    reference = GroupViT(tiny_spec(**single)).eval()
    torch.manual_seed(0)
    without = GroupViT(tiny_spec(group_residual=0.0, **single)).eval()
    without.load_state_dict(reference.state_dict())
    pixels = torch.full((1, 3, 64, 64), 0.5)  # one flat colour: one group takes every patch
    with torch.no_grad():
        ref, new = reference.encode_image(pixels), without.encode_image(pixels)
    torch.testing.assert_close(ref.hard_maps[0], new.hard_maps[0])  # same assignment
    empty = new.hard_maps[0][0].sum(dim=-1) == 0
    assert empty.sum() >= 6
    tokens = new.segment_tokens[0][empty]
    torch.testing.assert_close(tokens, tokens[:1].expand_as(tokens))
    ref_tokens = ref.segment_tokens[0][empty]
    assert (ref_tokens - ref_tokens[:1]).abs().max() > 1e-3
    assert GroupViTSpec().group_residual == 1.0


def test_assign_init_std_sharpens_the_initial_assignment_and_defaults_to_the_reference():
    """assign_init_std (0.02 = the reference's init of every Linear) only re-draws the assignment
    query/key maps: a larger std gives a peaked soft assignment from the start; the default
    draws exactly the same weights as before the option existed."""
    single = dict(depths=(0, 0), num_group_tokens=(8, 0), num_output_groups=(8,))
    pixels = torch.randn(2, 3, 64, 64)
    peaks = {}
    for std in (0.02, 0.2):
        torch.manual_seed(0)
        model = GroupViT(tiny_spec(assign_init_std=std, **single)).eval()
        with torch.no_grad():
            peaks[std] = model.encode_image(pixels).soft_maps[0].max(dim=1).values.mean()
        assert model.img_encoder.layers[
            0
        ].downsample.assign.q_proj.weight.std().item() == pytest.approx(std, rel=0.15)
    assert peaks[0.02] < 0.2 < peaks[0.2]
    torch.manual_seed(0)
    before = GroupViT(tiny_spec(**single)).state_dict()
    torch.manual_seed(0)
    same = GroupViT(tiny_spec(assign_init_std=0.02, **single)).state_dict()
    assert all(torch.equal(before[k], same[k]) for k in before)


def test_logit_scale_is_clamped_at_100_unless_disabled():
    model = GroupViT(tiny_spec())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale().item() == pytest.approx(100.0)
    unclamped = GroupViT(tiny_spec(), logit_scale_max=None)
    with torch.no_grad():
        unclamped.logit_scale.fill_(math.log(1000.0))
    assert unclamped.scale().item() == pytest.approx(1000.0, rel=1e-5)
    assert model.multi_label_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_segment_projection_leaves_batchnorm_statistics_alone():
    model = GroupViT(tiny_spec()).train()
    encoding = model.encode_image(torch.randn(4, 3, 64, 64))
    before = model.img_projector.bn.running_mean.clone()
    segments = model.project_segments(encoding)
    assert segments.shape == (4, 4, model.spec.projection_dim)
    assert torch.equal(model.img_projector.bn.running_mean, before)
    model.project_image(encoding)
    assert not torch.equal(model.img_projector.bn.running_mean, before)


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="num_output_groups"):
        tiny_spec(num_output_groups=(8,))
    with pytest.raises(ValueError, match="unknown GroupViT spec keys"):
        type(tiny_spec()).from_dict({"embed_dims": 3})


def test_cli_converts_between_formats(tmp_path, capsys):
    from vitlab.cli import main

    model = GroupViT(tiny_spec()).eval()
    source = save_groupvit(model, tmp_path / "ours.pt")
    assert main(["groupvit", "export", str(source), str(tmp_path / "hf")]) == 0
    nvlabs = ["--to", "nvlabs"]
    assert (
        main(["groupvit", "export", str(tmp_path / "hf"), str(tmp_path / "nv.pth"), *nvlabs]) == 0
    )
    capsys.readouterr()
    assert main(["groupvit", "info", str(tmp_path / "nv.pth")]) == 0
    assert '"parameters": ' in capsys.readouterr().out
    state = torch.load(tmp_path / "nv.pth")
    del state["vitlab_spec"]  # a real NVlabs file: head counts must be given
    torch.save(state, tmp_path / "bare.pth")
    assert main(["groupvit", "info", str(tmp_path / "bare.pth")]) == 2
    assert "num_heads" in capsys.readouterr().err
    args = ["groupvit", "info", str(tmp_path / "bare.pth"), "--num-heads", "2", "--text-heads", "2"]
    assert main(args) == 0
    again = load_groupvit(tmp_path / "nv.pth")
    for key, value in model.state_dict().items():
        if key != "multi_label_logit_scale":  # not in the transformers hop
            assert torch.equal(again.state_dict()[key], value)
