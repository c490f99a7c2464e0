"""Zero-shot semantic-segmentation evaluation sets in their standard (mmseg / GroupViT) layouts.

Every dataset is described by a `SegmentationDatasetSpec` in `DATASETS`; `dataset_samples`
lists its (image, label map) pairs and `read_label_map` / `load_image` read them.

Layouts (`root` is the folder given in the config):
    pascal_voc      root = VOCdevkit/VOC2012
                    JPEGImages/<id>.jpg, SegmentationClass/<id>.png,
                    ImageSets/Segmentation/<split>.txt
    pascal_context  root = VOCdevkit/VOC2010 (mmseg's converted PASCAL Context)
                    JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png,
                    ImageSets/SegmentationContext/<split>.txt
    coco_object     root = coco (output of GroupViT's convert_dataset/convert_coco_object.py)
                    images/val2017/<id>.jpg, annotations/val2017/<id>_instanceTrainIds.png
                    every image of the folder is a sample (no split list), sorted by id
    ade20k          root = ADEChallengeData2016
                    images/validation/<id>.jpg, annotations/validation/<id>.png
                    every image of the folder is a sample (no split list), sorted by id
    synthetic_voc   root = <synthetic coco captions>/VOCdevkit/VOC2012: the pascal_voc layout,
                    written by `vitlab.data.synthetic.coco_captions` (see `ensure_synthetic_voc`)
For coco_object and ade20k the split names "val" / "train" mean val2017 / train2017 and
validation / training; the folder names themselves are accepted too.

Class lists. `class_names` is in label-index order AFTER any reduce_zero_label, i.e. the classes
the metric counts, and uses the names GroupViT's reference evaluation puts in its prompts
(NVlabs/GroupViT segmentation/datasets/{pascal_voc,pascal_context,coco_object}.py):
- VOC (21 = background + 20): the official names with diningtable -> table,
  pottedplant -> plant, tvmonitor -> monitor.
- PASCAL Context (60 = background + 59): GroupViT evaluates with mmseg's `PascalContextDataset`
  (60 classes, background 0 counted, no reduce_zero_label), not `PascalContextDataset59`;
  mmseg's names with aeroplane -> airplane, pottedplant -> plant, tvmonitor -> monitor.
- COCO-Object (81 = background + 80): the COCO names unchanged. GroupViT's convert script maps
  COCO-Stuff's thing classes to 1..80 and stuff classes AND unlabelled (255) to 0 background,
  so these maps hold no ignore pixels.
- ADE20K (150, no background): GroupViT has no ADE20K config; these are mmseg's
  `ADE20KDataset` names (its 'bed ' without the trailing space).
A dataset whose class 0 is background (`has_background`) gets no prompt for it: the zero-shot
rule labels a pixel background when its best foreground score is below `bg_threshold`
(`prompt_names` are the names to embed). ADE20K has no background class, so its `bg_threshold`
is never used; it is kept (0.95, the thesis's value) only so every spec looks alike.
`DATASETS` is the one declaration of each dataset's threshold; a run overrides it with
`segmentation.bg_threshold` (`background_threshold`), the analysis CLI with `--bg-threshold`.

reduce_zero_label (ADE20K: raw 0 = "other" -> ignored, k -> k-1) is applied exactly ONCE, by the
metric: `read_label_map` returns the RAW map by default and the evaluation builds its
`ConfusionMatrixAccumulator` with `spec.metric_kwargs()` (which carries
`reduce_zero_label=spec.reduce_zero_label`). `read_label_map(..., reduce=True)` gives the reduced
map for uses outside the metric (visualisation, per-class analyses); never feed that to a
metric built with `metric_kwargs()`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitlab.data.images import CorruptImageError, decode_image
from vitlab.data.voc import (
    IGNORE_INDEX,
    IMAGES_DIR,
    LABELS_DIR,
    SPLITS_DIR,
    VOC2012_DIR,
    VOC_PROMPT_NAMES,
    read_label_png,
    read_voc_split,
)
from vitlab.deprecations import read_deprecated
from vitlab.errors import DatasetFormatError

__all__ = [
    "ADE20K_CLASSES",
    "COCO_OBJECT_CLASSES",
    "DATASETS",
    "PASCAL_CONTEXT_CLASSES",
    "SegmentationDatasetSpec",
    "SegmentationSample",
    "background_threshold",
    "dataset_samples",
    "ensure_synthetic_voc",
    "segmentation_spec",
    "load_image",
    "read_label_map",
    "samples_from_config",
    "spec_from_config",
]

# mmseg's PascalContextDataset (60 classes, label order of its converted maps), then the names
# GroupViT uses for them in prompts.
PASCAL_CONTEXT_MMSEG_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person",
    "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)  # fmt: skip
GROUPVIT_CONTEXT_RENAMES: dict[str, str] = {
    "aeroplane": "airplane",
    "pottedplant": "plant",
    "tvmonitor": "monitor",
}
PASCAL_CONTEXT_CLASSES: tuple[str, ...] = tuple(
    GROUPVIT_CONTEXT_RENAMES.get(c, c) for c in PASCAL_CONTEXT_MMSEG_CLASSES
)

# background + the 80 COCO thing classes in category-id order (the converted maps' 1..80).
COCO_OBJECT_CLASSES: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# mmseg's ADE20KDataset, in the order of the reduced labels (raw label k -> class k-1).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


@dataclass(frozen=True)
class SegmentationSample:
    image_path: Path
    label_path: Path
    sample_id: str


@dataclass(frozen=True)
class SegmentationDatasetSpec:
    """One evaluation set: its classes, label conventions and on-disk layout.

    Layout: with `split_list` set, the samples are the ids in `<root>/<split_list>` (`{split}`
    filled in) with `<images_dir>/<id><image_suffix>` and `<labels_dir>/<id><label_suffix>`;
    with `split_list=None` they are every `*<image_suffix>` file under `<root>/<images_dir>`
    (mmseg's scan, recursive, sorted). `{split}` in the folder names is replaced by the split
    name after `split_aliases` (e.g. val -> val2017).
    """

    name: str
    class_names: tuple[str, ...]
    has_background: bool
    bg_threshold: float
    reduce_zero_label: bool = False
    ignore_index: int = IGNORE_INDEX
    root_hint: str = str(VOC2012_DIR)
    images_dir: str = IMAGES_DIR
    labels_dir: str = LABELS_DIR
    split_list: str | None = f"{SPLITS_DIR.as_posix()}/{{split}}.txt"
    image_suffix: str = ".jpg"
    label_suffix: str = ".png"
    split_aliases: tuple[tuple[str, str], ...] = ()
    missing_label_hint: str = ""

    def __post_init__(self) -> None:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"{self.name}: duplicate class names")
        if self.has_background and self.class_names[0] != "background":
            raise ValueError(f"{self.name}: has_background but class 0 is {self.class_names[0]!r}")
        if not 0.0 <= self.bg_threshold <= 1.0:
            raise ValueError(
                f"{self.name}: bg_threshold must be in [0, 1], got {self.bg_threshold}"
            )

    @property
    def num_classes(self) -> int:
        """Classes the metric counts (after reduce_zero_label)."""
        return len(self.class_names)

    @property
    def prompt_names(self) -> tuple[str, ...]:
        """The classes that get a text prompt: all but the background class."""
        return self.class_names[1:] if self.has_background else self.class_names

    @property
    def max_raw_label(self) -> int:
        """The largest valid value in a raw label map (the ignore index aside)."""
        return self.num_classes if self.reduce_zero_label else self.num_classes - 1

    def split_folder(self, split: str) -> str:
        return dict(self.split_aliases).get(split, split)

    def metric_kwargs(self) -> dict[str, Any]:
        """Arguments for `ConfusionMatrixAccumulator` on RAW label maps (the metric applies
        reduce_zero_label)."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "reduce_zero_label": self.reduce_zero_label,
        }


