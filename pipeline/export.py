"""Turn a training run into a ``from_pretrained`` directory (config.json + model.safetensors).

    varitok export RUN_DIR --out DIR [--raw] [--step N]

Reads the newest intact checkpoint (checksum list verified; or ``--step N``) of ``RUN_DIR``: its
consolidated ``ema.safetensors`` (default) or ``model.safetensors`` (``--raw``), the model section of
``RUN_DIR/config.yaml``, and ``meta.json`` for the model class (one of varitok's own classes only).
Needs neither DeepSpeed nor the training processes: the weights were consolidated from the ZeRO shards
when the checkpoint was saved.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from safetensors.torch import load_file

from models.config import ConfigError
from pipeline.checkpoint import (EMA_WEIGHTS, MODEL_CLASSES, MODEL_WEIGHTS, checkpoint_problem, export_pretrained,
                                 find_checkpoint, newest_intact_checkpoint, read_meta)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the training run directory (run.dir)")
    parser.add_argument("--out", required=True, help="output directory for config.json + model.safetensors")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")


def export_run(run_dir: str | Path, out: str | Path, *, raw: bool = False, step: Optional[int] = None) -> Path:
    """Export a run's checkpoint; returns ``out``. Errors name the missing piece."""
    run_dir = Path(run_dir)
    checkpoint = find_checkpoint(run_dir, "auto", step=step) if step is not None else newest_intact_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"no intact checkpoint under {run_dir / 'checkpoints'}: train first (or check the path)")
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ConfigError(f"cannot export {checkpoint}: {problem}; export another --step")
    meta = read_meta(checkpoint)
    model_class = meta.get("model_class") or MODEL_CLASSES.get(meta.get("stage") or "")
    if not model_class:
        raise ConfigError(f"{checkpoint}/meta.json names no model class (stage={meta.get('stage')!r}); known stages: "
                          f"{sorted(MODEL_CLASSES)}")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{config_path} missing: the run's resolved config is needed to rebuild the model")
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    if "model" not in config:
        raise ConfigError(f"{config_path} has no 'model' section")
    weights = checkpoint / (MODEL_WEIGHTS if raw else EMA_WEIGHTS)
    if not weights.is_file():
        hint = "" if raw else " (EMA disabled in this run? export the raw weights with --raw)"
        raise ConfigError(f"{weights} missing{hint}")
    return export_pretrained(model_class, config["model"], load_file(str(weights)), out)


def run(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out, raw=args.raw, step=args.step)
    print(f"exported {'raw' if args.raw else 'EMA'} weights of {args.run_dir} to {out}")
    return 0
