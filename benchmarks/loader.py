"""Streaming loader throughput vs the raw per-core cost of decode + resize + crop.

The images of ``--images`` are written, as their original bytes, into WebDataset shards (ShardWriter)
in a temporary directory. Measured side by side in one run, interleaved round-robin (medians of ``--repeats`` rounds):

* ``raw``: a plain single-threaded loop over the same in-memory bytes calling the same
  ``data.transforms.load_image`` (decode + square crop + antialiased resize + flip) as the stream;
* ``in_process``, ``1_worker``, ``2_workers``: full epochs of :class:`data.stream.ShardStream` with 0, 1 and
  2 DataLoader workers delivering float32 batches in [-1, 1] (tar reading, shuffle buffer, decode,
  augmentation, batching, IPC and the float conversion in the main process all included);
* ``1_worker_uint8``, ``2_workers_uint8``: the same delivering uint8 batches, as ``train-tokenizer`` uses
  the stream (it converts to [-1, 1] on its device).
As in training, one stream serves all its epochs and its workers live across them; their start-up (fork,
first shuffle buffer, first batch) is reported on its own as the first batch's latency.

Targets, for both outputs: the stream with 1 worker >= 90% of the raw rate; 2 workers >= 1.7x one worker.
On a 2-core machine the float32 2-worker figure also carries the main process's conversion, which
competes with the two workers for the two cores. CPU seconds per
image (own process + its DataLoader workers) are reported too: on a machine shared with other jobs, wall-clock
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

from benchmarks.common import emit, target  # noqa: E402  (first: it sets the process env before torch loads)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children, live (DataLoader workers) or reaped."""
    import psutil

    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    live = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            live += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + live


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
    parser.add_argument("--images", type=Path, required=True,
                        help="folder of real photos to shard (e.g. a few hundred ImageNet images)")
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

        # name -> (workers, output dtype). float32 is the stream's default output; uint8 is what
        # train-tokenizer asks for (it converts to [-1, 1] on its device, outside the loader).
        setups = {"in_process": (0, torch.float32), "1_worker": (1, torch.float32), "2_workers": (2, torch.float32),
                  "1_worker_uint8": (1, torch.uint8), "2_workers_uint8": (2, torch.uint8)}
        streams = {name: ShardStream(shard_dir, args.batch_size, args.image_size, rank=0, world_size=1,
                                     num_workers=workers, crop=args.crop, flip=True, decoder=args.decoder,
                                     dtype=dtype)
                   for name, (workers, dtype) in setups.items()}
        per_epoch = streams["in_process"].steps_per_epoch * args.batch_size

        def epoch(stream: ShardStream) -> Callable[[], None]:
            return lambda: sum(1 for _ in stream)

        first_batch_s = {}
        for name, stream in streams.items():  # start-up: fork, first shuffle buffer, first batch
            start = time.perf_counter()
            next(iter(stream))
            first_batch_s[name] = time.perf_counter() - start
            stream.set_epoch(0)  # back to the epoch's start (restarts the workers, not timed)

        # Round-robin over the configurations, one run each per round, so that load from other
        # processes on a shared machine hits all of them alike; medians over rounds.
        jobs = [("raw", raw_loop)] + [(name, epoch(stream)) for name, stream in streams.items()]
        runs: dict[str, list[float]] = {name: [] for name, _ in jobs}
        cpu: dict[str, list[float]] = {name: [] for name, _ in jobs}
        started = time.perf_counter()
        for round_index in range(args.repeats + 1):  # round 0 warms caches and is discarded
            for name, fn in jobs:
                start, cpu_start = time.perf_counter(), cpu_seconds()
                fn()
                if round_index:
                    runs[name].append(time.perf_counter() - start)
                    cpu[name].append(cpu_seconds() - cpu_start)
        measure_s = time.perf_counter() - started
        for stream in streams.values():
            stream.close()

    rate = {name: (len(blobs) if name == "raw" else per_epoch) / statistics.median(times)
            for name, times in runs.items()}
    cpu_ms = {name: 1e3 * statistics.median(times) / (len(blobs) if name == "raw" else per_epoch)
              for name, times in cpu.items()}
    figures = {
        "images": len(blobs), "images_per_stream_epoch": per_epoch, "image_size": args.image_size,
        "batch_size": args.batch_size, "crop": args.crop, "decoder": args.decoder, "repeats": args.repeats,
        "raw_images_per_s_1core": round(rate["raw"], 1),
        **{f"stream_images_per_s_{name}": round(rate[name], 1) for name in setups},
        # CPU time (this process + its DataLoader workers) per image: insensitive to other load.
        "raw_cpu_ms_per_image": round(cpu_ms["raw"], 3),
        **{f"stream_cpu_ms_per_image_{name}": round(cpu_ms[name], 3) for name in setups},
        **{f"first_batch_seconds_{name}": round(first_batch_s[name], 3) for name in setups},
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "measure_seconds": round(measure_s, 1),
    }
    targets = {}
    for suffix, label in (("_uint8", "uint8"), ("", "float32")):
        one, two = rate[f"1_worker{suffix}"], rate[f"2_workers{suffix}"]
        figures[f"stream_1_worker_vs_raw_{label}"] = round(one / rate["raw"], 3)
        figures[f"speedup_2_vs_1_worker_{label}"] = round(two / one, 3)
        targets[f"stream_1_worker_vs_raw_per_core_{label}"] = target(one / rate["raw"], ">= 0.9")
        targets[f"speedup_2_vs_1_worker_{label}"] = target(two / one, ">= 1.7")
    emit("loader", figures, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
