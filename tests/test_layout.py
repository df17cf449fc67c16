"""Canonical code layout: hand-computed orders and the codes <-> level-map round trip."""
import torch

from models.layout import canonical_positions, codes_to_level_maps, level_mask, level_maps_to_codes, num_codes


def test_hand_computed_order_two_levels():
    grain = torch.tensor([[0, 1], [1, 0]])  # 2x2 coarse grid, two fine regions
    levels, idx = canonical_positions(grain, 2)
    # coarse: raster cells 0 and 3; fine grid is 4x4, region (0,1) -> cells 2,3,6,7; region (1,0) -> 8,9,12,13
    assert levels.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert idx.tolist() == [0, 3, 2, 3, 6, 7, 8, 9, 12, 13]
    assert int(num_codes(grain)) == 10


def test_three_levels_counts_and_masks():
    grain = torch.tensor([[2, 0], [1, 1]])
    assert int(num_codes(grain)) == 16 + 1 + 4 + 4
    assert level_mask(grain, 2).sum() == 16 and level_mask(grain, 2).shape == (8, 8)
    assert level_mask(grain, 1).sum() == 8 and level_mask(grain, 1).shape == (4, 4)
    batch = torch.stack([grain, torch.zeros_like(grain)])
    assert num_codes(batch).tolist() == [25, 4]


def test_round_trip_random_maps():
    gen = torch.Generator().manual_seed(0)
    for num_levels in (1, 2, 3):
        for k in (1, 2, 3):
            grain = torch.randint(0, num_levels, (4, 3), generator=gen)
            length = int(num_codes(grain))
            codes = torch.randint(0, 1000, (length, k), generator=gen)
            maps = codes_to_level_maps(grain, codes, num_levels)
            assert [m.shape[-2:] for m in maps] == [(4 << g, 3 << g) for g in range(num_levels)]
            assert sum(int((m[0] >= 0).sum()) for m in maps) == length
            assert torch.equal(level_maps_to_codes(grain, maps), codes)
