"""Factorized cosine quantizer (FQGAN) applied per granularity level.

K sub-codebooks, each with its own size and code dimension, are shared by all levels. For every
sub-codebook ``k`` a light conv adapter maps the encoder's ``z_channels`` to code dim ``D_k``; inputs and
codes are l2-normalised and looked up by cosine similarity in fp32 (autocast disabled, so bf16 training
assigns the same codes as fp32). Each level is quantized at its own resolution (never replicated copies);
in training every cell of a level's grid is quantized (masked dense, no host syncs) and the losses count
only the cells whose region chose that level (``masks``).

Losses (already weighted, averaged over sub-codebooks, so that K does not scale the quantizer's pull on
the shared trunk): codebook ``mean ||q - sg(u)||^2``, commitment ``beta * mean ||sg(q) - u||^2``, entropy
regularizer ``mean_i H(p_i) - H(mean_i p_i)`` with ``p_i = softmax(-d_i / T)`` (computed in chunks of tokens by
:class:`ChunkedLookupEntropy`: never a dense tokens x codebook matrix; the average distribution is all-reduced
over the ranks, V floats), disentanglement ``mean over pairs (a, b) of mean <q_a, q_b>^2``.

Codebooks start as LlamaGen / FQGAN do, ``U(-1/V, 1/V)`` (``codebook_init: uniform``): the codes are used
l2-normalised, so their raw norm only sets how far one optimizer step turns them, and these tiny norms let Adam
move a code by a large angle per step (``randn`` codes, norm ~sqrt(D), barely move from their init).
``codebook_init: kmeans`` additionally lets the trainer call :meth:`FactorizedQuantizer.kmeans_init` on the first
batch (spherical k-means of the adapter outputs, the codes become the normalised cluster means).

Codebook updates (``codebook_update``): ``gradient`` (the codebook loss above, through the optimizer) or ``ema``,
DQ-VAE's official quantizer (from RQ-VAE): no gradient reaches the codebook; every training forward folds the
batch into per-code EMAs (decay ``ema_decay``) of the token count ``N_j`` and of the sum ``S_j`` of the unit inputs
assigned to code j, and sets ``e_j = normalize(S_j / N~_j)`` with Laplace smoothing
``N~_j = n (N_j + eps) / (n + V eps)``, ``n = sum_j N_j``. A code whose ``N_j`` falls below
``dead_code_threshold`` is restarted: ``S_j`` becomes a random token of the batch (plus noise of std
``0.01 / sqrt(D)``) and ``N_j`` one token. Under torch.distributed the counts and sums are all-reduced
(V x (D + 1) floats) and the restart candidates are rank 0's, broadcast, so the codebooks stay identical on every
rank; all on the device, no host syncs. The EMAs are persistent buffers (``ema_count_k``, ``ema_sum_k``): saved
and resumed with the model's state.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data.world import process_group_size
from models.config import ConfigBase, ConfigError, check_choice
from models.tokenizer.blocks import ResBlock, group_norm

UINT16_CODES = 1 << 16
# Log-probabilities are clamped here before exp: below about -87 fp32 exp() returns denormals, which are
# an order of magnitude slower on CPUs, and such probabilities (< 1.7e-38) do not change the entropies.
MIN_LOG_PROB = -87.0
CODEBOOK_INITS = ("uniform", "randn", "kmeans")
CODEBOOK_UPDATES = ("gradient", "ema")
RESTART_NOISE = 0.01   # std of the noise on restarted / k-means seed codes, times 1 / sqrt(D) (RQ-VAE / DQ-VAE)


@dataclasses.dataclass
class SubCodebookConfig(ConfigBase):
    size: int = 16384
    dim: int = 8
    align: str = ""       # name of the teacher this sub-codebook is aligned to ("" = none, pixel detail)
    align_dim: int = 0    # that teacher's feature width (e.g. 384 DINOv2-S, 512 CLIP ViT-B/16)

    def __post_init__(self) -> None:
        if self.size < 2 or self.dim < 1:
            raise ConfigError(f"model.quantizer.codebooks: size must be >= 2 and dim >= 1, got {self.size}, {self.dim}")
        if self.align and self.align_dim < 1:
            raise ConfigError(f"model.quantizer.codebooks: align={self.align!r} needs align_dim, the teacher's "
                              f"feature width")


@dataclasses.dataclass
class QuantizerConfig(ConfigBase):
    codebooks: list[SubCodebookConfig] = dataclasses.field(default_factory=lambda: [SubCodebookConfig()])
    adapter_channels: int = 256
    adapter_blocks: int = 1           # ResBlocks in each sub-codebook's adapter
    beta: float = 0.25                # commitment weight
    codebook_weight: float = 1.0
    entropy_weight: float = 0.03
    entropy_temperature: float = 0.01
    disentangle_weight: float = 0.1
    chunk_size: int = 4096            # tokens per chunk of the lookup / entropy computation
    codebook_init: str = "uniform"    # uniform: U(-1/V, 1/V) (LlamaGen / FQGAN); randn: N(0, 1); kmeans: uniform,
    kmeans_iters: int = 10            # then k-means of the first batch (the trainer calls kmeans_init)
    codebook_update: str = "gradient"  # gradient: codebook loss + optimizer; ema: DQ-VAE's EMA + dead-code restart
    ema_decay: float = 0.99           # ema: decay of the per-code token counts and input sums
    ema_epsilon: float = 1e-5         # ema: Laplace smoothing of the counts
    dead_code_threshold: float = 1.0  # ema: restart codes whose EMA token count falls below this (0: never)

    def __post_init__(self) -> None:
        if not self.codebooks:
            raise ConfigError("model.quantizer.codebooks: need at least one sub-codebook")
        dims = {c.dim for c in self.codebooks}
        if self.disentangle_weight > 0 and len(self.codebooks) > 1 and len(dims) > 1:
            raise ConfigError(f"model.quantizer.disentangle_weight > 0 compares sub-codes at the same position and "
                              f"needs equal dims, got {[c.dim for c in self.codebooks]}: equalise the dims or set "
                              f"disentangle_weight: 0")
        check_choice("model.quantizer", "codebook_init", self.codebook_init, CODEBOOK_INITS)
        check_choice("model.quantizer", "codebook_update", self.codebook_update, CODEBOOK_UPDATES)
        if not 0.0 <= self.ema_decay < 1.0 or self.ema_epsilon <= 0 or self.dead_code_threshold < 0:
            raise ConfigError(f"model.quantizer: ema_decay must be in [0, 1), ema_epsilon > 0 and "
                              f"dead_code_threshold >= 0, got {self.ema_decay}, {self.ema_epsilon}, "
                              f"{self.dead_code_threshold}")
        if self.kmeans_iters < 1:
            raise ConfigError(f"model.quantizer.kmeans_iters must be >= 1, got {self.kmeans_iters}")

    @property
    def ema(self) -> bool:
        return self.codebook_update == "ema"
        if self.chunk_size < 1 or self.entropy_temperature <= 0:
            raise ConfigError("model.quantizer: chunk_size and entropy_temperature must be positive")


def _chunks(n: int, size: int):
    return ((start, min(n, start + size)) for start in range(0, n, size))


@torch.no_grad()
def cosine_lookup(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Index of the nearest code by cosine similarity, in fp32. z: N x D, codebook: V x D (both
    l2-normalised). Returns int64 N. Computed ``chunk_size`` rows at a time."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, codebook = z.float(), codebook.float()
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for start, end in _chunks(z.shape[0], chunk_size):
            out[start:end] = (z[start:end] @ codebook.T).argmax(1)
    return out


class ChunkedLookupEntropy(torch.autograd.Function):
    """Fused nearest-code lookup and FQGAN entropy regularizer, chunked over tokens in forward and backward.

    Inputs: z N x D and codebook V x D (l2-normalised, fp32), weights N (token weights, e.g. level masks),
    temperature T, chunk size. With s_i = 2 <z_i, e> / T (= -d_i / T up to a constant), p_i = softmax(s_i),
    w~ = weights / sum(weights), pbar = sum_i w~_i p_i:
        loss = sum_i w~_i H(p_i) - H(pbar)
    Returns (indices int64 N, loss scalar). Backward recomputes each chunk's probabilities, so memory is
    O(chunk x V) instead of O(N x V); gradients flow to z and the codebook, not to the weights.

    Under torch.distributed, pbar is the weighted average over ALL ranks' tokens (one all-reduce of V + 1
    floats), so the batch-entropy term sees the global batch, not ~100 tokens of one rank. The backward then
    gives each rank world_size times its tokens' share of the global gradient (its w~ are normalised locally),
    which the data-parallel gradient average turns into exactly the global objective's gradient when the
    ranks carry equal token weight.
    """

    @staticmethod
    def forward(ctx, z, codebook, weights, temperature: float, chunk_size: int):
        scaled = z * (2.0 / temperature)
        w = weights / weights.sum().clamp_min(1e-12)
        pbar = z.new_zeros(codebook.shape[0])
        token_entropy = z.new_empty(z.shape[0])
        log_norm = z.new_empty(z.shape[0])         # logsumexp of each token's logits
        indices = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for start, end in _chunks(z.shape[0], chunk_size):
            logits = scaled[start:end] @ codebook.T                      # chunk x V
            top, indices[start:end] = logits.max(1)
            unnormalized = (logits - top[:, None]).clamp_min_(MIN_LOG_PROB).exp_()
            total = unnormalized.sum(1)
            lse = top + total.log()
            log_norm[start:end] = lse
            # H = -sum p (s - lse) = lse - <p, s>, with p = unnormalized / total
            dot = torch.bmm(unnormalized.unsqueeze(1), logits.unsqueeze(2)).view(-1)
            token_entropy[start:end] = lse - dot / total
            pbar += (w[start:end] / total) @ unnormalized
        pbar = _global_average(pbar, weights.sum())
        loss = (w * token_entropy).sum() + torch.xlogy(pbar, pbar).sum()
        ctx.save_for_backward(scaled, codebook, w, token_entropy, log_norm, pbar)
        ctx.scale, ctx.chunk_size = 2.0 / temperature, chunk_size
        ctx.mark_non_differentiable(indices)
        return indices, loss

    @staticmethod
    def backward(ctx, _grad_indices, grad_loss):
        scaled, codebook, w, token_entropy, log_norm, pbar = ctx.saved_tensors
        log_pbar = pbar.clamp_min(torch.finfo(pbar.dtype).tiny).log()
        dim = codebook.shape[1]
        grad_z = torch.empty_like(scaled)
        grad_codebook = torch.zeros_like(codebook)
        coeff = w * grad_loss
        codes_ext = torch.cat([log_pbar[:, None] * codebook, codebook], dim=1)        # V x 2D
        # With a = log pbar and r_i = -(H_i + <p_i, a>), the logit gradient is
        #   g_ij = c_i p_ij (a_j + r_i - log p_ij)
        # (d/ds of w~ H(p) is -w~ p (log p + H); of -H(pbar) it is w~ p (a - <p, a>)). It is never
        # materialised: g @ E and g^T @ x are expanded into products of p and p * log p with thin matrices.
        for start, end in _chunks(scaled.shape[0], ctx.chunk_size):
            x = scaled[start:end]
            log_p = (x @ codebook.T).sub_(log_norm[start:end, None]).clamp_min_(MIN_LOG_PROB)  # chunk x V
            p = log_p.exp()
            row = -(token_entropy[start:end] + p @ log_pbar)
            p_log_p = log_p.mul_(p)
            c = coeff[start:end, None]
            to_codes = p @ codes_ext
            grad_z[start:end] = c * (to_codes[:, :dim] + row[:, None] * to_codes[:, dim:] - p_log_p @ codebook)
            cx = c * x
            from_tokens = p.T @ torch.cat([cx, row[:, None] * cx], dim=1)              # V x 2D
            grad_codebook += log_pbar[:, None] * from_tokens[:, :dim] + from_tokens[:, dim:] - p_log_p.T @ cx
        # s = scaled @ codebook.T with scaled = z * scale: ds/dz carries the scale, ds/dcodebook = scaled
        return grad_z * ctx.scale, grad_codebook, None, None, None


def _global_average(local: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``local`` (a weighted average over this rank's tokens, total weight ``weight``) -> the weighted average
    over all ranks (one all-reduce of ``local.numel() + 1`` floats); ``local`` itself without a process group."""
    if process_group_size() == 1:
        return local
    packed = torch.cat([local * weight, weight.reshape(1).to(local.dtype)])
    dist.all_reduce(packed)
    return packed[:-1] / packed[-1].clamp_min(1e-12)


