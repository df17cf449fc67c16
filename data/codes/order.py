"""Deterministic, rank-sharded, exactly resumable iteration over a CodeReader.

Both iterators share one rule for equal work per rank. Each epoch builds a global ordered list of M
items (row indices for CodeIterator, batches of row indices for TokenBudgetBatcher) from
(seed, epoch) alone, identical on every rank. With W ranks the list is padded to ceil(M / W) * W items
by repeating its first items (drop_last=False, the default) or truncated to floor(M / W) * W items
(drop_last=True); rank r takes items r, r + W, r + 2W, ... Every rank therefore yields the same count.

Iteration yields the rest of the current epoch; a new ``for`` loop after a finished epoch starts the
next one (or call ``set_epoch``). ``state_dict()`` = (epoch, number of items already yielded), and
``load_state_dict`` continues with exactly the next item. The state counts items handed out: if a
consumer prefetches, save the state it had when the consumed item was produced.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from data.codes.reader import CodeReader, CodeRecord
from data.identity import check_same


def rank_positions(num_items: int, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """Positions (int64) into an epoch's global item list that ``rank`` takes, per the module rule."""
    per_rank = num_items // world_size if drop_last else -(-num_items // world_size)
    if num_items == 0:
        return np.zeros(0, dtype=np.int64)
    return (rank + world_size * np.arange(per_rank, dtype=np.int64)) % num_items


class _EpochIterator:
    """Epoch/position bookkeeping; subclasses define the global item list and what an item yields."""

    def __init__(self, num_rows: int, rank: int, world_size: int, seed: int, epoch: int, drop_last: bool):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_rows = num_rows
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.epoch, self.position = epoch, 0
        self._cached_epoch: int | None = None
        self._cached_plan: Sequence[Any] = ()

    def _global_items(self, epoch: int) -> Sequence[Any]:
        """The epoch's global item list (ndarray of row indices, or list of index arrays)."""
        raise NotImplementedError

    def _emit(self, item: Any) -> Any:
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        """Settings that must match for a saved state to be resumable."""
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "num_rows": self.num_rows,
                "drop_last": self.drop_last}

    def plan(self, epoch: int | None = None) -> Sequence[Any]:
        """This rank's items of ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        if self._cached_epoch != epoch:
            items = self._global_items(epoch)
            positions = rank_positions(len(items), self.rank, self.world_size, self.drop_last)
            self._cached_plan = (items[positions].tolist() if isinstance(items, np.ndarray)
                                 else [items[p] for p in positions.tolist()])
            self._cached_epoch = epoch
        return self._cached_plan

    def __len__(self) -> int:
        return len(self.plan())

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[Any]:
        plan = self.plan()
        if plan and self.position >= len(plan):
            self.set_epoch(self.epoch + 1)
            plan = self.plan()
        while self.position < len(plan):
            item = plan[self.position]
            self.position += 1
            yield self._emit(item)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self._identity()
        check_same(state, expected, only=tuple(expected), what="saved data position to resume exactly",
                   hint="resume with the same corpus, seed and world size")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class CodeIterator(_EpochIterator):
    """Yields this rank's CodeRecords of each epoch: a permutation of all rows drawn from
    (seed, epoch) when ``shuffle``, else global index order; sharded by the module rule."""

    def __init__(self, reader: CodeReader, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        super().__init__(len(reader), rank, world_size, seed, epoch, drop_last)
        self.reader = reader
        self.shuffle = shuffle

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "shuffle": self.shuffle}

    def _global_items(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's global row indices for ``epoch``, in order."""
        return list(self.plan(epoch))

    def _emit(self, item: int) -> CodeRecord:
        return self.reader[item]


def pack_by_token_budget(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Greedy packing in the given order: a batch closes when the next sequence would exceed max_tokens.

    lengths: int [M] tokens per sequence (each <= max_tokens). Returns position arrays (int64) into lengths.
    """
    bounds, total = [], 0
    for position, length in enumerate(lengths.tolist()):
        if total + length > max_tokens:
            bounds.append(position)
            total = 0
        total += length
    return np.split(np.arange(len(lengths)), bounds) if len(lengths) else []


class TokenBudgetBatcher(_EpochIterator):
    """Yields lists of global row indices whose token count (L + extra_tokens each) fits ``max_tokens``.

    Per epoch, from (seed, epoch) alone: views="all" takes every row; views="random" takes one row per
    key, picking among that key's rows (ordered by view id) uniformly with a generator seeded by
    (seed, epoch) and indexed by the key's rank in sorted key order. The chosen rows are shuffled, packed
    greedily in that order, and the batches are sharded by the module rule, so every rank yields the same
    number of batches per epoch.
    """

    def __init__(self, reader: CodeReader, max_tokens: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 views: str = "random", epoch: int = 0, drop_last: bool = False, extra_tokens: int = 0):
        super().__init__(len(reader), rank, world_size, seed, epoch, drop_last)
        if views not in ("random", "all"):
            raise ValueError(f"views must be 'random' or 'all', got {views!r}")
        self.reader = reader
        self.max_tokens, self.views, self.extra_tokens = int(max_tokens), views, int(extra_tokens)
        self.tokens = reader.lengths.astype(np.int64) + self.extra_tokens
        if len(self.tokens) and self.tokens.max() > self.max_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} is below the longest sequence "
                             f"({self.tokens.max()} tokens incl. {self.extra_tokens} extra); raise max_tokens")
        if views == "random":
            _, key_ids = np.unique(reader.keys(), return_inverse=True)
            self._rows_by_key = np.lexsort((reader.views(), key_ids))
            self._views_per_key = np.bincount(key_ids)
            self._first_row_of_key = np.cumsum(self._views_per_key) - self._views_per_key

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "max_tokens": self.max_tokens, "views": self.views,
                "extra_tokens": self.extra_tokens}

    def _global_items(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        if self.views == "all":
            rows = np.arange(self.num_rows)
        else:
            pick = (rng.random(len(self._views_per_key)) * self._views_per_key).astype(np.int64)
            rows = self._rows_by_key[self._first_row_of_key + pick]
        rows = rng.permutation(rows)
        return [rows[positions] for positions in pack_by_token_budget(self.tokens[rows], self.max_tokens)]

    def _emit(self, item: np.ndarray) -> list[int]:
        return item.tolist()
