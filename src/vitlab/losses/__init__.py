"""Losses for classification heads; Hydra targets such as `vitlab.losses.SeesawLoss`, and the
one factory both classification LightningModules build them with (`build_loss`)."""

from vitlab.losses.classification import (
    FocalLoss,
    SeesawLoss,
    SeesawPoisonLoss,
    WeightedCrossEntropy,
    cross_entropy,
    focal_loss,
    inverse_frequency_weights,
    poison_bce,
    poison_logit,
    seesaw_factors,
    seesaw_loss,
)
from vitlab.losses.factory import (
    COUNTS_FROM,
    LOSS_INPUTS,
    LabelStats,
    LossInputs,
    build_loss,
    check_loss_input,
)
from vitlab.losses.multilabel import AsymmetricLoss, BCEWithLogits, FocalBCE

__all__ = [
    "AsymmetricLoss",
    "BCEWithLogits",
    "FocalBCE",
    "COUNTS_FROM",
    "LOSS_INPUTS",
    "LabelStats",
    "LossInputs",
    "build_loss",
    "check_loss_input",
    "FocalLoss",
    "SeesawLoss",
    "SeesawPoisonLoss",
    "WeightedCrossEntropy",
    "cross_entropy",
    "focal_loss",
    "inverse_frequency_weights",
    "poison_bce",
    "poison_logit",
    "seesaw_factors",
    "seesaw_loss",
]
