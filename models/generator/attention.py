"""Attention of packed rows without a dense ``S x S`` mask: block-diagonal causal over document ids.

A packed row holds several sequences; query ``i`` may attend key ``j`` iff ``j <= i`` and both belong to
the same sequence (padding, ``doc == -1``, attends earlier padding of its row). :class:`DocumentMask` is
built once per batch and shared by both stacks and all their layers. Two kernels compute the same thing:

- **FlexAttention** with one ``BlockMask`` (``torch.compile``d; eager for rows of at most
  ``EAGER_MAX_LENGTH`` slots, where compiling costs more than it saves). Blocks outside every document
  are skipped, blocks inside one document below the diagonal run without the mask function. Used on
  GPUs, and on the CPU wherever no gradient is needed (PyTorch has no FlexAttention backward on the CPU).
- **Per-sequence SDPA** (CPU training): the causal flash kernel of ``scaled_dot_product_attention`` (no mask
  tensor) once per sequence, on views of the packed row (sequences are contiguous), so nothing is gathered or
  padded and the work is exactly the sum of the sequences' causal triangles. One autograd node covers all
  sequences of a layer (:class:`PerSequenceAttention`): outputs and gradients are written into one tensor each,
  instead of a node, a concatenation and a full-row zero gradient per sequence. The spans
  (:attr:`PackedBatch.sequence_spans`) come from ``pack`` on the host: no device->host sync in the step.

Shapes: ``R`` rows of ``S`` slots, ``H`` heads, ``Dh`` head width, ``B`` sequences.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

EAGER_MAX_LENGTH = 256    # rows up to this length run FlexAttention eagerly (compiling takes ~40 s on a CPU)
FLEX_BLOCK = 128          # FlexAttention block size (queries and keys)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def document_block_mask(doc: Tensor, block: int = FLEX_BLOCK):
    """FlexAttention ``BlockMask`` of block-diagonal causal attention for document ids ``doc [R, S]``.

    Built from per-block first/last document ids (documents are contiguous within a row, padding at
    its end), vectorised, without materialising any ``S x S`` tensor and without host syncs.
    """
    from torch.nn.attention.flex_attention import BlockMask

    rows, length = doc.shape
    blocks = -(-length // block)
    # Padding sorts after every document: the ids are then non-decreasing along a row.
    ordered = torch.where(doc < 0, torch.full_like(doc, length + 1), doc)
    ordered = F.pad(ordered, (0, blocks * block - length), value=length + 1).view(rows, blocks, block)
    first, last = ordered[..., 0], ordered[..., -1]
    ids = torch.arange(blocks, device=doc.device)
    below = ids[:, None] >= ids[None, :]                                   # [Q blocks, KV blocks]
    overlap = (first[:, :, None] <= last[:, None, :]) & (first[:, None, :] <= last[:, :, None])
    single = first == last
    full = ((ids[:, None] > ids[None, :]) & single[:, :, None] & single[:, None, :]
            & (first[:, :, None] == first[:, None, :]))
    partial = below & overlap & ~full

    def kv_lists(selected: Tensor) -> tuple[Tensor, Tensor]:
        counts = selected.sum(-1, dtype=torch.int32)[:, None]
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
        return counts, order

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    partial_counts, partial_indices = kv_lists(partial)
    full_counts, full_indices = kv_lists(full)
    return BlockMask.from_kv_blocks(partial_counts, partial_indices, full_counts, full_indices, BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(length, length))


def sequence_spans(doc: Tensor) -> Tensor:
    """int64 ``[B, 3]`` on the CPU: ``(row, start, length)`` of every sequence of ``doc [R, S]`` (-1 = padding;
    sequences are contiguous), ordered by row then start. Host-side helper (``pack`` calls it)."""
    doc = doc.cpu()
    first = (doc >= 0) & torch.cat([torch.ones_like(doc[:, :1], dtype=torch.bool), doc[:, 1:] != doc[:, :-1]], 1)
    rows, starts = first.nonzero(as_tuple=True)
    lengths = torch.bincount(doc[doc >= 0])[doc[rows, starts]]
    return torch.stack([rows, starts, lengths], 1)


Spans = tuple[tuple[int, int, int], ...]   # (row, start, stop or length) of slot ranges, host integers


def _flash_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Causal CPU flash attention (the kernel ``F.scaled_dot_product_attention`` picks): ``(out, logsumexp)``."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)


class PerSequenceAttention(torch.autograd.Function):
    """Causal attention within every sequence of packed rows, one flash-kernel call per sequence.

    ``[R, H, S, Dh]`` queries/keys/values, the sequences' ``(row, start, length)`` and the uncovered slots'
    ``(row, start, stop)`` -> ``[R, H, S, Dh]`` outputs, stored as ``[R, S, H, Dh]`` (the layout the kernel
    writes and the output projection reads, so neither copies); 0 at the uncovered slots (padding). Forward
    and backward run the kernels of per-sequence ``scaled_dot_product_attention(..., is_causal=True)`` calls,
    so the results are identical to those.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, spans: Spans, gaps: Spans) -> Tensor:
        out = _row_major_empty(q, gaps)
        lse = []
        for row, start, size in spans:
            rows, piece = slice(row, row + 1), slice(start, start + size)
            o, m = _flash_forward(q[rows, :, piece], k[rows, :, piece], v[rows, :, piece])
            out[rows, :, piece] = o
            lse.append(m)
        ctx.spans, ctx.gaps = spans, gaps
        ctx.save_for_backward(q, k, v, out, *lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, *lse = ctx.saved_tensors
        grads = [_row_major_empty(q, ctx.gaps) for _ in range(3)]
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        for (row, start, size), m in zip(ctx.spans, lse):
            rows, piece = slice(row, row + 1), slice(start, start + size)
            pieces = backward(grad_out[rows, :, piece], q[rows, :, piece], k[rows, :, piece], v[rows, :, piece],
                              out[rows, :, piece], m, 0.0, True)
            for grad, value in zip(grads, pieces):
                grad[rows, :, piece] = value
        return *grads, None, None


def _row_major_empty(like: Tensor, gaps: Spans) -> Tensor:
    """``[R, H, S, Dh]`` like ``like``, stored as ``[R, S, H, Dh]``: 0 in the ``gaps``, uninitialised elsewhere."""
    rows, heads, length, head_dim = like.shape
    x = like.new_empty(rows, length, heads, head_dim).transpose(1, 2)
    for row, start, stop in gaps:
        x[row, :, start:stop] = 0
    return x


def uncovered_slots(spans: Spans, rows: int, length: int) -> Spans:
    """``(row, start, stop)`` of the slot ranges of ``rows x length`` rows that no ``(row, start, length)``
    span covers (padding, empty rows)."""
    covered: list[list[tuple[int, int]]] = [[] for _ in range(rows)]
    for row, start, size in spans:
        covered[row].append((start, start + size))
    gaps = []
    for row, ranges in enumerate(covered):
        end = 0
        for start, stop in sorted(ranges) + [(length, length)]:
            if start > end:
                gaps.append((row, end, start))
            end = max(end, stop)
    return tuple(gaps)


class DocumentMask:
    """Block-diagonal causal attention of one packed batch (module docstring); call :meth:`attend` per layer."""

    def __init__(self, doc: Tensor, spans: Optional[Tensor] = None):
        """doc ``[R, S]``: document ids (-1 = padding); spans: :func:`sequence_spans` of it when already
        computed (``pack`` does, on the host)."""
        self.doc = doc
        self.spans = spans
        self._block_mask = None
        self._layout: Optional[tuple[Spans, Spans]] = None

    @property
    def block_mask(self):
        if self._block_mask is None:
            self._block_mask = document_block_mask(self.doc)
        return self._block_mask

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``[R, H, S, Dh]`` queries/keys/values -> ``[R, H, S, Dh]`` attention outputs (padding rows: 0 or
        attention over earlier padding, never read by a real token)."""
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if q.device.type == "cpu" and needs_grad:
            return self._per_sequence(q, k, v)
        from torch.nn.attention.flex_attention import flex_attention

        if q.shape[2] > EAGER_MAX_LENGTH:
            return _compiled_flex()(q, k, v, block_mask=self.block_mask)
        with warnings.catch_warnings():  # eager on purpose at these sizes ("called without torch.compile")
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=self.block_mask)

    def _per_sequence(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One causal SDPA per sequence on views of the packed row: no gather, no padding, no mask tensor."""
        if self._layout is None:   # host integers, once per batch
            spans = self.spans if self.spans is not None else sequence_spans(self.doc)
            spans = tuple(tuple(span) for span in spans.tolist())
            self._layout = spans, uncovered_slots(spans, *self.doc.shape)
        return PerSequenceAttention.apply(q, k, v, *self._layout)
