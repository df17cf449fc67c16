"""Pieces every training stage loop shares: the NaN/Inf guard, metric windows, logs, memory, command line.

One optimizer step of ``train.grad_accum`` micro-batches, inside a stage loop (the loop around it: pipeline.runtime)::

    update = GuardedStep(accelerator, model, cfg.train.grad_accum)
    for _ in range(cfg.train.grad_accum):
        with accelerator.accumulate(model):
            loss, logs = model(next(batches))
            window.add(logs, keep=update.backward_and_step(loss))   # the optimizer steps at the last micro-batch
    guard.record(update.bad, step + 1)           # raises after train.max_bad_steps bad steps in a row
    watchdog.beat(f"optimizer step {step + 1}")
    if not update.stepped:                       # NaN/Inf: the optimizer step was skipped on every rank
        continue
    scheduler.step(); step += 1; ema.update()
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

from data.files import atomic_write

__all__ = ["NonFiniteGuard", "GuardedStep", "zero_stage", "to_device", "MetricWindow", "MetricsLog", "tracker_names",
           "peak_memory_bytes", "state_digest", "write_summary", "add_stage_arguments"]


# ------------------------------------------------------------------------------------------ NaN / Inf guard
class NonFiniteGuard:
    """Counts bad optimizer steps (a NaN/Inf loss or gradient on some rank); raises after ``limit`` in a row."""

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
                f"loss or gradient was NaN/Inf for {self.in_a_row} steps in a row (at step {step}; train.max_bad_steps="
                f"{self.limit}): lower optim.lr, check the data, or raise train.max_bad_steps")


class GuardedStep:
    """One optimizer step over ``grad_accum`` micro-batches with ONE host synchronisation, skipped on every
    rank when a loss or the gradient is NaN/Inf on any rank.

    Every micro-batch is back-propagated; at the last one the engine reduces the gradients and steps the
    optimizer (or skips the step), so :meth:`backward_and_step` is the whole update: there is no separate
    ``optimizer.step()``. Whether each loss is finite stays on the device; at the last micro-batch one all-reduce
    gives the step's count of NaN/Inf losses, read on the host once. ZeRO-1/2/3 optimizers skip a non-finite
    gradient themselves and the count is read after the backward; under ZeRO-0 the plain optimizer reads it
    inside its ``step`` (with its own gradient check where it has one, :func:`_skip_flagged_steps`) and skips.
    No rank's weights or optimizer state see a bad step. After the last :meth:`backward_and_step`: ``stepped``
    (the optimizer changed the weights) and ``bad`` (a NaN/Inf loss, or a skipped step).
    """

    def __init__(self, accelerator, model, grad_accum: int) -> None:
        self.accelerator, self.engine = accelerator, model
        self.remaining = grad_accum
        self.nonfinite = torch.zeros((), device=accelerator.device)
        self.stepped = False
        self.bad = False
        self.flag_skips = zero_stage(accelerator) == 0   # ZeRO-1/2/3 optimizers skip non-finite gradients
        if self.flag_skips:
            _skip_flagged_steps(model.optimizer)

    def backward_and_step(self, loss: torch.Tensor) -> torch.Tensor:
        """Inside ``accelerator.accumulate(model)``, once per micro-batch: back-propagate ``loss``; at the last
        micro-batch the optimizer steps (skipped on every rank when a loss or gradient was NaN/Inf). Returns
        whether ``loss`` is finite (a device bool, for :meth:`MetricWindow.add`)."""
        finite = torch.isfinite(loss.detach())
        self.nonfinite = self.nonfinite + (~finite).float()
        self.remaining -= 1
        if self.remaining == 0:
            count = self.accelerator.reduce(self.nonfinite.reshape(1), reduction="sum")   # a collective, no read
            if self.flag_skips:
                self.engine.optimizer.nonfinite_losses = count
        self.accelerator.backward(loss)
        if self.remaining == 0:
            self.stepped = bool(self.engine.was_step_applied())
            # ZeRO-0: the optimizer skipped exactly when a loss or gradient was bad (it read the count).
            self.bad = not self.stepped if self.flag_skips else int(count.item()) > 0 or not self.stepped
        return finite


def _skip_flagged_steps(optimizer: torch.optim.Optimizer) -> None:
    """Make a plain torch optimizer skip ``step()`` when ``optimizer.nonfinite_losses`` (a device count set by
    :class:`GuardedStep`) is not 0, reporting it through the ``overflow`` attribute DeepSpeed's engine reads (it then
    counts a skipped step and zeroes the gradients). An optimizer with ``folds_nonfinite_losses`` reads the count
    itself, together with its own gradient check (one host read). Installed once."""
    if getattr(optimizer, "varitok_guarded", False):
        return
    step = optimizer.step
    optimizer.varitok_guarded = True
    optimizer.nonfinite_losses = None

    def guarded_step(*args, **kwargs):
        if getattr(optimizer, "folds_nonfinite_losses", False):
            return step(*args, **kwargs)
        count = optimizer.nonfinite_losses
        optimizer.overflow = count is not None and bool(count.reshape(()) > 0)
        return None if optimizer.overflow else step(*args, **kwargs)

    optimizer.step = guarded_step


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage the accelerator runs (0 without a DeepSpeed plugin)."""
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config["zero_optimization"]["stage"]) if plugin is not None else 0


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> ``device`` copy that does not block the host (through pinned memory when ``device`` is a GPU)."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------ metrics
class MetricWindow:
    """Running sums between log steps, kept on the device (no host sync until ``reduce``).

    ``add``: per-micro-batch scalars, reported as means over the kept micro-batches and over ranks;
    ``count``: per-rank amounts (images, tokens), reported as sums over ranks.
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.totals: dict[str, float] = {}
        self.started = time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor], keep: Optional[torch.Tensor] = None) -> None:
        """``keep``: a device bool (e.g. :meth:`GuardedStep.backward_and_step`'s); a micro-batch with ``keep`` false
        adds nothing (its NaN/Inf values are masked on the device, not read back)."""
        for name, value in logs.items():
            value = value.detach().float()
            weight = torch.ones_like(value) if keep is None else keep.to(value.device, torch.float32)
            value = torch.where(weight > 0, value, torch.zeros_like(value))
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts[name] + weight if name in self.counts else weight

    def count(self, **amounts: float) -> None:
        for name, amount in amounts.items():
            self.totals[name] = self.totals.get(name, 0.0) + amount

    def reduce(self, accelerator) -> tuple[dict[str, float], dict[str, float], float]:
        """(means, totals, seconds since the window opened); one all-reduce, every rank must call it;
        the window starts afresh. A mean with no kept micro-batch in the window is NaN."""
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
    """Rank 0 appends one JSON line per log step to ``RUN/logs/metrics.jsonl`` and mirrors it to the trackers;
    events (a line with an ``"event"`` key and no metrics, e.g. a resume's layout change) go to the file only."""

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

    def event(self, event: dict[str, Any]) -> None:
        """Append ``{"time": ..., **event}`` (``event`` holds "event" and "step")."""
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"time": time.time(), **event}) + "\n")


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
    atomic_write(Path(run_dir) / "summary.json", json.dumps(summary, indent=1) + "\n")


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
