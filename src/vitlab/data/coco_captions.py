"""MSCOCO 2017 captions: the official annotation JSON, an (image, random caption) dataset,
its collate function and the image transforms of the GroupViT fine-tuning recipe.

Layout (`coco_paths`):
    <root>/annotations/captions_{train,val}2017.json   `images` (id, file_name, height, width)
                                                       and `annotations` (image_id, caption)
    <root>/{train,val}2017/<file_name>                 000000391895.jpg, ...
One dataset item per image; each epoch draws one of its captions at random, seeded by
(seed, epoch, index) so an epoch is reproducible whatever the DataLoader workers do.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from vitlab.data.images import CorruptImageError, decode_image
from vitlab.data.missing_images import (
    DEFAULT_MAX_MISSING_FRACTION,
    check_missing_images,
    require_image_folder,
)
from vitlab.errors import DatasetFormatError
from vitlab.models.backbones import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
IMAGE_KEYS = ("id", "file_name", "height", "width")
ANNOTATION_KEYS = ("image_id", "caption")

TextFn = Callable[[str, random.Random], Mapping[str, Any]]


@dataclass(frozen=True)
class CaptionedImage:
    image_id: int
    path: Path
    captions: tuple[str, ...]
    height: int
    width: int


@dataclass(frozen=True)
class CaptionsReport:
    """What `read_coco_captions_with_report` kept and dropped."""

    annotation_json: Path
    n_images: int  # kept: images with at least one caption
    n_captions: int  # captions of the kept images
    skipped_no_captions: int  # images listed without any (non-empty) caption
    empty_captions: int  # annotations whose caption is blank after stripping
    missing_images: int = 0  # captioned images whose file is not in the folder (skipped)
    missing_examples: tuple[str, ...] = ()  # their file names (at most 100)


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation JSON, image folder) of a COCO 2017 split ("train" or "val")."""
    if split not in SPLITS:
        raise ValueError(f"COCO captions split must be one of {list(SPLITS)}, got {split!r}")
    root = Path(root)
    return root / "annotations" / f"captions_{split}2017.json", root / f"{split}2017"


def read_coco_captions(
    annotation_json: str | Path,
    image_dir: str | Path,
    max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION,
) -> list[CaptionedImage]:
    """Images with their captions, in the JSON's image order; images without captions are
    skipped (the count is logged; `read_coco_captions_with_report` returns it)."""
    records, report = read_coco_captions_with_report(
        annotation_json, image_dir, max_missing_fraction
    )
    if report.skipped_no_captions or report.empty_captions:
        log.warning(
            "%s: skipped %d image(s) without captions, %d blank caption(s)",
            report.annotation_json,
            report.skipped_no_captions,
            report.empty_captions,
        )
    return records


