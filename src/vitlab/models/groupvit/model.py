"""GroupViT (Xu et al., CVPR 2022), written for the thesis's fine-tuning and analyses.

Module and parameter names follow the NVlabs reference (`img_encoder.layers.{s}.blocks`,
`downsample`, `text_encoder.transformer.resblocks`, ...) so a released `.pth` loads with almost no
renaming; `vitlab.models.groupvit.checkpoints` maps to and from the `transformers` port.

What the thesis needs and the `transformers` port does not expose is first-class here: the soft
and hard assignment maps of each grouping stage, the final segment tokens and their projections,
bicubic position-embedding interpolation to any input size, and a clamped logit scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_SCALE_INIT = math.log(1 / 0.07)


@dataclass(frozen=True)
class GroupViTSpec:
    """Architecture sizes. Defaults are the released gcc-yfcc model (~55.7 M parameters)."""

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    num_heads: int = 6
    mlp_ratio: float = 4.0
    depths: tuple[int, ...] = (6, 3, 3)
    num_group_tokens: tuple[int, ...] = (64, 8, 0)
    num_output_groups: tuple[int, ...] = (64, 8)
    # (token-mixer hidden, channel MLP hidden) of a grouping block, as multiples of embed_dim
    assign_mlp_ratio: tuple[float, float] = (0.5, 4.0)
    assign_eps: float = 1.0
    gumbel_tau: float = 1.0
    # training's hard assignment: Gumbel-softmax sample (the reference) or, False, the argmax of
    # the plain softmax as at inference (the reference's `gumbel=False` option)
    gumbel: bool = True
    # weight of the group token added to its new segment (`new_x += projected_group_tokens`):
    # 1.0 the reference; < 1 shrinks the per-group constant every segment carries (0: a segment
    # is only what its tokens bring)
    group_residual: float = 1.0
    # init std of the assignment's query/key maps (the reference: 0.02 like every Linear); a
    # from-scratch model with 0.02 starts at a bilinear saddle: near-zero assignment logits whose
    # gradients are products of two tiny maps, so the soft assignment stays uniform
    assign_init_std: float = 0.02
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-5
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 256
    text_layers: int = 12
    text_heads: int = 4
    text_mlp_ratio: float = 4.0
    projection_hidden: int = 4096
    projection_dim: int = 256
    # projector depth (the reference's proj_num_layers): 2 = Linear-BN-ReLU-Linear, 1 = one
    # Linear, so the pooled embedding is the mean of the projected segments
    projection_layers: int = 2
    logit_scale_init: float = LOGIT_SCALE_INIT

    def __post_init__(self) -> None:
        for name in ("depths", "num_group_tokens", "num_output_groups", "assign_mlp_ratio"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.depths) != len(self.num_group_tokens):
            raise ValueError(
                f"depths {self.depths} and num_group_tokens {self.num_group_tokens} "
                "must have one entry per stage"
            )
        n_grouping = sum(1 for n in self.num_group_tokens if n > 0)
        if any(n > 0 for n in self.num_group_tokens[n_grouping:]):
            raise ValueError(f"stages with group tokens must come first: {self.num_group_tokens}")
        if len(self.num_output_groups) != n_grouping:
            raise ValueError(
                f"num_output_groups {self.num_output_groups} needs one entry per stage with group "
                f"tokens ({n_grouping})"
            )
        if self.embed_dim % self.num_heads or self.text_width % self.text_heads:
            raise ValueError("embed_dim/text_width must be divisible by their head counts")
        if self.projection_layers not in (1, 2):
            raise ValueError(f"projection_layers must be 1 or 2, got {self.projection_layers}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {self.patch_size}")

    def to_dict(self) -> dict:
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: dict) -> GroupViTSpec:
        """The spec of a saved dict; runtime settings that specs saved before held
        (`logit_scale_max`) are dropped: `split_runtime` reads them."""
        values = split_runtime(values)[0]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GroupViT spec keys {unknown}; known: {sorted(known)}")
        return cls(**values)


# the reference clamps exp(logit_scale) at 100; `transformers` does not clamp (None)
DEFAULT_LOGIT_SCALE_MAX: float | None = 100.0
LOGIT_SCALE_MAX_DEFAULT = "default"
"""The configs' `logit_scale_max` value that means `DEFAULT_LOGIT_SCALE_MAX` (the configs hold
the key so `key=50` / `key=null` override it without a `+`)."""


def resolve_logit_scale_max(value: object, key: str = "logit_scale_max") -> float | None:
    """The clamp a config's `key` asks for (callers read an absent key as `default`):
    `default` -> `DEFAULT_LOGIT_SCALE_MAX`, null -> None (no clamp), a number > 0 -> that number,
    anything else a ConfigError naming `key`. Callers pass the result to the loader explicitly,
    so the config's clamp wins over one an older vitlab checkpoint saved."""
    from vitlab.errors import ConfigError

    if value is None:
        return None
    if value == LOGIT_SCALE_MAX_DEFAULT:
        return DEFAULT_LOGIT_SCALE_MAX
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ConfigError(
        f"{key}={value!r}: the clamp of exp(logit_scale) is a number > 0, null (no clamp) or "
        f"{LOGIT_SCALE_MAX_DEFAULT!r} ({DEFAULT_LOGIT_SCALE_MAX}, the model's default)"
    )


