"""Synthetic MSCOCO captions dataset (2017 layout) plus the same pictures as a PASCAL VOC 2012
segmentation set, so caption fine-tuning and zero-shot segmentation run on the real code paths.

Every picture shows 1-3 objects of five VOC classes on a textured, desaturated ground. Each class
has its own colour and shape (orange cat: round head with ears; red car: wide body on black
wheels; blue bird: body with raised wings; yellow boat: hull and sail; white sheep: woolly
blob with a dark head), with size, position and colour jitter, so image-text models can learn
them. Five captions per image name every object present, with colour / size adjectives and
counts ("Two white sheep and a small red car on the grass"), so noun extraction finds the class
names. The label PNGs hold VOC class indices, 0 background and 255 on a thin band around every
object boundary, like the real VOC masks.
Written (all deterministic given the seed):
    annotations/captions_train2017.json, annotations/captions_val2017.json   (written last)
    train2017/<12-digit id>.jpg, val2017/<12-digit id>.jpg
    VOCdevkit/VOC2012/JPEGImages/2017_<6-digit id>.jpg                  train and val pictures
    VOCdevkit/VOC2012/SegmentationClass/2017_<6-digit id>.png
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt   COCO train / val split
    .vitlab-synthetic (written first), .complete (last; markers.py)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vitlab.atomic import atomic_write_text
from vitlab.data.coco_captions import coco_paths
from vitlab.data.images import encode_jpeg
from vitlab.data.synthetic.markers import claim_output_dir, mark_complete
from vitlab.data.voc import (
    IGNORE_INDEX,
    IMAGES_DIR,
    LABELS_DIR,
    SPLITS_DIR,
    VOC2012_DIR,
    VOC_CLASSES,
    write_label_png,
)

SYNTHETIC_CLASSES: tuple[str, ...] = ("cat", "car", "bird", "boat", "sheep")
PLURALS = {"cat": "cats", "car": "cars", "bird": "birds", "boat": "boats", "sheep": "sheep"}
COLOURS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "cat": ("orange", (236, 136, 36)),
    "car": ("red", (204, 32, 36)),
    "bird": ("blue", (44, 86, 214)),
    "boat": ("yellow", (240, 208, 40)),
    "sheep": ("white", (238, 238, 230)),
}
# (width, height) of the object box relative to its size draw
ASPECTS = {"cat": (0.9, 1.0), "car": (1.45, 0.8), "bird": (1.1, 0.9), "boat": (1.25, 1.0)}
ACTIONS = {
    "cat": ("sitting", "resting", "lying"),
    "car": ("parked", "waiting"),
    "bird": ("perched", "standing"),
    "boat": ("resting", "lying"),
    "sheep": ("grazing", "standing"),
}
# ground name -> (base colour, "on the ..." phrase); low saturation so objects stand out
SCENES: dict[str, tuple[tuple[int, int, int], str]] = {
    "grass": ((112, 122, 98), "on the grass"),
    "sand": ((152, 144, 122), "on the sand"),
    "pavement": ((124, 124, 124), "on the pavement"),
    "field": ((130, 126, 108), "in a field"),
}
NUMBER_WORDS = {2: "two", 3: "three"}
JPEG_QUALITY = 90


@dataclass(frozen=True)
class CocoCaptionsSyntheticSpec:
    seed: int = 0
    n_train: int = 240
    n_val: int = 48
    image_size: int = 96  # short side; the long side is 1-1.33x longer
    captions_per_image: int = 5
    min_objects: int = 1
    max_objects: int = 3
    # object box side as a fraction of the picture's short side (uniform in this range)
    object_scale: tuple[float, float] = (0.32, 0.55)
    # share of TRAIN pictures showing only the ground (captions name just the ground: "an empty
    # field"); the val pictures always hold objects, like VOC's
    empty_fraction: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "object_scale", tuple(float(v) for v in self.object_scale))


@dataclass(frozen=True)
class SyntheticObject:
    name: str
    box: tuple[float, float, float, float]  # left, top, right, bottom
    relative_area: float


class _Pen:
    """Draws each shape on the picture (colour) and on the label map (class index) at once."""

    def __init__(self, img: Image.Image, mask: Image.Image, colour: tuple[int, ...], label: int):
        self.img = ImageDraw.Draw(img)
        self.mask = ImageDraw.Draw(mask)
        self.colour = colour
        self.label = label

    def ellipse(self, xy, fill=None) -> None:
        self.img.ellipse(xy, fill=fill or self.colour)
        self.mask.ellipse(xy, fill=self.label)

    def polygon(self, points, fill=None) -> None:
        self.img.polygon(points, fill=fill or self.colour)
        self.mask.polygon(points, fill=self.label)

    def rectangle(self, xy, fill=None) -> None:
        self.img.rectangle(xy, fill=fill or self.colour)
        self.mask.rectangle(xy, fill=self.label)

    def line(self, xy, width: int, fill=None) -> None:
        self.img.line(xy, fill=fill or self.colour, width=width)
        self.mask.line(xy, fill=self.label, width=width)

    def detail(self, xy, fill) -> None:
        """A mark inside the silhouette (eyes, windows): picture only."""
        self.img.ellipse(xy, fill=fill)


def _shade(colour: tuple[int, ...], factor: float) -> tuple[int, ...]:
    return tuple(int(min(255, max(0, c * factor))) for c in colour)


def draw_object(pen: _Pen, name: str, box: tuple[float, float, float, float]) -> None:
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    cx = (left + right) / 2
    dark = (40, 36, 34)
    if name == "cat":
        pen.ellipse((left + 0.12 * w, top + 0.45 * h, right - 0.12 * w, bottom))
        r = 0.27 * w
        hx, hy = cx, top + 0.4 * h
        for side in (-1, 1):
            pen.polygon(
                [
                    (hx + side * 0.55 * r, hy - 0.5 * r),
                    (hx + side * 0.95 * r, top),
                    (hx + side * 0.05 * r, hy - 0.8 * r),
                ]
            )
        pen.ellipse((hx - r, hy - r, hx + r, hy + r))
        for side in (-1, 1):
            ex = hx + side * 0.4 * r
            pen.detail((ex - 0.12 * r, hy - 0.2 * r, ex + 0.12 * r, hy + 0.05 * r), fill=dark)
    elif name == "car":
        pen.polygon(
            [
                (left + 0.22 * w, top + 0.4 * h),
                (left + 0.33 * w, top),
                (right - 0.3 * w, top),
                (right - 0.16 * w, top + 0.4 * h),
            ]
        )
        pen.rectangle((left, top + 0.38 * h, right, top + 0.8 * h))
        window = (210, 220, 228)
        pen.img.polygon(
            [
                (left + 0.3 * w, top + 0.36 * h),
                (left + 0.37 * w, top + 0.1 * h),
                (right - 0.34 * w, top + 0.1 * h),
                (right - 0.25 * w, top + 0.36 * h),
            ],
            fill=window,
        )
        r = 0.2 * h
        for wx in (left + 0.25 * w, right - 0.25 * w):
            pen.ellipse((wx - r, bottom - 2 * r, wx + r, bottom), fill=(28, 28, 30))
    elif name == "bird":
        cy = top + 0.62 * h
        pen.ellipse((left + 0.2 * w, top + 0.45 * h, right - 0.25 * w, bottom - 0.1 * h))
        wing = _shade(pen.colour, 0.8)
        pen.polygon([(cx - 0.05 * w, cy), (left, top), (cx - 0.2 * w, cy + 0.05 * h)], fill=wing)
        pen.polygon([(cx + 0.05 * w, cy), (right - 0.1 * w, top), (cx + 0.15 * w, cy)], fill=wing)
        r = 0.13 * w
        hx, hy = right - 0.2 * w, top + 0.48 * h
        pen.ellipse((hx - r, hy - r, hx + r, hy + r))
        pen.polygon(
            [(hx + 0.8 * r, hy - 0.3 * r), (right, hy), (hx + 0.8 * r, hy + 0.3 * r)], fill=dark
        )
        pen.detail((hx - 0.2 * r, hy - 0.4 * r, hx + 0.2 * r, hy), fill=dark)
    elif name == "boat":
        deck = top + 0.6 * h
        pen.polygon(
            [(left, deck), (right, deck), (right - 0.15 * w, bottom), (left + 0.15 * w, bottom)]
        )
        mast = max(1, int(w / 30))
        pen.line((cx, top, cx, deck), width=mast, fill=(90, 70, 50))
        pen.polygon(
            [(cx + mast, top), (cx + mast, deck - 0.06 * h), (right - 0.12 * w, deck - 0.06 * h)],
            fill=_shade(pen.colour, 1.08),
        )
    elif name == "sheep":
        body = (left + 0.18 * w, top + 0.12 * h, right - 0.02 * w, bottom - 0.22 * h)
        bx, by = (body[0] + body[2]) / 2, (body[1] + body[3]) / 2
        rx, ry = (body[2] - body[0]) / 2, (body[3] - body[1]) / 2
        legs = max(1, int(w / 14))
        for lx in (body[0] + 0.3 * rx, body[2] - 0.3 * rx):
            pen.line((lx, by, lx, bottom), width=legs, fill=dark)
        pen.ellipse(
            (body[0] + 0.1 * rx, body[1] + 0.1 * ry, body[2] - 0.1 * rx, body[3] - 0.1 * ry)
        )
        for k in range(8):  # wool: bumps around the body
            ang = 2 * math.pi * k / 8
            px, py = bx + 0.7 * rx * math.cos(ang), by + 0.7 * ry * math.sin(ang)
            rr = 0.32 * min(rx, ry) + 0.1 * max(rx, ry)
            pen.ellipse((px - rr, py - rr, px + rr, py + rr))
        pen.ellipse((left, top + 0.22 * h, left + 0.3 * w, top + 0.55 * h), fill=(70, 66, 64))
    else:
        raise ValueError(f"no drawing for class {name!r}")


def ground(width: int, height: int, base: tuple[int, int, int], rng: np.random.Generator):
    """Smoothly varying, grainy neutral ground."""
    shape = (max(2, height // 16), max(2, width // 16))
    coarse = rng.normal(0, 10, size=(*shape, 1)) + rng.normal(0, 3, size=(*shape, 3))
    coarse_img = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8))
    smooth = np.asarray(coarse_img.resize((width, height), Image.Resampling.BILINEAR), np.float32)
    grain = rng.normal(0, 5, size=(height, width, 1))
    pixels = np.asarray(base, np.float32) + (smooth - 128) + grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _place_objects(
    width: int, height: int, spec: CocoCaptionsSyntheticSpec, rng: np.random.Generator
) -> list[SyntheticObject]:
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    names: list[str] = []
    for _ in range(n):
        if names and rng.random() < 0.25:  # sometimes several of a kind: "two birds"
            names.append(names[int(rng.integers(len(names)))])
        else:
            names.append(str(rng.choice(SYNTHETIC_CLASSES)))
    short = min(width, height)
    placed: list[SyntheticObject] = []
    for name in names:
        for _ in range(40):
            side = short * rng.uniform(*spec.object_scale) * (0.85 if len(names) == 3 else 1.0)
            aw, ah = ASPECTS.get(name, (1.0, 1.0))
            w, h = min(width - 2, side * aw), min(height - 2, side * ah)
            left, top = rng.uniform(1, width - w - 1), rng.uniform(1, height - h - 1)
            box = (left, top, left + w, top + h)
            if all(_overlap(box, other.box) < 0.12 for other in placed):
                placed.append(SyntheticObject(name, box, w * h / (width * height)))
                break
    return placed


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def boundary_band(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """Boolean (H, W): a band about `width` px wide along every change of label (VOC's 255
    "void" band, ~5 px on the ~500 px real pictures)."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    if width > 1:
        size = width if width % 2 else width + 1
        grown = Image.fromarray(edge.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(size))
        edge = np.asarray(grown) > 0
    return edge


