"""Tokenizer training losses: reconstruction, LPIPS-VGG, PatchGAN discriminator and the GAN objective.

The GAN objective follows the recipe that works under DeepSpeed ZeRO-1/2 (docs/design.md): the
discriminator lives inside the trained module (one optimizer, its parameters in a second param group with
their own lr), and generator and discriminator are updated by ONE backward of (G loss + D loss):

- the generator's adversarial term calls the discriminator through ``torch.func.functional_call`` with
  DETACHED discriminator parameters, so its gradient reaches the reconstruction but never D;
- the discriminator's hinge loss sees the reconstruction DETACHED, so it never reaches the generator.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from models.config import ConfigBase, ConfigError, check_choice
from models.hub import load_tensor_file
from models.tokenizer.blocks import group_norm

RECONSTRUCTION_KINDS = ("l1", "l2")


@dataclasses.dataclass
class LossConfig(ConfigBase):
    """The ``loss`` section of the tokenizer stage config (weights of the pixel-space objective)."""

    rec: str = "l1"
    rec_weight: float = 1.0
    lpips_weight: float = 0.0
    lpips_weights: str = ""
    gan_weight: float = 0.5
    disc_start: int = 0
    adaptive_gan_weight: bool = False
    disc_lr_ratio: float = 1.0
    disc_ndf: int = 64
    disc_layers: int = 3

    def __post_init__(self) -> None:
        check_choice("loss", "rec", self.rec, RECONSTRUCTION_KINDS)
        for name in ("rec_weight", "lpips_weight", "gan_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name}: must be >= 0, got {getattr(self, name)}")
        if self.lpips_weight > 0 and not self.lpips_weights:
            raise ConfigError("loss.lpips_weights: required when loss.lpips_weight > 0; set it to a local file "
                              "holding torchvision vgg16 `features.*` and lpips `lin*.model.1.weight` tensors, "
                              "or set loss.lpips_weight=0")
        if self.disc_start < 0:
            raise ConfigError(f"loss.disc_start: must be >= 0, got {self.disc_start}")
        if self.disc_lr_ratio <= 0:
            raise ConfigError(f"loss.disc_lr_ratio: must be > 0, got {self.disc_lr_ratio}")
        if self.disc_ndf < 1 or self.disc_layers < 1:
            raise ConfigError(f"loss.disc_ndf / loss.disc_layers: must be >= 1, got {self.disc_ndf} / "
                              f"{self.disc_layers}")


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (``l1``) or squared (``l2``) error over all elements -> fp32 scalar."""
    x, y = x.float(), y.float()
    if kind == "l1":
        return F.l1_loss(y, x)
    if kind == "l2":
        return F.mse_loss(y, x)
    raise ValueError(f"reconstruction loss kind must be one of {RECONSTRUCTION_KINDS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------- LPIPS

VGG_TAPS = (3, 8, 15, 22, 29)           # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
VGG_TAP_CHANNELS = (64, 128, 256, 512, 512)
_LPIPS_HEAD_KEY = re.compile(r"^(?:lins?\.)?(?:lin)?(\d+)\.model\.1\.weight$")
_LPIPS_SLICE_KEY = re.compile(r"^(?:net\.)?slice\d\.(\d+)\.(weight|bias)$")
_IGNORED_KEYS = re.compile(r"^(classifier\.|scaling_layer\.|(net\.)?(shift|scale)$)")


def _canonical_lpips_key(key: str) -> str | None:
    """Map a key of torchvision's vgg16 / the lpips package to ours; None for keys we do not use."""
    key = key.removeprefix("module.")
    if key.startswith("features.") or key.startswith("heads."):
        return key
    if match := _LPIPS_HEAD_KEY.match(key):
        return f"heads.{match.group(1)}.weight"
    if match := _LPIPS_SLICE_KEY.match(key):
        return f"features.{match.group(1)}.{match.group(2)}"
    if _IGNORED_KEYS.match(key):
        return None
    return key  # reported as unexpected by the strict load


class LPIPS(nn.Module):
    """LPIPS-VGG perceptual distance (Zhang et al. 2018), frozen.

    x, y in [-1, 1] -> scaling layer -> torchvision vgg16 features, tapped after the 5 relu_k_last layers
    -> unit-normalise over channels -> squared difference -> non-negative 1x1 linear head -> spatial
    mean -> sum over layers. forward returns one distance per image (B,).
    """

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # torchvision's vgg16 `features` (config "D") without building the unused 120M-parameter classifier
        self.features = make_layers(cfgs["D"])[: VGG_TAPS[-1] + 1]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in VGG_TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    @classmethod
    def from_file(cls, path: str | Path, key_path: str = "loss.lpips_weights") -> "LPIPS":
        """Load VGG16 + linear-head weights from ONE local file (.safetensors, or .pt/.pth read with
        ``torch.load(weights_only=True)``). Backbone keys: torchvision's ``features.N.*`` (or the lpips
        package's ``net.sliceK.N.*``); heads: ``lin0.model.1.weight`` ... (lpips naming) or ``heads.K.weight``.
        """
        file = Path(path) if path else None
        if file is None or not file.is_file():
            raise FileNotFoundError(
                f"{key_path}: LPIPS weights file not found: {str(path)!r}. Set {key_path} to a local "
                f".safetensors/.pt file holding torchvision vgg16 `features.*` and lpips `lin0..lin4.model.1."
                f"weight` tensors (docs/tokenizer-model.md, 'LPIPS weights'); nothing is downloaded at run time.")
        raw = load_tensor_file(file)
        state = {}
        for key, tensor in raw.items():
            canonical = _canonical_lpips_key(key)
            if canonical is not None:
                state[canonical] = tensor
        model = cls()
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{key_path}: {file} does not hold LPIPS-VGG weights: missing "
                             f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
        if any((head.weight < 0).any() for head in model.heads):
            raise ValueError(f"{key_path}: {file} has negative LPIPS linear-head weights; LPIPS heads are "
                             f"non-negative (a distance); check the file")
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: B x 3 x H x W in [-1, 1] -> B distances (>= 0, 0 for identical inputs)."""
        batch = x.shape[0]
        h = (torch.cat([x, y], dim=0).to(self.shift.dtype) - self.shift) / self.scale
        distance = h.new_zeros(batch, dtype=torch.float32)
        tap = 0
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index == VGG_TAPS[tap]:
                unit = h.float() / (h.float().square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
                diff = (unit[:batch] - unit[batch:]).square()
                distance = distance + self.heads[tap](diff).float().mean(dim=(1, 2, 3))
                tap += 1
        return distance


# ------------------------------------------------------------------------------------ discriminator

class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming NLayerDiscriminator): B x 3 x H x W -> B x 1 x h x w logits.

    ``n_layers`` stride-2 4x4 convs (width ndf * min(2^k, 8)), one stride-1 conv, a 1-channel conv.
    GroupNorm instead of BatchNorm: per-sample statistics need no cross-rank sync under ZeRO/DDP, and
    real and fake images can share one forward without mixing their statistics.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = ndf
        for k in range(1, n_layers + 1):
            out = ndf * min(2 ** k, 8)
            stride = 2 if k < n_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride, 1, bias=False), group_norm(out, eps=1e-5), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """taming's init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - real) + mean relu(1 + fake)), in fp32 whatever the logits' dtype."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-mean(fake logits), in fp32."""
    return -fake_logits.float().mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                        max: float = 1e4) -> torch.Tensor:
    """taming's balance: ||d rec / d w|| / (||d g / d w|| + 1e-4), clamped to [0, max], detached.

    ``last_layer_weight`` is the decoder's last conv weight; both losses must depend on it.
    """
    rec_grad, = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max).detach()