RUNTIME_SETTINGS = ("logit_scale_max",)
"""Settings of a built `GroupViT` that are not architecture: attributes set by the loaders from
`overrides`, never saved in a checkpoint's spec."""


def split_runtime(values: dict) -> tuple[dict, dict]:
    """(spec keys, runtime settings) of a dict of spec values and overrides."""
    spec = {k: v for k, v in values.items() if k not in RUNTIME_SETTINGS}
    return spec, {k: v for k, v in values.items() if k in RUNTIME_SETTINGS}


def released_spec(**overrides) -> GroupViTSpec:
    """The released gcc-yfcc / gcc-redcaps architecture."""
    return GroupViTSpec(**overrides)


def tiny_spec(**overrides) -> GroupViTSpec:
    """A ~4 M parameter model (mostly the token embedding) for tests and the CPU quickstart."""
    values = dict(
        image_size=64,
        patch_size=8,
        embed_dim=64,
        num_heads=2,
        depths=(1, 1, 1),
        num_group_tokens=(8, 4, 0),
        num_output_groups=(8, 4),
        drop_path_rate=0.0,
        text_width=64,
        text_layers=2,
        text_heads=2,
        projection_hidden=128,
        projection_dim=64,
    )
    values.update(overrides)
    return GroupViTSpec(**values)


# ----------------------------------------------------------------------------- pure functions


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's GELU approximation, used by the text encoder."""
    return x * torch.sigmoid(1.702 * x)


def hard_one_hot(soft: Tensor, dim: int) -> Tensor:
    """One-hot of the argmax along `dim` in the forward pass, gradients of `soft` backward."""
    index = soft.argmax(dim=dim, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return hard - soft.detach() + soft


def gumbel_hard_assignment(logits: Tensor, dim: int, tau: float = 1.0) -> Tensor:
    """Straight-through Gumbel-softmax: one-hot forward, soft Gumbel-softmax gradients.

    Sampled in float32 whatever the autocast dtype: a bf16/fp16 uniform can be exactly 1.0 on
    GPUs, which would make the noise infinite and the assignment NaN."""
    logits32 = logits.float()
    eps = torch.finfo(torch.float32).eps
    uniform = torch.rand_like(logits32).clamp_(torch.finfo(torch.float32).tiny, 1.0 - eps)
    gumbels = -torch.log(-torch.log(uniform))
    return hard_one_hot(((logits32 + gumbels) / tau).softmax(dim), dim).to(logits.dtype)


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bicubically resize a square [1, N, D] position embedding to a `grid` of patches.

    Returns the parameter itself when the grid is unchanged (interpolation at 224 is exact).
    """
    n, dim = pos_embed.shape[1], pos_embed.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embedding of {n} tokens is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    square = pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)


def patch_group_attention(soft_assignments: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Chain per-stage soft maps [B, G_s, N_s] into patch -> final-group A1 @ A2 [B, N, G]."""
    attn = soft_assignments[0].transpose(1, 2)
    for stage_map in soft_assignments[1:]:
        attn = attn @ stage_map.transpose(1, 2)
    return attn


def clamp_logit_scale(log_scale: Tensor, max_value: float | None) -> Tensor:
    scale = log_scale.exp()
    return scale if max_value is None else scale.clamp(max=max_value)


# ----------------------------------------------------------------------------- building blocks


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int | None = None, act=F.gelu) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or in_dim)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TokenMixerMlp(Mlp):
    """An MLP over the token axis: [B, N_in, D] -> [B, N_out, D]."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (NVlabs `Attention(qkv_fuse=True)`)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Queries attend to a separate key/value sequence (groups attend to image tokens)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        q = _split_heads(self.q_proj(query), self.heads)
        k = _split_heads(self.k_proj(key), self.heads)
        v = _split_heads(self.v_proj(key), self.heads)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class Block(nn.Module):
    """Pre-norm transformer block of the image encoder."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttnBlock(nn.Module):
    """Post-norm cross-attention block applied to the group tokens before assignment."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_post = nn.LayerNorm(dim, eps=eps)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        x = query + self.attn(query, key)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


@dataclass
class Assignment:
    """One grouping stage's assignment of input tokens to groups, both [B, G, N]."""

    soft: Tensor  # plain softmax over groups: what segmentation and the entropy terms use
    hard: Tensor  # one-hot (Gumbel in training) with straight-through gradients: used in forward


