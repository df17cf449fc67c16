"""Stage 2: pre-tokenize WebDataset shards into variable-length Arrow code files (one part per shard).

    varitok tokenize --tokenizer runs/tok/export --shards data/shards --output data/codes --views flip

Distribution: the shards of the sorted expanded spec are numbered 0..N-1; shard i is tokenized by rank
``i % world_size`` into ``OUT/part-{i:06d}.arrow``, so any number of processes and machines (``torchrun``,
``accelerate launch``, or plain env ``RANK`` / ``WORLD_SIZE``) write disjoint parts of one output directory
on a shared file system. Parts already recorded in ``OUT/manifest.json`` are skipped, so a re-run after a
crash or ``kill -9`` finishes the job, and every part's rows are a pure function of its shard (batches
never span shards), identical whatever the number of ranks or workers.

Views (``view`` column): ``center`` = the centered square crop resized to S (id 0); ``flip`` = center (0) and
its mirror (1); ``tencrop`` = shorter side resized to ``S + S // 8`` (288 for 256 px, 72 for 64 px), then
torchvision's ten-crop order: corners top-left, top-right, bottom-left, bottom-right (0..3), center (4),
and the horizontal mirrors of those five (5..9).

``--granularity-ratio`` re-targets the router: an entropy router moves its entropy thresholds so that
the given share of regions (per finer level, on its calibration data) is coded finely; a learned router
has its budget baked into its weights and a fixed router has none, so both refuse the flag.

Samples that cannot be read (truncated or garbled tar, member name not UTF-8, member not matching the
digest in its ``.json``, missing image, undecodable bytes, bad label) are skipped, counted in the summary
and listed in ``OUT/skipped/part-{i:06d}.jsonl`` (written atomically, just before the part itself is
recorded). A watchdog (``--watchdog-seconds``, pipeline.watchdog) ends every rank with an error when one
of them finishes no batch for that long, instead of leaving the others waiting at the final barrier.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.codes import CodeManifest, CodeWriter, ManifestMismatchError, part_file_name
from data.files import atomic_write, make_folder, temp_files_of
from data.tar import BadSample, RawSample, expand_shard_spec, read_samples, shard_sizes
from data.transforms import crop_resize_flip, decode_pil, decode_sample, to_unit_range
from data.world import resolve_world
from models.hub import WEIGHTS_NAME, config_hash, file_sha256
from models.tokenizer import ImageCodes, Tokenizer
from pipeline.precision import PRECISIONS, autocast, resolve_precision
from pipeline.training import to_device
from pipeline.watchdog import Watchdog, shared_token

VIEW_COUNTS = {"center": 1, "flip": 2, "tencrop": 10}
DEFAULT_WATCHDOG_S = 1800.0
SKIPPED_DIR = "skipped"


# ----------------------------------------------------------------------------------------- views
def tencrop_resize(size: int) -> int:
    """Shorter side before the ten crops of side ``size``: ``size + size // 8`` (256 -> 288)."""
    return size + size // 8


def make_views(image: torch.Tensor, mode: str, size: int) -> torch.Tensor:
    """uint8 ``3 x H x W`` -> uint8 ``V x 3 x size x size``, the views of ``mode`` in view-id order."""
    if mode == "center":
        return crop_resize_flip(image, size, 0.5, False)[None]
    if mode == "flip":
        center = crop_resize_flip(image, size, 0.5, False)
        return torch.stack([center, center.flip(-1)])
    if mode == "tencrop":
        import torchvision.transforms.v2.functional as TF   # ~3 s to load (torch._dynamo): only when used

        resized = TF.resize(image, tencrop_resize(size), antialias=True)
        return torch.stack(TF.ten_crop(resized, [size, size]))
    raise ValueError(f"--views must be one of {', '.join(VIEW_COUNTS)}, got {mode!r}")


def decode_min_side(mode: str, size: int) -> int:
    """The shorter side a reduced-size JPEG decode must keep for the views of ``mode``."""
    return tencrop_resize(size) if mode == "tencrop" else size


def decode_views(sample: RawSample, mode: str, size: int) -> tuple[torch.Tensor, int]:
    """(uint8 ``V x 3 x size x size`` views of ``mode``, label) of a shard sample; raises data.tar.BadSample
    (reason: detail) when it is unusable (data.transforms.decode_sample)."""
    min_side = decode_min_side(mode, size)
    return decode_sample(sample, lambda data: make_views(decode_pil(data, min_side=min_side), mode, size))


