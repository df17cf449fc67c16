"""DQ-Transformer with FAR factorized heads: stacked position + content transformers over token sequences.

For token ``t`` of a sequence (:mod:`models.generator.sequence`) with position id ``P_t`` and sub-codes
``X_t = (x_t^0 .. x_t^{K-1})``:

- position stack input ``u_t = E_pos(P_t) + sum_j E_content^j(x_t^j)`` (+ ``E_class(y)`` at BOS);
  ``h_t = PositionStack(u_<=t)``; position logits ``W_pos h_t`` predict ``P_{t+1}``.
- content stack input ``v_t = h_t + E_pos(P_{t+1})`` (the position being filled next);
  ``c_t = ContentStack(v_<=t)``.
- factorized head: a small causal transformer over ``K`` slots; slot ``j`` sees ``c_t`` and
  ``x_{t+1}^{<j}`` and predicts ``x_{t+1}^j``.

``E_pos`` has separate rows per level (one table, level offsets); ``E_content^j`` is one table per
sub-codebook shared by all levels. With ``tie_embeddings`` the position logits reuse ``E_pos`` and
the head's sub-code outputs reuse its sub-code input tables.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from models.config import ConfigBase, ConfigError
from models.generator.layers import KVCache, Transformer
from models.generator.sequence import (IGNORE, PackedBatch, SequenceSpec, Targets, content_target_rows,
                                       next_token_targets)
from models.hub import PretrainedMixin


@dataclasses.dataclass
class GeneratorConfig(ConfigBase):
    """Architecture of the stacked generator (the ``model:`` section of a generator stage config)."""

    num_levels: int = 2                    # granularities G of the tokenizer (0 = coarsest)
    num_subcodes: int = 2                  # K
    codebook_sizes: list[int] = dataclasses.field(default_factory=lambda: [256, 256])
    grain_shape: list[int] = dataclasses.field(default_factory=lambda: [4, 4])  # coarsest grid [Hs, Ws]
    num_classes: int = 10                  # 0 = unconditional; class id num_classes is the null class
    dim: int = 128                         # width of both stacks
    heads: int = 4
    position_depth: int = 2
    content_depth: int = 4
    head_dim: int = 64                     # factorized head width
    head_depth: int = 1
    head_heads: int = 2
    mlp_ratio: float = 8 / 3
    dropout: float = 0.0
    class_dropout: float = 0.1             # label dropout (null class) for classifier-free guidance
    rope: bool = True                      # rotary embedding of the token index in the sequence
    rope_base: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.num_levels < 1:
            raise ConfigError(f"model.num_levels must be >= 1, got {self.num_levels}")
        if self.num_subcodes < 1 or len(self.codebook_sizes) != self.num_subcodes:
            raise ConfigError(f"model.codebook_sizes must list num_subcodes={self.num_subcodes} sizes, "
                              f"got {list(self.codebook_sizes)}")
        if min(self.codebook_sizes) < 1:
            raise ConfigError(f"model.codebook_sizes must be positive, got {list(self.codebook_sizes)}")
        if len(self.grain_shape) != 2 or min(self.grain_shape) < 1:
            raise ConfigError(f"model.grain_shape must be [Hs, Ws] with positive sizes, got {list(self.grain_shape)}")
        if self.num_classes < 0:
            raise ConfigError(f"model.num_classes must be >= 0, got {self.num_classes}")
        for width, heads, name in ((self.dim, self.heads, "dim/heads"), (self.head_dim, self.head_heads,
                                                                        "head_dim/head_heads")):
            if heads < 1 or width % heads:
                raise ConfigError(f"model.{name}: {width} is not divisible by {heads} heads")
        if self.rope and (self.dim // self.heads) % 2:
            raise ConfigError(f"model.rope needs an even head width, got dim/heads = {self.dim // self.heads}")
        if min(self.position_depth, self.content_depth, self.head_depth) < 1:
            raise ConfigError("model.position_depth, content_depth and head_depth must be >= 1")
        for name in ("dropout", "class_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] = ()) -> "GeneratorConfig":
        """Read the ``model:`` section of a stage config (or a bare model config) plus ``key=value`` overrides."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        values = OmegaConf.load(path)
        if isinstance(values, DictConfig) and "model" in values:
            values = values.model
        try:
            return cls.from_dict(values, overrides)
        except ConfigError as exc:
            message = str(exc) if str(exc).startswith("model.") else f"model.{exc}"
            raise ConfigError(f"{path}: {message}") from None

    @property
    def spec(self) -> SequenceSpec:
        return SequenceSpec(self.num_levels, tuple(self.grain_shape), tuple(self.codebook_sizes))

    @property
    def null_class(self) -> int:
        return self.num_classes


