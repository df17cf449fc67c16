"""Calibrate the entropy router: region entropies over shards -> the quantile table the tokenizer config references.

    varitok calibrate-entropy --shards SPEC --config configs/tokenizer/X.yaml [--ratios 0.5 | 0.3 0.3]
                              [--max-images 50000] [--num-workers 4] [--sample-regions 2097152]
                              --out thresholds.json [key.path=value ...]

Images are read as training reads them (``data.image_size``, centre crop, no flip) and scored with the
model's own :func:`region_entropy` (same bins, sigma and region size = the coarsest factor). The output is
the :func:`calibrate_entropy` table plus, for the given ``--ratios`` (share of regions at each finer level),
the entropy thresholds and the shares they give on the sampled regions. Point the tokenizer at it with
``model.router.mode=entropy model.router.entropy_table=thresholds.json model.router.targets=[...]``;
the stages read that file with :func:`inline_entropy_table` (models do no file I/O), so the run's
resolved config and its exports carry the quantiles inline.

Memory is bounded: the quantiles are computed from a uniform random sample (without replacement) of at
most ``--sample-regions`` region entropies (:class:`RegionSample`; float64 values and keys, at most twice
that many held: 64 MiB at the default 2**21; measured peak about 280 MB above the import baseline for 12.8 M
and for 49 M regions alike, where keeping every entropy took 8 bytes per region, 2.6 GB for ImageNet-1k at
256 px). With fewer regions than that, the table is exact. Otherwise, by the
Dvoretzky-Kiefer-Wolfowitz inequality, the share of ALL regions above any threshold differs from the share
in the sample by at most ``sqrt(ln(2 / 0.001) / (2 * n))`` with probability 0.999 (n = 2**21: 0.0014).
``--max-images`` (default 50000; 0 = every image) bounds the time. ``--num-workers W`` decodes in W
processes; the stream then deals shards to workers with equal quotas, so with uneven shard sizes a few
images may be repeated or skipped (never with W = 0).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from data.files import atomic_write
from models.config import ConfigError
from models.tokenizer.router import (ENTROPY_BINS, ENTROPY_SIGMA, Router, RouterConfig, calibrate_entropy,
                                     region_entropy)
from pipeline.config import load_config
from pipeline.stages import TokenizerStageConfig

DEFAULT_MAX_IMAGES = 50_000
DEFAULT_SAMPLE_REGIONS = 1 << 21


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard directory, brace pattern or comma list")
    parser.add_argument("--config", required=True, help="tokenizer stage config (data.image_size, model.factors)")
    parser.add_argument("--ratios", type=float, nargs="+", default=None,
                        help="share of regions at each finer level (default: model.router.targets)")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                        help=f"stop after this many images (default {DEFAULT_MAX_IMAGES}; 0: every image)")
    parser.add_argument("--sample-regions", type=int, default=DEFAULT_SAMPLE_REGIONS,
                        help="quantiles from a uniform sample of at most this many region entropies (bounds "
                             f"memory; default {DEFAULT_SAMPLE_REGIONS}, share error <= 0.0014 w.p. 0.999)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding processes (0: in this process)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the region sample")
    parser.add_argument("--out", required=True, help="output JSON (model.router.entropy_table)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides (dotlist)")


# ------------------------------------------------------------------------------------ table files
def load_entropy_table(path: str | os.PathLike) -> dict:
    """Read a table written by ``varitok calibrate-entropy`` (the :func:`calibrate_entropy` JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.router.entropy_table: {path} not found; run `varitok calibrate-entropy` "
                          f"or give model.router.entropy_quantiles inline")
    table = json.loads(path.read_text())
    if not isinstance(table, dict) or len(table.get("quantiles", ())) < 2:
        raise ConfigError(f"model.router.entropy_table: {path} has no 'quantiles' list: it is not a "
                          f"calibrate-entropy table")
    return table


def inline_entropy_table(router: RouterConfig, region_size: int) -> RouterConfig:
    """A copy of ``router`` whose ``entropy_table`` file is read into ``entropy_quantiles`` (and cleared);
    ``router`` itself when it names no file. ``region_size`` is the model's coarsest factor: a table
    computed with another region size, bin count or sigma is refused."""
    if not router.entropy_table:
        return router
    table = load_entropy_table(router.entropy_table)
    expected = {"bins": ENTROPY_BINS, "sigma": ENTROPY_SIGMA, "region_size": int(region_size)}
    wrong = {k: table.get(k) for k, v in expected.items() if table.get(k) != v}
    if wrong:
        raise ConfigError(f"model.router.entropy_table {router.entropy_table} was calibrated with {wrong}, "
                          f"this model needs {expected}: re-run calibrate-entropy")
    return RouterConfig.from_dict({**router.to_dict(), "entropy_table": "",
                                   "entropy_quantiles": [float(q) for q in table["quantiles"]]})


