"""Stage 1: train the DQ x FQ VQ-GAN tokenizer (and its PatchGAN discriminator) under Accelerate + DeepSpeed.

    varitok train-tokenizer --config configs/tokenizer/tiny.yaml [--resume auto|PATH|none] [key.path=value ...]

Runs as one plain process or under ``accelerate launch`` / ``torchrun`` / ``deepspeed`` on any number of
processes and machines (``varitok launch tokenizer --nproc N --zero Z -- --config ...`` builds the command).
ZeRO-0 (data parallel), ZeRO-1 and ZeRO-2 are supported; ZeRO-3 is refused (the discriminator's detached
functional call needs whole parameters, see docs/design.md).

Outputs under ``run.dir``: ``config.yaml`` (resolved), ``checkpoints/step-N/`` (every ``train.ckpt_every``
steps and at the end, last ``train.keep_last`` kept), ``logs/metrics.jsonl`` (one JSON per log step) and
TensorBoard events, ``images/step-NNNNNNN.png`` (input | reconstruction | granularity overlay),
``summary.json``, and ``export/`` (``Tokenizer.from_pretrained``; EMA weights when ``train.ema_decay > 0``).

Every bad input (config, shards, teacher / LPIPS weights, a checkpoint of another config, a number of processes
that cannot keep the checkpoint's global batch or serve its canonical units) is reported before the first step.
A run resumes on another number of processes or data workers (docs/runtime.md, "Elastic resume").
Per optimizer step, the only host synchronisation is one all-reduced count of NaN/Inf losses
(pipeline.training.GuardedStep: such a step is skipped on every rank); metrics are reduced across ranks at log
steps only. Precision: train.precision (auto = bf16 autocast on a GPU, fp32 weights and optimizer
state always; see pipeline.precision).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from data.epoch import check_layout
from data.stream import ShardStream
from data.transforms import to_unit_range
from data.world import resolve_world
from models.config import ConfigError
from models.tokenizer import Tokenizer, build_teachers
from models.tokenizer.losses import TokenizerGANLoss
from models.tokenizer.training import GroupClippedAdamW, TokenizerTrainingModule
from pipeline.calibrate import inline_entropy_table
from pipeline.checkpoint import CheckpointManager, check_compatible, extra_state_path, find_checkpoint, read_meta
from pipeline.config import load_config, save_resolved_config
from pipeline.ema import EMA
from pipeline.runtime import ResumeLayout, build_accelerator, finish_run, layout_change, resume_layout, stage_watchdog
from pipeline.schedule import warmup_cosine
from pipeline.stages import TokenizerDataConfig, TokenizerStageConfig
from pipeline.training import (GuardedStep, MetricsLog, MetricWindow, NonFiniteGuard, add_stage_arguments,
                               peak_memory_bytes, state_digest, to_device, tracker_names, zero_stage)
from pipeline.visual import grain_overlay, image_grid, save_png

__all__ = ["TokenizerDataConfig", "TokenizerStageConfig", "Prepared", "prepare", "train", "add_arguments", "run",
           "canonical_units"]

GRID_IMAGES = 4


# ------------------------------------------------------------------------------------------ helpers
def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer state tensors this rank holds (ZeRO partitions them), wrappers unwrapped."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return sum(t.numel() * t.element_size() for state in inner.state.values()
               for t in state.values() if torch.is_tensor(t) and t.dim() > 0)


def _endless(stream) -> Iterator[dict]:
    while True:
        yield from stream


def _flat_scalars(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": scalar} (lists as strings), the form TensorBoard hparams accept."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


# ------------------------------------------------------------------------------------------ preflight
@dataclasses.dataclass
class Prepared:
    """Everything built (and validated) before the first collective."""

    module: TokenizerTrainingModule
    teachers: dict
    stream: Any
    identity: dict
    layout: ResumeLayout    # this run's processes x grad_accum (the checkpoint's global batch on resume)


def _saved_stream_state(checkpoint: Path) -> dict[str, Any]:
    """Rank 0's stream state in ``checkpoint`` (its canonical units and global batch are every rank's)."""
    path = extra_state_path(checkpoint, 0)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["stream"]
    except (OSError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"cannot read the data stream state of {checkpoint} ({path}: {exc}); resume from another "
                          f"checkpoint (--resume PATH) or start a new run.dir") from None


def canonical_units(data: TokenizerDataConfig, saved_stream: Optional[dict[str, Any]], world_size: int) -> int:
    """The run's canonical unit count C: the checkpoint's (a run keeps its data order), else
    ``data.canonical_units``, else processes x max(1, data.num_workers). Raises ConfigError when this layout
    cannot serve C (processes x workers must divide it) or the config asks for another C than the checkpoint's."""
    workers = max(1, data.num_workers)
    saved = None if saved_stream is None else saved_stream.get("canonical_units")
    if saved is not None and data.canonical_units not in (None, saved):
        raise ConfigError(f"data.canonical_units={data.canonical_units} but the checkpoint's data order has {saved} "
                          f"canonical units, which a run keeps: set data.canonical_units={saved} (or null), or "
                          f"start a new run.dir")
    units = saved or data.canonical_units or world_size * workers
    try:
        check_layout(units, world_size, workers)
    except ValueError as exc:
        source = "the checkpoint's" if saved else f"data.canonical_units={units}:" if data.canonical_units else ""
        raise ConfigError(f"{source} {exc} (this run: {world_size} processes, data.num_workers="
                          f"{data.num_workers})".strip()) from None
    return units


