"""Load GroupViT weights from NVlabs `.pth`, `transformers` (hub id or directory) or our own
checkpoints, strictly; export back to the `transformers` format (weights, config with CLIP's
special token ids, tokenizer and image processor: a full `from_pretrained` model).

Strict means: every source tensor is used and every parameter and buffer of our model is filled
(shape-checked). The one documented exception: `transformers` has no `multi_label_logit_scale`,
so it starts from the checkpoint's `logit_scale`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitlab.hub import hub_offline, use_hub
from vitlab.models.groupvit.model import GroupViT, GroupViTSpec, split_runtime
from vitlab.safe_load import UnsafeCheckpointError, load_checkpoint_file

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that does not match the GroupViT architecture."""


# Our key -> `transformers` key. Our names follow NVlabs; `{qkv}` marks a fused q/k/v tensor that
# `transformers` stores as three thirds.
_TO_HF_RULES: list[tuple[str, str]] = [
    (r"^img_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embeddings.projection."),
    (r"^img_encoder\.patch_embed\.norm\.", "vision_model.embeddings.layernorm."),
    (r"^img_encoder\.pos_embed$", "vision_model.embeddings.position_embeddings"),
    (r"^img_encoder\.norm\.", "vision_model.layernorm."),
    (
        r"^img_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(\w+)$",
        r"vision_model.encoder.stages.\1.layers.\2.self_attn.{qkv}_proj.\3",
    ),
    (
        r"^img_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.",
        r"vision_model.encoder.stages.\1.layers.\2.self_attn.out_proj.",
    ),
    (
        r"^img_encoder\.layers\.(\d+)\.blocks\.(\d+)\.norm([12])\.",
        r"vision_model.encoder.stages.\1.layers.\2.layer_norm\3.",
    ),
    (
        r"^img_encoder\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.",
        r"vision_model.encoder.stages.\1.layers.\2.mlp.",
    ),
    (
        r"^img_encoder\.layers\.(\d+)\.downsample\.pre_assign_attn\.attn\.proj\.",
        r"vision_model.encoder.stages.\1.downsample.pre_assign_attn.attn.out_proj.",
    ),
    (r"^img_encoder\.layers\.(\d+)\.", r"vision_model.encoder.stages.\1."),
    (r"^text_encoder\.token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^text_encoder\.positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^text_encoder\.ln_final\.", "text_model.final_layer_norm."),
    (
        r"^text_encoder\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(\w+)$",
        r"text_model.encoder.layers.\1.self_attn.{qkv}_proj.\2",
    ),
    (
        r"^text_encoder\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.",
        r"text_model.encoder.layers.\1.self_attn.out_proj.",
    ),
    (
        r"^text_encoder\.transformer\.resblocks\.(\d+)\.ln_([12])\.",
        r"text_model.encoder.layers.\1.layer_norm\2.",
    ),
    (
        r"^text_encoder\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.",
        r"text_model.encoder.layers.\1.mlp.fc1.",
    ),
    (
        r"^text_encoder\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.",
        r"text_model.encoder.layers.\1.mlp.fc2.",
    ),
    (r"^img_projector\.fc1\.", "visual_projection.0."),
    (r"^img_projector\.bn\.", "visual_projection.1."),
    (r"^img_projector\.fc2\.", "visual_projection.3."),
    (r"^text_projector\.fc1\.", "text_projection.0."),
    (r"^text_projector\.bn\.", "text_projection.1."),
    (r"^text_projector\.fc2\.", "text_projection.3."),
    (r"^logit_scale$", "logit_scale"),
]
_HF_ONLY_IGNORED = ("text_model.embeddings.position_ids",)
_NOT_IN_HF = ("multi_label_logit_scale",)

# NVlabs stores the projectors as Conv1d(k=1) layers in `linear_hidden` / `linear_out`.
_TO_NVLABS_RULES: list[tuple[str, str]] = [
    (r"^(img|text)_projector\.fc1\.", r"\1_projector.linear_hidden.0."),
    (r"^(img|text)_projector\.bn\.", r"\1_projector.linear_hidden.1."),
    (r"^(img|text)_projector\.fc2\.", r"\1_projector.linear_out."),
]


