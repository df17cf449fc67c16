"""Constrained, KV-cached sampling from a :class:`~models.generator.stacked.Generator`.

Each step feeds one token per sequence (all sequences in lock step) to the position stack, draws the
next position under the validity rule, feeds ``h_t + E_pos(P_{t+1})`` to the content stack and, when
``P_{t+1}`` is a cell, draws its ``K`` sub-codes one after another from the factorized head.

**Validity rule** (every sample is a valid code map). Per sequence the sampler tracks the current level,
the regions already taken at any level, the last region opened at this level and the cells still owed
to the open region:

1. while a region is open, its next cell (region-grouped raster order) is forced;
2. at a level ``g < G - 1`` the model picks, among regions not yet taken and *after* the last region it
   opened at this level (regions are ordered by raster index, as in training), the top-left cell of
   one, or EOL_g; with no region left EOL_g is forced;
3. at the finest level every remaining region is coded in raster order (positions forced, only
   contents sampled), then END.

So each coarsest region is covered exactly once, at exactly one level, by all of its ``4^g`` cells.

Guidance: with ``cfg_scale`` set, a second (null-class) copy of every sequence runs alongside and
logits become ``cond + (scale - 1) (cond - uncond)`` for every sub-code and (``cfg_positions``, default)
the positions, optionally only while the token being predicted lies in the levels
``cfg_interval = (first, last)``. ``cfg_schedule="linear"`` ramps the scale from 1 to ``cfg_scale`` with
the fraction of coarsest regions already opened (0 at the first token, 1 when the map is covered).

Teacher forcing (``teacher=``): the given token streams replace the draws and the result carries the
log-probability of every stream under exactly the sampler's legality masks and filters; training's
:meth:`~models.generator.stacked.Generator.log_likelihood` equals it (tested).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from models.generator.sequence import FlatSequences, SequenceSpec, decode_sequences
from models.generator.layers import Rotary
from models.generator.stacked import Generator, GeneratorCache


@dataclasses.dataclass(frozen=True)
class TokenFilter:
    """Temperature (0 = greedy), top-k (0 = off) and top-p (1 = off) for one kind of token."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"invalid sampling filter {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


def filter_logits(logits: Tensor, allowed: Optional[Tensor], token_filter: TokenFilter) -> Tensor:
    """Float32 ``[B, V]`` logits divided by the temperature, ``-inf`` outside ``allowed``, top-k, top-p."""
    logits = logits.float()
    if token_filter.temperature not in (0.0, 1.0):
        logits = logits / token_filter.temperature
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if 0 < token_filter.top_k < logits.shape[-1]:
        kth = logits.topk(token_filter.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if token_filter.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        beyond = (probs.cumsum(-1) - probs) > token_filter.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(beyond, float("-inf")))
    return logits


def draw(filtered: Tensor, token_filter: TokenFilter, generator: Optional[torch.Generator]) -> Tensor:
    """One id per row ``[B]`` from ``[B, V]`` logits already passed through :func:`filter_logits`."""
    if token_filter.temperature == 0:
        return filtered.argmax(-1)
    return torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(1)


def chosen_log_prob(filtered: Tensor, chosen: Tensor) -> Tensor:
    """float32 ``[B]``: log-probability of ``chosen [B]`` under the filtered logits ``[B, V]``."""
    return filtered.log_softmax(-1).gather(1, chosen[:, None])[:, 0]


class ValidityRule:
    """State of the validity rule (module docstring) for ``B`` sequences being sampled."""

    def __init__(self, spec: SequenceSpec, batch: int, device: torch.device):
        self.spec = spec
        regions = spec.num_regions
        self.region_ids = torch.arange(regions, device=device)
        self.openings = spec.choice_ids(device)[:, :-1]   # [G, R]: the top-left cell of every region per level
        self.rows = torch.arange(batch, device=device)
        self.taken = torch.zeros(batch, regions, dtype=torch.bool, device=device)
        self.level = torch.zeros(batch, dtype=torch.long, device=device)
        self.last_region = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.region = torch.zeros(batch, dtype=torch.long, device=device)
        self.remaining = torch.zeros(batch, dtype=torch.long, device=device)   # cells owed to the open region
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)

    def allowed(self) -> Tensor:
        """bool ``[B, position_vocab]``: the ids the next position may take."""
        spec, batch = self.spec, self.rows.numel()
        candidates = ~self.taken & (self.region_ids > self.last_region[:, None])
        openings = self.openings[self.level]
        in_region = self.remaining > 0
        free = ~self.done & ~in_region & (self.level < spec.num_levels - 1)
        allowed = torch.zeros(batch, spec.position_vocab, dtype=torch.bool, device=self.rows.device)
        allowed.scatter_(1, openings, candidates & free[:, None])
        allowed[self.rows, spec.num_cells + self.level] |= free
        has_region = candidates.any(1)
        first_opening = openings[self.rows, candidates.int().argmax(1)]
        next_cell = spec.cell_position(self.level, self.region, (1 << (2 * self.level)) - self.remaining)
        forced = torch.where(in_region, next_cell,
                             torch.where(has_region, first_opening, spec.num_cells + self.level))
        forced = torch.where(self.done, torch.full_like(forced, spec.end), forced)
        forced_slot = forced[:, None]   # a scatter, not boolean indexing: no host sync
        return allowed.scatter(1, forced_slot, allowed.gather(1, forced_slot) | ~free[:, None])

    def advance(self, position: Tensor) -> None:
        """Update the state with the drawn positions ``[B]``."""
        spec = self.spec
        active = ~self.done
        is_cell = active & (position < spec.num_cells)
        opening = is_cell & (self.remaining == 0)
        region = spec.position_region(position.clamp(max=spec.num_cells - 1))
        region_slot = region[:, None]
        self.taken.scatter_(1, region_slot, self.taken.gather(1, region_slot) | opening[:, None])
        self.region = torch.where(opening, region, self.region)
        self.last_region = torch.where(opening, region, self.last_region)
        owed = (1 << (2 * self.level)) - 1
        self.remaining = torch.where(opening, owed, torch.where(is_cell, self.remaining - 1, self.remaining))
        closing = active & ~is_cell
        self.done = self.done | (closing & (position == spec.end))
        self.level = torch.where(closing & ~self.done, self.level + 1, self.level)
        self.last_region = torch.where(closing, torch.full_like(self.last_region, -1), self.last_region)


