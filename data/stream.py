"""Streaming loader over WebDataset tar shards: canonical units, equal steps per rank, exact resume on any layout.

Usage::

    stream = ShardStream("shards/", batch_size=32, image_size=256, num_workers=2, seed=0,
                         canonical_units=64, grad_accum=4)
    for batch in stream:          # one epoch of exactly stream.steps_per_epoch batches
        batch["image"]            # float32 B x 3 x S x S in [-1, 1]
        batch["label"]            # int64 B (-1 when the shard has no .cls)
        batch["key"]              # list[str] of B sample keys
    stream.save_state_file(ckpt)  # every rank; load_state_file(ckpt) continues here on any (ranks, workers)

With ``dtype=torch.uint8`` the images stay bytes (``0..255``): convert them where the model runs with
:func:`data.transforms.to_unit_range` (on a GPU: 4x less host-to-device traffic and no CPU time in the
training process; this is what ``train-tokenizer`` does).

How an epoch is built (everything is a pure function of seed, epoch, canonical unit and position; the rules
are the functions of :mod:`data.epoch`):

* There are ``C`` *canonical units* (``canonical_units``; default ``world_size * W`` with
  ``W = max(1, num_workers)``), fixed for a run. Shards are permuted by ``(seed, epoch)`` and dealt greedily
  to the C units (each shard to the unit holding the fewest samples so far); with fewer shards than units,
  every unit reads all shards and keeps every C-th sample. In resampled mode each unit draws shards with
  replacement from its own ``(seed, epoch, unit, pass)`` generator.
* A unit's stream is its shards read in order through a shuffle buffer seeded by ``(seed, epoch, unit, pass)``;
  when it runs dry it starts again from its first shard (``pass + 1``). The crop and flip of the sample at raw
  position ``p`` are seeded by ``(seed, epoch, unit, p)``; a corrupt sample consumes its position.
* The epoch is a global sequence of ``T = floor(N / B / K) * K`` micro-batch *entries* (``K = world_size *
  grad_accum``, the micro-batches of one optimizer step; ``ceil`` when ``drop_last=False``, the repeat rule
  fills): entry ``e`` is the next ``B`` good samples of unit ``e % C``. The entries do not depend on the layout.
* Layout ``(R, W)`` with ``R * W`` dividing ``C``: rank ``r``'s batch ``t`` of the epoch is entry ``t * R + r``,
  made by logical worker ``t % W``, which therefore always serves the same ``C / (R * W)`` units (one reader
  per unit, entries in order). Every rank yields ``steps_per_epoch = T / R`` batches.

Workers live across epochs: one DataLoader serves consecutive epochs (no fork at each epoch start, and
the next epoch's first batches are prefetched while the current one ends); it restarts only when the
stream is moved elsewhere (``set_epoch`` to another epoch, ``load_state_dict``). Decoded batches travel to
the main process through a small ring of shared-memory buffers per worker, reused once the main process
has converted them (see :class:`_BatchProducer`).

Exact resume: the state holds the global entries consumed and, per unit, how many raw samples its stream has
consumed. Each rank saves the units it serves; loading merges the files of every saved rank, so a run saved
with ``(R, W)`` continues on any ``(R', W')`` with ``R' * W'`` dividing ``C``: each unit re-reads its consumed
tar members without decoding them, then continues exactly where it stopped.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.epoch import (batch_unit, check_layout, entries_per_epoch, rank_units, seed_int, unit_pass_shards,
                        worker_units)
from data.files import atomic_write
from data.identity import check_same, describe_differences, differences
from data.tar import BadSample, RawSample, expand_shard_spec, read_samples, shard_sizes
from data.transforms import CROPS, DECODERS, decode_sample, load_image, sample_augmentation, to_unit_range
from data.world import resolve_world

__all__ = ["ShardStream", "StreamStats", "merge_states", "read_state_files", "STATE_FORMAT"]

log = logging.getLogger("varitok.stream")

STATE_FORMAT = "varitok.stream/2"
STATE_FILE = "stream-rank{rank:05d}.json"
_STATE_FILE_RE = re.compile(r"^stream-rank(\d{5})\.json$")
# Batch buffers per worker; the DataLoader keeps at most PREFETCH batches per worker in flight, and one
# more slot covers the batch the main process is converting.
PREFETCH = 2
RING_SLOTS = PREFETCH + 1
IMAGE_DTYPES = (torch.float32, torch.uint8)


# ----------------------------------------------------------------------------------------- epoch plan
@dataclass(frozen=True)
class EpochPlan:
    """What the workers of one rank need to produce the rest of one epoch (picklable, immutable)."""

    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int  # logical workers per rank, >= 1
    canonical_units: int
    batch_size: int
    image_size: int
    steps: int  # batches per rank in the epoch (entries / world_size)
    shuffle: bool
    shuffle_buffer: int
    resampled: bool
    crop: str
    flip: bool
    decoder: str
    start_batch: int
    positions: tuple[int, ...]  # raw samples consumed per canonical unit at start_batch (this rank's units)

    def unit_pass_shards(self, unit: int, pass_index: int) -> tuple[list[int], int | None]:
        """Shard indices a unit reads in one pass, and the modulo filter (data.epoch.unit_pass_shards)."""
        return unit_pass_shards(self.sizes, self.canonical_units, unit, seed=self.seed, epoch=self.epoch,
                                pass_index=pass_index, shuffle=self.shuffle, resampled=self.resampled)


class StreamStats:
    """Per-process counters with a rate-limited warning per reason (first 3, then every 100th)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()  # reported with each batch, then cleared
        self._seen: Counter[str] = Counter()  # cumulative, for the rate limit

    def bad(self, reason: str, where: str, detail: Any) -> None:
        self.counts["corrupt"] += 1
        self.counts["reason:" + reason] += 1
        self._seen[reason] += 1
        seen = self._seen[reason]
        if seen <= 3 or seen % 100 == 0:
            log.warning("skipping %s (%s): %s [%d so far for this reason in this process]",
                        where, reason, detail, seen)

    def as_dict(self) -> dict[str, Any]:
        reasons = {k.split(":", 1)[1]: v for k, v in self.counts.items() if k.startswith("reason:")}
        plain = {k: v for k, v in self.counts.items() if not k.startswith("reason:")}
        return {"samples": 0, "batches": 0, "corrupt": 0, "repeated": 0, "resume_skipped": 0,
                **plain, "reasons": reasons}


