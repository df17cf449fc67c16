"""Quality study: varitok's tokenizers against a plain VQ baseline, and DQ-VAE's / FQGAN's claims in miniature.

Trains small tokenizers on the photos of ``--images`` (split 80/20 by a hash of the file name), all with the same
encoder/decoder widths, optimizer steps, batch size and data order (same batches, same flips), for each of
``--seeds`` (the seed sets the initial weights and the data order; results are mean +- std over the seeds):

- ``ref``      the reference: a plain LlamaGen-style VQ at F8 (:class:`models.tokenizer.reference.ReferenceVQ`:
               one codebook, l2-normalised, uniform init, straight-through, commitment 0.25, no entropy term);
- ``f8``       varitok fixed-length F8, K = 1;   ``f16`` / ``f16k2``: fixed F16 with K = 1 / K = 2 sub-codebooks
               (the K = 1 fixed models without the adapter ResBlock, as ``configs/tokenizer/vq-f16.yaml``);
- ``ent``      F8/F16 with the entropy router, trained at fine shares 0.25 and 0.5 (alternating steps) and
               evaluated at each, adaptively and with a random map (each image's map with its regions shuffled:
               same codes per image, no adaptivity);
- ``learn25`` / ``learn50``  F8/F16 with the learned router at target fine share 0.25 / 0.5 (+ random map);
- ``dqfq``     DQ x FQ (tiny.yaml: F8/F16, learned router, K = 2) at target fine share 0.5 (DQ-VAE's);
- ``dqfq75``   the same at 0.75, tiny.yaml's default (still fewer codes per image than the reference's 64 at 64 px);
- ``dqfq3``    the demo's K = 3 (at 0.75) with its small random-weight DINOv2 / CLIP teachers (``--no-teachers``
               drops it).

Quantizer ablations, trained only when named in ``--models``: ``dqfq-nodis`` (without FQGAN's disentanglement
term, tiny.yaml's 0.1; there are no teachers), ``dqfq-ema`` / ``dqfq75-ema`` (EMA codebook updates + dead-code
restart, DQ-VAE's quantizer), ``dqfq-km`` (k-means codebook init from the first batch); router ablations
``learn25p`` / ``learn50p`` / ``learn50p3`` (the learned router with ``entropy_prior`` 1 / 1 / 3; results:
``benchmarks/results/quality-router/``); the protocol's ceilings ``ceil-sphere`` / ``ceil-cont`` (the reference
without its quantizer: unit-norm or raw latents reach the decoder unsnapped; results:
``benchmarks/results/quality-ceiling/``).

varitok models take their quantizer, router and loss settings from ``configs/tokenizer/tiny.yaml`` (the widths,
factors, K and router mode from the study), so the study measures the shipped defaults. Losses: L1 + the
models' own terms (VQ, budget, semantic); no GAN, no LPIPS. Metrics on the held-out split: PSNR, identity
retrieval (share of images whose reconstruction is nearest, in MSE, to its own input), codes per image, fine
share, codebook usage. Writes ``quality.json`` (the printed record), ``quality.md``, ``quality_psnr_vs_codes.png``
and ``quality_examples.png`` to ``--out``.

    nice -n 10 .venv/bin/python -m benchmarks.quality --images imagenet-samples/ --steps 300 --batch-size 8 \
        --seeds 0,1,2 --jobs 3     # the committed record: about 30 minutes on 2 cores
"""
from __future__ import annotations

import sys

