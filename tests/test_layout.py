"""Canonical code layout: hand-computed orders and the codes <-> level-map round trip."""
import torch

import pytest

from models.layout import (batch_canonical_positions, batch_codes_to_level_maps, canonical_positions,
                           codes_to_level_maps, level_mask, level_maps_to_codes, num_codes)


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


def per_image_order(grain: torch.Tensor, num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one nonzero per level of one map (the former implementation)."""
    indices = [level_mask(grain, level).flatten().nonzero().squeeze(1) for level in range(num_levels)]
    return torch.cat([torch.full_like(i, g) for g, i in enumerate(indices)]), torch.cat(indices)


@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_batched_order_equals_the_per_image_order(num_levels):
    gen = torch.Generator().manual_seed(num_levels)
    grain = torch.randint(0, num_levels, (7, 3, 5), generator=gen)
    grain[0] = num_levels - 1   # all finest
    grain[1] = 0                # all coarsest
    image, levels, indices = batch_canonical_positions(grain, num_levels)
    assert torch.equal(torch.bincount(image, minlength=7), num_codes(grain))
    assert torch.equal(image, torch.sort(image).values)
    for b in range(7):
        want_levels, want_indices = per_image_order(grain[b], num_levels)
        assert torch.equal(levels[image == b], want_levels) and torch.equal(indices[image == b], want_indices)
        got_levels, got_indices = canonical_positions(grain[b], num_levels)
        assert torch.equal(got_levels, want_levels) and torch.equal(got_indices, want_indices)


@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_batched_scatter_equals_the_per_image_reference(num_levels):
    """All images' concatenated codes onto B x K x Hg x Wg maps at once; reference: per image, per level."""
    gen = torch.Generator().manual_seed(10 + num_levels)
    grain = torch.randint(0, num_levels, (5, 2, 3), generator=gen)
    grain[0] = num_levels - 1
    lengths = num_codes(grain)
    codes = torch.randint(0, 1000, (int(lengths.sum()), 2), generator=gen).to(torch.int32)
    maps = batch_codes_to_level_maps(grain, codes, num_levels, fill=-7)
    assert [tuple(m.shape) for m in maps] == [(5, 2, 2 << g, 3 << g) for g in range(num_levels)]
    assert all(m.dtype == torch.long for m in maps)
    for b, image_codes in enumerate(codes.split(lengths.tolist())):
        levels, indices = per_image_order(grain[b], num_levels)
        for level in range(num_levels):
            want = torch.full((2, (2 << level) * (3 << level)), -7, dtype=torch.long)
            want[:, indices[levels == level]] = image_codes[levels == level].long().T
            assert torch.equal(maps[level][b].flatten(1), want)
        assert torch.equal(level_maps_to_codes(grain[b], [m[b] for m in maps]), image_codes.long())
    with pytest.raises(ValueError, match=f"implies L = {int(lengths.sum())}"):
        batch_codes_to_level_maps(grain, codes[1:], num_levels)
