"""The thesis's GroupViT analyses as one-command tools (`python -m vitlab.analysis <tool>`):

- `knn`        visual grouping alone: kNN over final-stage segment features, soft labels from GT
- `alignment`  vision-text alignment alone: mean pixel-class affinity per GT region, argmax
- `entropy`    entropy maps over groups / over labels, as images, with their means
- `compare`    per-class IoU difference of two evaluation summaries or two checkpoints

The computations live in `vitlab.analysis.groupvit`; the command line in `__main__`.
"""

from vitlab.analysis.groupvit import (
    AnalysisError,
    FeatureBank,
    ImageGrouping,
    background_group_scores,
    compare_summaries,
    encode_grouping,
    entropy_per_patch,
    group_region_mean_scores,
    knn_class_distribution,
    paint_regions,
    paint_segments,
    read_summary,
    region_mean_scores,
    segment_soft_labels,
)

__all__ = [
    "AnalysisError",
    "FeatureBank",
    "ImageGrouping",
    "background_group_scores",
    "compare_summaries",
    "encode_grouping",
    "entropy_per_patch",
    "group_region_mean_scores",
    "knn_class_distribution",
    "paint_regions",
    "paint_segments",
    "read_summary",
    "region_mean_scores",
    "segment_soft_labels",
]
