"""Training checkpoints: atomic, pruned to the last k, resumable; and ``from_pretrained`` exports.

Layout of ``RUN/checkpoints/step-N/`` (a directory with this name is complete by construction: it is
written as ``.tmp-step-N`` and renamed by rank 0 after every rank finished; a kill -9 at any point leaves
at worst a ``.tmp-*`` directory, removed by the next save)::

    pytorch_model/ ...            accelerator.save_state: DeepSpeed model + per-rank ZeRO optimizer shards
    random_states_R.pkl, ...      (RNG per rank, scheduler, objects registered with register_for_checkpointing)
    extra-rankRRRRR.pt            per-rank state of the ``extra`` objects (data stream position, ...)
    model.safetensors             consolidated exportable weights (rank 0; gathered from ZeRO-3 shards)
    ema.safetensors               consolidated fp32 EMA weights (rank 0), metadata: decay, num_updates
    meta.json                     {step, world_size, zero_stage, config_identity, time, stage, model_class}

Rolling back (``resume`` from a checkpoint older than the newest, or saving step N while a ``step-M``,
M > N, exists, e.g. after ``--resume none``) abandons the newer checkpoints: they are renamed to
``abandoned-step-M-<YYYYmmdd-HHMMSS>`` (kept for inspection, ignored by ``--resume auto`` and by pruning),
so pruning never deletes the checkpoint just written and ``auto`` never continues the abandoned run.

The files written by Accelerate / DeepSpeed are pickles: resume only from checkpoints your own runs wrote.
Everything varitok reads itself is safetensors, JSON, or ``torch.load(weights_only=True)``.
The run directory must be on a file system shared by all machines (checked at construction).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from models.config import ConfigError
from models.hub import save_state_dict

__all__ = ["CheckpointManager", "ResumeError", "MODEL_CLASSES", "complete_checkpoints", "find_checkpoint",
           "read_meta", "check_compatible", "import_class", "export_pretrained"]

CHECKPOINTS = "checkpoints"
META = "meta.json"
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")

log = logging.getLogger("varitok.checkpoint")

# meta.json "stage" -> model class ("module:Class") that `varitok export` rebuilds.
MODEL_CLASSES = {"tokenizer": "models.tokenizer:Tokenizer", "generator": "models.generator:Generator"}


class ResumeError(ConfigError):
    """A checkpoint that cannot be resumed by this run (reported before any training step)."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``run_dir/checkpoints``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(path.name)
        if match and (path / META).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_checkpoint(run_dir: str | os.PathLike, spec: Optional[str] = "auto",
                    step: Optional[int] = None) -> Optional[Path]:
    """Resolve ``spec``: "auto" (newest complete, or ``step`` when given; None when there is none),
    a checkpoint directory, or None / "none" (no resume)."""
    if spec is None or str(spec).lower() in ("", "none", "no"):
        return None
    if str(spec) != "auto":
        path = Path(spec)
        if not (path / META).is_file():
            raise ResumeError(f"{path} is not a complete checkpoint (no {META}); pass a RUN/checkpoints/step-N "
                              f"directory or --resume auto")
        return path
    found = complete_checkpoints(run_dir)
    if step is not None:
        matches = [p for s, p in found if s == step]
        if not matches:
            raise ResumeError(f"no complete checkpoint for step {step} in {Path(run_dir) / CHECKPOINTS}; "
                              f"available steps: {[s for s, _ in found]}")
        return matches[0]
    return found[-1][1] if found else None


def read_meta(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / META).read_text())


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, Mapping):
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): values}