def read_coco_captions_with_report(
    annotation_json: str | Path,
    image_dir: str | Path,
    max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION,
    folder_key: str = "dataset.root",
) -> tuple[list[CaptionedImage], CaptionsReport]:
    """Parse and check an official captions JSON against its image folder.

    Raises DatasetFormatError naming the file (and key / image id / file name) when: the file is
    missing or not JSON, `images` / `annotations` or an entry's key is missing, an image id is
    duplicated, a file_name is listed under two ids, an annotation refers to an unknown image id,
    or no images are listed. Captioned images whose file is not in the folder follow the rule
    of `vitlab.data.missing_images`: up to `max_missing_fraction`
    (`dataset.max_missing_fraction`) of them are skipped and counted in the report; more, none
    on disk, or a missing folder is an error naming the folder and `folder_key` (the config key
    it comes from).
    """
    path = Path(annotation_json)
    image_dir = Path(image_dir)
    if not path.is_file():
        raise DatasetFormatError(f"COCO captions file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise DatasetFormatError(
            f"{path}: top level must be an object with 'images' and "
            f"'annotations', got {type(data).__name__}"
        )
    for key in ("images", "annotations"):
        if key not in data:
            raise DatasetFormatError(f"{path}: missing key {key!r}; found {sorted(data)}")
        if not isinstance(data[key], list):
            raise DatasetFormatError(f"{path}: {key!r} must be a list")
    if not data["images"]:
        raise DatasetFormatError(f"{path}: 'images' is empty")

    images: dict[int, dict[str, Any]] = {}
    id_of_file: dict[str, int] = {}
    for n, entry in enumerate(data["images"]):
        _require_keys(path, "images", n, entry, IMAGE_KEYS)
        image_id = _as_int(path, f"images[{n}]", entry, "id")
        _as_int(path, f"images[{n}]", entry, "height")
        _as_int(path, f"images[{n}]", entry, "width")
        if image_id in images:
            raise DatasetFormatError(f"{path}: image id {image_id} listed twice")
        name = str(entry["file_name"])
        if name in id_of_file:  # one file, two ids: its captions would split, it would count twice
            raise DatasetFormatError(
                f"{path}: image file {name} is listed under two image ids {id_of_file[name]} "
                f"and {image_id} (images[{n}]); each file must have one id"
            )
        id_of_file[name] = image_id
        images[image_id] = entry

    captions: dict[int, list[str]] = {image_id: [] for image_id in images}
    empty = 0
    for n, ann in enumerate(data["annotations"]):
        _require_keys(path, "annotations", n, ann, ANNOTATION_KEYS)
        image_id = _as_int(path, f"annotations[{n}]", ann, "image_id")
        if image_id not in captions:
            raise DatasetFormatError(
                f"{path}: annotation {ann.get('id', n)} refers to unknown image id {image_id}"
            )
        if not isinstance(ann["caption"], str):
            raise DatasetFormatError(
                f"{path}: annotation {ann.get('id', n)} has a non-string caption"
            )
        caption = " ".join(ann["caption"].split())  # COCO captions carry stray newlines/spaces
        if caption:
            captions[image_id].append(caption)
        else:
            empty += 1

    require_image_folder(image_dir, f"{folder_key}, for {path.name}")
    present = set(os.listdir(image_dir))
    records: list[CaptionedImage] = []
    missing: list[str] = []
    skipped = 0
    for image_id, entry in images.items():
        if not captions[image_id]:
            skipped += 1
            continue
        name = str(entry["file_name"])
        if name not in present:
            missing.append(name)
            continue
        records.append(
            CaptionedImage(
                image_id=image_id,
                path=image_dir / name,
                captions=tuple(captions[image_id]),
                height=int(entry["height"]),
                width=int(entry["width"]),
            )
        )
    if not records and not missing:
        raise DatasetFormatError(f"{path}: no image has a caption")
    checked = check_missing_images(
        path.stem,
        len(records) + len(missing),
        missing,
        image_dir,
        folder_key,
        max_missing_fraction,
        source=path,
    )
    report = CaptionsReport(
        annotation_json=path,
        n_images=len(records),
        n_captions=sum(len(r.captions) for r in records),
        skipped_no_captions=skipped,
        empty_captions=empty,
        missing_images=checked.missing,
        missing_examples=checked.examples,
    )
    return records, report


def _require_keys(path: Path, section: str, n: int, entry: Any, keys: Sequence[str]) -> None:
    if not isinstance(entry, dict):
        raise DatasetFormatError(f"{path}: {section}[{n}] is not an object")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DatasetFormatError(
            f"{path}: {section}[{n}] (id {entry.get('id', '?')}) is missing key(s) {missing}"
        )


