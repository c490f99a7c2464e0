"""Command line: write a synthetic dataset in an official layout."""

from __future__ import annotations

import argparse
import sys

from vitlab.data.synthetic.coco_captions import (
    CocoCaptionsSyntheticSpec,
    generate_coco_captions,
)
from vitlab.data.synthetic.fungiclef import FungiSyntheticSpec, generate_fungiclef
from vitlab.data.synthetic.markers import ForeignFolderError
from vitlab.data.synthetic.plantclef import PlantClefSyntheticSpec, generate_plantclef


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitlab.data.synthetic")
    sub = parser.add_subparsers(dest="dataset", required=True)
    plant = sub.add_parser("plantclef", help="PlantCLEF 2024 layout (training CSV, JPEGs, plots)")
    plant.add_argument("out_dir")
    plant.add_argument("--seed", type=int, default=0)
    plant.add_argument("--n-species", type=int, default=PlantClefSyntheticSpec.n_species)
    plant.add_argument("--n-quadrats", type=int, default=PlantClefSyntheticSpec.n_quadrats)
    plant.add_argument(
        "--max-images-per-species", type=int, default=PlantClefSyntheticSpec.max_images_per_species
    )
    fungi = sub.add_parser("fungiclef", help="FungiCLEF 2023 production layout (DF20/DF21 CSVs)")
    fungi.add_argument("out_dir")
    fungi.add_argument("--seed", type=int, default=0)
    fungi.add_argument("--n-species", type=int, default=FungiSyntheticSpec.n_species)
    coco = sub.add_parser(
        "coco_captions", help="MSCOCO 2017 captions layout + the val pictures as VOC 2012 masks"
    )
    coco.add_argument("out_dir")
    coco.add_argument("--seed", type=int, default=0)
    coco.add_argument("--n-train", type=int, default=CocoCaptionsSyntheticSpec.n_train)
    coco.add_argument("--n-val", type=int, default=CocoCaptionsSyntheticSpec.n_val)
    coco.add_argument("--image-size", type=int, default=CocoCaptionsSyntheticSpec.image_size)
    args = parser.parse_args(argv)
    try:
        return _generate(args)
    except ForeignFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    if args.dataset == "coco_captions":
        spec = CocoCaptionsSyntheticSpec(
            seed=args.seed, n_train=args.n_train, n_val=args.n_val, image_size=args.image_size
        )
        out = generate_coco_captions(args.out_dir, spec)
        print(f"wrote synthetic COCO captions (+ VOC 2012 masks) dataset to {out}")
        return 0
    if args.dataset == "fungiclef":
        spec = FungiSyntheticSpec(seed=args.seed, n_species=args.n_species)
        print(f"wrote synthetic FungiCLEF dataset to {generate_fungiclef(args.out_dir, spec)}")
        return 0
    spec = PlantClefSyntheticSpec(
        seed=args.seed,
        n_species=args.n_species,
        n_quadrats=args.n_quadrats,
        max_images_per_species=args.max_images_per_species,
    )
    out = generate_plantclef(args.out_dir, spec)
    print(f"wrote synthetic PlantCLEF dataset to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
