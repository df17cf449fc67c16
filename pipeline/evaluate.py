"""Reconstruction and generation metrics on the published protocol, from local weights.

    varitok eval reconstruction --tokenizer runs/tok/export --shards 'shards/val-{000000..000049}.tar' \\
        --lpips-weights weights/lpips_vgg.safetensors \\
        --inception-weights weights/pt_inception-2015-12-05-6726825d.pth --out eval/rec
    varitok eval reference --shards 'shards/train-{000000..001281}.tar' --image-size 256 \\
        --inception-weights weights/pt_inception-2015-12-05-6726825d.pth --out ref/imagenet256.npz
    varitok eval generation --samples samples/samples.npz --reference ref/VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights/pt_inception-2015-12-05-6726825d.pth [--num-samples 50000] [--out eval/gen]

Every Inception metric uses torch-fidelity's FID Inception from ``--inception-weights`` (pipeline.metrics): uint8
images, TF1-compatible resize to 299 px, one forward pass per image for FID, sFID, IS, KID and precision / recall.
The JSON gives the image counts and the protocol (weights sha256, resize) beside every number (``*_protocol``).

reconstruction: all images of ``--shards`` (``--num-images N``: the first N; fewer than N is an error) are read
center-cropped (no flip), coded with ``tok.encode`` and decoded with ``tok.decode``. Reports PSNR / SSIM
(torchmetrics, data range 2 on [-1, 1] images; per-image values averaged), LPIPS-VGG (``--lpips-weights``),
rFID (the reconstructions against the same images' own statistics, as tokenizer papers report it on the 50k
ImageNet val images), codebook usage and perplexity per sub-codebook, average codes per image and the share of
regions per granularity. Writes ``OUT/metrics.json``, ``OUT/metrics.md`` and ``OUT/extremes.png`` (the worst then
the best reconstructions by PSNR; columns: input | reconstruction | granularity overlay). LPIPS and rFID need
local weights: without them the command stops with "needs weights: --flag", unless ``--no-lpips`` / ``--no-fid``.

reference: an ADM-format reference batch from shards: ``mu`` / ``sigma`` (pool3) and ``mu_s`` / ``sigma_s``
(sFID) of all images, ``arr_0`` = ``--keep-images`` of them (uint8 N x H x W x 3, a seeded random subset) for
precision / recall and KID, plus ``num_images`` and ``inception_sha256``. Built once, reused by every run.

generation: the first ``--num-samples`` (default 50000) images of ``arr_0`` of the samples ``.npz`` against an
ADM-style reference ``.npz``: FID / sFID against the reference's stored ``mu`` / ``sigma`` / ``mu_s`` /
``sigma_s`` when it has them (ADM's ``VIRTUAL_imagenet256_labeled.npz`` holds the train set's statistics and
10k images), else against its ``arr_0``; IS of the samples; precision / recall (k = ``--k``, ADM: 3) and KID
between the reference's ``arr_0`` and the samples. Every file is checked (keys, dtype, shape, image count,
statistics sizes, the Inception the reference was built with) before the first forward pass.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from data.files import AtomicFile
from models.config import ConfigError
from pipeline.metrics import (GaussianStats, InceptionFeatures, MissingWeightsError, MomentAccumulator, codebook_usage,
                              frechet_distance, inception_score, kernel_inception_distance, precision_recall, psnr,
                              ssim)
from pipeline.precision import PRECISIONS, autocast, resolve_precision

__all__ = ["ReconstructionAccumulator", "Extremes", "NpzImages", "InceptionPass", "evaluate_reconstruction",
           "evaluate_generation", "build_reference", "add_arguments", "run"]

DEFAULT_NUM_SAMPLES = 50_000
DEFAULT_KEEP_IMAGES = 10_000


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


class InceptionPass:
    """Runs the Inception over uint8 image batches: streams pool3 / spatial moments and, on request, keeps the
    pool3 features and IS logits (on the CPU)."""

    def __init__(self, inception: InceptionFeatures, keep_features: bool = False):
        self.inception, self.keep_features = inception, keep_features
        self.pool_moments, self.spatial_moments = MomentAccumulator(), MomentAccumulator()
        self.pools: list[Tensor] = []
        self.logits: list[Tensor] = []

    def update(self, images: Tensor) -> None:
        out = self.inception(images)
        self.pool_moments.update(out.pool)
        self.spatial_moments.update(out.spatial)
        if self.keep_features:
            self.pools.append(out.pool.cpu())
            self.logits.append(out.logits.cpu())

    @property
    def num_images(self) -> int:
        return self.pool_moments.num

    def pool(self) -> Tensor:
        return torch.cat(self.pools)


def _to_uint8(images: Tensor) -> Tensor:
    """float ``B x 3 x H x W`` in [-1, 1] -> uint8 ``B x H x W x 3`` on the same device (the Inception's input)."""
    from pipeline.visual import to_uint8

    return torch.from_numpy(to_uint8(images)).to(images.device)


def _protocol_note(inception: InceptionFeatures, counts: str, image_size: Any) -> str:
    sha = inception.sha256 or "unknown"
    standard = "" if inception.standard_weights else " (not the published FID Inception file: not comparable)"
    return (f"{counts}; FID Inception sha256 {sha[:12]}{standard}; {image_size}px uint8 -> "
            f"{inception.input_size}px TF1-bilinear (torch-fidelity)")


class ReconstructionAccumulator:
    """Running reconstruction metrics over batches of (image, reconstruction, codes).

    ``update(images, recs, grains, codes)``: images / recs float ``B x 3 x H x W`` in [-1, 1]; grains uint8
    ``B x Hs x Ws``; codes: ``B`` int arrays ``[L_b, K]``. ``lpips`` / ``inception`` are optional modules; rFID
    streams pool3 moments of the inputs and of the reconstructions (no per-image features are kept).
    """

    def __init__(self, num_levels: int, codebook_sizes: list[int], lpips: Optional[torch.nn.Module] = None,
                 inception: Optional[InceptionFeatures] = None, extremes: int = 6):
        self.num_levels, self.codebook_sizes = num_levels, list(codebook_sizes)
        self.lpips, self.inception = lpips, inception
        self.psnr: list[Tensor] = []
        self.ssim: list[Tensor] = []
        self.lpips_values: list[Tensor] = []
        self.real = InceptionPass(inception) if inception is not None else None
        self.rec = InceptionPass(inception) if inception is not None else None
        self.codes: list[np.ndarray] = []
        self.level_counts = torch.zeros(num_levels, dtype=torch.long)
        self.extremes = Extremes(extremes)
        self.image_size: Optional[int] = None

    @torch.no_grad()
    def update(self, images: Tensor, recs: Tensor, grains: Tensor, codes: list[Tensor]) -> None:
        recs = recs.clamp(-1, 1)
        self.image_size = images.shape[-1]
        batch_psnr = psnr(recs, images).cpu()
        self.psnr.append(batch_psnr)
        self.ssim.append(ssim(recs, images).cpu())
        if self.lpips is not None:
            self.lpips_values.append(self.lpips(recs, images).float().cpu())
        if self.inception is not None:
            self.real.update(_to_uint8(images))
            self.rec.update(_to_uint8(recs))
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
            out["rfid"] = frechet_distance(self.real.pool_moments.stats(), self.rec.pool_moments.stats())
            out["rfid_images"] = self.real.num_images
            out["rfid_protocol"] = _protocol_note(
                self.inception, f"{self.real.num_images} reconstructions vs the same {self.real.num_images} inputs",
                self.image_size)
            out["inception"] = self.inception.protocol()
        return out


def _load_weights(path: Optional[str], flag: str, loader, skip_flag: Optional[str] = None):
    """``loader(path)``; a missing file raises MissingWeightsError naming ``flag`` (and ``skip_flag``), a file of
    the wrong kind a ConfigError."""
    if not path or not Path(path).is_file():
        skip = f", or pass {skip_flag} to skip that metric" if skip_flag else ""
        raise MissingWeightsError(f"needs weights: {flag} FILE (a local file; got {path!r}){skip}. "
                                  f"Nothing is downloaded at run time.")
    try:
        return loader(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _load_inception(path: Optional[str], skip_flag: Optional[str] = None) -> InceptionFeatures:
    inception = _load_weights(path, "--inception-weights", InceptionFeatures.from_file, skip_flag)
    if not inception.standard_weights:
        print(f"varitok eval: note: --inception-weights {path} is not the published FID Inception "
              f"(sha256 {inception.sha256[:12]}...): the numbers are not comparable with published ones",
              file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return inception.to(device)


def _count_check(available: int, wanted: Optional[int], what: str, flag: str) -> int:
    """``wanted`` (default: all available), or a ConfigError when fewer are available."""
    if wanted is None:
        return available
    if wanted < 1:
        raise ConfigError(f"{flag} must be >= 1, got {wanted}")
    if available < wanted:
        raise ConfigError(f"{what} has {available} images, fewer than {flag} {wanted}; pass {flag} {available} "
                          f"to evaluate those (numbers on fewer images are not comparable with {wanted}-image ones)")
    return wanted


def _reconstruct(tokenizer, images: Tensor, precision: str = "fp32"):
    """The tokenizer forward of the evaluation, under ``precision``'s autocast: codes of ``images`` and their
    decoding (fp32, so the metrics are computed in fp32)."""
    with torch.inference_mode(), autocast(precision, images.device):
        codes = tokenizer.encode(images)
        return codes, tokenizer.decode(codes).float()


def evaluate_reconstruction(tokenizer_dir: str, shards: str, out: str | Path, *, num_images: Optional[int] = None,
                            batch_size: int = 16, image_size: Optional[int] = None,
                            lpips_weights: Optional[str] = None, inception_weights: Optional[str] = None,
                            no_lpips: bool = False, no_fid: bool = False, extremes: int = 6,
                            precision: str = "auto") -> dict[str, Any]:
    """Run the reconstruction evaluation and write its outputs under ``out``; returns the metrics.

    ``precision``: the tokenizer's autocast (auto = bf16 on a GPU); metrics and the Inception run in fp32."""
    from tqdm.auto import tqdm

    from data.stream import ShardStream
    from models.tokenizer import Tokenizer
    from models.tokenizer.losses import LPIPS

    lpips = None if no_lpips else _load_weights(lpips_weights, "--lpips-weights", LPIPS.from_file, "--no-lpips")
    inception = None if no_fid else _load_inception(inception_weights, "--no-fid")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir).to(device).eval()
    precision = resolve_precision(precision, device)
    lpips = lpips.to(device) if lpips is not None else None
    size = image_size or tokenizer.config.encoder.resolution
    stream = ShardStream(shards, batch_size=batch_size, image_size=size, rank=0, world_size=1, shuffle=False,
                         crop="center", flip=False, drop_last=False)
    wanted = _count_check(stream.num_samples, num_images, f"--shards {shards}", "--num-images")
    accumulator = ReconstructionAccumulator(tokenizer.num_levels, tokenizer.codebook_sizes, lpips, inception, extremes)
    with tqdm(total=wanted, desc="eval reconstruction", unit="img") as bar:
        for batch in stream:
            images = batch["image"][: wanted - accumulator.num_images].to(device)
            codes, recs = _reconstruct(tokenizer, images, precision)
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
    section.table(["metric", "value", "protocol"],
                  [[k, v, metrics.get(f"{k}_protocol", f"{metrics['images']} images")] for k, v in scalars.items()]
                  + [[f"region share level {g}", s, ""] for g, s in enumerate(metrics["region_share_per_level"])])
    section.table(["sub-codebook", "size", "used", "usage", "perplexity"],
                  [[j, c["size"], c["used"], c["usage"], c["perplexity"]] for j, c in enumerate(metrics["codebooks"])])
    section.image(str(out / "extremes.png"), f"worst {len(rows[0]['images'])} (top) and best (bottom) by PSNR: "
                                             f"input | reconstruction | granularity")
    report.write(out, name="metrics")


class NpzImages:
    """``arr_0`` of an ADM-style ``.npz`` (uint8 ``N x H x W x 3``): checked from the array header on open,
    then read in batches straight from the zip member (a 50k-sample file is never loaded whole)."""

    def __init__(self, path: str | Path, flag: str):
        self.path, self.flag = Path(path), flag
        if not self.path.is_file():
            raise ConfigError(f"{flag} {self.path}: not found (an ADM-style .npz with arr_0: uint8 N x H x W x 3)")
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = [n.removesuffix(".npy") for n in archive.namelist()]
                if "arr_0" not in names:
                    raise ConfigError(f"{flag} {self.path} has no arr_0 array (keys: {names}); it must hold the "
                                      f"images as arr_0 (uint8 N x H x W x 3), as ADM's batches and varitok sample")
                with archive.open("arr_0.npy") as member:
                    self.shape, dtype = self._read_header(member)
        except zipfile.BadZipFile:
            raise ConfigError(f"{flag} {self.path} is not an .npz (zip) file") from None
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise ConfigError(f"{flag} {self.path}: arr_0 must be uint8 N x H x W x 3 (0..255 RGB), got {dtype} "
                              f"{self.shape}")

    def _read_header(self, member) -> tuple[tuple[int, ...], np.dtype]:
        version = np.lib.format.read_magic(member)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ConfigError(f"{self.flag} {self.path}: arr_0 has .npy format version {version}; write it with "
                              f"numpy.savez")
        shape, fortran_order, dtype = readers[version](member)
        if fortran_order:
            raise ConfigError(f"{self.flag} {self.path}: arr_0 is Fortran-ordered; save a C-ordered array")
        return tuple(shape), dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> str:
        return f"{self.shape[1]}x{self.shape[2]}"

    def batches(self, batch_size: int, limit: Optional[int] = None) -> Iterator[Tensor]:
        """uint8 ``B x H x W x 3`` tensors over the first ``limit`` (default all) images."""
        total = len(self) if limit is None else min(limit, len(self))
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as member:
            self._read_header(member)
            for start in range(0, total, batch_size):
                count = min(batch_size, total - start)
                data = bytearray(member.read(count * per_image))
                if len(data) != count * per_image:
                    raise ConfigError(f"{self.flag} {self.path}: arr_0 ends after {start} images (truncated file)")
                yield torch.frombuffer(data, dtype=torch.uint8).view(count, *self.shape[1:])

    def statistics(self, inception: InceptionFeatures) -> tuple[Optional[GaussianStats], Optional[GaussianStats]]:
        """The stored ``(mu, sigma)`` and ``(mu_s, sigma_s)`` (None when absent), checked against ``inception``."""
        with np.load(self.path, allow_pickle=False) as data:
            keys = set(data.files)
            built_with = str(data["inception_sha256"]) if "inception_sha256" in keys else None
            if built_with is not None and built_with != inception.sha256:
                raise ConfigError(
                    f"{self.flag} {self.path}: its statistics were computed with another Inception (sha256 "
                    f"{built_with[:12]}...) than --inception-weights (sha256 {(inception.sha256 or '?')[:12]}...); "
                    f"pass the same weights or rebuild it with varitok eval reference")
            num = int(data["num_images"]) if "num_images" in keys else None
            pairs = (("mu", "sigma", inception.num_features), ("mu_s", "sigma_s", inception.spatial_features))
            return tuple(self._stats(data, keys, mean, cov, dim, num) for mean, cov, dim in pairs)

    def _stats(self, data, keys: set[str], mean: str, cov: str, dim: int,
               num: Optional[int]) -> Optional[GaussianStats]:
        if mean not in keys and cov not in keys:
            return None
        if mean not in keys or cov not in keys:
            raise ConfigError(f"{self.flag} {self.path} has {mean if mean in keys else cov} without "
                              f"{cov if mean in keys else mean}")
        mu, sigma = data[mean], data[cov]
        if mu.shape != (dim,) or sigma.shape != (dim, dim) or not np.issubdtype(mu.dtype, np.floating) \
                or not np.issubdtype(sigma.dtype, np.floating):
            raise ConfigError(f"{self.flag} {self.path}: {mean} / {cov} must be float ({dim},) / ({dim}, {dim}) for "
                              f"this Inception, got {mu.dtype} {mu.shape} / {sigma.dtype} {sigma.shape}")
        return GaussianStats(torch.from_numpy(mu).double(), torch.from_numpy(sigma).double(), num)


def _inception_pass(inception: InceptionFeatures, images: NpzImages, num: int, batch_size: int,
                    desc: str) -> InceptionPass:
    from tqdm.auto import tqdm

    features = InceptionPass(inception, keep_features=True)
    with tqdm(total=num, desc=desc, unit="img") as bar:
        for batch in images.batches(batch_size, num):
            features.update(batch)
            bar.update(len(batch))
    return features


def evaluate_generation(samples: str | Path, reference: str | Path, inception_weights: Optional[str], *,
                        num_samples: Optional[int] = DEFAULT_NUM_SAMPLES, batch_size: int = 50, k: int = 3,
                        is_splits: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, Any]:
    """FID, sFID, IS, precision / recall and KID of the first ``num_samples`` samples against a reference batch."""
    sample_images = NpzImages(samples, "--samples")
    reference_images = NpzImages(reference, "--reference")
    num = _count_check(len(sample_images), num_samples, f"--samples {samples}", "--num-samples")
    inception = _load_inception(inception_weights)
    stored_pool, stored_spatial = reference_images.statistics(inception)
    num_ref = len(reference_images)
    if min(num, num_ref) <= k:
        raise ConfigError(f"precision/recall with --k {k} needs more than {k} images in each set (got {num} samples, "
                          f"{num_ref} reference images in arr_0)")
    fake = _inception_pass(inception, sample_images, num, batch_size, "eval generation: samples")
    real = _inception_pass(inception, reference_images, num_ref, batch_size, "eval generation: reference arr_0")

    def against(stored: Optional[GaussianStats], moments: MomentAccumulator) -> tuple[GaussianStats, str]:
        if stored is None:
            return moments.stats(), f"reference arr_0 ({num_ref} images)"
        return stored, f"reference stored statistics ({stored.num or 'unstated'} images)"

    pool_stats, pool_source = against(stored_pool, real.pool_moments)
    spatial_stats, spatial_source = against(stored_spatial, real.spatial_moments)
    is_mean, is_std = inception_score(torch.cat(fake.logits), is_splits)
    device = inception.net.fc.weight.device                  # the k-NN distances run where the Inception ran
    precision, recall = precision_recall(real.pool().to(device), fake.pool().to(device), k=k)
    kid_mean, kid_std = kernel_inception_distance(real.pool(), fake.pool(), kid_subsets, kid_subset_size)
    note = lambda counts: _protocol_note(inception, counts, sample_images.image_size)   # noqa: E731
    return {
        "samples": str(samples), "reference": str(reference), "num_samples": num, "num_reference_images": num_ref,
        "fid": frechet_distance(fake.pool_moments.stats(), pool_stats),
        "fid_protocol": note(f"{num} samples vs {pool_source}"),
        "sfid": frechet_distance(fake.spatial_moments.stats(), spatial_stats),
        "sfid_protocol": note(f"{num} samples vs {spatial_source}"),
        "inception_score": is_mean, "inception_score_std": is_std,
        "inception_score_protocol": note(f"{num} samples, {max(1, min(is_splits, num))} splits"),
        "precision": precision, "recall": recall,
        "precision_protocol": note(f"{num} samples vs reference arr_0 ({num_ref} images), k={k}"),
        "recall_protocol": note(f"{num} samples vs reference arr_0 ({num_ref} images), k={k}"),
        "kid": kid_mean, "kid_std": kid_std,
        "kid_protocol": note(f"{num} samples vs reference arr_0 ({num_ref} images), {kid_subsets} subsets of "
                             f"{min(kid_subset_size, num, num_ref)}"),
        "k": k, "inception": inception.protocol(),
    }


def build_reference(shards: str, out: str | Path, inception_weights: Optional[str], *, image_size: int = 256,
                    num_images: Optional[int] = None, keep_images: int = DEFAULT_KEEP_IMAGES, batch_size: int = 50,
                    seed: int = 0) -> dict[str, Any]:
    """Write an ADM-format reference batch for ``shards`` to ``out`` (see the module docstring); returns a summary."""
    from tqdm.auto import tqdm

    from data.stream import ShardStream

    stream = ShardStream(shards, batch_size=batch_size, image_size=image_size, rank=0, world_size=1, shuffle=False,
                         crop="center", flip=False, drop_last=False, dtype=torch.uint8)
    wanted = _count_check(stream.num_samples, num_images, f"--shards {shards}", "--num-images")
    if wanted < 2:
        raise ConfigError(f"a reference batch needs at least 2 images, --shards {shards} gives {wanted}")
    inception = _load_inception(inception_weights)
    keep = min(keep_images, wanted)
    chosen = np.sort(np.random.default_rng(seed).choice(wanted, size=keep, replace=False))
    kept = np.empty((keep, image_size, image_size, 3), dtype=np.uint8)
    features = InceptionPass(inception)
    with tqdm(total=wanted, desc="eval reference", unit="img") as bar:
        for batch in stream:
            images = batch["image"][: wanted - features.num_images]
            first = features.num_images
            lo, hi = np.searchsorted(chosen, [first, first + len(images)])
            kept[lo:hi] = images[torch.from_numpy(chosen[lo:hi] - first)].permute(0, 2, 3, 1).numpy()
            features.update(images)
            bar.update(len(images))
            if features.num_images >= wanted:
                break
    (mu, sigma), (mu_s, sigma_s) = features.pool_moments.stats().numpy(), features.spatial_moments.stats().numpy()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(out) as handle:
        np.savez(handle, arr_0=kept, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, num_images=np.int64(wanted),
                 image_size=np.int64(image_size), inception_sha256=np.str_(inception.sha256 or ""))
    return {"reference": str(out), "shards": str(shards), "num_images": wanted, "arr_0_images": keep,
            "image_size": image_size,
            "protocol": _protocol_note(inception, f"mu/sigma, mu_s/sigma_s of {wanted} images, arr_0 {keep} of them",
                                       image_size),
            "inception": inception.protocol()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    weights_help = "local FID Inception weights (torch-fidelity's pt_inception-2015-12-05-6726825d.pth)"
    sub = parser.add_subparsers(dest="mode", required=True, metavar="{reconstruction,generation,reference}")
    rec = sub.add_parser("reconstruction", help="tokenizer reconstruction metrics on shards")
    rec.add_argument("--tokenizer", required=True, help="tokenizer export directory")
    rec.add_argument("--shards", required=True, help="shard spec: directory, glob or brace pattern")
    rec.add_argument("--num-images", type=int, default=None,
                     help="evaluate the first N images (default: all of --shards; fewer than N is an error)")
    rec.add_argument("--batch-size", type=int, default=16)
    rec.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's training resolution")
    rec.add_argument("--lpips-weights", default=None, help="local LPIPS-VGG weights file")
    rec.add_argument("--inception-weights", default=None, help=weights_help)
    rec.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    rec.add_argument("--no-fid", action="store_true", help="skip rFID")
    rec.add_argument("--extremes", type=int, default=6, help="worst / best reconstructions shown")
    rec.add_argument("--precision", default="auto", choices=PRECISIONS,
                     help="tokenizer compute precision (fp32 weights, autocast): auto = bf16 on a GPU, fp32 on the "
                          "CPU; metrics are computed in fp32")
    rec.add_argument("--out", required=True, help="output directory")
    gen = sub.add_parser("generation", help="FID / sFID / IS / precision / recall / KID of samples vs a reference")
    gen.add_argument("--samples", required=True, help=".npz written by varitok sample (arr_0)")
    gen.add_argument("--reference", required=True,
                     help="ADM-style reference .npz (arr_0: uint8 N x H x W x 3; mu/sigma, mu_s/sigma_s used if there)")
    gen.add_argument("--inception-weights", default=None, help=weights_help)
    gen.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
                     help="evaluate the first N samples (fewer in the file is an error)")
    gen.add_argument("--batch-size", type=int, default=50)
    gen.add_argument("--k", type=int, default=3, help="neighbours for precision / recall (ADM: 3)")
    gen.add_argument("--is-splits", type=int, default=10)
    gen.add_argument("--kid-subsets", type=int, default=100)
    gen.add_argument("--kid-subset-size", type=int, default=1000)
    gen.add_argument("--out", default=None, help="directory for metrics.json / metrics.md (optional)")
    ref = sub.add_parser("reference", help="ADM-format reference batch (mu/sigma, mu_s/sigma_s, arr_0) from shards")
    ref.add_argument("--shards", required=True, help="shard spec: directory, glob or brace pattern")
    ref.add_argument("--out", required=True, help="reference .npz to write")
    ref.add_argument("--inception-weights", default=None, help=weights_help)
    ref.add_argument("--image-size", type=int, default=256, help="center crop size of the images")
    ref.add_argument("--num-images", type=int, default=None,
                     help="statistics of the first N images (default: all; fewer than N is an error)")
    ref.add_argument("--keep-images", type=int, default=DEFAULT_KEEP_IMAGES,
                     help="images stored in arr_0 (a seeded random subset; ADM's batches hold 10000)")
    ref.add_argument("--batch-size", type=int, default=50)
    ref.add_argument("--seed", type=int, default=0, help="seed of the arr_0 subset")


def _write_generation_outputs(out: Path, metrics: dict[str, Any]) -> None:
    from pipeline.report import Report

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    report = Report("Generation evaluation")
    numbers = [k for k, v in metrics.items() if isinstance(v, float)]
    protocol = lambda k: metrics.get(f"{k.removesuffix('_std')}_protocol", "")   # noqa: E731
    report.section(f"{metrics['num_samples']} samples").table(["metric", "value", "protocol"],
                                                              [[k, metrics[k], protocol(k)] for k in numbers])
    report.write(out, name="metrics")


def _printable(metrics: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list) and k != "codebooks"}, indent=1)