class CachedDecoder:
    """Runs both stacks one token at a time over preallocated KV caches (the RoPE tables of a step serve both
    stacks) and owns the content head's caches.

    ``compile=True`` (the default on a GPU) compiles the two steps and the content-head step with fixed shapes
    (``torch.compile(dynamic=False)``; on a GPU ``mode="reduce-overhead"`` captures them as CUDA graphs). The
    caches then run full length: every step attends over all ``max_len`` slots under a validity mask and reads
    the decoded length from the device, so no step depends on a host-side integer. Eagerly (``compile=False``,
    the default elsewhere) they attend over their filled prefix, counted on the host: half the attention work
    of a whole sequence, and no mask (:class:`~models.generator.layers.KVCache`).
    """

    def __init__(self, model: Generator, batch: int, max_len: int, compile: Optional[bool] = None):
        self.model = model
        device = model.position_embed.weight.device
        self.compiled = compile if compile is not None else device.type == "cuda"
        self.cache: GeneratorCache = model.new_cache(batch, max_len, full_length=self.compiled)
        self.head_caches = model.content_head.new_caches(batch, model.position_embed.weight, self.compiled)
        self.rope = None
        self.head_step = model.content_head.step
        if self.compiled:
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            self._position = torch.compile(self._position, mode=mode, dynamic=False)
            self._content = torch.compile(self._content, mode=mode, dynamic=False)
            self.head_step = torch.compile(self.head_step, mode=mode, dynamic=False)

    def _position(self, inputs: Tensor, position: Tensor) -> tuple[Tensor, Optional[Rotary]]:
        rope = self.model.rotary(position[:, None], self.cache.token_index(position[:, None]))
        return self.model.position_hidden(inputs, rope, caches=self.cache.position)[:, 0], rope

    def _content(self, hidden: Tensor, next_position: Tensor, rope: Optional[Rotary]) -> Tensor:
        return self.model.content_hidden(hidden[:, None], next_position[:, None], rope,
                                         caches=self.cache.content)[:, 0]

    def position(self, inputs: Tensor, position: Tensor) -> Tensor:
        """inputs ``[B, 1, D]`` of token t with position id ``P_t [B]`` -> ``h_t [B, D]``."""
        hidden, self.rope = self._position(inputs, position)
        return hidden

    def content(self, hidden: Tensor, next_position: Tensor) -> Tensor:
        """``h_t [B, D]``, ``P_{t+1} [B]`` -> ``c_t [B, D]``."""
        return self._content(hidden, next_position, self.rope)


