"""The Accelerator every training stage runs under: one code path from 1 CPU process to N GPU nodes.

Always DeepSpeed (ZeRO stage 0 is plain data parallel: the engine all-reduces gradients, nothing is
partitioned), so a stage loop never branches on the launch. Every training stage (pipeline.train_tokenizer,
pipeline.train_generator) is ``prepare(cfg, resume)`` (every check, before any process group) then
``train(cfg, prepared, resume)``, which runs::

    accelerator = build_accelerator(cfg.train, cfg.run.dir, grad_clip=cfg.optim.grad_clip,
                                    micro_batch_size=cfg.data.batch_size, seed=cfg.run.seed)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, warmup_cosine(optimizer, ...))
    ema = EMA(accelerator.unwrap_model(model), cfg.train.ema_decay)        # after prepare (ZeRO-3)
    ckpt = CheckpointManager(cfg.run.dir, accelerator, cfg.train.keep_last, prepared.identity, stage="tokenizer")
    step = start = ckpt.resume(resume, ema=ema, extra={"stream": stream})
    with stage_watchdog(accelerator, cfg.run.dir, cfg.train, "train-tokenizer") as watchdog:
        while step < cfg.train.max_steps:
            ...                                # one guarded optimizer step (pipeline.training), watchdog.beat(...)
            if not update.stepped:             # NaN/Inf: skipped on every rank
                continue
            scheduler.step(); step += 1; ema.update()       # once per optimizer step
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps:
                ckpt.save(step, ema=ema, extra={"stream": stream})
    return finish_run(accelerator, cfg.run.dir, step, start, summary, raw=ema is None)   # export, summary.json

Elastic resume: ``prepare`` reads the checkpoint's layout and takes ``train.grad_accum`` from
:func:`resume_layout` (the checkpoint's global batch, processes x grad_accum micro-batches per optimizer step,
kept on this run's world size); after ``ckpt.resume``, :func:`layout_change` is the event a changed layout
writes to ``logs/metrics.jsonl`` (``MetricsLog.event``) and the summary, and ``summary.json`` lists the run's
``layouts`` history (from the newest checkpoint's meta.json).

Launchers: plain ``python`` (this module fills RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for a world of 1),
``accelerate launch`` (its DeepSpeed config and ZeRO stage are respected when it passes one),
``torchrun`` and ``deepspeed --no_local_rank`` (the ZeRO stage then comes from ``train.zero_stage``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

# DeepSpeed picks its accelerator when first imported; without CUDA it must be told "cpu" before that.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from accelerate import Accelerator  # noqa: E402  (after DS_ACCELERATOR)
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration, set_seed  # noqa: E402

from data.world import resolve_world  # noqa: E402
from data.epoch import grad_accum_for  # noqa: E402
from pipeline.checkpoint import ResumeError, layout_of, newest_intact_checkpoint, read_meta  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.export import export_run  # noqa: E402
from pipeline.precision import check_launcher_precision, deepspeed_precision_config, resolve_precision  # noqa: E402
from pipeline.training import finished_run_summary, write_summary  # noqa: E402
from pipeline.watchdog import Watchdog, shared_token  # noqa: E402

__all__ = ["build_accelerator", "finish_training", "finish_run", "stage_watchdog", "launched_with_deepspeed_config",
           "free_port", "ResumeLayout", "resume_layout", "layout_change"]

log = logging.getLogger("varitok.runtime")

# Read before any Accelerator exists: Accelerate sets this variable itself once a DeepSpeed plugin is used.
_LAUNCHER_GAVE_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def free_port() -> int:
    """A TCP port that is free on this host right now (for MASTER_PORT / --main_process_port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_with_deepspeed_config() -> bool:
    """True when ``accelerate launch --use_deepspeed`` (or a DEEPSPEED accelerate config) started us."""
    return _LAUNCHER_GAVE_DEEPSPEED


def _forget_previous_accelerator() -> None:
    """Let a second run in the same process (tests, notebooks) build its own Accelerator.

    Accelerate keeps its state in process-wide singletons and refuses a second DeepSpeed plugin; the
    process group (PartialState) is kept.
    """
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


def _ensure_process_group_env() -> None:
    """Fill the process-group environment Accelerate reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR/PORT) that a launcher did not set, from :func:`data.world.resolve_world`.

    A plain ``python script.py`` run becomes a world of one. A hand-made launch (``RANK=1 WORLD_SIZE=2
    MASTER_ADDR=... varitok ...``), an ``srun`` step without torchrun or an ``mpirun`` keeps its placement.
    """
    if "LOCAL_RANK" in os.environ or "PMI_SIZE" in os.environ:    # a launcher (or MPICH) set everything
        return
    world = resolve_world()
    for name, value in (("RANK", world.rank), ("WORLD_SIZE", world.size), ("LOCAL_RANK", world.local_rank),
                        ("LOCAL_WORLD_SIZE", world.local_size)):
        os.environ.setdefault(name, str(value))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if world.size == 1:
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_PORT" not in os.environ:
        raise RuntimeError(f"this is process {world.rank} of {world.size} ({world.source}) but MASTER_PORT is not "
                           f"set: set MASTER_ADDR and MASTER_PORT (or use `varitok launch`, accelerate launch or "
                           f"torchrun)")


def _deepspeed_plugin(train: TrainConfig, grad_clip: float) -> DeepSpeedPlugin:
    """ZeRO stage, offload and config file from the launcher when it gave them, else from ``train``.

    Accumulation and clipping always come from the stage config (they fill "auto" in a launcher's JSON;
    a hard-coded value there wins, as Accelerate does).
    """
    shared = {"gradient_accumulation_steps": train.grad_accum, "gradient_clipping": float(grad_clip)}
    if launched_with_deepspeed_config():
        plugin = DeepSpeedPlugin(**shared)
    else:
        plugin = DeepSpeedPlugin(zero_stage=train.zero_stage, hf_ds_config="none", **shared)
    if plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
        # Accelerate drops a 0.0 clip (falsy) and later fills "auto" with 1.0: write the number itself.
        plugin.deepspeed_config["gradient_clipping"] = float(grad_clip)
    return plugin


def _set_precision(plugin: DeepSpeedPlugin, precision: str) -> None:
    """fp32 weights and optimizer state always; bf16 / fp16 as DeepSpeed's ``torch_autocast`` (pipeline.precision)."""
    config = plugin.deepspeed_config
    check_launcher_precision(config)
    for section in ("bf16", "fp16", "torch_autocast"):
        config.pop(section, None)
    config.update(deepspeed_precision_config(precision))


def _make_batch_sizes_consistent(plugin: DeepSpeedPlugin, micro_batch_size: Optional[int]) -> None:
    """Rule out DeepSpeed's ``train_batch_size == micro * accum * world`` assertion.

    The micro batch comes from the run (the data stream is not a DataLoader Accelerate could read);
    ``train_batch_size`` is left "auto" so Accelerate computes it from micro * accum * world.
    """
    config = plugin.deepspeed_config
    if micro_batch_size is not None:
        written = config.get("train_micro_batch_size_per_gpu", "auto")
        if written not in ("auto", micro_batch_size):
            warnings.warn(f"DeepSpeed config train_micro_batch_size_per_gpu={written} replaced by the run's "
                          f"micro batch {micro_batch_size}", stacklevel=3)
        config["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
    config["train_batch_size"] = "auto"
    # Consolidated exports under ZeRO-3 (accelerator.get_state_dict) need the gathered save enabled.
    zero = config.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def _trackers(log_with: Iterable[str]) -> list[str]:
    """Requested trackers that are importable; wandb only when installed (a warning otherwise)."""
    chosen = []
    for name in log_with:
        try:
            __import__(name)
        except ImportError:
            warnings.warn(f"logging to {name} requested but it is not installed; skipping it (pip install {name})",
                          stacklevel=3)
            continue
        chosen.append(name)
    return chosen


def build_accelerator(train: TrainConfig, run_dir: str | os.PathLike, *, grad_clip: float = 0.0,
                      micro_batch_size: Optional[int] = None, seed: int = 0,
                      log_with: Iterable[str] = ("tensorboard",), project_name: str = "varitok",
                      tracker_config: Optional[dict] = None) -> Accelerator:
    """Build the Accelerator for a training stage (DeepSpeed always, ZeRO stage from launcher or config).

    ``micro_batch_size`` is the per-rank batch of one forward (images or sequences); ``grad_clip`` is the
    global gradient norm clip (0 disables). CPU: gloo, fp32, DS_ACCELERATOR=cpu. GPU: NCCL, TF32, bf16
    autocast by default (``train.precision``; fp32 weights and optimizer state in every precision, see
    pipeline.precision). Seeds ``seed + process_index`` on every rank (DeepSpeed broadcasts rank 0's initial
    weights, so models still start identical). Trackers (``log_with``: "tensorboard", "wandb") log under
    ``run_dir/logs`` on rank 0; ``tracker_config`` is a flat dict of scalars recorded as hyperparameters.
    """
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    _ensure_process_group_env()
    _forget_previous_accelerator()
    plugin = _deepspeed_plugin(train, grad_clip)
    _make_batch_sizes_consistent(plugin, micro_batch_size)
    precision = resolve_precision(train.precision, "cuda" if cuda else "cpu")
    _set_precision(plugin, precision)
    handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
    trackers = _trackers(log_with)
    run_dir = Path(run_dir)
    accelerator = Accelerator(
        # Accelerate's bf16/fp16 would switch DeepSpeed to bf16/fp16 weights: precision is _set_precision's.
        mixed_precision="no",
        deepspeed_plugin=plugin,
        gradient_accumulation_steps=train.grad_accum,
        # The schedule counts optimizer steps: the loop calls scheduler.step() once per optimizer step
        # (Accelerate's default would step it once per process per step).
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    set_seed(seed, device_specific=True)
    if trackers:
        accelerator.init_trackers(project_name, config=tracker_config)
    return accelerator


@dataclasses.dataclass(frozen=True)
class ResumeLayout:
    """The launch layout of a run: ``grad_accum`` for ``world_size`` processes, and the checkpoint's layout
    (``saved``: {world_size, grad_accum, num_workers}, None for a fresh run)."""

    world_size: int
    grad_accum: int
    saved: Optional[dict[str, Any]] = None
    new_global_batch: bool = False     # allow_new_global_batch was needed: K differs from the checkpoint's

    @property
    def step_entries(self) -> int:
        """K: global micro-batches per optimizer step (world_size x grad_accum)."""
        return self.world_size * self.grad_accum


def resume_layout(meta: Optional[dict[str, Any]], world_size: int, train: TrainConfig) -> ResumeLayout:
    """The layout of a run resuming the checkpoint of ``meta`` (None: a fresh run, ``train.grad_accum``) on
    ``world_size`` processes: grad_accum = K / world_size with the checkpoint's K = processes x grad_accum
    (data.epoch.grad_accum_for). Raises ResumeError (a ConfigError) listing the world sizes that keep K when
    ``world_size`` does not divide it, unless ``train.allow_new_global_batch``. Call before the accelerator
    exists; a configured ``train.grad_accum`` other than the result is replaced (with a warning)."""
    saved = None if meta is None else layout_of(meta)
    if saved is None or saved["grad_accum"] is None:   # a fresh run, or a checkpoint that did not record it
        return ResumeLayout(world_size, train.grad_accum, saved)
    step_entries = saved["world_size"] * saved["grad_accum"]
    try:
        grad_accum = grad_accum_for(step_entries, world_size, train.allow_new_global_batch)
    except ValueError as exc:
        raise ResumeError(f"the checkpoint's layout ({saved['world_size']} processes x grad_accum "
                          f"{saved['grad_accum']}): {exc}") from None
    changed = grad_accum * world_size != step_entries
    if grad_accum != train.grad_accum:
        log.warning("train.grad_accum=%d replaced by %d: the checkpoint ran %d processes x grad_accum %s, this run "
                    "has %d processes%s", train.grad_accum, grad_accum, saved["world_size"], saved["grad_accum"],
                    world_size, " (a new global batch: train.allow_new_global_batch)" if changed else "")
    return ResumeLayout(world_size, grad_accum, saved, changed)


def layout_change(saved: Optional[dict[str, Any]], now: dict[str, Any], step: int,
                  micro_batch: str) -> Optional[dict[str, Any]]:
    """``{"event": "layout", "step", "from", "to", "global_batch": {"from", "to", "unit"}}`` when a run resumed
    at ``step`` with another layout (``now``: CheckpointManager.layout) than its checkpoint's (``saved``:
    ``ckpt.resumed_layout``); None otherwise. The global batch is counted in micro-batches of ``micro_batch``
    (e.g. "8 images", "512 tokens") per optimizer step."""
    if saved is None or saved == now:
        return None
    before = None if saved.get("grad_accum") is None else saved["world_size"] * saved["grad_accum"]
    after = now["world_size"] * now["grad_accum"]
    return {"event": "layout", "step": step, "from": dict(saved), "to": dict(now),
            "global_batch": {"from": before, "to": after, "unit": f"micro-batches of {micro_batch}",
                             "changed": before is not None and before != after}}


def _layout_history(run_dir: Path) -> Optional[list[dict[str, Any]]]:
    newest = newest_intact_checkpoint(run_dir)
    return None if newest is None else read_meta(newest).get("layouts")


def finish_training(accelerator: Accelerator) -> None:
    """End of a stage: flush and close the trackers and wait for every rank.

    Use instead of ``accelerator.end_training()``, which also destroys the process group: DeepSpeed caches
    its groups, so a second run in the same process (tests, notebooks) would fail. Process exit frees it.
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.wait_for_everyone()


def stage_watchdog(accelerator: Accelerator, run_dir: str | os.PathLike, train: TrainConfig, name: str) -> Watchdog:
    """The watchdog of a stage loop (``with ... as watchdog``; ``watchdog.beat(...)`` once per optimizer step): a
    rank that makes no step for ``train.watchdog_s`` (a hung collective, a stuck read) makes every rank exit
    with an error (code 124); 0 disables it."""
    return Watchdog(run_dir, train.watchdog_s, rank=accelerator.process_index, world_size=accelerator.num_processes,
                    token=shared_token(), name=name)


def finish_run(accelerator: Accelerator, run_dir: str | os.PathLike, step: int, start_step: int,
               summary: dict[str, Any], *, raw: bool) -> dict[str, Any]:
    """End of a stage run, on every rank: rank 0 exports the newest checkpoint to ``RUN/export`` (its raw weights
    when ``raw``, else its EMA weights) and writes ``RUN/summary.json`` (``summary`` plus ``export`` and
    ``export_weights``); then the trackers are flushed and every rank waits (:func:`finish_training`).

    A call that trained nothing on an already exported run keeps its export and summary untouched (stage 2 keys
    code files on the export's weights hash) and returns the saved summary. Returns the summary on rank 0,
    ``{}`` on the other ranks. ``layouts`` in the summary: the run's launch layouts, ``[{step, world_size,
    grad_accum, num_workers}]`` from the step each one started at (the newest checkpoint's meta.json).
    """
    run_dir = Path(run_dir)
    result: dict[str, Any] = {}
    if accelerator.is_main_process:
        result = finished_run_summary(run_dir, step, start_step)
        if result is None:
            export_dir = export_run(run_dir, run_dir / "export", raw=raw)
            result = {**summary, "export": str(export_dir), "export_weights": "raw" if raw else "ema",
                      "layouts": _layout_history(run_dir)}
            write_summary(run_dir, result)
    accelerator.wait_for_everyone()
    finish_training(accelerator)
    return result
