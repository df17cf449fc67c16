"""Pictures for people: image grids, granularity overlays, histograms and curves (PNG).

Images are float tensors ``B x 3 x H x W`` in ``[-1, 1]`` unless stated otherwise; grain maps are integer
``B x Hs x Ws`` with 0 = coarsest level.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# One tint per level (coarse -> fine): transparent, amber, red.
LEVEL_TINTS = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.65, 0.0], [1.0, 0.1, 0.1]])


def to_uint8(images: Tensor) -> np.ndarray:
    """``B x 3 x H x W`` in [-1, 1] -> ``B x H x W x 3`` uint8."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def grain_overlay(images: Tensor, grain: Tensor, alpha: float = 0.45) -> Tensor:
    """Tint every region by its level and draw the region borders.

    images: ``B x 3 x H x W`` in [-1, 1]; grain: ``B x Hs x Ws``. Returns the same shape as images.
    """
    b, _, h, w = images.shape
    grain = grain.long().to(images.device)
    scale_y, scale_x = h // grain.shape[-2], w // grain.shape[-1]
    level = grain.repeat_interleave(scale_y, -2).repeat_interleave(scale_x, -1)  # B x H x W
    tint = LEVEL_TINTS.to(images)[level.clamp(max=len(LEVEL_TINTS) - 1)].permute(0, 3, 1, 2) * 2 - 1
    weight = (level > 0).unsqueeze(1).to(images) * alpha
    out = images * (1 - weight) + tint * weight
    ys = torch.arange(h, device=images.device) % scale_y == 0
    xs = torch.arange(w, device=images.device) % scale_x == 0
    border = (ys[:, None] | xs[None, :]).expand(b, 1, h, w)
    return torch.where(border, torch.full_like(out, 1.0), out)


def image_grid(columns: Sequence[Tensor], pad: int = 2) -> np.ndarray:
    """Rows = samples, columns = the given image batches (same shape each). Returns ``H x W x 3`` uint8."""
    stacked = torch.stack([c.detach().float().cpu() for c in columns], dim=1)  # B x C x 3 x H x W
    b, c, _, h, w = stacked.shape
    stacked = torch.nn.functional.pad(stacked, (pad, pad, pad, pad), value=1.0)
    grid = stacked.permute(0, 3, 1, 4, 2).reshape(b * (h + 2 * pad), c * (w + 2 * pad), 3)
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def tile(images: Tensor, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """Tile a batch ``B x 3 x H x W`` into a grid of ``ncol`` columns. Returns uint8 ``H' x W' x 3``."""
    b = images.shape[0]
    nrow = -(-b // ncol)
    fill = torch.ones((nrow * ncol - b, *images.shape[1:]), dtype=images.dtype, device=images.device)
    batch = torch.cat([images, fill]).view(nrow, ncol, *images.shape[1:])
    return image_grid([batch[:, j] for j in range(ncol)], pad)


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (safe on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histogram(values: np.ndarray, path: str | os.PathLike, title: str, xlabel: str, bins: int = 50) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(np.asarray(values), bins=bins, color="#3b6ea5")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
                title: str, xlabel: str = "step", logy: bool = False) -> Path:
    """``curves``: name -> (xs, ys)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
