"""The epoch plan's pure functions (data.epoch) on hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from data.epoch import (batch_unit, check_layout, deal_shards, entries_per_epoch, grad_accum_for, rank_units, seed_int,
                        shard_order, steps_per_epoch, unit_pass_shards, worker_units)


def test_deal_shards_balances_and_gives_every_unit_a_shard():
    bins = deal_shards([0, 1, 2, 3, 4], sizes=[10, 0, 3, 4, 5], units=3)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert all(bins) and bins == [[0], [1, 3], [2, 4]]  # empty shard 1 still fills a bin first


def test_deal_shards_follows_the_order_and_breaks_ties_by_lowest_bin():
    # order 3, 0, 2, 1 with sizes 1, 2, 3, 4 (by index): 3 -> bin 0 (4), 0 -> bin 1 (1), then fewest:
    # 2 -> bin 1 (1 + 3 = 4), 1 -> tie 4 / 4: lowest bin 0 (4 + 2 = 6).
    assert deal_shards([3, 0, 2, 1], sizes=[1, 2, 3, 4], units=2) == [[3, 1], [0, 2]]
    assert deal_shards([0, 1], sizes=[5, 5], units=4) == [[0], [1], [], []]


def test_unit_pass_shards_bins_modulo_and_resampled():
    sizes = [10, 0, 3, 4, 5]
    plain = dict(seed=0, epoch=0, pass_index=0, shuffle=False, resampled=False)
    assert [unit_pass_shards(sizes, 3, unit, **plain) for unit in range(3)] == [([0], None), ([1, 3], None),
                                                                                 ([2, 4], None)]
    # fewer shards than units: every unit reads all shards in order, keeping every 6th sample
    assert unit_pass_shards(sizes, 6, 4, **plain) == ([0, 1, 2, 3, 4], 4)
    # the same bins in every pass (not resampled)
    assert unit_pass_shards(sizes, 3, 1, **{**plain, "pass_index": 7}) == ([1, 3], None)
    shuffled = dict(plain, shuffle=True)
    order = np.random.default_rng([0, 0, 0]).permutation(5)
    assert unit_pass_shards(sizes, 6, 2, **shuffled) == (order.tolist(), 2)
    assert deal_shards(order, sizes, 3) == [unit_pass_shards(sizes, 3, u, **shuffled)[0] for u in range(3)]
    drawn = unit_pass_shards(sizes, 2, 1, **dict(plain, resampled=True))
    assert drawn[1] is None and len(drawn[0]) == 5 // 2 and all(0 <= i < 5 for i in drawn[0])
    assert drawn == unit_pass_shards(sizes, 2, 1, **dict(plain, resampled=True))
    others = {tuple(unit_pass_shards(sizes, 2, 1, **dict(plain, resampled=True, pass_index=p))[0])
              for p in range(20)}
    assert len(others) > 1  # each pass draws anew


def test_shard_order_is_a_seeded_permutation_per_epoch():
    assert shard_order(4, 1, 2, shuffle=False).tolist() == [0, 1, 2, 3]
    first = shard_order(50, 1, 2, shuffle=True)
    assert sorted(first.tolist()) == list(range(50)) and first.tolist() == shard_order(50, 1, 2, True).tolist()
    assert first.tolist() != shard_order(50, 1, 3, True).tolist() != shard_order(50, 2, 2, True).tolist()


def test_steps_and_seeds():
    assert steps_per_epoch(23, 4, drop_last=True) == 5 and steps_per_epoch(23, 4, drop_last=False) == 6
    assert steps_per_epoch(24, 4, drop_last=False) == 6 and steps_per_epoch(3, 4, drop_last=True) == 0
    assert seed_int(1, 2, 3) == seed_int(1, 2, 3) != seed_int(3, 2, 1)
    assert 0 <= seed_int(0) < 2 ** 64


def test_layout_check_lists_the_sizes_that_divide_the_units():
    check_layout(12, 3, 2)
    check_layout(12, 1, 1)
    with pytest.raises(ValueError, match=r"12 canonical units cannot be served by 5 ranks x 1 workers = 5 readers.*"
                                         r"one of \[1, 2, 3, 4, 6, 12\]"):
        check_layout(12, 5, 1)
    with pytest.raises(ValueError, match="8 readers"):
        check_layout(4, 2, 4)  # fewer units than readers
    with pytest.raises(ValueError, match="must be >= 1"):
        check_layout(0, 1, 1)


def test_entries_are_whole_optimizer_steps():
    # 25 samples, B = 2, K = 4 (e.g. 2 ranks x grad_accum 2): floor(25 / 2 / 4) = 3 steps = 12 entries
    assert entries_per_epoch(25, 2, 4, drop_last=True) == 12
    assert entries_per_epoch(25, 2, 4, drop_last=False) == 16  # ceil: 4 steps, filled by repeats
    assert entries_per_epoch(24, 2, 4, drop_last=False) == 12
    assert entries_per_epoch(7, 2, 4, drop_last=True) == 0


def test_units_of_ranks_workers_and_batches():
    # C = 8, R = 2, W = 2: rank 1's batches 0..5 are entries 1, 3, 5, ...; units entry % 8
    assert [batch_unit(t, 1, 2, 8) for t in range(6)] == [(1, 1), (3, 3), (5, 5), (7, 7), (9, 1), (11, 3)]
    assert rank_units(1, 2, 8) == [1, 3, 5, 7]
    # logical worker 0 makes batches 0, 2, 4 (units 1, 5, 1), worker 1 batches 1, 3, 5 (units 3, 7, 3)
    assert worker_units(1, 2, 0, 2, 8) == [1, 5] and worker_units(1, 2, 1, 2, 8) == [3, 7]
    for world_size, workers in ((1, 1), (2, 2), (4, 2), (8, 1)):  # every unit served by exactly one reader
        served = [u for r in range(world_size) for w in range(workers) for u in worker_units(r, world_size, w,
                                                                                               workers, 8)]
        assert sorted(served) == list(range(8))
        for rank in range(world_size):
            for batch in range(24):
                _, unit = batch_unit(batch, rank, world_size, 8)
                assert unit in worker_units(rank, world_size, batch % workers, workers, 8)


def test_grad_accum_keeps_the_global_batch_or_says_which_sizes_work():
    assert grad_accum_for(8, 2) == 4 and grad_accum_for(8, 8) == 1 and grad_accum_for(8, 1) == 8
    with pytest.raises(ValueError, match=r"8 micro-batches .* on 3 ranks: use a number of ranks in \[1, 2, 4, 8\]"):
        grad_accum_for(8, 3)
    assert grad_accum_for(8, 3, allow_new_global_batch=True) == 3  # round(8 / 3): 9 micro-batches per step
    assert grad_accum_for(2, 16, allow_new_global_batch=True) == 1
