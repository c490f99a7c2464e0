"""Collages: multi-species training images made from PlantCLEF's single-plant images.

A test quadrat's tile often shows several plants, or none; the training images show one each.
A collage pastes `species` (a [low, high] range; 0 = bare soil) single-plant images of distinct
species, at random sizes and places, overlapping or not, on a soil or blurred background; its
label is the set of species. Collages of a split are built only from that split's images, so no
image is seen in two splits.

Collage shard j is built from prepared shard j alone (prepared shards are random samples of the
data: SHARD_ORDER_SEED), so a shard reads one file and the work spreads over Spark executors
like the prepare and embed stages. What each collage holds (its images, sizes, places) is drawn
from `(seed, shard)` only. The output has the prepared stage's form (columns image_name,
species_ids, learn_tag, image), so `embed_prepared` embeds it unchanged and caches it under a
key of the prepared key and the collage settings: changing them recomputes collages and their
embeddings, never the prepared images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from vitlab.cache import content_key
from vitlab.config import to_container
from vitlab.data.images import decode_rgb_array, encode_jpeg
from vitlab.data.shards import ShardedStage, shard_name
from vitlab.data.synthetic.drawing import soil_background
from vitlab.engines.local import LocalEngine
from vitlab.errors import ConfigError

log = logging.getLogger(__name__)
FILLS = ("soil", "blur")
COLLAGE_SPLITS = ("train", "val")
COLLAGE_SCHEMA = pa.schema(
    [
        ("image_name", pa.string()),
        ("species_ids", pa.list_(pa.int64())),
        ("learn_tag", pa.string()),
        ("image", pa.binary()),
    ]
)
# settings that change only how collages are mixed into training, not the collages themselves
NOT_IN_KEY = ("enabled", "proportion")


@dataclass(frozen=True)
class CollageParams:
    """The `collages` config node (configs/pipeline/plantclef.yaml)."""

    enabled: bool = False
    per_image: float = 1.0  # collages per single-plant image of the split
    species: tuple[int, int] = (1, 4)  # species per collage, low..high inclusive (0: bare soil)
    scale: tuple[float, float] = (0.35, 0.65)  # a plant's side / the collage's side
    fill: str = "soil"  # soil: a procedural soil texture | blur: the collage's images, blurred
    proportion: float = 0.5  # share of collages among the training samples of an epoch
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        low, high = self.species
        if not 0 <= low <= high:
            raise ValueError(f"species must be [low, high] with 0 <= low <= high: {self.species}")
        if high < 1:
            raise ValueError(f"species must allow at least one species: {self.species}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be 0 < low <= high <= 1: {self.scale}")
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {list(FILLS)}, got {self.fill!r}")
        if not 0 <= self.proportion <= 1:
            raise ValueError(f"proportion must be in [0, 1]: {self.proportion}")
        if self.per_image <= 0:
            raise ValueError(f"per_image must be > 0: {self.per_image}")

    @classmethod
    def from_config(cls, node: Any) -> CollageParams:
        """From the `collages` config node; ConfigError naming the key on a bad value."""
        values = to_container(node) or {}
        try:
            for key in ("species", "scale"):
                if key in values:
                    values[key] = tuple(values[key])
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"collages: {err}") from err

    def key_params(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in NOT_IN_KEY}


# --- composing one collage (pure) ---------------------------------------------------------


def oval_mask(side: int) -> Image.Image:
    """A soft-edged ellipse: the pasted plant fades into the background, no square seams."""
    mask = Image.new("L", (side, side), 0)
    inset = max(1, side // 12)
    ImageDraw.Draw(mask).ellipse((inset, inset, side - inset, side - inset), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(max(1, side // 24)))


def background(
    size: int, fill: str, sources: Sequence[Image.Image], rng: np.random.Generator
) -> Image.Image:
    if fill == "blur" and sources:  # the colours of the collage's own images, no detail
        return sources[0].resize((4, 4), Image.Resampling.BILINEAR).resize((size, size))
    return soil_background(size, size, rng)


def compose_collage(
    sources: Sequence[Image.Image],
    size: int,
    scale: tuple[float, float],
    fill: str,
    rng: np.random.Generator,
) -> Image.Image:
    """`sources` (one image per species) pasted at random sizes and places on a size x size
    background; an empty `sources` gives bare background."""
    canvas = background(size, fill, sources, rng)
    for source in sources:
        side = max(8, int(round(rng.uniform(*scale) * size)))
        x, y = (int(rng.integers(0, size - side + 1)) for _ in range(2))
        plant = source.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        canvas.paste(plant, (x, y), oval_mask(side))
    return canvas


# --- what each collage holds (drawn in the driver, from the labels only) ------------------


def plan_collages(
    labels: pd.DataFrame, shard: int, params: CollageParams
) -> list[tuple[str, str, list[int], list[int]]]:
    """(name, learn_tag, row numbers in the prepared shard, species ids) of each collage of
    `shard`, from that shard's `labels` (columns species_id, learn_tag, in row order).
    Each collage takes distinct species of one split, one image of each."""
    rng = np.random.default_rng([params.seed, shard])
    plan = []
    for tag in COLLAGE_SPLITS:
        rows = np.flatnonzero(labels["learn_tag"].to_numpy() == tag)
        if not len(rows):
            continue
        species = labels["species_id"].to_numpy()[rows]
        by_species = {int(s): rows[species == s] for s in np.unique(species)}
        choices = np.array(sorted(by_species))
        count = int(round(params.per_image * len(rows)))
        for i in range(count):
            k = int(rng.integers(params.species[0], params.species[1] + 1))
            picked = rng.choice(choices, min(k, len(choices)), replace=False)
            sources = [int(rng.choice(by_species[int(s)])) for s in picked]
            plan.append(
                (f"collage-{tag}-{shard:05d}-{i:05d}", tag, sources, sorted(picked.tolist()))
            )
    return plan


PLAN_COLUMNS = ("sources", "species_ids")  # comma-separated: plain strings travel to Spark


def shard_labels(prepared: ShardedStage, shard: int) -> pd.DataFrame:
    path = prepared.directory / shard_name(shard)
    return pq.read_table(path, columns=["species_id", "learn_tag"]).to_pandas()


@dataclass(frozen=True)
class CollageShardTask:
    """Compose one shard's collages from one prepared shard (picklable for Spark)."""

    prepared_dir: str
    params: CollageParams
    size: int

    def __call__(
        self, shard_no: int, rows: pd.DataFrame, progress: Callable[[int], Any] | None
    ) -> tuple[pa.Table, dict[str, Any]]:
        images = pq.read_table(Path(self.prepared_dir) / shard_name(shard_no), columns=["image"])
        blobs = images.column("image")
        rng = np.random.default_rng([self.params.seed, shard_no, 1])  # sizes and places
        names, tags, species, encoded = [], [], [], []
        for row in rows.itertuples(index=False):
            sources = [
                Image.fromarray(decode_rgb_array(blobs[int(i)].as_py()))
                for i in str(row.sources).split(",")
                if i
            ]
            collage = compose_collage(sources, self.size, self.params.scale, self.params.fill, rng)
            names.append(row.image_name)
            tags.append(row.learn_tag)
            species.append([int(s) for s in str(row.species_ids).split(",") if s])
            encoded.append(encode_jpeg(collage, self.params.jpeg_quality))
        if progress:
            progress(len(rows))
        columns = {"image_name": names, "species_ids": species, "learn_tag": tags, "image": encoded}
        return pa.table(columns, schema=COLLAGE_SCHEMA), {}


