"""Transformer building blocks of the generator: RMSNorm, SwiGLU, attention, RoPE and a KV cache.

Shapes: ``B`` batch (or packed rows), ``T`` new tokens, ``S`` keys attended to, ``D`` model width,
``H`` heads, ``Dh = D / H``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.generator.attention import DocumentMask


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dimension, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; ``hidden`` is the gated width."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(F.silu(gate) * up))


Rotary = Tensor   # RoPE rotations exp(i * angle), complex64 [B, 1, T, Dh / 2]


def rope_tables(index: Tensor, head_dim: int, base: float = 10000.0) -> Rotary:
    """Rotary table for token positions ``[B, T]`` (integer or float): complex64 ``[B, 1, T, Dh / 2]``."""
    freqs = base ** (-torch.arange(0, head_dim, 2, device=index.device, dtype=torch.float32) / head_dim)
    angles = index.float()[:, None, :, None] * freqs
    return torch.complex(angles.cos(), angles.sin())


def rope_tables_2d(y: Tensor, x: Tensor, head_dim: int, base: float = 10000.0) -> Rotary:
    """2-D rotary table (LlamaGen style): the first half of the channel pairs rotate with ``y [B, T]``,
    the second half with ``x [B, T]``, each with the frequencies of a ``Dh / 2`` wide 1-D RoPE."""
    return torch.cat([rope_tables(y, head_dim // 2, base), rope_tables(x, head_dim // 2, base)], -1)


def apply_rope(x: Tensor, rotary: Rotary) -> Tensor:
    """Rotate channel pairs ``(2i, 2i + 1)`` of ``x [..., B, H, T, Dh]`` by the angles of ``rotary`` (in float32).

    One complex multiply (``(a + ib) e^{i angle}``: the same products as the real rotation), forward and
    backward, instead of six real element-wise passes and a stack.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]) or pairs.stride(-1) != 1:
        pairs = pairs.contiguous()   # view_as_complex needs whole (real, imag) pairs
    return torch.view_as_real(torch.view_as_complex(pairs) * rotary).flatten(-2).to(x.dtype)


class KVCache(nn.Module):
    """KV cache of one attention layer: keys/values preallocated ``[B, H, max_len, Dh]``, written in place
    (no concatenation, no copies of the stored part). Two ways to attend, fixed when the cache is made:

    - **prefix** (``full_length=False``, eager decoding): the number of filled slots ``filled`` is a host-side
      int (decoding runs in lock step, so it grows by ``T`` per update without reading the device); new tokens
      go to slots ``filled .. filled + T - 1`` and attention runs over the filled prefix (views, no mask for
      one new token), so a token's attention work is proportional to the tokens before it.
    - **full length** (``full_length=True``, captured / compiled decoding): the filled count ``length`` is an
      int64 ``[1]`` on the cache's device; writes are ``index_copy_`` at that device-side index and attention
      runs over all ``max_len`` slots under a validity mask built on the device, so every decode step has the
      same shapes and no host-side integer (it can be captured as a CUDA graph). On the CPU this costs
      ``max_len / filled`` times the attention work of the prefix mode.

    The caller keeps the number of tokens within ``max_len`` (past it the prefix mode raises, ``index_copy_``
    fails). The tensors are buffers so that ``torch.compile`` treats them as static state, not as inputs
    mutated by the graph.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", full_length: bool = False):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.full_length = full_length
        self.filled = 0   # prefix mode: slots filled so far (host side)
        # zeros, not empty: masked slots still meet the softmax weights (0), and 0 * NaN garbage would be NaN
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("length", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def reset(self) -> None:
        """Empty the cache (the stored values stay, unread or masked out)."""
        if self.full_length:
            self.length.zero_()
        else:
            self.filled = 0

    def token_index(self, like: Tensor) -> Tensor:
        """int64 tensor shaped like ``like``: the in-sequence index of the next token (= slots filled)."""
        if self.full_length:
            return self.length.expand_as(like)
        return torch.full_like(like, self.filled, dtype=torch.long)

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Store ``[B, H, T, Dh]`` new keys/values after the filled slots and advance the count by ``T``.

        Returns the keys and values to attend over ``[B, H, S, Dh]`` and a bool mask ``[1, 1, T, S]`` (True =
        attend; None = attend to all): new token ``t`` sees the slots filled before it and the new tokens up to
        itself. Prefix mode: ``S`` = slots filled now (mask None for ``T = 1``); full length: ``S = max_len``.
        """
        new = keys.shape[2]
        if self.full_length:
            written = self.length + self.slots[:new]
            self.keys.index_copy_(2, written, keys.to(self.keys.dtype))
            self.values.index_copy_(2, written, values.to(self.values.dtype))
            self.length += new
            return self.keys, self.values, (self.slots[None, :] <= written[:, None])[None, None]
        start, end = self.filled, self.filled + new
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.filled = end
        mask = None if new == 1 else (self.slots[None, :end] <= self.slots[start:end, None])[None, None]
        return self.keys[:, :, :end], self.values[:, :, :end], mask