def run(args: argparse.Namespace) -> int:
    try:
        if args.mode == "reconstruction":
            metrics = evaluate_reconstruction(
                args.tokenizer, args.shards, args.out, num_images=args.num_images, batch_size=args.batch_size,
                image_size=args.image_size, lpips_weights=args.lpips_weights, inception_weights=args.inception_weights,
                no_lpips=args.no_lpips, no_fid=args.no_fid, extremes=args.extremes, precision=args.precision)
        elif args.mode == "generation":
            metrics = evaluate_generation(args.samples, args.reference, args.inception_weights,
                                          num_samples=args.num_samples, batch_size=args.batch_size, k=args.k,
                                          is_splits=args.is_splits, kid_subsets=args.kid_subsets,
                                          kid_subset_size=args.kid_subset_size)
            if args.out:
                _write_generation_outputs(Path(args.out), metrics)
        else:
            metrics = build_reference(args.shards, args.out, args.inception_weights, image_size=args.image_size,
                                      num_images=args.num_images, keep_images=args.keep_images,
                                      batch_size=args.batch_size, seed=args.seed)
    except MissingWeightsError as exc:
        raise ConfigError(str(exc)) from None
    print(_printable(metrics))
    return 0 if all(not isinstance(v, float) or not math.isnan(v) for v in metrics.values()) else 1