def _translate(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, template in rules:
        if re.search(pattern, key):
            return re.sub(pattern, template, key)
    return None


def hf_key(our_key: str) -> str | tuple[str, str, str] | None:
    """The `transformers` key(s) of one of our keys; three keys for a fused q/k/v tensor."""
    name = _translate(our_key, _TO_HF_RULES)
    if name is None or "{qkv}" not in name:
        return name
    return tuple(name.replace("{qkv}", part) for part in ("q", "k", "v"))


def _fill_strictly(model: GroupViT, source: dict[str, Tensor], fetch, origin: str) -> GroupViT:
    """Fill every entry of `model.state_dict()` via `fetch(our_key) -> tensor | None`."""
    target = model.state_dict()
    new_state, missing, bad_shapes = {}, [], []
    for key, current in target.items():
        value = fetch(key)
        if value is None:
            missing.append(key)
            continue
        if value.shape != current.shape:
            bad_shapes.append(
                f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(current.shape)}"
            )
            continue
        new_state[key] = value.to(current.dtype)
    if missing or bad_shapes:
        raise CheckpointError(
            f"{origin} does not fit the GroupViT spec: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; shape mismatches {bad_shapes[:8]}"
        )
    model.load_state_dict(new_state, strict=True)
    return model


def _check_all_used(source: dict[str, Tensor], used: set[str], origin: str) -> None:
    unused = sorted(set(source) - used)
    if unused:
        raise CheckpointError(
            f"{origin} has {len(unused)} tensors the model does not use: {unused[:8]}"
        )


def load_hf_state_dict(model: GroupViT, state: dict[str, Tensor], origin: str = "checkpoint"):
    """Fill `model` from a `transformers.GroupViTModel` state dict (strict)."""
    used: set[str] = set(k for k in _HF_ONLY_IGNORED if k in state)

    def fetch(key: str) -> Tensor | None:
        if key == "multi_label_logit_scale":
            used.add("logit_scale")
            return state.get("logit_scale")
        name = hf_key(key)
        if name is None:
            return None
        names = name if isinstance(name, tuple) else (name,)
        if any(n not in state for n in names):
            return None
        used.update(names)
        return torch.cat([state[n] for n in names], dim=0) if len(names) == 3 else state[names[0]]

    _fill_strictly(model, state, fetch, origin)
    _check_all_used(state, used, origin)
    return model


def to_hf_state_dict(model: GroupViT) -> dict[str, Tensor]:
    """Our weights under `transformers` names (q/k/v split, `multi_label_logit_scale` dropped)."""
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key in _NOT_IN_HF:
            continue
        name = hf_key(key)
        if name is None:
            raise CheckpointError(f"no transformers name for {key}")
        if isinstance(name, tuple):
            for part_name, part in zip(name, value.chunk(3, dim=0)):
                out[part_name] = part.clone()
        else:
            out[name] = value.clone()
    return out


def nvlabs_key(our_key: str) -> str:
    return _translate(our_key, _TO_NVLABS_RULES) or our_key