def unit_raw_stream(plan: EpochPlan, unit: int) -> Iterator[tuple[int, RawSample]]:
    """Endless ``(pass_index, raw sample)`` stream of one unit: passes over its shards, each through a
    shuffle buffer seeded by ``(seed, epoch, unit, pass)``. Nothing is decoded here; unusable samples (a broken
    tar, bad member names) are in the stream too and fail in :func:`decode_stream_sample`."""
    empty_passes = 0
    for pass_index in itertools.count():
        shard_ids, modulo_unit = plan.unit_pass_shards(unit, pass_index)
        samples: Iterator[RawSample] = itertools.chain.from_iterable(read_samples(plan.shards[i]) for i in shard_ids)
        if modulo_unit is not None:
            samples = (s for j, s in enumerate(samples) if j % plan.canonical_units == modulo_unit)
        if plan.shuffle and plan.shuffle_buffer > 1:
            rng = random.Random(seed_int(plan.seed, plan.epoch, unit, pass_index))
            samples = wds.filters.shuffle(plan.shuffle_buffer, plan.shuffle_buffer, rng=rng)(samples)
        produced = 0
        for sample in samples:
            produced += 1
            yield pass_index, sample
        empty_passes = 0 if produced else empty_passes + 1
        if empty_passes > (100 if plan.resampled else 0):  # a resampled draw may just hit empty shards
            raise RuntimeError(f"canonical unit {unit} (rank {plan.rank}) read no sample from its shards "
                               f"{[plan.shards[i] for i in shard_ids][:5]}: they are empty or unreadable")


def decode_stream_sample(plan: EpochPlan, unit: int, position: int, sample: RawSample,
                         stats: StreamStats) -> tuple[torch.Tensor, int] | None:
    """uint8 ``3 x S x S`` image and label of a raw sample at ``position``; None (counted) if unusable."""
    offset, flipped = sample_augmentation((plan.seed, plan.epoch, unit, position), plan.crop, plan.flip)
    try:
        return decode_sample(sample, lambda data: load_image(data, plan.image_size, offset, flipped, plan.decoder))
    except BadSample as exc:
        stats.bad(exc.reason, f"{sample.shard}:{sample.key}", exc.detail)
        return None


