"""GPU check: every GPU path of the pipeline run for real, in one short script that prints ONE JSON object.

On a CUDA machine (about 5-8 minutes on one H100-class GPU, procedural 64px images):
  1. shard 256 images;
  2. train-tokenizer (tiny) 30 steps in bf16 on 1 GPU and on all local GPUs (ZeRO-2, NCCL);
  3. bf16 vs fp32: the first 10 steps of train-tokenizer and of train-generator in both precisions, same seed
     and batches; the per-step losses must agree within ``--loss-rtol`` (relative);
  4. tokenize the 256 images with the bf16 tokenizer's export;
  5. train-generator (tiny) 30 steps, bf16, ZeRO-3, on all local GPUs, from those codes;
  6. sample 64 images with classifier-free guidance (scale 2).
Figures: images/s (training, tokenize, sample), tokens/s, peak memory per stage, the generator's MFU (model
FLOPs: 6 x non-embedding parameters + causal attention 6 x layers x dim x mean sequence length, per token;
against the GPU's dense bf16 peak when known, else a measured bf16 matmul rate) and the loss agreement.

``--device cpu`` runs the same stages with tiny sizes (32px, a few steps, 2 CPU processes for "all devices",
bf16 autocast on the CPU, slow but numerically the same kind): the test suite runs it so that the script
works when a GPU is lent. Timing figures from a CPU run are not GPU figures.

    python -m benchmarks.gpu_check                 # on a GPU machine
    python -m benchmarks.gpu_check --device cpu    # the CPU rehearsal (about 3 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import REPO, emit, target

# Dense bf16 peak FLOP/s (no sparsity) of GPUs by name fragment; others use a measured matmul rate.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
GENERATOR_CONFIG = REPO / "configs" / "generator" / "tiny.yaml"


def _sizes(device: str) -> dict:
    if device == "cuda":
        return {"image_size": 64, "images": 256, "steps": 30, "compare_steps": 10, "samples": 64, "batch": 16,
                "max_tokens": 4096}
    return {"image_size": 32, "images": 32, "steps": 3, "compare_steps": 3, "samples": 4, "batch": 4,
            "max_tokens": 160}


def _run(command: list[str], log: Path, timeout: float) -> float:
    """Run a stage command (repo root, stdout+stderr to ``log``); its wall seconds; a clear error if it fails."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command[:8])} ... failed with exit code {result.returncode}:\n{tail}")
    return time.perf_counter() - started


def _in_turn(run, calls: list[tuple], device: str) -> list:
    """``run(*call)`` for every call: one after the other on a GPU (clean timings), together on the CPU (the
    rehearsal checks that the paths work; its timings are not figures)."""
    if device == "cuda":
        return [run(*call) for call in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: run(*call), calls))


def _launcher(processes: int, zero: int) -> list[str]:
    from pipeline.runtime import free_port

    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
            "--num_machines", "1", "--use_deepspeed", "--zero_stage", str(zero), "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _loss_agreement(fp32: list[dict], bf16: list[dict], key: str) -> float:
    """Largest relative difference of ``key`` between two runs, step by step."""
    pairs = [(a[key], b[key]) for a, b in zip(fp32, bf16, strict=True)]
    return max(abs(b - a) / max(abs(a), 1e-12) for a, b in pairs)


def _peak_flops(device: str) -> tuple[float, str]:
    """The device's dense bf16 FLOP/s: from the table for known GPUs, else a measured matmul rate."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for fragment, flops in PEAK_BF16_FLOPS.items():
            if fragment in name:
                return flops, f"spec sheet ({fragment}, dense bf16)"
    n = 4096 if device == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - started), f"measured bf16 matmul {n}x{n}"


def generator_flops_per_token(export: Path, mean_length: float) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + causal attention (fwd + bwd) over both stacks:
    ``6 * layers * dim * mean_length`` (QK^T and AV, half the context on average, x3 for the backward)."""
    from models.generator import Generator

    model = Generator.from_pretrained(export)
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    layers = model.config.position_depth + model.config.content_depth
    return 6 * non_embedding + 6 * layers * model.config.dim * mean_length


def main(argv: list[str] | None = None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loss-rtol", type=float, default=0.05,
                        help="largest relative bf16-vs-fp32 loss difference allowed in the first steps")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--timeout", type=float, default=480.0, help="seconds per stage command")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu for the CPU rehearsal)")
    sizes = _sizes(args.device)
    devices = torch.cuda.device_count() if args.device == "cuda" else 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        figures = _check(work, sizes, devices, args)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    peak, source = _peak_flops(args.device)
    figures["generator"]["mfu"] = figures["generator"]["model_flops_per_s"] / peak
    figures["peak_flops"], figures["peak_flops_source"] = peak, source
    worst = max(figures["agreement"]["tokenizer_rel_diff"], figures["agreement"]["generator_rel_diff"])
    targets = {"bf16_vs_fp32_loss_rel_diff": target(worst, f"<= {args.loss_rtol}")}
    if args.device == "cuda":
        targets["seconds"] = target(figures["seconds"], "<= 480")
    return emit("gpu_check", figures, targets)


