"""Exponential moving average of model weights, kept in fp32, correct under ZeRO-3 partitioning.

``shadow <- d_n * shadow + (1 - d_n) * weight`` after the n-th optimizer step (n = 1, 2, ...): ``d_n = decay``,
or with ``warmup=True`` ``d_n = min(decay, (1 + n) / (10 + n))`` (timm / LDM): without the warmup, at decay
0.999 a third (0.999^1000) of a 1000-step run's export is still its random initial weights. One
``torch._foreach_lerp_`` over all tensors on the weights' device: no host synchronisation per step.

Under ZeRO-3 each rank owns a flat slice (``param.ds_tensor``) of every parameter; the EMA shadows exactly
that slice, so the per-step cost is 4 bytes per parameter / world size of memory and no communication.
Full weights (export, checkpoint) are gathered with ONE ``all_gather`` of the flattened local shadows
(4 bytes per parameter moved per rank), which every rank must call. Build the EMA after
``accelerator.prepare`` so it sees the partitioned parameters.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EMA"]


def _local(param: nn.Parameter) -> Tensor:
    """The part of ``param`` this rank holds: its ZeRO-3 partition (flat) or the whole tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class EMA:
    """fp32 shadow weights of ``source`` (a module, or an iterable of parameters).

    Built from a module, the EMA can name its tensors (``state_dict_for``, checkpoints); built from a bare
    parameter list it can update and ``copy_to`` only.
    """

    def __init__(self, source: nn.Module | Iterable[nn.Parameter], decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module: Optional[nn.Module] = source if isinstance(source, nn.Module) else None
        self.params = list(source.parameters() if self.module is not None else source)
        if not self.params:
            raise ValueError("EMA got no parameters")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params)
        self.group = getattr(self.params[0], "ds_process_group", None) if self.partitioned else None
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (call once after each optimizer step, on every rank)."""
        current = [_local(p) for p in self.params]
        current = [t if t.dtype == torch.float32 else t.float() for t in current]
        self.num_updates += 1
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.current_decay())

    def current_decay(self) -> float:
        """The decay of the latest update: ``decay``, or with warmup ``min(decay, (1 + n) / (10 + n))`` after
        ``n`` updates."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def copy_to(self, module: Optional[nn.Module] = None) -> None:
        """Write the averaged weights into the tracked parameters (local partitions under ZeRO-3).

        ``module`` is accepted for symmetry and must be the tracked one. Under ZeRO-3 this writes the
        partitions, which the next gather (forward, ``accelerator.get_state_dict``) reads; for exports
        prefer :meth:`state_dict_for`, which leaves the training weights alone.
        """
        if module is not None and self.module is not None and module is not self.module:
            raise ValueError("EMA.copy_to: module is not the one this EMA tracks")
        local = [_local(p) for p in self.params]
        torch._foreach_copy_(local, [s.to(t.dtype) for s, t in zip(self.shadow, local)])

    def _full_shadow(self) -> list[Tensor]:
        """Full fp32 tensors in parameter order; under ZeRO-3 a collective every rank must enter."""
        if not self.partitioned:
            return self.shadow
        world = dist.get_world_size(self.group)
        flat = torch.cat([s.reshape(-1) for s in self.shadow])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat, group=self.group)
        full, offset = [], 0
        for param, shard in zip(self.params, self.shadow):
            size = shard.numel()
            pieces = torch.cat([g[offset:offset + size] for g in gathered])
            full.append(pieces[:param.ds_numel].view(param.ds_shape))
            offset += size
        return full

    def _names(self, module: nn.Module) -> dict[str, int]:
        """State-dict name -> index into ``self.params`` (tied parameters give several names)."""
        index = {id(p): i for i, p in enumerate(self.params)}
        names = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            if id(param) not in index:
                raise ValueError(f"EMA does not track parameter {name}; build the EMA from this module")
            names[name] = index[id(param)]
        return names

    def _require_module(self, module: Optional[nn.Module]) -> nn.Module:
        module = module if module is not None else self.module
        if module is None:
            raise ValueError("this EMA was built from a parameter list; pass the module (or build EMA(module, ...))")
        return module

    @torch.no_grad()
    def state_dict_for(self, module: Optional[nn.Module] = None) -> dict[str, Tensor]:
        """``module.state_dict()`` with averaged fp32 parameters and the module's own buffers (for export).

        Collective under ZeRO-3: call it on every rank.
        """
        module = self._require_module(module)
        full = self._full_shadow()
        state = {name: full[i] for name, i in self._names(module).items()}
        for name, value in module.state_dict().items():
            state.setdefault(name, value)
        return state

    def state_dict(self) -> dict:
        """``{"decay", "num_updates", "shadow": {name: full fp32 tensor}}`` (collective under ZeRO-3)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.state_dict_for()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (extra names in ``shadow``, such as buffers, are ignored).

        Full tensors are re-sliced to this rank's partitions under ZeRO-3, so the saved form does not
        depend on the world size.
        """
        module = self._require_module(None)
        shadow = state["shadow"]
        names = self._names(module)
        missing = sorted(n for n in names if n not in shadow)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:5]}")
        for name, i in names.items():
            self.shadow[i].copy_(self._slice(i, shadow[name].to(self.shadow[i].device).float()))
        self.decay = float(state.get("decay", self.decay))
        self.num_updates = int(state.get("num_updates", 0))

    def _slice(self, index: int, full: Tensor) -> Tensor:
        """This rank's part of parameter ``index``'s full tensor (its ZeRO-3 flat partition, or all of it)."""
        if not self.partitioned:
            return full.view_as(self.shadow[index])
        size = self.shadow[index].numel()
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        flat = F.pad(full.reshape(-1), (0, size * world - full.numel()))
        return flat[rank * size:(rank + 1) * size]
