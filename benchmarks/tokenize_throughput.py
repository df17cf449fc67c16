"""Tokenization throughput (stage 2): images/s of the batched encoder, and of the whole `tokenize` stage.

Figures, for tiny.yaml (64 px) and the paper-scale dqfq-f8f16-k3.yaml (256 px), random weights (teachers
are not needed to encode), on the CPU and, when one is present, the GPU (bf16 autocast, fp32 lookup):

* ``encode_<config>_<device>``: images/s of ``Tokenizer.encode`` at --batch-size (median of repeats),
  against batch size 1 measured side by side (the baseline: what a per-image loop would do).
* ``pipeline_tiny_cpu``: images/s of ``pipeline.tokenize.tokenize`` end to end (tar reading, PNG decode,
  encode, Arrow writing, manifest) over procedural 64 px shards, against the encode-only rate at the
  same batch size: the share of the encoder's speed the stage keeps.

    .venv/bin/python -m benchmarks.tokenize_throughput [--repeats 2] [--paper-batch 2] [--images 128] [--no-paper]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit, median_time, target  # noqa: E402  (first: it sets the env before torch loads)
import torch  # noqa: E402
from data.demo_images import write_image_folder
from data.shards import ShardOptions, shard_images
from models.tokenizer import Tokenizer, TokenizerConfig
from pipeline.tokenize import tokenize

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "tokenizer"


def encode_rate(tok: Tokenizer, size: int, batch: int, device: torch.device, repeats: int, autocast: bool) -> float:
    """Images/s of tok.encode on a random batch ``batch x 3 x size x size`` (median over repeats)."""
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1

    def encode() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            tok.encode(images)

    return batch / median_time(encode, repeats=repeats, warmup=1, sync=device.type == "cuda")


def encoder_figures(name: str, config: Path, batch: int, device: torch.device, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.from_yaml(config)).to(device).eval()
    size = tok.config.encoder.resolution
    autocast = device.type == "cuda"
    batched = encode_rate(tok, size, batch, device, repeats, autocast)
    single = encode_rate(tok, size, 1, device, repeats, autocast)
    return {"config": config.name, "image_size": size, "device": device.type, "batch_size": batch,
            "precision": "bf16 autocast + fp32 lookup" if autocast else "fp32",
            "images_per_s": round(batched, 2), "batch1_images_per_s": round(single, 2),
            "batched_over_batch1": round(batched / single, 3)}


def pipeline_figures(num_images: int, batch: int, workers: int, repeats: int) -> dict[str, Any]:
    """End-to-end `tokenize` on procedural 64 px PNG shards (tiny.yaml) vs encode-only at the same batch."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = write_image_folder(root / "images", num_images=num_images, size=64, num_classes=4)
        shard_images([folder], root / "shards", ShardOptions(image_size=64, format="png", shard_size=32),
                     progress=False)
        torch.manual_seed(0)
        tok = Tokenizer(TokenizerConfig.from_yaml(CONFIGS / "tiny.yaml"))
        tok.save_pretrained(root / "tok")
        seconds = []
        for run in range(repeats):
            start = time.perf_counter()
            summary = tokenize(root / "tok", str(root / "shards"), root / f"codes-{run}", batch_size=batch,
                               workers=workers, rank=0, world_size=1, device="cpu", progress=False)
            seconds.append(time.perf_counter() - start)
            assert summary["images"] == num_images, summary
        stage = num_images / sorted(seconds)[len(seconds) // 2]
        encode_only = encode_rate(tok.eval(), 64, batch, torch.device("cpu"), repeats, autocast=False)
    return {"images": num_images, "shards": -(-num_images // 32), "batch_size": batch, "workers": workers,
            "images_per_s": round(stage, 2), "encode_only_images_per_s": round(encode_only, 2),
            "stage_over_encode_only": round(stage / encode_only, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny-batch", type=int, default=32)
    parser.add_argument("--paper-batch", type=int, default=2, help="CPU batch for the paper-scale config")
    parser.add_argument("--gpu-batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=128, help="images in the end-to-end pipeline run")
    parser.add_argument("--workers", type=int, default=1, help="decoding workers in the pipeline run")
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-scale config")
    args = parser.parse_args()

    cpu = torch.device("cpu")
    figures: dict[str, Any] = {"encode_tiny_cpu": encoder_figures("tiny", CONFIGS / "tiny.yaml", args.tiny_batch,
                                                                  cpu, args.repeats)}
    if not args.no_paper:
        figures["encode_paper_cpu"] = encoder_figures("paper", CONFIGS / "dqfq-f8f16-k3.yaml", args.paper_batch, cpu,
                                                      args.repeats)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        figures["encode_tiny_gpu"] = encoder_figures("tiny", CONFIGS / "tiny.yaml", args.gpu_batch, gpu, args.repeats)
        figures["encode_paper_gpu"] = encoder_figures("paper", CONFIGS / "dqfq-f8f16-k3.yaml", args.gpu_batch, gpu,
                                                      args.repeats)
    figures["pipeline_tiny_cpu"] = pipeline_figures(args.images, args.tiny_batch, args.workers, args.repeats)
    targets = {
        "tiny_cpu_batched_over_batch1": target(figures["encode_tiny_cpu"]["batched_over_batch1"], ">= 1.5"),
        "pipeline_keeps_encoder_speed": target(figures["pipeline_tiny_cpu"]["stage_over_encode_only"], ">= 0.5"),
    }
    emit("tokenize", figures, targets)


if __name__ == "__main__":
    main()
