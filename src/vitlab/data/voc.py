"""PASCAL VOC 2012 segmentation format: class names, colour palette, label PNGs, split lists.

Layout (mmseg's `data_root`, the folder called `voc_root` here):
    VOCdevkit/VOC2012/JPEGImages/<image_id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<image_id>.png   'P'-mode, pixel value = class index
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt   one image id per line
Label PNGs store class indices (0 background, 1-20 objects) and 255 ("void") on a thin band
around object boundaries and on difficult regions; the palette only affects how they look.
PASCAL Context (mmseg layout, under VOCdevkit/VOC2010) is the same layout with other label and
split folders, so `read_voc_split` takes those folders as arguments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitlab.atomic import atomic_output
from vitlab.data.images import IMAGE_ERRORS
from vitlab.errors import DatasetFormatError

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
# The names GroupViT's zero-shot evaluation gives the VOC classes in its text prompts
# (NVlabs/GroupViT segmentation/datasets/pascal_voc.py); the label indices are unchanged.
GROUPVIT_VOC_RENAMES: dict[str, str] = {
    "diningtable": "table",
    "pottedplant": "plant",
    "tvmonitor": "monitor",
}
VOC_PROMPT_NAMES: tuple[str, ...] = tuple(GROUPVIT_VOC_RENAMES.get(c, c) for c in VOC_CLASSES)
IGNORE_INDEX = 255
VOC2012_DIR = Path("VOCdevkit") / "VOC2012"
IMAGES_DIR = "JPEGImages"
LABELS_DIR = "SegmentationClass"
SPLITS_DIR = Path("ImageSets") / "Segmentation"


def voc_colormap(n: int = 256) -> np.ndarray:
    """The standard VOC palette: (n, 3) uint8, colour of index i from the bits of i."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def write_label_png(path: str | Path, labels: np.ndarray) -> None:
    """Write an (H, W) array of class indices (0..255) as a VOC-palette 'P'-mode PNG."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"label values must be in 0..255, got {labels.min()}..{labels.max()}")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(voc_colormap().reshape(-1).tolist())
    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG")


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a label PNG as an (H, W) uint8 array of class indices.

    Only index images ('P' or 'L' mode) are accepted: an RGB colour rendering of a mask would
    have to be mapped back through the palette, and reading it as indices would be silently wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"label PNG not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            labels = np.array(img, dtype=np.uint8)
    except IMAGE_ERRORS as err:
        raise DatasetFormatError(f"cannot decode label PNG {path}: {err}") from err
    if mode not in ("P", "L"):
        raise DatasetFormatError(
            f"{path}: label PNG must be a 'P' (palette) or 'L' image of class indices, "
            f"got mode {mode!r}"
        )
    return labels


@dataclass(frozen=True)
class VocSample:
    image_id: str
    image_path: Path
    label_path: Path


def read_voc_split(
    voc_root: str | Path,
    split: str,
    *,
    images_dir: str | Path = IMAGES_DIR,
    labels_dir: str | Path = LABELS_DIR,
    splits_dir: str | Path = SPLITS_DIR,
) -> list[VocSample]:
    """The samples of `<splits_dir>/<split>.txt` under the VOC folder, in file order; fails
    naming the list file or the first missing image / label file.

    The folder arguments default to VOC 2012 segmentation's; PASCAL Context (mmseg layout)
    passes `labels_dir="SegmentationClassContext"`, `splits_dir="ImageSets/SegmentationContext"`.
    """
    voc_root = Path(voc_root)
    images, labels = voc_root / images_dir, voc_root / labels_dir
    list_file = voc_root / splits_dir / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetFormatError(f"VOC split list not found: {list_file}")
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetFormatError(f"{list_file}: no image ids")
    samples = [VocSample(i, images / f"{i}.jpg", labels / f"{i}.png") for i in ids]
    _require_files(images, [s.image_path.name for s in samples], list_file)
    _require_files(labels, [s.label_path.name for s in samples], list_file)
    return samples


def _require_files(folder: Path, names: Sequence[str], listed_in: Path) -> None:
    if not folder.is_dir():
        raise DatasetFormatError(f"VOC folder not found: {folder}")
    present = set(os.listdir(folder))
    missing = [n for n in names if n not in present]
    if missing:
        raise DatasetFormatError(
            f"{len(missing)} file(s) listed in {listed_in} missing from {folder} "
            f"(first: {missing[0]})"
        )
