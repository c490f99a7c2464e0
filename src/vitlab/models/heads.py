"""Classification heads on precomputed embeddings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class LinearHead(nn.Module):
    """One linear layer; with `log_softmax` it returns log-probabilities (the PlantCLEF paper's
    head, trained with NLL), otherwise logits. Either way softmax(output) are probabilities."""

    def __init__(self, in_features: int, num_classes: int, log_softmax: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.log_softmax = log_softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return torch.log_softmax(out, dim=-1) if self.log_softmax else out


def mlp(in_features: int, hidden: int, out_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_features),
    )


class MLPHead(nn.Module):
    """One hidden layer (GELU) on the embedding: on frozen features, tiles holding several
    species, or none, are told apart far better than by one linear layer (experiments/
    plantclef.md, "Multi-label"). `log_softmax` as in `LinearHead`."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 256,
        dropout: float = 0.0,
        log_softmax: bool = False,
    ):
        super().__init__()
        self.mlp = mlp(in_features, hidden, num_classes, dropout)
        self.log_softmax = log_softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return torch.log_softmax(out, dim=-1) if self.log_softmax else out


class MultiTargetOutputs(nn.Module):
    """Linear outputs from a shared feature: `species` plus optional auxiliary targets
    (e.g. `poisonous`: 1, `genus`: G, `family`: F)."""

    def __init__(self, in_features: int, num_classes: int, aux_outputs: dict[str, int] | None):
        super().__init__()
        self.outputs = nn.ModuleDict({"species": nn.Linear(in_features, num_classes)})
        for name, size in (aux_outputs or {}).items():
            self.outputs[name] = nn.Linear(in_features, size)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: layer(features) for name, layer in self.outputs.items()}


def metadata_width(meta_groups: Mapping[str, Sequence[int]]) -> int:
    """Columns of the encoded metadata: the end of its last `(start, end)` group."""
    return max((int(end) for _, end in meta_groups.values()), default=0)


class MetadataMLPHead(nn.Module):
    """FungiCLEF MLP head: [image embedding, encoded metadata] -> hidden (4096 in the paper)
    -> species logits (+ auxiliary outputs). `use_metadata=False` ignores the metadata.

    Every FungiCLEF head takes the same runtime arguments from `FungiClassifier`:
    `embed_dim`, `meta_groups` (name -> (start, end) columns of the metadata), `num_classes`
    and `aux_outputs`; its YAML (`head.model`) sets the rest."""

    def __init__(
        self,
        embed_dim: int,
        meta_groups: Mapping[str, Sequence[int]],
        num_classes: int,
        hidden: int = 4096,
        dropout: float = 0.1,
        use_metadata: bool = True,
        aux_outputs: dict[str, int] | None = None,
    ):
        super().__init__()
        self.use_metadata = use_metadata
        in_features = embed_dim + (metadata_width(meta_groups) if use_metadata else 0)
        self.trunk = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout))
        self.outputs = MultiTargetOutputs(hidden, num_classes, aux_outputs)

    def forward(self, embedding: torch.Tensor, metadata: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.cat([embedding, metadata], dim=1) if self.use_metadata else embedding
        return self.outputs(self.trunk(x))


class MetadataTransformerHead(nn.Module):
    """FungiCLEF transformer head: each metadata group (date, geo, substrate) is projected by
    its own MLP to the embedding width and stacked with the image embedding as tokens; a
    TransformerEncoder mixes them and the first (image) token feeds an MLP head. Same runtime
    arguments as `MetadataMLPHead`."""

    def __init__(
        self,
        embed_dim: int,
        meta_groups: Mapping[str, Sequence[int]],
        num_classes: int,
        layers: int = 4,
        heads: int = 8,
        hidden: int = 4096,
        dropout: float = 0.1,
        use_metadata: bool = True,
        aux_outputs: dict[str, int] | None = None,
    ):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(
                f"head.model.heads={heads} must divide the embedding width {embed_dim}"
            )
        self.use_metadata = use_metadata
        self.groups = {k: tuple(v) for k, v in meta_groups.items()} if use_metadata else {}
        self.projections = nn.ModuleDict(
            {
                name: mlp(end - start, embed_dim, embed_dim, dropout)
                for name, (start, end) in self.groups.items()
            }
        )
        self.group_embedding = nn.Parameter(torch.zeros(1 + len(self.groups), embed_dim))
        layer = nn.TransformerEncoderLayer(
            embed_dim,
            heads,
            dim_feedforward=2 * embed_dim,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.trunk = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden), nn.GELU(), nn.Dropout(dropout)
        )
        self.outputs = MultiTargetOutputs(hidden, num_classes, aux_outputs)

    def forward(self, embedding: torch.Tensor, metadata: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = [embedding] + [
            self.projections[name](metadata[:, start:end])
            for name, (start, end) in self.groups.items()
        ]
        x = torch.stack(tokens, dim=1) + self.group_embedding
        return self.outputs(self.trunk(self.encoder(x)[:, 0]))
