"""Losses for classification heads; Hydra targets such as `vitlab.losses.SeesawLoss`."""

from vitlab.losses.classification import (
    CrossEntropy,
    FocalLoss,
    MultitaskLoss,
    SeesawLoss,
    SeesawPoisonLoss,
    WeightedCrossEntropy,
    cross_entropy,
    focal_loss,
    inverse_frequency_weights,
    multitask_loss,
    poison_bce,
    poison_logit,
    seesaw_factors,
    seesaw_loss,
)

__all__ = [
    "CrossEntropy",
    "FocalLoss",
    "MultitaskLoss",
    "SeesawLoss",
    "SeesawPoisonLoss",
    "WeightedCrossEntropy",
    "cross_entropy",
    "focal_loss",
    "inverse_frequency_weights",
    "multitask_loss",
    "poison_bce",
    "poison_logit",
    "seesaw_factors",
    "seesaw_loss",
]