class _UnitReader:
    """One canonical unit's raw stream inside a worker, positioned ``position`` raw samples in (those are read
    from the tar and discarded, nothing decoded: the resume skip)."""

    def __init__(self, plan: EpochPlan, unit: int, position: int, stats: StreamStats) -> None:
        self.plan, self.unit, self.position = plan, unit, position
        self.stream = unit_raw_stream(plan, unit)
        stats.counts["resume_skipped"] += sum(1 for _ in itertools.islice(self.stream, position))
        self.last_good_pass: int | None = None

    def fill(self, images: torch.Tensor, stats: StreamStats) -> tuple[list[int], list[str]]:
        """Decode the unit's next ``len(images)`` good samples into ``images``; returns (labels, keys)."""
        plan = self.plan
        hopeless_gap = 100 if plan.resampled else 2  # a whole pass without a decodable sample: never fills up
        labels: list[int] = []
        keys: list[str] = []
        while len(keys) < len(images):
            pass_index, sample = next(self.stream)
            self.last_good_pass = pass_index if self.last_good_pass is None else self.last_good_pass
            decoded = decode_stream_sample(plan, self.unit, self.position, sample, stats)
            self.position += 1
            if decoded is None:
                if pass_index >= self.last_good_pass + hopeless_gap:
                    raise RuntimeError(f"canonical unit {self.unit} (rank {plan.rank}): no sample of its shards "
                                       "could be decoded in a whole pass (see the warnings above); check the shards")
                continue
            self.last_good_pass = pass_index
            stats.counts["repeated"] += int(pass_index > 0)
            images[len(keys)] = decoded[0]
            labels.append(decoded[1])
            keys.append(sample.key)
        return labels, keys


class _BatchProducer(IterableDataset):
    """Yields, in one process, the batches that one physical worker owns: the rest of ``plan``'s epoch,
    then every later epoch from its start, endlessly (the stream decides how many it takes).

    Images travel as uint8 ``B x 3 x S x S`` (the stream converts them to float) in a ring of
    ``RING_SLOTS`` batch buffers allocated once per worker, in shared memory when in a DataLoader
    worker: nothing is allocated, zero-filled or copied per batch on the way to the main process. The
    main process counts the batches it has converted in ``released[physical]``; a buffer is refilled
    only once its previous batch is released (with the DataLoader's ``prefetch_factor`` below the ring
    size, that wait never happens in practice; it makes reuse safe rather than merely likely).

    Batch ``g`` of the loader (counted from when it started) comes from physical worker ``g % W``
    (the DataLoader's round robin); it stands for the rank's epoch batch ``t``, which logical worker ``t % W``
    makes from the next samples of canonical unit ``(t * R + rank) % C``. So physical worker ``w`` takes the
    role of logical worker ``(t0 + w) % W`` when the loader starts at batch ``t0``, and each logical worker
    keeps the readers (shuffle buffers) of its ``C / (R * W)`` units for the whole epoch.
    """

    def __init__(self, plan: EpochPlan, released: torch.Tensor) -> None:
        self.plan = plan
        self.released = released  # int64 [W]: batches the main process has converted, per physical worker

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        plan = self.plan
        shape = (plan.batch_size, 3, plan.image_size, plan.image_size)
        ring = [torch.empty(shape, dtype=torch.uint8) for _ in range(RING_SLOTS)]
        if info is not None:
            ring = [buffer.share_memory_() for buffer in ring]
        produced = 0  # batches this worker has yielded, all epochs together
        offset = 0  # loader batches before the first batch of plan's epoch
        while True:
            logical = (physical + plan.start_batch - offset) % plan.workers
            first = plan.start_batch + (logical - plan.start_batch) % plan.workers
            for images in self._epoch(plan, physical, range(first, plan.steps, plan.workers), ring, produced):
                yield {**images, "_physical": physical, "_epoch": plan.epoch}
                produced += 1
            offset += plan.steps - plan.start_batch
            plan = replace(plan, epoch=plan.epoch + 1, start_batch=0, positions=(0,) * plan.canonical_units)

    def _epoch(self, plan: EpochPlan, physical: int, my_batches: range, ring: list[torch.Tensor],
               produced: int) -> Iterator[dict[str, Any]]:
        """This worker's batches ``my_batches`` (rank batch indices) of ``plan``'s epoch."""
        parent = os.getppid()
        stats = StreamStats()
        readers: dict[int, _UnitReader] = {}  # one per unit this worker serves, made when first needed
        for index, batch in enumerate(my_batches):
            _, unit = batch_unit(batch, plan.rank, plan.world_size, plan.canonical_units)
            if unit not in readers:
                readers[unit] = _UnitReader(plan, unit, plan.positions[unit], stats)
            while int(self.released[physical]) <= produced + index - RING_SLOTS:
                time.sleep(1e-3)  # the main process still holds this slot's previous batch
                if os.getppid() != parent:  # ... or is gone: do not wait forever
                    raise RuntimeError("the stream's main process exited while this worker waited for a buffer")
            images = ring[(produced + index) % RING_SLOTS]
            labels, keys = readers[unit].fill(images, stats)
            stats.counts["samples"] += len(keys)
            stats.counts["batches"] += 1
            yield {"image": images, "label": torch.tensor(labels, dtype=torch.int64), "key": keys,
                   "_unit": unit, "_position": readers[unit].position, "_stats": dict(stats.counts)}
            stats.counts.clear()


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # each worker decodes on one core; more threads only oversubscribe