def load_nvlabs_state_dict(model: GroupViT, state: dict[str, Tensor], origin: str = "checkpoint"):
    """Fill `model` from an NVlabs `ckpt['model']` state dict (strict)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    used: set[str] = set()

    def fetch(key: str) -> Tensor | None:
        name = nvlabs_key(key)
        if name not in state:
            return None
        used.add(name)
        value = state[name]
        # Conv1d(k=1) weights [out, in, 1] -> Linear [out, in]
        return value.squeeze(-1) if value.ndim == 3 and "projector" in key else value

    _fill_strictly(model, state, fetch, origin)
    _check_all_used(state, used, origin)
    return model


def nvlabs_payload(model: GroupViT) -> dict:
    """What an NVlabs `.pth` holds (`{'model': state}`), plus our spec for the head counts."""
    return {"model": to_nvlabs_state_dict(model), "vitlab_spec": model.spec.to_dict()}


def to_nvlabs_state_dict(model: GroupViT) -> dict[str, Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        is_projector_weight = "projector" in key and key.endswith("weight") and value.ndim == 2
        out[nvlabs_key(key)] = value.unsqueeze(-1) if is_projector_weight else value.clone()
    return out


# ----------------------------------------------------------------------------- specs


def spec_from_hf_config(config) -> GroupViTSpec:
    """Our architecture spec from a `transformers.GroupViTConfig`."""
    vision, text = config.vision_config, config.text_config
    n_grouping = sum(1 for n in vision.num_group_tokens if n > 0)
    return GroupViTSpec(
        image_size=_as_int(vision.image_size),
        patch_size=_as_int(vision.patch_size),
        in_chans=vision.num_channels,
        embed_dim=vision.hidden_size,
        num_heads=vision.num_attention_heads,
        mlp_ratio=vision.intermediate_size / vision.hidden_size,
        depths=tuple(vision.depths),
        num_group_tokens=tuple(vision.num_group_tokens),
        num_output_groups=tuple(vision.num_output_groups[:n_grouping]),
        assign_mlp_ratio=tuple(vision.assign_mlp_ratio),
        assign_eps=vision.assign_eps,
        drop_path_rate=0.0,
        layer_norm_eps=vision.layer_norm_eps,
        vocab_size=text.vocab_size,
        context_length=text.max_position_embeddings,
        text_width=text.hidden_size,
        text_layers=text.num_hidden_layers,
        text_heads=text.num_attention_heads,
        text_mlp_ratio=text.intermediate_size / text.hidden_size,
        projection_hidden=config.projection_intermediate_dim,
        projection_dim=config.projection_dim,
    )


def _as_int(value) -> int:
    return int(value[0] if isinstance(value, list | tuple) else value)


# Special token ids of the exported text config: CLIP's start/end of text (our text pipeline's
# SOT/EOT, `transformers`' GroupViTTextConfig defaults) and the pad id of the exported tokenizer,
# which pads with <|endoftext|> as the released nvidia/groupvit-* tokenizers do. Our own pipeline
# pads with 0; either way the text tower pools at the first end-of-text token and its causal mask
# hides what follows, so the embeddings are the same.
HF_TEXT_TOKEN_IDS = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}


def hf_config_from_spec(spec: GroupViTSpec):
    """A `transformers.GroupViTConfig` describing the same architecture, with CLIP's special
    token ids written out (not left to the installed version's defaults)."""
    from transformers import GroupViTConfig

    if spec.projection_layers != 2:
        raise CheckpointError(
            "the transformers GroupViT has 2-layer projectors; "
            f"projection_layers={spec.projection_layers} has no transformers equivalent"
        )
    output_groups = list(spec.num_output_groups)
    output_groups += [output_groups[-1]] * (len(spec.depths) - len(output_groups))
    vision = dict(
        hidden_size=spec.embed_dim,
        intermediate_size=int(spec.embed_dim * spec.mlp_ratio),
        num_hidden_layers=sum(spec.depths),
        depths=list(spec.depths),
        num_group_tokens=list(spec.num_group_tokens),
        num_output_groups=output_groups,
        num_attention_heads=spec.num_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        num_channels=spec.in_chans,
        layer_norm_eps=spec.layer_norm_eps,
        assign_eps=spec.assign_eps,
        assign_mlp_ratio=list(spec.assign_mlp_ratio),
    )
    text = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.text_width,
        intermediate_size=int(spec.text_width * spec.text_mlp_ratio),
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.context_length,
        layer_norm_eps=spec.layer_norm_eps,
        **HF_TEXT_TOKEN_IDS,
    )
    return GroupViTConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=spec.projection_dim,
        projection_intermediate_dim=spec.projection_hidden,
        logit_scale_init_value=spec.logit_scale_init,
    )


