"""Streaming loader over WebDataset tar shards: rank/worker split, equal steps per rank, exact resume.

Usage::

    stream = ShardStream("shards/", batch_size=32, image_size=256, num_workers=2, seed=0)
    for batch in stream:          # one epoch of exactly stream.steps_per_epoch batches
        batch["image"]            # float32 B x 3 x S x S in [-1, 1]
        batch["label"]            # int64 B (-1 when the shard has no .cls)
        batch["key"]              # list[str] of B sample keys
    state = stream.state_dict()   # small JSON-able dict; load_state_dict(state) resumes exactly here

With ``dtype=torch.uint8`` the images stay bytes (``0..255``): convert them where the model runs with
:func:`data.transforms.to_unit_range` (on a GPU: 4x less host-to-device traffic and no CPU time in the
training process; this is what ``train-tokenizer`` does).

How an epoch is built (everything is a pure function of seed, epoch, rank, worker and position):

* A *unit* is one (rank, worker) pair: ``unit = rank * W + worker``, ``units = world_size * W``
  (``W = max(1, num_workers)``).
* Shards are permuted by ``(seed, epoch)`` (same on every rank). With at least ``units`` shards, they
  are dealt greedily to units (each shard, in permuted order, to the unit holding the fewest samples
  so far). With fewer shards, every unit reads all shards and keeps samples whose running index in the
  permuted concatenation satisfies ``index % units == unit``. In resampled mode each unit draws shards
  with replacement from its own ``(seed, epoch, unit, pass)`` generator instead.
* A unit's stream is its shards read in order through a shuffle buffer seeded by
  ``(seed, epoch, unit, pass)``; when it runs dry, it starts again from its first shard (``pass + 1``,
  a freshly seeded buffer). So a unit with fewer samples than its quota repeats its own samples from
  the start; a unit with more drops the tail of its shuffled order (different samples each epoch).
* ``steps_per_epoch = total // (world_size * batch_size)`` (``ceil`` when ``drop_last=False``; the
  last batches are then filled by the repeat rule, so batches always hold ``batch_size`` samples).
  Rank batch ``b`` comes from worker ``b % W``; worker ``w`` yields exactly
  ``len(range(w, steps_per_epoch, W))`` batches: every rank yields exactly ``steps_per_epoch``.
* The crop offset and flip of the sample at raw position ``p`` of a unit's stream are seeded by
  ``(seed, epoch, unit, p)``. A corrupt sample consumes its position and is replaced by the next one.

Workers live across epochs: one DataLoader serves consecutive epochs (no fork at each epoch start, and
the next epoch's first batches are prefetched while the current one ends); it restarts only when the
stream is moved elsewhere (``set_epoch`` to another epoch, ``load_state_dict``). Decoded batches travel to
the main process through a small ring of shared-memory buffers per worker, reused once the main process
has converted them (see :class:`_BatchProducer`).

Exact resume: the state holds, per worker, how many raw samples its stream has consumed. Restoring it
re-reads those samples' tar members and discards them before any decoding, then continues; the DataLoader
starts at physical worker 0, so physical worker ``w`` takes the role of logical worker ``(N + w) % W``
after ``N`` consumed batches, which keeps the round-robin order of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.epoch import seed_int, steps_per_epoch, unit_pass_shards
from data.files import atomic_write
from data.identity import check_same
from data.tar import BadSample, RawSample, expand_shard_spec, read_samples, shard_sizes
from data.transforms import CROPS, DECODERS, decode_sample, load_image, sample_augmentation, to_unit_range
from data.world import resolve_world

log = logging.getLogger("varitok.stream")

STATE_FORMAT = "varitok.stream/1"
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
    batch_size: int
    image_size: int
    steps: int
    shuffle: bool
    shuffle_buffer: int
    resampled: bool
    crop: str
    flip: bool
    decoder: str
    start_batch: int
    positions: tuple[int, ...]  # raw samples consumed per logical worker at start_batch

    @property
    def units(self) -> int:
        return self.world_size * self.workers

    def unit_pass_shards(self, unit: int, pass_index: int) -> tuple[list[int], int | None]:
        """Shard indices a unit reads in one pass, and the modulo filter (data.epoch.unit_pass_shards)."""
        return unit_pass_shards(self.sizes, self.units, unit, seed=self.seed, epoch=self.epoch,
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
            samples = (s for j, s in enumerate(samples) if j % plan.units == modulo_unit)
        if plan.shuffle and plan.shuffle_buffer > 1:
            rng = random.Random(seed_int(plan.seed, plan.epoch, unit, pass_index))
            samples = wds.filters.shuffle(plan.shuffle_buffer, plan.shuffle_buffer, rng=rng)(samples)
        produced = 0
        for sample in samples:
            produced += 1
            yield pass_index, sample
        empty_passes = 0 if produced else empty_passes + 1
        if empty_passes > (100 if plan.resampled else 0):  # a resampled draw may just hit empty shards
            raise RuntimeError(f"rank {plan.rank} worker {unit % plan.workers} read no sample from its shards "
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
    (the DataLoader's round robin); the logical worker of the epoch batch it stands for decides the
    unit whose samples fill it, so an epoch is the same whichever worker produced which batch.
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
            for images in self._epoch(plan, physical, logical, range(first, plan.steps, plan.workers), ring,
                                      produced):
                yield {**images, "_physical": physical, "_epoch": plan.epoch}
                produced += 1
            offset += plan.steps - plan.start_batch
            plan = replace(plan, epoch=plan.epoch + 1, start_batch=0, positions=(0,) * plan.workers)

    def _epoch(self, plan: EpochPlan, physical: int, logical: int, my_batches: range, ring: list[torch.Tensor],
               produced: int) -> Iterator[dict[str, Any]]:
        """This worker's batches ``my_batches`` of ``plan``'s epoch, as logical worker ``logical``."""
        if not my_batches:
            return
        unit = plan.rank * plan.workers + logical
        parent = os.getppid()
        stats = StreamStats()
        stream = unit_raw_stream(plan, unit)
        position = plan.positions[logical]
        skipped = sum(1 for _ in itertools.islice(stream, position))  # tar members read, nothing decoded
        stats.counts["resume_skipped"] += skipped
        # A whole pass without a decodable sample means the unit can never fill its quota.
        hopeless_gap = 100 if plan.resampled else 2
        last_good_pass = None
        for index, _ in enumerate(my_batches):
            while int(self.released[physical]) <= produced + index - RING_SLOTS:
                time.sleep(1e-3)  # the main process still holds this slot's previous batch
                if os.getppid() != parent:  # ... or is gone: do not wait forever
                    raise RuntimeError("the stream's main process exited while this worker waited for a buffer")
            images = ring[(produced + index) % RING_SLOTS]
            labels, keys = [], []
            while len(keys) < plan.batch_size:
                pass_index, sample = next(stream)
                last_good_pass = pass_index if last_good_pass is None else last_good_pass
                decoded = decode_stream_sample(plan, unit, position, sample, stats)
                position += 1
                if decoded is None:
                    if pass_index >= last_good_pass + hopeless_gap:
                        raise RuntimeError(f"rank {plan.rank} worker {logical}: no sample of its shards could "
                                           "be decoded in a whole pass (see the warnings above); check the shards")
                    continue
                last_good_pass = pass_index
                stats.counts["repeated"] += int(pass_index > 0)
                images[len(keys)] = decoded[0]
                labels.append(decoded[1])
                keys.append(sample.key)
            stats.counts["samples"] += len(keys)
            stats.counts["batches"] += 1
            yield {"image": images, "label": torch.tensor(labels, dtype=torch.int64),
                   "key": keys, "_worker": logical, "_position": position, "_stats": dict(stats.counts)}
            stats.counts.clear()


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # each worker decodes on one core; more threads only oversubscribe


# ----------------------------------------------------------------------------------------- the stream
class ShardStream:
    """Iterable of image batches from WebDataset shards; see the module docstring for the rules."""

    def __init__(self, spec: str | os.PathLike | Sequence[str], batch_size: int, image_size: int = 256, *,
                 rank: int | None = None, world_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, resampled: bool = False,
                 crop: str = "random", flip: bool = True, decoder: str = "pil", drop_last: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        if dtype not in IMAGE_DTYPES:
            raise ValueError(f"dtype must be torch.float32 (images in [-1, 1]) or torch.uint8 (bytes 0..255), "
                             f"got {dtype}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if batch_size < 1 or image_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError("batch_size and image_size must be >= 1, num_workers and shuffle_buffer >= 0")
        world = resolve_world()
        default_rank, default_world = world.rank, world.size
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.shards = expand_shard_spec(spec)
        self.sizes, self.sizes_source = shard_sizes(self.shards)
        self.num_samples = sum(self.sizes)
        steps = steps_per_epoch(self.num_samples, self.world_size * batch_size, drop_last)
        if steps < 1:
            raise ValueError(f"{self.num_samples} samples in {len(self.shards)} shards give no full batch of "
                             f"{batch_size} on each of {self.world_size} ranks; lower batch_size or pass "
                             "drop_last=False")
        self.num_workers = num_workers
        self.dtype = dtype
        self._template = EpochPlan(
            shards=tuple(self.shards), sizes=tuple(self.sizes), seed=int(seed), epoch=0, rank=self.rank,
            world_size=self.world_size, workers=max(1, num_workers), batch_size=batch_size,
            image_size=image_size, steps=steps, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
            resampled=resampled, crop=crop, flip=flip, decoder=decoder, start_batch=0, positions=())
        self.epoch = 0
        self._batch = 0
        self._positions = [0] * self._template.workers
        self._stats: Counter[str] = Counter()
        # Producers (DataLoader workers, or a generator when num_workers == 0) live across epochs: a new
        # epoch does not pay for forking workers and refilling their shuffle buffers from scratch.
        self._live: Iterator[dict[str, Any]] | None = None
        self._live_next: tuple[int, int] | None = None  # (epoch, batch) the producers deliver next
        self._released = torch.zeros(0, dtype=torch.int64)
        self._mapped: list[deque[torch.Tensor]] = []

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch; the same on every rank."""
        return self._template.steps

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def batch_in_epoch(self) -> int:
        """Batches of the current epoch already yielded."""
        return self._batch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next iteration. The running producers go on when
        that is where they are anyway (the usual ``set_epoch(e)`` at the top of an epoch loop)."""
        self.epoch, self._batch = int(epoch), 0
        self._positions = [0] * self._template.workers
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
            self._positions[batch.pop("_worker")] = batch.pop("_position")
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
        plan = replace(self._template, epoch=self.epoch, start_batch=self._batch,
                       positions=tuple(self._positions))
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
        """What must match between the run that saved a state and the one that loads it."""
        t = self._template
        digest = hashlib.sha256(json.dumps([[os.path.basename(s) for s in t.shards], list(t.sizes)]).encode())
        return {"seed": t.seed, "world_size": t.world_size, "workers": t.workers, "batch_size": t.batch_size,
                "image_size": t.image_size, "shuffle": t.shuffle, "shuffle_buffer": t.shuffle_buffer,
                "resampled": t.resampled, "crop": t.crop, "flip": t.flip, "decoder": t.decoder,
                "shards_sha256": digest.hexdigest()[:16]}

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (JSON-able). Each rank saves its own: positions depend on the corrupt
        samples its workers met. ``load_state_dict`` also accepts ``{"ranks": {rank: state}}``."""
        return {"format": STATE_FORMAT, "rank": self.rank, "epoch": self.epoch, "batch": self._batch,
                "positions": list(self._positions), **self._identity()}

    def save_state_file(self, directory: str | os.PathLike) -> Path:
        """Write ``state_dict()`` to ``directory/stream-rank{rank:05d}.json`` atomically (data.files) and
        return the path. Every rank calls it: positions are per rank, and
        ``accelerator.register_for_checkpointing`` would save rank 0's state only (and as a pickle)."""
        path = Path(directory) / f"stream-rank{self.rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, json.dumps(self.state_dict(), indent=1))

    def load_state_file(self, directory: str | os.PathLike) -> None:
        """Restore the state this rank wrote with :meth:`save_state_file`."""
        path = Path(directory) / f"stream-rank{self.rank:05d}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no stream state for rank {self.rank} at {path}; was the checkpoint "
                                    f"written by a run with world_size {self.world_size}?")
        self.load_state_dict(json.loads(path.read_text()))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batch at which ``state`` was saved."""
        if "ranks" in state:
            ranks = {int(k): v for k, v in state["ranks"].items()}
            if self.rank not in ranks:
                raise ValueError(f"stream state has ranks {sorted(ranks)}, not this rank {self.rank}")
            state = ranks[self.rank]
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a stream state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        if state["rank"] != self.rank:
            raise ValueError(f"stream state was saved by rank {state['rank']}, this is rank {self.rank}: "
                             "save one state per rank")
        expected = self._identity()
        check_same(state, expected, only=tuple(expected), what="stream state to resume exactly",
                   hint="use the saved settings or start a new epoch with set_epoch()")
        if len(state["positions"]) != self._template.workers or not 0 <= state["batch"] <= self.steps_per_epoch:
            raise ValueError(f"corrupt stream state: batch {state['batch']}, positions {state['positions']}")
        self.close()
        self.epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._positions = [int(p) for p in state["positions"]]
