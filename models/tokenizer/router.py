"""Granularity router: chooses a level per coarsest-grid region (DQ-VAE "Dynamic Grained Coding").

Level 0 is the coarsest (1 code per region), level ``g`` gives a region ``4**g`` codes. Modes:

- ``learned``: GroupNorm per branch, finer branches average-pooled to the coarse grid, concatenated, a
  per-position MLP -> G logits. Training: straight-through hard Gumbel-softmax (temperature annealed by
  :meth:`Router.set_step`); eval: argmax of the logits plus a calibrated per-level offset (below). The one-hot
  gates multiply the merged features downstream, which is how the task gradient reaches the router. With
  ``detach_features`` (default) the router reads the encoder features without sending its gradient back: the
  straight-through gradient is noisy, and in the quality study letting it into the encoder cost 1.2 dB.
- Eval calibration (learned mode): a Gumbel sample picks level g with probability ``softmax(l)_g``, so the budget
  holds the *sampled* shares at the targets while argmax picks the likeliest level everywhere (a router at
  target 0.75 with p(fine) ~ 0.75 in every region codes every region fine). Every training forward therefore
  moves a persistent offset ``level_bias`` (G logits) towards the targets,
  ``level_bias += calibration_rate * spread * (target - share of argmax(l + level_bias))``, ``spread`` the batch's
  std of the logits (so the rate does not depend on their scale; shares and spread all-reduced over the ranks,
  no host syncs), and eval codes ``argmax(l + level_bias)``: held-out shares match the targets on average while
  the router still ranks the regions.
- ``entropy``: the soft-histogram image entropy of each region (:func:`region_entropy`) against thresholds
  interpolated in a calibrated quantile table (:func:`calibrate_entropy`, given inline as
  ``entropy_quantiles``), so a target share gives that share on the calibration data;
  :meth:`Router.set_granularity_ratio` re-targets at inference. A table FILE (``entropy_table``) is read
  by the pipeline (``pipeline.calibrate.inline_entropy_table``) before the model is built: models do no
  file I/O, and a config with inline quantiles makes ``save_pretrained`` exports self-contained.
- ``fixed``: every region at ``fixed_level`` (fixed-length VQ is ``G = 1`` with this mode).

In any mode a caller may impose the map instead (``grain=`` of :meth:`Router.forward`, e.g. the random-map
control of the quality study): the gates are its one-hot, the shares and the budget loss are those of the
imposed map, and no gradient reaches the router.

Budget loss (learned mode): ``budget_weight * sum_g (share_g - target_g)**2`` over ALL levels, share_g the
batch-mean of gate g and target_0 = 1 - sum(targets); for G = 2 this is DQ-VAE's ``2 * gamma * (r - t)**2``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data.world import process_group_size
from models.config import ConfigBase, ConfigError, check_choice
from models.tokenizer.blocks import group_norm

ENTROPY_BINS = 32
ENTROPY_SIGMA = 0.01
GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)
ROUTER_MODES = ("learned", "entropy", "fixed")
TAU_SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass
class RouterConfig(ConfigBase):
    mode: str = "learned"
    targets: list[float] = dataclasses.field(default_factory=lambda: [0.5])  # share of each finer level 1..G-1
    budget_weight: float = 10.0         # gamma of the budget loss (learned mode)
    hidden: int = 512                   # width of the learned router's per-position MLP
    tau: float = 1.0                    # Gumbel-softmax temperature at step 0
    tau_end: float = 1.0                # ... and after anneal_steps
    tau_schedule: str = "constant"
    anneal_steps: int = 0
    detach_features: bool = True        # learned: no router gradient into the encoder (see the module docstring)
    calibration_rate: float = 1.0       # learned: eval-offset step per unit of share error, in logit stds (0: off)
    entropy_prior: float = 0.0          # learned: weight of the region-entropy prior in the logits (0: off)
    fixed_level: int = 0                # fixed mode: the level of every region
    entropy_table: str = ""             # entropy mode: calibrate-entropy JSON, inlined by the pipeline into ...
    entropy_quantiles: list[float] = dataclasses.field(default_factory=list)  # ... the table's quantiles

    def __post_init__(self) -> None:
        check_choice("model.router", "mode", self.mode, ROUTER_MODES)
        check_choice("model.router", "tau_schedule", self.tau_schedule, TAU_SCHEDULES)
        if min(self.targets, default=0.0) < 0 or sum(self.targets) > 1 + 1e-6:
            raise ConfigError(f"model.router.targets must be non-negative shares summing to <= 1, got {self.targets}")
        if self.tau <= 0 or self.tau_end <= 0:
            raise ConfigError(f"model.router.tau and tau_end must be > 0, got {self.tau}, {self.tau_end}")
        if self.calibration_rate < 0:
            raise ConfigError(f"model.router.calibration_rate must be >= 0, got {self.calibration_rate}")
        if self.entropy_prior < 0:
            raise ConfigError(f"model.router.entropy_prior must be >= 0, got {self.entropy_prior}")


class RouterOutput(NamedTuple):
    gates: torch.Tensor    # B x G x Hs x Ws one-hot (straight-through gradient in learned training)
    grain: torch.Tensor    # B x Hs x Ws int64 level per region
    budget: torch.Tensor   # scalar, already weighted
    shares: torch.Tensor   # G, batch-mean share of regions per level
    # learned training with calibration: G, the shares the eval decision gives this batch (all ranks' batches)
    eval_shares: Optional[torch.Tensor] = None


def region_entropy(images: torch.Tensor, region_size: int) -> torch.Tensor:
    """Soft-histogram entropy (nats) of every ``region_size`` x ``region_size`` region (DQ-VAE formula).

    images: B x 3 x H x W in [-1, 1], H and W divisible by ``region_size``. Grey = 0.2989 R + 0.587 G +
    0.114 B; 32 bins linspace(-1, 1, 32), sigma 0.01; p~_j = mean over pixels exp(-0.5((grey - b_j)/sigma)^2),
    p = p~ / (sum p~ + 1e-40) + 1e-40, H = -sum p ln p. Returns float64 B x H/region x W/region.
    """
    weights = torch.tensor(GREY_WEIGHTS, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    grey = (images.float() * weights).sum(1, keepdim=True)                        # B x 1 x H x W
    bins = torch.linspace(-1.0, 1.0, ENTROPY_BINS, device=images.device).view(1, -1, 1, 1)
    kernel = torch.exp(-0.5 * ((grey - bins) / ENTROPY_SIGMA) ** 2)              # B x 32 x H x W
    hist = F.avg_pool2d(kernel, region_size).double()                           # B x 32 x Hs x Ws
    p = hist / (hist.sum(1, keepdim=True) + 1e-40) + 1e-40
    return -(p * p.log()).sum(1)


def calibrate_entropy(entropies: torch.Tensor, region_size: int, num_quantiles: int = 1001) -> dict[str, Any]:
    """Quantile table of region entropies (from :func:`region_entropy` over a dataset), JSON-serialisable.

    ``quantiles[i]`` is the ``i / (num_quantiles - 1)`` quantile (linear interpolation). The table records
    the bins, sigma and region size it was computed with so a model with other settings refuses it.
    """
    values = entropies.detach().flatten().double().sort().values
    if values.numel() == 0:
        raise ValueError("calibrate_entropy: no entropies given")
    return {"bins": ENTROPY_BINS, "sigma": ENTROPY_SIGMA, "range": [-1.0, 1.0], "region_size": int(region_size),
            "num_regions": int(values.numel()), "quantiles": _interpolate(values, torch.linspace(0, 1, num_quantiles,
                                                                                                 dtype=torch.float64)).tolist()}


def _interpolate(sorted_values: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles of an ascending 1-D table at probabilities ``probs``."""
    position = probs.clamp(0, 1) * (sorted_values.numel() - 1)
    low = position.floor().long()
    high = (low + 1).clamp_max(sorted_values.numel() - 1)
    frac = position - low
    return sorted_values[low] * (1 - frac) + sorted_values[high] * frac