class AssignAttention(nn.Module):
    """Single-head attention whose softmax runs over the GROUP axis: each token picks a group."""

    def __init__(self, dim: int, assign_eps: float, gumbel_tau: float, gumbel: bool = True) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.assign_eps = assign_eps
        self.gumbel_tau = gumbel_tau
        self.gumbel = gumbel
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, groups: Tensor, tokens: Tensor) -> tuple[Tensor, Assignment]:
        logits = (self.q_proj(groups) @ self.k_proj(tokens).transpose(1, 2)) * self.scale
        soft = logits.softmax(dim=1)
        if self.training and self.gumbel:
            hard = gumbel_hard_assignment(logits, dim=1, tau=self.gumbel_tau)
        else:
            hard = hard_one_hot(soft, dim=1)
        # new segment = mean of its tokens' values, with +eps so an empty group stays finite
        weights = hard / (hard.sum(dim=-1, keepdim=True) + self.assign_eps)
        return self.proj(weights @ self.v_proj(tokens)), Assignment(soft=soft, hard=hard)


class GroupingBlock(nn.Module):
    """Merge N image tokens into `num_output_group` segments (NVlabs `GroupingBlock`)."""

    def __init__(self, spec: GroupViTSpec, num_group_token: int, num_output_group: int) -> None:
        super().__init__()
        dim, eps = spec.embed_dim, spec.layer_norm_eps
        tokens_hidden, channels_hidden = (int(r * dim) for r in spec.assign_mlp_ratio)
        self.norm_tokens = nn.LayerNorm(dim, eps=eps)
        self.mlp_inter = TokenMixerMlp(num_group_token, tokens_hidden, num_output_group)
        self.norm_post_tokens = nn.LayerNorm(dim, eps=eps)
        self.norm_x = nn.LayerNorm(dim, eps=eps)
        self.pre_assign_attn = CrossAttnBlock(dim, spec.num_heads, spec.mlp_ratio, eps)
        self.assign = AssignAttention(dim, spec.assign_eps, spec.gumbel_tau, spec.gumbel)
        self.norm_new_x = nn.LayerNorm(dim, eps=eps)
        self.mlp_channels = Mlp(dim, channels_hidden)
        self.group_residual = spec.group_residual

    def forward(self, tokens: Tensor, group_tokens: Tensor) -> tuple[Tensor, Assignment]:
        group_tokens = self.norm_tokens(group_tokens)
        tokens = self.norm_x(tokens)
        groups = self.norm_post_tokens(self.mlp_inter(group_tokens))
        groups = self.pre_assign_attn(groups, tokens)
        segments, assignment = self.assign(groups, tokens)
        if self.group_residual:
            segments = segments + self.group_residual * groups
        segments = segments + self.mlp_channels(self.norm_new_x(segments))
        return segments, assignment


