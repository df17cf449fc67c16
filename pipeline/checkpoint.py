"""Training checkpoints: atomic, pruned to the last k, resumable; and ``from_pretrained`` exports.

Layout of ``RUN/checkpoints/step-N/`` (a directory with this name is complete by construction: it is
written as ``.tmp-step-N`` and renamed by rank 0 after every rank finished; a kill -9 at any point leaves
at worst a ``.tmp-*`` directory, removed by the next save)::

    pytorch_model/ ...            accelerator.save_state: DeepSpeed model + per-rank ZeRO optimizer shards
    universal/ ...                ZeRO-1/2/3: the same state world-size independent (DeepSpeed universal checkpoint:
                                  universal/zero/<param name>/{fp32,exp_avg,exp_avg_sq,step}.pt + optimizer_state.pt)
    latest_universal              (written by DeepSpeed's converter: the name "universal")
    random_states_R.pkl, ...      (RNG per rank, scheduler, objects registered with register_for_checkpointing)
    extra-rankRRRRR.pt            per-rank state of the ``extra`` objects (data stream position, ...)
    model.safetensors             consolidated exportable weights (rank 0; gathered from ZeRO-3 shards)
    ema.safetensors               consolidated fp32 EMA weights (rank 0), metadata: decay, num_updates
    meta.json                     {step, world_size, zero_stage, config_identity, time, stage, model_class,
                                  layout, layouts, universal, world_size_independent, format: 2}
    checksums.json                written last: {relative path: {bytes, sha256}} of every other file

Resuming on another world size: ZeRO-0 states are whole on every rank (nothing is partitioned) and ZeRO-1/2/3
checkpoints carry ``universal/``, which :meth:`CheckpointManager.resume` re-partitions over the new ranks
(``meta.json`` ``world_size_independent``). ``layout`` is the saved {world_size, grad_accum, num_workers};
:func:`saved_layout` reads it before the engine is built (``data.epoch.grad_accum_for`` keeps the global batch).

Rolling back (``resume`` from a checkpoint older than the newest, or saving step N while a ``step-M``,
M > N, exists, e.g. after ``--resume none``) abandons the newer checkpoints: they are renamed to
``abandoned-step-M-<YYYYmmdd-HHMMSS>`` (kept for inspection, ignored by ``--resume auto`` and by pruning),
so pruning never deletes the checkpoint just written and ``auto`` never continues the abandoned run.

Resume verifies ``checksums.json`` first: with ``--resume auto`` a checkpoint with a missing, truncated,
changed or unlisted file is skipped with a warning naming the file, and the newest intact one is loaded
(none intact: the run starts from step 0 with a warning), so a torn checkpoint never loads and never
blocks a run (no crash loop under SLURM ``--requeue``). The files written by Accelerate / DeepSpeed are
pickles; resume loads every one of them with ``torch.load(weights_only=True)`` (DeepSpeed's own loader
passes ``weights_only=False``: :func:`no_pickled_code` overrides it and allow-lists the few plain
DeepSpeed types its optimizer states hold), so a pickle planted in a shared ``run.dir`` cannot run code.
``varitok export`` rebuilds only varitok's own model classes (:func:`import_class`).
The run directory must be on a file system shared by all machines (checked at construction).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from data.epoch import grad_accum_for
from data.files import AtomicFile, atomic_write
from data.identity import ABSENT, describe_differences, differences
from models.config import ConfigError
from models.hub import PretrainedMixin, save_state_dict
from pipeline.training import zero_stage

__all__ = ["CheckpointManager", "ResumeError", "MODEL_CLASSES", "complete_checkpoints", "find_checkpoint",
           "read_meta", "check_compatible", "import_class", "export_pretrained", "checkpoint_problem",
           "write_checksums", "no_pickled_code", "newest_intact_checkpoint", "saved_layout", "layout_of",
           "write_universal", "global_batch_problem"]

CHECKPOINTS = "checkpoints"
META = "meta.json"
CHECKSUMS = "checksums.json"
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"

DEEPSPEED_TAG = "pytorch_model"    # Accelerate's directory of the DeepSpeed engine's files
UNIVERSAL = "universal"            # the world-size-independent copy of it (ZeRO-1/2/3)
_STEP_DIR = re.compile(r"^step-(\d+)$")

log = logging.getLogger("varitok.checkpoint")

# meta.json "stage" -> model class ("module:Class") that `varitok export` rebuilds.
MODEL_CLASSES = {"tokenizer": "models.tokenizer:Tokenizer", "generator": "models.generator:Generator"}


class ResumeError(ConfigError):
    """A checkpoint that cannot be resumed by this run (reported before any training step)."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def extra_state_path(checkpoint: str | os.PathLike, rank: int) -> Path:
    """``checkpoint/extra-rankRRRRR.pt``: rank ``rank``'s state of the ``extra`` objects (data position, ...)."""
    return Path(checkpoint) / f"extra-rank{rank:05d}.pt"


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
    try:
        meta = json.loads((Path(checkpoint) / META).read_text())
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{Path(checkpoint) / META} is unreadable ({exc}): the checkpoint is damaged") from None
    if not isinstance(meta, dict) or not all(k in meta for k in ("step", "world_size", "zero_stage")):
        raise ResumeError(f"{Path(checkpoint) / META} lacks step / world_size / zero_stage: the checkpoint is damaged")
    return meta


