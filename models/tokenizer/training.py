"""The module DeepSpeed trains in stage 1: tokenizer + GAN loss (with its PatchGAN discriminator) as ONE module.

PLATFORM.md ("Generator + discriminator under DeepSpeed"): two engines fail under ZeRO; one module with one
optimizer (two param groups) and ONE backward of (tokenizer losses + pixel/GAN losses) works under ZeRO-1/2.
Frozen teachers (attached to the tokenizer) and LPIPS (held by the GAN loss) are not submodules, so they stay
out of the optimizer, the ZeRO partitions and the checkpoints.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from models.tokenizer.losses import TokenizerGANLoss
from models.tokenizer.router import RouterOutput
from models.tokenizer.tokenizer import Tokenizer

__all__ = ["TokenizerTrainingModule"]


class TokenizerTrainingModule(nn.Module):
    """``tokenizer`` (exported, EMA-tracked) + ``gan_loss`` (its discriminator is trained alongside).

    ``forward(images, step)`` returns ``(loss, logs, rec, grain)``: the scalar to back-propagate once, a dict
    of detached scalars (weighted tokenizer loss terms under ``loss/``, pixel and GAN terms, tokenizer stats),
    the reconstruction B x 3 x H x W in [-1, 1] and the chosen level per coarsest region B x Hs x Ws (int64).
    """

    def __init__(self, tokenizer: Tokenizer, gan_loss: TokenizerGANLoss) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.gan_loss = gan_loss
        self._grain: Optional[torch.Tensor] = None
        # Tokenizer.forward does not return the routing; the hook keeps it for the recon grids.
        tokenizer.router.register_forward_hook(self._keep_grain)

    def _keep_grain(self, _module: nn.Module, _inputs, output: RouterOutput) -> None:
        self._grain = output.grain

    def param_groups(self, lr: float, disc_lr_ratio: float) -> list[dict]:
        """Two optimizer param groups: tokenizer at ``lr``, discriminator at ``lr * disc_lr_ratio``."""
        return [{"params": list(self.tokenizer.parameters()), "lr": lr, "name": "tokenizer"},
                {"params": list(self.gan_loss.discriminator_parameters()), "lr": lr * disc_lr_ratio,
                 "name": "discriminator"}]

    def forward(self, images: torch.Tensor, step: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """images: B x 3 x H x W in [-1, 1]; step: optimizer steps done (router tau, GAN start)."""
        self.tokenizer.set_step(step)
        rec, tokenizer_losses, stats = self.tokenizer(images)
        pixel_loss, pixel_logs = self.gan_loss(images, rec, step, self.tokenizer.last_layer)
        loss = pixel_loss + sum(tokenizer_losses.values())
        logs = {"loss/total": loss.detach()}
        logs.update({f"loss/{name}": value.detach() for name, value in tokenizer_losses.items()})
        logs.update({(f"gan/{name}" if name.startswith(("logits", "gan_weight")) else f"loss/{name}"): value
                     for name, value in pixel_logs.items() if name != "total"})
        # usage/k in the forward stats is this rank's running count: the loop logs the cross-rank one instead.
        logs.update({name: value.detach() for name, value in stats.items() if not name.startswith("usage/")})
        return loss, logs, rec, self._grain