def prepare(cfg: TokenizerStageConfig, resume: Optional[str]) -> Prepared:
    """Validate the inputs, choose the launch layout, and build the models and the stream, raising ConfigError
    on anything bad.

    Runs on every rank before any process group exists, so a bad input fails fast on every rank alike. On
    resume the checkpoint's global batch (processes x grad_accum) and canonical units are kept:
    ``cfg.train.grad_accum`` and ``cfg.data.canonical_units`` are set to this run's values (pipeline.runtime
    ``resume_layout``), or a ConfigError says which numbers of processes work.
    """
    if not str(cfg.data.shards).strip():
        raise ConfigError("data.shards is empty: set data.shards=DIR (or a brace pattern / comma list of .tar "
                          "shards written by `varitok shard`)")
    try:
        # The run's resolved config (and so its exports) carries an entropy table's quantiles inline.
        cfg.model.router = inline_entropy_table(cfg.model.router, region_size=max(cfg.model.factors))
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    identity = cfg.resume_identity()
    world_size = resolve_world().size  # the launcher's WORLD_SIZE (1 when absent)
    checkpoint = find_checkpoint(cfg.run.dir, resume)
    meta = saved_stream = None
    if checkpoint is not None:
        meta = read_meta(checkpoint)
        # The ZeRO stage is only known once the accelerator exists: CheckpointManager.resume checks it.
        check_compatible(meta, world_size, meta["zero_stage"], identity, identity_defaults=cfg.identity_defaults())
        saved_stream = _saved_stream_state(checkpoint)
    layout = resume_layout(meta, world_size, cfg.train)
    cfg.train.grad_accum = layout.grad_accum
    cfg.data.canonical_units = canonical_units(cfg.data, saved_stream, world_size)
    try:
        # Rank and world size come from the launcher's environment (RANK / WORLD_SIZE; 0 / 1 when absent).
        stream = ShardStream(cfg.data.shards, cfg.data.batch_size, cfg.data.image_size,
                             num_workers=cfg.data.num_workers, seed=cfg.run.seed,
                             shuffle_buffer=cfg.data.shuffle_buffer, dtype=torch.uint8,
                             canonical_units=cfg.data.canonical_units, grad_accum=layout.grad_accum)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data.shards={cfg.data.shards!r}: {exc}") from None
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    try:
        tokenizer = Tokenizer(cfg.model)
        teachers = build_teachers(cfg.model)
        gan_loss = TokenizerGANLoss(cfg.loss)
    except FileNotFoundError as exc:       # teacher / LPIPS weights; the message names the config key
        raise ConfigError(str(exc)) from None
    tokenizer.attach_teachers(teachers)
    return Prepared(TokenizerTrainingModule(tokenizer, gan_loss), teachers, stream, identity, layout)


class _StreamResume:
    """The stream as a checkpoint ``extra`` object, loading with ``train.allow_new_global_batch``."""

    def __init__(self, stream: ShardStream, allow_new_global_batch: bool):
        self.stream, self.allow_new_global_batch = stream, allow_new_global_batch

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state) -> None:
        self.stream.load_state_dict(state, allow_new_global_batch=self.allow_new_global_batch)


