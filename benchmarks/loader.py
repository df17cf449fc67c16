"""Streaming loader throughput vs the raw per-core cost of decode + resize + crop.

The images of ``--images`` are written, as their original bytes, into WebDataset shards (ShardWriter)
in a temporary directory. Measured side by side in one run, interleaved round-robin (medians of ``--repeats`` rounds):

* ``raw``: a plain single-threaded loop over the same in-memory bytes calling the same
  ``data.transforms.load_image`` (decode + square crop + antialiased resize + flip) as the stream;
* ``stream_1w`` / ``stream_2w``: full epochs of :class:`data.stream.ShardStream` with 1 and 2 DataLoader
  workers (tar reading, shuffle buffer, decode, augmentation, float conversion, batching, IPC and
  worker start-up all included).

Targets: stream with 1 worker >= 90% of the raw rate; 2 workers >= 1.7x one worker. CPU seconds per
image (own process + reaped workers) are reported too: on a machine shared with other jobs, wall-clock
rates mostly measure the share of the cores this run got, CPU time measures the pipeline's cost.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

# Import the repo's packages from the repo root.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from benchmarks.common import REPO, emit, target  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its reaped children (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_benchmark_shards(images: list[Path], out: Path, shard_size: int) -> None:
    """Original image bytes into ``out/bench-%06d.tar`` plus a sizes.json."""
    import webdataset as wds

    sizes = {}
    with wds.ShardWriter(str(out / "bench-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for index, path in enumerate(images):
            ext = "jpg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower()[1:]
            sink.write({"__key__": f"img{index:07d}", ext: path.read_bytes(), "cls": str(index % 1000)})
            name = f"bench-{index // shard_size:06d}.tar"
            sizes[name] = sizes.get(name, 0) + 1
    (out / "sizes.json").write_text(json.dumps(sizes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "imagenet-samples",
                        help="folder of images to shard (default: ../shared/data/imagenet-samples)")
    parser.add_argument("--limit", type=int, default=0, help="use at most this many images (0 = all)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop", choices=("center", "random"), default="random")
    parser.add_argument("--decoder", choices=("pil", "torchvision"), default="pil")
    parser.add_argument("--shard-size", type=int, default=100, help="images per shard")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds, each running every configuration once (figures are medians)")
    args = parser.parse_args(argv)

    import torch

    from data.stream import ShardStream
    from data.transforms import load_image, sample_augmentation

    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if args.limit:
        paths = paths[:args.limit]
    if not paths:
        raise SystemExit(f"no images under {args.images}; pass --images DIR")

    with tempfile.TemporaryDirectory(prefix="varitok-loader-bench-") as tmp:
        shard_dir = Path(tmp)
        write_benchmark_shards(paths, shard_dir, args.shard_size)

        blobs = [p.read_bytes() for p in paths]
        augment = [sample_augmentation((0, 0, 0, i), args.crop, True) for i in range(len(blobs))]
        torch.set_num_threads(1)

        def raw_loop() -> None:
            for blob, (offset, flipped) in zip(blobs, augment):
                load_image(blob, args.image_size, offset, flipped, args.decoder)

        streams = {workers: ShardStream(shard_dir, args.batch_size, args.image_size, rank=0, world_size=1,
                                        num_workers=workers, crop=args.crop, flip=True, decoder=args.decoder)
                   for workers in (0, 1, 2)}
        per_epoch = streams[0].steps_per_epoch * args.batch_size

        def epoch(stream: ShardStream) -> Callable[[], None]:
            return lambda: sum(1 for _ in stream)

        # Round-robin over the configurations, one run each per round, so that load from other
        # processes on a shared machine hits all of them alike; medians over rounds.
        runs: dict[str, list[float]] = {"raw": [], 0: [], 1: [], 2: []}
        cpu: dict[str, list[float]] = {"raw": [], 0: [], 1: [], 2: []}
        started = time.perf_counter()
        for round_index in range(args.repeats + 1):  # round 0 warms caches and is discarded
            for name, fn in [("raw", raw_loop)] + [(w, epoch(streams[w])) for w in (0, 1, 2)]:
                start, cpu_start = time.perf_counter(), cpu_seconds()
                fn()
                if round_index:
                    runs[name].append(time.perf_counter() - start)
                    cpu[name].append(cpu_seconds() - cpu_start)
        measure_s = time.perf_counter() - started
        raw_s = statistics.median(runs["raw"])
        rate_0w, rate_1w, rate_2w = (per_epoch / statistics.median(runs[w]) for w in (0, 1, 2))
        raw_cpu_ms = 1e3 * statistics.median(cpu["raw"]) / len(blobs)
        stream_cpu_ms = {w: 1e3 * statistics.median(cpu[w]) / per_epoch for w in (0, 1, 2)}

    raw_rate = len(blobs) / raw_s
    figures = {
        "images": len(blobs), "images_per_stream_epoch": per_epoch, "image_size": args.image_size,
        "batch_size": args.batch_size, "crop": args.crop, "decoder": args.decoder, "repeats": args.repeats,
        "raw_images_per_s_1core": round(raw_rate, 1),
        "stream_images_per_s_in_process": round(rate_0w, 1),
        "stream_images_per_s_1_worker": round(rate_1w, 1),
        "stream_images_per_s_2_workers": round(rate_2w, 1),
        "stream_1_worker_vs_raw": round(rate_1w / raw_rate, 3),
        "speedup_2_vs_1_worker": round(rate_2w / rate_1w, 3),
        # CPU time (this process + its finished DataLoader workers) per image: insensitive to other load.
        "raw_cpu_ms_per_image": round(raw_cpu_ms, 3),
        "stream_cpu_ms_per_image_in_process": round(stream_cpu_ms[0], 3),
        "stream_cpu_ms_per_image_1_worker": round(stream_cpu_ms[1], 3),
        "stream_cpu_ms_per_image_2_workers": round(stream_cpu_ms[2], 3),
        "stream_1_worker_cpu_efficiency_vs_raw": round(raw_cpu_ms / stream_cpu_ms[1], 3),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "measure_seconds": round(measure_s, 1),
    }
    emit("loader", figures, {
        "stream_1_worker_vs_raw_per_core": target(rate_1w / raw_rate, ">= 0.9"),
        "speedup_2_vs_1_worker": target(rate_2w / rate_1w, ">= 1.7"),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
