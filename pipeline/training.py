"""Pieces every training stage loop shares: the NaN/Inf guard, metric windows, logs, memory, command line.

The guarded update, inside a stage loop (one optimizer step of ``train.grad_accum`` micro-batches)::

    update = GuardedStep(accelerator, model, optimizer, cfg.train.grad_accum)
    for _ in range(cfg.train.grad_accum):
        with accelerator.accumulate(model):
            loss, logs = model(next(batches))
            if update.backward(loss):            # one all-reduced "finite" flag per micro-batch
                window.add(logs)
    guard.record(update.bad, step + 1)           # raises after train.max_bad_steps bad steps in a row
    if not update.stepped:                       # every micro-batch was NaN/Inf: no optimizer step at all
        continue
    scheduler.step(); step += 1
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["NonFiniteGuard", "GuardedStep", "all_ranks_finite", "zero_gradient", "MetricWindow", "MetricsLog",
           "tracker_names", "peak_memory_bytes", "state_digest", "write_summary", "add_stage_arguments"]


# ------------------------------------------------------------------------------------------ NaN / Inf guard
class NonFiniteGuard:
    """Counts optimizer steps whose loss was NaN/Inf on some rank; raises after ``limit`` in a row."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, bad: bool, step: int) -> None:
        if not bad:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"loss was NaN/Inf for {self.in_a_row} steps in a row (at step {step}; train.max_bad_steps="
                f"{self.limit}): lower optim.lr, check the data, or raise train.max_bad_steps")


def all_ranks_finite(accelerator, loss: torch.Tensor) -> bool:
    """True when the scalar ``loss`` is finite on every rank (one all-reduce of one float: a host sync)."""
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    return int(accelerator.reduce(flag, reduction="sum").item()) == accelerator.num_processes


def zero_gradient(model: torch.nn.Module) -> torch.Tensor:
    """A finite scalar whose gradient is exactly 0 for every trainable parameter (stands in for a dropped
    micro-batch at the accumulation boundary, where DeepSpeed reduces and steps inside ``backward``)."""
    return torch.stack([p.sum() for p in model.parameters() if p.requires_grad]).sum() * 0.0


class GuardedStep:
    """One optimizer step over ``grad_accum`` micro-batches; a micro-batch whose loss is NaN/Inf on ANY rank
    gets no backward on EVERY rank, so no rank's weights, gradients or optimizer state see it.

    ``stepped``: some micro-batch contributed a gradient (the optimizer stepped at the boundary);
    ``bad``: some micro-batch was dropped. When every micro-batch is dropped nothing reaches DeepSpeed:
    no backward, no reduction, no optimizer step (ZeRO-0..3). Under ZeRO-3 a dropped LAST micro-batch after
    kept ones stops the run instead (see ``backward``).
    """

    def __init__(self, accelerator, model, optimizer, grad_accum: int) -> None:
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.remaining = grad_accum
        self.stepped = False
        self.bad = False

    def backward(self, loss: torch.Tensor) -> bool:
        """Inside ``accelerator.accumulate(model)``, once per micro-batch; returns whether ``loss`` was kept."""
        self.remaining -= 1
        finite = all_ranks_finite(self.accelerator, loss)
        if finite:
            self.accelerator.backward(loss)
            self.stepped = True
        elif self.stepped and self.remaining == 0:
            # Earlier micro-batches hold gradients: the boundary backward must still run to apply them.
            if _zero_stage(self.accelerator) == 3:
                # zero_gradient() reads parameters outside a forward, where ZeRO-3 holds empty placeholders.
                raise FloatingPointError("the last micro-batch of an accumulation window had a NaN/Inf loss "
                                         "under ZeRO-3, where it cannot be dropped after kept ones: lower "
                                         "optim.lr or check the data, or train with train.grad_accum=1 or ZeRO-2")
            self.accelerator.backward(zero_gradient(self.model))
        self.bad |= not finite
        self.optimizer.step()
        self.optimizer.zero_grad()
        return finite


def _zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config["zero_optimization"]["stage"]) if plugin is not None else 0


# ------------------------------------------------------------------------------------------ metrics
class MetricWindow:
    """Running sums between log steps, kept on the device (no host sync until ``reduce``).

    ``add``: per-micro-batch scalars, reported as means over micro-batches and ranks;
    ``count``: per-rank amounts (images, tokens), reported as sums over ranks.
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.totals: dict[str, float] = {}
        self.started = time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for name, value in logs.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1

    def count(self, **amounts: float) -> None:
        for name, amount in amounts.items():
            self.totals[name] = self.totals.get(name, 0.0) + amount

    def reduce(self, accelerator) -> tuple[dict[str, float], dict[str, float], float]:
        """(means, totals, seconds since the window opened); one all-reduce, every rank must call it;
        the window starts afresh."""
        names, totals = sorted(self.sums), sorted(self.totals)
        seconds = max(time.perf_counter() - self.started, 1e-9)
        device = accelerator.device
        means_here = [(self.sums[n] / self.counts[n]).to(device) for n in names]
        amounts = [torch.tensor(self.totals[n], device=device) for n in totals]
        self.restart()
        if not names and not totals:
            return {}, {}, seconds
        summed = accelerator.reduce(torch.stack(means_here + amounts), reduction="sum")
        means = (summed[:len(names)] / accelerator.num_processes).tolist()
        return dict(zip(names, means)), dict(zip(totals, summed[len(names):].tolist())), seconds


class MetricsLog:
    """Rank 0 appends one JSON line per log step to ``RUN/logs/metrics.jsonl`` and mirrors it to the trackers."""

    def __init__(self, accelerator, run_dir: Path) -> None:
        self.accelerator = accelerator
        self.path = Path(run_dir) / "logs" / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.accelerator.log(values, step=step)


def tracker_names(logging) -> list[str]:
    """The Accelerate trackers a ``LoggingConfig`` asks for."""
    return [name for name, wanted in (("tensorboard", logging.tensorboard), ("wandb", logging.wandb)) if wanted]


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak GPU memory allocated (CUDA device) or peak resident set size (CPU), bytes."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux reports KiB


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor of a state dict (name + fp32 bytes): equal digests = identical weights."""
    blob = hashlib.sha256()
    for name in sorted(state):
        blob.update(name.encode())
        blob.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return blob.hexdigest()


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def finished_run_summary(run_dir: Path, step: int, start_step: int) -> Optional[dict[str, Any]]:
    """The saved summary when this call trained nothing on an already exported run, else None.

    Such a re-run must keep its export untouched: stage 2 keys code files on the export's weights hash.
    """
    run_dir = Path(run_dir)
    if step == start_step and (run_dir / "export").is_dir() and (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    return None


# ------------------------------------------------------------------------------------------ command line
def add_stage_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """``--config``, ``--resume`` and dotlist overrides, as every training stage takes them."""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--resume", default="auto",
                        help="auto: newest complete checkpoint of run.dir (if any); PATH: that checkpoint; none")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="config overrides (dotlist), e.g. optim.lr=1e-4")