def spec_from_state_dict(state: dict[str, Tensor], **overrides) -> GroupViTSpec:
    """Infer sizes from our/NVlabs tensor shapes. Head counts are not visible in shapes: they
    default to the released model's (6 image, 4 text) unless given in `overrides`."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    proj = state["img_encoder.patch_embed.proj.weight"]
    embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    n_patches = state["img_encoder.pos_embed"].shape[1]
    stages = sorted({int(k.split(".")[2]) for k in state if k.startswith("img_encoder.layers.")})
    depths, group_tokens, output_groups = [], [], []
    for s in stages:
        prefix = f"img_encoder.layers.{s}."
        depths.append(len({k.split(".")[4] for k in state if k.startswith(prefix + "blocks.")}))
        token = state.get(prefix + "group_token")
        group_tokens.append(0 if token is None else token.shape[1])
        if token is not None:
            output_groups.append(state[prefix + "downsample.mlp_inter.fc2.weight"].shape[0])
    token_hidden = state["img_encoder.layers.0.downsample.mlp_inter.fc1.weight"].shape[0]
    channel_hidden = state["img_encoder.layers.0.downsample.mlp_channels.fc1.weight"].shape[0]
    text_pos = state["text_encoder.positional_embedding"]
    text_layers = {k.split(".")[3] for k in state if k.startswith("text_encoder.transformer.")}
    hidden = [k for k in state if re.match(r"img_projector\.(fc1|linear_hidden\.0)\.weight", k)]
    out = [k for k in state if re.match(r"img_projector\.(fc2|linear_out)\.weight", k)]
    values = dict(
        image_size=int(round(n_patches**0.5)) * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=embed_dim,
        mlp_ratio=state["img_encoder.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        depths=tuple(depths),
        num_group_tokens=tuple(group_tokens),
        num_output_groups=tuple(output_groups),
        assign_mlp_ratio=(token_hidden / embed_dim, channel_hidden / embed_dim),
        vocab_size=state["text_encoder.token_embedding.weight"].shape[0],
        context_length=text_pos.shape[0],
        text_width=text_pos.shape[1],
        text_layers=len(text_layers),
        text_mlp_ratio=state["text_encoder.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        / text_pos.shape[1],
        projection_hidden=state[hidden[0]].shape[0] if hidden else GroupViTSpec.projection_hidden,
        projection_dim=state[out[0]].shape[0],
        projection_layers=2 if hidden else 1,
    )
    values.update(overrides)
    return GroupViTSpec(**values)


# ----------------------------------------------------------------------------- entry points

CHECKPOINT_KINDS = ("auto", "vitlab", "nvlabs", "transformers")


def detect_checkpoint_kind(
    source: str | Path, trust: bool = False, trust_key: str = "trust_checkpoint"
) -> str:
    path = Path(source)
    if not path.exists() and is_local_checkpoint_path(source):
        raise CheckpointError(f"checkpoint not found: {source}")
    if path.is_dir() or not path.exists():
        return "transformers"  # a saved directory or a hub id
    return _kind_of_payload(read_checkpoint_payload(path, trust, trust_key), path)


def read_checkpoint_payload(
    path: str | Path, trust: bool = False, trust_key: str = "trust_checkpoint"
) -> Any:
    """The unpickled file, by the allow-listed loader (vitlab, Lightning and NVlabs formats pass);
    other objects need `trust`, which the caller's `trust_key` (config key or flag) sets."""
    try:
        return load_checkpoint_file(path, trust=trust, opt_in=trust_key)
    except UnsafeCheckpointError as err:
        raise CheckpointError(str(err)) from err


def _kind_of_payload(payload: Any, path: Path) -> str:
    if isinstance(payload, dict) and "groupvit_spec" in payload:
        return "vitlab"
    if isinstance(payload, dict) and "model" in payload:
        return "nvlabs"
    raise CheckpointError(
        f"{path}: not a GroupViT checkpoint (expected an NVlabs `.pth` with a 'model' entry, a "
        "vitlab checkpoint with 'groupvit_spec', or a transformers directory / hub id)"
    )


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")