class TokenizerGANLoss(nn.Module):
    """Pixel objective of the tokenizer: rec + LPIPS + hinge GAN (G and D) for ONE backward.

    Holds the trainable :class:`PatchDiscriminator` (registered: it is saved, sharded and optimised with
    the tokenizer) and a frozen :class:`LPIPS` that is deliberately NOT a submodule (kept out of
    state_dict, DeepSpeed and the optimizer; ``.to()`` / ``.float()`` etc. still move it).
    """

    def __init__(self, cfg: LossConfig, lpips: LPIPS | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.discriminator = PatchDiscriminator(3, cfg.disc_ndf, cfg.disc_layers)
        if lpips is None and cfg.lpips_weight > 0:
            lpips = LPIPS.from_file(cfg.lpips_weights)
        object.__setattr__(self, "lpips", lpips)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        super()._apply(fn, recurse)
        if self.lpips is not None:
            self.lpips._apply(fn, recurse)
        return self

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """The discriminator's parameters, for the optimizer's second param group (lr * disc_lr_ratio)."""
        return self.discriminator.parameters()

    def gan_active(self, step: int) -> bool:
        return step >= self.cfg.disc_start and self.cfg.gan_weight > 0

    def forward(self, images: torch.Tensor, rec: torch.Tensor, step: int,
                last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images, rec: B x 3 x H x W in [-1, 1]; step: the optimizer step (gates the GAN terms);
        last_layer: the decoder's last weight (needed when ``adaptive_gan_weight``).

        Returns (total scalar, detached logs). total = rec_weight * rec + lpips_weight * lpips, plus from
        ``disc_start`` on (and when gan_weight > 0) gan_weight * [adaptive] * hinge_g(D_detached(rec))
        + hinge_d(D(images), D(rec.detach())). Before that the discriminator is not run at all.
        """
        cfg = self.cfg
        rec_term = reconstruction_loss(images, rec, cfg.rec)
        nll = cfg.rec_weight * rec_term
        logs = {"rec": rec_term.detach()}
        if cfg.lpips_weight > 0:
            perceptual = self.lpips(images, rec).mean()
            nll = nll + cfg.lpips_weight * perceptual
            logs["lpips"] = perceptual.detach()
        if not self.gan_active(step):
            logs["total"] = nll.detach()
            return nll, logs

        frozen_d = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        g_loss = hinge_g_loss(functional_call(self.discriminator, frozen_d, (rec,)))
        weight = torch.tensor(cfg.gan_weight, device=rec.device)
        if cfg.adaptive_gan_weight and torch.is_grad_enabled() and rec.requires_grad:
            if last_layer is None:
                raise ValueError("loss.adaptive_gan_weight=true needs last_layer (the decoder's last weight)")
            weight = weight * adaptive_gan_weight(nll, g_loss, last_layer)

        logits = self.discriminator(torch.cat([images.detach(), rec.detach()], dim=0))
        real_logits, fake_logits = logits.chunk(2, dim=0)
        d_loss = hinge_d_loss(real_logits, fake_logits)
        total = nll + weight * g_loss + d_loss
        logs.update(gan_g=g_loss.detach(), gan_d=d_loss.detach(), gan_weight=weight.detach(),
                    logits_real=real_logits.detach().float().mean(), logits_fake=fake_logits.detach().float().mean(),
                    total=total.detach())
        return total, logs
