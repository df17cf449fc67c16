"""Variable-granularity code maps <-> token sequences for the stacked generator, and packed batches.

**Sequence of one image** (``G`` levels, ``K`` sub-codes, coarsest grid ``Hs x Ws`` of ``R`` regions)::

    BOS | level-0 codes | EOL_0 | level-1 codes | EOL_1 | ... | level-(G-1) codes | END

Every token carries a *position* id and a *content* (``K`` sub-codes). Position ids index one table
with separate rows per level: level ``g`` cell ``i`` (raster index in the level's
``(Hs 2^g) x (Ws 2^g)`` grid) has id ``offset[g] + i``; then come the end markers ``EOL_g = C + g``
(``g < G - 1``) and ``END = C + G - 1`` (``C`` = total cells of all levels), then ``BOS = C + G``
(input only, never predicted). Code tokens carry their sub-codes; BOS / EOL / END carry the "none"
sub-code ``codebook_sizes[j]``.

**Order inside a level is region-grouped**: regions taken at that level in raster order of the
coarsest grid, and the ``4^g`` cells of each region in raster order of its ``2^g x 2^g`` block. So a
region is opened by its top-left cell (the only *free* position choice) and its other cells follow
(*forced*). The canonical order (:mod:`models.layout`: raster over the whole level grid) is recovered
exactly by sorting code tokens by ``(level, cell)``.

Worked example, ``G = 2``, ``K = 1``, grain ``[[0, 1], [0, 0]]`` (``Hs = Ws = 2``, ``C = 4 + 16 = 20``),
canonical codes ``[a, b, c, d, e, f, g]`` (level 0 cells 0, 2, 3; level 1 cells 2, 3, 6, 7)::

    position: BOS=22  0  2  3  EOL_0=20  6  7  10  11  END=21
    content:  none    a  b  c  none      d  e  f   g   none

(level-1 cell ``(y, x)`` has id ``4 + 4 y + x``; its region (0, 1) covers cells 2, 3, 6, 7.)

**Packed batches**: sequences are concatenated into rows of at most ``max_tokens`` slots with padding
only at row ends; attention is block-diagonal causal (document ids), token indices (RoPE) restart at 0
for every sequence. Everything here is vectorized over tokens (index arithmetic and one sort); the
only Python loop is the bin-packing decision over sequences.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from models.generator.attention import DocumentMask, sequence_spans
from models.layout import level_shape, num_codes

IGNORE = -100  # target value skipped by the losses


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[int, ...], device: torch.device) -> Tensor:
    """A small int64 constant tensor, created once per device (no host->device copy per call)."""
    return torch.tensor(values, dtype=torch.long, device=device)


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
    """Vocabulary layout for ``num_levels`` levels over a coarsest ``grain_shape`` grid, with
    ``len(codebook_sizes)`` sub-codes."""

    num_levels: int
    grain_shape: tuple[int, int]
    codebook_sizes: tuple[int, ...]

    @property
    def num_subcodes(self) -> int:
        return len(self.codebook_sizes)

    @property
    def num_regions(self) -> int:
        return self.grain_shape[0] * self.grain_shape[1]

    @property
    def level_sizes(self) -> list[int]:
        """Cells of every level's grid."""
        return [h * w for h, w in (level_shape(self.grain_shape, g) for g in range(self.num_levels))]

    @property
    def level_offsets(self) -> list[int]:
        sizes = self.level_sizes
        return [sum(sizes[:g]) for g in range(self.num_levels)]

    @property
    def num_cells(self) -> int:
        return sum(self.level_sizes)

    def end_id(self, level: int) -> int:
        """Position id that closes ``level``: EOL_level, or END for the finest level."""
        return self.num_cells + level

    @property
    def end(self) -> int:
        return self.end_id(self.num_levels - 1)

    @property
    def bos(self) -> int:
        return self.num_cells + self.num_levels

    @property
    def position_vocab(self) -> int:
        """Predicted position ids: all cells plus the G end markers."""
        return self.num_cells + self.num_levels

    @property
    def position_input_vocab(self) -> int:
        return self.position_vocab + 1

    @property
    def none_content(self) -> Tensor:
        """``[K]`` sub-codes carried by BOS / EOL / END tokens."""
        return torch.tensor(self.codebook_sizes, dtype=torch.long)

    @property
    def max_length(self) -> int:
        """Longest sequence: every region at the finest level."""
        return 1 + self.num_regions * 4 ** (self.num_levels - 1) + self.num_levels

    def cell_position(self, level: Tensor, region: Tensor, cell_in_region: Tensor) -> Tensor:
        """Position id of cell ``cell_in_region`` (raster within the ``2^g`` block) of ``region`` at ``level``."""
        width = self.grain_shape[1]
        scale = torch.ones_like(level) << level
        y = (region // width) * scale + cell_in_region // scale
        x = (region % width) * scale + cell_in_region % scale
        return _constant(tuple(self.level_offsets), level.device)[level] + y * (width * scale) + x

    def position_level(self, position: Tensor) -> Tensor:
        """Level of a cell or end-marker position id (BOS maps to level 0, the level it opens)."""
        starts = _constant(tuple(self.level_offsets[1:]), position.device)
        cell_level = torch.bucketize(position.contiguous(), starts, right=True)
        marker_level = (position - self.num_cells).clamp(0, self.num_levels - 1)
        level = torch.where(position < self.num_cells, cell_level, marker_level)
        return torch.where(position == self.bos, torch.zeros_like(level), level)

    def cell_coordinates(self, position: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(level, y, x)`` of cell position ids in their level's grid (undefined for markers)."""
        level = self.position_level(position)
        cell = position - _constant(tuple(self.level_offsets), position.device)[level]
        width = torch.full_like(level, self.grain_shape[1]) << level
        return level, cell // width, cell % width

    def position_region(self, position: Tensor) -> Tensor:
        """Coarsest-grid region of cell position ids (undefined for markers)."""
        level, y, x = self.cell_coordinates(position)
        return (y >> level) * self.grain_shape[1] + (x >> level)

    def is_opening(self, position: Tensor) -> Tensor:
        """bool: the id is the top-left cell of its region at its level (markers: False)."""
        level, y, x = self.cell_coordinates(position)
        block = (torch.ones_like(level) << level) - 1
        return (position < self.num_cells) & ((y & block) == 0) & ((x & block) == 0)

    def finest_coordinates(self, position: Tensor) -> tuple[Tensor, Tensor]:
        """Float ``(y, x)`` of the centre of a cell on the finest level's grid (2-D RoPE); markers get (-1, -1)."""
        level, y, x = self.cell_coordinates(position)
        scale = (torch.ones_like(level) << (self.num_levels - 1 - level)).float()
        is_cell = position < self.num_cells
        marker = torch.full_like(scale, -1.0)
        return (torch.where(is_cell, (y + 0.5) * scale - 0.5, marker),
                torch.where(is_cell, (x + 0.5) * scale - 0.5, marker))

    def choice_ids(self, device: torch.device | str = "cpu") -> Tensor:
        """int64 ``[G, R + 1]``: at level ``g`` the opening cell of every region, then EOL_g (END at the last)."""
        levels = torch.arange(self.num_levels, device=device)[:, None].expand(-1, self.num_regions)
        regions = torch.arange(self.num_regions, device=device).expand_as(levels)
        openings = self.cell_position(levels, regions, torch.zeros_like(levels))
        return torch.cat([openings, self.num_cells + levels[:, :1]], 1)

    def free_positions(self, device: torch.device | str = "cpu") -> Tensor:
        """bool ``[G, position_vocab]``: ids the model chooses freely when the next token is at level ``g``.

        Free: region-opening (top-left) cells of level ``g < G - 1`` and EOL_g. Everything at the finest
        level (and every non-opening cell) is forced by the validity rule, so it gets no position loss.
        """
        ids = torch.arange(self.position_vocab, device=device)
        level = self.position_level(ids)
        coarse = level < self.num_levels - 1
        free = coarse & ((ids >= self.num_cells) | self.is_opening(ids))
        return free[None, :] & (level[None, :] == torch.arange(self.num_levels, device=device)[:, None])


@functools.lru_cache(maxsize=16)
def _free_positions(spec: SequenceSpec, device: torch.device) -> Tensor:
    """:meth:`SequenceSpec.free_positions`, built once per (spec, device)."""
    return spec.free_positions(device)


@dataclasses.dataclass
class FlatSequences:
    """Several token sequences concatenated: ``N`` tokens, sequence ``b`` at ``starts[b] : starts[b] + lengths[b]``."""

    position: Tensor  # int64 [N]
    content: Tensor   # int64 [N, K]
    doc: Tensor       # int64 [N]: sequence index
    lengths: Tensor   # int64 [B]

    @property
    def starts(self) -> Tensor:
        return torch.cumsum(self.lengths, 0) - self.lengths

    @property
    def index(self) -> Tensor:
        """int64 ``[N]``: index of each token within its sequence."""
        return torch.arange(self.doc.numel(), device=self.doc.device) - self.starts[self.doc]


def encode_sequences(spec: SequenceSpec, grains: Sequence[Tensor], codes: Sequence[Tensor]) -> FlatSequences:
    """Token sequences of a batch of code maps.

    grains: ``B`` maps ``[Hs, Ws]`` (levels ``0 .. G-1``); codes: ``B`` canonical ``[L_b, K]`` arrays.
    Returns the ``B`` sequences concatenated (``L_b + G + 1`` tokens each).
    """
    if len(grains) != len(codes) or not grains:
        raise ValueError(f"need as many grain maps as code arrays (got {len(grains)} and {len(codes)})")
    grain = torch.stack([torch.as_tensor(g).long() for g in grains])
    device = grain.device
    batch, regions, levels = grain.shape[0], spec.num_regions, spec.num_levels
    if tuple(grain.shape[1:]) != spec.grain_shape:
        raise ValueError(f"grain maps are {tuple(grain.shape[1:])}, the model expects {spec.grain_shape}")
    if grain.min() < 0 or grain.max() >= levels:
        raise ValueError(f"grain values must lie in 0..{levels - 1}, got {int(grain.min())}..{int(grain.max())}")
    code_cat = torch.cat([torch.as_tensor(c).long().reshape(-1, spec.num_subcodes) for c in codes]).to(device)
    expected = num_codes(grain)
    got = torch.tensor([torch.as_tensor(c).reshape(-1, spec.num_subcodes).shape[0] for c in codes], device=device)
    if not torch.equal(expected, got):
        bad = int((expected != got).nonzero()[0])
        raise ValueError(f"sample {bad}: codes has {int(got[bad])} rows, its grain map implies {int(expected[bad])}")

    # One entry per code: (sample, level, region, cell within region), ordered by sample then region.
    flat_level = grain.reshape(-1)
    counts = torch.ones_like(flat_level) << (2 * flat_level)
    owner = torch.repeat_interleave(torch.arange(flat_level.numel(), device=device), counts)
    sample, region, level = owner // regions, owner % regions, flat_level[owner]
    cell_in_region = torch.arange(owner.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[owner]
    position = spec.cell_position(level, region, cell_in_region)

    # Contents: the canonical rows of a sample are sorted by (level, cell) = sorted by position id.
    canonical = torch.argsort(sample * spec.num_cells + position)
    content = torch.empty_like(code_cat)
    content[canonical] = code_cat

    # Sequence order: BOS, then per level its codes (region, cell) and its end marker.
    per_region = 4 ** (levels - 1)
    level_span = regions * per_region + 1
    sample_span = 1 + levels * level_span
    code_key = sample * sample_span + 1 + level * level_span + region * per_region + cell_in_region
    marker_sample = torch.arange(batch, device=device).repeat_interleave(levels)
    marker_level = torch.arange(levels, device=device).repeat(batch)
    marker_key = marker_sample * sample_span + 1 + marker_level * level_span + regions * per_region
    bos_sample = torch.arange(batch, device=device)
    none = spec.none_content.to(device)

    keys = torch.cat([code_key, marker_key, bos_sample * sample_span])
    order = torch.argsort(keys)
    all_position = torch.cat([position, spec.num_cells + marker_level,
                              torch.full((batch,), spec.bos, device=device)])[order]
    all_content = torch.cat([content, none.expand(batch * (levels + 1), -1)])[order]
    all_doc = torch.cat([sample, marker_sample, bos_sample])[order]
    return FlatSequences(all_position, all_content, all_doc, expected + levels + 1)


def decode_sequences(spec: SequenceSpec, seqs: FlatSequences) -> list[tuple[Tensor, Tensor]]:
    """Exact inverse of :func:`encode_sequences`: ``B`` pairs ``(grain uint8 [Hs, Ws], codes int64 [L, K])``.

    Raises ``ValueError`` when a sequence is not a valid code map (a region coded at two levels, not
    fully or twice covered, or a cell repeated).
    """
    batch, regions = seqs.lengths.numel(), spec.num_regions
    device = seqs.position.device
    is_code = seqs.position < spec.num_cells
    position, content, doc = seqs.position[is_code], seqs.content[is_code], seqs.doc[is_code]
    level, region = spec.position_level(position), spec.position_region(position)
    slot = doc * regions + region
    grain = torch.full((batch * regions,), spec.num_levels, dtype=torch.long, device=device)
    grain = grain.scatter_reduce(0, slot, level, "amin")
    top = torch.full_like(grain, -1).scatter_reduce(0, slot, level, "amax")
    cover = torch.zeros_like(grain).scatter_add(0, slot, torch.ones_like(slot))
    order = torch.argsort(doc * spec.num_cells + position)
    key = (doc * spec.num_cells + position)[order]
    bad_region = (grain != top) | (cover != torch.ones_like(cover) << (2 * grain))
    repeated = key[1:] == key[:-1]
    if bad_region.any() or repeated.any():
        sample = int(bad_region.nonzero()[0]) // regions if bad_region.any() else int(doc[order][1:][repeated][0])
        raise ValueError(f"sequence {sample} is not a valid code map: every region must be covered by all "
                         f"its cells at exactly one level, each cell once")
    grain = grain.view(batch, *spec.grain_shape)
    per_sample = torch.zeros(batch, dtype=torch.long, device=device).scatter_add(0, doc, torch.ones_like(doc))
    codes = content[order].split(per_sample.tolist())
    return [(g.to(torch.uint8), c) for g, c in zip(grain, codes)]


@dataclasses.dataclass
class PackedBatch:
    """Sequences packed into ``R`` rows of ``S`` slots; padding only at row ends (``doc == -1``)."""

    position: Tensor  # int64 [R, S] input position ids (END at padding)
    content: Tensor   # int64 [R, S, K]
    label: Tensor     # int64 [R, S]: class of the token's sequence (null class at padding)
    doc: Tensor       # int64 [R, S]: sequence index, -1 at padding
    index: Tensor     # int64 [R, S]: token index within its sequence (RoPE), 0 at padding
    # int64 [M]: :func:`content_target_rows` of this batch, computed by :func:`pack` on the packing device so
    # that training needs no device->host sync; None = derive it when needed. Recompute it (or set None)
    # after editing ``position`` or ``doc``.
    content_rows: Optional[Tensor] = None
    # int64 [B, 3] on the host: :func:`~models.generator.attention.sequence_spans` ((row, start, length) of every
    # sequence) for the per-sequence attention kernel; computed by :func:`pack`, None = derive when needed.
    sequence_spans: Optional[Tensor] = None

    @property
    def valid(self) -> Tensor:
        return self.doc >= 0

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())

    @property
    def efficiency(self) -> float:
        """Packing efficiency: real tokens / slots."""
        return self.num_tokens / self.doc.numel()

    def document_mask(self) -> DocumentMask:
        """Block-diagonal causal attention of this batch without a dense mask (built once, shared by all layers)."""
        return DocumentMask(self.doc, self.sequence_spans)

    def attention_mask(self) -> Tensor:
        """bool ``[R, 1, S, S]``: query ``i`` may attend key ``j <= i`` of the same sequence (padding: itself).

        The dense reference of :meth:`document_mask` (tests, benchmarks)."""
        same = self.doc[:, :, None] == self.doc[:, None, :]
        causal = torch.ones(self.doc.shape[1], self.doc.shape[1], dtype=torch.bool, device=self.doc.device).tril()
        eye = torch.eye(self.doc.shape[1], dtype=torch.bool, device=self.doc.device)
        return ((same & causal) | eye)[:, None]

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The batch on ``device`` (``sequence_spans`` stays on the host, where it is read)."""
        return PackedBatch(*(None if (value := getattr(self, f.name)) is None else
                             value if f.name == "sequence_spans" else value.to(device)
                             for f in dataclasses.fields(self)))


def assign_rows(lengths: Sequence[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """First-fit-decreasing bin packing: ``(row, offset)`` of every sequence in rows of ``max_tokens`` slots."""
    too_long = [n for n in lengths if n > max_tokens]
    if too_long:
        raise ValueError(f"a sequence of {max(too_long)} tokens does not fit in max_tokens={max_tokens}; "
                         f"raise data.max_tokens to at least the longest sequence")
    fill: list[int] = []
    rows, offsets = [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= max_tokens), len(fill))
        if row == len(fill):
            fill.append(0)
        rows[i], offsets[i] = row, fill[row]
        fill[row] += lengths[i]
    return rows, offsets


def pack(spec: SequenceSpec, seqs: FlatSequences, labels: Tensor, max_tokens: int, null_label: int,
         row_length: Optional[int] = None) -> PackedBatch:
    """Pack sequences into rows (first-fit decreasing, sequences never split).

    Without ``row_length``: rows of at most ``max_tokens`` slots, as long as the fullest one. With it: rows
    of exactly ``row_length`` slots (static shapes for compiled kernels), at least
    ``ceil(max_tokens / row_length)`` of them (more only when the sequences do not fit in that many).
    labels: int64 ``[B]`` class per sequence (``null_label`` for none).
    """
    rows, offsets = assign_rows(seqs.lengths.tolist(), row_length or max_tokens)
    device = seqs.position.device
    rows_t, offsets_t = torch.tensor(rows, device=device), torch.tensor(offsets, device=device)
    if row_length is None:
        num_rows, width = max(rows) + 1, int((offsets_t + seqs.lengths).max())
    else:
        num_rows, width = max(max(rows) + 1, -(-max_tokens // row_length)), row_length
    index = seqs.index
    row, col = rows_t[seqs.doc], offsets_t[seqs.doc] + index
    position = torch.full((num_rows, width), spec.end, dtype=torch.long, device=device)
    content = spec.none_content.to(device).repeat(num_rows, width, 1)
    label = torch.full((num_rows, width), null_label, dtype=torch.long, device=device)
    doc = torch.full((num_rows, width), -1, dtype=torch.long, device=device)
    token_index = torch.zeros((num_rows, width), dtype=torch.long, device=device)
    position[row, col] = seqs.position
    content[row, col] = seqs.content
    label[row, col] = labels.to(device).long()[seqs.doc]
    doc[row, col] = seqs.doc
    token_index[row, col] = index
    batch = PackedBatch(position, content, label, doc, token_index)
    batch.content_rows = content_target_rows(spec, batch)
    batch.sequence_spans = sequence_spans(doc)
    return batch


def unpack(batch: PackedBatch) -> FlatSequences:
    """Inverse of :func:`pack`: the sequences in document order."""
    valid = batch.valid
    doc, index = batch.doc[valid], batch.index[valid]
    order = torch.argsort(doc * (batch.doc.shape[1] + 1) + index)
    doc = doc[order]
    lengths = torch.zeros(int(doc.max()) + 1, dtype=torch.long, device=doc.device).scatter_add(
        0, doc, torch.ones_like(doc))
    return FlatSequences(batch.position[valid][order], batch.content[valid][order], doc, lengths)


@dataclasses.dataclass
class Targets:
    """Next-token targets of a packed batch, ``IGNORE`` where there is nothing to learn."""

    next_position: Tensor    # int64 [R, S]: position id of the next token (END where none); content-stack input
    position: Tensor         # int64 [R, S]: next position where it is a free choice, else IGNORE
    content: Tensor          # int64 [R, S, K]: next token's sub-codes where it is a code token, else IGNORE


def next_positions(spec: SequenceSpec, batch: PackedBatch) -> tuple[Tensor, Tensor]:
    """``(has_next bool [R, S], next_position int64 [R, S])``: whether a token has a successor in its
    sequence, and that successor's position id (END where none)."""
    has_next = torch.zeros_like(batch.valid)
    has_next[:, :-1] = batch.valid[:, :-1] & (batch.doc[:, 1:] == batch.doc[:, :-1])
    next_position = torch.full_like(batch.position, spec.end)
    next_position[:, :-1] = batch.position[:, 1:]
    return has_next, torch.where(has_next, next_position, torch.full_like(next_position, spec.end))


def content_target_rows(spec: SequenceSpec, batch: PackedBatch) -> Tensor:
    """int64 ``[M]``: flat indices (``row * S + col``, ascending) of the tokens whose next token is a code,
    i.e. where :func:`next_token_targets` has content targets. Data-dependent size: a host sync on GPU."""
    _, next_position = next_positions(spec, batch)
    return (next_position < spec.num_cells).flatten().nonzero().squeeze(1)


def next_token_targets(spec: SequenceSpec, batch: PackedBatch) -> Targets:
    """Shift a packed batch by one token within each sequence (never across sequences)."""
    has_next, next_position = next_positions(spec, batch)
    next_content = torch.full_like(batch.content, IGNORE)
    next_content[:, :-1] = batch.content[:, 1:]
    is_code = next_position < spec.num_cells  # END where there is no next token
    free_table = _free_positions(spec, batch.position.device)
    free = has_next & free_table[spec.position_level(next_position), next_position]
    position = torch.where(free, next_position, torch.full_like(next_position, IGNORE))
    content = torch.where(is_code[..., None], next_content, torch.full_like(next_content, IGNORE))
    return Targets(next_position, position, content)


def valid_choices(spec: SequenceSpec, batch: PackedBatch) -> Tensor:
    """bool ``[R, S, R_c]``: the coarsest regions whose opening the sampler allows as the next position.

    The sampler's validity rule (:mod:`models.generator.decoding`) evaluated for every token at once: a
    region is a candidate when no earlier token of the sequence opened it (at any level) and it comes after
    the last region opened at the current level; EOL of the level is always allowed besides. Computed with
    one running max per (sequence, level) segment and one cumulative count of opened regions per row.
    Meaningful where the next position is a free choice (``next_token_targets(...).position != IGNORE``).
    """
    position, doc = batch.position, batch.doc
    regions = spec.num_regions
    opening = spec.is_opening(position) & (doc >= 0)
    region = spec.position_region(position.clamp(max=spec.num_cells - 1))
    # Segments restart at every sequence start and every level marker; ids are non-decreasing along a row.
    segment = torch.cumsum(((batch.index == 0) | (position >= spec.num_cells)).long(), 1)
    key = segment * (regions + 1) + torch.where(opening, region + 1, torch.zeros_like(region))
    last_region = key.cummax(1).values - segment * (regions + 1) - 1
    opened = torch.zeros(*position.shape, regions, dtype=torch.int32, device=position.device)
    opened.scatter_(2, region[..., None], opening[..., None].int())
    opened = opened.cumsum(1, dtype=torch.int32)
    start = (torch.arange(position.shape[1], device=position.device) - batch.index).clamp(min=0)
    taken = (opened - opened.gather(1, start[..., None].expand(-1, -1, regions))) > 0
    ids = torch.arange(regions, device=position.device)
    return ~taken & (ids > last_region[..., None])