import argparse
import copy
import dataclasses
import hashlib
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.common import emit, target  # noqa: E402  (first: it sets the process env before torch loads)
import torch  # noqa: E402
import yaml  # noqa: E402
from data.transforms import load_image, to_unit_range  # noqa: E402
from models.tokenizer import Tokenizer, TokenizerConfig, build_teachers, calibrate_entropy, region_entropy  # noqa: E402
from models.tokenizer.decoder import DecoderConfig  # noqa: E402
from models.tokenizer.encoder import EncoderConfig  # noqa: E402
from models.tokenizer.losses import reconstruction_loss  # noqa: E402
from models.tokenizer.reference import ReferenceVQ, identity_retrieval, psnr_per_image  # noqa: E402
from pipeline.demo import is_held_out, list_images as _list_images  # noqa: E402
from pipeline.schedule import warmup_cosine  # noqa: E402
from pipeline.visual import pyplot, grain_overlay, image_grid, save_png  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHANNEL_MULT = [1, 1, 2, 2, 2]          # tiny.yaml's trunk; a model uses the first log2(F)+1 entries
ENTROPY_RATIOS = (0.25, 0.5)
DEFAULT_MODEL = "dqfq75"                # tiny.yaml's router target (0.75) and K = 2
# DQ-VAE's official quantizer: EMA 0.99 of counts and sums, restart of codes below one token per step
EMA_QUANTIZER = (("codebook_update", "ema"), ("ema_decay", 0.99), ("dead_code_threshold", 1.0))
# fixed-length single-codebook models as configs/tokenizer/vq-f16.yaml ships them: no adapter ResBlock (it gives
# each sub-codebook its own view of the latent; with one fixed-grid codebook it only slows learning: -0.2 dB at F8)
SINGLE_CODEBOOK = (("adapter_blocks", 0),)
ENTROPY_PRIOR = (("entropy_prior", 1.0),)   # the learned router ranks regions by image entropy from step 0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of the study: reference or varitok, factors, sub-codebooks, router and its fine shares."""

    name: str
    label: str
    factors: tuple[int, ...] = (8,)
    num_codebooks: int = 1
    router: str = "fixed"                  # fixed | entropy | learned | reference
    train_ratios: tuple[float, ...] = ()   # entropy: cycled over the steps; learned: the target
    eval_ratios: tuple[float, ...] = ()    # entropy: evaluated at each; learned: the one target
    teachers: bool = False                 # the demo's random-weight teachers (K = 3)
    quantizer: tuple[tuple[str, Any], ...] = ()   # overrides of tiny.yaml's model.quantizer (key, value)
    #                                               (router "reference": ReferenceVQ keyword arguments)
    router_options: tuple[tuple[str, Any], ...] = ()   # ... and of model.router


SPECS = (
    ModelSpec("ref", "reference VQ F8 (LlamaGen recipe)", router="reference"),
    ModelSpec("f8", "varitok fixed F8, K=1", quantizer=SINGLE_CODEBOOK),
    ModelSpec("f16", "fixed F16, K=1", (16,), quantizer=SINGLE_CODEBOOK),
    ModelSpec("f16k2", "fixed F16, K=2", (16,), num_codebooks=2),
    ModelSpec("ent", "F8/F16 entropy router, K=1", (8, 16), router="entropy", train_ratios=ENTROPY_RATIOS,
              eval_ratios=ENTROPY_RATIOS),
    ModelSpec("learn25", "F8/F16 learned router, K=1", (8, 16), router="learned", train_ratios=(0.25,),
              eval_ratios=(0.25,)),
    ModelSpec("learn50", "F8/F16 learned router, K=1", (8, 16), router="learned", train_ratios=(0.5,),
              eval_ratios=(0.5,)),
    ModelSpec("dqfq", "DQ x FQ (learned, K=2)", (8, 16), 2, "learned", (0.5,), (0.5,)),
    ModelSpec("dqfq3", "DQ x FQ K=3, random-weight teachers", (8, 16), 3, "learned", (0.75,), (0.75,), teachers=True),
    ModelSpec("dqfq75", "DQ x FQ default (learned, K=2)", (8, 16), 2, "learned", (0.75,), (0.75,)),
)
# Quantizer ablations, trained only when named in --models (their results: benchmarks/results/quality-quantizer/)
EXTRA_SPECS = (
    ModelSpec("dqfq-nodis", "DQ x FQ default without disentanglement", (8, 16), 2, "learned", (0.5,), (0.5,),
              quantizer=(("disentangle_weight", 0.0),)),
    ModelSpec("dqfq-ema", "DQ x FQ default, EMA codebooks + restart", (8, 16), 2, "learned", (0.5,), (0.5,),
              quantizer=EMA_QUANTIZER),
    ModelSpec("dqfq-km", "DQ x FQ default, k-means init", (8, 16), 2, "learned", (0.5,), (0.5,),
              quantizer=(("codebook_init", "kmeans"),)),
    ModelSpec("dqfq75-ema", "DQ x FQ default, EMA codebooks + restart", (8, 16), 2, "learned", (0.75,), (0.75,),
              quantizer=EMA_QUANTIZER),
    ModelSpec("learn25p", "F8/F16 learned router with entropy prior, K=1", (8, 16), router="learned",
              train_ratios=(0.25,), eval_ratios=(0.25,), router_options=ENTROPY_PRIOR),
    ModelSpec("learn50p", "F8/F16 learned router with entropy prior, K=1", (8, 16), router="learned",
              train_ratios=(0.5,), eval_ratios=(0.5,), router_options=ENTROPY_PRIOR),
    ModelSpec("learn50p3", "F8/F16 learned router with entropy prior 3, K=1", (8, 16), router="learned",
              train_ratios=(0.5,), eval_ratios=(0.5,), router_options=(("entropy_prior", 3.0),)),
    # quantizer: ReferenceVQ's own keyword arguments for router="reference"
    ModelSpec("ceil-sphere", "ceiling: the reference without quantizer, unit-norm latents", router="reference",
              quantizer=(("latent", "sphere"),)),
    ModelSpec("ceil-cont", "ceiling: the reference without quantizer, raw latents", router="reference",
              quantizer=(("latent", "continuous"),)),
)