def cache_dtype(like: Tensor) -> torch.dtype:
    """The dtype a KV cache stores: the autocast dtype while autocast is on for ``like``'s device, else ``like``'s."""
    device_type = like.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return like.dtype


class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE and KV cache (no attention dropout).

    ``mask``: a :class:`~models.generator.attention.DocumentMask` (packed training rows), a dense bool
    ``[B, 1, T, S]`` tensor (True = attend; the reference path), or None (causal). The KV cache is read and
    written here only: incremental decoding stores the new keys/values and attends as the cache says (its
    filled prefix, or all slots under a validity mask, see :class:`KVCache`).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: Optional[Rotary] = None, mask=None, cache: Optional[KVCache] = None) -> Tensor:
        """x ``[B, T, D]``; rope: tables of the ``T`` tokens (None = no RoPE); mask as the class docstring.

        Without ``mask`` the attention is causal: over the whole input, or with ``cache`` over the cached
        tokens plus the new ones (causal among them).
        """
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        if rope is not None:
            q, k = apply_rope(qkv[:2], rope)   # queries and keys in one pass: half the small ops per token
        if cache is not None:
            if mask is not None:
                raise ValueError("KV-cached decoding is causal: pass no mask with a cache")
            k, v, valid = cache.update(k, v)
            out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=valid)
        elif isinstance(mask, DocumentMask):
            out = mask.attend(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and length > 1)
        return self.proj_dropout(self.proj(out.transpose(1, 2).reshape(batch, length, -1)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + swiglu(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, dropout: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden, dropout)

    def forward(self, x: Tensor, rope: Optional[Rotary], mask, cache: Optional[KVCache]) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def mlp_hidden_size(dim: int, ratio: float, multiple: int = 8) -> int:
    """Gated width ``dim * ratio`` rounded up to a multiple of ``multiple``."""
    hidden = int(dim * ratio)
    return -(-hidden // multiple) * multiple


class Transformer(nn.Module):
    """A stack of :class:`Block` followed by a final RMSNorm. ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 8 / 3, dropout: float = 0.0):
        super().__init__()
        hidden = mlp_hidden_size(dim, mlp_ratio)
        self.dim, self.heads = dim, heads
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, dropout) for _ in range(depth))
        self.norm = RMSNorm(dim)

    def forward(self, x: Tensor, rope: Optional[Rotary] = None, mask=None,
                caches: Optional[list[KVCache]] = None) -> Tensor:
        """``[B, T, D] -> [B, T, D]``; rope/mask as :class:`Attention`, computed once by the caller."""
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, caches[i] if caches is not None else None)
        return self.norm(x)

    def zero_init_outputs(self) -> None:
        """Zero the output projections of every residual branch (attention ``proj``, MLP ``down``)."""
        for block in self.blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.down.weight)

    def new_caches(self, batch: int, max_len: int, like: Tensor, full_length: bool = False) -> list[KVCache]:
        """One empty :class:`KVCache` per block on ``like``'s device, in the compute dtype (:func:`cache_dtype`);
        ``full_length`` as :class:`KVCache`."""
        return [KVCache(batch, self.heads, max_len, self.dim // self.heads, cache_dtype(like), like.device,
                        full_length) for _ in self.blocks]
