"""A synthetic, valid code corpus (the format `varitok tokenize` writes) for tests and benchmarks.

Pure numpy: no tokenizer is run. Every region of a grain map draws its level uniformly, so an image's code
count is ``sum(4 ** level)`` over its regions; every code position holds K uniform random sub-codes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from data.codes.manifest import CodeManifest
from data.codes.writer import CodeWriter

__all__ = ["write_corpus"]


def write_corpus(out: Path, rows: int, views: int = 2, seed: int = 0, grain_shape: Sequence[int] = (4, 4),
                 sizes: Sequence[int] = (256, 256), num_levels: int = 2, num_classes: int = 4,
                 max_rows_per_batch: int = 256) -> Path:
    """Write ``rows`` images x ``views`` views (view ids 0..views-1, a random class per image) as 2 parts
    under ``out``; ``sizes`` are the K sub-codebook sizes. Returns ``out``."""
    rng = np.random.default_rng(seed)
    manifest = CodeManifest.create(out, {"config_hash": "synthetic", "weights_sha256": "none"}, num_levels,
                                   len(sizes), list(sizes), list(grain_shape))
    keys = [f"img{i:06d}" for i in range(rows) for _ in range(views)]
    grains = rng.integers(0, num_levels, size=(len(keys), *grain_shape))
    lengths = (1 << (2 * grains)).reshape(len(keys), -1).sum(1)
    codes = [rng.integers(0, sizes, size=(n, len(sizes))) for n in lengths]
    labels = np.repeat(rng.integers(0, num_classes, size=rows), views)
    view_ids = np.tile(np.arange(views), rows)
    half = len(keys) // 2
    for part, part_slice in enumerate((slice(0, half), slice(half, None))):
        with CodeWriter(out, part, manifest, max_rows_per_batch=max_rows_per_batch) as writer:
            writer.write(keys[part_slice], labels[part_slice], view_ids[part_slice], grains[part_slice],
                         codes[part_slice])
    return out
