"""The baseline every varitok tokenizer is measured against: a plain LlamaGen-style VQ, and the comparison metrics.

:class:`ReferenceVQ` is deliberately independent of varitok's quantizer: the same encoder trunk and decoder
(so widths and depth match the tokenizer it is compared with), then LlamaGen's recipe: a 1x1 conv to the code
dim, l2-normalised inputs and codes, one codebook initialised ``U(-1/V, 1/V)``, nearest code by cosine,
straight-through estimator, codebook loss ``mean ||q - sg(u)||^2`` + ``beta * mean ||sg(q) - u||^2``, no entropy
term, no router, no adapters. ``latent="sphere"`` / ``"continuous"`` drop the quantizer (the l2-normalised
latents, or the raw ones, go to the decoder unsnapped, no VQ losses): the ceiling a cosine-codebook tokenizer, or
the autoencoder itself, reaches at the same widths, data and steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.tokenizer.decoder import Decoder, DecoderConfig
from models.tokenizer.encoder import Encoder, EncoderConfig

__all__ = ["LATENTS", "ReferenceVQ", "identity_retrieval", "psnr_per_image"]

LATENTS = ("vq", "sphere", "continuous")   # snapped to the codebook | unit-norm, unsnapped | raw


class ReferenceVQ(nn.Module):
    """Fixed-length VQ at one downsampling ``factor``: images B x 3 x H x W in [-1, 1] -> (rec, losses, stats)
    like :meth:`Tokenizer.forward` (losses ``codebook`` and ``commitment``, already weighted)."""

    def __init__(self, encoder: EncoderConfig, decoder: DecoderConfig, z_channels: int, factor: int,
                 codebook_size: int, code_dim: int = 8, beta: float = 0.25, latent: str = "vq") -> None:
        super().__init__()
        if latent not in LATENTS:
            raise ValueError(f"latent must be one of {LATENTS}, got {latent!r}")
        self.latent = latent
        self.encoder = Encoder(encoder, [factor], z_channels)
        self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        self.codebook = nn.Parameter(torch.empty(codebook_size, code_dim).uniform_(-1 / codebook_size,
                                                                                    1 / codebook_size))
        self.decoder = Decoder(decoder, code_dim, z_channels, factor)
        self.beta = beta

    def quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """-> (q B x D x h x w straight-through, indices B x h x w, losses); without a quantizer (``latent``
        sphere / continuous) the latents themselves, indices all 0 and no losses."""
        u = self.quant_conv(self.encoder(images)[0]).float()
        batch, dim, height, width = u.shape
        if self.latent != "vq":
            q = F.normalize(u, dim=1) if self.latent == "sphere" else u
            return q, torch.zeros(batch, height, width, dtype=torch.long, device=u.device), {}
        u = F.normalize(u.permute(0, 2, 3, 1).reshape(-1, dim), dim=-1)
        codes = F.normalize(self.codebook.float(), dim=-1)
        with torch.no_grad():
            indices = (u @ codes.T).argmax(1)
        q = codes[indices]
        losses = {"codebook": ((q - u.detach()) ** 2).mean(), "commitment": self.beta * ((q.detach() - u) ** 2).mean()}
        q = u + (q - u).detach()
        return q.view(batch, height, width, dim).permute(0, 3, 1, 2), indices.view(batch, height, width), losses

    def forward(self, images: torch.Tensor):
        q, indices, losses = self.quantize(images)
        stats = {"codes_per_image": torch.tensor(float(indices[0].numel()))}
        return self.decoder(q), losses, stats

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval reconstruction and codes: (B x 3 x H x W, indices B x h x w)."""
        q, indices, _ = self.quantize(images)
        return self.decoder(q), indices


def psnr_per_image(rec: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each image, pixels in [-1, 1] mapped to [0, 1] (rec clamped): B."""
    mse = (((rec.clamp(-1, 1) - images) / 2) ** 2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def identity_retrieval(rec: torch.Tensor, images: torch.Tensor) -> float:
    """Share of images whose reconstruction is closer (MSE) to its own input than to every other input of the
    set (chance: 1 / N). A tokenizer that collapses to the dataset mean scores near chance even at a fair
    PSNR. rec, images: N x 3 x H x W."""
    distances = torch.cdist(rec.flatten(1).float(), images.flatten(1).float())       # N x N
    own = distances.diagonal()
    others = distances + torch.diag(torch.full_like(own, float("inf")))
    return float((own < others.min(1).values).float().mean())
