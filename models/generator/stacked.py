"""DQ-Transformer with FAR factorized heads: stacked position + content transformers over token sequences.

For token ``t`` of a sequence (:mod:`models.generator.sequence`) with position id ``P_t`` and sub-codes
``X_t = (x_t^0 .. x_t^{K-1})``:

- position stack input ``u_t = E_pos(P_t) + sum_j E_content^j(x_t^j)`` (+ ``E_class(y)`` at BOS);
  ``h_t = PositionStack(u_<=t)``; position logits ``W_pos h_t`` predict ``P_{t+1}``.
- content stack input ``v_t = h_t + N(E_pos(P_{t+1}))`` (the position being filled next; ``N`` an RMSNorm
  with ``next_position_norm``, so the signal starts as strong as the normalised ``h_t``, else identity);
  ``c_t = ContentStack(v_<=t)``.
- factorized head: a small causal transformer over ``K`` slots; slot ``j`` sees ``c_t`` and
  ``x_{t+1}^{<j}`` and predicts ``x_{t+1}^j``. With ``head_slot_tokens`` (FAR) slot 0 is ``A c_t`` and slot
  ``j > 0`` is the previous sub-code's embedding ``e_{j-1}(x^{j-1})``, each its own token; otherwise every
  slot is ``A c_t + e_{j-1}(x^{j-1})``.

RoPE (``rope``) rotates by the token index within the sequence, or (``rope_2d``) by the ``(y, x)`` centre of
the token's cell on the finest grid; the tables are computed once per forward and shared by both stacks.
With ``zero_init`` the output projections of every residual branch start at zero.

Training loss (``valid_set_loss``): the position softmax of every free choice is normalised over exactly
the ids the sampler allows there (:func:`~models.generator.sequence.valid_choices`); choices with a single
legal id carry no loss. Without it, over every opening of the level and its end marker.

``E_pos`` has separate rows per level (one table, level offsets); ``E_content^j`` is one table per
sub-codebook shared by all levels. With ``tie_embeddings`` the position logits reuse ``E_pos`` and
the head's sub-code outputs reuse its sub-code input tables.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ConfigBase, ConfigError
from models.generator.layers import KVCache, RMSNorm, Rotary, Transformer, rope_tables, rope_tables_2d
from models.generator.sequence import (IGNORE, PackedBatch, SequenceSpec, Targets, content_target_rows,
                                       next_token_targets, valid_choices)
from models.hub import PretrainedMixin


@dataclasses.dataclass
class GeneratorConfig(ConfigBase):
    """Architecture of the stacked generator (the ``model:`` section of a generator stage config)."""

    yaml_section = "model"   # from_yaml reads the model section of a stage config

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
    rope_2d: bool = False                  # with rope: rotate by the (y, x) of the token's cell instead
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    next_position_norm: bool = False       # RMSNorm on E_pos(P_{t+1}) before it joins h_t
    head_slot_tokens: bool = False         # FAR head: context and previous sub-codes as separate slot tokens
    zero_init: bool = False                # zero-init the residual output projections
    valid_set_loss: bool = True            # normalise the position loss over the sampler's legal ids
    loss_chunk: int = 4096                 # content-head rows per chunk of the fused linear + cross-entropy

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
        if self.rope and (self.dim // self.heads) % (4 if self.rope_2d else 2):
            raise ConfigError(f"model.rope{'_2d' if self.rope_2d else ''} needs a head width divisible by "
                              f"{4 if self.rope_2d else 2}, got dim/heads = {self.dim // self.heads}")
        if self.loss_chunk < 1:
            raise ConfigError(f"model.loss_chunk must be >= 1, got {self.loss_chunk}")
        if min(self.position_depth, self.content_depth, self.head_depth) < 1:
            raise ConfigError("model.position_depth, content_depth and head_depth must be >= 1")
        for name in ("dropout", "class_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def spec(self) -> SequenceSpec:
        return SequenceSpec(self.num_levels, tuple(self.grain_shape), tuple(self.codebook_sizes))

    @property
    def null_class(self) -> int:
        return self.num_classes


class FactorizedHead(nn.Module):
    """FAR-style head: predicts the ``K`` sub-codes of one code one after another.

    Slot ``j`` input: ``A c + s_j + e_{j-1}(x^{j-1})`` (no code term at slot 0), or with ``slot_tokens``
    ``A c + s_0`` at slot 0 and ``e_{j-1}(x^{j-1}) + s_j`` at slot ``j > 0``; a causal transformer over the
    slots; slot ``j`` output -> logits over sub-codebook ``j``.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, codebook_sizes: list[int],
                 mlp_ratio: float, dropout: float, tie: bool, slot_tokens: bool = False):
        super().__init__()
        self.slot_tokens = slot_tokens
        self.input = nn.Linear(in_dim, dim, bias=False)
        self.slot_embed = nn.Parameter(torch.randn(len(codebook_sizes), dim) * 0.02)
        self.code_embed = nn.ModuleList(nn.Embedding(size, dim) for size in codebook_sizes)
        self.stack = Transformer(dim, depth, heads, mlp_ratio, dropout)
        self.out = nn.ModuleList(nn.Linear(dim, size, bias=False) for size in codebook_sizes)
        if tie:
            for out, embed in zip(self.out, self.code_embed):
                out.weight = embed.weight

    def slot_inputs(self, context: Tensor, codes: Tensor) -> Tensor:
        """context ``[N, in_dim]``, teacher sub-codes ``[N, K']`` -> slot inputs ``[N, K' + 1 (<= K), dim]``."""
        slots = codes.shape[1] + 1
        projected = self.input(context)
        previous = [self.code_embed[j](codes[:, j]) for j in range(codes.shape[1])]
        if self.slot_tokens:
            return torch.stack([projected] + previous, 1) + self.slot_embed[:slots]
        return projected[:, None] + self.slot_embed[:slots] + torch.stack([torch.zeros_like(projected)] + previous, 1)

    def hidden(self, context: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced slot outputs: context ``[N, in_dim]``, codes ``[N, K]`` -> ``[N, K, dim]``."""
        return self.stack(self.slot_inputs(context, codes[:, :-1]))

    def forward(self, context: Tensor, codes: Tensor) -> list[Tensor]:
        """Teacher-forced logits: context ``[N, in_dim]``, codes ``[N, K]`` -> ``K`` tensors ``[N, V_j]``."""
        hidden = self.hidden(context, codes)
        return [out(hidden[:, j]) for j, out in enumerate(self.out)]

    def new_caches(self, batch: int, like: Tensor, full_length: bool = False) -> list[KVCache]:
        """KV caches of the slot stack (``K`` slots); ``full_length`` as :class:`~models.generator.layers.KVCache`."""
        return self.stack.new_caches(batch, len(self.out), like, full_length)

    def step(self, context: Tensor, previous: Optional[Tensor], slot: int, caches: list[KVCache]) -> Tensor:
        """Incremental logits ``[N, V_slot]`` given sub-code ``slot - 1`` (``previous [N]``, None at slot 0)."""
        if self.slot_tokens:
            x = self.input(context) if previous is None else self.code_embed[slot - 1](previous)
        else:
            x = self.input(context)
            if previous is not None:
                x = x + self.code_embed[slot - 1](previous)
        x = x + self.slot_embed[slot]
        return self.out[slot](self.stack(x[:, None], caches=caches)[:, 0])


@dataclasses.dataclass
class GeneratorCache:
    """KV caches of both stacks for incremental decoding."""

    position: list[KVCache]
    content: list[KVCache]

    def token_index(self, like: Tensor) -> Tensor:
        """int64 shaped like ``like``: the in-sequence index of the next token (= tokens decoded so far)."""
        return self.position[0].token_index(like)


@dataclasses.dataclass
class GeneratorOutput:
    """Teacher-forced outputs of :meth:`Generator.logits`."""

    position_logits: Tensor        # [R, S, position_vocab]
    content_logits: list[Tensor]   # K tensors [M, V_j] at the M tokens whose next token is a code
    content_mask: Tensor           # bool [R, S]: where those M tokens are
    targets: Targets
    content_rows: Tensor           # int64 [M]: flat indices (row * S + col, ascending) of those M tokens


@dataclasses.dataclass
class TokenScores:
    """Per-token log-likelihoods of the next token under teacher forcing (what the losses average)."""

    position: Tensor           # float32 [R, S]: log-prob of the next position where scored, else 0
    position_scored: Tensor    # bool [R, S]: a free choice with more than one legal id
    position_hit: Tensor       # bool [R, S]: scored and the argmax over the legal ids is the target
    content: Tensor            # float32 [M, K]: log-prob of every sub-code of the M next code tokens
    content_hit: Tensor        # bool [M, K]
    content_rows: Tensor       # int64 [M]: flat indices of those tokens (row * S + col)


def chunked_cross_entropy(hidden: Tensor, out: nn.Module, target: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Fused linear + cross-entropy over row chunks: ``(loss float32 [N], hit bool [N])``.

    hidden ``[N, D]``, ``out`` a linear ``D -> V``, target int64 ``[N]``. With gradients on, every chunk is
    checkpointed, so at most one ``[chunk, V]`` logit block exists at a time (forward and backward).
    """
    def piece(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        logits = out(h).float()
        return F.cross_entropy(logits, t, reduction="none"), logits.argmax(-1) == t

    losses, hits = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], target[start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            loss, hit = torch.utils.checkpoint.checkpoint(piece, h, t, use_reentrant=False)
        else:
            loss, hit = piece(h, t)
        losses.append(loss)
        hits.append(hit)
    if not losses:
        return hidden.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return torch.cat(losses), torch.cat(hits)


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
        stack = dict(heads=config.heads, mlp_ratio=config.mlp_ratio, dropout=config.dropout)
        self.position_stack = Transformer(dim, config.position_depth, **stack)
        self.content_stack = Transformer(dim, config.content_depth, **stack)
        self.next_position_norm = RMSNorm(dim) if config.next_position_norm else None
        self.position_head = None if config.tie_embeddings else nn.Linear(dim, self.spec.position_vocab, bias=False)
        self.content_head = FactorizedHead(dim, config.head_dim, config.head_depth, config.head_heads,
                                           list(config.codebook_sizes), config.mlp_ratio, config.dropout,
                                           config.tie_embeddings, config.head_slot_tokens)
        self.register_buffer("choice_ids", self.spec.choice_ids(), persistent=False)
        self.apply(self._init_weights)
        if config.zero_init:
            for transformer in (self.position_stack, self.content_stack, self.content_head.stack):
                transformer.zero_init_outputs()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    # --- pieces shared by training and the incremental samplers -------------------------------------------

    def embed_inputs(self, position: Tensor, content: Tensor, label: Tensor) -> Tensor:
        """Position-stack inputs ``[B, T, D]`` from position ids ``[B, T]``, sub-codes ``[B, T, K]`` and
        labels ``[B, T]``."""
        x = self.position_embed(position)
        for j, embed in enumerate(self.content_embed):
            x = x + embed(content[..., j])
        is_bos = (position == self.spec.bos)[..., None]
        return x + self.class_embed(label) * is_bos

    def rotary(self, position: Tensor, index: Tensor) -> Optional[Rotary]:
        """RoPE tables of tokens with position ids and in-sequence indices ``[B, T]`` (None without RoPE)."""
        config = self.config
        if not config.rope:
            return None
        head_dim = config.dim // config.heads
        if config.rope_2d:
            y, x = self.spec.finest_coordinates(position)
            return rope_tables_2d(y, x, head_dim, config.rope_base)
        return rope_tables(index, head_dim, config.rope_base)

    def position_logits(self, hidden: Tensor) -> Tensor:
        """``[..., D] -> [..., position_vocab]``."""
        if self.position_head is not None:
            return self.position_head(hidden)
        return F.linear(hidden, self.position_embed.weight[: self.spec.position_vocab])

    def position_hidden(self, inputs: Tensor, rope: Optional[Rotary], mask=None,
                        caches: Optional[list[KVCache]] = None) -> Tensor:
        return self.position_stack(inputs, rope, mask, caches)

    def content_hidden(self, position_hidden: Tensor, next_position: Tensor, rope: Optional[Rotary],
                       mask=None, caches: Optional[list[KVCache]] = None) -> Tensor:
        """Content stack over ``h_t + N(E_pos(P_{t+1}))``: ``[B, T, D]``, next ids ``[B, T]`` -> ``[B, T, D]``."""
        next_embed = self.position_embed(next_position)
        if self.next_position_norm is not None:
            next_embed = self.next_position_norm(next_embed)
        return self.content_stack(position_hidden + next_embed, rope, mask, caches)

    def new_cache(self, batch: int, max_len: int, full_length: bool = False) -> GeneratorCache:
        """Empty KV caches of both stacks; ``full_length`` as :class:`~models.generator.layers.KVCache`."""
        like = self.position_embed.weight
        return GeneratorCache(self.position_stack.new_caches(batch, max_len, like, full_length),
                              self.content_stack.new_caches(batch, max_len, like, full_length))

    # --- training ------------------------------------------------------------------------------------------

    def drop_labels(self, label: Tensor) -> Tensor:
        """Replace labels by the null class with probability ``class_dropout`` (training only)."""
        if not self.training or self.config.class_dropout == 0.0:
            return label
        drop = torch.rand(label.shape, device=label.device) < self.config.class_dropout
        return torch.where(drop, torch.full_like(label, self.config.null_class), label)

    def _stacks(self, batch: PackedBatch, mask) -> tuple[Targets, Tensor, Tensor, Tensor]:
        """(targets, position hidden ``[R, S, D]``, content-stack context ``[M, D]``, content rows ``[M]``).

        ``mask`` defaults to ``batch.document_mask()``; a dense bool ``[R, 1, S, S]`` mask selects the
        reference SDPA path. The content rows come from ``batch.content_rows`` (set by ``pack`` on the
        host), so this needs no device->host sync; a batch without them derives them here.
        """
        targets = next_token_targets(self.spec, batch)
        mask = batch.document_mask() if mask is None else mask
        rope = self.rotary(batch.position, batch.index)
        inputs = self.embed_inputs(batch.position, batch.content, self.drop_labels(batch.label))
        hidden = self.position_hidden(inputs, rope, mask)
        content = self.content_hidden(hidden, targets.next_position, rope, mask)
        rows = batch.content_rows if batch.content_rows is not None else content_target_rows(self.spec, batch)
        rows = rows.to(content.device)
        return targets, hidden, content.flatten(0, 1).index_select(0, rows), rows

    def logits(self, batch: PackedBatch, mask=None) -> GeneratorOutput:
        """Teacher-forced logits of a packed batch (all of them; the losses use :meth:`scores`)."""
        targets, hidden, context, rows = self._stacks(batch, mask)
        content_logits = self.content_head(context, targets.content.flatten(0, 1).index_select(0, rows))
        return GeneratorOutput(self.position_logits(hidden), content_logits, targets.content[..., 0] != IGNORE,
                               targets, rows)

    def scores(self, batch: PackedBatch, mask=None) -> TokenScores:
        """Per-token log-likelihoods of a packed batch (no device->host sync; content logits in chunks)."""
        targets, hidden, context, rows = self._stacks(batch, mask)
        position, scored, hit = self.position_scores(self.position_logits(hidden), targets, batch)
        content_target = targets.content.flatten(0, 1).index_select(0, rows)
        head = self.content_head.hidden(context, content_target)
        pieces = [chunked_cross_entropy(head[:, j], out, content_target[:, j], self.config.loss_chunk)
                  for j, out in enumerate(self.content_head.out)]
        content = -torch.stack([loss for loss, _ in pieces], 1)
        content_hit = torch.stack([h for _, h in pieces], 1)
        return TokenScores(position, scored, hit, content, content_hit, rows)

    def forward(self, batch: PackedBatch, mask=None) -> dict[str, Tensor]:
        """Losses and accuracies: ``loss = CE(position) + mean_j CE(sub-code j)``.

        The position CE is the mean over the scored free choices (module docstring), the sub-code CEs the
        mean over the tokens whose next token is a code.
        """
        scores = self.scores(batch, mask)
        count = scores.position_scored.sum().clamp(min=1)
        metrics = {"position": -scores.position.sum() / count,
                   "accuracy/position": torch.where(scores.position_scored.any(), scores.position_hit.sum() / count,
                                                    torch.ones((), device=count.device))}
        for j in range(self.spec.num_subcodes):
            metrics[f"content/{j}"] = -scores.content[:, j].mean()
            metrics[f"accuracy/content/{j}"] = scores.content_hit[:, j].float().mean()
        metrics["content"] = -scores.content.mean(0).mean()
        metrics["loss"] = metrics["position"] + metrics["content"]
        return metrics

    @torch.no_grad()
    def log_likelihood(self, batch: PackedBatch) -> Tensor:
        """float32 ``[B]``: log-likelihood of every sequence (document id order) under teacher forcing.

        Sums the scored position log-probs and all sub-code log-probs of each sequence (one host sync).
        """
        scores = self.scores(batch)
        per_token = scores.position.flatten().index_add(0, scores.content_rows, scores.content.sum(1))
        doc = batch.doc.flatten()
        valid = doc >= 0
        return torch.zeros(int(doc.max()) + 1, device=doc.device).index_add(0, doc[valid], per_token[valid])

    def position_scores(self, logits: Tensor, targets: Targets, batch: PackedBatch) -> tuple[Tensor, Tensor, Tensor]:
        """``(log-prob [R, S], scored [R, S], hit [R, S])`` of the next position at the free choices.

        logits ``[R, S, position_vocab]``. The softmax runs over the ids gathered from ``choice_ids`` at the
        target's level (every region opening, then the end marker), restricted to the sampler's legal ids
        with ``valid_set_loss`` (then a choice with one legal id is not scored). Never an all ``-inf`` row:
        the end marker is always allowed, so no NaN gradient reaches ignored tokens.
        """
        spec, target = self.spec, targets.position
        free = target != IGNORE
        level = spec.position_level(target.clamp(min=0))
        choice_logits = logits.gather(-1, self.choice_ids[level]).float()   # [R, S, regions + 1]
        if self.config.valid_set_loss:
            regions = valid_choices(spec, batch)
            allowed = torch.cat([regions, torch.ones_like(regions[..., :1])], -1)
            choice_logits = choice_logits.masked_fill(~allowed, float("-inf"))
            scored = free & regions.any(-1)
        else:
            scored = free
        slot = torch.where(target >= spec.num_cells, torch.full_like(target, spec.num_regions),
                           spec.position_region(target.clamp(0, spec.num_cells - 1)))
        log_prob = choice_logits.log_softmax(-1).gather(-1, slot[..., None])[..., 0]
        hit = scored & (choice_logits.argmax(-1) == slot)
        return torch.where(scored, log_prob, torch.zeros_like(log_prob)), scored, hit

    def num_parameters(self) -> int:
        """Parameters counted once (tied tables included once)."""
        return sum(p.numel() for p in self.parameters())
