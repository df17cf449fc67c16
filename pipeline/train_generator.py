"""Stage 3: train the coarse-to-fine generator on pre-tokenized code files (Accelerate + DeepSpeed ZeRO-0..3).

    varitok train-generator --config configs/generator/tiny.yaml data.codes=codes/ [--resume auto|PATH|none]
    accelerate launch --num_processes 8 --use_deepspeed --zero_stage 3 -m pipeline.cli train-generator ...
    varitok launch generator --nproc 8 --zero 3 -- --config configs/generator/base.yaml data.codes=codes/

Data: the memory-mapped code files are read by a token-budget batcher (one view per image drawn per epoch,
shuffled, greedily packed to ``data.max_tokens`` tokens per micro batch, the same number of micro batches on
every rank); each micro batch is packed into rows of exactly ``data.row_length`` slots (static shapes;
block-diagonal causal attention without a dense mask). The data position (epoch, micro batches consumed) is
saved with every checkpoint and restored exactly. The code files' labels and lengths are checked against the
model before the first step.

Optimiser: AdamW; weight decay only on the weight matrices of linear layers (embedding tables, including
output tables tied to them, slot embeddings, norms and biases get none); linear warmup + cosine; global-norm
clipping; accumulation; EMA. A step with a NaN/Inf loss or gradient on any rank is skipped on every rank
(``pipeline.training.GuardedStep``, one all-reduced count per optimizer step, ZeRO-0..3 alike) and counted
(``bad_steps``), and ``train.max_bad_steps`` such steps in a row stop the run; a rank that makes no step for
``train.watchdog_s`` makes every rank exit with an error (pipeline.watchdog). The tokenizer is never run, except
to decode the optional sample grids (``logging.tokenizer``: a Tokenizer export directory).

Outputs under ``run.dir``: ``config.yaml``, ``logs/metrics.jsonl`` (one JSON line per log step; TensorBoard
next to it), ``images/samples-step-N.png``, ``checkpoints/step-N/``, ``export/`` (EMA weights when EMA is
on, else raw; ``Generator.from_pretrained``), ``summary.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from data.codes import CodeReader, TokenBudgetBatcher
from data.world import resolve_world
from models.config import ConfigError
from models.generator import Generator, GeneratorConfig, PackedBatch, SequenceSpec, encode_sequences, pack, sample
from models.tokenizer import ImageCodes, Tokenizer
from pipeline.checkpoint import CheckpointManager, check_compatible, find_checkpoint, read_meta
from pipeline.config import load_config, save_resolved_config
from pipeline.ema import EMA
from pipeline.precision import autocast, resolve_precision
from pipeline.runtime import ResumeLayout, build_accelerator, finish_run, layout_change, resume_layout, stage_watchdog
from pipeline.schedule import warmup_cosine
from pipeline.stages import GeneratorDataConfig, GeneratorLoggingConfig, GeneratorStageConfig
from pipeline.training import (GuardedStep, MetricsLog, MetricWindow, NonFiniteGuard, add_stage_arguments,
                               peak_memory_bytes, tracker_names)
from pipeline.visual import grain_overlay, save_png, tile

__all__ = ["GeneratorStageConfig", "GeneratorDataConfig", "GeneratorLoggingConfig", "PackedCodeStream",
           "check_vocabulary", "check_labels_and_lengths", "optimizer_groups", "resume_identity", "Prepared",
           "prepare", "train", "add_arguments", "run"]


def check_vocabulary(reader: CodeReader, model: GeneratorConfig, codes_dir: str) -> None:
    """Raise ConfigError naming every field where the code files and the generator config disagree."""
    pairs = {"num_levels": (reader.num_levels, model.num_levels),
             "num_subcodes (K)": (reader.num_subcodes, model.num_subcodes),
             "codebook_sizes": (list(reader.codebook_sizes), list(model.codebook_sizes)),
             "grain_shape": (list(reader.grain_shape), list(model.grain_shape))}
    differing = {name: values for name, values in pairs.items() if values[0] != values[1]}
    if differing:
        listed = "; ".join(f"{name}: code files {codes} vs model.{name.split()[0]} {cfg}"
                           for name, (codes, cfg) in differing.items())
        raise ConfigError(f"the code files in {codes_dir} do not match the generator vocabulary ({listed}). "
                          f"Train on codes of the matching tokenizer, or set the model section to the code "
                          f"files' layout (see {codes_dir}/manifest.json)")


def check_labels_and_lengths(reader: CodeReader, model: GeneratorConfig, row_length: int, codes_dir: str) -> None:
    """Raise ConfigError before training when a stored label is not a class of the model or a sequence
    does not fit in one packed row (both would otherwise stop the run mid-way)."""
    labels = np.concatenate([block.labels for block in reader.blocks]) if reader.blocks else np.zeros(0, np.int32)
    if model.num_classes and labels.size and int(labels.max()) >= model.num_classes:
        bad = labels >= model.num_classes
        raise ConfigError(f"the code files in {codes_dir} hold {int(bad.sum())} rows with labels >= "
                          f"model.num_classes={model.num_classes} (largest {int(labels.max())}); set "
                          f"model.num_classes to at least {int(labels.max()) + 1} or re-tokenize with matching labels")
    longest = int(reader.lengths.max()) + model.num_levels + 1 if len(reader) else 0
    if longest > row_length:
        raise ConfigError(f"the longest sequence in {codes_dir} has {longest} tokens (codes + BOS + level markers) "
                          f"but data.row_length (or data.max_tokens) is {row_length}; raise it to at least {longest}")


class _PackedBatches(torch.utils.data.Dataset):
    """Micro batch ``i`` of one epoch's plan as a PackedBatch; opens the reader lazily per worker."""

    def __init__(self, codes_dir: str, spec: SequenceSpec, plan: list[list[int]], max_tokens: int, row_length: int,
                 num_classes: int):
        self.codes_dir, self.spec, self.plan = codes_dir, spec, plan
        self.max_tokens, self.row_length, self.num_classes = max_tokens, row_length, num_classes
        self._reader: Optional[CodeReader] = None

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> PackedBatch:
        if self._reader is None:
            self._reader = CodeReader(self.codes_dir, validate=False)   # validated by the stream at start-up
        rows = self._reader.gather(self.plan[i])
        labels = torch.from_numpy(rows.labels.astype(np.int64))   # checked at start-up (check_labels_and_lengths)
        labels = torch.where((labels < 0) | (self.num_classes == 0), self.num_classes, labels)
        codes = torch.from_numpy(rows.codes.astype(np.int64)).split(rows.lengths.tolist())
        seqs = encode_sequences(self.spec, list(torch.from_numpy(rows.grains)), list(codes))
        return pack(self.spec, seqs, labels, self.max_tokens, null_label=self.num_classes, row_length=self.row_length)


