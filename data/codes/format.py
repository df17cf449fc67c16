"""The on-disk format of code files: part names, Arrow schema, code dtype and sequence lengths.

A code file ``part-{i:06d}.arrow`` is an Arrow IPC file with one row per (image, view):
``key`` string, ``label`` int32 (-1 when none), ``view`` uint8, ``grain`` binary (uint8 grain map bytes,
row-major, shape ``grain_shape`` in the manifest), ``codes`` list<uint16|uint32> (the (L, K) codes
flattened row-major), ``length`` int32 (L).

Canonical code order (the tokenizer's job, not checked here): level by level from coarse (0) to fine
(G-1), raster order within each level's grid; a region with grain level g holds 4**g codes.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pyarrow as pa

PART_NAME_RE = re.compile(r"^part-(\d{6,})\.arrow$")
COLUMNS = ("key", "label", "view", "grain", "codes", "length")
UINT16_LIMIT = 1 << 16


def part_file_name(part_index: int) -> str:
    return f"part-{part_index:06d}.arrow"


def code_dtype(codebook_sizes: Sequence[int]) -> np.dtype:
    """uint16 when every sub-codebook has at most 65536 entries, else uint32."""
    return np.dtype(np.uint16) if max(codebook_sizes) <= UINT16_LIMIT else np.dtype(np.uint32)


def code_schema(dtype: np.dtype) -> pa.Schema:
    """The Arrow schema of a part whose codes are stored as ``dtype`` (uint16 or uint32)."""
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("view", pa.uint8(), nullable=False),
        pa.field("grain", pa.binary(), nullable=False),
        pa.field("codes", pa.list_(pa.field("item", pa.from_numpy_dtype(dtype), nullable=False)), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
    ])


def sequence_lengths(grains: np.ndarray) -> np.ndarray:
    """L per image: the sum over regions of 4**grain.

    grains: integer N x Hs x Ws (or N x Hs*Ws) grain levels. Returns int64 [N].
    """
    levels = np.asarray(grains).reshape(len(grains), -1).astype(np.int64)
    return np.left_shift(1, 2 * levels).sum(axis=1)
