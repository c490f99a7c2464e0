"""One prepared check for a GPU node (issue 24): every GPU figure in one run, then the tests.

Prints, for one CUDA device (and the node's CPU where a figure compares with it):
1. embed and test-tile stages end to end / model-only, on the same device and precision, for
   ViT-B/16 at 224 and DINOv2 ViT-L/14 at 518 (timm, random weights), fp32 and bf16. End to
   end is `embed_prepared` (prepared JPEG shards -> decode on the CPU threads -> pinned uint8
   -> device -> normalise -> forward -> embedding shards written) and `embed_test_tiles`
   (quadrat JPEGs -> decode + cut a 3x3 grid -> ... -> tile shards); model-only is the
   backbone + [CLS] on pixels already on the device, the same number of images and batch size.
   Repeats alternate (e2e, model) so drift hits both; the ratio is the median of the per-pair
   ratios, with its spread (min-max).
2. bf16 vs fp32 embeddings: cosine (min, median) per image; GPU fp32 vs CPU fp32 likewise.
3. CPU JPEG decoding (PIL, the loader's threads) vs `torchvision.io.decode_jpeg` on the GPU.
4. zero-shot segmentation img/s on the GPU vs the node's CPU: the quickstart's size (64 px,
   tiny GroupViT) and 448 px (the released GroupViT, 640x480 images).
5. GroupViT training step at 224, batch 128: ours vs `transformers` (same weights), fp32 and
   bf16 autocast, img/s and peak memory.
6. the test suite with pytest-xdist (`--tests`), the GPU-marked tests included.

Everything is written to `--out` (gpu_check.json, gpu_check.log) as it is measured, so a run
cut short still returns what it had. `--quick` runs tiny sizes on the CPU: the dry run.

    PYTHONPATH=src python benchmarks/gpu_check.py --out /tmp/gpu_check --tests 8
    PYTHONPATH=src python benchmarks/gpu_check.py --quick          # CPU dry run, ~1 min
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]

from vitlab.data.shards import ShardedStage, arrow_to_embeddings  # noqa: E402
from vitlab.devices import Compute  # noqa: E402
from vitlab.engines import LocalEngine  # noqa: E402
from vitlab.inference.plantclef import GridArgmax  # noqa: E402
from vitlab.models.backbones import create_backbone  # noqa: E402
from vitlab.models.features import ClsToken  # noqa: E402
from vitlab.pipelines.plantclef.tiles import embed_test_tiles  # noqa: E402
from vitlab.stages.embed import embed_pixels, embed_prepared  # noqa: E402


@dataclass(frozen=True)
class Model:
    label: str
    timm_name: str
    size: int
    kwargs: dict
    batch: int
    images: dict  # precision -> images per timed run (embed); tiles use the same count
    repeats: int = 3  # (e2e, model-only) pairs per stage and precision

    def backbone(self):
        """The timm model with seeded random weights, on the CPU."""
        return create_backbone(
            "timm",
            name=self.timm_name,
            pretrained=False,
            model_kwargs=self.kwargs,
            input_size=self.size,
        )


FULL = [
    Model("ViT-B/16 224", "vit_base_patch16_224", 224, {}, 256, {"fp32": 4096, "bf16": 16384}),
    Model(
        "DINOv2 ViT-L/14 518",
        "vit_large_patch14_dinov2",
        518,
        {"img_size": 518},
        64,
        {"fp32": 128, "bf16": 1024},
        repeats=2,
    ),
]
QUICK = [
    Model(
        "tiny ViT 64 (dry run)",
        "vit_tiny_patch16_224",
        64,
        {"img_size": 64, "depth": 2},
        32,
        {"fp32": 96, "bf16": 96},
    ),
]
QUADRAT = (1024, 768)  # test quadrat size (w, h) for the tile stage; 3x3 grid


class Log:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.results: dict = {}
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "gpu_check.log", "a")  # noqa: SIM115

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def put(self, key: str, value) -> None:
        self.results[key] = value
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def call_into(result: list, fn: Callable, *args) -> None:
    result.append(fn(*args))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


# ----------------------------------------------------------------------------- data


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like picture (smooth colour fields + 4x4-pixel grain): JPEGs of realistic size,
    cheap to draw."""
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    grain = rng.integers(-12, 13, (height // 4 + 1, width // 4 + 1, 3), dtype=np.int16)
    grain = grain.repeat(4, axis=0).repeat(4, axis=1)[:height, :width]
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def prepared_shards(root: Path, n: int, size: int, shard_size: int = 1024) -> ShardedStage:
    """A prepared stage of `n` JPEGs of `size` px in vitlab's shard format."""
    stage = ShardedStage(root / f"prepared-{size}-{n}", f"bench-{size}-{n}", {"n": n})
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        blobs = list(
            pool.map(
                lambda i: jpeg_bytes(smooth_image(np.random.default_rng(i), size, size)), range(n)
            )
        )
    for shard, start in enumerate(range(0, n, shard_size)):
        part = blobs[start : start + shard_size]
        names = [f"img{start + i:07d}.jpg" for i in range(len(part))]
        stage.write_shard(shard, pa.table({"image_name": names, "image": part}))
    stage.finish({"rows": n})
    return stage


def quadrat_files(root: Path, n: int) -> list[Path]:
    folder = root / "quadrats"  # shared by the models: plot i is the same picture
    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> Path:
        path = folder / f"plot{i:06d}.jpg"
        if not path.exists():
            smooth_image(np.random.default_rng(10_000 + i), *QUADRAT).save(path, quality=90)
        return path

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(one, range(n)))


# ----------------------------------------------------------------------------- 1-3 embeddings


def model_only(backbone, compute: Compute, n: int, batch: int, size: int) -> float:
    """Seconds for `n` images through backbone + [CLS], pixels already on the device."""
    features = ClsToken()
    pixels = torch.randn(batch, 3, size, size, device=compute.device)
    counts = [batch] * (n // batch) + ([n % batch] if n % batch else [])

    def run() -> None:
        with compute.autocast():
            for count in counts:
                embed_pixels(backbone, features, pixels[:count])

    return timed(run, compute.device)


def stage_embeddings(stage: ShardedStage) -> np.ndarray:
    table = stage.read_table(["image_name", "embedding"]).sort_by("image_name")
    return arrow_to_embeddings(table.column("embedding"))


def cosines(a: np.ndarray, b: np.ndarray) -> dict:
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"min": round(float(c.min()), 6), "median": round(float(np.median(c)), 6)}


def check_embedding(
    model: Model,
    device: torch.device,
    work: Path,
    log: Log,
    repeats: int,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
):
    backbone = model.backbone().to(device)
    n_max = max(model.images.values())
    prepared = prepared_shards(work, n_max, model.size)
    quadrats = quadrat_files(work, max(8, n_max // 9))
    strategy = GridArgmax(3)
    kept: dict[str, np.ndarray] = {}
    for precision, n in model.images.items():
        if precision not in precisions:
            continue
        compute = Compute((str(device),), precision)
        subset = prepared_subset(prepared, n, work)
        quads = quadrats[: max(1, n // 9)]
        torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
        # warm-up (kernels, autotuning, thread pools, checksums of the inputs)
        embed_prepared(subset, backbone, ClsToken(), work / "warm", model.batch, None, compute)
        model_only(backbone, compute, model.batch * 2, model.batch, model.size)
        rows = {"embed": [], "tiles": []}
        rates = {"embed": [], "tiles": [], "model": []}
        for r in range(min(repeats, model.repeats)):
            for stage in ("embed", "tiles"):
                out = work / f"run-{precision}-{stage}-{r}"
                if stage == "embed":
                    args = (subset, backbone, ClsToken(), out, model.batch, LocalEngine(), compute)
                    result: list = []
                    e2e = timed(partial(call_into, result, embed_prepared, *args), device)
                    kept[precision] = stage_embeddings(result[0])
                    count = n
                else:
                    args = (quads, quads[0].parent, strategy, backbone, ClsToken(), out)
                    tail = ("center_crop", model.batch, None, compute)
                    e2e = timed(partial(embed_test_tiles, *args, *tail), device)
                    count = 9 * len(quads)
                alone = model_only(backbone, compute, count, model.batch, model.size)
                rows[stage].append((alone / count) / (e2e / count))
                rates[stage].append(count / e2e)
                rates["model"].append(count / alone)
                shutil.rmtree(out, ignore_errors=True)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        for stage in ("embed", "tiles"):
            figure = {
                "ratio_median": round(statistics.median(rows[stage]), 3),
                "ratio_spread": [round(min(rows[stage]), 3), round(max(rows[stage]), 3)],
                "e2e_img_s": round(statistics.median(rates[stage]), 1),
                "images": n if stage == "embed" else 9 * len(quads),
            }
            log.put(f"{model.label} {precision} {stage}", figure)
            log.line(
                f"  {model.label:22s} {precision:5s} {stage:6s} e2e/model-only "
                f"{spread(rows[stage])}  e2e {figure['e2e_img_s']:9.1f} img/s  "
                f"model-only {statistics.median(rates['model']):9.1f} img/s  (n={figure['images']})"
            )
        log.put(f"{model.label} {precision} peak_gib", round(peak, 2) if peak else None)
        log.line(f"  {model.label:22s} {precision:5s} peak GPU memory {peak or 0:.2f} GiB")
    if "fp32" in kept and "bf16" in kept:
        m = min(len(kept["fp32"]), len(kept["bf16"]))
        cos = cosines(kept["fp32"][:m], kept["bf16"][:m])
        log.put(f"{model.label} cosine bf16 vs fp32", cos)
        log.line(f"  {model.label:22s} cosine bf16 vs fp32 per image: {cos}")
    if device.type == "cuda" and "fp32" in kept:
        cpu_backbone = model.backbone()
        k = 32 if model.size < 300 else 8  # the 16-core CPU is slow at 518 px
        few = prepared_subset(prepared, k, work)
        cpu = stage_embeddings(embed_prepared(few, cpu_backbone, ClsToken(), work / "cpu", 16))
        cos = cosines(kept["fp32"][:k], cpu)
        rel = float(np.abs(kept["fp32"][:k] - cpu).max() / np.abs(cpu).max())
        log.put(f"{model.label} cosine gpu vs cpu fp32", {**cos, "max_abs_rel": rel})
        log.line(f"  {model.label:22s} GPU vs CPU fp32 cosine {cos}, max |diff|/max|x| {rel:.2e}")
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepared_subset(prepared: ShardedStage, n: int, work: Path) -> ShardedStage:
    """The first `n` images of `prepared` as a stage of their own (whole shards only)."""
    table = prepared.read_table().slice(0, n)
    stage = ShardedStage(work / f"sub-{prepared.key}-{n}", f"{prepared.key}-{n}", {"n": n})
    if not stage.complete:
        for shard, start in enumerate(range(0, n, 1024)):
            stage.write_shard(shard, table.slice(start, 1024))
        stage.finish({"rows": n})
    return stage


def check_decode(device: torch.device, work: Path, log: Log, quick: bool) -> None:
    """img/s decoding JPEGs: PIL on the loader's threads vs nvJPEG on the GPU (batched)."""
    from vitlab.data.loading import decode_uint8_batch

    sizes = {"224 px": (224, 224), "1024x768 quadrat": QUADRAT}
    for label, (w, h) in sizes.items():
        n = 64 if quick else 512
        blobs = [jpeg_bytes(smooth_image(np.random.default_rng(i), w, h)) for i in range(n)]
        names = [f"{i}.jpg" for i in range(n)]
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            decode_uint8_batch(blobs[:8], names[:8], pool)
            cpu = timed(partial(decode_uint8_batch, blobs, names, pool), device)
        figure = {"cpu_threads_img_s": round(n / cpu, 1), "threads": os.cpu_count()}
        if device.type == "cuda":
            from torchvision.io import decode_jpeg

            data = [torch.frombuffer(b, dtype=torch.uint8) for b in blobs]
            decode_jpeg(data[:8], device=device)
            gpu = timed(partial(decode_jpeg, data, device=device), device)
            figure["gpu_nvjpeg_img_s"] = round(n / gpu, 1)
        log.put(f"decode {label}", figure)
        log.line(f"  decode {label:18s} {figure}")


# ----------------------------------------------------------------------------- 4 segmentation


def check_segmentation(device: torch.device, work: Path, log: Log, quick: bool) -> None:
    from vitlab.data.segmentation import DATASETS, dataset_samples
    from vitlab.data.synthetic.coco_captions import (
        CocoCaptionsSyntheticSpec,
        generate_coco_captions,
    )
    from vitlab.inference.segmentation import (
        SegmentationSettings,
        class_text_embeddings,
        evaluate_zero_shot,
    )
    from vitlab.models.groupvit.model import GroupViT, released_spec, tiny_spec

    data = generate_coco_captions(
        work / "voc", CocoCaptionsSyntheticSpec(seed=0, n_train=2, n_val=48, image_size=64)
    )
    spec = DATASETS["synthetic_voc"]
    samples = dataset_samples("synthetic_voc", data / "VOCdevkit" / "VOC2012", "val")
    big = work / "voc448"  # 640x480 copies of the same pictures and label maps: 2 crops each
    cases = [("quickstart 64 px, tiny GroupViT", tiny_spec(), 64, samples, 4, 32)]
    if not quick:
        cases.append(
            ("448 px, released GroupViT", released_spec(), 448, big_samples(samples, big), 4, 32)
        )
    for label, model_spec, side, items, cpu_batch, gpu_batch in cases:
        torch.manual_seed(0)
        model = GroupViT(model_spec).eval()
        rates, mious = {}, {}
        places = [("cpu", cpu_batch)] + (
            [(str(device), gpu_batch)] if device.type == "cuda" else []
        )
        for where, batch in places:
            model = model.to(where)
            text = class_text_embeddings(model, spec.prompt_names)
            settings = SegmentationSettings(
                short_side=side, crop=side, stride=side // 2, crops_per_batch=batch
            )
            use = items if where != "cpu" or side < 100 else items[:8]
            evaluate_zero_shot(model, spec, use[:4], text, settings)  # warm-up
            result = evaluate_zero_shot(model, spec, use, text, settings)
            rates[where] = result["images_per_second"]
            mious[where] = result["miou"]
        figure = {"img_s": rates, "miou": mious}
        if device.type == "cuda":
            figure["gpu_over_cpu"] = round(rates[str(device)] / rates["cpu"], 2)
        log.put(f"segmentation {label}", figure)
        log.line(f"  segmentation {label:34s} {figure}")


def big_samples(samples, folder: Path):
    """The synthetic VOC pictures scaled to 640x480 (images bilinear, labels nearest)."""
    from dataclasses import replace

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for sample in samples:
        image = folder / Path(sample.image_path).name
        label = folder / (Path(sample.label_path).stem + ".png")
        Image.open(sample.image_path).convert("RGB").resize((640, 480), Image.BILINEAR).save(
            image, quality=90
        )
        with Image.open(sample.label_path) as raw:
            resized = raw.resize((640, 480), Image.NEAREST)
            resized.save(label)
        out.append(replace(sample, image_path=image, label_path=label))
    return out


# ----------------------------------------------------------------------------- 5 GroupViT step


def check_groupvit_step(device: torch.device, log: Log, quick: bool) -> None:
    import groupvit_step as gs  # benchmarks/groupvit_step.py: the same builders and loss

    if device.type != "cuda" and not quick:
        return
    batch = 8 if quick else 128
    ours, hf = gs.build_models(0)
    ours, hf = ours.to(device), hf.to(device)
    pixels, tokens = gs.make_batch(batch, 224 if not quick else 224, 0)
    pixels, tokens = pixels.to(device), tokens.to(device)
    for precision in ("fp32", "bf16"):
        context = Compute((str(device),), precision)
        steps = {
            "ours": gs.TrainingStep(ours, gs.ours_loss, pixels, tokens),
            "transformers": gs.TrainingStep(hf, gs.hf_loss, pixels, tokens),
        }
        times: dict[str, list[float]] = {k: [] for k in steps}
        peaks = {}
        for name, step in steps.items():  # warm-up and peak memory
            with context.autocast():
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                step.prepare()
                torch.cuda.reset_peak_memory_stats(device)
                with context.autocast():
                    step.run()
                torch.cuda.synchronize(device)
                peaks[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        order = ["ours", "transformers"]
        for r in range(2 if quick else 8):
            for name in order if r % 2 == 0 else order[::-1]:
                steps[name].prepare()
                with context.autocast():
                    times[name].append(timed(steps[name].run, device))
        figure = {
            name: {"img_s": round(batch / statistics.median(t), 1), "peak_gib": peaks.get(name)}
            for name, t in times.items()
        }
        log.put(f"groupvit step {precision}", figure)
        log.line(f"  GroupViT step 224 batch {batch} {precision}: {figure}")
    del ours, hf
    torch.cuda.empty_cache() if device.type == "cuda" else None


# ----------------------------------------------------------------------------- main


def run_tests(workers: int, log: Log, seconds: float) -> int:
    """The test suite on `workers` pytest-xdist workers (2 torch threads each), stopped after
    `seconds`; its whole output in pytest.log."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # no network there: fail fast
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "-p",
        "no:cacheprovider",
        f"-n{workers}",
        "--timeout=300",
        "-o",
        "addopts=-m 'not slow'",
        "-W",
        "ignore::DeprecationWarning",
    ]
    log.line(f"$ {' '.join(command)}  (at most {seconds:.0f} s)")
    path = log.out / "pytest.log"
    with open(path, "w") as output:
        try:
            rc = subprocess.run(
                command,
                cwd=REPO,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=max(seconds, 1),
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    lines = path.read_text(errors="replace").splitlines()
    for line in [x for x in lines if "FAILED" in x or "ERROR" in x][:20] + lines[-6:]:
        log.line(line)
    log.put("pytest_rc", rc)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gpu_check")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU dry run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tests", type=int, default=0, help="pytest-xdist workers (0: no tests)")
    parser.add_argument("--deadline", type=float, default=540, help="s for everything")
    parser.add_argument("--only", default="embed,decode,segmentation,step")
    parser.add_argument("--precisions", default="fp32,bf16", help="of the embed section")
    args = parser.parse_args(argv)
    log = Log(args.out)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    log.put(
        "machine",
        {
            "device": str(device),
            "gpu": name,
            "torch": torch.__version__,
            "cores": os.cpu_count(),
            "load": os.getloadavg(),
            "python": sys.version.split()[0],
        },
    )
    log.line(
        f"gpu_check: {name}, torch {torch.__version__}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    work = Path(tempfile.mkdtemp(prefix="vitlab-gpu-check-"))
    only = set(args.only.split(","))
    precisions = tuple(args.precisions.split(","))
    started = time.perf_counter()
    try:
        for section, run in (
            (
                "embed",
                lambda: [
                    check_embedding(m, device, work, log, args.repeats, precisions)
                    for m in (QUICK if args.quick else FULL)
                ],
            ),
            ("decode", lambda: check_decode(device, work, log, args.quick)),
            ("segmentation", lambda: check_segmentation(device, work, log, args.quick)),
            ("step", lambda: check_groupvit_step(device, log, args.quick)),
        ):
            if section not in only:
                continue
            log.line(f"[{section}] ({time.perf_counter() - started:.0f} s)")
            try:
                run()
            except Exception as err:  # one section failing must not hide the others
                log.line(f"  {section} FAILED: {type(err).__name__}: {err}")
                log.put(f"{section} error", repr(err))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.line(f"benchmarks done in {time.perf_counter() - started:.0f} s")
    left = args.deadline - (time.perf_counter() - started)
    rc = run_tests(args.tests, log, left) if args.tests else 0
    log.line(f"gpu_check done in {time.perf_counter() - started:.0f} s, pytest rc {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