class PackedCodeStream:
    """Endless stream of this rank's packed micro batches; ``state_dict`` is the batcher's (epoch, position).

    Workers prefetch micro batches of the current epoch; the position counts batches handed to the
    training loop, so a saved state never includes prefetched-but-unused batches.
    """

    def __init__(self, codes_dir: str, model: GeneratorConfig, max_tokens: int, rank: int, world_size: int,
                 seed: int, views: str = "random", num_workers: int = 0, row_length: int = 0):
        self.codes_dir, self.model, self.num_workers = codes_dir, model, num_workers
        self.row_length = row_length or max_tokens
        self.reader = CodeReader(codes_dir)
        check_vocabulary(self.reader, model, codes_dir)
        check_labels_and_lengths(self.reader, model, self.row_length, codes_dir)
        self.spec = model.spec
        self.batcher = TokenBudgetBatcher(self.reader, max_tokens, rank=rank, world_size=world_size, seed=seed,
                                          views=views, extra_tokens=model.num_levels + 1)
        if len(self.batcher) == 0:
            raise ConfigError(f"{codes_dir} holds no rows to train on")
        self._batches: Optional[Iterator[PackedBatch]] = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batcher)

    def _epoch(self) -> Iterator[PackedBatch]:
        if self.batcher.position >= len(self.batcher.plan()):
            self.batcher.set_epoch(self.batcher.epoch + 1)
        plan = self.batcher.plan()
        dataset = _PackedBatches(self.codes_dir, self.spec, plan, self.batcher.max_tokens, self.row_length,
                                 self.model.num_classes)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(self.batcher.position, len(plan)),
                                             num_workers=self.num_workers, collate_fn=lambda batch: batch,
                                             # its own generator: drawing worker seeds must not touch the
                                             # global RNG that class dropout uses (exact resume)
                                             generator=torch.Generator().manual_seed(self.batcher.epoch))
        for batch in loader:
            self.batcher.position += 1
            yield batch

    def __iter__(self) -> "PackedCodeStream":
        return self

    def __next__(self) -> PackedBatch:
        while True:
            if self._batches is None:
                self._batches = self._epoch()
            batch = next(self._batches, None)
            if batch is not None:
                return batch
            self._batches = None

    def state_dict(self) -> dict[str, Any]:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue after ``state``: this rank's saved state, or the list of every saved rank's (any world size)."""
        self.batcher.load_state_dict(state)
        self._batches = None


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on ``nn.Linear`` weight matrices not shared with an embedding table; none elsewhere."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in embedded}
    params = list(model.parameters())   # tied tables appear once
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


def resume_identity(cfg: GeneratorStageConfig, reader: CodeReader) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it: the resolved config without the stage's
    ``RESUMABLE`` keys, with the code files' identity (rows, tokenizer) in place of their path and the
    resolved row length."""
    return cfg.resume_identity({"data": {"row_length": cfg.data.slots_per_row, "rows": len(reader),
                                         "tokenizer": reader.manifest.tokenizer_identity}})


