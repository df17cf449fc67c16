"""Generator training throughput and memory: 1 and 2 processes, DeepSpeed ZeRO-2 vs ZeRO-3 (issue 7).

Each configuration is a real ``varitok train-generator`` launch (plain ``python`` for 1 process,
``accelerate launch --use_deepspeed --zero_stage Z`` for 2) on a synthetic code corpus with the preset's
vocabulary: per image a random grain map (each region coarse or fine with probability 1/2) and uniform
random sub-codes, 2 views per image. Figures per configuration: tokens/s over all ranks (median of the
per-step values after ``--warmup`` steps, from ``RUN/logs/metrics.jsonl``), peak memory per rank (largest
rank's peak RSS on the CPU, peak allocated on a GPU), wall seconds of the launch (start-up included), and on a
GPU the model FLOPs utilisation ``6 * parameters * tokens/s / peak`` (attention FLOPs not counted).
Every rank runs with ``--threads-per-proc`` OpenMP threads (default 1, so 1 vs 2 processes compares 1 vs
2 cores): on a busy 2-core machine a single process with 2 threads was measured 10x slower at ZeRO-0/2
than with 1 thread (OpenMP threads waiting on each other), which would swamp the comparison.

Default (about 3-5 min on 2 CPU cores): the ``tiny`` preset, ``--steps 12``. ``--base`` adds the ``base``
preset with a reduced token budget (``--base-max-tokens 2048``, 3 steps: one step takes minutes on a CPU
and the 1-process run needs ~6 GiB for weights + AdamW state).

    .venv/bin/python -m benchmarks.train_generator [--steps 12] [--base] [--peak-tflops 989]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from benchmarks.common import REPO, emit, target  # noqa: E402
from data.codes.synthetic import write_corpus  # noqa: E402

CONFIGS = REPO / "configs" / "generator"
LAUNCHES = [(1, 2), (1, 3), (2, 2), (2, 3)]   # (processes, ZeRO stage)


def _corpus_for(preset: str, root: Path, rows: int) -> Path:
    from models.generator import GeneratorConfig

    model = GeneratorConfig.from_yaml(CONFIGS / f"{preset}.yaml")
    return write_corpus(root / f"codes-{preset}", rows, grain_shape=tuple(model.grain_shape),
                        sizes=tuple(model.codebook_sizes), num_levels=model.num_levels,
                        num_classes=max(model.num_classes, 1))


def launch(preset: str, corpus: Path, run_dir: Path, nproc: int, zero: int, steps: int,
           overrides: list[str], threads: int) -> tuple[list[dict], float]:
    """Train ``steps`` steps; returns the metrics.jsonl rows and the wall seconds of the whole launch."""
    from pipeline.runtime import free_port

    args = ["-m", "pipeline.cli", "train-generator", "--config", str(CONFIGS / f"{preset}.yaml"),
            f"run.dir={run_dir}", f"data.codes={corpus}", f"train.max_steps={steps}", "train.log_every=1",
            f"train.ckpt_every={steps}", f"train.zero_stage={zero}", "train.precision=auto",
            "logging.tensorboard=false", "data.num_workers=1", *overrides]
    if nproc > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
                   "--num_machines", "1", "--use_deepspeed", "--zero_stage", str(zero),
                   "--main_process_port", str(free_port()), *args]
    else:
        command = [sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    if not _cuda():
        env["DS_ACCELERATOR"] = "cpu"
    started = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return rows, time.time() - started


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def measure(preset: str, corpus: Path, root: Path, steps: int, warmup: int, overrides: list[str],
            parameters: int, peak_tflops: float, threads: int) -> dict[str, float]:
    figures = {}
    for nproc, zero in LAUNCHES:
        name = f"{preset}_{nproc}proc_zero{zero}"
        rows, seconds = launch(preset, corpus, root / name, nproc, zero, steps, overrides, threads)
        rates = [r["tokens_per_s"] for r in rows[warmup:]] or [rows[-1]["tokens_per_s"]]
        figures[f"{name}_tokens_per_s"] = round(statistics.median(rates), 1)
        figures[f"{name}_memory_gb_per_rank"] = round(rows[-1]["memory_gb"], 3)
        figures[f"{name}_wall_s"] = round(seconds, 1)
        if _cuda():
            figures[f"{name}_mfu"] = round(6 * parameters * statistics.median(rates) / (peak_tflops * 1e12 * nproc), 4)
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the tokens/s median")
    parser.add_argument("--rows", type=int, default=256, help="images in the synthetic corpus (x2 views)")
    parser.add_argument("--base", action="store_true", help="also the base preset (slow on a CPU)")
    parser.add_argument("--base-max-tokens", type=int, default=2048)
    parser.add_argument("--base-steps", type=int, default=3)
    parser.add_argument("--threads-per-proc", type=int, default=1,
                        help="OMP_NUM_THREADS of every rank (1: n processes use n cores)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak for MFU (H100 bf16 dense)")
    args = parser.parse_args(argv)
    import torch

    from models.generator import Generator, GeneratorConfig

    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-generator-") as tmp:
        root = Path(tmp)
        plan = [("tiny", args.steps, [])]
        if args.base:
            plan.append(("base", args.base_steps, [f"data.max_tokens={args.base_max_tokens}"]))
        for preset, steps, overrides in plan:
            with torch.device("meta"):
                parameters = Generator(GeneratorConfig.from_yaml(CONFIGS / f"{preset}.yaml")).num_parameters()
            figures[f"{preset}_parameters"] = parameters
            corpus = _corpus_for(preset, root, args.rows)
            figures.update(measure(preset, corpus, root, steps, args.warmup, overrides, parameters, args.peak_tflops,
                                   args.threads_per_proc))
    figures["steps"] = args.steps
    figures["threads_per_proc"] = args.threads_per_proc
    two_proc = figures["tiny_2proc_zero3_tokens_per_s"] / figures["tiny_2proc_zero2_tokens_per_s"]
    figures["tiny_2proc_zero3_over_zero2_tokens_per_s"] = round(two_proc, 3)
    targets = {"tiny_2proc_zero3_over_zero2_tokens_per_s": target(two_proc, ">= 0.5")}
    emit("train_generator", figures, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
