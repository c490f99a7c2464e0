"""Views a person would rather see than read: poisonous/edible confusion, worst classes,
embedding maps. Pure computations plus PNG writers (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from vitlab.atomic import atomic_output

EMBEDDING_MAPS = ("umap", "pca", "none")


def poison_confusion(truth: np.ndarray, pred: np.ndarray, poisonous: Iterable[int]) -> np.ndarray:
    """2x2 counts: rows = truth (edible, poisonous), columns = prediction (edible, poisonous)."""
    mask = np.asarray(sorted(set(poisonous)))
    t = np.isin(truth, mask).astype(int)
    p = np.isin(pred, mask).astype(int)
    out = np.zeros((2, 2), dtype=int)
    np.add.at(out, (t, p), 1)
    return out


def per_class_f1(truth: np.ndarray, pred: np.ndarray) -> dict[int, tuple[float, int]]:
    """class -> (F1, support in truth) over the union of labels (bincounts: O(N + C))."""
    truth, pred = np.asarray(truth).ravel(), np.asarray(pred).ravel()
    labels, inverse = np.unique(np.concatenate([truth, pred]), return_inverse=True)
    t_idx, p_idx = inverse[: truth.size], inverse[truth.size :]
    n = labels.size
    tp = np.bincount(t_idx[truth == pred], minlength=n)
    n_true, n_pred = np.bincount(t_idx, minlength=n), np.bincount(p_idx, minlength=n)
    f1 = 2 * tp / np.maximum(n_true + n_pred, 1)
    return {int(c): (float(f), int(s)) for c, f, s in zip(labels, f1, n_true, strict=True)}


F1_FIGSIZE = (13.0, 7.5)  # inches at F1_DPI: 1300 x 750 px whatever the number of classes
F1_DPI = 100


def _class_label(class_id: int, names: Mapping[int, str] | None, width: int = 34) -> str:
    name = (names or {}).get(class_id)
    if not name:
        return str(class_id)
    name = name if len(name) <= width else name[: width - 1] + "…"
    return f"{name} ({class_id})"


def f1_distribution_png(
    scores: Mapping[int, tuple[float, int]],
    path: Path,
    names: Mapping[int, str] | None = None,
    k: int = 15,
    what: str = "species",
    title: str = "",
) -> Path:
    """One fixed-size figure (F1_FIGSIZE) of per-class F1 at any number of classes: the
    histogram of the F1 values (macro F1 = their mean) and the best and worst `k` classes with
    their names, or every class ranked when there are at most 2k.

    `scores`: class id -> (F1, support in the truth), e.g. `per_class_f1`. Ties are broken by
    support, larger first: the worst are the most frequent classes never or rarely right, the
    best the most frequent ones reliably right. `names`: class id -> display name (optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = np.array(list(scores), dtype=np.int64)
    f1 = np.array([scores[int(i)][0] for i in ids], dtype=float)
    support = np.array([scores[int(i)][1] for i in ids], dtype=np.int64)
    n = len(ids)
    fig = plt.figure(figsize=F1_FIGSIZE, layout="constrained")  # room for the names
    if n == 0:
        fig.text(0.5, 0.5, f"no {what} in truth or prediction", ha="center", va="center")
        return _save(fig, path)
    best_order, worst_order = rank_classes(f1, support)
    grid = fig.add_gridspec(2, 2, width_ratios=(1.0, 1.1))
    hist = fig.add_subplot(grid[:, 0])
    _f1_histogram(hist, f1, what)
    if n <= 2 * k:
        panels = [(grid[:, 1], best_order, f"all {n} {what}, best first")]
    else:
        n_zero = int((f1 == 0).sum())
        worst_note = f": {n_zero} at F1 = 0, the most frequent shown" if n_zero > k else ""
        n_one = int((f1 == 1).sum())
        best_note = f": {n_one} at F1 = 1, the most frequent shown" if n_one > k else ""
        panels = [
            (grid[0, 1], best_order[:k], f"best {k} {what}{best_note}"),
            (grid[1, 1], worst_order[:k], f"worst {k} {what}{worst_note}"),
        ]
    for cell, order, panel_title in panels:
        _ranked_bars(fig.add_subplot(cell), order, ids, f1, support, names, panel_title)
    macro = float(f1.mean())
    fig.suptitle(title or f"per-{what.rstrip('s')} F1: macro {macro:.3f} over {n} {what}")
    return _save(fig, path)


def rank_classes(f1: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices best first (F1 descending) and worst first (F1 ascending), ties broken by support
    descending in both: among equal F1 the most frequent classes come first."""
    f1, support = np.asarray(f1, dtype=float), np.asarray(support)
    return np.lexsort((-support, -f1)), np.lexsort((-support, f1))


def _f1_histogram(ax, f1: np.ndarray, what: str) -> None:
    """Exactly 0 and exactly 1 get bars of their own (often the largest groups); the rest in
    tenths. Counts on the bars, mean and median marked."""
    from matplotlib.ticker import MaxNLocator

    inner = f1[(f1 > 0) & (f1 < 1)]
    edges = np.linspace(0, 1, 11)
    counts, _ = np.histogram(inner, bins=edges)
    lefts = [-0.1, *edges[:-1], 1.0]
    heights = [int((f1 == 0).sum()), *counts.tolist(), int((f1 == 1).sum())]
    colours = ["tab:red", *["tab:blue"] * len(counts), "tab:green"]
    bars = ax.bar(lefts, heights, width=0.095, align="edge", color=colours)
    ax.bar_label(bars, [str(h) if h else "" for h in heights], fontsize=8, padding=1)
    ax.set_xticks([-0.05, *edges[:-1] + 0.05, 1.05])
    ax.set_xticklabels(["=0", *(f"{a:.1f}-{a + 0.1:.1f}" for a in edges[:-1]), "=1"])
    ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    ax.set_xlim(-0.12, 1.12)
    ax.set_ylim(0, max(heights) * 1.12 + 1)
    mean, median = float(f1.mean()), float(np.median(f1))
    ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean (macro) {mean:.3g}")
    ax.axvline(median, color="grey", linestyle=":", linewidth=1.5, label=f"median {median:.3g}")
    ax.legend(fontsize=8, loc="best")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("F1")
    ax.set_ylabel(f"number of {what}")
    ax.set_title(f"distribution over {len(f1)} {what}", fontsize=10)


def _ranked_bars(ax, order, ids, f1, support, names, title: str) -> None:
    rows = len(order)
    y = np.arange(rows)
    values = f1[order]
    ax.barh(y, values, color=np.where(values == 0, "tab:red", "tab:blue"), height=0.7)
    ax.set_yticks(y, [_class_label(int(ids[i]), names) for i in order])
    ax.tick_params(axis="y", labelsize=8 if rows <= 20 else 6, length=0)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.22)  # room for the value labels at F1 = 1
    ax.set_xticks(np.linspace(0, 1, 6))
    for row, i in enumerate(order):
        ax.text(f1[i] + 0.01, row, f"{f1[i]:.2f}  n={support[i]}", va="center", fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("F1   (n = support: how often the truth holds it)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=F1_DPI, format="png")  # fixed size: no tight bbox
    finally:
        plt.close(fig)
    return path


def project_2d(embeddings: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    if method == "pca":
        centred = embeddings - embeddings.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T
    if method == "umap":
        try:
            import umap
        except ImportError as err:
            raise ImportError(
                "report.embedding_map=umap needs umap-learn "
                "(pip install umap-learn) or use report.embedding_map=pca"
            ) from err
        reducer = umap.UMAP(
            n_components=2, n_neighbors=min(15, len(embeddings) - 1), random_state=seed
        )
        return reducer.fit_transform(embeddings)
    raise ValueError(f"report.embedding_map={method!r} is not one of {list(EMBEDDING_MAPS)}")


def embedding_map_png(
    embeddings: np.ndarray,
    labels: np.ndarray,
    path: Path,
    method: str,
    top_k: int = 10,
    title: str = "",
) -> Path | None:
    """Scatter of the 2-D projection of the embeddings of the `top_k` most frequent labels."""
    if method == "none" or len(embeddings) < 3:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values, counts = np.unique(labels, return_counts=True)
    top = values[np.argsort(-counts, kind="stable")[:top_k]]
    keep = np.isin(labels, top)
    xy = project_2d(embeddings[keep], method)
    fig, ax = plt.subplots(figsize=(6, 5))
    for label in top:
        sel = labels[keep] == label
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, label=str(label))
    ax.legend(fontsize=6, markerscale=2, loc="best")
    ax.set_title(title or f"{method.upper()} of embeddings, top {len(top)} classes")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def denormalize_image(image_chw: np.ndarray) -> np.ndarray:
    """An ImageNet-normalised [3, H, W] array -> displayable [H, W, 3] in [0, 1]."""
    rgb = image_chw.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(rgb, 0.0, 1.0)


def entropy_maps_png(
    images,
    group_entropy_map,
    label_entropy_map,
    grid: tuple[int, int],
    path: Path,
    n_groups: int,
    n_labels: int | None = None,
    max_images: int = 4,
) -> Path:
    """Per-patch entropy over groups (and over labels) next to each image: the thesis's
    diagnostic of where grouping or label assignment is uncertain. Maps are [B, patches],
    drawn on a fixed 0..log(n) scale (log n = uniform, 0 = certain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images.detach().float().cpu())
    maps = [("entropy over groups", np.asarray(group_entropy_map.detach().float().cpu()), n_groups)]
    if label_entropy_map is not None:
        values = np.asarray(label_entropy_map.detach().float().cpu())
        maps.append(("entropy over labels", values, n_labels or 2))
    n = min(max_images, len(images))
    fig, axes = plt.subplots(n, 1 + len(maps), figsize=(3 * (1 + len(maps)), 3 * n), squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(denormalize_image(images[row]))
        for col, (title, values, n) in enumerate(maps, start=1):
            shown = axes[row, col].imshow(
                values[row].reshape(grid), cmap="magma", vmin=0.0, vmax=float(np.log(max(n, 2)))
            )
            fig.colorbar(shown, ax=axes[row, col], fraction=0.046)
            if row == 0:
                axes[row, col].set_title(title)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path


def _label_colours(labels: np.ndarray, ignore_index: int) -> np.ndarray:
    """VOC palette colours of a label map; ignored pixels white."""
    from vitlab.data.voc import voc_colormap

    colours = voc_colormap(256)[np.clip(labels, 0, 255)].astype(np.float32) / 255.0
    colours[labels == ignore_index] = 1.0
    return colours


def segmentation_overlay_png(
    image,
    prediction: np.ndarray,
    truth: np.ndarray | None,
    class_names,
    ignore_index: int,
    path: Path,
    alpha: float = 0.55,
) -> Path:
    """Image | prediction over the image | truth over the image, with a legend of the classes
    present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    panels = [("image", rgb), ("prediction", prediction)]
    if truth is not None:
        panels.append(("truth", truth))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    present = set(np.unique(prediction).tolist())
    for ax, (title, content) in zip(axes, panels):
        if title == "image":
            ax.imshow(rgb)
        else:
            present |= set(np.unique(content).tolist()) - {ignore_index}
            blend = (1 - alpha) * rgb + alpha * _label_colours(content, ignore_index)
            ax.imshow(np.clip(blend, 0, 1))
        ax.set_title(title)
        ax.axis("off")
    palette = _label_colours(np.arange(256), ignore_index=-1)
    handles = [
        Patch(color=palette[c], label=str(class_names[c]))
        for c in sorted(present)
        if 0 <= c < len(class_names)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path


def per_class_iou_png(class_names, iou: np.ndarray, path: Path, title: str = "") -> Path:
    """Horizontal bars of per-class IoU (classes absent from truth and prediction are skipped)."""
    return _class_bars(class_names, iou, path, title or "per-class IoU", "IoU", (0.0, 1.0))


def iou_difference_png(
    class_names, iou_a: np.ndarray, iou_b: np.ndarray, path: Path, label_a: str, label_b: str
) -> Path:
    """Per-class IoU of B minus A (the thesis's checkpoint comparison), sorted."""
    diff = np.asarray(iou_b, dtype=float) - np.asarray(iou_a, dtype=float)
    return _class_bars(
        class_names, diff, path, f"IoU({label_b}) - IoU({label_a})", "IoU difference", None
    )


def _class_bars(class_names, values: np.ndarray, path: Path, title: str, xlabel: str, xlim):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(values, dtype=float)
    keep = np.flatnonzero(~np.isnan(values))
    order = keep[np.argsort(values[keep], kind="stable")]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(order) + 1)))
    colours = ["tab:red" if v < 0 else "tab:blue" for v in values[order]]
    ax.barh([str(class_names[i]) for i in order], values[order], color=colours)
    if xlim:
        ax.set_xlim(*xlim)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path