def is_local_checkpoint_path(source: str | Path, kind: str = "auto") -> bool:
    """Does `source` name a file or folder on this machine rather than a hub id? (A missing
    local path is then "not found", never a hub lookup.) The one rule every loader uses:

    - kinds `vitlab` and `nvlabs` are always files;
    - a path starting with `/`, `.` or `~`, or ending in a checkpoint suffix
      (.pt .pth .ckpt .bin .safetensors), is local;
    - anything not shaped like a hub id (`name` or `owner/name` of letters, digits, `_ . -`;
      e.g. `a/b/c`, `C:\\x`) is local;
    - the rest (`nvidia/groupvit-gcc-yfcc`) is a hub id.
    """
    if kind in ("vitlab", "nvlabs"):
        return True
    text = str(source)
    if text.startswith(("/", ".", "~")) or text.lower().endswith(CHECKPOINT_SUFFIXES):
        return True
    return _HUB_ID.fullmatch(text) is None


def resolve_checkpoint_source(source: str | Path, kind: str = "auto") -> str:
    """`source` with `~` expanded when that path exists; CheckpointError "checkpoint not found"
    when it is a local path (`is_local_checkpoint_path`) that does not exist; a hub id as is."""
    path = Path(str(source)).expanduser()
    if path.exists():
        return str(path)
    if is_local_checkpoint_path(source, kind):
        raise CheckpointError(f"checkpoint not found: {source}")
    return str(source)


def load_groupvit(
    source: str | Path,
    kind: str = "auto",
    spec_overrides: dict | None = None,
    trust: bool = False,
    trust_key: str = "trust_checkpoint",
) -> GroupViT:
    """Build our GroupViT from a checkpoint.

    kind: `vitlab` (our `.ckpt`/`.pt`: Lightning or `save_groupvit`), `nvlabs` (`ckpt['model']`),
    `transformers` (hub id such as `nvidia/groupvit-gcc-yfcc`, or a `save_pretrained` directory),
    or `auto` to detect. `spec_overrides` set what shapes cannot tell (NVlabs head counts) and
    runtime settings (`drop_path_rate`, `gumbel_tau`, `logit_scale_max`: when not given, an older
    vitlab file's saved clamp, else the model's `DEFAULT_LOGIT_SCALE_MAX`). Files are read by the
    allow-listed unpickler; `trust` allows a full unpickle (it runs code in the file).
    """
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint kind {kind!r} not in {CHECKPOINT_KINDS}")
    overrides, runtime = split_runtime(dict(spec_overrides or {}))
    payload = None
    if kind != "transformers" and Path(source).is_file():
        payload = read_checkpoint_payload(source, trust, trust_key)
    if kind == "auto":
        kind = _kind_of_payload(payload, Path(source)) if payload is not None else None
        kind = kind or detect_checkpoint_kind(source, trust, trust_key)
    if kind == "transformers":
        from transformers import GroupViTModel

        use_hub(str(source))
        try:
            hf = GroupViTModel.from_pretrained(str(source))
        except OSError as err:
            why = "the hub is offline or unreachable and it is not in the local cache"
            raise CheckpointError(
                f"{source}: not a transformers GroupViT directory, and loading it as a hub id "
                f"failed ({why if hub_offline() else err}). Without network: download it on a "
                f"connected machine (`hf download {source} --local-dir <folder>`) and pass the "
                "folder instead"
            ) from err
        spec = _with_overrides(spec_from_hf_config(hf.config), overrides)
        model = GroupViT(spec, **runtime)
        return load_hf_state_dict(model, hf.state_dict(), origin=str(source)).eval()
    if payload is None:
        raise CheckpointError(f"checkpoint {source} is not a file (kind={kind})")
    if kind == "nvlabs":
        state = payload["model"]
        # head counts are not in the shapes: our NVlabs exports carry them in `vitlab_spec`
        shape_free = {
            k: v
            for k, v in (payload.get("vitlab_spec") or {}).items()
            if k in ("num_heads", "text_heads")
        }
        try:
            spec = spec_from_state_dict(state, **{**shape_free, **overrides})
        except ValueError as err:
            raise CheckpointError(
                f"{source}: {err} (head counts cannot be read from an NVlabs state dict: pass "
                "num_heads / text_heads overrides)"
            ) from err
        model = GroupViT(spec, **runtime)
        return load_nvlabs_state_dict(model, state, origin=str(source)).eval()
    saved, saved_runtime = split_runtime(payload["groupvit_spec"])
    spec = _with_overrides(GroupViTSpec.from_dict(saved), overrides)
    state = payload["state_dict"]
    if any(k.startswith("model.") for k in state):  # a Lightning checkpoint of the task
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    # checkpoints written before the clamp became a runtime setting saved it in their spec
    model = GroupViT(spec, **{**saved_runtime, **runtime})
    _fill_strictly(model, state, state.get, str(source))
    _check_all_used(state, set(model.state_dict()), str(source))
    return model.eval()