def _check(work: Path, sizes: dict, devices: int, args) -> dict:
    from data.demo_images import write_image_folder
    from data.shards import ShardOptions, shard_images

    size, steps, compare = sizes["image_size"], sizes["steps"], sizes["compare_steps"]
    folder = write_image_folder(work / "images", num_images=sizes["images"], size=size, num_classes=4)
    shards = work / "shards"
    shard_images([str(folder)], shards, ShardOptions(image_size=size, format="png", shard_size=64), progress=False)
    stage = ["-m", "pipeline.cli"]
    tokenizer_args = ["train-tokenizer", "--config", "tiny", f"data.shards={shards}", f"data.image_size={size}",
                      f"model.encoder.resolution={size}", f"model.decoder.resolution={size}",
                      f"data.batch_size={sizes['batch']}", "data.num_workers=1", "train.log_every=1",
                      "logging.tensorboard=false"]
    figures: dict = {"devices": devices, "image_size": size, "tokenizer": {}, "generator": {}, "agreement": {}}

    def tokenizer_run(name: str, processes: int, precision: str, max_steps: int, disc_start: int) -> Path:
        run_dir = work / name
        command = _launcher(processes, 2) + stage + tokenizer_args + [
            f"run.dir={run_dir}", f"train.precision={precision}", f"train.max_steps={max_steps}",
            f"train.ckpt_every={max_steps}", f"train.image_every={max_steps}", "train.zero_stage=2",
            f"loss.disc_start={disc_start}"]
        seconds = _run(command, work / f"{name}.log", args.timeout)
        summary = _summary(run_dir)
        figures["tokenizer"][name] = {
            "processes": processes, "steps": summary["steps"], "images_per_s": summary["images_per_s"],
            "launch_seconds": round(seconds, 1),
            "peak_memory_gib": max(r["peak_memory_bytes"] for r in summary["ranks"]) / 2 ** 30}
        return run_dir

    # The precision comparison: same seed, batches and schedule, before the GAN starts (the discriminator's
    # trajectory is chaotic: it would compare two GAN games, not two precisions).
    gan_start, no_gan = max(steps // 2, 1), compare + 1
    bf16_one, _, *fp32_runs = _in_turn(tokenizer_run, [
        ("tokenizer-bf16-1", 1, "bf16", steps, gan_start),
        (f"tokenizer-bf16-{devices}", devices, "bf16", steps, gan_start),
        ("tokenizer-fp32-compare", 1, "fp32", compare, no_gan),
        ("tokenizer-bf16-compare", 1, "bf16", compare, no_gan)], args.device)
    figures["agreement"]["tokenizer_rel_diff"] = _loss_agreement(
        _metrics(fp32_runs[0]), _metrics(fp32_runs[1]), "loss/total")
    figures["agreement"]["tokenizer_losses"] = [[m["loss/total"] for m in _metrics(r)] for r in fp32_runs]

    codes = work / "codes"
    seconds = _run([sys.executable, *stage, "tokenize", "--tokenizer", str(bf16_one / "export"), "--shards",
                    str(shards), "--output", str(codes), "--precision", "bf16", "--no-progress"],
                   work / "tokenize.log", args.timeout)
    manifest = json.loads((codes / "manifest.json").read_text())
    rows, tokens = manifest["totals"]["rows"], manifest["totals"]["codes"]
    figures["tokenize"] = {"images": rows, "launch_seconds": round(seconds, 1),
                           "images_per_s_with_start_up": rows / seconds}

    generator_args = ["train-generator", "--config", str(GENERATOR_CONFIG), f"data.codes={codes}",
                      f"data.max_tokens={sizes['max_tokens']}", "data.num_workers=0", "train.log_every=1",
                      "logging.tensorboard=false", "model.num_classes=4",
                      f"model.grain_shape=[{','.join(map(str, manifest['grain_shape']))}]"]

    def generator_run(name: str, processes: int, precision: str, max_steps: int, zero: int) -> Path:
        run_dir = work / name
        command = _launcher(processes, zero) + stage + generator_args + [
            f"run.dir={run_dir}", f"train.precision={precision}", f"train.max_steps={max_steps}",
            f"train.ckpt_every={max_steps}", f"train.zero_stage={zero}"]
        seconds = _run(command, work / f"{name}.log", args.timeout)
        rows = _metrics(run_dir)
        later = rows[len(rows) // 2:] or rows          # after the first steps' compilation / warm-up
        figures["generator"][name] = {
            "processes": processes, "zero_stage": zero, "launch_seconds": round(seconds, 1),
            "tokens_per_s": sum(r["tokens_per_s"] for r in later) / len(later),
            "peak_memory_gib": max(r.get("memory_gb", 0.0) for r in rows)}
        return run_dir

    generator, *compare_runs = _in_turn(generator_run, [
        ("generator-bf16-zero3", devices, "bf16", steps, 3), ("generator-fp32-compare", 1, "fp32", compare, 0),
        ("generator-bf16-compare", 1, "bf16", compare, 0)], args.device)
    figures["agreement"]["generator_rel_diff"] = _loss_agreement(
        _metrics(compare_runs[0]), _metrics(compare_runs[1]), "loss")
    figures["agreement"]["generator_losses"] = [[m["loss"] for m in _metrics(r)] for r in compare_runs]
    mean_length = tokens / max(rows, 1)     # code positions per image ~ tokens per sequence
    per_token = generator_flops_per_token(generator / "export", mean_length)
    tokens_per_s = figures["generator"]["generator-bf16-zero3"]["tokens_per_s"]
    figures["generator"].update({"flops_per_token": per_token, "mean_sequence_length": mean_length,
                                 "model_flops_per_s": per_token * tokens_per_s})

    samples = work / "samples"
    seconds = _run([sys.executable, *stage, "sample", "--generator", str(generator / "export"), "--tokenizer",
                    str(bf16_one / "export"), "--num-samples", str(sizes["samples"]), "--cfg", "2.0",
                    "--batch-size", str(sizes["samples"]), "--precision", "bf16", "--out", str(samples)],
                   work / "sample.log", args.timeout)
    figures["sample"] = {"images": sizes["samples"], "cfg": 2.0, "launch_seconds": round(seconds, 1),
                         "images_per_s_with_start_up": sizes["samples"] / seconds}
    return figures


if __name__ == "__main__":
    main()
