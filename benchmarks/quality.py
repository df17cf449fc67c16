"""Quality study (issue 9): do DQ-VAE's and FQGAN's central claims reproduce in miniature on real photos?

Trains small tokenizers on the images of ``--images`` (split 80/20 by a hash of the file name), all with the
same encoder/decoder widths, optimizer steps, batch size and data order (same batches, same flips):

- ``a``   fixed-length F16, one codebook of size S;      ``a8`` fixed-length F8, one codebook of size S;
- ``b``   fixed-length F16, K = 2 sub-codebooks of size S, disentanglement on;
- ``c``   two-level F8/F16, one codebook of size S, entropy router trained at fine ratios 0.25 and 0.5
          (alternating steps), evaluated adaptively at each ratio AND with a random grain map (the adaptive
          map of each image with its regions shuffled: same codes per image, no adaptivity);
- ``d``   two-level F8/F16, K = 2, entropy router at fine ratio 0.5 (the project's default design).

The entropy router (DQ-VAE's recommended variant) is calibrated on the training split only. No GAN, no
LPIPS training loss (L1 + VQ terms); LPIPS is reported when ``--lpips-weights`` is given.

Claim 1 (variable length) holds when every adaptive point of ``c`` lies above its random-map point and above
the straight line from ``a`` to ``a8`` at the same codes per image. Claim 2 (factorized) holds when ``b``
beats ``a`` in PSNR and in codebook usage (share of the codebook used on the held-out split, mean over the
sub-codebooks). Writes ``quality.json`` (the printed record), ``quality.md``, ``quality_psnr_vs_codes.png``
and ``quality_examples.png`` to ``--out``.

    .venv/bin/python benchmarks/quality.py --images ../shared/data/imagenet-samples --minutes 40
"""
from __future__ import annotations

import os
import sys

# Import the repo's packages from the repo root (run as a script, benchmarks/ heads sys.path).
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)
elif os.path.dirname(_HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(_HERE))

