"""Positional decoder (DQ-VAE) over the merged finest grid, with a taming upsampling stack.

The quantized levels are merged onto the finest grid by nearest replication, weighted by the router's
one-hot gates (:func:`merge_levels`); then ``post_quant`` 1x1 -> + Fourier features of the normalised
(x, y) cell centres -> + learned row and column embeddings (defined on a ``pos_grid`` reference grid and
linearly interpolated, so any grid size works) -> conv_in -> mid (Res, Attn, Res) -> upsampling levels
-> GN -> SiLU -> conv3 to RGB.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ConfigBase, ConfigError
from models.tokenizer.blocks import AttnBlock, ResBlock, Upsample, mid_block, output_head


@dataclasses.dataclass
class DecoderConfig(ConfigBase):
    ch: int = 128
    ch_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 1, 2, 2])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = dataclasses.field(default_factory=lambda: [32])  # sides at `resolution`
    resolution: int = 256
    dropout: float = 0.0
    fourier_bands: int = 8       # sin/cos of 2^k * pi * x for k < fourier_bands, for x and y
    pos_grid: int = 32           # reference size of the learned row / column embeddings

    def __post_init__(self) -> None:
        if self.ch < 1 or not self.ch_mult or min(self.ch_mult) < 1 or self.num_res_blocks < 1:
            raise ConfigError(f"model.decoder: ch, ch_mult and num_res_blocks must be positive, got "
                              f"{self.ch}, {self.ch_mult}, {self.num_res_blocks}")
        if self.fourier_bands < 0 or self.pos_grid < 1:
            raise ConfigError("model.decoder: fourier_bands must be >= 0 and pos_grid >= 1")


def merge_levels(quantized: list[torch.Tensor], gates: torch.Tensor) -> torch.Tensor:
    """Merge per-level maps onto the finest grid by nearest replication, weighted by the gates.

    quantized: level g is ``B x C x Hs*2^g x Ws*2^g`` (coarsest first); gates: ``B x G x Hs x Ws`` one-hot
    (carrying the router's straight-through gradient in training). Returns ``B x C x Hs*2^(G-1) x Ws*2^(G-1)``.
    """
    finest = len(quantized) - 1
    merged = None
    for level, q in enumerate(quantized):
        gate = replicate(gates[:, level:level + 1].to(q.dtype), 1 << finest)
        term = gate * replicate(q, 1 << (finest - level))
        merged = term if merged is None else merged + term
    return merged


def replicate(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest replication of ``B x C x H x W`` by an integer ``scale`` (identity at 1)."""
    return F.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x


def fourier_features(height: int, width: int, bands: int, device: torch.device | None = None) -> torch.Tensor:
    """``1 x 4*bands x H x W``: sin, cos of ``2^k pi y`` then of ``2^k pi x`` at cell centres in [-1, 1]."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 - 1
    freqs = (2.0 ** torch.arange(bands, device=device, dtype=torch.float32)) * math.pi
    fy = (ys[:, None] * freqs).T[:, :, None].expand(bands, height, width)  # bands x H x W
    fx = (xs[:, None] * freqs).T[:, None, :].expand(bands, height, width)
    return torch.cat([fy.sin(), fy.cos(), fx.sin(), fx.cos()]).unsqueeze(0)


class Decoder(nn.Module):
    """merged codes ``B x in_channels x Hf x Wf`` -> images ``B x 3 x Hf*F x Wf*F`` (F the finest factor)."""

    def __init__(self, config: DecoderConfig, in_channels: int, z_channels: int, finest_factor: int) -> None:
        super().__init__()
        self.config = config
        depth = len(config.ch_mult)
        if 2 ** (depth - 1) != finest_factor:
            raise ConfigError(f"model.decoder.ch_mult has {depth} levels (upsampling 2**{depth - 1}) but the finest "
                              f"factor is {finest_factor}: use {finest_factor.bit_length()} ch_mult entries")
        self.post_quant = nn.Conv2d(in_channels, z_channels, 1)
        self.fourier_proj = nn.Conv2d(4 * config.fourier_bands, z_channels, 1) if config.fourier_bands else None
        self.row_embed = nn.Parameter(torch.randn(1, z_channels, config.pos_grid, 1) * 0.02)
        self.col_embed = nn.Parameter(torch.randn(1, z_channels, 1, config.pos_grid) * 0.02)
        widths = [config.ch * mult for mult in config.ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = mid_block(widths[-1], config.dropout)
        stages: list[nn.Module] = []
        in_ch = widths[-1]
        for level in reversed(range(depth)):
            blocks: list[nn.Module] = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResBlock(in_ch, widths[level], config.dropout))
                in_ch = widths[level]
                if config.resolution >> level in config.attn_resolutions:
                    blocks.append(AttnBlock(in_ch))
            if level > 0:
                blocks.append(Upsample(in_ch))
            stages.append(nn.Sequential(*blocks))
        self.up = nn.Sequential(*stages)
        self.head = output_head(widths[0], 3)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv (for the adaptive GAN weight)."""
        return self.head[-1].weight

    def positional(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """``1 x z_channels x H x W`` position signal: projected Fourier features + row + column embeddings."""
        rows = F.interpolate(self.row_embed, size=(height, 1), mode="bilinear", align_corners=False)
        cols = F.interpolate(self.col_embed, size=(1, width), mode="bilinear", align_corners=False)
        pos = rows + cols
        if self.fourier_proj is not None:
            pos = pos + self.fourier_proj(fourier_features(height, width, self.config.fourier_bands, device))
        return pos

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        h = self.post_quant(merged)
        h = h + self.positional(h.shape[-2], h.shape[-1], h.device).to(h.dtype)
        h = self.mid(self.conv_in(h))
        return self.head(self.up(h))