def newest_intact_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint that passes :func:`checkpoint_problem`; each newer damaged one is
    skipped with a warning naming what is wrong. None when there is none."""
    found = complete_checkpoints(run_dir)
    for _, candidate in reversed(found):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        log.warning("skipping checkpoint %s: %s; trying the next older one", candidate.name, problem)
    if found:
        log.warning("none of the %d checkpoints in %s is intact (see above): starting from step 0", len(found),
                    Path(run_dir) / CHECKPOINTS)
    return None


def _checkpoint_files(checkpoint: Path) -> list[str]:
    """Relative paths of the files of a checkpoint, sorted; the checksum list and dotfiles excluded."""
    found = []
    for directory, folders, files in os.walk(checkpoint):
        folders[:] = [f for f in folders if not f.startswith(".")]
        for name in files:
            relative = os.path.relpath(os.path.join(directory, name), checkpoint)
            if not name.startswith(".") and relative != CHECKSUMS:
                found.append(relative)
    return sorted(found)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_checksums(checkpoint: str | os.PathLike) -> Path:
    """Write ``checkpoint/checksums.json`` listing the size and sha256 of every other file (call it last)."""
    checkpoint = Path(checkpoint)
    files = {name: {"bytes": (checkpoint / name).stat().st_size, "sha256": _sha256(checkpoint / name)}
             for name in _checkpoint_files(checkpoint)}
    return atomic_write(checkpoint / CHECKSUMS, json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True))


def checkpoint_problem(checkpoint: str | os.PathLike) -> Optional[str]:
    """Why ``checkpoint`` must not be loaded (None when it is intact): no or an unreadable checksum list, a
    listed file missing, truncated or changed, a file that is not listed, an unreadable meta.json."""
    checkpoint = Path(checkpoint)
    try:
        listed = json.loads((checkpoint / CHECKSUMS).read_text())["files"]
        if not isinstance(listed, dict):
            raise ValueError("'files' is not an object")
    except FileNotFoundError:
        return f"{checkpoint / CHECKSUMS} is missing (the save was interrupted, or a file was removed)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{checkpoint / CHECKSUMS} is unreadable ({exc})"
    present = set(_checkpoint_files(checkpoint))
    unlisted = sorted(present - listed.keys())
    if unlisted:
        return f"{checkpoint}: files not in its checksum list (planted or left over): {unlisted[:5]}"
    for name, entry in sorted(listed.items()):
        path = checkpoint / name
        if name not in present:
            return f"{path} is missing"
        try:
            size, expected_size, digest = path.stat().st_size, int(entry["bytes"]), str(entry["sha256"])
        except (OSError, KeyError, TypeError, ValueError) as exc:
            return f"{path}: cannot check it ({exc})"
        if size != expected_size:
            return f"{path} has {size} bytes, {expected_size} were written (truncated or replaced)"
        if _sha256(path) != digest:
            return f"{path} differs from what was written (sha256 mismatch)"
    try:
        read_meta(checkpoint)
    except ResumeError as exc:
        return str(exc)
    return None


def _deepspeed_safe_globals() -> list:
    """The plain, non-tensor types DeepSpeed puts in its optimizer states (seen with DeepSpeed 0.19, ZeRO 0-3):
    an IntEnum, a namedtuple and the static / dynamic loss-scaler records. None of them runs code on load."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def no_pickled_code() -> Iterator[None]:
    """Inside: every ``torch.load`` runs with ``weights_only=True``, whatever its caller asks for.

    DeepSpeed's ``TorchCheckpointEngine.load`` (and ZeRO-3's optimizer loader) unpickle their files
    (weights_only off), which would run any code a planted pickle carries. The override turns those
    calls into restricted loads; the types DeepSpeed legitimately stores are allow-listed; anything else
    fails with ``pickle.UnpicklingError`` before any object is built.
    """
    original = torch.load

    def restricted_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = restricted_load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def write_universal(checkpoint: str | os.PathLike) -> Path:
    """Convert ``checkpoint/pytorch_model`` (ZeRO-1/2/3 shards of any world size) into ``checkpoint/universal``
    with DeepSpeed's ``ds_to_universal``, in this process (call on one rank, after every rank saved).

    The result holds, per parameter name, the full fp32 master weight and the optimizer's ``exp_avg``,
    ``exp_avg_sq`` and ``step``, plus the param groups' hyperparameters; any world size can load it. The
    converter's own output (progress bars, prints) goes to the debug log.
    """
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    checkpoint = Path(checkpoint)
    started = time.perf_counter()
    args = argparse.Namespace(input_folder=str(checkpoint / DEEPSPEED_TAG), output_folder=str(checkpoint / UNIVERSAL),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # our module sets no Megatron-style universal_checkpoint_info: the default one fits
                              inject_missing_state=True)
    output = io.StringIO()
    try:
        with no_pickled_code(), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            to_universal(args)
    except Exception:
        log.error("DeepSpeed's universal checkpoint conversion of %s failed; its output:\n%s", checkpoint,
                  output.getvalue()[-4000:])
        raise
    log.debug("ds_to_universal output:\n%s", output.getvalue())
    for copy in (checkpoint / UNIVERSAL).glob("*model_states.pt"):   # the converter copies them unchanged
        original = checkpoint / DEEPSPEED_TAG / copy.name
        if original.stat().st_size != copy.stat().st_size:
            continue
        with contextlib.suppress(OSError):                            # no hard links here: keep the copy
            os.link(original, copy.with_name(f".{copy.name}"))
            os.replace(copy.with_name(f".{copy.name}"), copy)
    log.info("world-size-independent state written to %s in %.1f s", checkpoint / UNIVERSAL,
             time.perf_counter() - started)
    return checkpoint / UNIVERSAL


