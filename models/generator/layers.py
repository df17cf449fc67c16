"""Transformer building blocks of the generator: RMSNorm, SwiGLU, attention, RoPE and a KV cache.

Shapes: ``B`` batch (or packed rows), ``T`` new tokens, ``S`` keys attended to, ``D`` model width,
``H`` heads, ``Dh = D / H``.
"""
from __future__ import annotations

import dataclasses
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


Rotary = tuple[Tensor, Tensor]   # RoPE (cos, sin), each float32 [B, 1, T, Dh / 2]


def rope_tables(index: Tensor, head_dim: int, base: float = 10000.0) -> Rotary:
    """Rotary cos/sin for token positions ``[B, T]`` (integer or float): two float32 ``[B, 1, T, Dh / 2]``."""
    freqs = base ** (-torch.arange(0, head_dim, 2, device=index.device, dtype=torch.float32) / head_dim)
    angles = index.float()[:, None, :, None] * freqs
    return angles.cos(), angles.sin()


def rope_tables_2d(y: Tensor, x: Tensor, head_dim: int, base: float = 10000.0) -> Rotary:
    """2-D rotary tables (LlamaGen style): the first half of the channel pairs rotate with ``y [B, T]``,
    the second half with ``x [B, T]``, each with the frequencies of a ``Dh / 2`` wide 1-D RoPE."""
    cos_y, sin_y = rope_tables(y, head_dim // 2, base)
    cos_x, sin_x = rope_tables(x, head_dim // 2, base)
    return torch.cat([cos_y, cos_x], -1), torch.cat([sin_y, sin_x], -1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(2i, 2i + 1)`` of ``x [B, H, T, Dh]`` by the angles in ``cos``/``sin``."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


@dataclasses.dataclass
class KVCache:
    """Preallocated keys/values ``[B, H, max_len, Dh]`` of one attention layer; ``length`` slots are filled."""

    keys: Tensor
    values: Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, max_len: int, head_dim: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        shape = (batch, heads, max_len, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``[B, H, T, Dh]`` new keys/values; return all keys/values so far ``[B, H, length, Dh]``."""
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise RuntimeError(f"KV cache overflow: {end} tokens > max_len {self.keys.shape[2]}")
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE and KV cache (no attention dropout).

    ``mask``: a :class:`~models.generator.attention.DocumentMask` (packed training rows), a dense bool
    ``[B, 1, T, S]`` tensor (True = attend; the reference path), or None (causal). The KV cache is handled
    here only: incremental decoding appends to it and attends over everything cached.
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

        Without ``mask`` the attention is causal: over the whole input, or over the cache plus the new
        tokens when ``T == 1`` or the cache is empty.
        """
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(mask, DocumentMask):
            if cache is not None:
                raise ValueError("a DocumentMask is for packed training rows, not for KV-cached decoding")
            out = mask.attend(q, k, v)
        else:
            is_causal = mask is None and length > 1
            if cache is not None:
                if mask is None and length > 1 and cache.length > 0:
                    raise ValueError("several new tokens after a non-empty cache need an explicit mask")
                k, v = cache.append(k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
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

    def new_caches(self, batch: int, max_len: int, like: Tensor) -> list[KVCache]:
        """One empty :class:`KVCache` per block, with the dtype/device of the tensor ``like``."""
        return [KVCache.empty(batch, self.heads, max_len, self.dim // self.heads, like.dtype, like.device)
                for _ in self.blocks]