def build_collages(
    prepared: ShardedStage,
    cache_dir: str | Path,
    params: CollageParams,
    size: int,
    engine: Any = None,
) -> ShardedStage:
    """The collages of the prepared training images (cached: key of the prepared key, the
    collage settings and the image size)."""
    engine = engine or LocalEngine()
    key = content_key("collages-v1", prepared.key, params.key_params(), size)
    stage = ShardedStage(
        Path(cache_dir) / "collages" / key, key, {"prepared": prepared.key, **params.key_params()}
    )
    stage.verify(checksum=not stage.complete)
    if stage.complete:
        log.info("collages: cache hit (key %s, %s)", key, stage.directory)
        return stage
    stage.remove_stale_temporaries()
    todo = [shard for shard in prepared.shard_indices() if not stage.has_shard(shard)]
    work = [
        (s, name, tag, ",".join(map(str, sources)), ",".join(map(str, species)))
        for s in todo
        for name, tag, sources, species in plan_collages(shard_labels(prepared, s), s, params)
    ]
    frame = pd.DataFrame(work, columns=["shard", "image_name", "learn_tag", *PLAN_COLUMNS])
    if len(frame):
        prepared.require(sorted(set(frame["shard"].tolist())))
        task = CollageShardTask(str(prepared.directory), params, size)
        engine.map_shards(stage, frame, task, "collages", len(frame))
    tags = stage.read_table(["learn_tag"]).column("learn_tag").to_pylist()
    stage.finish({f"collages_{tag}": tags.count(tag) for tag in COLLAGE_SPLITS})
    log.info("collages: %s", stage.manifest.get("report"))
    return stage