@contextlib.contextmanager
def _universal_load(accelerator, universal: Path) -> Iterator[None]:
    """Inside: ``accelerator.load_state`` loads the DeepSpeed engine from ``universal`` (DeepSpeed's
    ``checkpoint.load_universal`` mode, which re-partitions it over this run's ranks) and everything else
    (scheduler, RNG) from the checkpoint directory as usual.

    Accelerate always passes the tag ``pytorch_model``: the engine's ``load_checkpoint`` is redirected to the
    universal directory for the duration.
    """
    engines = [model for model in accelerator._models if hasattr(model, "load_checkpoint")]
    if len(engines) != 1:
        raise ResumeError(f"a universal checkpoint holds one DeepSpeed engine, {len(engines)} were prepared")
    engine = engines[0]
    load_checkpoint = engine.load_checkpoint

    def load_universal(load_dir, tag=None, **kwargs):
        return load_checkpoint(str(universal.parent), universal.name, **kwargs)

    engine._config.load_universal_checkpoint = True
    engine.load_checkpoint = load_universal
    try:
        yield
    finally:
        del engine.load_checkpoint
        engine._config.load_universal_checkpoint = False


@torch.no_grad()
def _restore_untrained_state(accelerator, universal: Path) -> list[str]:
    """Copy the module state that no optimizer holds (persistent buffers such as the router's ``level_bias`` or
    the EMA codebooks' counts and sums, and frozen parameters such as the EMA codebooks) from the DeepSpeed
    model-states file in ``universal`` into the live module; returns the names restored.

    DeepSpeed's universal loader rebuilds only the trained parameters (from ``universal/zero/``) and skips the
    model-states file's ``module`` state dict, which would leave these at their init values. Every name must
    be in the file with the live shape (else :class:`ResumeError`, nothing copied). Call inside
    :func:`no_pickled_code`.
    """
    engine = accelerator._models[0]
    module = engine.module
    trained = {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    live = {name: value for name, value in module.state_dict(keep_vars=True).items() if name not in trained}
    if not live:
        return []
    partitioned = sorted(name for name, value in live.items() if hasattr(value, "ds_id"))
    if partitioned:
        raise ResumeError(f"frozen parameters {partitioned[:10]} are partitioned (ZeRO-3) and a universal checkpoint "
                          f"does not hold their values: resume on the checkpoint's world size")
    files = sorted(universal.glob("*model_states.pt"))   # ZeRO-3: zero_pp_rank_0_... (rank 0's) sorts first
    if not files:
        raise ResumeError(f"{universal} has no DeepSpeed model-states file: the checkpoint is damaged")
    saved = torch.load(files[0], map_location="cpu", weights_only=True).get("module") or {}
    missing = sorted(name for name in live if name not in saved)
    shapes = sorted((name, tuple(saved[name].shape), tuple(value.shape)) for name, value in live.items()
                    if name in saved and saved[name].shape != value.shape)
    if missing or shapes:
        raise ResumeError(f"{files[0]} does not hold this model's buffers / frozen parameters: missing {missing[:10]}, "
                          f"shape (saved, model) differs for {shapes[:10]}")
    for name, value in live.items():
        value.copy_(saved[name])
    return sorted(live)


def _restore_group_hyperparameters(accelerator, universal: Path) -> None:
    """ZeRO-3's universal loader gives every param group the hyperparameters of group 0 (DeepSpeed 0.19:
    the decay and no-decay groups would share one weight decay, two models one learning rate): set each
    group's own saved values again (lr, weight_decay, betas, ...; not the parameters)."""
    saved_path = universal / "zero" / "optimizer_state.pt"
    saved = torch.load(saved_path, map_location="cpu", weights_only=True)["optimizer_state_dict"]["param_groups"]
    groups = accelerator._models[0].optimizer.optimizer.param_groups
    if len(saved) != len(groups):
        raise ResumeError(f"{saved_path} holds {len(saved)} param groups, this run's optimizer {len(groups)}: "
                          f"the optimizer's param groups changed since the checkpoint")
    for group, saved_group in zip(groups, saved):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def check_compatible(meta: Mapping[str, Any], world_size: int, zero_stage: int,
                     config_identity: Mapping[str, Any], *, grad_accum: Optional[int] = None,
                     allow_new_global_batch: bool = False, identity_defaults: Optional[Mapping[str, Any]] = None,
                     ) -> None:
    """Raise :class:`ResumeError` naming every difference between a checkpoint and this run.

    ``identity_defaults`` (``StageConfig.identity_defaults``): a key the checkpoint's config identity lacks (an
    option added after it was written) compares as its default, so a new option left at its default resumes.
    Another world size is accepted when the checkpoint is world-size independent (``meta.json``
    ``world_size_independent``: ZeRO-0, or ZeRO-1/2/3 with its universal copy); a ZeRO stage change never.
    With ``grad_accum``, this run's global batch (world size x grad_accum) must be the checkpoint's too,
    unless ``allow_new_global_batch``.
    """
    problems = []
    batch = None if grad_accum is None or allow_new_global_batch else global_batch_problem(
        layout_of(meta), world_size, grad_accum)
    if batch:
        problems.append(batch)
    if meta["world_size"] != world_size and not meta.get("world_size_independent", False):
        problems.append(f"world size: checkpoint {meta['world_size']} processes, this run {world_size}. "
                        f"The checkpoint holds per-rank ZeRO shards only (no world-size-independent "
                        f"{UNIVERSAL}/ state: written by an older version): relaunch with {meta['world_size']} "
                        f"processes in total (or start a new run.dir)")
    if meta["zero_stage"] != zero_stage:
        problems.append(f"ZeRO stage: checkpoint {meta['zero_stage']}, this run {zero_stage}: relaunch with "
                        f"--zero {meta['zero_stage']} (train.zero_stage={meta['zero_stage']})")
    differing = differences(meta["config_identity"], config_identity, defaults=identity_defaults)
    newer = sorted(key for key, (saved, _) in differing.items() if saved == ABSENT)
    if newer:   # keys added after the checkpoint was written that have no default: no setting makes the runs equal
        problems.append(f"the checkpoint was written by an older varitok, before the options {', '.join(newer)} "
                        f"existed: this version cannot resume it. Start a new run.dir (or resume with the "
                        f"varitok version that wrote it)")
        differing = {key: values for key, values in differing.items() if key not in newer}
    if differing:
        listed = describe_differences(differing, saved="checkpoint", current="this run")
        problems.append(f"config differs ({listed}). Resume with the run's own config (RUN/config.yaml) or use "
                        f"a new run.dir")
    if problems:
        raise ResumeError("cannot resume from this checkpoint:\n  - " + "\n  - ".join(problems))


def layout_of(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The saved layout {world_size, grad_accum, num_workers} of a checkpoint's meta.json (a checkpoint of
    format 1 records only its world size: grad_accum and num_workers are None)."""
    layout = meta.get("layout") or {}
    return {"world_size": int(meta["world_size"]), "grad_accum": layout.get("grad_accum"),
            "num_workers": layout.get("num_workers")}


def global_batch_problem(saved: Mapping[str, Any], world_size: int, grad_accum: int) -> Optional[str]:
    """Why ``world_size`` x ``grad_accum`` micro-batches per optimizer step differ from the checkpoint's
    ``saved`` layout (:func:`layout_of`), and the grad_accum that keeps it (``data.epoch.grad_accum_for``);
    None when they agree or the checkpoint does not record its grad_accum."""
    if saved.get("grad_accum") is None:
        return None
    global_batch = int(saved["world_size"]) * int(saved["grad_accum"])
    if global_batch == world_size * grad_accum:
        return None
    try:
        keep = f"grad_accum {grad_accum_for(global_batch, world_size)} keeps it on {world_size} processes"
    except ValueError as exc:
        keep = str(exc)
    return (f"global batch: the checkpoint made optimizer steps of {saved['world_size']} processes x grad_accum "
            f"{saved['grad_accum']} micro-batches, this run {world_size} x {grad_accum} ({keep}); or set "
            f"train.allow_new_global_batch=true to continue with another global batch")


def saved_layout(run_dir: str | os.PathLike, spec: Optional[str] = "auto") -> Optional[dict[str, Any]]:
    """The layout of the checkpoint ``resume(spec)`` will load (None when it starts fresh), read before the
    accelerator exists so that the stage can choose ``grad_accum`` (``data.epoch.grad_accum_for``).

    Every rank may call it (it reads files only). "auto" picks the newest intact checkpoint, as resume does.
    """
    path = newest_intact_checkpoint(run_dir) if str(spec) == "auto" else find_checkpoint(run_dir, spec)
    return None if path is None else layout_of(read_meta(path))


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

    ``config_identity`` is what must match to resume (e.g. the model / loss / data config sections), a key the
    checkpoint lacks comparing as its ``identity_defaults`` value (see :func:`check_compatible`);
    ``stage`` and ``model_class`` ("module:Class", default from :data:`MODEL_CLASSES`) tell
    ``varitok export`` how to rebuild the model. ``num_workers`` (loader workers per process) is recorded
    in the layout. ``universal`` writes the world-size-independent copy of ZeRO-1/2/3 states beside each
    checkpoint (rank 0, after the shards). ``allow_new_global_batch``: resume even when this run's
    world size x grad_accum differs from the checkpoint's (otherwise a :class:`ResumeError`).
    After :meth:`resume`, :attr:`resumed_layout` is the loaded checkpoint's layout (None: fresh start).
    """

    def __init__(self, run_dir: str | os.PathLike, accelerator, keep_last: int, config_identity: Mapping[str, Any],
                 *, identity_defaults: Optional[Mapping[str, Any]] = None, stage: Optional[str] = None,
                 model_class: Optional[str] = None, num_workers: Optional[int] = None, universal: bool = True,
                 allow_new_global_batch: bool = False):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.config_identity = json.loads(json.dumps(dict(config_identity)))  # plain JSON types, compared as saved
        self.identity_defaults = json.loads(json.dumps(dict(identity_defaults or {})))
        self.stage = stage
        self.model_class = model_class or MODEL_CLASSES.get(stage or "")
        self.num_workers = num_workers
        self.universal = universal
        self.allow_new_global_batch = allow_new_global_batch
        self.resumed_layout: Optional[dict[str, Any]] = None
        self._layouts: Optional[list[dict[str, Any]]] = None   # history, from the resumed checkpoint on
        self._check_shared_filesystem()

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.accelerator)

    @property
    def layout(self) -> dict[str, Any]:
        """This run's {world_size, grad_accum, num_workers} (grad_accum None for an accelerator without one)."""
        accum = getattr(self.accelerator, "gradient_accumulation_steps", None)
        return {"world_size": self.world_size, "grad_accum": None if accum is None else int(accum),
                "num_workers": self.num_workers}

    def _writes_universal(self) -> bool:
        """ZeRO-1/2/3 partition the optimizer state: a universal copy makes it world-size independent."""
        return self.universal and self.zero_stage > 0 and len(getattr(self.accelerator, "_models", ())) == 1

    def _check_shared_filesystem(self) -> None:
        """Every rank must see rank 0's files: checkpoints are written by all ranks into one directory."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        token = [uuid.uuid4().hex if acc.is_main_process else None]
        probe = self.root / ".shared-fs-probe"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(probe, token[0])
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
                if stale.is_symlink():  # planted: remove the link, never what it points to
                    stale.unlink()
                else:
                    shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if extra:
            with AtomicFile(extra_state_path(tmp, acc.process_index)) as handle:
                torch.save({name: obj.state_dict() for name, obj in extra.items()}, handle)
        weights = export_state() if export_state is not None else self._default_export_state()
        ema_state = ema.state_dict_for() if ema is not None else None
        if acc.is_main_process:
            save_state_dict(weights, tmp / MODEL_WEIGHTS, metadata={"step": str(step)})
            if ema_state is not None:
                save_state_dict(ema_state, tmp / EMA_WEIGHTS, metadata={
                    "step": str(step), "decay": repr(ema.decay), "num_updates": str(ema.num_updates)})
        acc.wait_for_everyone()
        if acc.is_main_process:
            universal = self._writes_universal()
            if universal:
                write_universal(tmp)
            self._publish(step, tmp, final, universal)
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

    def _publish(self, step: int, tmp: Path, final: Path, universal: bool) -> None:
        layouts = self._layouts if self._layouts is not None else [{"step": 0, **self.layout}]
        meta = {"step": step, "world_size": self.world_size, "zero_stage": self.zero_stage,
                "config_identity": self.config_identity, "time": time.time(), "stage": self.stage,
                "model_class": self.model_class, "format": 2, "layout": self.layout, "layouts": layouts,
                "universal": UNIVERSAL if universal else None,
                "world_size_independent": universal or self.zero_stage == 0}
        atomic_write(tmp / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        write_checksums(tmp)  # last: its presence and contents vouch for every other file
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

        ``spec``: "auto" (newest intact checkpoint of this run, 0 when there is none; damaged newer ones are
        skipped with a warning), a checkpoint directory (must be intact), or None. Raises
        :class:`ResumeError` before loading anything when the checkpoint's ZeRO stage or config identity
        differ from this run, its world size differs and it is not world-size independent, this run's
        global batch (world size x grad_accum) differs from the checkpoint's (unless
        ``allow_new_global_batch``), or one of its pickles holds more than plain state. After a successful
        load from an older checkpoint than this run's newest, the newer ones are moved aside
        (``abandoned-step-M-<time>``).

        On another world size the model and optimizer come from the universal copy, re-partitioned over
        this run's ranks, the module's buffers and frozen parameters from its model-states file
        (:func:`_restore_untrained_state`; ZeRO-0: from the whole state every rank loads anyway); each
        ``extra`` object then receives the list of every saved rank's state (saved rank order); the RNG
        state of a rank the checkpoint did not have stays as seeded.
        """
        path = self._select(spec)
        if path is None:
            return 0
        meta = read_meta(path)
        check_compatible(meta, self.world_size, self.zero_stage, self.config_identity,
                         grad_accum=self.layout["grad_accum"], allow_new_global_batch=self.allow_new_global_batch,
                         identity_defaults=self.identity_defaults)
        saved = layout_of(meta)
        regrouped = saved["world_size"] != self.world_size
        acc = self.accelerator
        try:
            with no_pickled_code():
                if regrouped and meta.get("universal"):
                    with _universal_load(acc, path / meta["universal"]):
                        acc.load_state(str(path))
                    _restore_untrained_state(acc, path / meta["universal"])
                    if self.zero_stage == 3:
                        _restore_group_hyperparameters(acc, path / meta["universal"])
                else:
                    acc.load_state(str(path))
                names = sorted(extra) if extra else []
                states = self._load_extra(path, names, saved["world_size"] if regrouped else None) if names else {}
        except pickle.UnpicklingError as exc:
            raise ResumeError(f"refusing to load {path}: one of its files holds pickled objects other than plain "
                              f"state, which could run code ({str(exc).splitlines()[0]}); it was not written by this "
                              f"training code, or was tampered with. Move it aside and resume from another "
                              f"checkpoint") from None
        for name, obj in (extra or {}).items():
            obj.load_state_dict(states[name])
        if ema is not None:
            ema.load_state_dict(read_ema_state(path))
        step = int(meta["step"])
        self.resumed_layout = saved
        self._layouts = [dict(entry) for entry in meta.get("layouts") or [{"step": 0, **saved}]]
        if {k: self._layouts[-1].get(k) for k in saved} != self.layout:
            self._layouts.append({"step": step, **self.layout})
            log.info("resuming step %d with layout %s (checkpoint: %s)", step, self.layout, saved)
        acc.wait_for_everyone()  # every rank has loaded before rank 0 renames anything
        if acc.is_main_process:
            self._abandon_newer_than(step, f"resumed from {path} (step {step})")
        acc.wait_for_everyone()
        return step

    def _load_extra(self, path: Path, names: list[str], saved_world: Optional[int] = None) -> dict:
        """This rank's saved ``extra`` states; with ``saved_world`` (another world size) the list of every rank's
        state of that run instead (saved rank order), which the streams' ``load_state_dict`` merge."""
        if saved_world is None:
            return self._read_extra(extra_state_path(path, self.accelerator.process_index), names)
        per_rank = [self._read_extra(extra_state_path(path, rank), names) for rank in range(saved_world)]
        return {name: [state[name] for state in per_rank] for name in names}

    @staticmethod
    def _read_extra(own: Path, names: list[str]) -> dict:
        if not own.is_file():
            raise ResumeError(f"{own} missing: the checkpoint was saved without the extra state {names}")
        saved = torch.load(own, map_location="cpu", weights_only=True)
        for name in names:
            if name not in saved:
                raise ResumeError(f"{own} has no state for {name!r} (it holds {sorted(saved)})")
        return saved

    def _select(self, spec: Optional[str]) -> Optional[Path]:
        """The checkpoint to resume from, the same on every rank: rank 0 checks the candidates' checksum lists
        (newest first for "auto") and broadcasts its choice or its error, so no rank waits for a failed one."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        choice: list = [None, None]  # [path or None, error or None]
        if acc.is_main_process:
            try:
                choice[0] = str(path) if (path := self._select_here(spec)) is not None else None
            except ResumeError as exc:
                choice[1] = str(exc)
        if acc.num_processes > 1:
            broadcast_object_list(choice)
        if choice[1] is not None:
            raise ResumeError(choice[1])
        return Path(choice[0]) if choice[0] is not None else None

    def _select_here(self, spec: Optional[str]) -> Optional[Path]:
        path = find_checkpoint(self.run_dir, spec) if str(spec) != "auto" else None
        if path is not None:
            problem = checkpoint_problem(path)
            if problem:
                raise ResumeError(f"cannot resume from {path}: {problem}. Pass another checkpoint, or --resume auto "
                                  f"for the newest intact one")
            return path
        return newest_intact_checkpoint(self.run_dir) if str(spec) == "auto" else None


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
    """``"package.module:Class"`` -> the class, for varitok's own model classes only.

    A checkpoint's meta.json names the class, and importing a module runs its code, so only the classes of
    :data:`MODEL_CLASSES` are imported. A class from any other module is accepted only when that module is
    already loaded by the running program (a script or test training its own ``PretrainedMixin`` model) and
    the class is a ``PretrainedMixin``; nothing new is imported for it.
    """
    module_name, _, class_name = str(path).partition(":")
    if not class_name:
        raise ValueError(f"model class {path!r} must look like 'package.module:Class'")
    if path in MODEL_CLASSES.values():
        module = importlib.import_module(module_name)
    elif module_name in sys.modules:
        module = sys.modules[module_name]
    else:
        raise ConfigError(f"model class {path!r} is not one of varitok's model classes "
                          f"({sorted(MODEL_CLASSES.values())}); refusing to import a module named by a checkpoint file")
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, PretrainedMixin)):
        raise ConfigError(f"model class {path!r} is not a PretrainedMixin model class")
    return cls


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
