"""The epoch plan of the image stream as pure functions: which shards a unit reads, seeds, steps, and how
the entries of an epoch map to canonical units, ranks and workers.

An epoch is ``T`` global micro-batch *entries* (:func:`entries_per_epoch`); entry ``e`` is the next batch of
canonical unit ``e % C``. Rank ``r`` of ``R`` serves entries ``t * R + r`` (:func:`batch_unit`), its logical
worker ``t % W`` makes them, so with ``R * W`` dividing ``C`` (:func:`check_layout`) each worker serves a fixed
set of units (:func:`worker_units`) and each unit is read by one reader, in order, whatever the layout.

Nothing here reads a file or keeps state: every answer is a function of its integer arguments, so it is the
same on every rank, in every worker and in a resumed run. :mod:`data.stream` builds its readers from these.
"""
from __future__ import annotations

import heapq
import math
from typing import Sequence

import numpy as np

__all__ = ["seed_int", "deal_shards", "shard_order", "unit_pass_shards", "steps_per_epoch", "check_layout",
           "entries_per_epoch", "batch_unit", "rank_units", "worker_units", "grad_accum_for"]


def seed_int(*words: int) -> int:
    """One 64-bit seed mixed from non-negative integer words (stable across processes and Python versions)."""
    return int(np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32).view(np.uint64)[0])


def deal_shards(order: Sequence[int], sizes: Sequence[int], units: int) -> list[list[int]]:
    """Shards (indices, visited in ``order``) dealt to ``units`` bins: each to an empty bin if any is
    left, else to the bin with the fewest samples (ties: lowest bin). With ``len(order) >= units``
    every bin gets at least one shard, even when some shards are empty."""
    bins: list[list[int]] = [[] for _ in range(units)]
    heap = [(0, 0, unit) for unit in range(units)]  # (has a shard, samples, unit)
    for shard in order:
        _, load, unit = heapq.heappop(heap)
        bins[unit].append(int(shard))
        heapq.heappush(heap, (1, load + sizes[shard], unit))
    return bins


def shard_order(count: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order in which the ``count`` shards are dealt in ``epoch``: a ``(seed, epoch)`` permutation, or
    file order without ``shuffle``."""
    return np.random.default_rng([seed, epoch, 0]).permutation(count) if shuffle else np.arange(count)


def unit_pass_shards(sizes: Sequence[int], units: int, unit: int, *, seed: int, epoch: int, pass_index: int,
                     shuffle: bool, resampled: bool) -> tuple[list[int], int | None]:
    """Shard indices unit ``unit`` of ``units`` reads in one pass of ``epoch``, and the modulo filter
    (``None`` = keep every sample; else keep samples whose running index ``j`` in the pass has
    ``j % units == unit``).

    * ``resampled``: ``max(1, count // units)`` shards drawn with replacement by ``(seed, epoch, unit, pass)``.
    * at least ``units`` shards: the unit's bin of :func:`deal_shards` over :func:`shard_order` (same every pass).
    * fewer shards: every shard in :func:`shard_order`, modulo filtered.
    """
    count = len(sizes)
    if resampled:
        rng = np.random.default_rng([seed, epoch, unit, pass_index, 1])
        return rng.integers(0, count, size=max(1, count // units)).tolist(), None
    order = shard_order(count, seed, epoch, shuffle)
    if count >= units:
        return deal_shards(order, sizes, units)[unit], None
    return order.tolist(), unit


def steps_per_epoch(num_samples: int, samples_per_step: int, drop_last: bool) -> int:
    """Steps of ``samples_per_step`` in an epoch of ``num_samples``: floor, or ceil when not ``drop_last``."""
    return num_samples // samples_per_step if drop_last else math.ceil(num_samples / samples_per_step)


# ----------------------------------------------------------------------------------------- canonical units
def check_layout(canonical_units: int, world_size: int, workers: int) -> None:
    """Refuse a physical layout that cannot serve ``canonical_units`` units: ``world_size * workers`` must
    divide it (then every reader serves the same number of whole units). The error lists what works."""
    if canonical_units < 1 or world_size < 1 or workers < 1:
        raise ValueError(f"canonical_units ({canonical_units}), world_size ({world_size}) and workers ({workers}) "
                         "must be >= 1")
    if canonical_units % (world_size * workers):
        divisors = [d for d in range(1, canonical_units + 1) if canonical_units % d == 0]
        raise ValueError(f"{canonical_units} canonical units cannot be served by {world_size} ranks x {workers} "
                         f"workers = {world_size * workers} readers: ranks x workers must divide {canonical_units} "
                         f"(one of {divisors}); change the number of processes or data workers, or start a new run "
                         "with another canonical unit count")


def entries_per_epoch(num_samples: int, batch_size: int, step_entries: int, drop_last: bool) -> int:
    """Global micro-batch entries ``T`` of an epoch: whole optimizer steps of ``step_entries`` (``K = ranks x
    grad_accum``) batches of ``batch_size``: ``floor(N / B / K) * K`` (ceil without ``drop_last``)."""
    return steps_per_epoch(num_samples, batch_size * step_entries, drop_last) * step_entries


def batch_unit(batch: int, rank: int, world_size: int, canonical_units: int) -> tuple[int, int]:
    """``(entry, unit)`` of rank ``rank``'s batch ``batch`` of an epoch: entry ``batch * world_size + rank``,
    which holds the next batch of canonical unit ``entry % canonical_units``."""
    entry = batch * world_size + rank
    return entry, entry % canonical_units


def rank_units(rank: int, world_size: int, canonical_units: int) -> list[int]:
    """The canonical units whose entries rank ``rank`` serves (entries ``e = rank (mod world_size)`` from a
    start that is a multiple of ``world_size``; ``world_size`` divides the unit count)."""
    return list(range(rank, canonical_units, world_size))


def worker_units(rank: int, world_size: int, worker: int, workers: int, canonical_units: int) -> list[int]:
    """The canonical units logical worker ``worker`` of rank ``rank`` serves: it produces the rank's batches
    ``b = worker (mod workers)``, whose units are ``worker * world_size + rank (mod world_size * workers)``."""
    return list(range(worker * world_size + rank, canonical_units, world_size * workers))


def grad_accum_for(step_entries: int, world_size: int, allow_new_global_batch: bool = False) -> int:
    """Gradient accumulation steps that keep ``step_entries`` (``K``: global micro-batches per optimizer step,
    saved ranks x grad_accum) on ``world_size`` ranks: ``K / world_size``. When ``world_size`` does not divide
    ``K``: ``max(1, round(K / world_size))`` with ``allow_new_global_batch``, else a ValueError listing the world
    sizes that work (the divisors of K)."""
    if step_entries < 1 or world_size < 1:
        raise ValueError(f"step_entries ({step_entries}) and world_size ({world_size}) must be >= 1")
    if step_entries % world_size == 0:
        return step_entries // world_size
    if allow_new_global_batch:
        return max(1, round(step_entries / world_size))
    divisors = [d for d in range(1, step_entries + 1) if step_entries % d == 0]
    raise ValueError(f"the global batch of {step_entries} micro-batches per optimizer step (saved ranks x grad_accum) "
                     f"cannot be kept on {world_size} ranks: use a number of ranks in {divisors}, or accept a new "
                     "global batch (train.allow_new_global_batch=true)")
