"""Multi-granularity encoder: one taming/VQGAN CNN trunk, one output branch per downsampling factor.

The trunk has ``len(ch_mult)`` levels; level ``i`` runs at ``1 / 2**i`` of the input size with
``ch * ch_mult[i]`` channels. The branch for factor ``F`` taps level ``log2(F)`` (after its ResBlocks,
before its downsample) and applies its own mid block (Res, Attn, Res) -> GN -> SiLU -> conv3 to
``z_channels``. With factors [8, 16] and ch_mult [1, 1, 2, 2, 4] this is DQ-VAE's dual encoder.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from models.config import ConfigBase, ConfigError
from models.tokenizer.blocks import AttnBlock, Downsample, ResBlock, mid_block, output_head


@dataclasses.dataclass
class EncoderConfig(ConfigBase):
    ch: int = 128
    ch_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    # Attention after the ResBlocks of every trunk level whose side, at the reference `resolution`,
    # is listed here (taming convention). The architecture is fixed by `resolution`; inputs may be any
    # size divisible by the coarsest factor.
    attn_resolutions: list[int] = dataclasses.field(default_factory=lambda: [16, 32])
    resolution: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.ch < 1 or not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"encoder: ch and ch_mult must be positive, got ch={self.ch}, ch_mult={self.ch_mult}")
        if self.num_res_blocks < 1:
            raise ConfigError(f"encoder.num_res_blocks must be >= 1, got {self.num_res_blocks}")


class Encoder(nn.Module):
    """images ``B x 3 x H x W`` -> list of ``B x z_channels x H/F x W/F``, one per factor, coarsest first."""

    def __init__(self, config: EncoderConfig, factors: list[int], z_channels: int) -> None:
        super().__init__()
        depth = len(config.ch_mult)
        coarsest = max(factors)
        if coarsest != 2 ** (depth - 1):
            raise ConfigError(f"model.encoder.ch_mult has {depth} levels (downsampling 2**{depth - 1} = "
                              f"{2 ** (depth - 1)}) but the coarsest factor is {coarsest}: use "
                              f"{coarsest.bit_length()} ch_mult entries")
        self.factors = sorted(factors, reverse=True)
        self.tap_levels = [factor.bit_length() - 1 for factor in self.factors]
        widths = [config.ch * mult for mult in config.ch_mult]
        self.conv_in = nn.Conv2d(3, config.ch, 3, padding=1)
        self.levels = nn.ModuleList()
        in_ch = config.ch
        for level, width in enumerate(widths):
            blocks: list[nn.Module] = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(in_ch, width, config.dropout))
                in_ch = width
                if config.resolution >> level in config.attn_resolutions:
                    blocks.append(AttnBlock(width))
            self.levels.append(nn.Sequential(*blocks))
        self.downsamples = nn.ModuleList(Downsample(widths[level]) for level in range(depth - 1))
        self.branches = nn.ModuleList(
            nn.Sequential(mid_block(widths[level], config.dropout), output_head(widths[level], z_channels))
            for level in self.tap_levels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        coarsest = self.factors[0]
        if images.shape[-1] % coarsest or images.shape[-2] % coarsest:
            raise ValueError(f"input size {tuple(images.shape[-2:])} is not divisible by the coarsest "
                             f"downsampling factor {coarsest}: resize or crop the images")
        taps: dict[int, torch.Tensor] = {}
        h = self.conv_in(images)
        for level, blocks in enumerate(self.levels):
            h = blocks(h)
            taps[level] = h
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
        return [branch(taps[level]) for branch, level in zip(self.branches, self.tap_levels)]