class FactorizedHead(nn.Module):
    """FAR-style head: predicts the ``K`` sub-codes of one code one after another.

    Slot ``j`` input: ``A c + s_j + e_{j-1}(x^{j-1})`` (no code term at slot 0); a causal transformer
    over the slots; slot ``j`` output -> logits over sub-codebook ``j``.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, codebook_sizes: list[int],
                 mlp_ratio: float, dropout: float, tie: bool):
        super().__init__()
        self.input = nn.Linear(in_dim, dim, bias=False)
        self.slot_embed = nn.Parameter(torch.randn(len(codebook_sizes), dim) * 0.02)
        self.code_embed = nn.ModuleList(nn.Embedding(size, dim) for size in codebook_sizes)
        self.stack = Transformer(dim, depth, heads, mlp_ratio, dropout, rope=False)
        self.out = nn.ModuleList(nn.Linear(dim, size, bias=False) for size in codebook_sizes)
        if tie:
            for out, embed in zip(self.out, self.code_embed):
                out.weight = embed.weight

    def slot_inputs(self, context: Tensor, codes: Tensor) -> Tensor:
        """context ``[N, in_dim]``, teacher sub-codes ``[N, K']`` -> slot inputs ``[N, K' + 1 (<= K), dim]``."""
        base = self.input(context)[:, None] + self.slot_embed[: codes.shape[1] + 1]
        previous = [torch.zeros_like(base[:, 0])] + [self.code_embed[j](codes[:, j]) for j in range(codes.shape[1])]
        return base + torch.stack(previous[: base.shape[1]], dim=1)

    def forward(self, context: Tensor, codes: Tensor) -> list[Tensor]:
        """Teacher-forced logits: context ``[N, in_dim]``, codes ``[N, K]`` -> ``K`` tensors ``[N, V_j]``."""
        hidden = self.stack(self.slot_inputs(context, codes[:, :-1]))
        return [out(hidden[:, j]) for j, out in enumerate(self.out)]

    def new_caches(self, batch: int, like: Tensor) -> list[KVCache]:
        return self.stack.new_caches(batch, len(self.out), like)

    def step(self, context: Tensor, previous: Optional[Tensor], slot: int, caches: list[KVCache]) -> Tensor:
        """Incremental logits ``[N, V_slot]`` given sub-code ``slot - 1`` (``previous [N]``, None at slot 0)."""
        x = self.input(context) + self.slot_embed[slot]
        if previous is not None:
            x = x + self.code_embed[slot - 1](previous)
        return self.out[slot](self.stack(x[:, None], caches=caches)[:, 0])


@dataclasses.dataclass
class GeneratorCache:
    """KV caches of both stacks for incremental decoding."""

    position: list[KVCache]
    content: list[KVCache]

    @property
    def length(self) -> int:
        return self.position[0].length


@dataclasses.dataclass
class GeneratorOutput:
    """Teacher-forced outputs of :meth:`Generator.logits`."""

    position_logits: Tensor        # [R, S, position_vocab]
    content_logits: list[Tensor]   # K tensors [M, V_j] at the M tokens whose next token is a code
    content_mask: Tensor           # bool [R, S]: where those M tokens are
    targets: Targets
    content_rows: Tensor           # int64 [M]: flat indices (row * S + col, ascending) of those M tokens


class Generator(nn.Module, PretrainedMixin):
    """The stacked coarse-to-fine generator. See the module docstring for the equations."""

    config_class = GeneratorConfig

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        self.spec = config.spec
        dim = config.dim
        self.position_embed = nn.Embedding(self.spec.position_input_vocab, dim)
        self.content_embed = nn.ModuleList(nn.Embedding(size + 1, dim) for size in config.codebook_sizes)
        self.class_embed = nn.Embedding(config.num_classes + 1, dim)
        stack = dict(heads=config.heads, mlp_ratio=config.mlp_ratio, dropout=config.dropout, rope=config.rope,
                     rope_base=config.rope_base)
        self.position_stack = Transformer(dim, config.position_depth, **stack)
        self.content_stack = Transformer(dim, config.content_depth, **stack)
        self.position_head = None if config.tie_embeddings else nn.Linear(dim, self.spec.position_vocab, bias=False)
        self.content_head = FactorizedHead(dim, config.head_dim, config.head_depth, config.head_heads,
                                           list(config.codebook_sizes), config.mlp_ratio, config.dropout,
                                           config.tie_embeddings)
        self.register_buffer("free_positions", self.spec.free_positions(), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    # --- pieces shared by training and the incremental samplers -------------------------------------------

    def embed_inputs(self, position: Tensor, content: Tensor, label: Tensor) -> Tensor:
        """Position-stack inputs ``[B, T, D]`` from position ids ``[B, T]``, sub-codes ``[B, T, K]``, labels ``[B, T]``."""
        x = self.position_embed(position)
        for j, embed in enumerate(self.content_embed):
            x = x + embed(content[..., j])
        is_bos = (position == self.spec.bos)[..., None]
        return x + self.class_embed(label) * is_bos

    def position_logits(self, hidden: Tensor) -> Tensor:
        """``[..., D] -> [..., position_vocab]``."""
        if self.position_head is not None:
            return self.position_head(hidden)
        return F.linear(hidden, self.position_embed.weight[: self.spec.position_vocab])

    def position_hidden(self, inputs: Tensor, index: Tensor, mask: Optional[Tensor] = None,
                        caches: Optional[list[KVCache]] = None) -> Tensor:
        return self.position_stack(inputs, index, mask, caches)

    def content_hidden(self, position_hidden: Tensor, next_position: Tensor, index: Tensor,
                       mask: Optional[Tensor] = None, caches: Optional[list[KVCache]] = None) -> Tensor:
        """Content stack over ``h_t + E_pos(P_{t+1})``: ``[B, T, D]``, next ids ``[B, T]`` -> ``[B, T, D]``."""
        return self.content_stack(position_hidden + self.position_embed(next_position), index, mask, caches)

    def new_cache(self, batch: int, max_len: int) -> GeneratorCache:
        like = self.position_embed.weight
        return GeneratorCache(self.position_stack.new_caches(batch, max_len, like),
                              self.content_stack.new_caches(batch, max_len, like))

    # --- training ------------------------------------------------------------------------------------------

    def drop_labels(self, label: Tensor) -> Tensor:
        """Replace labels by the null class with probability ``class_dropout`` (training only)."""
        if not self.training or self.config.class_dropout == 0.0:
            return label
        drop = torch.rand(label.shape, device=label.device) < self.config.class_dropout
        return torch.where(drop, torch.full_like(label, self.config.null_class), label)

    def logits(self, batch: PackedBatch, mask: Optional[Tensor] = None) -> GeneratorOutput:
        """Teacher-forced logits of a packed batch. ``mask`` defaults to ``batch.attention_mask()``.

        The content rows come from ``batch.content_rows`` (set by ``pack`` on the host), so this needs no
        device->host sync; a batch without them derives them here (one sync on GPU).
        """
        targets = next_token_targets(self.spec, batch)
        mask = batch.attention_mask() if mask is None else mask
        inputs = self.embed_inputs(batch.position, batch.content, self.drop_labels(batch.label))
        hidden = self.position_hidden(inputs, batch.index, mask)
        content = self.content_hidden(hidden, targets.next_position, batch.index, mask)
        rows = batch.content_rows if batch.content_rows is not None else content_target_rows(self.spec, batch)
        rows = rows.to(content.device)
        content_logits = self.content_head(content.flatten(0, 1).index_select(0, rows),
                                           targets.content.flatten(0, 1).index_select(0, rows))
        return GeneratorOutput(self.position_logits(hidden), content_logits, targets.content[..., 0] != IGNORE,
                               targets, rows)

    def forward(self, batch: PackedBatch, mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Losses and accuracies: ``loss = CE(position) + mean_j CE(sub-code j)``.

        The position CE is over the ids allowed at the target's level (region openings and its end
        marker) and only where the position is a free choice; forced positions carry no loss.
        """
        out = self.logits(batch, mask)
        metrics = self.position_metrics(out.position_logits, out.targets.position)
        content_target = out.targets.content.flatten(0, 1).index_select(0, out.content_rows)
        content_losses = []
        for j, logits in enumerate(out.content_logits):
            content_losses.append(F.cross_entropy(logits.float(), content_target[:, j]))
            metrics[f"content/{j}"] = content_losses[-1]
            metrics[f"accuracy/content/{j}"] = (logits.argmax(-1) == content_target[:, j]).float().mean()
        metrics["content"] = torch.stack(content_losses).mean()
        metrics["loss"] = metrics["position"] + metrics["content"]
        return metrics

    def position_metrics(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Position CE and accuracy over the free choices, without device->host syncs.

        logits ``[R, S, position_vocab]``, target ``[R, S]`` (IGNORE where forced). Each scored token's
        logits are restricted to the ids free at its target's level; the mean is over scored tokens
        (loss 0 and accuracy 1 when there are none).
        """
        scored = target != IGNORE
        # Only scored rows are masked: an ignored row could have no free id left, and an all -inf row
        # gives NaN gradients even when its loss is ignored.
        forbidden = ~self.free_positions[self.spec.position_level(target)] & scored[..., None]
        logits = logits.masked_fill(forbidden, float("-inf")).float()
        count = scored.sum().clamp(min=1)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
        hits = ((logits.argmax(-1) == target) & scored).sum()
        accuracy = torch.where(scored.any(), hits / count, torch.ones((), device=target.device))
        return {"position": loss / count, "accuracy/position": accuracy}

    def num_parameters(self) -> int:
        """Parameters counted once (tied tables included once)."""
        return sum(p.numel() for p in self.parameters())