# ------------------------------------------------------------------------------------ sampling
class RegionSample:
    """Uniform random sample without replacement of at most ``capacity`` values from a stream.

    Every value gets an i.i.d. uniform key; the ``capacity`` values with the smallest keys are a uniform
    sample of everything seen. Values are buffered and cut back to ``capacity`` when the buffer passes
    ``2 * capacity``, so memory stays below ``2 * capacity`` float64 values + float64 keys and the cut
    costs O(1) amortised per value. With at most ``capacity`` values seen, the sample is all of them.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._values: list[torch.Tensor] = []
        self._keys: list[torch.Tensor] = []
        self._held = 0

    def add(self, values: torch.Tensor) -> None:
        """Offer every element of ``values`` (any shape, flattened to float64)."""
        values = values.detach().flatten().double().cpu()
        self._values.append(values)
        self._keys.append(torch.rand(values.numel(), generator=self._generator, dtype=torch.float64))
        self.seen += values.numel()
        self._held += values.numel()
        if self._held > 2 * self.capacity:
            self._cut()

    def _cut(self) -> None:
        values, keys = torch.cat(self._values), torch.cat(self._keys)
        if values.numel() > self.capacity:
            keys, kept = keys.topk(self.capacity, largest=False, sorted=False)
            values = values[kept]
        self._values, self._keys, self._held = [values], [keys], values.numel()

    def values(self) -> torch.Tensor:
        """The sample: float64, 1-D, ``min(seen, capacity)`` values (in no particular order)."""
        self._cut()
        return self._values[0] if self._values else torch.empty(0, dtype=torch.float64)

    @property
    def held(self) -> int:
        """Values currently buffered (<= 2 * capacity)."""
        return self._held


def dkw_share_error(sample_size: int, confidence: float = 0.999) -> float:
    """Bound on |share in the sample - share in the population| of any threshold (DKW inequality)."""
    return math.sqrt(math.log(2.0 / (1.0 - confidence)) / (2.0 * sample_size))


def sample_region_entropies(shards: str, image_size: int, region_size: int, max_images: int = DEFAULT_MAX_IMAGES,
                            batch_size: int = 64, num_workers: int = 0,
                            sample_regions: int = DEFAULT_SAMPLE_REGIONS, seed: int = 0,
                            progress: bool = True) -> tuple[RegionSample, int]:
    """Region entropies (nats) of the first ``max_images`` images (all when 0) of the shards, as a
    :class:`RegionSample` of at most ``sample_regions`` values; also returns the number of images read."""
    # Imported here: the image decoders (torchvision) take seconds to load and `--help` or a stage that only
    # reads a table (inline_entropy_table) needs none of them.
    from data.stream import ShardStream

    try:
        stream = ShardStream(shards, batch_size, image_size, rank=0, world_size=1, num_workers=num_workers,
                             shuffle=False, crop="center", flip=False, drop_last=False)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"--shards {shards!r}: {exc}") from None
    wanted = min(stream.num_samples, max_images) if max_images > 0 else stream.num_samples
    sample, seen = RegionSample(sample_regions, seed), 0
    with tqdm(total=wanted, unit="img", desc="calibrate-entropy", disable=not progress) as bar:
        for batch in stream:  # one epoch; its last batch is padded with repeats, cut off below
            images = batch["image"][: wanted - seen]
            sample.add(region_entropy(images, region_size))
            seen += images.shape[0]
            bar.update(images.shape[0])
            if seen >= wanted:
                break
    return sample, seen


def thresholds_for(quantiles: Sequence[float], ratios: Sequence[float], factors: Sequence[int]) -> list[float]:
    """Ascending entropy thresholds so that ``ratios[g]`` of regions land at level g + 1, computed by the
    entropy router itself (so the table and the model cannot disagree)."""
    config = RouterConfig(mode="entropy", targets=[float(r) for r in ratios],
                          entropy_quantiles=[float(q) for q in quantiles])
    return Router(config, list(factors), z_channels=1).thresholds.tolist()


def calibrate(shards: str, config_path: str | os.PathLike, out: str | os.PathLike,
              ratios: Optional[Sequence[float]] = None, max_images: int = DEFAULT_MAX_IMAGES, batch_size: int = 64,
              overrides: Sequence[str] = (), *, num_workers: int = 0, sample_regions: int = DEFAULT_SAMPLE_REGIONS,
              seed: int = 0, progress: bool = True) -> dict:
    """Write the calibration table to ``out`` and return it."""
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
    if sample_regions < 2:
        raise ConfigError(f"--sample-regions must be >= 2, got {sample_regions}")
    sample, num_images = sample_region_entropies(shards, cfg.data.image_size, region_size, max_images, batch_size,
                                                 num_workers, sample_regions, seed, progress)
    values = sample.values()
    table = calibrate_entropy(values, region_size)
    thresholds = thresholds_for(table["quantiles"], ratios, cfg.model.factors)
    grain = (values.unsqueeze(-1) > torch.tensor(thresholds, dtype=torch.float64)).sum(-1)
    table.update(num_images=num_images, num_regions=sample.seen, sampled_regions=int(values.numel()),
                 share_error_bound=0.0 if values.numel() == sample.seen else dkw_share_error(values.numel()),
                 image_size=cfg.data.image_size, ratios=ratios, thresholds=thresholds,
                 achieved_shares=[float((grain == g).double().mean()) for g in range(1, levels)])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(table, indent=1) + "\n")
    return table


def run(args: argparse.Namespace) -> int:
    table = calibrate(args.shards, args.config, args.out, args.ratios, args.max_images, args.batch_size,
                      args.overrides, num_workers=args.num_workers, sample_regions=args.sample_regions,
                      seed=args.seed)
    print(f"{table['num_images']} images, {table['num_regions']} regions of {table['region_size']}px "
          f"({table['sampled_regions']} sampled): thresholds {[round(t, 4) for t in table['thresholds']]} give "
          f"shares {table['achieved_shares']} (asked {table['ratios']}, sampling error <= "
          f"{table['share_error_bound']:.4f} w.p. 0.999); wrote {args.out}")
    return 0
