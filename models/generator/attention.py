"""Attention of packed rows without a dense ``S x S`` mask: block-diagonal causal over document ids.

A packed row holds several sequences; query ``i`` may attend key ``j`` iff ``j <= i`` and both belong to
the same sequence (padding, ``doc == -1``, attends earlier padding of its row). :class:`DocumentMask` is
built once per batch and shared by both stacks and all their layers. Two kernels compute the same thing:

- **FlexAttention** with one ``BlockMask`` (``torch.compile``d; eager for rows of at most
  ``EAGER_MAX_LENGTH`` slots, where compiling costs more than it saves). Blocks outside every document
  are skipped, blocks inside one document below the diagonal run without the mask function. Used on
  GPUs, and on the CPU wherever no gradient is needed (PyTorch has no FlexAttention backward on the CPU).
- **Per-sequence SDPA** (CPU training): one causal ``scaled_dot_product_attention`` (flash kernel, no mask
  tensor) per sequence, on views of the packed row (sequences are contiguous), so nothing is gathered or
  padded and the work is exactly the sum of the sequences' causal triangles. The spans
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


class DocumentMask:
    """Block-diagonal causal attention of one packed batch (module docstring); call :meth:`attend` per layer."""

    def __init__(self, doc: Tensor, spans: Optional[Tensor] = None):
        """doc ``[R, S]``: document ids (-1 = padding); spans: :func:`sequence_spans` of it when already
        computed (``pack`` does, on the host)."""
        self.doc = doc
        self.spans = spans
        self._block_mask = None
        self._span_list: Optional[list[list[tuple[int, int]]]] = None

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

    def _rows(self) -> list[list[tuple[int, int]]]:
        """Per row, the ``(start, length)`` of its sequences in order (host lists, computed once)."""
        if self._span_list is None:
            spans = self.spans if self.spans is not None else sequence_spans(self.doc)
            self._span_list = [[] for _ in range(self.doc.shape[0])]
            for row, start, length in spans.tolist():
                self._span_list[row].append((start, length))
        return self._span_list

    def _per_sequence(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One causal SDPA per sequence on views of the packed row: no gather, no padding, no mask tensor."""
        length = q.shape[2]
        rows = []
        for row, spans in enumerate(self._rows()):
            pieces = [F.scaled_dot_product_attention(q[row:row + 1, :, start:start + size],
                                                     k[row:row + 1, :, start:start + size],
                                                     v[row:row + 1, :, start:start + size], is_causal=True)
                      for start, size in spans]
            used = sum(size for _, size in spans)
            if used < length:
                pieces.append(q.new_zeros(1, q.shape[1], length - used, q.shape[3]))
            rows.append(torch.cat(pieces, 2))
        return torch.cat(rows, 0)