DEFAULT_BG_THRESHOLD = 0.95
"""VOC's background threshold (the thesis's and GroupViT's), the default where none is given."""
_VOC_LIKE: dict[str, Any] = {"class_names": VOC_PROMPT_NAMES, "has_background": True}

DATASETS: dict[str, SegmentationDatasetSpec] = {
    spec.name: spec
    for spec in (
        SegmentationDatasetSpec(name="pascal_voc", bg_threshold=DEFAULT_BG_THRESHOLD, **_VOC_LIKE),
        SegmentationDatasetSpec(
            name="pascal_context",
            class_names=PASCAL_CONTEXT_CLASSES,
            has_background=True,
            bg_threshold=0.35,
            root_hint="VOCdevkit/VOC2010",
            labels_dir="SegmentationClassContext",
            split_list="ImageSets/SegmentationContext/{split}.txt",
            missing_label_hint="PASCAL Context labels come from mmseg's "
            "tools/convert_datasets/pascal_context.py (60-class maps)",
        ),
        SegmentationDatasetSpec(
            name="coco_object",
            class_names=COCO_OBJECT_CLASSES,
            has_background=True,
            bg_threshold=0.9,
            root_hint="coco",
            images_dir="images/{split}",
            labels_dir="annotations/{split}",
            split_list=None,
            label_suffix="_instanceTrainIds.png",
            split_aliases=(("val", "val2017"), ("train", "train2017")),
            missing_label_hint="COCO-Object labels are written by GroupViT's "
            "convert_dataset/convert_coco_object.py from the COCO-Stuff 164k annotations",
        ),
        SegmentationDatasetSpec(
            name="ade20k",
            class_names=ADE20K_CLASSES,
            has_background=False,
            bg_threshold=DEFAULT_BG_THRESHOLD,  # unused: ADE20K has no background class
            reduce_zero_label=True,
            root_hint="ADEChallengeData2016",
            images_dir="images/{split}",
            labels_dir="annotations/{split}",
            split_list=None,
            split_aliases=(("val", "validation"), ("train", "training")),
        ),
        SegmentationDatasetSpec(
            name="synthetic_voc", bg_threshold=DEFAULT_BG_THRESHOLD, **_VOC_LIKE
        ),
    )
}


