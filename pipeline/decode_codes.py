"""Decode stored codes back to images: `varitok decode-codes DIR --tokenizer EXPORT --keys K1 K2 ... --out grid.png`.

One grid row per key: the decoded image | the same image tinted by granularity level (region borders
drawn). The tokenizer must be the one that wrote DIR (same weights sha256 as in DIR/manifest.json).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from data.codes import CodeReader
from models.hub import WEIGHTS_NAME, file_sha256
from models.tokenizer import ImageCodes, Tokenizer
from pipeline.visual import grain_overlay, image_grid, save_png


def find_rows(reader: CodeReader, keys: Sequence[str], view: int) -> list[int]:
    """Global row index of each (key, view). Raises KeyError listing the pairs that are not stored."""
    candidates = np.flatnonzero(reader.views() == view)
    stored = reader.keys()[candidates].astype(str)
    order = np.argsort(stored, kind="stable")
    wanted = np.asarray(list(keys), dtype=str)
    slots = np.minimum(np.searchsorted(stored[order], wanted), max(len(stored) - 1, 0))
    found = stored[order][slots] == wanted if len(stored) else np.zeros(len(wanted), dtype=bool)
    if not found.all():
        missing = wanted[~found].tolist()
        raise KeyError(f"not in {reader.out_dir} with view {view}: {missing[:10]}"
                       + (f" ... ({len(missing)} in all)" if len(missing) > 10 else ""))
    return candidates[order[slots]].tolist()


def decode_rows(tok: Tokenizer, reader: CodeReader, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images B x 3 x H x W in [-1, 1], grains int64 B x Hs x Ws) of the stored rows."""
    records = [reader[i] for i in rows]
    codes = [ImageCodes(torch.from_numpy(np.array(r.grain)), torch.from_numpy(r.codes.astype(np.int64)))
             for r in records]
    with torch.inference_mode():
        images = tok.decode(codes).float().cpu()
    return images, torch.stack([c.grain.long() for c in codes])


def decode_codes(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, keys: Sequence[str],
                 out: str | os.PathLike, view: int = 0) -> Path:
    """Write the decoded | granularity-overlay grid of ``keys`` to ``out`` (PNG); returns its path."""
    reader = CodeReader(out_dir)
    expected = reader.manifest.tokenizer_identity.get("weights_sha256")
    actual = file_sha256(Path(tokenizer_dir) / WEIGHTS_NAME)
    if expected and expected != actual:
        raise ValueError(f"{out_dir} was written by a tokenizer with weights sha256 {expected[:16]}..., but "
                         f"{tokenizer_dir} has {actual[:16]}...: decode with the tokenizer that wrote the codes")
    tok = Tokenizer.from_pretrained(tokenizer_dir).eval()
    images, grains = decode_rows(tok, reader, find_rows(reader, keys, view))
    return save_png(image_grid([images, grain_overlay(images, grains)]), out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="code directory")
    parser.add_argument("--tokenizer", required=True, help="export directory of the tokenizer that wrote DIR")
    parser.add_argument("--keys", nargs="+", required=True, help="sample keys to decode")
    parser.add_argument("--view", type=int, default=0, help="view id (0 = center)")
    parser.add_argument("--out", required=True, help="output PNG")


def run(args: argparse.Namespace) -> int:
    try:
        path = decode_codes(args.dir, args.tokenizer, args.keys, args.out, args.view)
    except (KeyError, FileNotFoundError, ValueError) as exc:
        print(f"varitok decode-codes: error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(args.keys)} rows: decoded | granularity overlay)")
    return 0
