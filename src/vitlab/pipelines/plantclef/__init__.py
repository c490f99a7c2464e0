"""PlantCLEF 2024: DINOv2 embeddings -> linear head -> full-image or grid-of-tiles inference.

The pipeline (`pipeline`: validate / train / infer, `PIPELINE`) and the stages only it runs, on
top of the shared ones in `vitlab.stages` (prepare_images, embed):
    prepare          the training metadata and image folder -> the shared prepare stage
    collages         multi-species training collages (a cached stage)
    fit              a head on cached embeddings; the label map
    fit_multilabel   single-plant + collage embeddings as multi-hot batches
    predict          test quadrats -> boxes -> plot-level species lists -> submission
    tiles            the test tiles' embeddings (a cached stage) and predicting from them
    score            a submission against the ground truth, per plot and per species
"""

from vitlab.pipelines.plantclef.pipeline import (
    MIN_LABEL_OVERLAP,
    PIPELINE,
    PREDICTORS,
    RESUME_MUST_MATCH,
    check_head_and_loss,
    check_label_overlap,
    check_multilabel_choices,
    check_resumed_run,
    choose_val_thresholds,
    command_line_keys,
    dataset_of_checkpoint_run,
    dataset_set_on_command_line,
    ensure_dataset,
    head_predictor,
    infer,
    leaf_differences,
    load_head_module,
    load_head_predictor,
    record_decision,
    train,
    train_class_counts,
    validate,
    validate_infer,
    with_decision,
)

__all__ = [
    "MIN_LABEL_OVERLAP",
    "PIPELINE",
    "PREDICTORS",
    "RESUME_MUST_MATCH",
    "check_head_and_loss",
    "check_label_overlap",
    "check_multilabel_choices",
    "check_resumed_run",
    "choose_val_thresholds",
    "command_line_keys",
    "dataset_of_checkpoint_run",
    "dataset_set_on_command_line",
    "ensure_dataset",
    "head_predictor",
    "infer",
    "leaf_differences",
    "load_head_module",
    "load_head_predictor",
    "record_decision",
    "train",
    "train_class_counts",
    "validate",
    "validate_infer",
    "with_decision",
]
