"""Sampling throughput: code maps / s of classifier-free-guided sampling at batch 1, 16 and 64.

A randomly initialised generator at the tiny widths (dim 128, 2 + 4 layers, FAR head of 1 layer) on an
8 x 8 dual grid (sequences of 64 - 256 codes plus EOL/END), CFG scale 2 on positions and sub-codes,
temperature 1, seeded. Figures per batch size: code maps per wall second and per CPU second of the process
(medians of ``--repeats`` runs; the target uses CPU time, steadier than wall time on a shared machine), the number of
lock-step decode steps and the share of wasted lock-step slots (row-steps of rows that had already reached
END while other rows of the batch continued: ``1 - sum(lengths) / (B * steps)``).

The static KV cache (this tree) is compared with the sampler before it (the growing-slice cache, a host sync
per token): run this script once in a checkout of that commit with ``--out base.json`` and pass the file
here with ``--baseline base.json``; the same seeds and widths give the same workload.

    flock /tmp/varitok-bench.lock .venv/bin/python -m benchmarks.sample_throughput [--baseline base.json]
"""
from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

from benchmarks.common import emit, target  # noqa: E402  (first: it sets the process env before torch loads)
import torch  # noqa: E402
from models.generator import Generator, GeneratorConfig, generate_tokens  # noqa: E402

WIDTHS = dict(dim=128, heads=4, position_depth=2, content_depth=4, head_dim=64, head_depth=1, head_heads=2)
BATCHES = (1, 16, 64)


def build_model(device: str) -> Generator:
    torch.manual_seed(0)
    config = GeneratorConfig(num_levels=2, num_subcodes=2, codebook_sizes=[256, 256], grain_shape=[8, 8],
                             num_classes=10, dropout=0.0, class_dropout=0.1, zero_init=False, **WIDTHS)
    return Generator(config).to(device).eval()


def measure(model: Generator, batch: int, repeats: int, device: str) -> dict:
    labels = torch.arange(batch) % model.config.num_classes
    times, cpu_times, wasted, steps = [], [], [], []
    for repeat in range(repeats + 1):   # the first run warms up (allocations, compilation)
        generator = torch.Generator(device).manual_seed(repeat)
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        tokens = generate_tokens(model, labels, cfg_scale=2.0, generator=generator)
        lengths = ((tokens.position == model.spec.end).int().argmax(1) + 1).cpu()
        elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
        if repeat == 0:
            continue
        times.append(elapsed)
        cpu_times.append(cpu_elapsed)
        steps.append(int(lengths.max()) - 1)
        wasted.append(1.0 - float(lengths.sum() - batch) / (batch * (int(lengths.max()) - 1)))
    seconds, cpu_seconds = sorted(times)[len(times) // 2], sorted(cpu_times)[len(cpu_times) // 2]
    return {"maps_per_s": round(batch / seconds, 3), "seconds": round(seconds, 4),
            "maps_per_cpu_s": round(batch / cpu_seconds, 3), "cpu_seconds": round(cpu_seconds, 4),
            "steps_mean": sum(steps) / len(steps), "wasted_slot_share": round(sum(wasted) / len(wasted), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--baseline", type=Path, help="JSON of this script run on the sampler before the static cache")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    model = build_model(args.device)
    static = "check_done_every" in inspect.signature(generate_tokens).parameters
    figures = {"device": args.device, "sampler": "static_cache" if static else "growing_cache",
               "config": {**WIDTHS, "grain_shape": [8, 8], "cfg_scale": 2.0, "num_levels": 2, "num_subcodes": 2},
               "batches": {str(b): measure(model, b, args.repeats, args.device) for b in args.batches}}
    targets = {}
    if args.baseline is not None:
        base = json.loads(args.baseline.read_text())["figures"]
        figures["baseline"] = base
        for b, row in figures["batches"].items():
            if b in base["batches"]:
                row["speedup_vs_baseline"] = round(row["maps_per_s"] / base["batches"][b]["maps_per_s"], 3)
                if "cpu_seconds" in base["batches"][b]:
                    row["cpu_time_speedup_vs_baseline"] = round(base["batches"][b]["cpu_seconds"]
                                                                / row["cpu_seconds"], 3)
        if "cpu_time_speedup_vs_baseline" in figures["batches"].get("16", {}):
            targets["cpu_speedup_b16_cfg"] = target(figures["batches"]["16"]["cpu_time_speedup_vs_baseline"],
                                                    ">= 1.3")
    record = emit("sample_throughput", figures, targets)
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
