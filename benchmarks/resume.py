"""Image stream resume: data re-read and time to the first batch, same layout vs a changed layout.

A small corpus (``--images DIR`` of photos, else procedural JPEGs) is sharded into WebDataset tars. A run of
``--ranks`` x ``--workers`` (one ShardStream per rank in this process, real DataLoader workers) with
``--units`` canonical units consumes ``--fraction`` of an epoch and saves every rank's state. Then, from the
same state files:

* ``fresh``: the epoch start of the saved layout (nothing to skip), for reference;
* ``same_layout``: the saved layout;
* ``changed_layout``: 1 rank x 1 worker (``grad_accum`` = ranks, so the global batch is kept);
* ``changed_layout_more``: 2 x ranks ranks x 1 worker (``grad_accum`` 1 needs K = ranks x 1 to stay: only
  when --grad-accum is 2; skipped otherwise).

For each, every rank's time from building its stream to its first batch (load_state_file included; the max over
ranks, as ranks start in parallel in a real run), and, after running the rest of the epoch, the raw samples all
units skipped on resume (read from the tar, not decoded) over the samples consumed before the checkpoint, and
the rate of that skip (raw samples read from the tars per second, nothing decoded).

``--stage tokenizer``: the whole stage instead (tiny config at ``--image-size`` plus ``--set`` overrides, CPU,
gloo): a run of ``--ranks`` processes (ZeRO-2) trains 2 steps and checkpoints; copies of it resume for one more
step on the same layout and on 1 process (``--resume auto``: grad_accum = ranks, universal checkpoint
re-partitioned), beside a fresh start. Figure: seconds from launching the command to the end of its first
optimizer step (the step's line in ``logs/metrics.jsonl``), median of ``--repeats``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, target  # noqa: E402  (first: it sets the process env before torch loads)
from benchmarks.loader import IMAGE_SUFFIXES, write_benchmark_shards


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=None, help="folder of photos (default: procedural JPEGs)")
    parser.add_argument("--num-images", type=int, default=480, help="procedural images when --images is absent")
    parser.add_argument("--limit", type=int, default=0, help="use at most this many images of --images (0 = all)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=30, help="images per shard")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--units", type=int, default=8, help="canonical units")
    parser.add_argument("--shuffle-buffer", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the epoch consumed before the save")
    parser.add_argument("--repeats", type=int, default=3, help="timed resumes per layout (median)")
    parser.add_argument("--stage", choices=("tokenizer",), default=None,
                        help="time a training stage's resume (start to first step) instead of the stream's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="with --stage: a config override on top of the tiny preset (repeatable), e.g. "
                             "model.encoder.ch=64 model.decoder.ch=64 for a mid-size tokenizer")
    args = parser.parse_args(argv)
    if args.stage:
        return stage_main(args)

    import torch

    from data.demo_images import write_image_folder
    from data.stream import ShardStream
    from data.tar import read_samples

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="varitok-resume-bench-") as tmp:
        tmp = Path(tmp)
        source = args.images or write_image_folder(tmp / "images", args.num_images, size=2 * args.image_size,
                                                    fmt="jpg")
        paths = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths = paths[:args.limit] if args.limit else paths
        if not paths:
            raise SystemExit(f"no images under {source}")
        shards = tmp / "shards"
        shards.mkdir()
        write_benchmark_shards(paths, shards, args.shard_size)
        common = dict(batch_size=args.batch_size, image_size=args.image_size, seed=0, canonical_units=args.units,
                      shuffle_buffer=args.shuffle_buffer, dtype=torch.uint8)
        step_entries = args.ranks * args.grad_accum

        def streams(ranks: int, workers: int) -> list[ShardStream]:
            return [ShardStream(shards, rank=r, world_size=ranks, num_workers=workers,
                                grad_accum=step_entries // ranks, **common) for r in range(ranks)]

        # What a resume skip costs per sample: reading raw samples from the tars (no decoding), best of 3.
        skip_s = min(_timed(lambda: sum(1 for shard in sorted(shards.glob("*.tar")) for _ in read_samples(str(shard))))
                     for _ in range(3))
        saved = tmp / "state"
        first = streams(args.ranks, args.workers)
        steps = int(first[0].steps_per_epoch * args.fraction) // args.grad_accum * args.grad_accum
        consumed = 0
        for stream in first:
            for index, _ in enumerate(stream):
                if index + 1 == steps:
                    break
            consumed += stream.stats["samples"]
            stream.save_state_file(saved)
            stream.close()

        layouts = {"fresh": (args.ranks, args.workers), "same_layout": (args.ranks, args.workers),
                   "changed_layout": (1, 1)}
        if step_entries % (2 * args.ranks) == 0 and args.units % (2 * args.ranks) == 0:
            layouts["changed_layout_more"] = (2 * args.ranks, 1)
        first_batch: dict[str, list[float]] = {name: [] for name in layouts}
        skipped: dict[str, int] = {}
        for repeat in range(args.repeats):
            for name, (ranks, workers) in layouts.items():
                per_rank, total_skipped = [], 0
                for rank in range(ranks):
                    start = time.perf_counter()
                    stream = ShardStream(shards, rank=rank, world_size=ranks, num_workers=workers,
                                         grad_accum=step_entries // ranks, **common)
                    if name != "fresh":
                        stream.load_state_file(saved)
                    batches = iter(stream)
                    next(batches)
                    per_rank.append(time.perf_counter() - start)
                    if repeat == 0:  # the rest of the epoch: every unit's reader starts (and skips) once
                        for _ in batches:
                            pass
                        total_skipped += stream.stats["resume_skipped"]
                    stream.close()
                first_batch[name].append(max(per_rank))
                if repeat == 0:
                    skipped[name] = total_skipped

    median = {name: statistics.median(times) for name, times in first_batch.items()}
    figures = {
        "images": len(paths), "image_size": args.image_size, "batch_size": args.batch_size,
        "canonical_units": args.units, "saved_layout": f"{args.ranks} ranks x {args.workers} workers",
        "grad_accum": args.grad_accum, "shuffle_buffer": args.shuffle_buffer,
        "steps_per_epoch_saved_layout": first[0].steps_per_epoch, "steps_before_save": steps,
        "samples_consumed_before_save": consumed,
        **{f"raw_samples_skipped_{name}": skipped[name] for name in layouts if name != "fresh"},
        **{f"reread_share_{name}": round(skipped[name] / consumed, 4) for name in layouts if name != "fresh"},
        **{f"first_batch_seconds_{name}": round(median[name], 3) for name in layouts},
        "layouts": {name: f"{r} x {w}" for name, (r, w) in layouts.items()},
        "repeats": args.repeats,
        # a reader resuming a unit at raw position p waits about p / this before that unit's next batch
        "skip_raw_samples_per_s": round(len(paths) / skip_s, 1),
    }
    targets = {
        # every unit re-reads (without decoding) exactly the raw samples it had consumed, nothing more
        "reread_share_changed_layout": target(skipped["changed_layout"] / consumed, "<= 1.0"),
        "reread_share_same_layout": target(skipped["same_layout"] / consumed, "<= 1.0"),
        # a changed layout costs no more than the same layout to the first batch (both skip one unit first)
        "first_batch_changed_vs_same_layout": target(median["changed_layout"] / median["same_layout"], "<= 1.5"),
    }
    emit("resume", figures, targets)
    return 0


def stage_main(args) -> int:
    """``--stage tokenizer``: start-to-first-step seconds of a fresh run, a same-layout and a changed-layout resume."""
    import json
    import os
    import shutil
    import subprocess

    from data.demo_images import write_image_folder
    from pipeline.runtime import free_port

    repo = Path(__file__).resolve().parent.parent
    size = args.image_size
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_"))}
    env.update(DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    stage = ["-m", "pipeline.cli", "train-tokenizer", "--config", "tiny", f"data.image_size={size}",
             f"model.encoder.resolution={size}", f"model.decoder.resolution={size}",
             f"data.batch_size={args.batch_size}", "data.num_workers=0", "loss.disc_ndf=16", "train.zero_stage=2",
             "train.log_every=1", "train.ckpt_every=100", "train.image_every=100", "loss.disc_start=1",
             "logging.tensorboard=false", *args.overrides]

    def launch(run_dir: Path, ranks: int, steps: int) -> float:
        """Seconds from the launch to the end of the first optimizer step this launch makes."""
        command = [sys.executable, *stage, f"data.shards={shards}", f"run.dir={run_dir}", f"train.max_steps={steps}",
                   "--resume", "auto"]
        # accelerate launch for every layout (1 process too): the same launcher cost everywhere
        command = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--dynamo_backend",
                   "no", "--num_processes", str(ranks), "--use_deepspeed", "--zero_stage", "2",
                   "--main_process_port", str(free_port()), *command[1:]]
        metrics = run_dir / "logs" / "metrics.jsonl"
        before = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        start = time.time()
        result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
        lines = [json.loads(line) for line in metrics.read_text().splitlines()[before:]]
        return next(line["time"] for line in lines if "event" not in line) - start

    with tempfile.TemporaryDirectory(prefix="varitok-stage-resume-bench-") as tmp:
        tmp = Path(tmp)
        paths = sorted(write_image_folder(tmp / "images", args.num_images, size=size, fmt="jpg").rglob("*.jpg"))
        shards = tmp / "shards"
        shards.mkdir()
        write_benchmark_shards(paths, shards, args.shard_size)
        saved = tmp / "saved"
        launch(saved, args.ranks, 2)
        times: dict[str, list[float]] = {"fresh": [], "same_layout": [], "changed_layout": []}
        for repeat in range(args.repeats):
            times["fresh"].append(launch(tmp / f"fresh-{repeat}", args.ranks, 1))
            for name, ranks in (("same_layout", args.ranks), ("changed_layout", 1)):
                run_dir = tmp / f"{name}-{repeat}"
                shutil.copytree(saved, run_dir)
                times[name].append(launch(run_dir, ranks, 3))
    median = {name: statistics.median(values) for name, values in times.items()}
    figures = {"stage": "tokenizer (tiny" + "".join(f", {o}" for o in args.overrides) + ")", "image_size": size,
               "batch_size": args.batch_size,
               "saved_layout": f"{args.ranks} processes, ZeRO-2", "changed_layout": "1 process",
               "repeats": args.repeats, **{f"first_step_seconds_{name}": round(v, 2) for name, v in median.items()}}
    targets = {"first_step_changed_vs_same_layout": target(median["changed_layout"] / median["same_layout"], "<= 1.5")}
    emit("resume-stage", figures, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