def _log_values(window: MetricWindow, accelerator, max_tokens: int) -> dict[str, float]:
    """Loss metrics averaged over micro batches and ranks; tokens/s over all ranks; packing = tokens / token
    budget; memory_gb = the largest per-rank peak (GiB)."""
    values, totals, seconds = window.reduce(accelerator)
    peak = torch.tensor([peak_memory_bytes(accelerator.device) / 2 ** 30], device=accelerator.device)
    return {**values, "tokens_per_s": totals["tokens"] / seconds,
            "packing_efficiency": totals["tokens"] / (totals["micro_batches"] * max_tokens),
            "memory_gb": float(accelerator.gather(peak).max())}


def _sample_grid(accelerator, model, ema, cfg: GeneratorStageConfig, tokenizer, step: int, run_dir: Path) -> None:
    """Decode class-conditional samples of the (EMA) weights to ``RUN/images/samples-step-N.png`` (rank 0).

    The consolidated weights are gathered on every rank (a collective under ZeRO-3); rank 0 samples with
    a plain copy of the generator on its own device, under the run's autocast.
    """
    state = ema.state_dict_for() if ema is not None else accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    device = accelerator.device
    generator = Generator(cfg.model)
    generator.load_state_dict(state)
    generator.to(device).eval()
    classes = cfg.logging.grid_classes or list(range(min(8, max(cfg.model.num_classes, 1))))
    labels = [c if cfg.model.num_classes else cfg.model.null_class for c in classes]
    guided = cfg.logging.grid_cfg != 1.0 and cfg.model.num_classes > 0
    with torch.inference_mode(), autocast(resolve_precision(cfg.train.precision, device), device):
        maps = sample(generator, labels, cfg_scale=cfg.logging.grid_cfg if guided else None,
                      generator=torch.Generator(device).manual_seed(cfg.run.seed))
        images = tokenizer.to(device).decode([ImageCodes(g, c) for g, c in maps]).float().cpu()
    grains = torch.stack([g for g, _ in maps]).cpu()
    grid = torch.cat([images, grain_overlay(images, grains)])
    save_png(tile(grid, ncol=len(maps)), run_dir / "images" / f"samples-step-{step}.png")


@dataclasses.dataclass
class Prepared:
    """What is checked (and read) before the first collective."""

    reader: CodeReader
    identity: dict
    layout: ResumeLayout    # this run's processes x grad_accum (the checkpoint's tokens per step on resume)


def prepare(cfg: GeneratorStageConfig, resume: Optional[str]) -> Prepared:
    """Check the code files against the model and a checkpoint to resume against this run, raising ConfigError
    (or ResumeError) on anything bad. Runs on every rank before any process group or DeepSpeed engine exists.

    On resume the checkpoint's tokens per optimizer step (processes x grad_accum micro batches of
    ``data.max_tokens``) are kept: ``cfg.train.grad_accum`` is set for this run's number of processes
    (pipeline.runtime ``resume_layout``), or a ResumeError says which numbers of processes work."""
    if not cfg.data.codes:
        raise ConfigError("data.codes is empty: pass data.codes=DIR (a directory written by `varitok tokenize`)")
    reader = CodeReader(cfg.data.codes)
    check_vocabulary(reader, cfg.model, cfg.data.codes)
    check_labels_and_lengths(reader, cfg.model, cfg.data.slots_per_row, cfg.data.codes)
    identity = resume_identity(cfg, reader)
    world_size = resolve_world().size
    checkpoint = find_checkpoint(cfg.run.dir, resume)
    meta = None
    if checkpoint is not None:
        meta = read_meta(checkpoint)
        # The ZeRO stage is only known once the accelerator exists: CheckpointManager.resume checks it.
        check_compatible(meta, world_size, meta["zero_stage"], identity, identity_defaults=cfg.identity_defaults())
    layout = resume_layout(meta, world_size, cfg.train)
    cfg.train.grad_accum = layout.grad_accum
    return Prepared(reader, identity, layout)