def synthetic_picture(
    spec: CocoCaptionsSyntheticSpec, rng: np.random.Generator, empty: bool = False
) -> tuple[Image.Image, np.ndarray, list[SyntheticObject], str]:
    """(RGB picture, VOC label map with the 255 band, objects, ground name); `empty`: the
    ground alone."""
    short = spec.image_size
    long = int(round(short * rng.uniform(1.0, 1.33)))
    width, height = (long, short) if rng.random() < 0.75 else (short, long)
    scene = str(rng.choice(list(SCENES)))
    img = ground(width, height, SCENES[scene][0], rng)
    mask = Image.new("L", (width, height), 0)
    objects = [] if empty else _place_objects(width, height, spec, rng)
    for obj in objects:
        base = COLOURS[obj.name][1]
        colour = tuple(int(np.clip(c + rng.integers(-14, 15), 0, 255)) for c in base)
        draw_object(_Pen(img, mask, colour, VOC_CLASSES.index(obj.name)), obj.name, obj.box)
    labels = np.asarray(mask, dtype=np.uint8).copy()
    labels[boundary_band(labels, max(1, round(short / 100)))] = IGNORE_INDEX
    return img, labels, objects, scene


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _size_word(obj: SyntheticObject, rng: np.random.Generator) -> str | None:
    if obj.relative_area < 0.12:
        return str(rng.choice(["small", "little", "tiny"]))
    if obj.relative_area > 0.2:
        return str(rng.choice(["large", "big"]))
    return None


