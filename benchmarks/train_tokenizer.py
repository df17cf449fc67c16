"""Tokenizer training throughput and memory per rank: 1 vs 2 CPU processes, ZeRO-0 (data parallel) vs ZeRO-2.

Each cell is a real ``varitok train-tokenizer`` run (plain process for 1 rank, ``accelerate launch`` for 2) on
generated shards, discriminator active from step 0 (so every parameter has optimizer state). Figures per cell:

- ``images_per_s``: median over the log windows after the first (start-up and the first step excluded),
  global images (all ranks) per second, from ``RUN/logs/metrics.jsonl``;
- ``peak_memory_mb``: max over ranks of the peak resident memory (GPU: peak allocated) of a rank;
- ``optimizer_state_mb``: Adam moment bytes actually held by rank 0 (ZeRO partitions them).

Target: under ZeRO-2 the optimizer state per rank halves from 1 to 2 ranks (ratio <= 0.55).

    .venv/bin/python -m benchmarks.train_tokenizer [--configs tiny mid] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


from benchmarks.common import REPO, emit, target  # noqa: E402

# Presets as overrides of configs/tokenizer/tiny.yaml.
PRESETS = {
    "tiny": ["data.image_size=32", "model.encoder.resolution=32", "model.decoder.resolution=32", "data.batch_size=2",
             "loss.disc_ndf=16"],
    "mid": ["data.image_size=64", "data.batch_size=4", "model.z_channels=64", "model.encoder.ch=32",
            "model.decoder.ch=32", "model.quantizer.adapter_channels=64",
            "model.quantizer.codebooks=[{size:4096,dim:8},{size:4096,dim:8}]", "loss.disc_ndf=32"],
}
IMAGE_SIZE = {"tiny": 32, "mid": 64}


def make_shards(root: Path, size: int, num_images: int = 32) -> Path:
    from data.demo_images import write_image_folder
    from data.shards import ShardOptions, shard_images

    folder = write_image_folder(root / f"images{size}", num_images=num_images, size=size, num_classes=2)
    out = root / f"shards{size}"
    shard_images([str(folder)], out, ShardOptions(image_size=size, format="png", shard_size=8), progress=False)
    return out


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def run_stage(stage: list[str], nproc: int, zero: int, what: str) -> None:
    """Run ``python STAGE...`` as a plain process (``nproc`` 1) or under ``accelerate launch`` with DeepSpeed
    ZeRO-``zero`` on ``nproc`` CPU processes; raise with the output's tail (naming ``what``) if it fails."""
    from pipeline.runtime import free_port

    if nproc == 1:
        argv = [sys.executable, *stage]
    else:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_processes", str(nproc), "--main_process_port", str(free_port()), "--use_deepspeed",
                "--zero_stage", str(zero), *stage]
    done = subprocess.run(argv, env=_env(), cwd=str(REPO), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def run_cell(workdir: Path, preset: str, shards: Path, nproc: int, zero: int, steps: int) -> dict:
    """One training run; returns its figures."""
    run_dir = workdir / f"{preset}-n{nproc}-z{zero}"
    stage = ["-m", "pipeline.cli", "train-tokenizer", "--config", "tiny", f"data.shards={shards}",
             f"run.dir={run_dir}", "data.num_workers=0", *PRESETS[preset], f"train.max_steps={steps}",
             "train.log_every=2", f"train.ckpt_every={steps}", f"train.image_every={10 * steps}", "loss.disc_start=0",
             "train.ema_decay=0", "logging.tensorboard=false", f"train.zero_stage={zero}"]
    run_stage(stage, nproc, zero, f"{preset} nproc={nproc} zero={zero}")
    summary = json.loads((run_dir / "summary.json").read_text())
    windows = [json.loads(line)["images_per_s"] for line in (run_dir / "logs/metrics.jsonl").read_text().splitlines()]
    return {"images_per_s": statistics.median(windows[1:] or windows),
            "peak_memory_mb": max(r["peak_memory_bytes"] for r in summary["ranks"]) / 2 ** 20,
            "optimizer_state_mb": summary["ranks"][0]["optimizer_state_bytes"] / 2 ** 20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (log windows of 2 steps)")
    args = parser.parse_args(argv)
    figures, targets = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-train-tokenizer-") as tmp:
        workdir = Path(tmp)
        for preset in args.configs:
            shards = make_shards(workdir, IMAGE_SIZE[preset])
            cells = {f"n{n}_zero{z}": run_cell(workdir, preset, shards, n, z, args.steps)
                     for n in (1, 2) for z in (0, 2)}
            figures[preset] = cells
            ratio = cells["n2_zero2"]["optimizer_state_mb"] / cells["n1_zero2"]["optimizer_state_mb"]
            figures[preset]["zero2_optimizer_state_ratio_2_vs_1_ranks"] = ratio
            figures[preset]["zero0_vs_zero2_images_per_s_2_ranks"] = (cells["n2_zero0"]["images_per_s"]
                                                                      / cells["n2_zero2"]["images_per_s"])
            targets[f"{preset}_zero2_optimizer_state_halves"] = target(ratio, "<= 0.55")
    emit("train_tokenizer", figures, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