def segmentation_spec(name: str) -> SegmentationDatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown segmentation dataset {name!r}; choose one of {sorted(DATASETS)}"
        ) from None


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _require_dir(folder: Path, spec: SegmentationDatasetSpec, split: str) -> None:
    if not folder.is_dir():
        aliases = f" (known splits: {[a for a, _ in spec.split_aliases]})"
        raise DatasetFormatError(
            f"{spec.name}: folder not found: {folder} for split {split!r}"
            + (aliases if spec.split_aliases else "")
        )


def _scan_samples(
    spec: SegmentationDatasetSpec, root: Path, split: str
) -> list[SegmentationSample]:
    folder = spec.split_folder(split)
    images = root / spec.images_dir.format(split=folder)
    labels = root / spec.labels_dir.format(split=folder)
    _require_dir(images, spec, split)
    _require_dir(labels, spec, split)
    ids = sorted(
        Path(dirpath, f).relative_to(images).as_posix()[: -len(spec.image_suffix)]
        for dirpath, _, files in os.walk(images)
        for f in files
        if f.endswith(spec.image_suffix)
    )
    if not ids:
        raise DatasetFormatError(f"{spec.name}: no '*{spec.image_suffix}' images in {images}")
    samples = [
        SegmentationSample(
            images / f"{i}{spec.image_suffix}", labels / f"{i}{spec.label_suffix}", i
        )
        for i in ids
    ]
    missing = [s.label_path.name for s in samples if not s.label_path.is_file()]
    if missing:
        hint = f"; {spec.missing_label_hint}" if spec.missing_label_hint else ""
        raise DatasetFormatError(
            f"{spec.name}: {len(missing)} of {len(samples)} image(s) in {images} have no label "
            f"map '<id>{spec.label_suffix}' in {labels} (first: {_first(missing)}){hint}"
        )
    return samples


def dataset_samples(
    name: str, root: str | Path, split: str = "val", limit: int | None = None
) -> list[SegmentationSample]:
    """The samples of `split` of dataset `name` under `root`, in the reference order (split
    list order, or sorted ids), the first `limit` of them if set.

    Fails (DatasetFormatError naming the path) on a missing root or folder, a missing or empty
    split list, no images, or a listed / found image without its image or label file.
    """
    spec = segmentation_spec(name)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(
            f"{spec.name}: dataset root not found: {root} (expected the {spec.root_hint} folder)"
        )
    if spec.split_list is None:
        samples = _scan_samples(spec, root, split)
    else:
        split_list = Path(spec.split_list.format(split=split))
        voc = read_voc_split(
            root,
            split_list.stem,
            images_dir=spec.images_dir,
            labels_dir=spec.labels_dir,
            splits_dir=split_list.parent,
        )
        samples = [SegmentationSample(s.image_path, s.label_path, s.image_id) for s in voc]
    return samples[:limit] if limit is not None else samples


