"""Tokenizer training step (forward + backward of every loss in ``Tokenizer.forward``), images per second.

Two configurations, measured in the same run: ``tiny.yaml`` (its data.batch_size and image_size) and the
paper-scale ``dqfq-f8f16-k3.yaml`` at batch 2, 256px. The paper config's teachers (DINOv2-S via timm,
CLIP ViT-B/16 via open_clip) are built with RANDOM weights here (same compute, no weight files needed);
``--teachers none`` drops alignment instead. Runs on the GPU (bf16 autocast) when one is available.
Reconstruction / LPIPS / GAN losses are not part of ``Tokenizer.forward`` and not timed here.
Reported per configuration: median wall seconds per step, images/s, and median process CPU seconds per
step (all threads; meaningful when the machine is shared).

    python -m benchmarks.tokenizer_step [--repeats 3] [--paper-batch 2] [--teachers random|none]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

from benchmarks.common import REPO, emit, median_time  # noqa: E402  (first: it sets the process env before torch loads)


def measure(config_path: Path, batch: int, size: int, repeats: int, teachers: str, device: str) -> dict:
    import torch

    from models.tokenizer import Tokenizer, TokenizerConfig, build_teachers

    config = TokenizerConfig.from_yaml(config_path)
    if teachers == "none":
        for codebook in config.quantizer.codebooks:
            codebook.align, codebook.align_dim = "", 0
        config.teachers = []
    torch.manual_seed(0)
    tok = Tokenizer(config).to(device).train()
    if config.teachers:
        tok.attach_teachers({name: t.to(device) for name, t in build_teachers(config, random_init=True).items()})
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext())

    def step():
        with autocast:
            rec, losses, _ = tok(images)
            loss = (rec.float() - images).abs().mean() + sum(losses.values())
        loss.backward()
        tok.zero_grad(set_to_none=True)

    cpu_times = []

    def timed_step():
        start = time.process_time()
        step()
        cpu_times.append(time.process_time() - start)

    seconds = median_time(timed_step, repeats=repeats, warmup=1, sync=device == "cuda")
    return {"cpu_s": round(statistics.median(cpu_times[1:]), 4), "batch": batch, "image_size": size,
            "params_m": round(sum(p.numel() for p in tok.parameters()) / 1e6, 2),
            "teachers": [t.name for t in config.teachers], "step_s": round(seconds, 4),
            "images_per_s": round(batch / seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paper-batch", type=int, default=2)
    parser.add_argument("--paper-size", type=int, default=256)
    parser.add_argument("--teachers", choices=["random", "none"], default="random")
    parser.add_argument("--skip-paper", action="store_true", help="only the tiny configuration")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from omegaconf import OmegaConf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = REPO / "configs" / "tokenizer"
    tiny_data = OmegaConf.load(configs / "tiny.yaml").data
    figures = {"device": device, "precision": "bf16 autocast" if device == "cuda" else "fp32",
               "tiny": measure(configs / "tiny.yaml", tiny_data.batch_size, tiny_data.image_size, 10 * args.repeats,
                               "none", device)}
    if not args.skip_paper:
        figures["dqfq-f8f16-k3"] = measure(configs / "dqfq-f8f16-k3.yaml", args.paper_batch, args.paper_size,
                                           args.repeats, args.teachers, device)
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)
    emit("tokenizer_step", figures)


if __name__ == "__main__":
    main()