def _as_int(path: Path, where: str, entry: Mapping[str, Any], key: str) -> int:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DatasetFormatError(f"{path}: {where}[{key!r}] must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError as err:
        raise DatasetFormatError(
            f"{path}: {where}[{key!r}] must be an integer, got {value!r}"
        ) from err


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; DatasetFormatError naming the file if it cannot be."""
    try:
        return decode_image(Path(path))
    except CorruptImageError as err:
        raise DatasetFormatError(str(err)) from err


def validate_images(
    records: Sequence[CaptionedImage], workers: int = 8
) -> tuple[list[CaptionedImage], list[Path]]:
    """Fully decode every image once: (records whose image decodes, paths that do not).

    Meant to run once before training so corrupt files are dropped and counted up front
    instead of failing an epoch halfway. Decoding runs on `workers` threads (PIL releases
    the GIL while decoding).
    """

    def ok(record: CaptionedImage) -> bool:
        try:
            decode_image(record.path)
        except CorruptImageError:
            return False
        return True

    if workers > 1 and len(records) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            flags = list(pool.map(ok, records, chunksize=64))
    else:
        flags = [ok(r) for r in records]
    good = [r for r, f in zip(records, flags) if f]
    bad = [r.path for r, f in zip(records, flags) if not f]
    if bad:
        log.warning("dropped %d undecodable image(s) (first: %s)", len(bad), bad[0])
    return good, bad


class CocoCaptionsDataset(Dataset):
    """One item per image: the transformed image and one of its captions, drawn at random.

    The caption (and whatever randomness `text_fn` uses: prompt templates, label order) comes
    from a `random.Random` seeded by (seed, epoch, index), so an epoch is reproducible, epochs
    differ, and DataLoader workers never share a random stream. Call `set_epoch(epoch)` before
    iterating each epoch; the epoch lives in shared memory, so persistent workers see it too
    (as long as it is set before the epoch's iterator is created). Image augmentation uses
    torch's RNG, which the DataLoader seeds per worker.

    Items: {"image": tensor, "index": int, "caption": str, **text_fn(caption, rng)}.
    A file that cannot be decoded raises DatasetFormatError naming it; filter the records
    with `validate_images` first.
    """

    def __init__(
        self,
        records: Sequence[CaptionedImage],
        transform: Callable[[Image.Image], torch.Tensor],
        text_fn: TextFn | None = None,
        seed: int = 0,
    ):
        if not records:
            raise ValueError("CocoCaptionsDataset needs at least one record")
        self.records = list(records)
        self.transform = transform
        self.text_fn = text_fn
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def rng(self, index: int) -> random.Random:
        """The random stream of item `index` in the current epoch."""
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2)
        return random.Random(int(state[0]) << 32 | int(state[1]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        rng = self.rng(index)
        caption = rng.choice(record.captions)
        item: dict[str, Any] = {
            "image": self.transform(load_rgb(record.path)),
            "index": int(index),
            "caption": caption,
        }
        if self.text_fn is not None:
            item.update(self.text_fn(caption, rng))
        return item


def collate_captions(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack tensors (and numbers) along a new batch axis; keep everything else as lists,
    e.g. `labels` as list[list[str]] and `caption` as list[str]."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, np.ndarray):
            out[key] = torch.from_numpy(np.stack(values))
        elif isinstance(first, bool | int | float) and key != "labels":
            out[key] = torch.tensor(values)
        else:
            out[key] = list(values)
    return out


def _normalize() -> T.Normalize:
    return T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def train_transform(
    image_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    randaugment: bool = False,
) -> T.Compose:
    """GroupViT/DeiT-style training augmentation: bicubic RandomResizedCrop, horizontal flip,
    optional RandAugment (2 ops, magnitude 9), ImageNet normalisation."""
    steps: list[Callable[..., Any]] = [
        T.RandomResizedCrop(
            image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC
        ),
        T.RandomHorizontalFlip(),
    ]
    if randaugment:
        steps.append(T.RandAugment(num_ops=2, magnitude=9))
    steps += [T.ToTensor(), _normalize()]
    return T.Compose(steps)


def eval_transform(image_size: int) -> T.Compose:
    """Short side to image_size (bicubic), centre crop image_size, ImageNet normalisation."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            _normalize(),
        ]
    )
