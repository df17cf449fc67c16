"""Does the process layout change what the tokenizer learns? 1 process vs 2 x ZeRO-0 vs 2 x ZeRO-2, over seeds.

Every cell is a real ``varitok train-tokenizer --config tiny`` run (1 process: a plain command with
``train.grad_accum=2``; 2 processes: ``accelerate launch`` with DeepSpeed ZeRO-0 or ZeRO-2) on the same shards with
the same seed. The global batch is the same in every cell (micro batch ``data.batch_size`` x 2) and the stream's
canonical units make its batches the same whatever the layout, so the cells differ only in where the gradients
are reduced and how the optimizer state is partitioned. Each export codes the held-out images (a fifth of the
photos, by a hash of the file name): PSNR (dB, mean over images) and identity retrieval (the share of held-out
images whose reconstruction is closest, in MSE, to its own input).

Figures: per cell the mean +- std over the seeds, and the paired per-seed differences ZeRO-2 - ZeRO-0 and
2 x ZeRO-0 - 1 process. Target: |mean difference| <= 2 std of the paired differences (+ 0.05 dB), i.e. no layout
is better or worse beyond seed noise.

    nice -n 19 .venv/bin/python -m benchmarks.zero_quality --images PHOTOS/ [--seeds 0 1 2 3 4] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import emit, target  # noqa: E402  (first: it sets the process env before torch loads)
from benchmarks.train_tokenizer import run_stage  # noqa: E402

CELLS = {"n1": (1, 0), "n2_zero0": (2, 0), "n2_zero2": (2, 2)}   # name -> (processes, ZeRO stage)
HELD_OUT = 0.2


def split_photos(images: Path, work: Path, size: int) -> tuple[Path, list[Path]]:
    """Shard the training part of ``images`` at ``size`` px; return (shards, held-out image paths)."""
    from data.shards import ShardOptions, shard_images
    from pipeline.demo import is_held_out, list_images

    paths = list_images(images)
    held = [p for p in paths if is_held_out(p.name, HELD_OUT)]
    train = [p for p in paths if not is_held_out(p.name, HELD_OUT)]
    file_list = work / "train.txt"
    file_list.write_text("".join(f"{p}\n" for p in train))
    shards = work / "shards"
    shard_images([str(file_list)], shards, ShardOptions(image_size=size, format="png", shard_size=64), progress=False)
    return shards, held


def train(work: Path, shards: Path, cell: str, seed: int, steps: int, batch: int) -> Path:
    """One stage run; returns its export folder."""
    nproc, zero = CELLS[cell]
    run_dir = work / f"{cell}-seed{seed}"
    stage = ["-m", "pipeline.cli", "train-tokenizer", "--config", "tiny", f"data.shards={shards}",
             f"run.dir={run_dir}", f"run.seed={seed}", "data.num_workers=0", "data.canonical_units=2",
             f"data.batch_size={batch}", f"train.grad_accum={2 // nproc}", f"train.max_steps={steps}",
             f"train.ckpt_every={steps}", f"train.image_every={10 * steps}", "logging.tensorboard=false",
             f"train.zero_stage={zero}"]
    run_stage(stage, nproc, zero, f"{cell} seed {seed}")
    return run_dir / "export"


def score(export: Path, held) -> dict[str, float]:
    """Held-out PSNR (dB) and identity retrieval (%) of one exported tokenizer."""
    import torch

    from data.transforms import to_unit_range
    from models.tokenizer import Tokenizer
    from models.tokenizer.reference import identity_retrieval, psnr_per_image

    tokenizer = Tokenizer.from_pretrained(export).eval()
    images = to_unit_range(held)
    with torch.no_grad():
        rec = torch.cat([tokenizer.decode(tokenizer.encode(images[i:i + 16])) for i in range(0, len(images), 16)])
    return {"psnr": float(psnr_per_image(rec, images).mean()), "retrieval": 100 * identity_retrieval(rec, images)}


def mean_std(values: list[float]) -> dict[str, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.mean(values), 3), "std": round(std, 3), "values": [round(v, 3) for v in values]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="a folder of photos (a fifth is held out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=4, help="micro batch (global batch: twice this)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    import torch

    from data.transforms import load_image

    scores: dict[str, list[dict[str, float]]] = {cell: [] for cell in CELLS}
    with tempfile.TemporaryDirectory(prefix="bench-zero-quality-") as tmp:
        work = Path(tmp)
        shards, held_paths = split_photos(args.images, work, args.image_size)
        held = torch.stack([load_image(p.read_bytes(), args.image_size) for p in held_paths])
        for seed in args.seeds:
            for cell in CELLS:
                scores[cell].append(score(train(work, shards, cell, seed, args.steps, args.batch_size), held))
                print(json.dumps({"seed": seed, "cell": cell, **scores[cell][-1]}), file=sys.stderr, flush=True)

    figures = {"steps": args.steps, "global_batch": 2 * args.batch_size, "image_size": args.image_size,
               "seeds": args.seeds, "held_out_images": len(held_paths), "config": "tiny"}
    for cell in CELLS:
        for metric in ("psnr", "retrieval"):
            figures[f"{cell}_{metric}"] = mean_std([s[metric] for s in scores[cell]])
    targets = {}
    pairs = {"zero2_minus_zero0": ("n2_zero2", "n2_zero0"), "zero0_minus_1proc": ("n2_zero0", "n1")}
    for name, (a, b) in pairs.items():
        diffs = [x["psnr"] - y["psnr"] for x, y in zip(scores[a], scores[b])]
        figures[f"{name}_psnr_db"] = paired = mean_std(diffs)
        targets[f"{name}_psnr_within_noise"] = target(round(abs(paired["mean"]) - 2 * paired["std"], 3), "<= 0.05")
    record = emit("zero_quality", figures, targets)
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
