"""Reconstruction and generation metrics from local weights.

    varitok eval reconstruction --tokenizer runs/tok/export --shards 'shards/val-{000000..000009}.tar' \\
        --max-images 10000 --lpips-weights weights/lpips_vgg.safetensors \\
        --inception-weights weights/inception_v3.pth --out eval/rec
    varitok eval generation --samples samples/samples.npz --reference ref/imagenet256.npz \\
        --inception-weights weights/inception_v3.pth [--out eval/gen]

reconstruction: images are read center-cropped (no flip) from the shards, coded with ``tok.encode`` and
decoded with ``tok.decode``. Reports PSNR / SSIM (torchmetrics, data range 2 on [-1, 1] images; per-image
values averaged), LPIPS-VGG (``--lpips-weights``), rFID (``--inception-weights``), codebook usage and
perplexity per sub-codebook, average codes per image and the share of regions per granularity. Writes
``OUT/metrics.json``, ``OUT/metrics.md`` (Markdown table) and ``OUT/extremes.png`` (the worst then the best
reconstructions by PSNR; columns: input | reconstruction | granularity overlay). LPIPS and rFID need local
weights: without them the command stops with "needs weights: --flag", unless ``--no-lpips`` / ``--no-fid``.

generation: FID, Inception Score and k-NN precision / recall (k = ``--k``) between ``arr_0`` of two
ADM-style ``.npz`` files (uint8 N x H x W x 3), one Inception pass per set (pipeline.metrics).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from models.config import ConfigError
from pipeline.metrics import (InceptionFeatures, MissingWeightsError, codebook_usage, frechet_distance,
                              inception_score, precision_recall, psnr, ssim)

__all__ = ["ReconstructionAccumulator", "Extremes", "evaluate_reconstruction", "evaluate_generation",
           "add_arguments", "run"]


class Extremes:
    """Keeps the ``count`` lowest- and highest-scoring images seen so far (vectorized top-k per batch)."""

    def __init__(self, count: int = 6):
        self.count = count
        self.scores = torch.empty(0)
        self.items: dict[str, Tensor] = {}

    def update(self, scores: Tensor, **items: Tensor) -> None:
        """scores ``[B]``; items: tensors with a leading ``B`` dimension (images, grains, ...)."""
        scores = torch.cat([self.scores, scores.detach().float().cpu()])
        items = {k: torch.cat([self.items[k], v.detach().cpu()]) if k in self.items else v.detach().cpu()
                 for k, v in items.items()}
        order = torch.argsort(scores)
        keep = order if len(order) <= 2 * self.count else torch.cat([order[:self.count], order[-self.count:]])
        self.scores = scores[keep]
        self.items = {k: v[keep] for k, v in items.items()}

    def lowest(self) -> dict[str, Tensor]:
        n = min(self.count, len(self.scores))
        return {k: v[:n] for k, v in self.items.items()}

    def highest(self) -> dict[str, Tensor]:
        n = min(self.count, len(self.scores))
        return {k: v[len(v) - n:].flip(0) for k, v in self.items.items()}


class ReconstructionAccumulator:
    """Running reconstruction metrics over batches of (image, reconstruction, codes).

    ``update(images, recs, grains, codes)``: images / recs float ``B x 3 x H x W`` in [-1, 1]; grains uint8
    ``B x Hs x Ws``; codes: ``B`` int arrays ``[L_b, K]``. ``lpips`` / ``inception`` are optional modules.
    """

    def __init__(self, num_levels: int, codebook_sizes: list[int], lpips: Optional[torch.nn.Module] = None,
                 inception: Optional[InceptionFeatures] = None, extremes: int = 6):
        self.num_levels, self.codebook_sizes = num_levels, list(codebook_sizes)
        self.lpips, self.inception = lpips, inception
        self.psnr: list[Tensor] = []
        self.ssim: list[Tensor] = []
        self.lpips_values: list[Tensor] = []
        self.real_features: list[Tensor] = []
        self.rec_features: list[Tensor] = []
        self.codes: list[np.ndarray] = []
        self.level_counts = torch.zeros(num_levels, dtype=torch.long)
        self.extremes = Extremes(extremes)

    @torch.no_grad()
    def update(self, images: Tensor, recs: Tensor, grains: Tensor, codes: list[Tensor]) -> None:
        from pipeline.visual import to_uint8

        recs = recs.clamp(-1, 1)
        batch_psnr = psnr(recs, images).cpu()
        self.psnr.append(batch_psnr)
        self.ssim.append(ssim(recs, images).cpu())
        if self.lpips is not None:
            self.lpips_values.append(self.lpips(recs, images).float().cpu())
        if self.inception is not None:
            to_tensor = lambda x: torch.from_numpy(to_uint8(x)).to(self.inception.mean.device)   # noqa: E731
            self.real_features.append(self.inception(to_tensor(images)).pool.cpu())
            self.rec_features.append(self.inception(to_tensor(recs)).pool.cpu())
        self.codes += [c.detach().cpu().numpy().reshape(-1, len(self.codebook_sizes)) for c in codes]
        self.level_counts += torch.bincount(grains.long().flatten().cpu(), minlength=self.num_levels)
        self.extremes.update(batch_psnr, images=images, recs=recs, grains=grains)

    @property
    def num_images(self) -> int:
        return sum(len(p) for p in self.psnr)

    def result(self) -> dict[str, Any]:
        """Metrics as plain JSON-able values (PSNR of identical images is inf)."""
        if not self.psnr:
            raise ValueError("no images were evaluated")
        all_codes = np.concatenate(self.codes)
        shares = self.level_counts.double() / self.level_counts.sum()
        out: dict[str, Any] = {
            "images": self.num_images,
            "psnr": float(torch.cat(self.psnr).double().mean()),
            "ssim": float(torch.cat(self.ssim).double().mean()),
            "codes_per_image": len(all_codes) / self.num_images,
            "region_share_per_level": [float(s) for s in shares],
            "codebooks": codebook_usage(all_codes, self.codebook_sizes),
        }
        if self.lpips is not None:
            out["lpips"] = float(torch.cat(self.lpips_values).double().mean())
        if self.inception is not None:
            out["rfid"] = frechet_distance(torch.cat(self.real_features), torch.cat(self.rec_features))
        return out


def _load_weights(path: Optional[str], flag: str, loader, skip_flag: Optional[str] = None):
    """``loader(path)``; a missing file raises MissingWeightsError naming ``flag`` (and ``skip_flag``)."""
    if not path or not Path(path).is_file():
        skip = f", or pass {skip_flag} to skip that metric" if skip_flag else ""
        raise MissingWeightsError(f"needs weights: {flag} FILE (a local file; got {path!r}){skip}. "
                                  f"Nothing is downloaded at run time.")
    return loader(path)


def evaluate_reconstruction(tokenizer_dir: str, shards: str, out: str | Path, *, max_images: Optional[int] = None,
                            batch_size: int = 16, image_size: Optional[int] = None,
                            lpips_weights: Optional[str] = None, inception_weights: Optional[str] = None,
                            no_lpips: bool = False, no_fid: bool = False, extremes: int = 6) -> dict[str, Any]:
    """Run the reconstruction evaluation and write its outputs under ``out``; returns the metrics."""
    from tqdm.auto import tqdm

    from data.stream import ShardStream
    from models.tokenizer import Tokenizer
    from models.tokenizer.losses import LPIPS

    lpips = None if no_lpips else _load_weights(lpips_weights, "--lpips-weights", LPIPS.from_file, "--no-lpips")
    inception = None if no_fid else _load_weights(inception_weights, "--inception-weights",
                                                  InceptionFeatures.from_file, "--no-fid")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir).to(device).eval()
    lpips = lpips.to(device) if lpips is not None else None
    inception = inception.to(device) if inception is not None else None
    size = image_size or tokenizer.config.encoder.resolution
    stream = ShardStream(shards, batch_size=batch_size, image_size=size, rank=0, world_size=1, shuffle=False,
                         crop="center", flip=False, drop_last=False)
    wanted = min(max_images or stream.num_samples, stream.num_samples)
    accumulator = ReconstructionAccumulator(tokenizer.num_levels, tokenizer.codebook_sizes, lpips, inception, extremes)
    with tqdm(total=wanted, desc="eval reconstruction", unit="img") as bar:
        for batch in stream:
            images = batch["image"][: wanted - accumulator.num_images].to(device)
            codes = tokenizer.encode(images)
            recs = tokenizer.decode(codes)
            accumulator.update(images, recs, torch.stack([c.grain for c in codes]), [c.codes for c in codes])
            bar.update(len(images))
            if accumulator.num_images >= wanted:
                break
    metrics = {"tokenizer": str(tokenizer_dir), "shards": str(shards), "image_size": size, **accumulator.result()}
    _write_reconstruction_outputs(Path(out), metrics, accumulator.extremes)
    return metrics


def _write_reconstruction_outputs(out: Path, metrics: dict[str, Any], extremes: Extremes) -> None:
    from pipeline.report import Report
    from pipeline.visual import grain_overlay, image_grid, save_png

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    rows = [extremes.lowest(), extremes.highest()]
    columns = [torch.cat([r[name] for r in rows]) for name in ("images", "recs")]
    columns.append(grain_overlay(columns[1], torch.cat([r["grains"] for r in rows])))
    save_png(image_grid(columns), out / "extremes.png")
    report = Report("Reconstruction evaluation")
    section = report.section(f"{metrics['images']} images, {metrics['image_size']}px")
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("images", "image_size")}
    section.figures({**scalars, **{f"region share level {g}": s
                                   for g, s in enumerate(metrics["region_share_per_level"])}})
    section.table(["sub-codebook", "size", "used", "usage", "perplexity"],
                  [[j, c["size"], c["used"], c["usage"], c["perplexity"]] for j, c in enumerate(metrics["codebooks"])])
    section.image(str(out / "extremes.png"), f"worst {len(rows[0]['images'])} (top) and best (bottom) by PSNR: "
                                             f"input | reconstruction | granularity")
    report.write(out, name="metrics")


def _load_npz_images(path: str | Path) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file} not found (expected an ADM-style .npz with arr_0: uint8 N x H x W x 3)")
    with np.load(file, allow_pickle=False) as data:
        if "arr_0" not in data:
            raise ConfigError(f"{file} has no arr_0 array (keys: {list(data.keys())})")
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"{file}: arr_0 must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    return images


def evaluate_generation(samples: str | Path, reference: str | Path, inception_weights: Optional[str], *,
                        batch_size: int = 50, k: int = 3, is_splits: int = 10) -> dict[str, Any]:
    """FID, IS (of the samples) and precision / recall between two image ``.npz`` files."""
    inception = _load_weights(inception_weights, "--inception-weights", InceptionFeatures.from_file)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inception = inception.to(device)
    sets = {}
    for name, path in (("samples", samples), ("reference", reference)):
        images = _load_npz_images(path)
        sets[name] = inception.extract(torch.from_numpy(images[i:i + batch_size])
                                       for i in range(0, len(images), batch_size))
    fake, real = sets["samples"], sets["reference"]
    is_mean, is_std = inception_score(fake.logits, is_splits)
    precision, recall = precision_recall(real.pool, fake.pool, k=k)
    return {"samples": str(samples), "reference": str(reference), "num_samples": len(fake.pool),
            "num_reference": len(real.pool), "fid": frechet_distance(real.pool, fake.pool),
            "inception_score": is_mean, "inception_score_std": is_std, "precision": precision, "recall": recall,
            "k": k}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="mode", required=True, metavar="{reconstruction,generation}")
    rec = sub.add_parser("reconstruction", help="tokenizer reconstruction metrics on shards")
    rec.add_argument("--tokenizer", required=True, help="tokenizer export directory")
    rec.add_argument("--shards", required=True, help="shard spec: directory, glob or brace pattern")
    rec.add_argument("--max-images", type=int, default=None, help="evaluate at most this many images")
    rec.add_argument("--batch-size", type=int, default=16)
    rec.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's training resolution")
    rec.add_argument("--lpips-weights", default=None, help="local LPIPS-VGG weights file")
    rec.add_argument("--inception-weights", default=None, help="local torchvision inception_v3 weights file")
    rec.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    rec.add_argument("--no-fid", action="store_true", help="skip rFID")
    rec.add_argument("--extremes", type=int, default=6, help="worst / best reconstructions shown")
    rec.add_argument("--out", required=True, help="output directory")
    gen = sub.add_parser("generation", help="FID / IS / precision / recall of samples vs a reference set")
    gen.add_argument("--samples", required=True, help=".npz written by varitok sample (arr_0)")
    gen.add_argument("--reference", required=True, help="reference .npz (arr_0: uint8 N x H x W x 3)")
    gen.add_argument("--inception-weights", default=None, help="local torchvision inception_v3 weights file")
    gen.add_argument("--batch-size", type=int, default=50)
    gen.add_argument("--k", type=int, default=3, help="neighbours for precision / recall")
    gen.add_argument("--is-splits", type=int, default=10)
    gen.add_argument("--out", default=None, help="directory for metrics.json (optional)")


def _printable(metrics: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=1)


def run(args: argparse.Namespace) -> int:
    try:
        if args.mode == "reconstruction":
            metrics = evaluate_reconstruction(
                args.tokenizer, args.shards, args.out, max_images=args.max_images, batch_size=args.batch_size,
                image_size=args.image_size, lpips_weights=args.lpips_weights, inception_weights=args.inception_weights,
                no_lpips=args.no_lpips, no_fid=args.no_fid, extremes=args.extremes)
        else:
            metrics = evaluate_generation(args.samples, args.reference, args.inception_weights,
                                          batch_size=args.batch_size, k=args.k, is_splits=args.is_splits)
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    except MissingWeightsError as exc:
        raise ConfigError(str(exc)) from None
    print(_printable(metrics))
    return 0 if all(not isinstance(v, float) or not math.isnan(v) for v in metrics.values()) else 1