# ------------------------------------------------------------------------------------------ training
def train(cfg: TokenizerStageConfig, prepared: Prepared, resume: Optional[str] = "auto") -> dict:
    """Train to ``train.max_steps`` (resuming per ``resume``), export, and return the summary (rank 0; ``{}``
    on the other ranks)."""
    run_dir = Path(cfg.run.dir)
    # DeepSpeed's own clip is global over tokenizer + discriminator: GroupClippedAdamW clips each model instead.
    accelerator = build_accelerator(cfg.train, run_dir, grad_clip=0.0,
                                    micro_batch_size=cfg.data.batch_size, seed=cfg.run.seed,
                                    log_with=tracker_names(cfg.logging),
                                    project_name=cfg.logging.project, tracker_config=_flat_scalars(cfg.to_dict()))
    if zero_stage(accelerator) == 3:
        raise ConfigError("ZeRO-3 is not supported for train-tokenizer (the discriminator's detached functional "
                          "call needs whole parameters): use --zero 2 (train.zero_stage=2) or --zero 1")
    stream = prepared.stream
    if (stream.rank, stream.world_size) != (accelerator.process_index, accelerator.num_processes):
        raise RuntimeError(f"the launcher's RANK/WORLD_SIZE ({stream.rank}/{stream.world_size}) disagree with the "
                           f"process group ({accelerator.process_index}/{accelerator.num_processes})")
    main = accelerator.is_main_process
    if main:
        save_resolved_config(cfg, run_dir)

    module = prepared.module
    base_optimizer = optimizer = GroupClippedAdamW(
        module.param_groups(cfg.optim.lr, cfg.loss.disc_lr_ratio, cfg.optim.weight_decay, cfg.optim.grad_clip),
        betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    group_names = [group["name"] for group in base_optimizer.param_groups]
    scheduler = warmup_cosine(optimizer, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio)
    model, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    # ZeRO-1/2 hand step() this rank's flat partition of each group:
    # its norms need the other ranks' parts. Told apart by size: a partition holds a share of the parameters.
    stepped = sum(p.numel() for group in base_optimizer.param_groups for p in group["params"])
    base_optimizer.partitioned = accelerator.num_processes > 1 and stepped < sum(p.numel() for p in module.parameters())
    unwrapped: TokenizerTrainingModule = accelerator.unwrap_model(model)
    for teacher in prepared.teachers.values():
        teacher.to(accelerator.device)
    ema = EMA(unwrapped.tokenizer, cfg.train.ema_decay, warmup=True) if cfg.train.ema_decay > 0 else None
    ckpt = CheckpointManager(run_dir, accelerator, cfg.train.keep_last, prepared.identity, stage="tokenizer",
                             identity_defaults=cfg.identity_defaults(), num_workers=cfg.data.num_workers,
                             allow_new_global_batch=cfg.train.allow_new_global_batch)
    resumable = _StreamResume(stream, cfg.train.allow_new_global_batch)
    step = start_step = ckpt.resume(resume, ema=ema, extra={"stream": resumable})
    log = MetricsLog(accelerator, run_dir)
    changed = layout_change(ckpt.resumed_layout, ckpt.layout, step, f"{cfg.data.batch_size} images")
    if changed:
        log.event(changed)

    def export_state() -> dict[str, torch.Tensor]:
        state = accelerator.get_state_dict(model)
        return {k[len("tokenizer."):]: v for k, v in state.items() if k.startswith("tokenizer.")}

    images_per_step = cfg.data.batch_size * cfg.train.grad_accum * accelerator.num_processes
    batches = _endless(stream)
    guard = NonFiniteGuard(cfg.train.max_bad_steps)
    window = MetricWindow()
    metrics: dict[str, float] = {}
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not main, desc="train-tokenizer", unit="step")
    started = time.perf_counter()
    model.train()
    init_codebooks = step == 0 and cfg.model.quantizer.codebook_init == "kmeans"   # fresh runs only
    with stage_watchdog(accelerator, run_dir, cfg.train, "train-tokenizer") as watchdog:
        while step < cfg.train.max_steps:
            update = GuardedStep(accelerator, model, cfg.train.grad_accum)
            for _ in range(cfg.train.grad_accum):
                # Bytes cross to the device (4x less traffic than float32) and become [-1, 1] fp32 there, once;
                # the engine's autocast runs the forward in the compute dtype (pipeline.precision).
                images = to_unit_range(to_device(next(batches)["image"], accelerator.device))
                if init_codebooks:
                    init_codebooks = False
                    _kmeans_init(model, unwrapped.tokenizer, images)
                with accelerator.accumulate(model):
                    loss, logs, rec, grain = model(images, step)
                    window.add(logs, keep=update.backward_and_step(loss))
            guard.record(update.bad, step + 1)
            watchdog.beat(f"optimizer step {step + 1}")
            window.count(images=cfg.data.batch_size * cfg.train.grad_accum)
            if not update.stepped:  # NaN/Inf loss or gradient: the optimizer step was skipped on every rank
                continue
            scheduler.step()
            step += 1
            if ema is not None:
                ema.update()
            bar.update(1)

            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                metrics, totals, seconds = window.reduce(accelerator)
                quantizer = unwrapped.tokenizer.quantizer
                metrics.update({k: float(v) for k, v in quantizer.reduced_usage().items()})
                quantizer.reset_usage()
                # pre-clip gradient norm of each param group at this (last) step, and of all of them together
                norms = {name: float(norm) for name, norm in base_optimizer.grad_norms.items()}
                metrics.update({f"grad_norm/{name}": value for name, value in norms.items()})
                if norms:
                    metrics["grad_norm"] = sum(value ** 2 for value in norms.values()) ** 0.5
                metrics.update({f"lr/{name}": value for name, value in zip(group_names, scheduler.get_last_lr())})
                metrics.update({"images_per_s": totals["images"] / seconds, "bad_steps": guard.total})
                log.write(step, metrics)
                bar.set_postfix(loss=f"{metrics.get('loss/total', float('nan')):.4f}",
                                img_s=f"{metrics['images_per_s']:.1f}")
            if main and step % cfg.train.image_every == 0:
                shown = slice(0, GRID_IMAGES)
                grid = image_grid([images[shown], rec.detach()[shown].float(),
                                   grain_overlay(images[shown], grain[shown])])
                save_png(grid, run_dir / "images" / f"step-{step:07d}.png")
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps:
                ckpt.save(step, export_state=export_state, ema=ema, extra={"stream": resumable})
    bar.close()
    seconds = time.perf_counter() - started

    per_rank = gather_object([{"rank": accelerator.process_index,
                               "digest_tokenizer": state_digest(unwrapped.tokenizer.state_dict()),
                               "digest_discriminator": state_digest(unwrapped.gan_loss.state_dict()),
                               "peak_memory_bytes": peak_memory_bytes(accelerator.device),
                               "optimizer_state_bytes": optimizer_state_bytes(optimizer)}])
    summary = {"steps": step, "resumed_from": start_step, "seconds": seconds,
               "images_per_s": (step - start_step) * images_per_step / max(seconds, 1e-9),
               "world_size": accelerator.num_processes, "zero_stage": zero_stage(accelerator),
               "bad_steps": guard.total, "final_metrics": metrics, "ranks": per_rank, "stream": stream.stats,
               "layout": ckpt.layout, "canonical_units": stream.canonical_units, "images_per_step": images_per_step,
               "layout_change": changed}
    return finish_run(accelerator, run_dir, step, start_step, summary, raw=ema is None)


def _kmeans_init(engine, tokenizer: Tokenizer, images: torch.Tensor) -> None:
    """k-means codebook init from the first batch (every rank, collective). ZeRO-1/2 keep fp32 copies of the
    trainable weights in the optimizer: gradient-updated codebooks are copied back into them, otherwise the
    first step would restore the initial codes (EMA codebooks are no optimizer parameters)."""
    tokenizer.init_codebooks(images)
    refresh = getattr(getattr(engine, "optimizer", None), "refresh_fp32_params", None)
    if refresh is not None and not tokenizer.config.quantizer.ema:
        refresh()


# ------------------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, config_help="stage config YAML (or a preset name, e.g. tiny)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(TokenizerStageConfig, args.config, args.overrides, kind="tokenizer")
    prepared = prepare(cfg, args.resume)
    summary = train(cfg, prepared, args.resume)
    if summary:
        print(f"trained {summary['steps']} steps in {summary['seconds']:.1f} s "
              f"({summary['images_per_s']:.1f} images/s); export: {summary['export']}")
    return 0
