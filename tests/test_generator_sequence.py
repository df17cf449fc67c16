"""Code maps <-> token sequences, packing and next-token targets (models.generator.sequence)."""
import pytest
import torch

from models.generator.sequence import (IGNORE, SequenceSpec, assign_rows, decode_sequences, encode_sequences,
                                       next_token_targets, pack, unpack)
from models.layout import codes_to_level_maps, num_codes


def random_maps(spec: SequenceSpec, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    grains, codes = [], []
    for _ in range(count):
        grain = torch.randint(0, spec.num_levels, spec.grain_shape, generator=gen)
        grains.append(grain.to(torch.uint8))
        cols = [torch.randint(0, size, (int(num_codes(grain)), 1), generator=gen) for size in spec.codebook_sizes]
        codes.append(torch.cat(cols, 1))
    return grains, codes


def test_worked_example_from_the_docstring():
    spec = SequenceSpec(2, (2, 2), (5,))
    grain = torch.tensor([[0, 1], [0, 0]])
    codes = torch.arange(7)[:, None]  # a..g
    seqs = encode_sequences(spec, [grain], [codes])
    assert (spec.num_cells, spec.end_id(0), spec.end, spec.bos) == (20, 20, 21, 22)
    assert seqs.position.tolist() == [22, 0, 2, 3, 20, 6, 7, 10, 11, 21]
    assert seqs.content[:, 0].tolist() == [5, 0, 1, 2, 5, 3, 4, 5, 6, 5]
    assert seqs.lengths.tolist() == [10]
    assert seqs.index.tolist() == list(range(10))


@pytest.mark.parametrize("num_levels", [1, 2, 3])
@pytest.mark.parametrize("num_subcodes", [1, 2, 3])
def test_round_trip_and_agreement_with_layout(num_levels, num_subcodes):
    spec = SequenceSpec(num_levels, (3, 2), tuple([7, 300, 65536][:num_subcodes]))
    grains, codes = random_maps(spec, 6, seed=10 * num_levels + num_subcodes)
    seqs = encode_sequences(spec, grains, codes)
    assert seqs.lengths.tolist() == [int(num_codes(g)) + num_levels + 1 for g in grains]
    for (grain, got), want_grain, want in zip(decode_sequences(spec, seqs), grains, codes):
        assert got.dtype == torch.long and grain.dtype == torch.uint8
        assert torch.equal(grain, want_grain) and torch.equal(got, want)
    # every code token carries the sub-codes that models.layout places at its (level, cell)
    first = seqs.doc == 0
    maps = codes_to_level_maps(grains[0].long(), codes[0], num_levels)
    cell_tokens = first & (seqs.position < spec.num_cells)
    levels = spec.position_level(seqs.position[cell_tokens])
    cells = seqs.position[cell_tokens] - torch.tensor(spec.level_offsets)[levels]
    for token, level, cell in zip(seqs.content[cell_tokens], levels.tolist(), cells.tolist()):
        assert token.tolist() == maps[level].flatten(1)[:, cell].tolist()
    # packed and unpacked again
    batch = pack(spec, seqs, torch.arange(6), max_tokens=spec.max_length + 5, null_label=99)
    back = unpack(batch)
    for name in ("position", "content", "doc", "lengths"):
        assert torch.equal(getattr(back, name), getattr(seqs, name))


def test_region_grouped_order_inside_a_level():
    spec = SequenceSpec(3, (1, 2), (4,))
    grain = torch.tensor([[2, 1]])  # region 0 at level 2 (16 cells of an 4x8 grid), region 1 at level 1
    seqs = encode_sequences(spec, [grain], [torch.zeros(20, 1, dtype=torch.long)])
    offsets = spec.level_offsets  # level sizes 2, 8, 32
    level1 = [offsets[1] + c for c in (2, 3, 6, 7)]
    level2 = [offsets[2] + y * 8 + x for y in range(4) for x in range(4)]
    assert seqs.position.tolist() == [spec.bos, spec.end_id(0)] + level1 + [spec.end_id(1)] + level2 + [spec.end]


def test_decode_rejects_invalid_maps():
    spec = SequenceSpec(2, (1, 2), (4,))
    seqs = encode_sequences(spec, [torch.tensor([[0, 1]])], [torch.zeros(5, 1, dtype=torch.long)])
    missing_cell = seqs.position != spec.level_offsets[1] + 3
    seqs_missing = type(seqs)(seqs.position[missing_cell], seqs.content[missing_cell], seqs.doc[missing_cell],
                              seqs.lengths - 1)
    with pytest.raises(ValueError, match="not a valid code map"):
        decode_sequences(spec, seqs_missing)
    doubled = seqs.position.clone()
    doubled[1] = spec.level_offsets[1] + 2  # the level-0 code of region 0 becomes a repeat of a level-1 cell
    with pytest.raises(ValueError, match="not a valid code map"):
        decode_sequences(spec, type(seqs)(doubled, seqs.content, seqs.doc, seqs.lengths))


def test_encode_checks_inputs():
    spec = SequenceSpec(2, (2, 2), (4,))
    with pytest.raises(ValueError, match="implies 7"):
        encode_sequences(spec, [torch.tensor([[0, 1], [0, 0]])], [torch.zeros(6, 1)])
    with pytest.raises(ValueError, match="0..1"):
        encode_sequences(spec, [torch.tensor([[0, 2], [0, 0]])], [torch.zeros(19, 1)])
    with pytest.raises(ValueError, match="expects"):
        encode_sequences(spec, [torch.zeros(3, 3, dtype=torch.long)], [torch.zeros(9, 1)])


def test_first_fit_decreasing_assignment():
    rows, offsets = assign_rows([5, 9, 3, 4, 6], max_tokens=10)
    # decreasing: 9 -> row 0, 6 -> row 1, 5 -> row 2, 4 -> row 1 (6+4), 3 -> row 2 (5+3)
    assert rows == [2, 0, 2, 1, 1] and offsets == [0, 0, 5, 6, 0]
    with pytest.raises(ValueError, match="max_tokens"):
        assign_rows([11], max_tokens=10)


def test_packing_layout_mask_and_efficiency():
    spec = SequenceSpec(2, (2, 2), (8, 8))
    grains, codes = random_maps(spec, 7, seed=3)
    seqs = encode_sequences(spec, grains, codes)
    batch = pack(spec, seqs, torch.arange(7) % 3, max_tokens=40, null_label=3)
    assert batch.num_tokens == int(seqs.lengths.sum())
    assert batch.efficiency == pytest.approx(batch.num_tokens / batch.doc.numel())
    valid = batch.valid
    # padding only at row ends: once a slot is padding, every later slot of that row is too
    assert torch.equal(valid, valid.int().cummin(dim=1).values.bool())
    for d in range(7):
        where = batch.doc == d
        assert where.sum() == seqs.lengths[d] and torch.equal(batch.index[where], torch.arange(int(seqs.lengths[d])))
        assert (batch.label[where] == d % 3).all()
    mask = batch.attention_mask()[:, 0]
    same_doc = (batch.doc[:, :, None] == batch.doc[:, None, :]) & valid[:, :, None]
    causal = torch.ones_like(mask[0]).tril()
    assert torch.equal(mask & valid[:, :, None], same_doc & causal)
    assert mask.diagonal(dim1=1, dim2=2).all()


def test_targets_never_cross_sequences_and_skip_forced_positions():
    spec = SequenceSpec(2, (1, 2), (4,))
    grains = [torch.tensor([[0, 1]]), torch.tensor([[1, 0]])]
    codes = [torch.arange(5)[:, None], torch.arange(5)[:, None] + 1]
    seqs = encode_sequences(spec, grains, codes)
    batch = pack(spec, seqs, torch.zeros(2, dtype=torch.long), max_tokens=20, null_label=1)
    assert batch.position.shape == (1, 16) and batch.efficiency == 1.0
    targets = next_token_targets(spec, batch)
    # sequence 0: BOS 0 EOL_0 | 4 5 8 9 END ; ids: level 0 = 0,1; level 1 = 2..9 (2 x 4 grid); EOL_0 = 10, END = 11
    assert batch.position[0, :9].tolist() == [12, 0, 10, 4, 5, 8, 9, 11, 12]
    assert targets.position[0, :9].tolist() == [0, 10, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 1]
    assert targets.next_position[0, :9].tolist() == [0, 10, 4, 5, 8, 9, 11, 11, 1]
    assert targets.content[0, :9, 0].tolist() == [0, IGNORE, 1, 2, 3, 4, IGNORE, IGNORE, 1]
    assert targets.position[0, -1] == IGNORE and targets.content[0, -1, 0] == IGNORE