# ----------------------------------------------------------------------------------------- shards
class PartBatches(IterableDataset):
    """Row batches of the parts ``(part index, shard path)`` in ``parts``; worker w of W reads parts w::W.

    Yields dicts: part, shard, keys (list[str], one per row), labels int32 [B], views uint8 [B], images
    uint8 ``B x 3 x S x S`` (B <= batch_size rows = image views), images_read (decoded images in this
    batch), skipped (entries {key, reason} since the previous yield) and last (the part's final batch,
    possibly with B = 0). Batches never span parts.
    """

    def __init__(self, parts: Sequence[tuple[int, str]], mode: str, size: int, batch_size: int) -> None:
        self.parts, self.mode, self.size, self.batch_size = list(parts), mode, size, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for part, shard in self.parts[worker::workers]:
            yield from self._part_batches(part, shard)

    def _part_batches(self, part: int, shard: str) -> Iterator[dict[str, Any]]:
        rows: list[tuple[str, int, int, torch.Tensor]] = []
        skipped: list[dict[str, str]] = []
        images_read = 0

        def batch(count: int, last: bool) -> dict[str, Any]:
            nonlocal rows, skipped, images_read
            taken, rows = rows[:count], rows[count:]
            out = {"part": part, "shard": shard, "keys": [r[0] for r in taken],
                   "labels": torch.tensor([r[1] for r in taken], dtype=torch.int32),
                   "views": torch.tensor([r[2] for r in taken], dtype=torch.uint8),
                   "images": (torch.stack([r[3] for r in taken]) if taken
                              else torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)),
                   "images_read": images_read, "skipped": skipped, "last": last}
            skipped, images_read = [], 0
            return out

        for sample in read_samples(shard):
            try:
                views, label = decode_views(sample, self.mode, self.size)
            except BadSample as exc:
                skipped.append({"key": sample.key, "reason": str(exc)})
                continue
            images_read += 1
            rows.extend((sample.key, label, v, view) for v, view in enumerate(views))
            while len(rows) >= self.batch_size:
                yield batch(self.batch_size, last=False)
        yield batch(len(rows), last=True)


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers only decode; the main process owns the cores for the encoder


# ----------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(export_dir: str | os.PathLike, granularity_ratio: Optional[Sequence[float]],
                   device: torch.device) -> Tokenizer:
    """``Tokenizer.from_pretrained(export_dir)`` in eval mode on ``device``, router re-targeted when asked."""
    tok = Tokenizer.from_pretrained(export_dir)
    if granularity_ratio:
        mode = tok.config.router.mode
        if mode != "entropy":
            raise ValueError(
                f"--granularity-ratio needs a tokenizer with an entropy router; {export_dir} has a {mode!r} router "
                f"(a learned router's budget model.router.targets={tok.config.router.targets} is baked into its "
                f"weights; a fixed router has none). Drop the flag, or train/export an entropy-router tokenizer")
        tok.set_granularity_ratio(list(granularity_ratio))
    return tok.to(device).eval()


def tokenizer_identity(tok: Tokenizer, export_dir: str | os.PathLike, image_size: int, views: str) -> dict[str, Any]:
    """What must match for codes to share an output directory: the config (after any router re-target),
    the weights, and the preprocessing (image size, views)."""
    return {"config_hash": config_hash(tok.config), "weights_sha256": file_sha256(Path(export_dir) / WEIGHTS_NAME),
            "router_targets": [float(t) for t in tok.config.router.targets], "image_size": int(image_size),
            "views": views}