def budget_loss(gates: torch.Tensor, targets: Sequence[float], weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight * sum_g (share_g - target_g)**2``; gates B x G x Hs x Ws. Returns (loss, shares G)."""
    shares = gates.float().mean(dim=(0, 2, 3))
    target = shares.new_tensor([1.0 - sum(targets), *targets])
    return weight * ((shares - target) ** 2).sum(), shares


class Router(nn.Module):
    """features (coarsest first, level g: B x C x Hs*2^g x Ws*2^g) and images -> :class:`RouterOutput`.

    Keeps its own copy of ``config`` (:meth:`set_granularity_ratio` updates the copy's ``targets``).
    """

    def __init__(self, config: RouterConfig, factors: list[int], z_channels: int) -> None:
        super().__init__()
        self.config = config = copy.deepcopy(config)
        self.num_levels = len(factors)
        self.region_size = max(factors)
        if self.num_levels == 1 and config.mode != "fixed":
            raise ConfigError("model.router.mode must be 'fixed' with a single granularity (len(model.factors) == 1)")
        if config.mode == "fixed" and not 0 <= config.fixed_level < self.num_levels:
            raise ConfigError(f"model.router.fixed_level must be in [0, {self.num_levels - 1}], "
                              f"got {config.fixed_level}")
        if config.mode != "fixed" and len(config.targets) != self.num_levels - 1:
            raise ConfigError(f"model.router.targets needs one share per finer level ({self.num_levels - 1}), "
                              f"got {config.targets}")
        self.tau = config.tau
        if config.mode == "learned":
            self.norms = nn.ModuleList(group_norm(z_channels) for _ in factors)
            self.mlp = nn.Sequential(nn.Conv2d(self.num_levels * z_channels, config.hidden, 1), nn.SiLU(),
                                     nn.Conv2d(config.hidden, self.num_levels, 1))
            self.register_buffer("level_bias", torch.zeros(self.num_levels))   # eval calibration, saved
        if config.mode == "entropy":
            if config.entropy_table:
                raise ConfigError(f"model.router.entropy_table={config.entropy_table!r} is a file the pipeline "
                                  f"reads before building the model: pass the config through "
                                  f"pipeline.calibrate.inline_entropy_table (the varitok stages do), or give "
                                  f"model.router.entropy_quantiles inline")
            if len(config.entropy_quantiles) < 2:
                raise ConfigError("model.router.mode=entropy needs a calibrated table: run `varitok "
                                  "calibrate-entropy` and set model.router.entropy_table (or entropy_quantiles)")
            self.quantiles = torch.tensor(config.entropy_quantiles, dtype=torch.float64)
            self.set_granularity_ratio(config.targets)

    def set_granularity_ratio(self, ratios: Sequence[float]) -> None:
        """Entropy mode: re-target the share of each finer level (1..G-1) on the calibration distribution."""
        if self.config.mode != "entropy":
            raise RuntimeError(f"set_granularity_ratio needs router mode 'entropy', this router is "
                               f"{self.config.mode!r}")
        ratios = [float(r) for r in ratios]
        if len(ratios) != self.num_levels - 1 or min(ratios) < 0 or sum(ratios) > 1 + 1e-9:
            raise ValueError(f"need {self.num_levels - 1} non-negative shares summing to <= 1, got {ratios}")
        above = torch.tensor([sum(ratios[g:]) for g in range(len(ratios))], dtype=torch.float64)
        self.thresholds = _interpolate(self.quantiles, 1.0 - above)   # G-1, ascending
        self.config.targets = ratios

    def set_step(self, step: int) -> None:
        """Anneal the Gumbel temperature from ``tau`` to ``tau_end`` over ``anneal_steps``."""
        cfg = self.config
        progress = min(1.0, step / cfg.anneal_steps) if cfg.anneal_steps > 0 else 1.0
        if cfg.tau_schedule == "constant":
            self.tau = cfg.tau
        elif cfg.tau_schedule == "linear":
            self.tau = cfg.tau + (cfg.tau_end - cfg.tau) * progress
        else:
            self.tau = cfg.tau_end + 0.5 * (cfg.tau - cfg.tau_end) * (1 + math.cos(math.pi * progress))

    def logits(self, features: list[torch.Tensor], images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Learned mode: B x G x Hs x Ws fp32 logits (without the eval offsets; fp32 under autocast too, so that
        the prior and the decision are not rounded to bf16). With ``entropy_prior`` level g's logit
        also gets ``entropy_prior * g * H``, H the region's image entropy in nats (:func:`region_entropy` of
        ``images``, B x 3 x H x W): the router starts out ranking regions as the entropy router does, and the MLP
        learns the correction (a fixed weight: a learnable one would be pulled by the budget, not the ranking)."""
        if self.config.detach_features:
            features = [z.detach() for z in features]
        pooled = [F.avg_pool2d(norm(z), 1 << g) if g else norm(z)
                  for g, (norm, z) in enumerate(zip(self.norms, features))]
        logits = self.mlp(torch.cat(pooled, dim=1)).float()
        if self.config.entropy_prior > 0:
            if images is None:
                raise ValueError("a learned router with model.router.entropy_prior > 0 needs the images")
            entropy = region_entropy(images, self.region_size).to(logits.dtype).unsqueeze(1)   # B x 1 x Hs x Ws
            levels = torch.arange(self.num_levels, device=logits.device, dtype=logits.dtype).view(1, -1, 1, 1)
            logits = logits + self.config.entropy_prior * levels * entropy
        return logits

    def eval_gates(self, logits: torch.Tensor) -> torch.Tensor:
        """The eval decision: one-hot B x G x Hs x Ws of ``argmax(logits + level_bias)``."""
        choice = (logits.detach() + self.level_bias.view(1, -1, 1, 1)).argmax(1)
        return F.one_hot(choice, self.num_levels).permute(0, 3, 1, 2).to(logits.dtype)

    @torch.no_grad()
    def _calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """One step of the eval offsets towards the targets (collective under torch.distributed); returns the
        eval decision's shares (G) on the batch, before the step."""
        logits = logits.float()
        # shares of the eval decision, and the logits' spread: steps in its units make the rate scale-free
        spread = logits.std(dim=(0, 2, 3), unbiased=False).mean()
        measured = torch.cat([self.eval_gates(logits).mean(dim=(0, 2, 3)), spread[None]])
        world = process_group_size()
        if world > 1:
            dist.all_reduce(measured)
            measured /= world
        shares, spread = measured[:-1], measured[-1]
        target = shares.new_tensor([1.0 - sum(self.config.targets), *self.config.targets])
        step = self.config.calibration_rate * spread * (target - shares)
        # a non-finite batch (skipped by the optimizer's guard) must not poison the offsets for good
        self.level_bias += torch.where(step.isfinite(), step, torch.zeros_like(step))
        return shares

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints and exports from before the eval calibration have no ``level_bias``: load them with zero
        offsets (plain argmax, exactly their behaviour then) and say so."""
        key = prefix + "level_bias"
        if self.config.mode == "learned" and key not in state_dict:
            warnings.warn(f"{key} missing from the loaded state (saved before the router's eval calibration): "
                          f"using zero offsets, i.e. plain argmax", stacklevel=2)
            state_dict[key] = torch.zeros_like(self.level_bias)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: list[torch.Tensor], images: torch.Tensor,
                grain: torch.Tensor | None = None) -> RouterOutput:
        """features: coarsest first, level g ``B x C x Hs*2^g x Ws*2^g``; images ``B x 3 x H x W`` (entropy
        mode reads them). ``grain``: an imposed map, integer ``B x Hs x Ws`` with values in ``0 .. G-1``
        (see :meth:`_impose`); ``None`` lets the router choose."""
        coarse = features[0]
        batch, _, height, width = coarse.shape
        if grain is not None:
            return self._impose(self._check_grain(grain, (batch, height, width)).to(coarse.device))
        mode = self.config.mode
        if mode == "learned":
            logits = self.logits(features, images)
            eval_shares = None
            if self.training:
                gates = F.gumbel_softmax(logits, tau=self.tau, hard=True, dim=1)
                if self.config.calibration_rate > 0:
                    eval_shares = self._calibrate(logits)
            else:
                gates = self.eval_gates(logits)
            loss, shares = budget_loss(gates, self.config.targets, self.config.budget_weight)
            return RouterOutput(gates, gates.detach().argmax(1), loss, shares, eval_shares)
        if mode == "entropy":
            entropy = region_entropy(images, self.region_size)
            grain = (entropy.unsqueeze(-1) > self.thresholds.to(entropy.device)).sum(-1)
        else:
            grain = torch.full((batch, height, width), self.config.fixed_level, dtype=torch.long,
                               device=coarse.device)
        return self._impose(grain)

    def _impose(self, grain: torch.Tensor) -> RouterOutput:
        """The routing of a given int64 map ``B x Hs x Ws`` (values ``0 .. G-1``, not checked here: see
        :meth:`_check_grain`): one-hot gates (constant, so no gradient reaches the router), shares of the map,
        and the budget loss the map would pay in learned mode (a constant; 0 in the other modes), so that
        imposing the map the router would choose in eval mode gives exactly its own output."""
        gates = F.one_hot(grain, self.num_levels).permute(0, 3, 1, 2).float()
        if self.config.mode == "learned":
            budget, shares = budget_loss(gates, self.config.targets, self.config.budget_weight)
        else:
            budget, shares = gates.new_zeros(()), gates.mean(dim=(0, 2, 3))
        return RouterOutput(gates, grain, budget, shares)

    def _check_grain(self, grain: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Validate an imposed grain map against the coarsest grid ``shape = (B, Hs, Ws)``: an integer tensor
        of exactly that shape with values in ``0 .. G-1``. Returns it as int64 (on its own device); raises
        ValueError naming what is expected."""
        expected = f"an integer B x Hs x Ws = {tuple(shape)} map of levels in 0..{self.num_levels - 1}"
        if not isinstance(grain, torch.Tensor):
            raise ValueError(f"grain must be {expected}, got {type(grain).__name__}")
        if grain.dtype.is_floating_point or grain.dtype.is_complex or grain.dtype == torch.bool:
            raise ValueError(f"grain must be {expected}, got dtype {grain.dtype}")
        if tuple(grain.shape) != tuple(shape):
            raise ValueError(f"grain must be {expected} (the coarsest grid), got shape {tuple(grain.shape)}")
        grain = grain.long()
        low, high = (int(v) for v in grain.aminmax())
        if low < 0 or high >= self.num_levels:
            raise ValueError(f"grain must be {expected} (the number of levels is {self.num_levels}), "
                             f"got values in {low}..{high}")
        return grain