def check_compatible(meta: Mapping[str, Any], world_size: int, zero_stage: int,
                     config_identity: Mapping[str, Any]) -> None:
    """Raise :class:`ResumeError` naming every difference between a checkpoint and this run."""
    problems = []
    if meta["world_size"] != world_size:
        problems.append(f"world size: checkpoint {meta['world_size']} processes, this run {world_size}. "
                        f"ZeRO checkpoints are per rank: relaunch with {meta['world_size']} processes in total "
                        f"(or start a new run.dir)")
    if meta["zero_stage"] != zero_stage:
        problems.append(f"ZeRO stage: checkpoint {meta['zero_stage']}, this run {zero_stage}: relaunch with "
                        f"--zero {meta['zero_stage']} (train.zero_stage={meta['zero_stage']})")
    saved, current = _flatten(meta["config_identity"]), _flatten(dict(config_identity))
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k, "<absent>") != current.get(k, "<absent>"))
    if differing:
        listed = "; ".join(f"{k}: checkpoint {saved.get(k, '<absent>')!r}, this run {current.get(k, '<absent>')!r}"
                           for k in differing[:10])
        problems.append(f"config differs ({listed}). Resume with the run's own config (RUN/config.yaml) or use "
                        f"a new run.dir")
    if problems:
        raise ResumeError("cannot resume from this checkpoint:\n  - " + "\n  - ".join(problems))


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` so the rename publishes durable contents."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointManager:
    """Saves and resumes a run's checkpoints; every method is called on every rank.

    ``config_identity`` is what must match to resume (e.g. the model / loss / data config sections);
    ``stage`` and ``model_class`` ("module:Class", default from :data:`MODEL_CLASSES`) tell
    ``varitok export`` how to rebuild the model.
    """

    def __init__(self, run_dir: str | os.PathLike, accelerator, keep_last: int, config_identity: Mapping[str, Any],
                 *, stage: Optional[str] = None, model_class: Optional[str] = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.config_identity = json.loads(json.dumps(dict(config_identity)))  # plain JSON types, compared as saved
        self.stage = stage
        self.model_class = model_class or MODEL_CLASSES.get(stage or "")
        self._check_shared_filesystem()

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def zero_stage(self) -> int:
        plugin = self.accelerator.state.deepspeed_plugin
        return int(plugin.deepspeed_config["zero_optimization"]["stage"]) if plugin is not None else 0

    def _check_shared_filesystem(self) -> None:
        """Every rank must see rank 0's files: checkpoints are written by all ranks into one directory."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        token = [uuid.uuid4().hex if acc.is_main_process else None]
        probe = self.root / ".shared-fs-probe"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_text(token[0])
        if acc.num_processes > 1:
            broadcast_object_list(token)
        acc.wait_for_everyone()
        seen = probe.read_text() if probe.is_file() else None
        ok = torch.tensor([1.0 if seen == token[0] else 0.0], device=acc.device)
        if acc.num_processes > 1:
            ok = acc.reduce(ok, reduction="sum")
        if int(ok.item()) != acc.num_processes:
            raise ResumeError(f"run.dir {self.run_dir} is not shared by all processes (some ranks cannot see rank 0's "
                              f"files): put run.dir on a file system mounted on every machine")

    def save(self, step: int, *, export_state: Optional[Callable[[], dict[str, Tensor]]] = None,
             ema=None, extra: Optional[Mapping[str, Stateful]] = None) -> Path:
        """Write ``checkpoints/step-{step}`` atomically and prune to the last ``keep_last``.

        ``export_state`` returns the consolidated weights to export (every rank calls it; default: the
        state dict of the single prepared model); ``ema`` adds ``ema.safetensors``; ``extra`` objects are
        saved per rank. Returns the final directory.
        """
        acc = self.accelerator
        final, tmp = self.root / f"step-{step}", self.root / f".tmp-step-{step}"
        if acc.is_main_process:
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if extra:
            torch.save({name: obj.state_dict() for name, obj in extra.items()},
                       tmp / f"extra-rank{acc.process_index:05d}.pt")
        weights = export_state() if export_state is not None else self._default_export_state()
        ema_state = ema.state_dict_for() if ema is not None else None
        if acc.is_main_process:
            save_state_dict(weights, tmp / MODEL_WEIGHTS, metadata={"step": str(step)})
            if ema_state is not None:
                save_state_dict(ema_state, tmp / EMA_WEIGHTS, metadata={
                    "step": str(step), "decay": repr(ema.decay), "num_updates": str(ema.num_updates)})
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._publish(step, tmp, final)
        acc.wait_for_everyone()
        return final

    def _abandon_newer_than(self, step: int, reason: str) -> list[Path]:
        """Rank 0: rename every complete ``step-M`` with M > ``step`` to ``abandoned-step-M-<time>``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for newer, path in complete_checkpoints(self.run_dir):
            if newer <= step:
                continue
            target = self.root / f"abandoned-{path.name}-{stamp}"
            if target.exists():
                target = target.with_name(f"{target.name}-{uuid.uuid4().hex[:8]}")
            os.replace(path, target)
            moved.append(target)
        if moved:
            log.warning("%s: moved the newer checkpoint(s) of the abandoned run aside so that --resume auto and "
                        "pruning ignore them: %s (delete them when no longer needed)", reason,
                        ", ".join(p.name for p in moved))
        return moved

    def _default_export_state(self) -> dict[str, Tensor]:
        models = self.accelerator._models
        if len(models) != 1:
            raise ValueError(f"{len(models)} models were prepared: pass save(export_state=...) to say what to export")
        return self.accelerator.get_state_dict(models[0])

    def _publish(self, step: int, tmp: Path, final: Path) -> None:
        meta = {"step": step, "world_size": self.world_size, "zero_stage": self.zero_stage,
                "config_identity": self.config_identity, "time": time.time(), "stage": self.stage,
                "model_class": self.model_class, "format": 1}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            old = self.root / f".tmp-old-step-{step}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        # Newer checkpoints are another timeline's (this run continued from an older step): with them in
        # place, pruning by step number would delete ``final`` and ``--resume auto`` would pick them.
        self._abandon_newer_than(step, f"saved step {step}")
        for _, path in complete_checkpoints(self.run_dir)[:-self.keep_last]:
            doomed = path.with_name(f".tmp-pruned-{path.name}")  # rename first: never a half-deleted step-N
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def resume(self, spec: Optional[str] = "auto", *, ema=None,
               extra: Optional[Mapping[str, Stateful]] = None) -> int:
        """Restore model, optimizer, scheduler, RNG, ``ema`` and ``extra``; return the step to continue from.

        ``spec``: "auto" (newest complete checkpoint of this run, 0 when there is none), a checkpoint
        directory, or None. Raises :class:`ResumeError` before loading anything when the checkpoint's
        world size, ZeRO stage or config identity differ from this run. After a successful load from an
        older checkpoint than this run's newest, the newer ones are moved aside (``abandoned-step-M-<time>``).
        """
        path = find_checkpoint(self.run_dir, spec)
        if path is None:
            return 0
        meta = read_meta(path)
        check_compatible(meta, self.world_size, self.zero_stage, self.config_identity)
        acc = self.accelerator
        acc.load_state(str(path))
        if extra:
            own = path / f"extra-rank{acc.process_index:05d}.pt"
            if not own.is_file():
                raise ResumeError(f"{own} missing: the checkpoint was saved without the extra state {sorted(extra)}")
            saved = torch.load(own, map_location="cpu", weights_only=True)
            for name, obj in extra.items():
                if name not in saved:
                    raise ResumeError(f"{own} has no state for {name!r} (it holds {sorted(saved)})")
                obj.load_state_dict(saved[name])
        if ema is not None:
            ema.load_state_dict(read_ema_state(path))
        step = int(meta["step"])
        acc.wait_for_everyone()  # every rank has loaded before rank 0 renames anything
        if acc.is_main_process:
            self._abandon_newer_than(step, f"resumed from {path} (step {step})")
        acc.wait_for_everyone()
        return step


def read_ema_state(checkpoint: str | os.PathLike) -> dict:
    """The EMA ``state_dict`` stored in ``checkpoint/ema.safetensors``."""
    path = Path(checkpoint) / EMA_WEIGHTS
    if not path.is_file():
        raise ResumeError(f"{path} missing: the checkpoint was saved without EMA (train.ema_decay=0?)")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return {"decay": float(metadata.get("decay", 0.0)), "num_updates": int(metadata.get("num_updates", 0)),
            "shadow": load_file(str(path))}


def import_class(path: str) -> type:
    """``"package.module:Class"`` -> the class."""
    module_name, _, class_name = path.partition(":")
    if not class_name:
        raise ValueError(f"model class {path!r} must look like 'package.module:Class'")
    return getattr(importlib.import_module(module_name), class_name)


def export_pretrained(model_class_path: str, config_dict: Mapping[str, Any], state: Mapping[str, Tensor],
                      out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/config.json`` + ``model.safetensors`` loadable by ``Class.from_pretrained(out_dir)``.

    The state is checked against the model (names and shapes; built on the meta device when it allows) first.
    """
    cls = import_class(model_class_path)
    config = cls.config_class.from_dict(dict(config_dict))
    try:
        with torch.device("meta"):  # shapes without allocating memory
            model = cls(config)
    except (NotImplementedError, RuntimeError):  # an __init__ that computes on its tensors needs real ones
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or unexpected or reshaped:
        raise ValueError(f"weights do not fit {cls.__name__}: missing {missing[:10]}, unexpected {unexpected[:10]}, "
                         f"shape mismatch {[(k, got[k], expected[k]) for k in reshaped[:10]]}")
    return model.save_pretrained(out_dir, state_dict=dict(state))
