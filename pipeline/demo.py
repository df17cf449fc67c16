"""Run the whole pipeline end to end on a small image set and write a report.

shard -> train-tokenizer (2 processes, DeepSpeed ZeRO-2) -> tokenize -> train-generator (2 processes, ZeRO-2)
-> sample -> eval reconstruction -> WORKDIR/report.html + report.md

Without --images, a procedural image set (smooth and detailed regions, 4 classes) is generated: nothing
downloads. Semantic alignment uses small random-weight teachers of the real architectures (open_clip ViT,
timm DINOv2) unless --clip-weights / --dino-weights give real ones. Every stage is the real command, run as
a subprocess; re-running resumes or reuses what is finished (each stage's own resumability).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.report import Report

TINY_CLIP = {"embed_dim": 64,
             "vision_cfg": {"image_size": 56, "layers": 2, "width": 64, "patch_size": 14, "head_width": 32},
             "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
TINY_DINO = {"depth": 2, "embed_dim": 64, "num_heads": 2}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
HELD_OUT = 0.2                # share of --images held out (by a hash of the file name)
DEMO_SEMANTIC = {"width": 64, "depth": 1, "heads": 2, "weight": 0.5, "temperature": 0.1, "symmetric": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo-run", help="where every stage writes; re-running resumes")
    parser.add_argument("--images", default=None, help="your own image folder (default: generated procedural images)")
    parser.add_argument("--num-images", type=int, default=192, help="procedural images to generate")
    parser.add_argument("--image-size", type=int, default=64, help="training resolution (the tiny presets use 64)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per training stage (DeepSpeed ranks)")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2), help="ZeRO stage for both training stages")
    parser.add_argument("--tokenizer-steps", type=int, default=400,
                        help="tokenizer optimizer steps (default 400: about 3.5 of the demo's 7.6 minutes on 2 cores)")
    parser.add_argument("--generator-steps", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--clip-weights", default="", help="open_clip ViT-B-16 weights (default: small random CLIP)")
    parser.add_argument("--dino-weights", default="", help="timm vit_small_patch14_dinov2 weights (default: random)")
    parser.add_argument("--lpips-weights", default="", help="LPIPS-VGG weights file (enables LPIPS loss and metric)")
    parser.add_argument("--inception-weights", default="", help="Inception weights file (enables rFID)")
    parser.add_argument("--smoke", action="store_true", help="smallest run (a few steps per stage), for tests")


class Pipeline:
    """Runs stage commands as subprocesses, prints one progress line per stage, records what it ran."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.ran: list[tuple[str, str, float]] = []  # (stage, command, seconds)

    def run(self, stage: str, args: list[str], launcher: Optional[list[str]] = None) -> float:
        command = (launcher or [sys.executable, "-m", "pipeline.cli"]) + args
        printable = " ".join(shlex.quote(c) for c in (["varitok"] + args if launcher is None else command))
        print(f"[demo] {stage}: {printable}", flush=True)
        log = self.workdir / "logs" / f"{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu") if not _cuda() else
               os.environ.get("DS_ACCELERATOR", "cuda"), "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as handle:
            proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=Path.cwd())
        seconds = time.time() - start
        if proc.returncode != 0:
            tail = log.read_text()[-3000:]
            raise SystemExit(f"[demo] {stage} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
        print(f"[demo] {stage}: done in {seconds:.1f} s (log: {log})", flush=True)
        self.ran.append((stage, printable, seconds))
        return seconds


    def timed(self, stage: str, description: str, fn) -> float:
        """Run an in-process stage ``fn()`` with the same progress lines and record as :meth:`run`."""
        print(f"[demo] {stage}: {description}", flush=True)
        start = time.time()
        fn()
        seconds = time.time() - start
        print(f"[demo] {stage}: done in {seconds:.1f} s", flush=True)
        self.ran.append((stage, description, seconds))
        return seconds


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def demo_teachers(weights_dir: Path, dino_weights: str = "",
                  clip_weights: str = "") -> tuple[list[dict[str, Any]], str]:
    """Teacher config entries and a note; small random-weight teachers saved to files when no weights are given."""
    import torch
    from safetensors.torch import save_file

    weights_dir.mkdir(parents=True, exist_ok=True)
    entries, notes = [], []
    if dino_weights:
        entries.append({"name": "dinov2", "backend": "timm", "arch": "vit_small_patch14_dinov2",
                        "weights": str(Path(dino_weights).resolve()), "image_size": 224})
        notes.append(f"DINOv2 from {dino_weights}")
    else:
        path = weights_dir / "dino-small-random.safetensors"
        if not path.is_file():
            import timm

            torch.manual_seed(0)
            net = timm.create_model("vit_small_patch14_dinov2", img_size=56, num_classes=0, **TINY_DINO)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
        entries.append({"name": "dinov2", "backend": "timm", "arch": "vit_small_patch14_dinov2",
                        "weights": str(path.resolve()), "image_size": 56, "model_kwargs": TINY_DINO})
        notes.append("DINOv2: small random-weight timm vit_small_patch14_dinov2 (2 blocks), no --dino-weights given")
    if clip_weights:
        entries.append({"name": "clip", "backend": "open_clip", "arch": "ViT-B-16",
                        "weights": str(Path(clip_weights).resolve()), "image_size": 224})
        notes.append(f"CLIP from {clip_weights}")
    else:
        config = weights_dir / "varitok-demo-clip.json"
        path = weights_dir / "clip-small-random.safetensors"
        if not path.is_file():
            import open_clip

            config.write_text(json.dumps(TINY_CLIP))
            open_clip.add_model_config(config)
            torch.manual_seed(0)
            logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: intended here
            try:
                model = open_clip.create_model(config.stem)
            finally:
                logging.disable(logging.NOTSET)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        entries.append({"name": "clip", "backend": "open_clip", "arch": str(config.resolve()),
                        "weights": str(path.resolve()), "image_size": 56})
        notes.append("CLIP: small random-weight open_clip ViT (2 layers), no --clip-weights given")
    return entries, "; ".join(notes)


def is_held_out(name: str, held_out: float) -> bool:
    """Deterministic split: the first 8 bytes of sha256(file name) as a fraction of 2**64 below ``held_out``."""
    value = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return value / 2 ** 64 < held_out


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by path."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _image_folders(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """(training folder, held-out folder, note). Procedural: ``--num-images`` images to train on and a quarter
    as many others (another seed) held out. ``--images``: a fifth held out by a hash of the file name, both
    parts linked (symlinks, class subfolders kept) under WORKDIR."""
    from data.demo_images import write_image_folder

    train, held = work / "images", work / "held-out"
    if (train / ".complete").is_file():
        pass
    elif args.images:
        source = Path(args.images).resolve()
        for path in list_images(source):
            link = (held if is_held_out(path.name, HELD_OUT) else train) / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(path)
    else:
        size = max(args.image_size, 96)
        write_image_folder(train, args.num_images, size=size, num_classes=4)
        write_image_folder(held, max(args.num_images // 4, 4), size=size, num_classes=4, seed=1)
    (train / ".complete").write_text("ok")
    count = lambda folder: len(list_images(folder))  # noqa: E731
    if args.images:
        return train, held, (f"your images from {Path(args.images).resolve()} ({count(train)} to train on, "
                             f"{count(held)} held out by a hash of the file name)")
    return train, held, (f"{count(train)} procedural images (4 classes) generated by data.demo_images, and "
                         f"{count(held)} others held out")


def _load_folder(folder: Path, size: int):
    """uint8 N x 3 x size x size (centre crop) of every image under ``folder``."""
    import torch

    from data.transforms import load_image

    return torch.stack([load_image(p.read_bytes(), size) for p in list_images(folder)])


def compare_with_reference(args: argparse.Namespace, work: Path, train_folder: Path, held_folder: Path,
                           tok_config: Path) -> dict[str, Any]:
    """Train the plain VQ baseline (:class:`ReferenceVQ`: the tokenizer's widths, its finest factor, one codebook
    of the first sub-codebook's size) on the training images for the tokenizer's steps and global batch, then
    code the held-out images with both: PSNR, identity retrieval, codes per image (and the tokenizer's fine
    share). Writes WORKDIR/compare.json and figures/compare.png (held-out | tokenizer | reference)."""
    import torch

    from data.transforms import to_unit_range
    from models.tokenizer import Tokenizer
    from models.tokenizer.reference import ReferenceVQ, identity_retrieval, psnr_per_image
    from pipeline.config import load_config
    from pipeline.schedule import warmup_cosine_factor
    from pipeline.stages import TokenizerStageConfig
    from pipeline.visual import image_grid, save_png

    cfg = load_config(TokenizerStageConfig, str(tok_config), [], kind="tokenizer")
    model, optim = cfg.model, cfg.optim
    train_images, held = _load_folder(train_folder, args.image_size), _load_folder(held_folder, args.image_size)
    held_float = to_unit_range(held)

    tokenizer = Tokenizer.from_pretrained(work / "tokenizer" / "export").eval()
    with torch.no_grad():
        codes = [c for start in range(0, len(held), 16) for c in tokenizer.encode(held_float[start:start + 16])]
        tok_rec = torch.cat([tokenizer.decode(codes[start:start + 16]) for start in range(0, len(codes), 16)])
    grain = torch.stack([c.grain.long() for c in codes])

    torch.manual_seed(cfg.run.seed)
    finest = min(model.factors)
    encoder = dataclasses.replace(model.encoder, ch_mult=model.encoder.ch_mult[:finest.bit_length()])
    first = model.quantizer.codebooks[0]
    reference = ReferenceVQ(encoder, model.decoder, model.z_channels, finest, first.size, first.dim,
                            model.quantizer.beta)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=0.0)
    steps, batch = args.tokenizer_steps, cfg.data.batch_size * args.nproc
    generator = torch.Generator().manual_seed(cfg.run.seed)
    reference.train()
    for step in range(steps):
        rows = torch.randint(0, len(train_images), (batch,), generator=generator)
        images = to_unit_range(train_images[rows])
        flips = torch.rand(batch, generator=generator) < 0.5
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        rec, losses, _ = reference(images)
        loss = (rec - images).abs().mean() + sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), optim.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = optim.lr * warmup_cosine_factor(step, optim.warmup_steps, steps, optim.min_lr_ratio)
        optimizer.step()
    reference.eval()
    ref_rec = torch.cat([reference.reconstruct(held_float[start:start + 16])[0] for start in range(0, len(held), 16)])

    def scores(rec: torch.Tensor) -> dict[str, float]:
        return {"psnr": round(float(psnr_per_image(rec, held_float).mean()), 3),
                "identity_retrieval": round(identity_retrieval(rec.clamp(-1, 1), held_float), 4)}

    result = {"held_out_images": len(held), "steps": steps, "batch": batch, "chance": round(1 / len(held), 4),
              "tokenizer": {**scores(tok_rec),
                            "codes_per_image": round(sum(c.codes.shape[0] for c in codes) / len(codes), 2),
                            "fine_share": round(float((grain > 0).float().mean()), 4)},
              "reference": {**scores(ref_rec), "codes_per_image": float(ref_rec.shape[-1] // finest) ** 2}}
    (work / "compare.json").write_text(json.dumps(result, indent=2))
    shown = slice(0, 8)
    save_png(image_grid([held_float[shown], tok_rec[shown].clamp(-1, 1), ref_rec[shown].clamp(-1, 1)]),
             work / "figures" / "compare.png")
    return result


def add_demo_teachers(model: dict[str, Any], teachers: list[dict[str, Any]], real_dino: bool = False,
                      real_clip: bool = False) -> dict[str, Any]:
    """Make a model config section (a dict, changed in place and returned) the demo's K = 3 tokenizer: sub-codebook
    0 pixel detail, 1 aligned to DINOv2, 2 to CLIP (FQGAN-Triple), with ``teachers`` (:func:`demo_teachers`)."""
    model["teachers"] = teachers
    subcodebooks = model["quantizer"]["codebooks"]
    while len(subcodebooks) < 3:
        subcodebooks.append(dict(subcodebooks[-1]))
    # teacher feature widths: DINOv2-S 384, CLIP ViT-B/16 512, or the small random demo teachers'
    widths = {"dinov2": 384 if real_dino else TINY_DINO["embed_dim"],
              "clip": 512 if real_clip else TINY_CLIP["embed_dim"]}
    for entry, align in zip(subcodebooks, ["", "dinov2", "clip"]):
        entry["align"], entry["align_dim"] = align, widths.get(align, 0)
    model["semantic"] = dict(DEMO_SEMANTIC)
    return model


def _tokenizer_config(args: argparse.Namespace, work: Path, teachers: list[dict[str, Any]], steps: int) -> Path:
    """The tiny preset with the demo's data, teachers and schedule, written as a full config file."""
    from pipeline.config import resolve_config_path

    config = yaml.safe_load(resolve_config_path("tiny", kind="tokenizer").read_text())
    add_demo_teachers(config["model"], teachers, real_dino=bool(args.dino_weights), real_clip=bool(args.clip_weights))
    config["run"]["dir"] = str(work / "tokenizer")
    config["data"].update(shards=str(work / "shards"), image_size=args.image_size)
    config["train"].update(max_steps=steps, ckpt_every=max(steps // 2, 1), log_every=max(steps // 30, 1),
                           image_every=max(steps // 3, 1), zero_stage=args.zero)
    # No GAN in a few hundred CPU steps: even in the last quarter it undoes the reconstruction learnt so far
    # (this config, 150 steps x 8 images, 48 held-out images: 12.1 dB / 50% identity retrieval with the GAN from
    # step 112, 14.9 dB / 42% without; the reference VQ 15.6 dB / 83%)
    config["loss"]["gan_weight"] = 0.0
    if args.lpips_weights:
        config["loss"].update(lpips_weight=1.0, lpips_weights=str(Path(args.lpips_weights).resolve()))
    path = work / "configs" / "tokenizer.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _fmt_list(values: list) -> str:
    return ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values)


def _launch(kind: str, args: argparse.Namespace, stage_args: list[str]) -> list[str]:
    return ["launch", kind, "--nproc", str(args.nproc), "--zero", str(args.zero), "--"] + stage_args


def run(args: argparse.Namespace) -> int:
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.num_images, args.tokenizer_steps, args.generator_steps, args.num_samples = 24, 4, 4, 4
    steps_tok, steps_gen = args.tokenizer_steps, args.generator_steps
    pipe = Pipeline(work)
    started = time.time()

    # Stage 0: images (a training folder and a held-out one) and shards
    images, held_out, image_note = _image_folders(args, work)
    shard_seconds = pipe.run("shard", ["shard", "--input", str(images), "--output", str(work / "shards"),
                                       "--image-size", str(args.image_size), "--format", "png",
                                       "--shard-size", str(max(args.num_images // 4, 4))])
    shard_manifest = _read_json(work / "shards" / "manifest.json")

    # Stage 1: tokenizer, 2 ranks under DeepSpeed
    teachers, teacher_note = demo_teachers(work / "weights", args.dino_weights, args.clip_weights)
    tok_config = _tokenizer_config(args, work, teachers, steps_tok)
    tok_seconds = pipe.run("train-tokenizer", _launch("tokenizer", args, [
        "--config", str(tok_config), "--resume", "auto"]))
    tok_export = work / "tokenizer" / "export"

    # Stage 2: codes
    codes = work / "codes"
    tokenize_seconds = pipe.run("tokenize", ["tokenize", "--tokenizer", str(tok_export), "--shards",
                                             str(work / "shards"), "--output", str(codes), "--views", "flip",
                                             "--batch-size", "16"])
    pipe.run("verify", ["verify", "codes", str(codes), "--shards", str(work / "shards"), "--views", "2"])
    pipe.run("stats", ["stats", "codes", str(codes), "--png", str(work / "figures" / "lengths.png"),
                       "--json", str(work / "codes-stats.json")])

    # Stage 3: generator
    gen_run = work / "generator"
    gen_seconds = pipe.run("train-generator", _launch("generator", args, [
        "--config", "tiny", f"data.codes={codes}", f"run.dir={gen_run}", f"train.max_steps={steps_gen}",
        f"train.ckpt_every={max(steps_gen // 2, 1)}", f"train.log_every={max(steps_gen // 30, 1)}",
        f"train.zero_stage={args.zero}", "model.num_subcodes=3", "model.codebook_sizes=[256,256,256]",
        "model.num_classes=4", "--resume", "auto"]))
    sample_seconds = pipe.run("sample", ["sample", "--generator", str(gen_run / "export"), "--tokenizer",
                                         str(tok_export), "--num-samples", str(args.num_samples), "--class-balanced",
                                         "--cfg", "2.0", "--out", str(work / "samples")])
    eval_args = ["eval", "reconstruction", "--tokenizer", str(tok_export), "--shards", str(work / "shards"),
                 "--out", str(work / "eval")]
    eval_args += ["--lpips-weights", args.lpips_weights] if args.lpips_weights else ["--no-lpips"]
    eval_args += ["--inception-weights", args.inception_weights] if args.inception_weights else ["--no-fid"]
    pipe.run("eval", eval_args)
    compare_seconds = pipe.timed("compare", "reference VQ trained in-process; both coded on the held-out images",
                                 lambda: compare_with_reference(args, work, images, held_out, tok_config))

    report = build_report(args, work, pipe, image_note, teacher_note, shard_manifest,
                          {"shard": shard_seconds, "tokenizer": tok_seconds, "tokenize": tokenize_seconds,
                           "generator": gen_seconds, "sample": sample_seconds, "compare": compare_seconds})
    print(f"[demo] finished in {time.time() - started:.0f} s; report: {report}", flush=True)
    return 0


def build_report(args, work: Path, pipe: Pipeline, image_note: str, teacher_note: str,
                 shard_manifest: dict[str, Any], seconds: dict[str, float]) -> Path:
    from pipeline.visual import plot_curves

    report = Report("varitok demo")
    overview = report.section("Overview")
    overview.text(f"Images: {image_note}. Teachers: {teacher_note}. Training stages ran with {args.nproc} "
                  f"processes under DeepSpeed ZeRO-{args.zero}.")
    overview.table(["stage", "command", "seconds"], [[s, c, round(t, 1)] for s, c, t in pipe.ran])

    report.section("Stage 0: shards").figures({
        "inputs": shard_manifest.get("num_inputs", "?"), "images written": shard_manifest.get("num_samples", "?"),
        "rejected": shard_manifest.get("num_rejected", "?"), "shards": shard_manifest.get("num_shards", "?"),
        "images/s": round(shard_manifest.get("num_inputs", 0) / max(seconds["shard"], 1e-9), 1)})

    tok = report.section("Stage 1: tokenizer")
    summary = _read_json(work / "tokenizer" / "summary.json")
    final = summary.get("final_metrics", {})
    tok.figures({**{k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
                 **{f"final {k}": v for k, v in final.items()
                    if k.startswith(("loss/", "share/", "usage/", "perplexity/")) or k == "codes_per_image"}})
    metrics = _read_jsonl(work / "tokenizer" / "logs" / "metrics.jsonl")
    if metrics:
        keys = [k for k in metrics[-1] if k.startswith("loss") or k.startswith("train/loss")]
        curves = {k: ([m.get("step", i) for i, m in enumerate(metrics) if k in m], [m[k] for m in metrics if k in m])
                  for k in keys[:8]}
        tok.image(plot_curves(curves, work / "figures" / "tokenizer-loss.png", "tokenizer losses", logy=True),
                  "tokenizer loss terms")
    grids = sorted((work / "tokenizer" / "images").glob("*.png"))
    if grids:
        tok.image(grids[-1], "input | reconstruction | granularity overlay (last training grid)")

    codes = report.section("Stage 2: codes")
    stats = _read_json(work / "codes-stats.json")
    per_image = stats.get("codes_per_image", {})
    codes.figures({**{k: v for k, v in stats.items() if not isinstance(v, (dict, list)) and k != "png"},
                   "codes per image (mean / min / max)": f"{per_image.get('mean', 0):.1f} / {per_image.get('min')} / "
                                                         f"{per_image.get('max')}",
                   "region share per level (coarse -> fine)": _fmt_list(stats.get("region_share", [])),
                   "codebook usage per sub-codebook": _fmt_list(stats.get("codebook_usage", [])),
                   "codebook perplexity per sub-codebook": _fmt_list(stats.get("codebook_perplexity", [])),
                   "tokenize images/s": round(stats.get("rows", 0) / max(seconds["tokenize"], 1e-9), 1)})
    if (work / "figures" / "lengths.png").is_file():
        codes.image(work / "figures" / "lengths.png", "sequence length histogram")

    gen = report.section("Stage 3: generator")
    gen_summary = _read_json(work / "generator" / "summary.json")
    gen.figures({**{k: v for k, v in gen_summary.items() if not isinstance(v, (dict, list))},
                 **{f"final {k}": v for k, v in gen_summary.get("final", {}).items()}})
    gmetrics = _read_jsonl(work / "generator" / "logs" / "metrics.jsonl")
    if gmetrics:
        keys = [k for k in gmetrics[-1] if "loss" in k][:6]
        curves = {k: ([m.get("step", i) for i, m in enumerate(gmetrics) if k in m], [m[k] for m in gmetrics if k in m])
                  for k in keys}
        gen.image(plot_curves(curves, work / "figures" / "generator-loss.png", "generator losses"), "generator losses")
    for grid in sorted((work / "samples").glob("grid*.png"))[:1]:
        gen.image(grid, "class-conditional samples (CFG 2.0)")

    compare = _read_json(work / "compare.json")
    if compare:
        held = report.section("Held-out images: tokenizer vs a reference VQ")
        tok_row, ref_row = compare["tokenizer"], compare["reference"]
        held.text(f"{compare['held_out_images']} images the tokenizer never saw. The reference is a plain "
                  f"LlamaGen-style VQ (same widths, finest factor, one codebook, no router) trained in-process on "
                  f"the same images for the same {compare['steps']} steps x {compare['batch']} images. Identity "
                  f"retrieval: share of images whose reconstruction is nearest (MSE) to its own input among all "
                  f"held-out inputs (chance {compare['chance']:.1%}); near chance means the reconstructions "
                  f"collapsed towards the dataset mean.")
        held.table(["model", "codes / image", "PSNR (dB)", "identity retrieval", "fine share"],
                   [["varitok tokenizer", tok_row["codes_per_image"], tok_row["psnr"],
                     f"{tok_row['identity_retrieval']:.1%}", tok_row["fine_share"]],
                    ["reference VQ", ref_row["codes_per_image"], ref_row["psnr"],
                     f"{ref_row['identity_retrieval']:.1%}", "-"]])
        if (work / "figures" / "compare.png").is_file():
            held.image(work / "figures" / "compare.png", "held-out input | tokenizer | reference VQ")

    ev = report.section("Evaluation: reconstruction")
    metrics_eval = _read_json(work / "eval" / "metrics.json")
    flat = {k: v for k, v in metrics_eval.items()
            if not isinstance(v, (dict, list)) and k not in ("tokenizer", "shards")}
    flat["region share per level (coarse -> fine)"] = _fmt_list(metrics_eval.get("region_share_per_level", []))
    for j, book in enumerate(metrics_eval.get("codebooks", [])):
        flat[f"sub-codebook {j} usage / perplexity"] = f"{book['usage']:.3f} / {book['perplexity']:.1f}"
    if not args.lpips_weights:
        flat["LPIPS"] = "needs weights: --lpips-weights"
    if not args.inception_weights:
        flat["rFID"] = "needs weights: --inception-weights"
    ev.figures(flat)
    for png in sorted((work / "eval").glob("*.png"))[:2]:
        ev.image(png, png.stem.replace("_", " "))
    md, html = report.write(work)
    return html
