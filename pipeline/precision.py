"""Mixed precision, one policy for every stage: fp32 weights and optimizer state, bf16 (or fp16) compute.

Training stages run DeepSpeed's ``torch_autocast`` mode (:func:`deepspeed_precision_config`): the engine keeps
the parameters, gradients, master weights and optimizer state in fp32 and runs each ``engine(...)`` forward
(the whole loss, so also the backward's matmuls) under ``torch.autocast``. This is the AMP recipe of LlamaGen
and FQGAN (fp32 weights + autocast) with the gradient reduction and fp16 loss scaling handled by DeepSpeed.
Not DeepSpeed's ``bf16`` mode: it casts the module's parameters to bf16 and leaves the inputs alone, so
image batches (fp32) no longer match the first conv, and codebooks, norms and discriminator would compute
from bf16 weights.

Inference stages (tokenize, sample, eval, the grids a training stage renders) wrap their model calls in
:func:`autocast`. In every case the model code keeps its fp32 islands itself (codebook lookups, router,
entropy / budget terms, softmax heads, losses) with ``torch.autocast(..., enabled=False)`` and ``.float()``.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import ContextManager

import torch

from models.config import ConfigError

__all__ = ["PRECISIONS", "resolve_precision", "compute_dtype", "autocast", "deepspeed_precision_config",
           "check_launcher_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEEPSPEED_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> bf16 on a GPU, fp32 on the CPU; fp16 needs a GPU; returns one of fp32 / bf16 / fp16."""
    device_type = torch.device(device).type
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError("precision fp16 needs a GPU (its loss scaling is for CUDA); use bf16, fp32 or auto")
    if precision == "bf16" and device_type == "cpu":
        warnings.warn("bf16 on the CPU is correct but slow (no native bf16 matmul on most CPUs); "
                      "auto picks fp32 there", stacklevel=2)
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The autocast dtype of a resolved precision (fp32 / bf16 / fp16)."""
    return _DTYPES[precision]


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """``torch.autocast`` for a resolved precision on ``device`` (a no-op context for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def deepspeed_precision_config(precision: str) -> dict:
    """The DeepSpeed config sections for a resolved precision: ``torch_autocast`` for bf16 / fp16, fp32 otherwise.

    ``bf16`` / ``fp16`` (DeepSpeed's own low-precision weight modes) are switched off explicitly so that a
    launcher's config cannot turn them on behind the run's back (see :func:`check_launcher_precision`).
    """
    sections: dict = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    if precision != "fp32":
        sections["torch_autocast"] = {"enabled": True, "dtype": _DEEPSPEED_DTYPE[precision]}
    return sections


def check_launcher_precision(config: dict) -> None:
    """Refuse a DeepSpeed config (e.g. from ``accelerate launch --deepspeed_config_file``) that enables
    DeepSpeed's bf16 / fp16 weight modes: varitok's precision is ``train.precision``."""
    for section in ("bf16", "fp16"):
        if str(config.get(section, {}).get("enabled", False)).lower() == "true":
            raise ConfigError(f"the DeepSpeed config enables `{section}` (bf16/fp16 weights); varitok keeps fp32 "
                              f"weights and runs autocast: remove the `{section}` section and set "
                              f"train.precision={section} instead")