class RecomputeDecoder:
    """Reference decoder: re-runs both stacks over the whole prefix at every step (no cache; the content head,
    ``K`` slots, still decodes incrementally)."""

    def __init__(self, model: Generator, batch: int):
        self.model = model
        self.head_caches = model.content_head.new_caches(batch, model.position_embed.weight)
        self.inputs: list[Tensor] = []
        self.positions: list[Tensor] = []
        self.next_positions: list[Tensor] = []
        self.hidden: Optional[Tensor] = None
        self.rope = None
        self.head_step = model.content_head.step

    def position(self, inputs: Tensor, position: Tensor) -> Tensor:
        self.inputs.append(inputs)
        self.positions.append(position[:, None])
        prefix, positions = torch.cat(self.inputs, dim=1), torch.cat(self.positions, dim=1)
        index = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        self.rope = self.model.rotary(positions, index)
        self.hidden = self.model.position_hidden(prefix, self.rope)
        return self.hidden[:, -1]

    def content(self, hidden: Tensor, next_position: Tensor) -> Tensor:
        self.next_positions.append(next_position[:, None])
        nexts = torch.cat(self.next_positions, dim=1)
        return self.model.content_hidden(self.hidden, nexts, self.rope)[:, -1]


@dataclasses.dataclass
class SampledTokens:
    """Token streams of ``B`` sequences sampled in lock step (BOS first; after END the rows repeat END)."""

    position: Tensor   # int64 [B, T]
    content: Tensor    # int64 [B, T, K]
    done: Tensor       # bool [B]: reached END
    log_prob: Tensor   # float32 [B]: log-probability of each stream under the sampler's masks and filters

    def sequences(self, spec: SequenceSpec) -> FlatSequences:
        """The finished sequences, cut after their END token."""
        if not bool(self.done.all()):
            raise ValueError("some sequences did not reach END; sample without max_steps")
        lengths = (self.position == spec.end).int().argmax(1) + 1
        keep = torch.arange(self.position.shape[1], device=lengths.device) < lengths[:, None]
        doc = torch.arange(lengths.numel(), device=lengths.device)[:, None].expand_as(keep)
        return FlatSequences(self.position[keep], self.content[keep], doc[keep], lengths.long())


CFG_SCHEDULES = ("constant", "linear")


