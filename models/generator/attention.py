"""Attention of packed rows without a dense ``S x S`` mask: block-diagonal causal over document ids.

A packed row holds several sequences; query ``i`` may attend key ``j`` iff ``j <= i`` and both belong to
the same sequence (padding, ``doc == -1``, attends earlier padding of its row). :class:`DocumentMask` is
built once per batch and shared by both stacks and all their layers. Two kernels compute the same thing:

- **FlexAttention** with one ``BlockMask`` (``torch.compile``d; eager for rows of at most
  ``EAGER_MAX_LENGTH`` slots, where compiling costs more than it saves). Blocks outside every document
  are skipped, blocks inside one document below the diagonal run without the mask function. Used on
  GPUs, and on the CPU wherever no gradient is needed (PyTorch has no FlexAttention backward on the CPU).
- **Per-sequence SDPA** (CPU training): the tokens of every sequence are gathered into a
  ``[B, L_max]`` layout (``L_max`` = longest sequence of the batch), attended with causal
  ``scaled_dot_product_attention`` (flash kernel, no mask tensor) and scattered back. The gather plan
  (:attr:`PackedBatch.sequence_slots`) is computed by ``pack`` on the host, so the step needs no host sync.

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


def sequence_slots(doc: Tensor, index: Tensor) -> Tensor:
    """int64 ``[B, L_max]``: flat slot (``row * S + col``) of token ``l`` of sequence ``b``, ``-1`` past its end.

    doc, index: ``[R, S]`` document ids (-1 = padding) and token indices within the sequence. Host-side
    helper of ``pack`` (data-dependent output shape).
    """
    valid = doc >= 0
    flat_doc, flat_index = doc[valid], index[valid]
    slots = torch.full((int(flat_doc.max()) + 1, int(flat_index.max()) + 1), -1, dtype=torch.long,
                       device=doc.device)
    slots[flat_doc, flat_index] = valid.flatten().nonzero().squeeze(1)
    return slots


class DocumentMask:
    """Block-diagonal causal attention of one packed batch (module docstring); call :meth:`attend` per layer."""

    def __init__(self, doc: Tensor, index: Tensor, slots: Optional[Tensor] = None):
        """doc, index ``[R, S]``: document ids (-1 = padding) and token indices within the sequence;
        slots: :func:`sequence_slots` of them when already computed (``pack`` does, on the host)."""
        self.doc, self.index = doc, index
        self.slots = slots
        self._block_mask = None
        self._gather: Optional[tuple[Tensor, Tensor]] = None

    @property
    def block_mask(self):
        if self._block_mask is None:
            self._block_mask = document_block_mask(self.doc)
        return self._block_mask

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``[R, H, S, Dh]`` queries/keys/values -> ``[R, H, S, Dh]`` attention outputs."""
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if q.device.type == "cpu" and needs_grad:
            return self._per_sequence(q, k, v)
        from torch.nn.attention.flex_attention import flex_attention

        if q.shape[2] > EAGER_MAX_LENGTH:
            return _compiled_flex()(q, k, v, block_mask=self.block_mask)
        with warnings.catch_warnings():  # eager on purpose at these sizes ("called without torch.compile")
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=self.block_mask)

    def _gather_plan(self) -> tuple[Tensor, Tensor]:
        """(``source [B * L_max]``: flat slot of each per-sequence position, padding -> a zero row at ``R * S``;
        ``back [R * S]``: per-sequence position of each slot, padding slots -> position 0)."""
        if self._gather is None:
            if self.slots is None:
                self.slots = sequence_slots(self.doc, self.index)
            slots = self.slots.to(self.doc.device).flatten()
            total = self.doc.numel()
            source = torch.where(slots >= 0, slots, torch.full_like(slots, total))
            back = torch.zeros(total + 1, dtype=torch.long, device=slots.device)
            back.scatter_(0, source, torch.arange(slots.numel(), device=slots.device))
            self._gather = source, back[:total]
        return self._gather

    def _per_sequence(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        rows, heads, length, head_dim = q.shape
        source, back = self._gather_plan()
        num_seqs = self.slots.shape[0]

        def gather(x: Tensor) -> Tensor:
            flat = x.transpose(1, 2).reshape(rows * length, heads, head_dim)
            flat = torch.cat([flat, flat.new_zeros(1, heads, head_dim)])
            return flat.index_select(0, source).view(num_seqs, -1, heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), is_causal=True)
        out = out.transpose(1, 2).reshape(-1, heads, head_dim).index_select(0, back)
        return out.view(rows, length, heads, head_dim).transpose(1, 2)
