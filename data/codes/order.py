"""Deterministic, rank-sharded epoch order over the rows of a CodeReader, resumable at any world size.

Both iterators share one rule for equal work per rank. Each epoch builds a global ordered list of M
items (row indices for CodeIterator, batches of row indices for TokenBudgetBatcher) from
(seed, epoch) alone, identical on every rank and for every world size. An epoch that starts (or resumes)
at global position S with R ranks hands out the remaining M - S items: rank r takes positions
S + r, S + r + R, S + r + 2R, ...; the remaining items are padded to a multiple of R by repeating the
epoch's first items (drop_last=False, the default: position p >= M is item p - M) or truncated to
floor((M - S) / R) * R items (drop_last=True). Every rank therefore yields the same count. A fresh epoch
has S = 0.

Iteration yields the rest of the current epoch; a new ``for`` loop after a finished epoch starts the
next one (or call ``set_epoch``). ``state_dict()`` is layout independent: the epoch and ``consumed``, the
number of the epoch's global items handed out by all ranks together (S + R x the items this rank yielded;
M once this rank's part of the epoch is done), plus the settings that must match (seed, corpus, budget;
not the rank or world size). It is the same on every rank when every rank has handed out the same number
of items, as at an optimizer-step boundary. ``load_state_dict`` continues at S = consumed under the
loading iterator's own rank and world size, so a run saved on R ranks continues on R' ranks with the next
items of the same global list: within the epoch no item is lost or repeated beyond the padding rule. The
state counts items handed out: if a consumer prefetches, save the state it had when the consumed item
was produced.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from data.codes.reader import CodeReader, CodeRecord
from data.identity import check_same

STATE_FORMAT = "varitok.code-order/2"
LEGACY_KEYS = ("position", "world_size")   # the per-rank state of format 1: {epoch, position, rank, world_size, ...}

__all__ = ["STATE_FORMAT", "CodeIterator", "TokenBudgetBatcher", "corpus_digest", "pack_by_token_budget",
           "rank_positions"]


def rank_positions(num_items: int, rank: int, world_size: int, drop_last: bool, start: int = 0) -> np.ndarray:
    """Positions (int64) into an epoch's global item list of ``num_items`` that ``rank`` takes when the
    epoch continues at global position ``start``, per the module rule."""
    remaining = max(0, num_items - start)
    per_rank = remaining // world_size if drop_last else -(-remaining // world_size)
    if num_items == 0:
        return np.zeros(0, dtype=np.int64)
    return (start + rank + world_size * np.arange(per_rank, dtype=np.int64)) % num_items


def corpus_digest(reader: CodeReader) -> str:
    """sha256 (hex, 16 digits) of the reader's parts as recorded in the manifest (index, rows, codes, bytes,
    file sha256): two code directories with the same rows in the same files share it."""
    parts = reader.manifest.parts
    recorded = [[index, parts[index]["rows"], parts[index].get("num_codes", 0), parts[index].get("file_bytes", 0),
                 parts[index].get("sha256", "")] for index in sorted(reader.part_rows)]
    return hashlib.sha256(json.dumps(recorded).encode()).hexdigest()[:16]


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


class _EpochIterator:
    """Epoch/position bookkeeping; subclasses define the global item list and what an item yields.

    ``start``: global position at which this rank's plan of the current epoch begins (0, or the loaded
    ``consumed``); ``position``: items this rank has handed out since then.
    """

    def __init__(self, reader: CodeReader, rank: int, world_size: int, seed: int, epoch: int, drop_last: bool):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.reader = reader
        self.num_rows = len(reader)
        self.corpus = corpus_digest(reader)
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.epoch, self.start, self.position = epoch, 0, 0
        self._items_key: int | None = None
        self._items: Sequence[Any] = ()
        self._plan_key: tuple[int, int] | None = None
        self._plan: Sequence[Any] = ()

    def _global_items(self, epoch: int) -> Sequence[Any]:
        """The epoch's global item list (ndarray of row indices, or list of index arrays)."""
        raise NotImplementedError

    def _emit(self, item: Any) -> Any:
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        """Settings that must match for a saved state to be resumable (none of them depends on the layout)."""
        return {"seed": self.seed, "num_rows": self.num_rows, "corpus": self.corpus, "drop_last": self.drop_last}

    def global_items(self, epoch: int | None = None) -> Sequence[Any]:
        """The global item list of ``epoch`` (default: the current one), the same on every rank and layout."""
        epoch = self.epoch if epoch is None else epoch
        if self._items_key != epoch:
            self._items, self._items_key = self._global_items(epoch), epoch
        return self._items

    def plan(self, epoch: int | None = None) -> Sequence[Any]:
        """This rank's items of ``epoch`` (default: the current one, from ``start`` on), in order."""
        epoch = self.epoch if epoch is None else epoch
        start = self.start if epoch == self.epoch else 0
        if self._plan_key != (epoch, start):
            items = self.global_items(epoch)
            positions = rank_positions(len(items), self.rank, self.world_size, self.drop_last, start)
            self._plan = (items[positions].tolist() if isinstance(items, np.ndarray)
                          else [items[p] for p in positions.tolist()])
            self._plan_key = (epoch, start)
        return self._plan

    def __len__(self) -> int:
        return len(self.plan())

    @property
    def consumed(self) -> int:
        """Global items of the current epoch handed out by all ranks (assuming each handed out ``position``);
        the epoch's item count once this rank's plan is done (items dropped by drop_last stay dropped)."""
        if self.position >= len(self.plan()):
            return len(self.global_items())
        return self.start + self.position * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start, self.position = epoch, 0, 0

    def __iter__(self) -> Iterator[Any]:
        plan = self.plan()
        if self.position >= len(plan) and len(self.global_items()):
            self.set_epoch(self.epoch + 1)
            plan = self.plan()
        while self.position < len(plan):
            item = plan[self.position]
            self.position += 1
            yield self._emit(item)

    def state_dict(self) -> dict[str, Any]:
        """``{format, epoch, consumed, <identity>}``: plain ints and strings, layout independent."""
        return {"format": STATE_FORMAT, "epoch": int(self.epoch), "consumed": int(self.consumed), **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Continue at the saved global position under this iterator's rank and world size.

        ``state``: one saved state, or the states of all saved ranks (any world size; they must agree).
        Also accepts the per-rank state of format 1 (``position``, ``world_size``). Raises ValueError when
        the state was made with other settings (data.identity.check_same) or holds impossible numbers.
        """
        hint = "resume with the same code directory, seed and batching settings, or start a new run"
        states = [state] if isinstance(state, Mapping) else list(state) if isinstance(state, (list, tuple)) else None
        if not states or not all(isinstance(one, Mapping) for one in states):
            raise ValueError(f"cannot use the saved code order position: expected a state dict (or a list of the "
                             f"ranks' state dicts), got {type(state).__name__} {str(state)[:80]!r}; resume from "
                             f"another checkpoint")
        for other in states[1:]:
            check_same(states[0], other, what="saved code order states", saved_name="rank 0",
                       current_name="another rank", hint="the ranks' states disagree: the checkpoint was not "
                       "written at a step boundary or is damaged; resume from another checkpoint")
        state, expected = states[0], self._identity()
        legacy = "format" not in state and all(key in state for key in LEGACY_KEYS)
        if legacy:   # format 1 had no corpus digest; its global position is position x world_size
            compared = tuple(key for key in expected if key != "corpus")
            check_same(state, expected, only=compared, what="saved code order position", hint=hint)
            position, world_size = state["position"], state["world_size"]
            if not (_is_count(position) and _is_count(world_size) and world_size > 0):
                raise ValueError(f"the saved code order position is invalid (position={position!r}, world_size="
                                 f"{world_size!r}: need counts >= 0); resume from another checkpoint")
            state = {"epoch": state.get("epoch"), "consumed": position * world_size}
        else:
            check_same(state, {"format": STATE_FORMAT, **expected}, only=("format", *expected),
                       what="saved code order position", hint=hint)
        epoch, consumed = state.get("epoch"), state.get("consumed")
        if not _is_count(epoch) or not _is_count(consumed):
            raise ValueError(f"the saved code order position is invalid (epoch={epoch!r}, consumed={consumed!r}: "
                             f"need counts >= 0); the state is damaged: resume from another checkpoint")
        num_items = len(self.global_items(int(epoch)))
        if legacy:   # format 1 counted the padding of the epoch's last step
            consumed = min(consumed, num_items)
        if consumed > num_items:
            raise ValueError(f"the saved code order position is invalid: consumed={consumed} but epoch {epoch} has "
                             f"only {num_items} items; the state is damaged: resume from another checkpoint")
        self.epoch, self.start, self.position = int(epoch), int(consumed), 0


class CodeIterator(_EpochIterator):
    """Yields this rank's CodeRecords of each epoch: a permutation of all rows drawn from
    (seed, epoch) when ``shuffle``, else global index order; sharded by the module rule."""

    def __init__(self, reader: CodeReader, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        super().__init__(reader, rank, world_size, seed, epoch, drop_last)
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
    number of batches per epoch; the batches themselves do not depend on the world size.
    """

    def __init__(self, reader: CodeReader, max_tokens: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 views: str = "random", epoch: int = 0, drop_last: bool = False, extra_tokens: int = 0):
        super().__init__(reader, rank, world_size, seed, epoch, drop_last)
        if views not in ("random", "all"):
            raise ValueError(f"views must be 'random' or 'all', got {views!r}")
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