def _with_overrides(spec: GroupViTSpec, overrides: dict) -> GroupViTSpec:
    if not overrides:
        return spec
    return GroupViTSpec.from_dict({**spec.to_dict(), **overrides})


def save_groupvit(model: GroupViT, path: str | Path) -> Path:
    """Our standalone format: {'groupvit_spec': ..., 'state_dict': ...}, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"groupvit_spec": model.spec.to_dict(), "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)
    return path


def hf_processor(spec: GroupViTSpec):
    """The `transformers.CLIPProcessor` of a vitlab GroupViT: CLIP's BPE tokenizer built offline
    from open_clip's vocabulary (the one our text pipeline uses; pads with <|endoftext|>, at most
    `context_length` tokens) and a `CLIPImageProcessor` doing what our evaluation transform does:
    short side to the model's image size (bicubic), centre crop, ImageNet mean/std."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    from vitlab.models.backbones import IMAGENET_MEAN, IMAGENET_STD
    from vitlab.models.groupvit.text import ClipTokenizer

    ours = ClipTokenizer()
    if ours.vocab_size != spec.vocab_size:
        raise CheckpointError(
            f"the model's vocabulary has {spec.vocab_size} tokens, CLIP's BPE {ours.vocab_size}: "
            "no tokenizer to export for it"
        )
    with tempfile.TemporaryDirectory() as files:
        ours.save_vocabulary(files)
        tokenizer = CLIPTokenizer.from_pretrained(files, model_max_length=spec.context_length)
    for name, value in HF_TEXT_TOKEN_IDS.items():
        if getattr(tokenizer, name) != value:
            raise CheckpointError(f"tokenizer {name} {getattr(tokenizer, name)} != {value}")
    size = spec.image_size
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def export_transformers(model: GroupViT, out_dir: str | Path, processor: bool = True) -> Path:
    """Write a `transformers` GroupViT directory with our weights: `config.json` (CLIP's
    bos/eos/pad ids in `text_config`), the weights and, with `processor`, the tokenizer
    (`vocab.json`, `merges.txt` and the installed version's tokenizer files) and the image
    processor, so `GroupViTModel`, `AutoProcessor`, `CLIPTokenizer(Fast)` and
    `CLIPImageProcessor.from_pretrained(out_dir)` all load it offline. Files are written in a
    temporary folder beside `out_dir`, then moved in one by one (each replaces its namesake)."""
    from transformers import GroupViTModel

    hf = GroupViTModel(hf_config_from_spec(model.spec))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if k not in _HF_ONLY_IGNORED]
    if missing or unexpected:
        raise CheckpointError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    if model.logit_scale_max is not None:
        log.info(
            "transformers' GroupViT does not clamp the logit scale (ours clamps at %s)",
            model.logit_scale_max,
        )
    proc = hf_processor(model.spec) if processor else None
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(str(staging))
        if proc is not None:
            proc.save_pretrained(str(staging))
            from vitlab.models.groupvit.text import ClipTokenizer

            ClipTokenizer().save_vocabulary(staging)  # CLIP's canonical files, any version
        out.mkdir(exist_ok=True)
        for path in sorted(staging.iterdir()):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
