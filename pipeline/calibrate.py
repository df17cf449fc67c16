"""Calibrate the entropy router: region entropies over shards -> the quantile table the tokenizer config references.

    varitok calibrate-entropy --shards SPEC --config configs/tokenizer/X.yaml [--ratios 0.5 | 0.3 0.3]
                              [--max-images N] --out thresholds.json [key.path=value ...]

Images are read as training reads them (``data.image_size``, centre crop, no flip) and scored with the
model's own :func:`region_entropy` (same bins, sigma and region size = the coarsest factor). The output is
the :func:`calibrate_entropy` table plus, for the given ``--ratios`` (share of regions at each finer level),
the entropy thresholds and the shares they give on the calibration images. Point the tokenizer at it with
``model.router.mode=entropy model.router.entropy_table=thresholds.json model.router.targets=[...]``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from models.config import ConfigError
from models.tokenizer.router import Router, RouterConfig, calibrate_entropy, region_entropy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard directory, brace pattern or comma list")
    parser.add_argument("--config", required=True, help="tokenizer stage config (data.image_size, model.factors)")
    parser.add_argument("--ratios", type=float, nargs="+", default=None,
                        help="share of regions at each finer level (default: model.router.targets)")
    parser.add_argument("--max-images", type=int, default=0, help="stop after this many images (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", required=True, help="output JSON (model.router.entropy_table)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides (dotlist)")


def shard_entropies(shards: str, image_size: int, region_size: int, max_images: int = 0,
                    batch_size: int = 64) -> torch.Tensor:
    """Region entropies (nats) of the first ``max_images`` images (all when 0): float64 N x Hs x Ws."""
    from data.stream import ShardStream

    try:
        stream = ShardStream(shards, batch_size, image_size, rank=0, world_size=1, shuffle=False, crop="center",
                             flip=False, drop_last=False)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"--shards {shards!r}: {exc}") from None
    wanted = min(stream.num_samples, max_images) if max_images > 0 else stream.num_samples
    parts, seen = [], 0
    for batch in stream:  # one epoch; its last batch is padded with repeats, cut off below
        parts.append(region_entropy(batch["image"][: wanted - seen], region_size))
        seen += parts[-1].shape[0]
        if seen >= wanted:
            break
    return torch.cat(parts)


def thresholds_for(quantiles: Sequence[float], ratios: Sequence[float], factors: Sequence[int]) -> list[float]:
    """Ascending entropy thresholds so that ``ratios[g]`` of regions land at level g + 1, computed by the
    entropy router itself (so the table and the model cannot disagree)."""
    config = RouterConfig(mode="entropy", targets=[float(r) for r in ratios],
                          entropy_quantiles=[float(q) for q in quantiles])
    return Router(config, list(factors), z_channels=1).thresholds.tolist()


def calibrate(shards: str, config_path: str | os.PathLike, out: str | os.PathLike,
              ratios: Optional[Sequence[float]] = None, max_images: int = 0, batch_size: int = 64,
              overrides: Sequence[str] = ()) -> dict:
    """Write the calibration table to ``out`` and return it."""
    from pipeline.config import load_config
    from pipeline.train_tokenizer import TokenizerStageConfig

    cfg = load_config(TokenizerStageConfig, config_path, overrides, kind="tokenizer")
    levels = len(cfg.model.factors)
    ratios = list(cfg.model.router.targets if ratios is None else ratios)
    if len(ratios) != levels - 1:
        raise ConfigError(f"--ratios needs one share per finer level ({levels - 1} for model.factors="
                          f"{cfg.model.factors}), got {ratios}")
    region_size = max(cfg.model.factors)
    if cfg.data.image_size % region_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} must be a multiple of the coarsest factor "
                          f"{region_size}")
    entropies = shard_entropies(shards, cfg.data.image_size, region_size, max_images, batch_size)
    table = calibrate_entropy(entropies, region_size)
    thresholds = thresholds_for(table["quantiles"], ratios, cfg.model.factors)
    grain = (entropies.unsqueeze(-1) > torch.tensor(thresholds, dtype=torch.float64)).sum(-1)
    table.update(num_images=int(entropies.shape[0]), image_size=cfg.data.image_size, ratios=ratios,
                 thresholds=thresholds,
                 achieved_shares=[float((grain == g).double().mean()) for g in range(1, levels)])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, out)
    return table


def run(args: argparse.Namespace) -> int:
    table = calibrate(args.shards, args.config, args.out, args.ratios, args.max_images, args.batch_size,
                      args.overrides)
    print(f"{table['num_images']} images, {table['num_regions']} regions of {table['region_size']}px: thresholds "
          f"{[round(t, 4) for t in table['thresholds']]} give shares {table['achieved_shares']} "
          f"(asked {table['ratios']}); wrote {args.out}")
    return 0
