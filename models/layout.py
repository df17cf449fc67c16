"""The canonical layout of variable-granularity codes (docs/design.md, "Tokenizer codes").

An image coded at G granularities has a *grain map* over the coarsest grid (``Hs x Ws``) whose value
``g`` in ``0 .. G-1`` is the level chosen for that region (0 = coarsest). Level ``g`` lives on a grid of
``(Hs * 2**g) x (Ws * 2**g)`` cells, so a region at level ``g`` holds ``4**g`` codes.

Canonical order of the ``L = sum(4**grain)`` code positions: level by level from coarse to fine, raster
order within each level's grid. Every function here is vectorized over cells (and over images where it
takes a batch); the only Python loop is over the (at most a handful of) levels.
"""
from __future__ import annotations

import torch
from torch import Tensor


def level_shape(grain_shape: tuple[int, int], level: int) -> tuple[int, int]:
    """Grid size ``(H, W)`` of ``level`` for a coarsest grid of ``grain_shape``."""
    return grain_shape[0] << level, grain_shape[1] << level


def level_mask(grain: Tensor, level: int) -> Tensor:
    """Cells of ``level``'s grid that are coded at that level.

    grain: ``[..., Hs, Ws]`` integer map. Returns bool ``[..., Hs * 2**level, Ws * 2**level]``.
    """
    mask = grain == level
    scale = 1 << level
    if scale > 1:
        mask = mask.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return mask


def num_codes(grain: Tensor) -> Tensor:
    """``L`` per image: ``sum over regions of 4**grain``. grain ``[..., Hs, Ws]`` -> int64 ``[...]``."""
    return (torch.ones_like(grain, dtype=torch.long) << (2 * grain.long())).flatten(-2).sum(-1)


def batch_canonical_positions(grain: Tensor, num_levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Canonical code positions of a batch of grain maps, all images at once.

    grain: ``[B, Hs, Ws]``. Returns ``(image, levels, indices)``, each int64 ``[sum_b L_b]``: the code
    positions of image 0 in canonical order, then those of image 1, ... (``indices`` is the raster index
    within the level's grid).
    """
    coded = torch.cat([level_mask(grain, level).flatten(1) for level in range(num_levels)], dim=1)
    # Row-major nonzero order of the [B, all cells of all levels] mask is (image, level, raster): canonical.
    image, cell = coded.nonzero(as_tuple=True)
    sizes = torch.tensor([grain.shape[-2] * grain.shape[-1] << (2 * level) for level in range(num_levels)],
                         device=grain.device)
    offsets = torch.cumsum(sizes, 0) - sizes
    levels = torch.bucketize(cell, offsets[1:], right=True)
    return image, levels, cell - offsets[levels]


def canonical_positions(grain: Tensor, num_levels: int) -> tuple[Tensor, Tensor]:
    """Level and raster index (within the level's grid) of every code position, in canonical order.

    grain: ``[Hs, Ws]``. Returns ``(levels, indices)``, both int64 ``[L]``.
    """
    _, levels, indices = batch_canonical_positions(grain[None], num_levels)
    return levels, indices


def batch_codes_to_level_maps(grain: Tensor, codes: Tensor, num_levels: int, fill: int = -1) -> list[Tensor]:
    """Scatter the canonical codes of a batch onto per-level grids, all images at once.

    grain: ``[B, Hs, Ws]``; codes: ``[sum_b L_b, K]``, image 0's canonical codes, then image 1's, ...
    Returns one int64 ``[B, K, Hs * 2**g, Ws * 2**g]`` map per level on ``codes``' device, ``fill`` where the
    cell is not coded at that level (non-contiguous views of one table). The positions are worked out on
    ``grain``'s device (the host is best: one transfer of the row indices follows).
    """
    image, levels, cells = batch_canonical_positions(grain, num_levels)
    if codes.shape[0] != image.numel():
        raise ValueError(f"codes has {codes.shape[0]} rows but the grain map implies L = {image.numel()}")
    shapes = [level_shape(tuple(grain.shape[-2:]), level) for level in range(num_levels)]
    sizes = [h * w for h, w in shapes]
    offsets = torch.tensor([0, *sizes[:-1]], device=grain.device).cumsum(0)
    batch, total = grain.shape[0], sum(sizes)
    table = torch.full((batch * total, codes.shape[1]), fill, dtype=torch.long, device=codes.device)
    table[(image * total + offsets[levels] + cells).to(codes.device)] = codes.long()
    table = table.view(batch, total, codes.shape[1]).transpose(1, 2)                  # B x K x all cells
    return [part.unflatten(2, shape) for part, shape in zip(table.split(sizes, dim=2), shapes)]


def codes_to_level_maps(grain: Tensor, codes: Tensor, num_levels: int, fill: int = -1) -> list[Tensor]:
    """Scatter canonical ``codes [L, K]`` of one image (grain ``[Hs, Ws]``) onto per-level grids.

    Returns one contiguous ``[K, Hs * 2**g, Ws * 2**g]`` int64 map per level, ``fill`` where the cell is not
    coded at that level.
    """
    return [level[0].contiguous() for level in batch_codes_to_level_maps(grain[None], codes, num_levels, fill)]


def level_maps_to_codes(grain: Tensor, maps: list[Tensor]) -> Tensor:
    """Inverse of :func:`codes_to_level_maps`: gather ``[L, K]`` canonical codes from per-level maps."""
    levels, indices = canonical_positions(grain, len(maps))
    out = torch.empty((levels.numel(), maps[0].shape[0]), dtype=torch.long, device=maps[0].device)
    for level, level_map in enumerate(maps):
        sel = levels == level
        out[sel] = level_map.flatten(1)[:, indices[sel]].T
    return out