def encode_rows(tok: Tokenizer, images: torch.Tensor, precision: str = "fp32"
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    """uint8 ``B x 3 x S x S`` on the model's device -> (grains uint8 [B, Hs, Ws], B int64 arrays (L_i, K)).

    ``precision`` (fp32 / bf16 / fp16) is the encoder's autocast; the quantizer looks codes up in fp32 regardless.
    """
    with torch.inference_mode(), autocast(precision, images.device):
        codes: list[ImageCodes] = tok.encode(to_unit_range(images))
    grains = torch.stack([c.grain for c in codes]).cpu().numpy()
    lengths = [len(c.codes) for c in codes]
    flat = torch.cat([c.codes for c in codes]).cpu().numpy()
    return grains, np.split(flat, np.cumsum(lengths)[:-1])


# ----------------------------------------------------------------------------------------- distribution
def resolve_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process (:func:`data.world.resolve_world`: torch.distributed, launcher env,
    an srun step, mpirun; else 0 / 1)."""
    world = resolve_world()
    return world.rank, world.size


def _init_process_group() -> bool:
    """Join a gloo group when launched as several processes with a rendezvous (torchrun, accelerate launch,
    or env MASTER_ADDR / MASTER_PORT, also under srun / mpirun). Gloo suffices: the only collectives are a
    barrier and a few counters."""
    rank, world_size = resolve_rank_world()
    if (world_size > 1 and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
            and torch.distributed.is_available() and not torch.distributed.is_initialized()):
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        return True
    return False


def assign_parts(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shard indices rank ``rank`` tokenizes: i % world_size == rank."""
    return list(range(rank, num_shards, world_size))


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------- outputs
def skipped_path(out_dir: Path, part: int) -> Path:
    return out_dir / SKIPPED_DIR / f"{Path(part_file_name(part)).stem}.jsonl"


def _write_skipped(out_dir: Path, part: int, shard: str, entries: list[dict[str, str]]) -> None:
    path = skipped_path(out_dir, part)
    if not entries:
        return
    make_folder(path.parent)
    atomic_write(path, "".join(json.dumps({"shard": os.path.basename(shard), **e}) + "\n" for e in entries))


def read_skipped(out_dir: str | os.PathLike, parts: Optional[Sequence[int]] = None) -> list[dict[str, str]]:
    """Skipped-sample entries {shard, key, reason} of ``parts`` (default: every listed part)."""
    directory = Path(out_dir) / SKIPPED_DIR
    paths = (sorted(directory.glob("part-*.jsonl")) if parts is None
             else [skipped_path(Path(out_dir), p) for p in parts])
    return [json.loads(line) for path in paths if path.is_file() for line in path.read_text().splitlines() if line]


def _clear_stale(out_dir: Path, parts: Sequence[int]) -> None:
    """Remove what an interrupted earlier run left for ``parts`` (this rank owns them, nobody else
    writes them): temp part files and skipped lists of parts that were never recorded."""
    for part in parts:
        for temp in temp_files_of(out_dir / part_file_name(part)):
            temp.unlink(missing_ok=True)
        skipped_path(out_dir, part).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- the stage
def tokenize(tokenizer_dir: str | os.PathLike, shards: str | Sequence[str], output: str | os.PathLike, *,
             views: str = "center", batch_size: int = 64, granularity_ratio: Optional[Sequence[float]] = None,
             image_size: Optional[int] = None, workers: int = 0, precision: str = "auto",
             rank: Optional[int] = None, world_size: Optional[int] = None,
             device: Optional[str | torch.device] = None, progress: bool = True,
             watchdog: Optional[Watchdog] = None) -> dict[str, Any]:
    """Tokenize this rank's shards of ``shards`` into ``output``; returns this rank's summary dict.

    image_size defaults to the tokenizer's ``encoder.resolution``; precision ``auto`` = bf16 autocast on
    CUDA, fp32 on CPU. ``watchdog`` gets a beat per batch. Raises ManifestMismatchError when ``output``
    holds codes of another tokenizer or preprocessing, ValueError / FileNotFoundError for bad arguments.
    """
    start = time.perf_counter()
    if views not in VIEW_COUNTS:
        raise ValueError(f"--views must be one of {', '.join(VIEW_COUNTS)}, got {views!r}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    default_rank, default_world = resolve_rank_world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    device = torch.device(device) if device is not None else _default_device()
    precision = resolve_precision(precision, device)

    shard_list = sorted(expand_shard_spec(shards))
    tok = load_tokenizer(tokenizer_dir, granularity_ratio, device)
    size = int(image_size or tok.config.encoder.resolution)
    grain_shape = tok.grain_shape(size)
    if size % tok.factors[0]:
        raise ValueError(f"--image-size {size} must be a multiple of the coarsest factor {tok.factors[0]}")
    out_dir = Path(output)
    manifest = CodeManifest.create(out_dir, tokenizer_identity(tok, tokenizer_dir, size, views),
                                   tok.num_levels, len(tok.codebook_sizes), tok.codebook_sizes, grain_shape)
    mine = assign_parts(len(shard_list), rank, world_size)
    complete = set(manifest.refresh().parts)
    todo = [i for i in mine if i not in complete]
    _clear_stale(out_dir, todo)
    total_images = sum(shard_sizes([shard_list[i] for i in todo])[0]) if todo else 0

    dataset = PartBatches([(i, shard_list[i]) for i in todo], views, size, batch_size)
    loader = (DataLoader(dataset, batch_size=None, num_workers=min(workers, len(todo)), worker_init_fn=_init_worker,
                         pin_memory=device.type == "cuda") if workers and todo else dataset)
    from tqdm import tqdm

    writers: dict[int, CodeWriter] = {}
    skipped: dict[int, list[dict[str, str]]] = {}
    counts = {"images": 0, "rows": 0, "skipped": 0, "parts_written": 0}
    bar = tqdm(total=total_images, unit="img", desc=f"tokenize ({len(todo)}/{len(mine)} parts to do)",
               disable=not (progress and rank == 0), dynamic_ncols=True)
    try:
        for batch in loader:
            part = batch["part"]
            if part not in writers:
                writers[part] = CodeWriter(out_dir, part, manifest, source_shard=os.path.basename(batch["shard"]))
                skipped[part] = []
            skipped[part].extend(batch["skipped"])
            if len(batch["keys"]):
                grains, codes = encode_rows(tok, to_device(batch["images"], device), precision)
                writers[part].write(batch["keys"], batch["labels"].numpy(), batch["views"].numpy(), grains, codes)
            counts["images"] += batch["images_read"]
            counts["rows"] += len(batch["keys"])
            bar.update(batch["images_read"] + len(batch["skipped"]))
            if batch["last"]:
                _write_skipped(out_dir, part, batch["shard"], skipped.pop(part))
                writers.pop(part).close()
                counts["parts_written"] += 1
            if watchdog is not None:
                watchdog.beat(f"part {part} ({os.path.basename(batch['shard'])})")
        counts["skipped"] = len(read_skipped(out_dir, todo))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return {"rank": rank, "world_size": world_size, "output": str(out_dir), "parts_total": len(shard_list),
            "parts_mine": len(mine), "parts_already_complete": len(mine) - len(todo), **counts,
            "seconds": round(seconds, 3), "images_per_s": round(counts["images"] / seconds, 2),
            "device": str(device)}


def _reduce_summaries(summary: dict[str, Any]) -> dict[str, Any]:
    """Sum the counters over ranks (max of seconds); a no-op without a process group."""
    if not torch.distributed.is_initialized():
        return summary
    keys = ["parts_mine", "parts_already_complete", "images", "rows", "skipped", "parts_written"]
    totals = torch.tensor([summary[k] for k in keys], dtype=torch.float64)
    seconds = torch.tensor([summary["seconds"]], dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    out = {**summary, **{k: int(v) for k, v in zip(keys, totals.tolist())}, "seconds": seconds.item()}
    out["images_per_s"] = round(out["images"] / max(out["seconds"], 1e-9), 2)
    out.pop("rank")
    return out


# ----------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="export directory (config.json + model.safetensors)")
    parser.add_argument("--shards", required=True, help="shard directory, brace pattern, or comma-separated list")
    parser.add_argument("--output", required=True, help="code directory (created; re-runs resume it)")
    parser.add_argument("--views", default="center", choices=list(VIEW_COUNTS), help="augmentation views per image")
    parser.add_argument("--batch-size", type=int, default=64, help="rows (image views) per encoder batch")
    parser.add_argument("--granularity-ratio", type=float, nargs="+", default=None, metavar="R",
                        help="share of regions per finer level 1..G-1 (entropy router only)")
    parser.add_argument("--image-size", type=int, default=None, help="pixels; default: the tokenizer's resolution")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes per rank (0 = in process)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="encoder precision (fp32 weights, autocast; codes looked up in fp32): "
                             "auto = bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--watchdog-seconds", type=float, default=DEFAULT_WATCHDOG_S,
                        help="exit every rank with an error when a rank makes no progress (no batch done) for this "
                             f"long (default {DEFAULT_WATCHDOG_S:.0f}; 0 disables)")


def run(args: argparse.Namespace) -> int:
    created_group = _init_process_group()
    rank, world_size = resolve_rank_world()
    grouped = torch.distributed.is_initialized()
    # Ranks without a process group never wait on each other: each watches itself only.
    watchdog = Watchdog(args.output, args.watchdog_seconds, rank=rank, world_size=max(world_size, rank + 1),
                        token=shared_token(), name="tokenize", watched=None if grouped else [rank])
    try:
        watchdog.start()
        summary = tokenize(args.tokenizer, args.shards, args.output, views=args.views, batch_size=args.batch_size,
                           granularity_ratio=args.granularity_ratio, image_size=args.image_size,
                           workers=args.workers, precision=args.precision, progress=not args.no_progress,
                           watchdog=watchdog)
        watchdog.idle()  # waiting at the barrier for slower ranks is not a stall; a stalled rank still is
        is_rank_zero = summary["rank"] == 0
        if grouped:
            torch.distributed.barrier()
        summary = _reduce_summaries(summary)
    except (ManifestMismatchError, FileNotFoundError, ValueError) as exc:
        print(f"varitok tokenize: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        watchdog.stop()
        if created_group:
            torch.distributed.destroy_process_group()
    if is_rank_zero:
        print(f"tokenized {summary['images']} images into {summary['rows']} rows "
              f"({summary['parts_written']} parts written, {summary['parts_already_complete']} already complete, "
              f"{summary['skipped']} samples skipped, listed in {Path(args.output) / SKIPPED_DIR}) in "
              f"{summary['seconds']:.1f} s ({summary['images_per_s']} images/s)")
        print(json.dumps(summary), flush=True)
    return 0
