"""The module DeepSpeed trains in stage 1: tokenizer + GAN loss (with its PatchGAN discriminator) as ONE module.

docs/design.md ("The GAN under DeepSpeed"): two engines fail under ZeRO; one module with one
optimizer (two param groups) and ONE backward of (tokenizer losses + pixel/GAN losses) works under ZeRO-1/2.
Frozen teachers (attached to the tokenizer) and LPIPS (held by the GAN loss) are not submodules, so they stay
out of the optimizer, the ZeRO partitions and the checkpoints.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from data.world import process_group_size
from models.tokenizer.losses import TokenizerGANLoss
from models.tokenizer.router import RouterOutput
from models.tokenizer.tokenizer import Tokenizer

__all__ = ["GroupClippedAdamW", "TokenizerTrainingModule", "no_decay_parameters"]


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

    def param_groups(self, lr: float, disc_lr_ratio: float, weight_decay: float = 0.0,
                     max_grad_norm: float = 0.0) -> list[dict]:
        """Optimizer param groups, one per model (tokenizer at ``lr``, discriminator at ``lr * disc_lr_ratio``),
        each clipped on its own to ``max_grad_norm`` by :class:`GroupClippedAdamW` (0: no clipping). With
        ``weight_decay > 0`` each model is split into a decayed group (conv / linear weights) and a
        ``/no_decay`` one (:func:`no_decay_parameters`: codebooks, norms, biases, embeddings), and then each
        of the (up to four) groups is clipped on its own: ZeRO-1/2 step the groups one at a time, so a clip
        cannot span groups."""
        groups = []
        for name, module, group_lr in (("tokenizer", self.tokenizer, lr),
                                       ("discriminator", self.gan_loss.discriminator, lr * disc_lr_ratio)):
            params = [p for p in module.parameters() if p.requires_grad]
            if weight_decay > 0:
                exempt = {id(p) for p in no_decay_parameters(module)}
                parts = [(name, [p for p in params if id(p) not in exempt], weight_decay),
                         (f"{name}/no_decay", [p for p in params if id(p) in exempt], 0.0)]
            else:
                parts = [(name, params, 0.0)]
            groups += [{"params": part, "lr": group_lr, "weight_decay": decay, "name": group_name,
                        "max_grad_norm": max_grad_norm} for group_name, part, decay in parts if part]
        return groups

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


def no_decay_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters weight decay must not touch: every parameter of fewer than 2 dims (biases, norm scales),
    the codebooks (used l2-normalised: decay would only shrink their norm, i.e. raise their step size) and the
    learned position tables / tokens (``nn.Embedding`` weights and parameters named ``*embed*`` / ``*token*``)."""
    exempt: dict[int, nn.Parameter] = {}
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim < 2 or "codebooks" in name.split(".") or "embed" in leaf or "token" in leaf:
            exempt[id(param)] = param
    for sub in module.modules():
        if isinstance(sub, nn.Embedding):
            exempt[id(sub.weight)] = sub.weight
    return list(exempt.values())


class GroupClippedAdamW(torch.optim.AdamW):
    """AdamW that clips each param group's gradient to the group's own ``max_grad_norm`` (0 or absent: no
    clip) before the update, and keeps each group's pre-clip gradient norm in ``grad_norms[group["name"]]`` (a
    0-dim tensor: reading it is the caller's host sync, at log steps only).

    Clipping per model (FQGAN clips generator and discriminator apart): one global clip over tokenizer and
    discriminator lets the discriminator's gradient shrink the tokenizer's update, worst when the GAN starts.
    It works under DeepSpeed ZeRO-0/1/2 because DeepSpeed steps this (client) optimizer with its own gradient
    clipping off: ZeRO-0 passes the full, already averaged gradients; ZeRO-1/2 call ``step`` once per group
    with that group's flat partition of this rank, so set :attr:`partitioned` (the trainer does, after
    ``accelerator.prepare``) and the squared norms are all-reduced over the data-parallel ranks (one scalar
    per group) before clipping. Unpartitioned, ``step`` reads one value on the host (whether every norm is
    finite: a NaN/Inf gradient skips the step and sets ``overflow``, which DeepSpeed's ZeRO-0 engine reads).

    A parameter without a gradient (the discriminator before ``disc_start``) is stepped with a zero gradient,
    as ZeRO-1/2's flat partitions always are: otherwise ZeRO-0 would start its Adam moments and bias
    correction only at the first real gradient (first steps of lr x sign(g)) and ZeRO-2 long before (steps
    about 0.45 x lr at beta2 0.95), and the two stages would train the discriminator differently.
    """

    partitioned: bool = False
    process_group = None

    # The training loop may hand over its (device) count of NaN/Inf losses of the step; unpartitioned, the one
    # host read below then covers losses and gradients (pipeline.training.GuardedStep).
    folds_nonfinite_losses = True

    def __init__(self, params: Iterable, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.grad_norms: dict[str, torch.Tensor] = {}
        self.nonfinite_losses: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow = False
        norms = []
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            squares = torch.stack([p.grad.float().square().sum() for p in group["params"]]).sum()
            if self.partitioned and process_group_size() > 1:
                dist.all_reduce(squares, group=self.process_group)
            norms.append(squares.sqrt())
            self.grad_norms[group.get("name", str(index))] = norms[-1]
        # A NaN/Inf gradient or loss must not reach the weights. ZeRO-1/2 skip a non-finite gradient before
        # calling this; unpartitioned (ZeRO-0) the engine reads ``overflow`` to count the step as skipped: one
        # host read per step, for the gradients and the losses together.
        if not self.partitioned:
            bad = ~torch.isfinite(torch.stack(norms)).all()
            if self.nonfinite_losses is not None:
                bad = bad | (self.nonfinite_losses.reshape(()) > 0)
            if bool(bad):
                self.overflow = True
                return None
        for group, norm in zip(self.param_groups, norms):
            max_norm = group.get("max_grad_norm", 0.0)
            if max_norm > 0:
                grads = [p.grad for p in group["params"]]
                torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
        return super().step(closure)