def quantize_tokens(u: torch.Tensor, codebook: torch.Tensor, weights: torch.Tensor, config: QuantizerConfig,
                    training: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Cosine-quantize tokens against one sub-codebook, in fp32 whatever the autocast state.

    u: N x D adapter outputs (normalised here); codebook: V x D raw parameter; weights: N token weights.
    Returns (q N x D: unit codes, straight-through in training; indices int64 N; weighted loss terms
    codebook / commitment / entropy and the detached weighted mean ``cosine`` of (u, q), empty when not
    training).
    """
    with torch.autocast(device_type=u.device.type, enabled=False):
        u = F.normalize(u.float(), dim=-1)
        codes = F.normalize(codebook.float(), dim=-1)
        terms: dict[str, torch.Tensor] = {}
        if training and config.entropy_weight > 0 and torch.is_grad_enabled():
            idx, entropy = ChunkedLookupEntropy.apply(u, codes, weights, config.entropy_temperature,
                                                      config.chunk_size)
            terms["entropy"] = config.entropy_weight * entropy
        else:
            idx = cosine_lookup(u, codes, config.chunk_size)
        q = codes[idx]
        if not training:
            return q, idx, terms
        total = weights.sum().clamp_min(1.0)
        with torch.no_grad():   # commitment health: how close the encoder's outputs sit to their codes
            terms["cosine"] = (weights * (q * u).sum(-1)).sum() / total
        if not config.ema:   # EMA codebooks get no gradient: their update is FactorizedQuantizer.update_ema
            terms["codebook"] = config.codebook_weight * (weights * ((q - u.detach()) ** 2).mean(-1)).sum() / total
        terms["commitment"] = config.beta * (weights * ((q.detach() - u) ** 2).mean(-1)).sum() / total
        return u + (q - u).detach(), idx, terms


class QuantizerOutput(NamedTuple):
    quantized: list[torch.Tensor]         # per level: B x sum(D_k) x Hg x Wg (straight-through in training)
    indices: list[torch.Tensor]           # per level: B x K x Hg x Wg int64
    losses: dict[str, torch.Tensor]       # codebook, commitment, entropy, disentangle (weighted scalars)
    stats: dict[str, torch.Tensor]        # perplexity/k, code_cosine/k (this batch), usage/k (running, this rank)


class FactorizedQuantizer(nn.Module):
    """K cosine sub-codebooks shared by all granularity levels; see the module docstring."""

    def __init__(self, config: QuantizerConfig, z_channels: int) -> None:
        super().__init__()
        self.config = config
        self.dims = [c.dim for c in config.codebooks]
        self.sizes = [c.size for c in config.codebooks]
        self.adapters = nn.ModuleList(self._adapter(z_channels, c.dim) for c in config.codebooks)
        # EMA codebooks stay parameters (same state-dict keys, exports, weight EMA) but without gradient, so the
        # optimizer groups (requires_grad only) leave them out
        self.codebooks = nn.ParameterList(nn.Parameter(torch.empty(c.size, c.dim), requires_grad=not config.ema)
                                          for c in config.codebooks)
        for k, c in enumerate(config.codebooks):
            self.register_buffer(f"usage_{k}", torch.zeros(c.size), persistent=False)
            if config.ema:
                self.register_buffer(f"ema_count_{k}", torch.zeros(c.size))
                self.register_buffer(f"ema_sum_{k}", torch.zeros(c.size, c.dim))
        self.reset_codebooks()

    def _adapter(self, z_channels: int, dim: int) -> nn.Sequential:
        width = self.config.adapter_channels if self.config.adapter_blocks else z_channels
        blocks = [ResBlock(z_channels if i == 0 else width, width) for i in range(self.config.adapter_blocks)]
        return nn.Sequential(*blocks, group_norm(width), nn.SiLU(), nn.Conv2d(width, dim, 1))

    @torch.no_grad()
    def reset_codebooks(self) -> None:
        """Initialise every codebook per ``config.codebook_init`` (see the module docstring)."""
        for k, codebook in enumerate(self.codebooks):
            if self.config.codebook_init == "randn":
                codebook.normal_()
            else:
                codebook.uniform_(-1.0 / codebook.shape[0], 1.0 / codebook.shape[0])
            if self.config.ema:   # as DQ-VAE: the sums start at the codes, the counts at zero
                self.ema_statistics(k)[0].zero_()
                self.ema_statistics(k)[1].copy_(codebook)

    @property
    def code_dtype(self) -> torch.dtype:
        """Smallest unsigned dtype that holds every code: uint16 up to 65536 entries, else uint32."""
        return torch.uint16 if max(self.sizes) <= UINT16_CODES else torch.uint32

    def normalized_codebook(self, k: int) -> torch.Tensor:
        return F.normalize(self.codebooks[k].float(), dim=-1)

    def usage_counts(self, k: int) -> torch.Tensor:
        return getattr(self, f"usage_{k}")

    def ema_statistics(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sub-codebook k's EMA buffers (``codebook_update: ema``): token counts V and input sums V x D."""
        return getattr(self, f"ema_count_{k}"), getattr(self, f"ema_sum_{k}")

    def _adapted(self, k: int, levels: list[torch.Tensor]) -> torch.Tensor:
        """Sub-codebook k's adapter outputs of every level, flattened: (sum_g B*Hg*Wg) x D_k fp32."""
        return torch.cat([self.adapters[k](z).float().permute(0, 2, 3, 1).reshape(-1, self.dims[k]) for z in levels])

    @torch.no_grad()
    def update_ema(self, k: int, u: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """One EMA step of sub-codebook k (see the module docstring) from this batch's tokens.

        u: N x D inputs (normalised here), indices: N int64 (their codes), weights: N token weights (level
        masks). Collective under torch.distributed: every rank must call it, in the same order."""
        cfg = self.config
        u = F.normalize(u.detach().float(), dim=-1)
        counts, sums = _cluster_statistics(u, indices, weights, self.sizes[k])
        count, total = self.ema_statistics(k)
        count.lerp_(counts, 1.0 - cfg.ema_decay)
        total.lerp_(sums, 1.0 - cfg.ema_decay)
        if cfg.dead_code_threshold > 0:
            dead = count < cfg.dead_code_threshold
            total.copy_(torch.where(dead[:, None], _sample_tokens(u, weights, self.sizes[k]), total))
            count.copy_(torch.where(dead, torch.ones_like(count), count))
        n = count.sum()
        smoothed = n * (count + cfg.ema_epsilon) / (n + self.sizes[k] * cfg.ema_epsilon)
        self.codebooks[k].copy_(F.normalize(total / smoothed[:, None], dim=-1))

    @torch.no_grad()
    def kmeans_init(self, levels: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        """Set every codebook to a spherical k-means (``config.kmeans_iters`` Lloyd steps) of its adapter outputs
        on this batch (levels / masks as in :meth:`forward`; masked cells weigh 0). Seeds: weighted random
        tokens (rank 0's, broadcast); a cluster left empty keeps its seed. Under torch.distributed the clusters
        are over all ranks' tokens (counts and sums all-reduced each step): every rank ends with the same
        codes. With EMA updates the EMA buffers start at the clusters' counts and sums."""
        weights = torch.cat([m.detach().float().flatten() for m in masks])
        for k in range(len(self.sizes)):
            u = F.normalize(self._adapted(k, levels), dim=-1)
            centers = _sample_tokens(u, weights, self.sizes[k])
            for _ in range(self.config.kmeans_iters):
                counts, sums = _cluster_statistics(u, cosine_lookup(u, centers, self.config.chunk_size), weights,
                                                   self.sizes[k])
                centers = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centers)
            self.codebooks[k].copy_(centers)
            if self.config.ema:
                count, total = self.ema_statistics(k)
                count.copy_(counts)
                total.copy_(torch.where(counts[:, None] > 0, sums, centers))

    def forward(self, levels: list[torch.Tensor], masks: list[torch.Tensor]) -> QuantizerOutput:
        """levels: per level ``B x z_channels x Hg x Wg``; masks: per level ``B x Hg x Wg`` float weights
        (1 where the region chose that level). Quantizes every cell; losses and stats count masked cells."""
        cfg = self.config
        shapes = [z.shape for z in levels]
        weights = torch.cat([m.detach().float().flatten() for m in masks])
        zero = weights.new_zeros(())
        losses = {"codebook": zero, "commitment": zero, "entropy": zero, "disentangle": zero}
        stats: dict[str, torch.Tensor] = {}
        per_codebook_q, per_codebook_idx = [], []
        for k in range(len(self.adapters)):
            u = self._adapted(k, levels)
            q, idx, terms = quantize_tokens(u, self.codebooks[k], weights, cfg, self.training)
            if self.training and cfg.ema:
                self.update_ema(k, u, idx, weights)
            if "cosine" in terms:
                stats[f"code_cosine/{k}"] = terms.pop("cosine")
            for name, value in terms.items():
                losses[name] = losses[name] + value / len(self.adapters)
            if self.training:
                with torch.no_grad():
                    self.usage_counts(k).index_add_(0, idx, weights)
            stats[f"perplexity/{k}"] = _perplexity(idx, weights, self.sizes[k])
            stats[f"usage/{k}"] = (self.usage_counts(k) > 0).float().mean()
            per_codebook_q.append(q)
            per_codebook_idx.append(idx)
        if self.training and cfg.disentangle_weight > 0 and len(per_codebook_q) > 1:
            losses["disentangle"] = cfg.disentangle_weight * disentanglement_loss(per_codebook_q, weights)
        quantized = _split_levels(torch.cat(per_codebook_q, dim=1), shapes)
        indices = _split_levels(torch.stack(per_codebook_idx, dim=1), shapes)
        return QuantizerOutput(quantized, indices, losses, stats)

    def embed(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level ``B x K x Hg x Wg`` code indices -> ``B x sum(D_k) x Hg x Wg`` unit code vectors."""
        out = []
        for idx in indices:
            parts = [self.normalized_codebook(k)[idx[:, k]] for k in range(len(self.sizes))]  # B x Hg x Wg x D_k
            out.append(torch.cat(parts, dim=-1).permute(0, 3, 1, 2).contiguous())
        return out

    def reset_usage(self) -> None:
        for k in range(len(self.sizes)):
            self.usage_counts(k).zero_()

    def reduced_usage(self) -> dict[str, torch.Tensor]:
        """Share of each sub-codebook's codes used since the last reset (``usage/k``) and the number never
        used (``dead_codes/k``), summed over ranks when torch.distributed is initialised (the running counts
        themselves stay per rank)."""
        counts = [self.usage_counts(k).clone() for k in range(len(self.sizes))]
        if process_group_size() > 1:
            for c in counts:
                dist.all_reduce(c)
        stats = {f"usage/{k}": (c > 0).float().mean() for k, c in enumerate(counts)}
        stats.update({f"dead_codes/{k}": (c == 0).sum().float() for k, c in enumerate(counts)})
        return stats


def disentanglement_loss(vectors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Mean over sub-codebook pairs (a, b) of the weighted mean of ``<q_a, q_b>**2`` over positions.

    vectors: K tensors N x D (unit code vectors of the same N positions); weights: N. Unweighted scalar.
    """
    total = weights.sum().clamp_min(1e-12)
    pairs = list(itertools.combinations(vectors, 2))
    return sum((weights * (a * b).sum(-1) ** 2).sum() / total for a, b in pairs) / len(pairs)


def _cluster_statistics(u: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, size: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted token count (V) and input sum (V x D) per code, summed over the ranks under torch.distributed
    (one all-reduce of V x (D + 1) floats). u: N x D, indices: N, weights: N."""
    packed = u.new_zeros(size, u.shape[1] + 1).index_add_(
        0, indices, torch.cat([weights[:, None].to(u.dtype), u * weights[:, None]], dim=1))
    if process_group_size() > 1:
        dist.all_reduce(packed)
    return packed[:, 0], packed[:, 1:]


def _sample_tokens(u: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` tokens of ``u`` (N x D unit vectors) drawn with replacement in proportion to ``weights``, plus noise
    of std ``RESTART_NOISE / sqrt(D)``, normalised: n x D. Under torch.distributed rank 0's draw, broadcast,
    so every rank gets the same vectors. On the device, no host sync (inverse-CDF sampling)."""
    cdf = weights.float().clamp_min(0).cumsum(0)
    picks = torch.searchsorted(cdf, torch.rand(n, device=u.device) * cdf[-1], right=True).clamp_max(u.shape[0] - 1)
    noise = torch.randn(n, u.shape[1], device=u.device, dtype=u.dtype) * (RESTART_NOISE / u.shape[1] ** 0.5)
    vectors = F.normalize(u[picks] + noise, dim=-1)
    if process_group_size() > 1:
        dist.broadcast(vectors, 0)
    return vectors


def _split_levels(tokens: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Inverse of the per-level flattening: tokens (sum_g B*Hg*Wg) x C -> per level B x C x Hg x Wg."""
    sizes = [s[0] * s[2] * s[3] for s in shapes]
    return [part.view(s[0], s[2], s[3], -1).permute(0, 3, 1, 2).contiguous()
            for part, s in zip(tokens.split(sizes), shapes)]


def _perplexity(indices: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """exp(entropy) of the weighted code histogram of one batch."""
    hist = weights.new_zeros(size).index_add_(0, indices, weights)
    p = hist / hist.sum().clamp_min(1e-12)
    return torch.exp(-torch.xlogy(p, p).sum())