def _group_phrase(group: list[SyntheticObject], rng: np.random.Generator) -> str:
    """Noun phrase for all objects of one class: "a small orange cat", "two birds"."""
    name = group[0].name
    words = []
    if len(group) == 1:
        size = _size_word(group[0], rng)
        if size and rng.random() < 0.5:
            words.append(size)
        if rng.random() < 0.6:
            words.append(COLOURS[name][0])
        return _article(" ".join([*words, name]))
    if rng.random() < 0.5:
        words.append(COLOURS[name][0])
    return " ".join([NUMBER_WORDS.get(len(group), "several"), *words, PLURALS[name]])


def _join(phrases: list[str], rng: np.random.Generator) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        link = str(rng.choice(["and", "next to", "near", "with", "beside"]))
        return f"{phrases[0]} {link} {phrases[1]}"
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


GROUND_TEMPLATES = (
    "an empty {ground}",
    "a photo of the {ground}",
    "nothing but {ground}",
    "a patch of {ground}",
    "close up of the {ground}",
    "here we see the {ground}",
    "bare {ground} seen from above",
    "the {ground} outside",
)


def ground_captions(scene: str, n: int, rng: np.random.Generator) -> list[str]:
    """n distinct captions of a picture without objects: they name only the ground."""
    captions: list[str] = []
    for _ in range(50 * n):
        caption = str(rng.choice(GROUND_TEMPLATES)).format(ground=scene)
        caption = caption[0].upper() + caption[1:] + ("." if rng.random() < 0.5 else "")
        if caption not in captions:
            captions.append(caption)
        if len(captions) == n:
            return captions
    raise RuntimeError(f"could not make {n} distinct captions of the {scene}")


