"""Factorized quantizer lookup + losses, forward + backward: chunked (ours) vs the plain dense reference.

Workload (issue 3): N tokens x K sub-codebooks of V codes x dim D (default 8192 x 3 x 16384 x 8), with
codebook + commitment + entropy regularizer + disentanglement losses, then backward.
- ``chunked``: :func:`models.tokenizer.quantizer.quantize_tokens` (fused chunked lookup + entropy).
- ``plain``: the reference code's approach: dense N x V distance matrix, argmin, dense softmax entropy
  (LlamaGen/FQGAN ``compute_entropy_loss``), autograd through all of it.
Each variant runs in a fresh subprocess; peak memory = the process's peak RSS (VmHWM, reset after setup)
minus its RSS before the first run, i.e. what the computation itself adds. Time: median wall-clock AND
median process CPU time (all threads) per step; the speedup target uses CPU time, because on a shared,
oversubscribed machine wall-clock mostly measures the scheduler (both ratios are reported).

    python -m benchmarks.quantizer [--tokens 8192 --codes 16384 --dim 8 --k 3 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, emit, median_time, target  # noqa: E402  (first: it sets the process env before torch loads)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def plain_step(raw_z, codebooks, weights, temperature, beta, entropy_weight, dis_weight):
    import torch
    import torch.nn.functional as F

    total, qs = 0.0, []
    for z, e in zip(raw_z, codebooks):
        z, e = F.normalize(z, dim=-1), F.normalize(e, dim=-1)
        d = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z @ e.T
        idx = d.argmin(1)
        q = e[idx]
        total = total + ((q - z.detach()) ** 2).mean() + beta * ((q.detach() - z) ** 2).mean()
        affinity = -d / temperature
        probs = affinity.softmax(-1)
        log_probs = (affinity + 1e-5).log_softmax(-1)
        avg_probs = probs.mean(0)
        avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
        sample_entropy = -(probs * log_probs).sum(-1).mean()
        total = total + entropy_weight * (sample_entropy - avg_entropy)
        qs.append(z + (q - z).detach())
    pairs = [(a, b) for i, a in enumerate(qs) for b in qs[i + 1:]]
    return total + dis_weight * sum(((a * b).sum(-1) ** 2).mean() for a, b in pairs) / len(pairs)


def chunked_step(raw_z, codebooks, weights, config):
    from models.tokenizer.quantizer import disentanglement_loss, quantize_tokens

    total, qs = 0.0, []
    for z, e in zip(raw_z, codebooks):
        q, _, terms = quantize_tokens(z, e, weights, config, training=True)
        total = total + sum(terms.values())
        qs.append(q)
    return total + config.disentangle_weight * disentanglement_loss(qs, weights)


def run_variant(args) -> dict:
    """In this (fresh) process: time fwd+bwd of one variant and measure the peak memory it adds."""
    import torch

    from models.tokenizer.quantizer import QuantizerConfig, SubCodebookConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = QuantizerConfig(codebooks=[SubCodebookConfig(size=args.codes, dim=args.dim)] * args.k,
                             chunk_size=args.chunk)
    raw_z = [torch.randn(args.tokens, args.dim, requires_grad=True) for _ in range(args.k)]
    codebooks = [torch.randn(args.codes, args.dim, requires_grad=True) for _ in range(args.k)]
    weights = torch.ones(args.tokens)

    def step():
        if args.variant == "plain":
            loss = plain_step(raw_z, codebooks, weights, config.entropy_temperature, config.beta,
                              config.entropy_weight, config.disentangle_weight)
        else:
            loss = chunked_step(raw_z, codebooks, weights, config)
        loss.backward()
        for t in raw_z + codebooks:
            t.grad = None
        return float(loss)

    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")      # reset the peak-RSS counter (VmHWM)
    loss = step()
    peak_mib = (_rss_kib("VmHWM") - before) / 1024
    cpu_times = []

    def timed_step():
        start = time.process_time()
        step()
        cpu_times.append(time.process_time() - start)

    seconds = median_time(timed_step, repeats=args.repeats, warmup=0)
    return {"seconds": seconds, "cpu_seconds": statistics.median(cpu_times), "peak_mib": peak_mib, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--codes", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=256, help="tokens per chunk for the chunked variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("plain", "chunked"):
        cmd = [sys.executable, "-m", "benchmarks.quantizer", "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("tokens", "codes", "dim", "k", "chunk", "repeats", "threads")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, chunked = results["plain"], results["chunked"]
    speedup = plain["cpu_seconds"] / chunked["cpu_seconds"]
    memory_ratio = chunked["peak_mib"] / plain["peak_mib"]
    figures = {
        "workload": {"tokens": args.tokens, "codes": args.codes, "dim": args.dim, "k": args.k, "chunk": args.chunk},
        "plain_wall_s": round(plain["seconds"], 4), "chunked_wall_s": round(chunked["seconds"], 4),
        "plain_cpu_s": round(plain["cpu_seconds"], 4), "chunked_cpu_s": round(chunked["cpu_seconds"], 4),
        "wall_speedup": round(plain["seconds"] / chunked["seconds"], 3),
        "plain_peak_mib": round(plain["peak_mib"], 1), "chunked_peak_mib": round(chunked["peak_mib"], 1),
        "cpu_speedup": round(speedup, 3), "peak_memory_ratio": round(memory_ratio, 4),
        "loss_plain": plain["loss"], "loss_chunked": chunked["loss"],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    emit("quantizer", figures, {"cpu_speedup": target(speedup, ">= 2.0"),
                                "peak_memory_ratio": target(memory_ratio, "<= 0.25")})


if __name__ == "__main__":
    main()