# ----------------------------------------------------------------------------------------- state files
def read_state_files(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``stream-rank*.json`` in ``directory`` (whatever world size wrote them), in rank order."""
    directory = Path(directory)
    paths = sorted(p for p in directory.glob("stream-rank*.json") if _STATE_FILE_RE.match(p.name))
    if not paths:
        raise FileNotFoundError(f"no stream state (stream-rank*.json) in {directory}; was the checkpoint written "
                                "with the stream's save_state_file?")
    states = []
    for path in paths:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"stream state {path} is not readable JSON ({exc}); the checkpoint is damaged: "
                             "resume from another one") from None
        if not isinstance(state, dict):
            raise ValueError(f"stream state {path} is not a JSON object; resume from another checkpoint")
        states.append({**state, "_file": str(path)})
    return states


def merge_states(states: Sequence[dict[str, Any]], *, complete: bool = True) -> dict[str, Any]:
    """One state from the per-rank states of one save: they must agree on the format, epoch, entries and
    identity, and give each canonical unit's position at most once (with ``complete``, exactly once).

    Raises ValueError naming the state (file) that disagrees or the units missing / given twice.
    """
    if not states:
        raise ValueError("no stream state to merge")
    names = [str(s.get("_file", f"the state of rank {s.get('rank', '?')}")) for s in states]
    for name, state in zip(names, states):
        if state.get("format") != STATE_FORMAT:
            older = state.get("format") == "varitok.stream/1"
            raise ValueError(f"{name} is not a stream state of this version (format {state.get('format')!r}, "
                             f"expected {STATE_FORMAT!r})" + (
                                 ": it was written by an older varitok whose data order depends on the process "
                                 "layout and cannot be continued exactly; start the next epoch instead "
                                 "(stream.set_epoch)" if older else ""))
    first = states[0]
    shared = tuple(k for k in first if k not in ("positions", "rank", "layout", "_file"))
    for name, state in zip(names[1:], states[1:]):
        differing = differences(first, state, only=shared)
        if differing:
            raise ValueError(f"stream states of one checkpoint contradict each other ({names[0]} vs {name}: "
                             f"{describe_differences(differing, saved='first', current='this')}); the checkpoint "
                             "mixes files of different saves: resume from another checkpoint")
    positions: dict[int, int] = {}
    owner: dict[int, str] = {}
    for name, state in zip(names, states):
        for unit, position in state["positions"].items():
            unit = int(unit)
            if unit in owner:
                raise ValueError(f"canonical unit {unit} has a position in both {owner[unit]} and {name}: the "
                                 "checkpoint mixes files of different saves; resume from another checkpoint")
            if not 0 <= unit < int(first["canonical_units"]) or int(position) < 0:
                raise ValueError(f"corrupt stream state {name}: unit {unit} position {position}")
            owner[unit], positions[unit] = name, int(position)
    missing = [u for u in range(int(first["canonical_units"])) if u not in positions]
    if complete and missing:
        raise ValueError(f"the stream states {names} give no position for canonical units {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}: a stream-rank*.json file of the checkpoint is "
                         "missing (every rank writes one); restore it or resume from another checkpoint")
    merged = {k: first[k] for k in shared}
    return {**merged, "format": STATE_FORMAT, "positions": {str(u): positions[u] for u in sorted(positions)}}


# ----------------------------------------------------------------------------------------- the stream
class ShardStream:
    """Iterable of image batches from WebDataset shards; see the module docstring for the rules.

    ``canonical_units`` (C, default ``world_size * max(1, num_workers)``) fixes the data order of a run; any
    later layout with ``ranks x workers`` dividing C continues it exactly. ``grad_accum`` (A) rounds the epoch
    to whole optimizer steps of ``K = world_size * A`` micro-batches, K being what stays constant when the
    number of ranks changes (pass ``A' = K / R'``).
    """

    def __init__(self, spec: str | os.PathLike | Sequence[str], batch_size: int, image_size: int = 256, *,
                 rank: int | None = None, world_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, resampled: bool = False,
                 crop: str = "random", flip: bool = True, decoder: str = "pil", drop_last: bool = True,
                 dtype: torch.dtype = torch.float32, canonical_units: int | None = None,
                 grad_accum: int = 1) -> None:
        if dtype not in IMAGE_DTYPES:
            raise ValueError(f"dtype must be torch.float32 (images in [-1, 1]) or torch.uint8 (bytes 0..255), "
                             f"got {dtype}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if batch_size < 1 or image_size < 1 or num_workers < 0 or shuffle_buffer < 0 or grad_accum < 1:
            raise ValueError("batch_size, image_size and grad_accum must be >= 1, num_workers and shuffle_buffer "
                             ">= 0")
        world = resolve_world()
        self.rank = world.rank if rank is None else int(rank)
        self.world_size = world.size if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        workers = max(1, num_workers)
        self.canonical_units = self.world_size * workers if canonical_units is None else int(canonical_units)
        check_layout(self.canonical_units, self.world_size, workers)
        self.grad_accum = int(grad_accum)
        self.step_entries = self.world_size * self.grad_accum  # K: global micro-batches per optimizer step
        self.shards = expand_shard_spec(spec)
        self.sizes, self.sizes_source = shard_sizes(self.shards)
        self.num_samples = sum(self.sizes)
        self.entries_per_epoch = entries_per_epoch(self.num_samples, batch_size, self.step_entries, drop_last)
        if self.entries_per_epoch < 1:
            raise ValueError(f"{self.num_samples} samples in {len(self.shards)} shards give no full batch of "
                             f"{batch_size} on each of {self.world_size} ranks for one optimizer step of "
                             f"{self.step_entries} micro-batches (grad_accum {self.grad_accum}); lower batch_size "
                             "or pass drop_last=False")
        self.num_workers = num_workers
        self.dtype = dtype
        self.drop_last = drop_last
        self._template = EpochPlan(
            shards=tuple(self.shards), sizes=tuple(self.sizes), seed=int(seed), epoch=0, rank=self.rank,
            world_size=self.world_size, workers=workers, canonical_units=self.canonical_units,
            batch_size=batch_size, image_size=image_size, steps=self.entries_per_epoch // self.world_size,
            shuffle=shuffle, shuffle_buffer=shuffle_buffer, resampled=resampled, crop=crop, flip=flip,
            decoder=decoder, start_batch=0, positions=())
        self.units = rank_units(self.rank, self.world_size, self.canonical_units)  # the units this rank serves
        self.epoch = 0
        self._batch = 0
        self._positions = dict.fromkeys(self.units, 0)
        self._stats: Counter[str] = Counter()
        # Producers (DataLoader workers, or a generator when num_workers == 0) live across epochs: a new
        # epoch does not pay for forking workers and refilling their shuffle buffers from scratch.
        self._live: Iterator[dict[str, Any]] | None = None
        self._live_next: tuple[int, int] | None = None  # (epoch, batch) the producers deliver next
        self._released = torch.zeros(0, dtype=torch.int64)
        self._mapped: list[deque[torch.Tensor]] = []

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch of this rank (``entries_per_epoch / world_size``); the same on every rank."""
        return self._template.steps

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def batch_in_epoch(self) -> int:
        """This rank's batches of the current epoch already done (``entries / world_size``)."""
        return self._batch

    @property
    def entries(self) -> int:
        """Global micro-batch entries of the current epoch consumed (all ranks together, layout independent)."""
        return self._batch * self.world_size

    def worker_units(self, worker: int) -> list[int]:
        """The canonical units logical worker ``worker`` of this rank serves (one shuffle buffer each)."""
        return worker_units(self.rank, self.world_size, worker, self._template.workers, self.canonical_units)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next iteration. The running producers go on when
        that is where they are anyway (the usual ``set_epoch(e)`` at the top of an epoch loop)."""
        self.epoch, self._batch = int(epoch), 0
        self._positions = dict.fromkeys(self.units, 0)
        if self._live_next != (self.epoch, 0):
            self.close()

    @property
    def stats(self) -> dict[str, Any]:
        """Counters of this process (workers included): samples, batches, corrupt, repeated,
        resume_skipped, and ``reasons`` (per-reason corrupt counts)."""
        out = StreamStats()
        out.counts = Counter(self._stats)
        return out.as_dict()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._batch >= self.steps_per_epoch:
            self.set_epoch(self.epoch + 1)
        if self._live_next != (self.epoch, self._batch):
            self._start_producers()
        while self._batch < self.steps_per_epoch:
            try:
                batch = next(self._live)
            except StopIteration:
                self.close()
                raise RuntimeError(f"epoch {self.epoch} ended after {self._batch} of {self.steps_per_epoch} "
                                   "batches") from None
            physical, epoch = batch.pop("_physical"), batch.pop("_epoch")
            assert epoch == self.epoch, f"producer sent a batch of epoch {epoch} during epoch {self.epoch}"
            self._positions[batch.pop("_unit")] = batch.pop("_position")
            self._stats.update(batch.pop("_stats"))
            self._batch += 1
            raw = batch["image"]
            batch["image"] = to_unit_range(raw) if self.dtype == torch.float32 else raw.clone()
            self._released[physical] += 1  # its ring slot may be refilled now
            # Holding the slot keeps its shared-memory mapping alive: when the worker sends the slot again,
            # torch finds the mapping in its cache instead of mapping (and page-faulting) it anew.
            self._mapped[physical].append(raw)
            self._live_next = (self.epoch, self._batch) if self._batch < self.steps_per_epoch else (self.epoch + 1, 0)
            yield batch
        self.set_epoch(self.epoch + 1)

    def _start_producers(self) -> None:
        """(Re)start the producers at the current epoch, batch and positions; they run on across epochs."""
        self.close()
        positions = [0] * self.canonical_units
        for unit, position in self._positions.items():
            positions[unit] = position
        plan = replace(self._template, epoch=self.epoch, start_batch=self._batch, positions=tuple(positions))
        self._released = torch.zeros(plan.workers, dtype=torch.int64)
        self._mapped = [deque(maxlen=RING_SLOTS) for _ in range(plan.workers)]
        if self.num_workers:
            self._released.share_memory_()
        dataset = _BatchProducer(plan, self._released)
        if self.num_workers == 0:
            self._live = iter(dataset)
        else:
            self._live = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                         prefetch_factor=PREFETCH, worker_init_fn=_init_worker))
        self._live_next = (self.epoch, self._batch)

    def close(self) -> None:
        """Stop the producers (DataLoader workers exit). Iterating again restarts them where the stream is."""
        self._live, self._live_next = None, None

    # ------------------------------------------------------------------------------------- resume
    def _identity(self) -> dict[str, Any]:
        """What must match between the run that saved a state and the one that loads it (not the layout)."""
        t = self._template
        digest = hashlib.sha256(json.dumps([[os.path.basename(s) for s in t.shards], list(t.sizes)]).encode())
        return {"seed": t.seed, "batch_size": t.batch_size, "image_size": t.image_size,
                "canonical_units": t.canonical_units, "step_entries": self.step_entries, "drop_last": self.drop_last,
                "shuffle": t.shuffle, "shuffle_buffer": t.shuffle_buffer, "resampled": t.resampled, "crop": t.crop,
                "flip": t.flip, "decoder": t.decoder, "shards_sha256": digest.hexdigest()[:16]}

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the state (JSON-able): epoch, global entries consumed, and the raw position of
        each unit this rank serves (they depend on the corrupt samples its workers met), plus the identity.
        ``load_state_dict`` takes the states of all ranks (a list, or ``{"ranks": {rank: state}}``)."""
        return {"format": STATE_FORMAT, "rank": self.rank,
                "layout": {"world_size": self.world_size, "workers": self._template.workers,
                           "grad_accum": self.grad_accum},
                "epoch": self.epoch, "entries": self.entries,
                "positions": {str(u): int(p) for u, p in sorted(self._positions.items())}, **self._identity()}

    def save_state_file(self, directory: str | os.PathLike) -> Path:
        """Write ``state_dict()`` to ``directory/stream-rank{rank:05d}.json`` atomically (data.files) and
        return the path. Every rank calls it: positions are per rank, and
        ``accelerator.register_for_checkpointing`` would save rank 0's state only (and as a pickle)."""
        path = Path(directory) / STATE_FILE.format(rank=self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, json.dumps(self.state_dict(), indent=1))

    def load_state_file(self, directory: str | os.PathLike, *, allow_new_global_batch: bool = False) -> None:
        """Continue from the ``stream-rank*.json`` files in ``directory``, written by any number of ranks: all
        of them are read and merged (see :meth:`load_state_dict`)."""
        self.load_state_dict(read_state_files(directory), allow_new_global_batch=allow_new_global_batch)

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]], *,
                        allow_new_global_batch: bool = False) -> None:
        """Continue exactly after the entries at which ``state`` was saved.

        ``state``: the states of every saved rank (a list, or ``{"ranks": {rank: state}}``), or this rank's own
        ``state_dict()`` when the number of ranks is unchanged (each rank then needs its own state only:
        node-local checkpoints work). Contradicting states, a unit given twice, or a missing rank's state after a
        change of the number of ranks raise ValueError. ``allow_new_global_batch`` accepts a state saved with
        another ``world_size x grad_accum`` (the entries consumed must still divide among the ranks).
        """
        if isinstance(state, dict) and "ranks" in state:
            states = list(state["ranks"].values())
        else:
            states = [state] if isinstance(state, dict) else list(state)
        saved_world = {s.get("layout", {}).get("world_size") for s in states if isinstance(s, dict)}
        merged = merge_states(states, complete=saved_world != {self.world_size})
        self._load(merged, allow_new_global_batch)

    def _load(self, state: dict[str, Any], allow_new_global_batch: bool = False) -> None:
        expected = self._identity()
        if allow_new_global_batch:
            expected.pop("step_entries")
        check_same(state, expected, only=tuple(expected), what="stream state to resume exactly",
                   hint="use the saved settings (the number of ranks may change when grad_accum keeps "
                        "ranks x grad_accum) or start a new epoch with set_epoch()")
        entries, positions = int(state["entries"]), {int(u): int(p) for u, p in state["positions"].items()}
        if not 0 <= entries <= self.entries_per_epoch:
            raise ValueError(f"the stream state was saved after {entries} entries of epoch {state['epoch']}, which "
                             f"has {self.entries_per_epoch} entries with these settings: the state is corrupt or "
                             "from another global batch")
        if entries % self.world_size:
            raise ValueError(f"the stream state was saved after {entries} global batches, which {self.world_size} "
                             "ranks cannot continue evenly: save states at optimizer-step boundaries")
        missing = [u for u in self.units if u not in positions]
        if missing:
            raise ValueError(f"the stream state has no position for canonical units {missing[:10]} that rank "
                             f"{self.rank} of {self.world_size} serves: pass the states of every saved rank "
                             "(load_state_file(dir) reads all stream-rank*.json files)")
        self.close()
        self.epoch, self._batch = int(state["epoch"]), entries // self.world_size
        self._positions = {u: positions[u] for u in self.units}