# ------------------------------------------------------------------------------------------------ data

def list_images(root: Path, max_images: int = 0) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by path; the first ``max_images`` when > 0."""
    paths = _list_images(root)
    if not paths:
        raise SystemExit(f"--images {root}: no image files found")
    return paths[:max_images] if max_images > 0 else paths


def load_cache(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Decode, centre-crop and resize every image once: uint8 N x 3 x size x size (kept in memory)."""
    return torch.stack([load_image(p.read_bytes(), size) for p in paths])


def seeded(seed: int, stream: str, index: int) -> torch.Generator:
    """A generator seeded deterministically (across processes) by ``(seed, stream, index)``."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def training_batch(cache: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The shared data order: batch ``step`` of a fresh seeded permutation per epoch, each image flipped with
    probability 1/2 (seeded by step). Float B x 3 x H x W in [-1, 1]; the same for every model."""
    num_images = cache.shape[0]
    epoch, offset = divmod(step * batch_size, num_images)
    order = torch.cat([torch.randperm(num_images, generator=seeded(seed, "epoch", e)) for e in (epoch, epoch + 1)])
    images = to_unit_range(cache[order[offset:offset + batch_size]])
    flips = torch.rand(batch_size, generator=seeded(seed, "flip", step)) < 0.5
    return torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)


# ------------------------------------------------------------------------------------------------ models

def tiny_model_section() -> dict[str, Any]:
    """The ``model`` section of configs/tokenizer/tiny.yaml (the shipped defaults the study measures)."""
    return yaml.safe_load((REPO / "configs" / "tokenizer" / "tiny.yaml").read_text())["model"]


def build_config(spec: ModelSpec, args: argparse.Namespace, quantiles: Sequence[float],
                 teachers: Optional[list[dict]] = None) -> TokenizerConfig:
    """A varitok tokenizer for ``spec``: tiny.yaml's quantizer / router / semantic settings with the study's
    widths, factors, K (codebooks of ``args.codebook_size`` x dim 8) and router."""
    from pipeline.demo import add_demo_teachers

    model = copy.deepcopy(tiny_model_section())
    coarsest, finest = max(spec.factors), min(spec.factors)
    model.update(factors=list(spec.factors), z_channels=args.z_channels, teachers=[])
    model["encoder"].update(ch=args.width, ch_mult=CHANNEL_MULT[:coarsest.bit_length()], attn_resolutions=[],
                            resolution=args.image_size)
    model["decoder"].update(ch=args.width, ch_mult=CHANNEL_MULT[:finest.bit_length()], attn_resolutions=[],
                            resolution=args.image_size, pos_grid=args.image_size // finest)
    model["quantizer"].update(codebooks=[{"size": args.codebook_size, "dim": 8} for _ in range(spec.num_codebooks)],
                              adapter_channels=args.z_channels, **dict(spec.quantizer))
    router = model["router"]
    if spec.router == "fixed":
        router.update(mode="fixed", fixed_level=0, targets=[])
    elif spec.router == "entropy":
        router.update(mode="entropy", targets=[spec.train_ratios[0]], entropy_quantiles=[float(q) for q in quantiles])
    else:
        router.update(mode="learned", targets=[spec.train_ratios[0]])
    router.update(dict(spec.router_options))
    if spec.teachers:
        add_demo_teachers(model, teachers or [])
    return TokenizerConfig.from_dict(model)


def build_reference(args: argparse.Namespace, **options: Any) -> ReferenceVQ:
    encoder = EncoderConfig(ch=args.width, ch_mult=CHANNEL_MULT[:4], num_res_blocks=1, attn_resolutions=[],
                            resolution=args.image_size)
    decoder_values = tiny_model_section()["decoder"]
    decoder = DecoderConfig(ch=args.width, ch_mult=CHANNEL_MULT[:4], num_res_blocks=1, attn_resolutions=[],
                            resolution=args.image_size, fourier_bands=decoder_values["fourier_bands"],
                            pos_grid=args.image_size // 8)
    return ReferenceVQ(encoder, decoder, args.z_channels, 8, args.codebook_size, **options)


def train_together(specs: Sequence[ModelSpec], models: Sequence[torch.nn.Module], cache: torch.Tensor,
                   args: argparse.Namespace, seed: int) -> tuple[list[float], list[list[float]]]:
    """Train every model round-robin, one optimizer step each per round on the same batch at the same lr, for
    ``args.steps`` rounds. AdamW (0.9, 0.95), no weight decay, grad clip 1.0, lr warmup then cosine.
    Returns (wall seconds per model, loss history per model)."""
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95),
                                    weight_decay=0.0) for m in models]   # EMA codebooks have no gradient
    # the training stages' schedule (pipeline.schedule), decaying to 0.1 x lr
    schedulers = [warmup_cosine(optimizer, args.warmup_steps, args.steps, 0.1) for optimizer in optimizers]
    histories: list[list[float]] = [[] for _ in models]
    seconds = [0.0] * len(models)
    for model in models:
        model.train()
    first = training_batch(cache, 0, args.batch_size, seed)
    for i, model in enumerate(models):   # k-means codebook init from the first batch, as the trainer does
        if isinstance(model, Tokenizer) and model.config.quantizer.codebook_init == "kmeans":
            began = time.perf_counter()
            model.init_codebooks(first)
            seconds[i] += time.perf_counter() - began
    for step in range(args.steps):
        images = training_batch(cache, step, args.batch_size, seed)
        for i, (spec, model, optimizer, scheduler) in enumerate(zip(specs, models, optimizers, schedulers)):
            began = time.perf_counter()
            if spec.router == "entropy":
                model.set_granularity_ratio([spec.train_ratios[step % len(spec.train_ratios)]])
            if isinstance(model, Tokenizer):
                model.set_step(step)
            rec, losses, _ = model(images)
            loss = reconstruction_loss(images, rec, "l1") + sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            histories[i].append(float(loss.detach()))
            seconds[i] += time.perf_counter() - began
        if (step + 1) % 25 == 0:
            print(f"[quality] seed {seed} step {step + 1}: losses {[round(h[-1], 4) for h in histories]}",
                  file=sys.stderr, flush=True)
    return [round(s, 1) for s in seconds], histories