def make_captions(
    objects: list[SyntheticObject], scene: str, n: int, rng: np.random.Generator
) -> list[str]:
    """n distinct captions, each naming every class present (with counts and adjectives); only
    the ground when there is no object."""
    if not objects:
        return ground_captions(scene, n, rng)
    groups: dict[str, list[SyntheticObject]] = {}
    for obj in sorted(objects, key=lambda o: -o.relative_area):
        groups.setdefault(obj.name, []).append(obj)
    where = SCENES[scene][1]
    templates = [
        "{objs} {where}",
        "a photo of {objs}",
        "{there} {objs} {where}",
        "close up of {objs}",
        "a picture of {objs} {where}",
        "{objs} seen from above",
        "here we see {objs} {where}",
        "{objs} outside",
    ]  # like COCO, some name extra nouns (photo, picture, grass) besides the objects
    if len(groups) == 1:
        templates.append("{objs} {action} {where}")
    captions: list[str] = []
    for _ in range(50 * n):
        order = list(groups.values())
        rng.shuffle(order)
        phrases = [_group_phrase(g, rng) for g in order]
        caption = str(rng.choice(templates)).format(
            objs=_join(phrases, rng),
            where=where,
            there="there is" if len(order[0]) == 1 else "there are",  # agrees with 1st noun
            action=str(rng.choice(ACTIONS[order[0][0].name])),
        )
        caption = caption[0].upper() + caption[1:] + ("." if rng.random() < 0.5 else "")
        if caption not in captions:
            captions.append(caption)
        if len(captions) == n:
            return captions
    raise RuntimeError(f"could not make {n} distinct captions for {[o.name for o in objects]}")


