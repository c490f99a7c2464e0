"""Drawing shared by the synthetic generators: soil backgrounds and plants (or fungi) whose
colour (evenly spaced hues) and shape tell their species apart. Each draw takes its random
numbers from the caller's generator, in a fixed order, so a seeded dataset is reproducible."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("discs", "star", "striped", "squares")


def _species_colour(index: int, n: int, rng: np.random.Generator) -> tuple[int, int, int]:
    hue = (index / n + rng.uniform(-0.01, 0.01)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 0.9), rng.uniform(0.8, 0.95))
    return int(r * 255), int(g * 255), int(b * 255)


def soil_background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Brown, smoothly varying soil with fine grain."""
    shape = (max(2, height // 40), max(2, width // 40))
    # mostly luminance variation, a little colour: soil, not confetti
    coarse = rng.normal(0, 16, size=(*shape, 1)) + rng.normal(0, 4, size=(*shape, 3))
    coarse_img = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8))
    smooth = np.asarray(coarse_img.resize((width, height), Image.Resampling.BILINEAR), np.float32)
    base = np.array([105, 82, 58], np.float32)
    grain = rng.normal(0, 6, size=(height, width, 1))
    pixels = base + (smooth - 128) + grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw_plant(
    img: Image.Image,
    box: tuple[int, int, int, int],
    species_index: int,
    n_species: int,
    rng: np.random.Generator,
) -> None:
    """Draw one plant of a species inside box (left, top, right, bottom), in place."""
    left, top, right, bottom = box
    draw = ImageDraw.Draw(img)
    colour = _species_colour(species_index, n_species, rng)
    dark = tuple(int(c * 0.55) for c in colour)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    radius = 0.42 * min(right - left, bottom - top) * rng.uniform(0.85, 1.05)
    shape = SHAPES[species_index % len(SHAPES)]
    if shape == "discs":
        for _ in range(7):
            ang, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.55) * radius
            x, y, rr = cx + dist * math.cos(ang), cy + dist * math.sin(ang), 0.45 * radius
            draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=colour, outline=dark, width=2)
    elif shape == "star":
        points, spikes, phase = [], 7, rng.uniform(0, math.pi)
        for k in range(2 * spikes):
            rr = radius if k % 2 == 0 else 0.4 * radius
            ang = phase + k * math.pi / spikes
            points.append((cx + rr * math.cos(ang), cy + rr * math.sin(ang)))
        draw.polygon(points, fill=colour, outline=dark)
    elif shape == "striped":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        step = max(3, int(radius / 4))
        for y in range(int(cy - radius), int(cy + radius), step):
            half = math.sqrt(max(0.0, radius**2 - (y - cy) ** 2))
            draw.line((cx - half, y, cx + half, y), fill=dark, width=max(1, step // 3))
    else:  # squares
        for _ in range(6):
            x = cx + rng.uniform(-0.5, 0.5) * radius
            y = cy + rng.uniform(-0.5, 0.5) * radius
            half = 0.4 * radius
            draw.rectangle((x - half, y - half, x + half, y + half), fill=colour, outline=dark)