# ------------------------------------------------------------------------------------------------ evaluation

def shuffle_regions(grain: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random grain map with the same number of regions per level as ``grain`` (B x Hs x Ws), per image:
    a uniformly random permutation of each image's regions."""
    flat = grain.flatten(1)
    order = torch.rand(flat.shape, generator=generator).argsort(1)
    return flat.gather(1, order.to(flat.device)).view_as(grain)


@dataclasses.dataclass
class Evaluation:
    metrics: dict[str, Any]
    examples: torch.Tensor          # E x 3 x H x W reconstructions in [-1, 1] (the first E images)
    grain: Optional[torch.Tensor]   # N x Hs x Ws int64, the map every image was coded with (None: reference)


@torch.no_grad()
def evaluate(model: torch.nn.Module, cache: torch.Tensor, batch_size: int, num_examples: int,
             grain: Optional[torch.Tensor] = None) -> Evaluation:
    """Reconstruct the held-out ``cache`` (uint8 N x 3 x H x W) in eval mode (varitok: encode then decode, with the
    router's maps or the imposed ``grain``). Metrics: mean PSNR (dB), identity retrieval, codes per image, fine
    share (two-level models) and per sub-codebook the share of codes used over the split."""
    model.eval()
    recs, lengths, grains, used = [], [], [], None
    for start in range(0, cache.shape[0], batch_size):
        images = to_unit_range(cache[start:start + batch_size])
        if isinstance(model, ReferenceVQ):
            rec, indices = model.reconstruct(images)
            stacked = indices.reshape(-1, 1)
            lengths += [indices[0].numel()] * images.shape[0]
        else:
            codes = model.encode(images, None if grain is None else grain[start:start + batch_size])
            rec = model.decode(codes)
            stacked = torch.cat([c.codes for c in codes])
            lengths += [c.codes.shape[0] for c in codes]
            grains.append(torch.stack([c.grain.long() for c in codes]))
        recs.append(rec.clamp(-1, 1))
        if isinstance(model, ReferenceVQ) and model.latent != "vq":
            continue    # a ceiling model has no codes to count
        sizes = model.codebook_sizes if isinstance(model, Tokenizer) else [model.codebook.shape[0]]
        counts = torch.stack([torch.bincount(stacked[:, k], minlength=size)[:size] for k, size in enumerate(sizes)]
                             ) if len(set(sizes)) == 1 else None
        used = counts if used is None else used + counts
    rec, images = torch.cat(recs), to_unit_range(cache)
    metrics: dict[str, Any] = {
        "psnr": float(psnr_per_image(rec, images).mean()), "retrieval": identity_retrieval(rec, images),
        "codes_per_image": sum(lengths) / len(lengths),
        "usage": [float((u > 0).double().mean()) for u in used] if used is not None else [],
    }
    grain_all = torch.cat(grains) if grains else None
    if grain_all is not None and isinstance(model, Tokenizer) and model.num_levels > 1:
        metrics["fine_share"] = float((grain_all > 0).double().mean())
    return Evaluation(metrics, rec[:num_examples], grain_all)


def evaluation_points(model: torch.nn.Module, spec: ModelSpec, cache: torch.Tensor, args: argparse.Namespace,
                      seed: int) -> dict[str, Evaluation]:
    """Every evaluation of one trained model: one point for fixed-length models; for two-level models the
    adaptive and the random-map point at each evaluation ratio (``ent@0.25``, ``ent@0.25 random``, ...)."""
    run = lambda grain=None: evaluate(model, cache, args.batch_size, args.examples, grain)  # noqa: E731
    if not spec.eval_ratios:
        return {spec.name: run()}
    points = {}
    for ratio in spec.eval_ratios:
        if spec.router == "entropy":
            model.set_granularity_ratio([ratio])
        name = f"{spec.name}@{ratio}" if spec.router == "entropy" else spec.name
        adaptive = points[name] = run()
        generator = torch.Generator().manual_seed(seed)
        shuffled = torch.cat([shuffle_regions(g, generator) for g in adaptive.grain.split(args.batch_size)])
        points[f"{name} random"] = run(shuffled)
    return points


def run_seed(seed: int, specs: Sequence[ModelSpec], train_cache: torch.Tensor, test_cache: torch.Tensor,
             quantiles: Sequence[float], args: argparse.Namespace) -> dict[str, Any]:
    """Build, train and evaluate every model for one seed (in its own process when ``--jobs`` > 1)."""
    torch.set_num_threads(args.threads)
    teachers_cfg, teachers = args.teachers_cfg, {}
    models = []
    for spec in specs:
        torch.manual_seed(seed)
        if spec.router == "reference":
            models.append(build_reference(args, **dict(spec.quantizer)))
            continue
        model = Tokenizer(build_config(spec, args, quantiles, teachers_cfg))
        if spec.teachers:
            teachers = teachers or build_teachers(model.config)
            model.attach_teachers(teachers)
        models.append(model)
    seconds, histories = train_together(specs, models, train_cache, args, seed)
    evaluations: dict[str, Evaluation] = {}
    for spec, model in zip(specs, models):
        evaluations.update(evaluation_points(model, spec, test_cache, args, seed))
    tail = max(1, args.steps // 10)
    return {"seed": seed, "points": {n: e.metrics for n, e in evaluations.items()},
            "train_seconds": dict(zip([s.name for s in specs], seconds)),
            "final_train_loss": {s.name: round(sum(h[-tail:]) / tail, 4) for s, h in zip(specs, histories)},
            # numpy: tensors would cross the process boundary as shared memory owned by the worker
            "examples": {n: (e.examples.numpy(), None if e.grain is None else e.grain[:args.examples].numpy())
                         for n, e in evaluations.items()} if seed == args.seeds[0] else {}}


# ------------------------------------------------------------------------------------------------ claims

def mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "n": len(values)}


def line_psnr(codes: float, coarse: dict, fine: dict) -> float:
    """PSNR of the straight line from the fixed F16 point to the fixed F8 point, at ``codes`` per image."""
    (x0, y0), (x1, y1) = [(p["codes_per_image"], p["psnr"]) for p in (coarse, fine)]
    return y0 + (y1 - y0) * (codes - x0) / (x1 - x0)


def adaptive_points(specs: Sequence[ModelSpec]) -> list[str]:
    """The K = 1 two-level points (claim 1 is about the map alone: their random maps and the K = 1 fixed line)."""
    names = []
    for spec in specs:
        if spec.num_codebooks > 1:
            continue
        if spec.router == "entropy":
            names += [f"{spec.name}@{r}" for r in spec.eval_ratios]
        elif spec.router == "learned":
            names.append(spec.name)
    return names


def margins(per_seed: Sequence[dict[str, dict]], specs: Sequence[ModelSpec]) -> dict[str, list[float]]:
    """Per-seed margins (dB, positive = the claim's side wins) of every comparison the targets are about."""
    names = {s.name for s in specs}
    out: dict[str, list[float]] = {}
    for points in per_seed:
        def add(key: str, value: float) -> None:
            out.setdefault(key, []).append(value)
        if {"f8", "ref"} <= names:
            add("f8_minus_ref", points["f8"]["psnr"] - points["ref"]["psnr"])
        for name in (n for n in points if n.startswith("dqfq") and not n.endswith("random")):
            if "ref" in names:
                add(f"{name}_minus_ref", points[name]["psnr"] - points["ref"]["psnr"])
        for name in ("ceil-sphere", "ceil-cont"):
            if {name, "ref"} <= names:
                add(f"{name}_minus_ref", points[name]["psnr"] - points["ref"]["psnr"])
        if {"f16k2", "f16"} <= names:
            add("claim2_k2_minus_k1", points["f16k2"]["psnr"] - points["f16"]["psnr"])
        for name in (n for n in adaptive_points(specs) if n in points):
            add(f"claim1_{name}_over_random", points[name]["psnr"] - points[f"{name} random"]["psnr"])
            if {"f8", "f16"} <= names:
                add(f"claim1_{name}_over_line",
                    points[name]["psnr"] - line_psnr(points[name]["codes_per_image"], points["f16"], points["f8"]))
    return out


def claim_targets(summary: dict[str, dict[str, float]], points: dict[str, dict]) -> dict[str, dict]:
    """The study's targets from the mean +- std of the per-seed margins: "beats" means mean - 2 std > 0."""
    targets = {}
    if "f8_minus_ref" in summary:
        targets["varitok_f8_k1_minus_reference_db"] = target(summary["f8_minus_ref"]["mean"], ">= 0.0")
    for key in summary:
        name = key[:-len("_minus_ref")]
        if not (key.endswith("_minus_ref") and name.startswith("dqfq")) or name == "dqfq3":
            continue
        fewer = points[name]["codes_per_image"]["mean"] <= points["ref"]["codes_per_image"]["mean"]
        record = target(summary[key]["mean"], ">= 0.5")
        targets["dqfq_default_minus_reference_db" if name == DEFAULT_MODEL else f"{name}_minus_reference_db"] = {
            **record, "met": record["met"] and fewer, "at_fewer_codes_than_reference": fewer}
    for key, stats in summary.items():
        if key.startswith("claim"):
            record = target(stats["mean"] - 2 * stats["std"], ">= 0.0")
            targets[f"{key}_mean_minus_2std_db"] = {**record, "mean": stats["mean"], "std": stats["std"]}
    return targets


# ------------------------------------------------------------------------------------------------ outputs

def plot_psnr_vs_codes(points: dict[str, dict], labels: dict[str, str], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6))

    def errorbar(names, fmt, color, label):
        names = [n for n in names if n in points]
        if names:
            ax.errorbar([points[n]["codes_per_image"]["mean"] for n in names],
                        [points[n]["psnr"]["mean"] for n in names], yerr=[points[n]["psnr"]["std"] for n in names],
                        fmt=fmt, color=color, capsize=3, label=label)

    if "ref" in points:
        ax.axhline(points["ref"]["psnr"]["mean"], color="grey", ls="--", lw=1, label="reference VQ F8 (PSNR)")
    errorbar(["ref"], "*", "black", labels.get("ref", "ref"))
    errorbar(["ceil-sphere"], "^", "#999999", labels.get("ceil-sphere"))
    errorbar(["ceil-cont"], "v", "#999999", labels.get("ceil-cont"))
    errorbar(["f16", "f8"], "-o", "#444444", "varitok fixed F16 -> F8 (K=1)")
    errorbar(["f16k2"], "s", "#2a9d8f", "fixed F16, K=2")
    colors = {"ent": "#e76f51", "learn25": "#8338ec", "learn50": "#3a86ff", "dqfq": "#264653", "dqfq3": "#f4a261",
              "dqfq-ema": "#d62828", "dqfq-nodis": "#9d4edd", "dqfq-km": "#6a994e", "dqfq75": "#5e548e",
              "dqfq75-ema": "#f77f00"}
    for prefix, color in colors.items():
        names = sorted(n for n in points if n.split("@")[0].split(" ")[0] == prefix and not n.endswith("random"))
        errorbar(names, "-o" if len(names) > 1 else "D", color, labels.get(names[0], prefix) if names else prefix)
        errorbar([f"{n} random" for n in names], ":x", color, None)
    ax.set_xlabel("codes per image (held-out mean; K sub-codes count as one code)")
    ax.set_ylabel("PSNR (dB, held-out), mean +- std over seeds")
    ax.set_title("Reconstruction PSNR vs codes per image (x: random-map controls)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_examples(originals: torch.Tensor, examples: dict[str, tuple], path: Path) -> list[str]:
    """Rows: held-out images; columns: the original then every non-random point's reconstruction (two-level
    points with their grain map tinted: fine regions orange). Returns the column names."""
    columns, names = [originals], ["original"]
    for name, (rec, grain) in examples.items():
        if name.endswith("random"):
            continue
        rec, grain = torch.from_numpy(rec), None if grain is None else torch.from_numpy(grain)
        if grain is not None and int(grain.max()) > 0:
            rec = grain_overlay(rec, grain, alpha=0.3)
        columns.append(rec)
        names.append(name)
    save_png(image_grid(columns), path)
    return names


def point_labels(specs: Sequence[ModelSpec]) -> dict[str, str]:
    labels = {}
    for spec in specs:
        if spec.router == "entropy":
            for ratio in spec.eval_ratios:
                labels[f"{spec.name}@{ratio}"] = f"{spec.label} @ fine {ratio}"
                labels[f"{spec.name}@{ratio} random"] = f"{spec.label} @ fine {ratio}, random map"
        else:
            target_note = f" @ target {spec.eval_ratios[0]}" if spec.eval_ratios else ""
            labels[spec.name] = spec.label + target_note
            if spec.eval_ratios:
                labels[f"{spec.name} random"] = spec.label + target_note + ", random map"
    return labels


def _pm(stats: dict[str, float], digits: int = 2, percent: bool = False) -> str:
    scale = 100 if percent else 1
    return f"{stats['mean'] * scale:.{digits}f} +- {stats['std'] * scale:.{digits}f}"


def write_markdown(record: dict, labels: dict[str, str], path: Path) -> None:
    figures = record["figures"]
    split = figures["split"]
    lines = [
        "# Quality study: varitok against a plain VQ, and the papers' claims in miniature", "",
        f"Command: `{figures['command']}`  ", f"Machine: {record['machine']['cpu']}, "
        f"{record['machine']['threads']} threads, GPU: {record['machine']['gpu']}  ",
        f"Split: {split['train']} train / {split['held_out']} held-out photos (sha256 of the file name), "
        f"{figures['image_size']} px. Training: {figures['steps']} steps x batch {figures['batch_size']} per model "
        f"and seed, seeds {figures['seeds']}, width {figures['width']}, codebooks {figures['codebook_size']} x 8; "
        f"{figures['train_seconds_total']:.0f} s of training in total. Mean +- std over the seeds.", "",
        "| model | codes / image | PSNR (dB) | identity retrieval (%) | fine share | usage per sub-codebook |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in figures["points"].items():
        fine = _pm(p["fine_share"], 3) if "fine_share" in p else ""
        usage = " / ".join(f"{u:.0%}" for u in p["usage"])
        lines.append(f"| {labels.get(name, name)} | {p['codes_per_image']['mean']:.1f} | {_pm(p['psnr'])} | "
                     f"{_pm(p['retrieval'], 1, True)} | {fine} | {usage} |")
    if record["targets"]:
        lines += ["", "| target | value | condition | met |", "|---|---|---|---|"]
    for name, t in record["targets"].items():
        extra = f" (mean {t['mean']:+.3f}, std {t['std']:.3f})" if "mean" in t else ""
        lines.append(f"| {name} | {t['value']:+.3f}{extra} | {t['target']} | {'yes' if t['met'] else 'NO'} |")
    lines += ["", "![PSNR vs codes](quality_psnr_vs_codes.png)", "",
              f"![examples](quality_examples.png) columns (seed {figures['seeds'][0]}): "
              f"{', '.join(figures['example_columns'])}", ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per model and seed")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2],
                        help="comma-separated seeds (initial weights and data order)")
    parser.add_argument("--models", default="", help="comma-separated models (default: all of " +
                        ",".join(s.name for s in SPECS) + "); also " + ",".join(s.name for s in EXTRA_SPECS))
    parser.add_argument("--no-teachers", action="store_true", help="drop dqfq3 (the random-teacher K=3 model)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel processes")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="encoder/decoder base channels (ch)")
    parser.add_argument("--z-channels", type=int, default=32)
    parser.add_argument("--codebook-size", type=int, default=1024, help="entries per (sub-)codebook")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--max-images", type=int, default=0, help="use the first N images only (0: all)")
    parser.add_argument("--examples", type=int, default=4, help="held-out images in the examples PNG")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.image_size % 16:
        parser.error(f"--image-size must be a multiple of 16 (the F16 grid), got {args.image_size}")
    known = {s.name for s in SPECS + EXTRA_SPECS}
    unknown = sorted(set(filter(None, args.models.split(","))) - known)
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(known)}")
    return args