import argparse
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.common import emit, target  # noqa: E402  (first: it sets the process env before torch loads)
import torch  # noqa: E402
from torchmetrics.functional import peak_signal_noise_ratio, structural_similarity_index_measure  # noqa: E402
from data.transforms import load_image, to_unit_range  # noqa: E402
from models.tokenizer import Tokenizer, TokenizerConfig, calibrate_entropy, region_entropy  # noqa: E402
from models.tokenizer.losses import LPIPS, reconstruction_loss  # noqa: E402
from pipeline.visual import pyplot, grain_overlay, image_grid, save_png  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
CHANNEL_MULT = [1, 1, 2, 2, 4]          # per trunk level; a model uses the first log2(F)+1 entries
EVAL_RATIOS = (0.25, 0.5)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One tokenizer of the study: its downsampling factors, number of sub-codebooks and router ratios."""

    name: str
    label: str
    factors: tuple[int, ...]
    num_codebooks: int = 1
    train_ratios: tuple[float, ...] = ()   # entropy router: fine shares cycled over the training steps
    eval_ratios: tuple[float, ...] = ()    # ... and evaluated (adaptive and random map) at each


SPECS = (
    ModelSpec("a", "(a) fixed F16", (16,)),
    ModelSpec("a8", "(a') fixed F8", (8,)),
    ModelSpec("b", "(b) fixed F16, K=2", (16,), num_codebooks=2),
    ModelSpec("c", "(c) F8/F16 entropy", (8, 16), train_ratios=EVAL_RATIOS, eval_ratios=EVAL_RATIOS),
    ModelSpec("d", "(d) F8/F16 entropy, K=2", (8, 16), num_codebooks=2, train_ratios=(0.5,), eval_ratios=(0.5,)),
)


# ------------------------------------------------------------------------------------------------ data

def is_held_out(name: str, held_out: float) -> bool:
    """Deterministic split: the first 8 bytes of sha256(file name) as a fraction of 2**64 below ``held_out``."""
    value = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return value / 2 ** 64 < held_out


def list_images(root: Path, max_images: int = 0) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by path; the first ``max_images`` when > 0."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise SystemExit(f"--images {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
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

def build_config(spec: ModelSpec, args: argparse.Namespace, quantiles: Sequence[float]) -> TokenizerConfig:
    """The study's tokenizer for ``spec``: trunk and decoder widths shared by every model (depth follows the
    factors), cosine codebooks of ``args.codebook_size`` x dim 8, entropy router for two-level models."""
    coarsest, finest = max(spec.factors), min(spec.factors)
    router = {"mode": "fixed", "fixed_level": 0, "targets": []}
    if len(spec.factors) > 1:
        router = {"mode": "entropy", "targets": [spec.train_ratios[0]],
                  "entropy_quantiles": [float(q) for q in quantiles]}
    return TokenizerConfig.from_dict({
        "factors": list(spec.factors),
        "z_channels": args.z_channels,
        "encoder": {"ch": args.width, "ch_mult": CHANNEL_MULT[:coarsest.bit_length()], "num_res_blocks": 1,
                    "attn_resolutions": [], "resolution": args.image_size},
        "router": router,
        "quantizer": {"codebooks": [{"size": args.codebook_size, "dim": 8}] * spec.num_codebooks,
                      "adapter_channels": args.z_channels, "adapter_blocks": 0, "beta": 0.25,
                      "entropy_weight": args.entropy_weight, "disentangle_weight": 0.1},
        "decoder": {"ch": args.width, "ch_mult": CHANNEL_MULT[:finest.bit_length()], "num_res_blocks": 1,
                    "attn_resolutions": [], "resolution": args.image_size, "fourier_bands": 4,
                    "pos_grid": args.image_size // finest},
    })


def train_step(tokenizer: Tokenizer, images: torch.Tensor) -> torch.Tensor:
    """Loss of one training forward: L1 reconstruction + the tokenizer's weighted VQ / router terms."""
    rec, losses, _ = tokenizer(images)
    return reconstruction_loss(images, rec, "l1") + sum(losses.values())


def lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_ratio`` over ``progress`` in [0, 1]."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_together(specs: Sequence[ModelSpec], tokenizers: Sequence[Tokenizer], cache: torch.Tensor,
                   args: argparse.Namespace) -> tuple[int, list[float], list[list[float]]]:
    """Train every model round-robin, one optimizer step each per round on the same batch at the same lr, until
    ``args.steps`` rounds or ``args.minutes`` of wall time (whichever is set; a time budget is thus shared out
    evenly whatever the machine's load). Adam (0.9, 0.95), grad clip 1.0, lr warmup then cosine over the
    progress fraction. Returns (steps, wall seconds per model, loss history per model)."""
    optimizers = [torch.optim.Adam(t.parameters(), lr=args.lr, betas=(0.9, 0.95)) for t in tokenizers]
    histories: list[list[float]] = [[] for _ in tokenizers]
    seconds = [0.0] * len(tokenizers)
    for tokenizer in tokenizers:
        tokenizer.train()
    start, step = time.perf_counter(), 0
    progress = lambda: step / args.steps if args.steps else (time.perf_counter() - start) / (60 * args.minutes)  # noqa: E731
    while progress() < 1 or step < 2:
        images = training_batch(cache, step, args.batch_size, args.seed)
        lr = args.lr * lr_factor(step, progress(), args.warmup_steps)
        for i, (spec, tokenizer, optimizer) in enumerate(zip(specs, tokenizers, optimizers)):
            began = time.perf_counter()
            if spec.train_ratios:
                tokenizer.set_granularity_ratio([spec.train_ratios[step % len(spec.train_ratios)]])
            tokenizer.set_step(step)
            loss = train_step(tokenizer, images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tokenizer.parameters(), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            histories[i].append(float(loss.detach()))
            seconds[i] += time.perf_counter() - began
        step += 1
        if step % 25 == 0:
            print(f"[quality] step {step}: losses {[round(h[-1], 4) for h in histories]}", file=sys.stderr, flush=True)
    return step, [round(s, 1) for s in seconds], histories


# ------------------------------------------------------------------------------------------------ evaluation

def shuffle_regions(grain: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random grain map with the same number of regions per level as ``grain`` (B x Hs x Ws), per image:
    a uniformly random permutation of each image's regions."""
    flat = grain.flatten(1)
    order = torch.rand(flat.shape, generator=generator).argsort(1)
    return flat.gather(1, order.to(flat.device)).view_as(grain)


@dataclasses.dataclass
class Evaluation:
    metrics: dict[str, float | list[float]]
    examples: torch.Tensor          # E x 3 x H x W reconstructions in [-1, 1] (the first E images)
    grain: torch.Tensor             # N x Hs x Ws int64, the map every image was coded with


@torch.no_grad()
def evaluate(tokenizer: Tokenizer, cache: torch.Tensor, batch_size: int, num_examples: int,
             lpips: Optional[LPIPS] = None, grain: Optional[torch.Tensor] = None) -> Evaluation:
    """Encode / decode the held-out ``cache`` (uint8 N x 3 x H x W) in eval mode, with the router's maps or the
    imposed ``grain`` (N x Hs x Ws). Metrics: mean PSNR (dB) and SSIM over images (pixels in [0, 1]), LPIPS
    (when given), codes per image, and per sub-codebook the share of codes used and the perplexity of the
    code histogram over the whole split."""
    tokenizer.eval()
    psnr, ssim, dist, lengths = [], [], [], []
    histograms = [torch.zeros(size, dtype=torch.float64) for size in tokenizer.codebook_sizes]
    examples, grains = [], []
    for start in range(0, cache.shape[0], batch_size):
        images = to_unit_range(cache[start:start + batch_size])
        codes = tokenizer.encode(images, None if grain is None else grain[start:start + batch_size])
        rec = tokenizer.decode(codes).clamp(-1, 1)
        target01, rec01 = (images + 1) / 2, (rec + 1) / 2
        psnr.append(peak_signal_noise_ratio(rec01, target01, data_range=1.0, reduction="none", dim=(1, 2, 3)))
        ssim.append(structural_similarity_index_measure(rec01, target01, data_range=1.0, reduction="none"))
        if lpips is not None:
            dist.append(lpips(rec, images))
        stacked = torch.cat([c.codes for c in codes])                       # sum(L) x K
        for k, histogram in enumerate(histograms):
            histogram += torch.bincount(stacked[:, k], minlength=histogram.numel()).double()
        lengths.extend(c.codes.shape[0] for c in codes)
        examples.append(rec[:num_examples])
        grains.append(torch.stack([c.grain.long() for c in codes]))
    probabilities = [h / h.sum() for h in histograms]
    metrics: dict[str, float | list[float]] = {
        "psnr": float(torch.cat(psnr).mean()), "ssim": float(torch.cat(ssim).mean()),
        "codes_per_image": sum(lengths) / len(lengths),
        "usage": [float((h > 0).double().mean()) for h in histograms],
        "perplexity": [float(torch.exp(-torch.xlogy(p, p).sum())) for p in probabilities],
    }
    if dist:
        metrics["lpips"] = float(torch.cat(dist).mean())
    return Evaluation(metrics, torch.cat(examples)[:num_examples], torch.cat(grains))


def evaluation_points(tokenizer: Tokenizer, spec: ModelSpec, cache: torch.Tensor, args: argparse.Namespace,
                      lpips: Optional[LPIPS]) -> dict[str, Evaluation]:
    """Every evaluation of one trained model: one point for fixed-length models; for two-level models the
    adaptive and the random-map point at each evaluation ratio (``c@0.25``, ``c@0.25 random``, ...)."""
    run = lambda grain=None: evaluate(tokenizer, cache, args.batch_size, args.examples, lpips, grain)  # noqa: E731
    if not spec.eval_ratios:
        return {spec.name: run()}
    points = {}
    for ratio in spec.eval_ratios:
        tokenizer.set_granularity_ratio([ratio])
        adaptive = points[f"{spec.name}@{ratio}"] = run()
        # Shuffled batch by batch, one generator per point: the draws of the recorded study.
        generator = torch.Generator().manual_seed(args.seed)
        shuffled = torch.cat([shuffle_regions(g, generator) for g in adaptive.grain.split(args.batch_size)])
        points[f"{spec.name}@{ratio} random"] = run(shuffled)
    return points


# ------------------------------------------------------------------------------------------------ claims

def line_psnr(codes: float, fixed_coarse: dict, fixed_fine: dict) -> float:
    """PSNR of the straight line from the fixed F16 point to the fixed F8 point, at ``codes`` per image."""
    (x0, y0), (x1, y1) = [(p["codes_per_image"], p["psnr"]) for p in (fixed_coarse, fixed_fine)]
    return y0 + (y1 - y0) * (codes - x0) / (x1 - x0)


def claims(points: dict[str, dict]) -> tuple[dict, dict]:
    """(figures, targets) of the two claims. Margins in dB (positive = the claim's side wins)."""
    figures: dict[str, dict] = {"claim1": {}, "claim2": {}}
    margins = []
    for ratio in EVAL_RATIOS:
        adaptive, shuffled = points[f"c@{ratio}"], points[f"c@{ratio} random"]
        over_random = adaptive["psnr"] - shuffled["psnr"]
        over_line = adaptive["psnr"] - line_psnr(adaptive["codes_per_image"], points["a"], points["a8"])
        figures["claim1"][f"ratio {ratio}"] = {"codes_per_image": adaptive["codes_per_image"],
                                               "psnr_over_random_db": round(over_random, 3),
                                               "psnr_over_fixed_line_db": round(over_line, 3)}
        margins += [over_random, over_line]
    psnr_gain = points["b"]["psnr"] - points["a"]["psnr"]
    usage_gain = sum(points["b"]["usage"]) / len(points["b"]["usage"]) - points["a"]["usage"][0]
    figures["claim2"] = {"psnr_gain_db": round(psnr_gain, 3), "usage_gain": round(usage_gain, 4)}
    figures["claim1"]["holds"] = min(margins) > 0
    figures["claim2"]["holds"] = psnr_gain > 0 and usage_gain > 0
    targets = {"claim1_min_margin_db": target(min(margins), ">= 0.0"),
               "claim2_psnr_gain_db": target(psnr_gain, ">= 0.0"),
               "claim2_usage_gain": target(usage_gain, ">= 0.0")}
    return figures, targets


# ------------------------------------------------------------------------------------------------ outputs

def plot_psnr_vs_codes(points: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xy = lambda *names: ([points[n]["codes_per_image"] for n in names], [points[n]["psnr"] for n in names])  # noqa: E731
    ax.plot(*xy("a", "a8"), "k--o", label="fixed F16 -> fixed F8 (a, a')")
    ax.plot(*xy("b"), "s", color="#2a9d8f", markersize=8, label="(b) fixed F16, K=2")
    adaptive = [f"c@{r}" for r in EVAL_RATIOS]
    ax.plot(*xy(*adaptive), "-o", color="#e76f51", label="(c) F8/F16 entropy router")
    ax.plot(*xy(*[f"{n} random" for n in adaptive]), ":x", color="#e76f51", label="(c) same model, random map")
    ax.plot(*xy("d@0.5"), "D", color="#264653", label="(d) F8/F16, K=2")
    for name in ("a", "a8", "b", *adaptive, "d@0.5"):
        ax.annotate(name, (points[name]["codes_per_image"], points[name]["psnr"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xlabel("codes per image (held-out mean; K sub-codes count as one code)")
    ax.set_ylabel("PSNR (dB, held-out)")
    ax.set_title("Reconstruction PSNR vs codes per image")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_examples(originals: torch.Tensor, evaluations: dict[str, Evaluation], path: Path) -> list[str]:
    """Rows: held-out images; columns: the original then every evaluation point's reconstruction (two-level
    points with their grain map tinted: fine regions orange). Returns the column names."""
    columns = [originals]
    for evaluation in evaluations.values():
        rec, grain = evaluation.examples, evaluation.grain[:len(evaluation.examples)]
        if int(grain.max()) > 0:
            rec = grain_overlay(rec, grain, alpha=0.3)
        columns.append(rec)
    save_png(image_grid(columns), path)
    return ["original", *evaluations]


def markdown_table(points: dict[str, dict], labels: dict[str, str]) -> str:
    has_lpips = any("lpips" in p for p in points.values())
    header = "| model | codes / image | PSNR (dB) | SSIM |" + (" LPIPS |" if has_lpips else "") + \
        " usage per sub-codebook | perplexity per sub-codebook |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, p in points.items():
        lpips = f" {p['lpips']:.4f} |" if has_lpips else ""
        usage = " / ".join(f"{u:.1%}" for u in p["usage"])
        perplexity = " / ".join(f"{v:.1f}" for v in p["perplexity"])
        lines.append(f"| {labels[name]} | {p['codes_per_image']:.1f} | {p['psnr']:.3f} | {p['ssim']:.4f} |{lpips}"
                     f" {usage} | {perplexity} |")
    return "\n".join(lines)


def point_labels() -> dict[str, str]:
    labels = {}
    for spec in SPECS:
        if not spec.eval_ratios:
            labels[spec.name] = spec.label
        for ratio in spec.eval_ratios:
            labels[f"{spec.name}@{ratio}"] = f"{spec.label} @ fine {ratio}"
            labels[f"{spec.name}@{ratio} random"] = f"{spec.label} @ fine {ratio}, random map"
    return labels


def write_markdown(record: dict, path: Path) -> None:
    figures = record["figures"]
    c1, c2 = figures["claims"]["claim1"], figures["claims"]["claim2"]
    verdict = lambda holds: "HOLDS" if holds else "DOES NOT HOLD"  # noqa: E731
    split = figures["split"]
    text = [
        "# Quality study: variable-length and factorized codes in miniature", "",
        f"Command: `{figures['command']}`  ", f"Machine: {record['machine']['cpu']}, "
        f"{record['machine']['threads']} threads, GPU: {record['machine']['gpu']}  ",
        f"Split: {split['train']} train / {split['held_out']} held-out images (sha256 of the file name), "
        f"{figures['image_size']} px. Training: {figures['steps']} steps x batch {figures['batch_size']} per model, "
        f"{figures['train_seconds_total']:.0f} s of training in total.", "",
        markdown_table(figures["points"], point_labels()), "",
        f"Claim 1 (variable length beats fixed length at equal codes per image): **{verdict(c1['holds'])}**.",
        *[f"- fine ratio {k.split()[-1]}: {v['codes_per_image']:.1f} codes/image, "
          f"{v['psnr_over_random_db']:+.3f} dB over the random map, "
          f"{v['psnr_over_fixed_line_db']:+.3f} dB over the fixed F16-F8 line"
          for k, v in c1.items() if k.startswith("ratio")], "",
        f"Claim 2 (K=2 factorized beats one codebook in PSNR and usage): **{verdict(c2['holds'])}**: "
        f"PSNR {c2['psnr_gain_db']:+.3f} dB, usage {c2['usage_gain']:+.2%} (b minus a).", "",
        "![PSNR vs codes](quality_psnr_vs_codes.png)", "",
        f"![examples](quality_examples.png) columns: {', '.join(figures['example_columns'])}", "",
    ]
    path.write_text("\n".join(text))


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="total training wall time, all models together (they train round-robin, so each "
                             "gets the same steps)")
    parser.add_argument("--steps", type=int, default=0, help="fixed step count per model (overrides --minutes)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16, help="encoder/decoder base channels (ch)")
    parser.add_argument("--z-channels", type=int, default=64)
    parser.add_argument("--codebook-size", type=int, default=1024, help="S, entries per (sub-)codebook")
    parser.add_argument("--entropy-weight", type=float, default=0.03, help="FQGAN entropy regularizer, all models")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--max-images", type=int, default=0, help="use the first N images only (0: all)")
    parser.add_argument("--examples", type=int, default=4, help="held-out images in the examples PNG")
    parser.add_argument("--lpips-weights", default="", help="LPIPS-VGG weights file (adds the LPIPS metric)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.image_size % 16:
        parser.error(f"--image-size must be a multiple of 16 (the F16 grid), got {args.image_size}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
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

    lpips = LPIPS.from_file(args.lpips_weights, "--lpips-weights") if args.lpips_weights else None
    tokenizers = []
    for spec in SPECS:
        torch.manual_seed(args.seed)
        tokenizers.append(Tokenizer(build_config(spec, args, quantiles)))
    steps, train_seconds, histories = train_together(SPECS, tokenizers, train_cache, args)
    evaluations: dict[str, Evaluation] = {}
    start = time.perf_counter()
    for spec, tokenizer in zip(SPECS, tokenizers):
        evaluations.update(evaluation_points(tokenizer, spec, test_cache, args, lpips))
    eval_seconds = time.perf_counter() - start
    print(f"[quality] {steps} steps per model; evaluated in {eval_seconds:.1f} s: "
          f"{ {k: round(v.metrics['psnr'], 3) for k, v in evaluations.items()} }", file=sys.stderr, flush=True)

    points = {name: e.metrics for name, e in evaluations.items()}
    names, tail = [s.name for s in SPECS], max(1, steps // 10)
    claim_figures, targets = claims(points)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_psnr_vs_codes(points, args.out / "quality_psnr_vs_codes.png")
    originals = to_unit_range(test_cache[: args.examples])
    columns = save_examples(originals, evaluations, args.out / "quality_examples.png")
    figures = {
        "command": " ".join(["benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "split": {"rule": f"sha256(file name)[:8] / 2**64 < {args.held_out} -> held out",
                  "train": len(train_paths), "held_out": len(test_paths),
                  "held_out_files": [p.name for p in test_paths]},
        "image_size": args.image_size, "batch_size": args.batch_size, "steps": steps, "lr": args.lr,
        "width": args.width, "z_channels": args.z_channels, "codebook_size": args.codebook_size,
        "entropy_weight": args.entropy_weight, "router": "entropy (calibrated on the training split)",
        "losses": "L1 + codebook + 0.25 commitment + entropy regularizer (+ 0.1 disentanglement for K=2); no GAN",
        "load_seconds": round(load_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "train_seconds": dict(zip(names, train_seconds)), "train_seconds_total": round(sum(train_seconds), 1),
        "final_train_loss": {n: round(sum(h[-tail:]) / tail, 4) for n, h in zip(names, histories)}, "points": points, "claims": claim_figures,
        "example_columns": columns, "config": {s.name: build_config(s, args, quantiles).to_dict() for s in SPECS},
    }
    for config in figures["config"].values():   # the 1001 calibrated quantiles are not worth a JSON page each
        config["router"].pop("entropy_quantiles", None)
    record = emit("quality", figures, targets)
    (args.out / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    write_markdown(record, args.out / "quality.md")
    return record


if __name__ == "__main__":
    main()
