"""Procedural images for the demo and the tests: nothing to download, same pixels everywhere.

Each image mixes smooth regions (gradients, flat sky) with detailed ones (stripes, checkerboards,
noise texture), so a dynamic-granularity tokenizer has something to choose between. Classes differ
in palette and in which texture dominates, so a class-conditional generator has something to learn.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("sunset", "forest", "ocean", "city")


def procedural_image(seed: int, size: int = 256, label: int = 0) -> np.ndarray:
    """An ``size x size x 3`` uint8 image, a deterministic function of ``(seed, size, label)``."""
    rng = np.random.default_rng([seed, label, size])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hue = (label * 0.25 + rng.uniform(-0.05, 0.05)) % 1.0
    base = np.stack([np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)]) * 0.35 + 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    img = base[None, None, :] * (0.6 + 0.4 * ramp)  # smooth background

    # A few detailed patches: stripes, checkerboards or noise, placed at random.
    for _ in range(rng.integers(2, 5)):
        h, w = rng.integers(size // 6, size // 2, size=2)
        y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
        kind = (label + rng.integers(0, 3)) % 3
        ys, xs = yy[y0:y0 + h, x0:x0 + w] * size, xx[y0:y0 + h, x0:x0 + w] * size
        if kind == 0:
            period = rng.uniform(3, 8)
            pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)
        elif kind == 1:
            cell = int(rng.integers(2, 7))
            pattern = ((xs // cell + ys // cell) % 2).astype(np.float32)
        else:
            pattern = rng.random((h, w), dtype=np.float32)
        color = rng.random(3, dtype=np.float32)
        img[y0:y0 + h, x0:x0 + w] = pattern[..., None] * color + (1 - pattern[..., None]) * (1 - color) * 0.5

    # One smooth disc ("sun") on top.
    cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.2)
    disc = np.clip((r - np.hypot(yy - cy, xx - cx)) * size / 2, 0, 1)[..., None]
    img = img * (1 - disc) + disc * np.array([1.0, 0.9, 0.6], dtype=np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_image_folder(root: str | Path, num_images: int, size: int = 256, num_classes: int = 4,
                       fmt: str = "png", seed: int = 0) -> Path:
    """Write ``num_images`` images into ``root/<class_name>/<index>.<fmt>`` (class-per-subfolder layout)."""
    root = Path(root)
    names = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class{i}" for i in range(num_classes)]
    for index in range(num_images):
        label = index % num_classes
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = procedural_image(seed * 1_000_003 + index, size, label)
        Image.fromarray(pixels).save(folder / f"{index:06d}.{fmt}")
    return root