def chosen_specs(args: argparse.Namespace) -> list[ModelSpec]:
    """The models of ``--models`` (default: :data:`SPECS`, not the ablations), less dqfq3 with ``--no-teachers``."""
    chosen = set(filter(None, args.models.split(",")))
    return [s for s in SPECS + EXTRA_SPECS if (s.name in chosen if chosen else s in SPECS)
            and not (s.teachers and args.no_teachers)]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = chosen_specs(args)
    paths = list_images(args.images, args.max_images)
    held = [is_held_out(p.name, args.held_out) for p in paths]
    train_paths = [p for p, h in zip(paths, held) if not h]
    test_paths = [p for p, h in zip(paths, held) if h]
    if len(train_paths) < args.batch_size or not test_paths:
        raise SystemExit(f"--images {args.images}: {len(train_paths)} train / {len(test_paths)} held-out images; "
                         f"need at least --batch-size ({args.batch_size}) train images and one held-out image")
    start = time.perf_counter()
    train_cache, test_cache = load_cache(train_paths, args.image_size), load_cache(test_paths, args.image_size)
    load_seconds = time.perf_counter() - start
    # Entropy thresholds from the training split only (DQ-VAE: percentiles of the training data).
    quantiles = calibrate_entropy(region_entropy(to_unit_range(train_cache), 16), 16)["quantiles"]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as weights_dir:
        args.teachers_cfg = None
        if any(s.teachers for s in specs):   # written once, read by every seed
            from pipeline.demo import demo_teachers

            args.teachers_cfg = demo_teachers(Path(weights_dir))[0]
        jobs = [(seed, specs, train_cache, test_cache, quantiles, args) for seed in args.seeds]
        if args.jobs > 1:
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(run_seed, *zip(*jobs)))
        else:
            results = [run_seed(*job) for job in jobs]
    wall_seconds = time.perf_counter() - started

    names = list(results[0]["points"])
    points = {name: {metric: mean_std([r["points"][name][metric] for r in results])
                     for metric in ("psnr", "retrieval", "codes_per_image", "fine_share")
                     if metric in results[0]["points"][name]} for name in names}
    for name in names:
        points[name]["usage"] = results[0]["points"][name]["usage"]
    summary = {key: mean_std(values) for key, values in margins([r["points"] for r in results], specs).items()}
    targets = claim_targets(summary, points)
    labels = point_labels(specs)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_psnr_vs_codes(points, labels, args.out / "quality_psnr_vs_codes.png")
    originals = to_unit_range(test_cache[: args.examples])
    columns = save_examples(originals, results[0]["examples"], args.out / "quality_examples.png")
    train_seconds = {name: sum(r["train_seconds"][name] for r in results) for name in results[0]["train_seconds"]}
    figures = {
        "command": " ".join(["python -m benchmarks.quality", *(argv if argv is not None else sys.argv[1:])]),
        "split": {"rule": f"sha256(file name)[:8] / 2**64 < {args.held_out} -> held out",
                  "train": len(train_paths), "held_out": len(test_paths),
                  "held_out_files": [p.name for p in test_paths]},
        "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps, "seeds": args.seeds,
        "lr": args.lr, "width": args.width, "z_channels": args.z_channels, "codebook_size": args.codebook_size,
        "losses": "L1 + each model's own terms (VQ; budget for learned routers; semantic for dqfq3); no GAN",
        "load_seconds": round(load_seconds, 1), "wall_seconds": round(wall_seconds, 1),
        "train_seconds": train_seconds, "train_seconds_total": round(sum(train_seconds.values()), 1),
        "points": points, "margins_db": summary,
        "per_seed": [{"seed": r["seed"], "points": r["points"], "final_train_loss": r["final_train_loss"]}
                     for r in results],
        "example_columns": columns,
        "config": {s.name: build_config(s, args, quantiles, args.teachers_cfg).to_dict() for s in specs
                   if s.router != "reference"},
    }
    for config in figures["config"].values():   # the 1001 calibrated quantiles are not worth a JSON page each
        config["router"].pop("entropy_quantiles", None)
    record = emit("quality", figures, targets)
    (args.out / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    write_markdown(record, labels, args.out / "quality.md")
    return record


if __name__ == "__main__":
    main()