@torch.no_grad()
def generate_tokens(model: Generator, labels: Tensor, *, position: TokenFilter = TokenFilter(),
                    content: TokenFilter = TokenFilter(), cfg_scale: Optional[float] = None,
                    cfg_interval: Optional[tuple[int, int]] = None, cfg_positions: bool = True,
                    cfg_schedule: str = "constant", generator: Optional[torch.Generator] = None,
                    use_cache: bool = True, max_steps: Optional[int] = None,
                    teacher: Optional[tuple[Tensor, Tensor]] = None, check_done_every: int = 8,
                    compile: Optional[bool] = None) -> SampledTokens:
    """Sample token streams for class ``labels [B]`` (the null class id ``num_classes`` for unconditional).

    ``position`` / ``content``: the filters of position and sub-code draws. Guidance options as the module
    docstring. ``use_cache=False`` selects the reference decoder that recomputes the prefix every step (for
    benchmarks); ``max_steps`` stops early (the result then holds unfinished sequences). ``teacher``:
    ``(position [B, T], content [B, T, K])`` streams (BOS first, END-padded) to score instead of drawing.

    The loop reads nothing back from the device except whether all rows are done, every ``check_done_every``
    steps (finished rows repeat END meanwhile; the result is cut to the longest row, so the streams do not
    depend on it). ``compile``: capture / compile the cached decode steps (default: on a GPU), see
    :class:`CachedDecoder`.
    """
    if check_done_every < 1:
        raise ValueError(f"check_done_every must be >= 1, got {check_done_every}")
    spec, config = model.spec, model.config
    device = model.position_embed.weight.device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() == 0 or labels.min() < 0 or labels.max() > config.num_classes:
        raise ValueError(f"labels must lie in 0..{config.num_classes} (the last is the null class), "
                         f"got {labels.tolist()}")
    guided = cfg_scale is not None
    if guided and config.num_classes == 0:
        raise ValueError("cfg_scale needs a class-conditional model (num_classes > 0)")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    batch = labels.numel()
    rows = 2 * batch if guided else batch
    row_labels = torch.cat([labels, torch.full_like(labels, config.null_class)]) if guided else labels

    def both(x: Tensor) -> Tensor:
        return torch.cat([x, x]) if guided else x

    def guide(logits: Tensor, scale: float | Tensor | None) -> Tensor:
        """Guided logits of the first half of the rows; ``scale``: one for all rows or ``[B, 1]`` (None: no
        guidance for this token)."""
        if not guided:
            return logits
        cond, uncond = logits.chunk(2)
        return cond if scale is None else cond + (scale - 1.0) * (cond - uncond)

    was_training = model.training
    model.eval()
    rule = ValidityRule(spec, batch, device)
    steps = spec.max_length - 1 if max_steps is None else min(max_steps, spec.max_length - 1)
    if teacher is not None:
        teacher_position, teacher_content = (t.to(device) for t in teacher)
        steps = min(steps, teacher_position.shape[1] - 1)
    decoder = CachedDecoder(model, rows, spec.max_length, compile) if use_cache else RecomputeDecoder(model, rows)
    head_caches = decoder.head_caches
    none = spec.none_content.to(device).expand(batch, -1)
    token_position = torch.full((batch,), spec.bos, dtype=torch.long, device=device)
    token_content = none
    positions, contents = [token_position], [token_content]
    log_prob = torch.zeros(batch, device=device)
    first, last = cfg_interval if cfg_interval is not None else (0, spec.num_levels - 1)
    constant_scale = cfg_schedule == "constant" and first <= 0 and last >= spec.num_levels - 1
    for step in range(steps):
        scale = None
        if guided and constant_scale:
            scale = cfg_scale   # every row, every token: no per-token work
        elif guided:
            progress = rule.taken.float().mean(1) if cfg_schedule == "linear" else torch.ones(batch, device=device)
            in_interval = (rule.level >= first) & (rule.level <= last)
            scale = torch.where(in_interval, 1.0 + (cfg_scale - 1.0) * progress, torch.ones_like(progress))[:, None]
        active = ~rule.done if teacher is not None else None
        row_position = both(token_position)
        inputs = model.embed_inputs(row_position[:, None], both(token_content)[:, None], row_labels[:, None])
        hidden = decoder.position(inputs, row_position)
        filtered = filter_logits(guide(model.position_logits(hidden), scale if cfg_positions else None),
                                 rule.allowed(), position)
        if teacher is None:
            token_position = draw(filtered, position, generator)
        else:
            token_position = teacher_position[:, step + 1]
            log_prob += torch.where(active, chosen_log_prob(filtered, token_position), torch.zeros_like(log_prob))
        context = decoder.content(hidden, both(token_position))
        needs_content = token_position < spec.num_cells
        # the sub-codes of every row at every step (fixed work, no host sync); rows without a cell keep "none"
        for cache in head_caches:
            cache.reset()
        subcodes, previous = [], None
        for slot in range(spec.num_subcodes):
            logits = filter_logits(guide(decoder.head_step(context, previous, slot, head_caches), scale), None, content)
            if teacher is None:
                subcodes.append(draw(logits, content, generator))
            else:
                subcodes.append(teacher_content[:, step + 1, slot].clamp(0, logits.shape[1] - 1))
                log_prob += torch.where(active & needs_content, chosen_log_prob(logits, subcodes[-1]),
                                        torch.zeros_like(log_prob))
            previous = both(subcodes[-1])
        token_content = torch.where(needs_content[:, None], torch.stack(subcodes, 1), none)
        rule.advance(token_position)
        positions.append(token_position)
        contents.append(token_content)
        if (step + 1) % check_done_every == 0 and bool(rule.done.all()):
            break
    model.train(was_training)
    position_streams, content_streams = torch.stack(positions, 1), torch.stack(contents, 1)
    if bool(rule.done.all()):   # cut the END columns decoded after the last row finished
        length = int((position_streams == spec.end).int().argmax(1).max()) + 1
        position_streams, content_streams = position_streams[:, :length], content_streams[:, :length]
    return SampledTokens(position_streams, content_streams, rule.done, log_prob)


def sample(model: Generator, labels: Sequence[int] | Tensor, **options) -> list[tuple[Tensor, Tensor]]:
    """Sample one code map per label: ``(grain uint8 [Hs, Ws], codes int64 [L, K])`` in canonical order.

    Options as :func:`generate_tokens` (``position``/``content`` filters, ``cfg_scale``, ``cfg_interval``,
    ``cfg_positions``, ``cfg_schedule``, ``generator``, ``use_cache``).
    """
    if "max_steps" in options or "teacher" in options:
        raise TypeError("sample() always draws finished sequences; use generate_tokens(max_steps=/teacher=...)")
    tokens = generate_tokens(model, torch.as_tensor(labels), **options)
    return decode_sequences(model.spec, tokens.sequences(model.spec))
