"""Generate images with a trained generator + tokenizer: PNGs, a grid and an ADM-style ``.npz`` for FID tools.

    varitok sample --generator runs/gen/export --tokenizer runs/tok/export --num-samples 1000 --class-balanced \\
        --cfg 2.0 --top-k 0 --top-p 1.0 --temperature 1.0 --batch-size 50 --out samples/
    ... --position-temperature 0.8 --position-top-k 8 --cfg-on content --cfg-schedule linear
    torchrun --nproc_per_node 8 -m pipeline.cli sample ...      # each rank a disjoint slice, rank 0 merges

Outputs: ``OUT/images/{i:06d}.png`` (sample i, class ``labels[i]``), ``OUT/grid.png`` (first 64 samples,
with their granularity maps below), ``OUT/samples.npz`` (``arr_0``: uint8 N x H x W x 3; ``labels``: int64
N; the null class id num_classes marks unconditional samples), ``OUT/samples.json`` (options, timing).
Sample ``i`` goes to rank ``i % world_size``. Results are reproducible for a fixed seed, world size and
batch size (each rank seeds its generator with ``seed * 1000003 + rank``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from data.world import World, resolve_world
from models.config import ConfigError
from pipeline.precision import PRECISIONS, autocast, resolve_precision

__all__ = ["sample_labels", "generate_images", "add_arguments", "run"]

GRID_SAMPLES = 64


def sample_labels(num: int, num_classes: int, classes: Optional[Sequence[int]] = None,
                  balanced: bool = False) -> np.ndarray:
    """int64 ``[num]`` class per sample: cycling through ``classes``, or ``i % num_classes`` when balanced
    (also the default for a class-conditional model); the null class ``num_classes`` for an unconditional one."""
    if num < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num}")
    if classes:
        if num_classes == 0:
            raise ConfigError("--classes needs a class-conditional generator (this one has num_classes=0)")
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ConfigError(f"--classes {bad} outside the generator's classes 0..{num_classes - 1}")
        return np.resize(np.asarray(classes, dtype=np.int64), num)
    if num_classes == 0:
        return np.zeros(num, dtype=np.int64)   # class 0 = num_classes is the null class
    return np.arange(num, dtype=np.int64) % num_classes


def generate_images(generator, tokenizer, labels: Sequence[int], *, batch_size: int = 16,
                    seed_generator: Optional[torch.Generator] = None, cfg_scale: Optional[float] = None,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, position_filter=None,
                    cfg_positions: bool = True, cfg_schedule: str = "constant",
                    progress: bool = False) -> tuple[np.ndarray, list[Tensor]]:
    """Sample code maps for ``labels`` in batches and decode them.

    Returns uint8 images ``[N, H, W, 3]`` and the ``N`` grain maps (uint8 ``[Hs, Ws]``). The temperature,
    top-k and top-p filter applies to the sub-codes, and to the positions (within the allowed set) unless
    ``position_filter`` (a ``TokenFilter``) is given. Guidance applies to the sub-codes, and to the
    positions with ``cfg_positions``; ``cfg_schedule``: "constant" or "linear" (ramp from 1 to ``cfg_scale``).
    """
    from models.generator import TokenFilter, sample
    from models.tokenizer import ImageCodes
    from pipeline.visual import to_uint8

    from tqdm.auto import tqdm

    token_filter = TokenFilter(temperature, top_k, top_p)
    position_filter = position_filter if position_filter is not None else token_filter
    images, grains = [], []
    with tqdm(total=len(labels), desc="sample", unit="img", disable=not progress) as bar:
        for start in range(0, len(labels), batch_size):
            batch = list(labels[start:start + batch_size])
            maps = sample(generator, batch, position=position_filter, content=token_filter, cfg_scale=cfg_scale,
                          cfg_positions=cfg_positions, cfg_schedule=cfg_schedule, generator=seed_generator)
            decoded = tokenizer.decode([ImageCodes(g, c) for g, c in maps])
            images.append(to_uint8(decoded.float()))
            grains += [g.cpu() for g, _ in maps]
            bar.update(len(batch))
    return np.concatenate(images), grains


def _distributed() -> World:
    """This process's place (data.world); joins a gloo/NCCL group when launched with several processes."""
    world = resolve_world()
    if world.size > 1 and not torch.distributed.is_initialized():
        for name, value in (("RANK", world.rank), ("WORLD_SIZE", world.size)):   # srun / mpirun: for the rendezvous
            os.environ.setdefault(name, str(value))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", required=True, help="generator export (config.json + model.safetensors)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer export used to decode the codes")
    # Not "--num": torchrun's own parser rejects it as an ambiguous abbreviation of its --numa-binding, even after
    # the script name (tests/test_cli_config.py checks every stage flag against torchrun and accelerate launch).
    parser.add_argument("--num-samples", dest="num", type=int, required=True, help="number of samples N")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--classes", type=int, nargs="+", help="class ids to cycle through")
    group.add_argument("--class-balanced", action="store_true", help="sample i gets class i %% num_classes (default)")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (omit for none)")
    parser.add_argument("--cfg-on", choices=("both", "content"), default="both",
                        help="guide positions and sub-codes, or the sub-codes only")
    parser.add_argument("--cfg-schedule", choices=("constant", "linear"), default="constant",
                        help="linear: the scale ramps from 1 to --cfg with the share of the map already covered")
    parser.add_argument("--temperature", type=float, default=1.0, help="sub-codes (and positions): 0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sub-codes (and positions): 0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="sub-codes (and positions): 1 = off")
    parser.add_argument("--position-temperature", type=float, default=None, help="positions (default: --temperature)")
    parser.add_argument("--position-top-k", type=int, default=None, help="positions (default: --top-k)")
    parser.add_argument("--position-top-p", type=float, default=None, help="positions (default: --top-p)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples decoded together per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="compute precision (fp32 weights, autocast): auto = bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    from models.generator import Generator
    from models.tokenizer import Tokenizer
    from pipeline.visual import grain_overlay, save_png, tile

    placement = _distributed()
    rank, world = placement.rank, placement.size
    device = torch.device(f"cuda:{placement.local_rank}" if torch.cuda.is_available() else "cpu")
    generator = Generator.from_pretrained(args.generator).to(device).eval()
    tokenizer = Tokenizer.from_pretrained(args.tokenizer).to(device).eval()
    spec = generator.config
    if (tokenizer.num_levels, tokenizer.codebook_sizes) != (spec.num_levels, list(spec.codebook_sizes)):
        raise ConfigError(f"tokenizer {args.tokenizer} (levels {tokenizer.num_levels}, codebooks "
                          f"{tokenizer.codebook_sizes}) does not match generator {args.generator} (levels "
                          f"{spec.num_levels}, codebooks {list(spec.codebook_sizes)})")
    if args.cfg is not None and spec.num_classes == 0:
        raise ConfigError("--cfg needs a class-conditional generator (num_classes > 0)")
    from models.generator import TokenFilter

    def pick(value, fallback):
        return fallback if value is None else value

    try:
        position_filter = TokenFilter(pick(args.position_temperature, args.temperature),
                                      pick(args.position_top_k, args.top_k), pick(args.position_top_p, args.top_p))
        TokenFilter(args.temperature, args.top_k, args.top_p)
    except ValueError as exc:
        raise ConfigError(f"sampling flags: {exc}") from None
    labels = sample_labels(args.num, spec.num_classes, args.classes, args.class_balanced)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    mine = np.arange(rank, args.num, world)
    started = time.perf_counter()
    seed_generator = torch.Generator(device).manual_seed(args.seed * 1000003 + rank)
    with torch.inference_mode(), autocast(resolve_precision(args.precision, device), device):
        images, grains = generate_images(generator, tokenizer, labels[mine].tolist(), batch_size=args.batch_size,
                                         seed_generator=seed_generator, cfg_scale=args.cfg,
                                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                         position_filter=position_filter, cfg_positions=args.cfg_on == "both",
                                         cfg_schedule=args.cfg_schedule,
                                         progress=rank == 0) if mine.size else (None, [])
    for index, image in zip(mine.tolist(), images if images is not None else []):
        save_png(image, out / "images" / f"{index:06d}.png")
    part = out / f".part-rank{rank:05d}.npz"
    if mine.size:
        np.savez(part, index=mine, images=images, grains=torch.stack(grains).numpy())
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        parts = [np.load(out / f".part-rank{r:05d}.npz") for r in range(min(world, args.num))]
        order = np.argsort(np.concatenate([p["index"] for p in parts]))
        all_images = np.concatenate([p["images"] for p in parts])[order]
        all_grains = torch.from_numpy(np.concatenate([p["grains"] for p in parts])[order])
        np.savez(out / "samples.npz", arr_0=all_images, labels=labels)
        shown = torch.from_numpy(all_images[:GRID_SAMPLES]).permute(0, 3, 1, 2).float() / 127.5 - 1
        overlays = grain_overlay(shown, all_grains[:GRID_SAMPLES])
        ncol = min(8, len(shown))
        save_png(np.concatenate([tile(shown, ncol), tile(overlays, ncol)]), out / "grid.png")
        for r in range(min(world, args.num)):
            (out / f".part-rank{r:05d}.npz").unlink()
        (out / "samples.json").write_text(json.dumps({
            "num": args.num, "world_size": world, "cfg": args.cfg, "cfg_on": args.cfg_on,
            "cfg_schedule": args.cfg_schedule, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p,
            "position_filter": dataclasses.asdict(position_filter), "seed": args.seed, "batch_size": args.batch_size,
            "generator": str(args.generator), "tokenizer": str(args.tokenizer),
            "seconds_rank0": time.perf_counter() - started,
            "class_counts": np.bincount(labels).tolist()}, indent=1) + "\n")
        print(f"sample: {args.num} images -> {out / 'samples.npz'} ({all_images.shape[1]}x{all_images.shape[2]}), "
              f"grid {out / 'grid.png'}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