def train(cfg: GeneratorStageConfig, prepared: Prepared, resume: Optional[str] = "auto") -> dict[str, Any]:
    """Run (or continue) training and export; returns the summary written to ``RUN/summary.json`` (rank 0;
    ``{}`` on the other ranks)."""
    run_dir = Path(cfg.run.dir)
    accelerator = build_accelerator(cfg.train, run_dir, grad_clip=cfg.optim.grad_clip, micro_batch_size=1,
                                    seed=cfg.run.seed, log_with=tracker_names(cfg.logging),
                                    project_name=cfg.logging.project)
    stream = PackedCodeStream(cfg.data.codes, cfg.model, cfg.data.max_tokens, accelerator.process_index,
                              accelerator.num_processes, cfg.run.seed, cfg.data.views, cfg.data.num_workers,
                              cfg.data.row_length)
    if accelerator.is_main_process:
        save_resolved_config(cfg, run_dir)
    tokenizer = None
    if cfg.logging.tokenizer and accelerator.is_main_process:
        tokenizer = Tokenizer.from_pretrained(cfg.logging.tokenizer).eval()

    model = Generator(cfg.model)
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = warmup_cosine(optimizer, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio)
    num_parameters = model.num_parameters()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = EMA(accelerator.unwrap_model(model), cfg.train.ema_decay, warmup=True) if cfg.train.ema_decay > 0 else None
    ckpt = CheckpointManager(run_dir, accelerator, cfg.train.keep_last, prepared.identity, stage="generator",
                             identity_defaults=cfg.identity_defaults(), num_workers=cfg.data.num_workers,
                             allow_new_global_batch=cfg.train.allow_new_global_batch)
    step = start = ckpt.resume(resume, ema=ema, extra={"stream": stream})
    log = MetricsLog(accelerator, run_dir)
    changed = layout_change(ckpt.resumed_layout, ckpt.layout, step, f"{cfg.data.max_tokens} tokens")
    if changed:
        log.event(changed)
    guard, window, last = NonFiniteGuard(cfg.train.max_bad_steps), MetricWindow(), {}
    model.train()
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not accelerator.is_main_process,
               desc="train-generator", unit="step")
    with stage_watchdog(accelerator, run_dir, cfg.train, "train-generator") as watchdog:
        while step < cfg.train.max_steps:
            update = GuardedStep(accelerator, model, cfg.train.grad_accum)
            for _ in range(cfg.train.grad_accum):
                batch = next(stream)
                window.count(tokens=batch.num_tokens, micro_batches=1)   # counted on the host, before the copy
                batch = batch.to(accelerator.device)
                with accelerator.accumulate(model):
                    metrics = model(batch)
                    window.add(metrics, keep=update.backward_and_step(metrics["loss"]))
            guard.record(update.bad, step + 1)
            watchdog.beat(f"optimizer step {step + 1}")
            if not update.stepped:  # NaN/Inf loss or gradient: the optimizer step was skipped on every rank
                continue
            scheduler.step()
            step += 1
            bar.update(1)
            if ema is not None:
                ema.update()
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                last = {**_log_values(window, accelerator, cfg.data.max_tokens), "lr": scheduler.get_last_lr()[0],
                        "epoch": float(stream.batcher.epoch), "bad_steps": guard.total}
                log.write(step, last)
                bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}",
                                tok_s=f"{last.get('tokens_per_s', float('nan')):.0f}")
            if cfg.logging.tokenizer and (step % cfg.train.image_every == 0 or step == cfg.train.max_steps):
                _sample_grid(accelerator, model, ema, cfg, tokenizer, step, run_dir)
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps:
                ckpt.save(step, ema=ema, extra={"stream": stream})
    bar.close()
    summary = {"steps": step, "resumed_from": start, "world_size": accelerator.num_processes,
               "zero_stage": ckpt.zero_stage, "parameters": num_parameters,
               "steps_per_epoch": stream.steps_per_epoch, "bad_steps": guard.total, "final": last,
               "layout": ckpt.layout, "token_budget_per_step": cfg.data.max_tokens * accelerator.num_processes
               * cfg.train.grad_accum, "layout_change": changed}
    return finish_run(accelerator, run_dir, step, start, summary, raw=ema is None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, config_help="stage config (path or preset name: tiny, base, large)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(GeneratorStageConfig, args.config, args.overrides, kind="generator")
    prepared = prepare(cfg, args.resume)
    summary = train(cfg, prepared, args.resume)
    if not summary:  # one summary line per run, on rank 0
        return 0
    final = summary["final"]
    loss = final.get("loss", math.nan)
    print(f"train-generator: {summary['steps']} steps (from {summary['resumed_from']}), loss {loss:.4f}, "
          f"{final.get('tokens_per_s', 0.0):.0f} tokens/s -> {Path(cfg.run.dir) / 'export'}")
    return 0
