"""Spark `local[2]` embed throughput divided by the local engine's, on the same prepared data.

Generates a synthetic PlantCLEF set, prepares it once (local engine), then embeds it with the
tiny ViT on a cold cache with each engine (the Spark session is started before timing; its
start-up time is printed separately). Same rows, same model, same batch size. The local engine
runs before the Spark session starts and again after it stops; the best local run is the
reference.

Run: PYTHONPATH=src python benchmarks/spark_vs_local_embed.py [--images-per-species 150]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from vitlab.data.synthetic.plantclef import PlantClefSyntheticSpec, generate_plantclef
from vitlab.engines import LocalEngine, SparkEngine
from vitlab.models.backbones import create_backbone
from vitlab.models.features import ClsToken
from vitlab.pipelines.plantclef.prepare import prepare_training_images
from vitlab.stages.embed import embed_prepared
from vitlab.stages.prepare import PrepareParams

TINY = {
    "name": "vit_tiny_patch16_224",
    "model_kwargs": {"img_size": 128, "depth": 4},
    "input_size": 128,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images-per-species", type=int, default=150)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = PlantClefSyntheticSpec(
            max_images_per_species=args.images_per_species,
            min_images_per_species=args.images_per_species // 2,
            n_quadrats=1,
        )
        data = generate_plantclef(root / "data", spec)
        params = PrepareParams(image_size=128, shard_size=args.shard_size)
        prepared = prepare_training_images(
            data / "PlantCLEF2024_single_plant_training_metadata.csv",
            data / "images_max_side_800",
            root / "prep",
            params,
        )
        rows = prepared.manifest["report"]["images_written"]
        backbone = create_backbone("timm", **TINY)

        def embed_rate(name: str, engine) -> float:
            cache = root / f"cache-{name}"
            start = time.perf_counter()
            embed_prepared(prepared, backbone, ClsToken(), cache, args.batch_size, engine)
            rate = rows / (time.perf_counter() - start)
            shutil.rmtree(cache)
            return rate

        rates = {"local": embed_rate("local", LocalEngine())}
        t0 = time.perf_counter()
        spark = SparkEngine(master=args.master, conf={"spark.ui.enabled": "false"})
        spark.session()
        startup = time.perf_counter() - t0
        rates["spark"] = embed_rate("spark", spark)
        spark.session().stop()
        rates["local again"] = embed_rate("local-again", LocalEngine())
    local = max(rates["local"], rates["local again"])
    print(
        f"{rows} images, {len(prepared.shard_indices())} shards of {args.shard_size}, "
        f"tiny ViT 128 px, batch {args.batch_size}; Spark session start-up {startup:.1f} s"
    )
    print("| engine | images/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} |")
    print(f"ratio spark({args.master})/local = {rates['spark'] / local:.2f}")


if __name__ == "__main__":
    main()