class GroupingStage(nn.Module):
    """Transformer blocks over [image tokens; group tokens], then an optional grouping block."""

    def __init__(
        self, spec: GroupViTSpec, stage: int, drop_path_rates: list[float], prev_groups: int
    ) -> None:
        super().__init__()
        dim, eps = spec.embed_dim, spec.layer_norm_eps
        self.num_group_token = spec.num_group_tokens[stage]
        self.blocks = nn.ModuleList(
            Block(dim, spec.num_heads, spec.mlp_ratio, rate, eps) for rate in drop_path_rates
        )
        self.group_token = None
        self.downsample = None
        self.group_projector = None
        if self.num_group_token > 0:
            self.group_token = nn.Parameter(torch.zeros(1, self.num_group_token, dim))
            n_out = spec.num_output_groups[stage]
            self.downsample = GroupingBlock(spec, self.num_group_token, n_out)
            if prev_groups > 0:
                # later stages' group tokens also see the previous stage's group tokens
                self.group_projector = nn.Sequential(
                    nn.LayerNorm(dim, eps=eps),
                    TokenMixerMlp(prev_groups, dim // 2, self.num_group_token),
                )

    def forward(
        self, x: Tensor, prev_group_tokens: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Assignment | None]:
        if self.group_token is None:
            for block in self.blocks:
                x = block(x)
            return x, None, None
        group_tokens = self.group_token.expand(x.shape[0], -1, -1)
        if self.group_projector is not None and prev_group_tokens is not None:
            group_tokens = group_tokens + self.group_projector(prev_group_tokens)
        joint = torch.cat([x, group_tokens], dim=1)
        for block in self.blocks:
            joint = block(joint)
        x, group_tokens = joint[:, : -self.num_group_token], joint[:, -self.num_group_token :]
        segments, assignment = self.downsample(x, group_tokens)
        return segments, group_tokens, assignment


class PatchEmbed(nn.Module):
    def __init__(self, spec: GroupViTSpec) -> None:
        super().__init__()
        self.patch_size = spec.patch_size
        self.proj = nn.Conv2d(spec.in_chans, spec.embed_dim, spec.patch_size, spec.patch_size)
        self.norm = nn.LayerNorm(spec.embed_dim, eps=spec.layer_norm_eps)

    def forward(self, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(pixels)
        grid = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


@dataclass
class ImageEncoding:
    """What the image encoder returns; maps are [B, groups, input tokens] per grouping stage."""

    pooled: Tensor  # [B, D] mean of the final segment tokens (before projection)
    segment_tokens: Tensor  # [B, G, D] final-stage segment tokens after the final norm
    assignments: list[Assignment]
    grid: tuple[int, int]  # patch grid of the input

    @property
    def soft_maps(self) -> list[Tensor]:
        return [a.soft for a in self.assignments]

    @property
    def hard_maps(self) -> list[Tensor]:
        return [a.hard for a in self.assignments]


class ImageEncoder(nn.Module):
    def __init__(self, spec: GroupViTSpec) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(spec)
        n_patches = (spec.image_size // spec.patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches, spec.embed_dim))
        rates = torch.linspace(0, spec.drop_path_rate, sum(spec.depths)).tolist()
        stages, start = [], 0
        for stage, depth in enumerate(spec.depths):
            prev_groups = spec.num_group_tokens[stage - 1] if stage > 0 else 0
            stages.append(GroupingStage(spec, stage, rates[start : start + depth], prev_groups))
            start += depth
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(spec.embed_dim, eps=spec.layer_norm_eps)

    def forward(self, pixels: Tensor) -> ImageEncoding:
        x, grid = self.patch_embed(pixels)
        x = x + interpolate_pos_embed(self.pos_embed, grid)
        group_tokens, assignments = None, []
        for stage in self.layers:
            x, group_tokens, assignment = stage(x, group_tokens)
            if assignment is not None:
                assignments.append(assignment)
        x = self.norm(x)
        return ImageEncoding(x.mean(dim=1), x, assignments, grid)


class TextBlock(nn.Module):
    """CLIP residual attention block (causal), parameter names as in CLIP / NVlabs."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(width, int(width * mlp_ratio))
        self.mlp.c_proj = nn.Linear(int(width * mlp_ratio), width)
        self.ln_2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: Tensor, causal_mask: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=causal_mask, need_weights=False)[0]
        return x + self.mlp.c_proj(quick_gelu(self.mlp.c_fc(self.ln_2(x))))


class TextEncoder(nn.Module):
    def __init__(self, spec: GroupViTSpec) -> None:
        super().__init__()
        width, eps = spec.text_width, spec.layer_norm_eps
        self.token_embedding = nn.Embedding(spec.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(spec.context_length, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            TextBlock(width, spec.text_heads, spec.text_mlp_ratio, eps)
            for _ in range(spec.text_layers)
        )
        self.ln_final = nn.LayerNorm(width, eps=eps)

    def forward(self, tokens: Tensor) -> Tensor:
        """[N, L] token ids -> [N, width] features at the end-of-text token (the largest id)."""
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype)
        mask = mask.triu(1)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]


class Projector(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear into the joint space (NVlabs `ProjectMLP`), or with
    `layers=1` one Linear (`fc2`, the reference's `linear_out`; no `fc1`/`bn`)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden) if layers == 2 else None
        self.bn = nn.BatchNorm1d(hidden) if layers == 2 else None
        self.fc2 = nn.Linear(hidden if layers == 2 else in_dim, out_dim)

    def forward(self, x: Tensor, frozen_stats: bool = False) -> Tensor:
        """[..., in_dim] -> [..., out_dim]. `frozen_stats` normalises with the running statistics
        and leaves them untouched even in training (segment tokens must not skew them)."""
        shape = x.shape[:-1]
        if self.fc1 is None:
            return self.fc2(x)
        h = self.fc1(x.reshape(-1, x.shape[-1]))
        if frozen_stats:
            h = F.batch_norm(
                h,
                self.bn.running_mean,
                self.bn.running_var,
                self.bn.weight,
                self.bn.bias,
                training=False,
                eps=self.bn.eps,
            )
        else:
            h = self.bn(h)
        return self.fc2(F.relu(h)).reshape(*shape, -1)


class GroupViT(nn.Module):
    """Image encoder with grouping, CLIP text encoder, two projectors and two logit scales."""

    def __init__(
        self,
        spec: GroupViTSpec | None = None,
        logit_scale_max: float | None = DEFAULT_LOGIT_SCALE_MAX,
    ) -> None:
        """`logit_scale_max`: clamp of exp(logit scale) (None: no clamp), a runtime setting."""
        super().__init__()
        self.spec = spec or GroupViTSpec()
        self.logit_scale_max = logit_scale_max
        self.img_encoder = ImageEncoder(self.spec)
        self.text_encoder = TextEncoder(self.spec)
        p = self.spec
        layers = p.projection_layers
        self.img_projector = Projector(p.embed_dim, p.projection_hidden, p.projection_dim, layers)
        self.text_projector = Projector(p.text_width, p.projection_hidden, p.projection_dim, layers)
        self.logit_scale = nn.Parameter(torch.tensor(p.logit_scale_init))
        self.multi_label_logit_scale = nn.Parameter(torch.tensor(p.logit_scale_init))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init in the spirit of the reference (truncated normal 0.02 for linear maps)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.normal_(module.in_proj_weight, std=module.embed_dim**-0.5)
                nn.init.zeros_(module.in_proj_bias)
        if self.spec.assign_init_std != 0.02:  # (the default draws nothing more: same init)
            for module in self.modules():
                if isinstance(module, AssignAttention):
                    for linear in (module.q_proj, module.k_proj):
                        nn.init.trunc_normal_(linear.weight, std=self.spec.assign_init_std)
        nn.init.trunc_normal_(self.img_encoder.pos_embed, std=0.02)
        first_stage_tokens = self.img_encoder.layers[0].group_token
        if first_stage_tokens is not None:
            nn.init.trunc_normal_(first_stage_tokens, std=0.02)
        nn.init.normal_(self.text_encoder.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_encoder.positional_embedding, std=0.01)

    # -- encoders ---------------------------------------------------------------------------

    def encode_image(self, pixels: Tensor) -> ImageEncoding:
        return self.img_encoder(pixels)

    def project_image(self, encoding: ImageEncoding) -> Tensor:
        """Pooled image embedding in the joint space [B, P] (not normalised)."""
        return self.img_projector(encoding.pooled)

    def project_segments(self, encoding: ImageEncoding) -> Tensor:
        """Final segment tokens in the joint space [B, G, P], using the projector's running
        BatchNorm statistics (as at inference) so training them never moves those statistics."""
        return self.img_projector(encoding.segment_tokens, frozen_stats=True)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """[..., L] token ids -> [..., P] text embeddings in the joint space (not normalised)."""
        shape = tokens.shape[:-1]
        features = self.text_encoder(tokens.reshape(-1, tokens.shape[-1]))
        return self.text_projector(features).reshape(*shape, -1)

    def scale(self) -> Tensor:
        return clamp_logit_scale(self.logit_scale, self.logit_scale_max)

    def multi_label_scale(self) -> Tensor:
        return clamp_logit_scale(self.multi_label_logit_scale, self.logit_scale_max)

    def forward(self, pixels: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        """CLIP-style forward: normalised embeddings and logits [B_img, B_text]."""
        image = F.normalize(self.project_image(self.encode_image(pixels)), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.scale() * image @ text.t()
        return {
            "image_embeds": image,
            "text_embeds": text,
            "logits_per_image": logits_per_image,
            "logits_per_text": logits_per_image.t(),
        }