def read_label_map(
    path: str | Path, spec: SegmentationDatasetSpec, *, reduce: bool = False
) -> np.ndarray:
    """(H, W) int64 label map. RAW by default (feed it to a metric built with
    `spec.metric_kwargs()`, which applies reduce_zero_label); `reduce=True` applies the
    dataset's reduce_zero_label here instead (0 and the ignore index -> ignore index, k -> k-1).

    Fails (DatasetFormatError naming the file) on an unreadable / non-index PNG or on values that
    are neither a raw class label of this dataset nor the ignore index.
    """
    labels = read_label_png(path).astype(np.int64)
    bad = (labels > spec.max_raw_label) & (labels != spec.ignore_index)
    if bad.any():
        values = np.unique(labels[bad])
        raise DatasetFormatError(
            f"{path}: label values {values[:5].tolist()}{' ...' if values.size > 5 else ''} "
            f"are neither {spec.name} classes (0..{spec.max_raw_label}) nor the ignore index "
            f"{spec.ignore_index}"
        )
    if reduce and spec.reduce_zero_label:
        ignored = (labels == 0) | (labels == spec.ignore_index)
        labels = labels - 1
        labels[ignored] = spec.ignore_index
    return labels


def load_image(path: str | Path) -> Image.Image:
    """Decode an image to RGB; DatasetFormatError naming the file when it cannot be decoded
    (the evaluation skips and counts such samples)."""
    try:
        return decode_image(Path(path))
    except CorruptImageError as err:
        raise DatasetFormatError(str(err)) from err


def _plain(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def spec_from_config(cfg: Mapping[str, Any] | Any) -> SegmentationDatasetSpec:
    """The spec named by a segmentation `dataset` config, with the deprecated
    `dataset.bg_threshold` if set (a FutureWarning naming `segmentation.bg_threshold`)."""
    plain = _plain(cfg)
    spec = segmentation_spec(plain["name"])
    threshold = read_deprecated("dataset.bg_threshold", plain.get("bg_threshold"))
    if threshold is not None and threshold != spec.bg_threshold:
        spec = dataclasses.replace(spec, bg_threshold=float(threshold))
    return spec


def background_threshold(spec: SegmentationDatasetSpec, override: float | None = None) -> float:
    """The background threshold a run uses: `override` (`segmentation.bg_threshold`,
    `--bg-threshold`) if given, else the dataset's."""
    return float(spec.bg_threshold if override is None else override)


def ensure_synthetic_voc(cfg: Mapping[str, Any] | Any) -> Path:
    """For a config with a `synthetic:` block, generate the synthetic COCO-captions set (whose
    VOC-layout part is `root`) unless it is complete; returns `root`. Other configs: no-op.

    `root` must end with VOCdevkit/VOC2012; the set is generated two levels up, the folder the
    `coco_captions_synthetic` dataset config uses for the same seed.
    """
    plain = _plain(cfg)
    root = Path(plain["root"])
    synthetic = plain.get("synthetic")
    if not synthetic:
        return root
    if root.parts[-2:] != VOC2012_DIR.parts:
        raise ValueError(f"synthetic VOC root must end with {VOC2012_DIR}, got {root}")
    from vitlab.data.synthetic.coco_captions import (
        CocoCaptionsSyntheticSpec,
        generate_coco_captions,
    )
    from vitlab.data.synthetic.markers import generate_once, is_complete

    out = root.parent.parent
    spec = CocoCaptionsSyntheticSpec(**synthetic)
    if not is_complete(out, spec):  # two first runs at once: one generates, the other waits
        generate_once(out, spec, generate_coco_captions, "COCO captions")
    return root


def samples_from_config(cfg: Mapping[str, Any] | Any) -> list[SegmentationSample]:
    """`dataset_samples` for a segmentation `dataset` config (after `ensure_synthetic_voc`)."""
    plain = _plain(cfg)
    ensure_synthetic_voc(plain)
    return dataset_samples(
        plain["name"], plain["root"], plain.get("split", "val"), plain.get("limit")
    )