def generate_coco_captions(
    out_dir: str | Path, spec: CocoCaptionsSyntheticSpec | None = None
) -> Path:
    """Write the dataset into a new, empty or previously generated folder (a user's folder is
    refused, never touched: markers.py). Returns the folder.

    Pictures and masks first, then the VOC split lists, then the COCO JSONs and `.complete`
    (atomically), so an interrupted run never leaves annotation files that look whole.
    """
    spec = spec or CocoCaptionsSyntheticSpec()
    if spec.n_train < 1 or spec.n_val < 1:
        raise ValueError("n_train and n_val must be >= 1")
    if spec.image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {spec.image_size}")
    if not 1 <= spec.min_objects <= spec.max_objects <= 3:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= 3, got {spec.min_objects}, {spec.max_objects}"
        )
    low, high = spec.object_scale if len(spec.object_scale) == 2 else (0.0, 0.0)
    if not 0.1 <= low <= high <= 0.95:
        raise ValueError(
            "object_scale must be (low, high) with 0.1 <= low <= high <= 0.95, "
            f"got {spec.object_scale}"
        )
    if not 0.0 <= spec.empty_fraction < 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1), got {spec.empty_fraction}")
    out = claim_output_dir(out_dir)
    (out / "annotations").mkdir()
    voc = out / VOC2012_DIR
    for folder in (voc / IMAGES_DIR, voc / LABELS_DIR, voc / SPLITS_DIR):
        folder.mkdir(parents=True)

    rng = np.random.default_rng(spec.seed)
    ids = [int(i) for i in rng.choice(np.arange(1, 600_000), spec.n_train + spec.n_val, False)]
    next_annotation = int(rng.integers(1, 100_000))
    finished: list[tuple[str, Path, dict, list[str]]] = []
    for stream, (split, split_ids) in enumerate(
        (("train", ids[: spec.n_train]), ("val", ids[spec.n_train :]))
    ):
        # each split's pictures and captions from their own stream: the held-out val pictures
        # stay the same whatever n_train is (budget curves compare on the same val set)
        rng = np.random.default_rng([spec.seed, stream])
        annotation_json, image_dir = coco_paths(out, split)
        image_dir.mkdir()
        images, annotations, voc_ids = [], [], []
        for image_id in split_ids:
            empty = (
                split == "train"
                and spec.empty_fraction > 0
                and (rng.random() < spec.empty_fraction)
            )
            img, labels, objects, scene = synthetic_picture(spec, rng, empty)
            captions = make_captions(objects, scene, spec.captions_per_image, rng)
            data = encode_jpeg(img, quality=JPEG_QUALITY)
            file_name = f"{image_id:012d}.jpg"
            (image_dir / file_name).write_bytes(data)
            voc_id = f"2017_{image_id:06d}"
            (voc / IMAGES_DIR / f"{voc_id}.jpg").write_bytes(data)
            write_label_png(voc / LABELS_DIR / f"{voc_id}.png", labels)
            voc_ids.append(voc_id)
            images.append(
                {
                    "license": 1,
                    "file_name": file_name,
                    "coco_url": "",
                    "height": img.height,
                    "width": img.width,
                    "date_captured": "2017-01-01 00:00:00",
                    "flickr_url": "",
                    "id": image_id,
                }
            )
            for caption in captions:
                annotations.append(
                    {"image_id": image_id, "id": next_annotation, "caption": caption}
                )
                next_annotation += 1
        payload = {
            "info": {
                "description": f"vitlab synthetic COCO captions (seed {spec.seed})",
                "version": "1.0",
                "year": 2017,
            },
            "licenses": [{"url": "", "id": 1, "name": "synthetic"}],
            "images": images,
            "annotations": annotations,
        }
        finished.append((split, annotation_json, payload, voc_ids))

    for split, _, _, voc_ids in finished:
        atomic_write_text(voc / SPLITS_DIR / f"{split}.txt", "\n".join(voc_ids) + "\n")
    trainval = [i for _, _, _, voc_ids in finished for i in voc_ids]
    atomic_write_text(voc / SPLITS_DIR / "trainval.txt", "\n".join(trainval) + "\n")
    for _, annotation_json, payload, _ in finished:
        atomic_write_text(annotation_json, json.dumps(payload))
    mark_complete(out, spec)
    return out
