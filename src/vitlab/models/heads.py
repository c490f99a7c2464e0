"""Classification heads on precomputed embeddings."""

from __future__ import annotations

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
