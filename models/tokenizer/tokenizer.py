"""The tokenizer: encoder -> router -> factorized quantizer (per level) -> positional decoder.

``Tokenizer(config)(images)`` is the training forward (reconstruction, weighted losses, stats);
``encode`` / ``decode`` convert between images and variable-length :class:`ImageCodes` in the canonical
coarse-to-fine order of docs/design.md ("Tokenizer codes", implemented by :mod:`models.layout`).
Reconstruction, LPIPS and GAN losses are not computed here (``models.tokenizer.losses`` does them).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ConfigBase, ConfigError
from models.hub import PretrainedMixin
from models.layout import batch_canonical_positions, batch_codes_to_level_maps, num_codes
from models.tokenizer.decoder import Decoder, DecoderConfig, merge_levels, replicate
from models.tokenizer.encoder import Encoder, EncoderConfig
from models.tokenizer.quantizer import FactorizedQuantizer, QuantizerConfig
from models.tokenizer.router import Router, RouterConfig
from models.tokenizer.semantic import SemanticHead, info_nce, patch_alignment_loss
from models.tokenizer.teachers import FrozenTeacher, TeacherConfig, build_teacher


@dataclasses.dataclass
class SemanticConfig(ConfigBase):
    """Alignment heads (one per aligned sub-codebook) and their InfoNCE / patch losses."""

    width: int = 256
    depth: int = 2
    heads: int = 4
    weight: float = 0.5          # InfoNCE weight per aligned sub-codebook
    temperature: float = 0.1
    patch_weight: float = 0.0    # optional patch-level cosine term (teacher must expose patch tokens)
    symmetric: bool = True       # InfoNCE both ways; false: FQGAN's one-directional prediction -> teacher


@dataclasses.dataclass
class TokenizerConfig(ConfigBase):
    yaml_section = "model"   # from_yaml reads the model section of a stage config

    factors: list[int] = dataclasses.field(default_factory=lambda: [8, 16])  # downsampling factors, any order
    z_channels: int = 256
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    quantizer: QuantizerConfig = dataclasses.field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    teachers: list[TeacherConfig] = dataclasses.field(default_factory=list)
    semantic: SemanticConfig = dataclasses.field(default_factory=SemanticConfig)

    def __post_init__(self) -> None:
        factors = sorted(self.factors)
        if not factors or factors[0] < 1 or any(f & (f - 1) for f in factors) or any(
                b != 2 * a for a, b in zip(factors, factors[1:])):
            raise ConfigError(f"model.factors must be powers of two, each twice the previous (e.g. [8, 16] or "
                              f"[8, 16, 32]), got {self.factors}")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError(f"model.teachers: names must be unique, got {names}")
        for k, codebook in enumerate(self.quantizer.codebooks):
            if codebook.align and codebook.align not in names:
                raise ConfigError(f"model.quantizer.codebooks[{k}].align: teacher {codebook.align!r} is not in "
                                  f"model.teachers (names: {names})")


class ImageCodes(NamedTuple):
    """One image's codes: ``grain`` uint8 [Hs, Ws] (level per coarsest region), ``codes`` int64 [L, K]."""

    grain: torch.Tensor
    codes: torch.Tensor


def build_teachers(config: TokenizerConfig, random_init: bool = False) -> dict[str, FrozenTeacher]:
    """Build every teacher of ``config.teachers`` from its local weights (``random_init`` for tests)."""
    return {t.name: build_teacher(t, key_path=f"model.teachers[{i}]", random_init=random_init)
            for i, t in enumerate(config.teachers)}


class Tokenizer(nn.Module, PretrainedMixin):
    """Dynamic-granularity x factorized VQ tokenizer; see the module docstring."""

    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config = copy.deepcopy(config)           # the caller's object is never changed
        self.factors = sorted(config.factors, reverse=True)   # level 0 = coarsest
        self.encoder = Encoder(config.encoder, self.factors, config.z_channels)
        self.router = Router(config.router, self.factors, config.z_channels)
        config.router = self.router.config   # one object: save_pretrained records set_granularity_ratio
        self.quantizer = FactorizedQuantizer(config.quantizer, config.z_channels)
        self.decoder = Decoder(config.decoder, sum(self.quantizer.dims), config.z_channels, self.factors[-1])
        sem = config.semantic
        self.semantic_heads = nn.ModuleDict({
            str(k): SemanticHead(c.dim, c.align_dim, sem.width, sem.depth, sem.heads)
            for k, c in enumerate(config.quantizer.codebooks) if c.align})
        self._teachers: dict[str, FrozenTeacher] = {}   # plain dict: never registered, saved or optimised

    # ----------------------------------------------------------------- properties and settings
    @property
    def num_levels(self) -> int:
        return len(self.factors)

    @property
    def codebook_sizes(self) -> list[int]:
        return list(self.quantizer.sizes)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer

    def grain_shape(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """Coarsest grid ``(Hs, Ws)`` for an image size (int or (H, W))."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        return height // self.factors[0], width // self.factors[0]

    def set_step(self, step: int) -> None:
        """Per-step schedules (the router's Gumbel temperature)."""
        self.router.set_step(step)

    def set_granularity_ratio(self, ratios: Sequence[float]) -> None:
        self.router.set_granularity_ratio(ratios)

    def attach_teachers(self, teachers: dict[str, FrozenTeacher]) -> None:
        """Attach frozen teachers by name (kept out of parameters and state_dict; move them yourself)."""
        known = {t.name for t in self.config.teachers}
        unknown = sorted(set(teachers) - known)
        if unknown:
            raise ValueError(f"attach_teachers: {unknown} not in model.teachers ({sorted(known)})")
        for k, head in self.semantic_heads.items():
            codebook = self.config.quantizer.codebooks[int(k)]
            teacher = teachers.get(codebook.align)
            if teacher is not None and teacher.embed_dim != codebook.align_dim:
                raise ValueError(f"teacher {codebook.align!r} has embed_dim {teacher.embed_dim} but "
                                 f"model.quantizer.codebooks[{k}].align_dim is {codebook.align_dim}")
        self._teachers.update(teachers)

    # ----------------------------------------------------------------- forward
    def _route(self, images: torch.Tensor, grain: torch.Tensor | None = None):
        """-> (encoder features per level, routing, per-level masks B x Hg x Wg of the cells each level codes)."""
        features = self.encoder(images)
        route = self.router(features, images, grain)
        masks = [replicate(route.gates[:, g:g + 1].detach(), 1 << g)[:, 0] for g in range(self.num_levels)]
        return features, route, masks

    def _quantize(self, images: torch.Tensor, grain: torch.Tensor | None = None):
        features, route, masks = self._route(images, grain)
        return route, self.quantizer(features, masks)

    @torch.no_grad()
    def init_codebooks(self, images: torch.Tensor) -> None:
        """k-means initialisation of the codebooks from one batch (``quantizer.codebook_init: kmeans``; the
        trainer calls it before the first step of a fresh run): images B x 3 x H x W in [-1, 1], routed as in
        eval mode. Collective under torch.distributed (clusters over every rank's batch)."""
        was_training = self.training
        self.eval()
        try:
            features, _, masks = self._route(images)
        finally:
            self.train(was_training)
        self.quantizer.kmeans_init(features, masks)

    def forward(self, images: torch.Tensor, grain: torch.Tensor | None = None):
        """images B x 3 x H x W in [-1, 1] -> (rec B x 3 x H x W, losses {name: weighted scalar},
        stats {name: scalar}). Losses: codebook, commitment, entropy, disentangle, budget, semantic/<teacher>.

        ``grain``: optional imposed granularity map, integer B x Hs x Ws (the coarsest grid,
        :meth:`grain_shape`) with values < :attr:`num_levels`, used instead of the router's choice (see
        :meth:`Router.forward`: shares and budget are the map's, no gradient reaches the router); ValueError
        when its shape or values do not fit."""
        route, quant = self._quantize(images, grain)
        merged = merge_levels(quant.quantized, route.gates)
        rec = self.decoder(merged)
        losses = {**quant.losses, "budget": route.budget, **self._semantic_losses(images, merged)}
        stats = {f"share/level{g}": route.shares[g].detach() for g in range(self.num_levels)}
        stats["fine_share"] = (1 - route.shares[0]).detach()
        if route.eval_shares is not None:   # what eval mode would code on this batch (the calibrated decision)
            stats["eval_fine_share"] = 1 - route.eval_shares[0]
        regions = route.gates.shape[-2] * route.gates.shape[-1]
        codes_per_region = route.shares.new_tensor([4.0 ** g for g in range(self.num_levels)])
        stats["codes_per_image"] = (route.shares * codes_per_region).sum().detach() * regions
        stats.update(quant.stats)
        return rec, losses, stats

    def _semantic_losses(self, images: torch.Tensor, merged: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.semantic_heads:
            return {}
        codebooks = self.config.quantizer.codebooks
        missing = sorted({codebooks[int(k)].align for k in self.semantic_heads} - set(self._teachers))
        if missing:
            if self.training:
                raise RuntimeError(f"semantic alignment is configured but teacher(s) {missing} are not attached: "
                                   f"call tok.attach_teachers(build_teachers(config)) before training")
            return {}
        sem = self.config.semantic
        offsets = [0]
        for dim in self.quantizer.dims:
            offsets.append(offsets[-1] + dim)
        targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        losses: dict[str, torch.Tensor] = {}
        for k, head in self.semantic_heads.items():
            k_int = int(k)
            name = codebooks[k_int].align
            if name not in targets:
                targets[name] = self._teachers[name](images)
            pooled, patches = head(merged[:, offsets[k_int]:offsets[k_int + 1]])
            loss = sem.weight * info_nce(pooled, targets[name][0], sem.temperature, symmetric=sem.symmetric)
            if sem.patch_weight > 0:
                loss = loss + sem.patch_weight * patch_alignment_loss(
                    patches, targets[name][1], tuple(merged.shape[-2:]), self._teachers[name].grid)
            key = f"semantic/{name}"
            losses[key] = losses[key] + loss if key in losses else loss
        return losses

    # ----------------------------------------------------------------- codes
    @torch.no_grad()
    def encode(self, images: torch.Tensor, grain: torch.Tensor | None = None) -> list[ImageCodes]:
        """images B x 3 x H x W in [-1, 1] -> one :class:`ImageCodes` per image (eval mode, no grad).

        ``grain``: optional imposed granularity map (integer B x Hs x Ws, values < :attr:`num_levels`), coded
        instead of the router's choice, as in :meth:`forward`. Every cell of every level is looked up exactly
        as in the eval forward, so that ``decode(encode(x))`` reproduces the eval reconstruction bit for bit
        (with the same ``grain``)."""
        was_training = self.training
        self.eval()
        try:
            route, quant = self._quantize(images, grain)
        finally:
            self.train(was_training)
        return self._image_codes(route.grain, quant.indices)

    def _image_codes(self, grain: torch.Tensor, indices: list[torch.Tensor]) -> list[ImageCodes]:
        """grain ``B x Hs x Ws`` and per-level code indices ``B x K x Hg x Wg`` -> canonical codes per image.

        The canonical order of the whole batch is worked out on the host from the (small) grain maps, one
        transfer, and the codes are gathered on their device with one index_select."""
        host_grain = grain.cpu()
        image, levels, cells = batch_canonical_positions(host_grain, self.num_levels)
        sizes = torch.tensor([level.shape[-2] * level.shape[-1] for level in indices])
        offsets = torch.cumsum(sizes, 0) - sizes
        table = torch.cat([level.flatten(2) for level in indices], dim=2).transpose(1, 2)   # B x C x K
        rows = image * table.shape[1] + offsets[levels] + cells
        codes = table.reshape(-1, table.shape[2]).index_select(0, rows.to(table.device))
        return [ImageCodes(g, c) for g, c in zip(grain.to(torch.uint8).unbind(0),
                                                 codes.split(num_codes(host_grain).tolist()))]

    @torch.no_grad()
    def decode(self, codes: Sequence[ImageCodes]) -> torch.Tensor:
        """A batch of :class:`ImageCodes` -> images B x 3 x H x W.

        Every grain map is ``Hs x Ws`` (the same for the whole batch) with values < :attr:`num_levels`; image
        b's codes are ``L_b x K`` integers below :attr:`codebook_sizes`, ``L_b`` the number of positions its
        grain map implies (lengths may differ). The batch is validated once (ValueError naming the images at
        fault) and its concatenated codes are scattered onto the per-level index maps ``B x K x Hg x Wg`` in
        one go (:func:`models.layout.batch_codes_to_level_maps`, positions worked out on the host from the
        grain maps); cells not coded at a level hold code 0, masked by the gates as in the eval forward."""
        if not codes:
            raise ValueError("decode: empty list of codes")
        shapes = {tuple(c.grain.shape) for c in codes}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"decode: all images of a batch need the same grain shape Hs x Ws, got {sorted(shapes)}")
        num_levels, sizes = self.num_levels, self.codebook_sizes
        wrong = [b for b, c in enumerate(codes) if not _is_integer(c.grain) or not _is_integer(c.codes)
                 or c.codes.ndim != 2 or c.codes.shape[1] != len(sizes)]
        if wrong:
            raise ValueError(f"decode: codes must be integer L x {len(sizes)} with values below {sizes} (and grain "
                             f"maps integer), image {wrong[0]} has codes {codes[wrong[0]].codes.dtype} "
                             f"{tuple(codes[wrong[0]].codes.shape)}, grain {codes[wrong[0]].grain.dtype} "
                             f"(images at fault: {wrong})")
        grain = _join([c.grain for c in codes], torch.stack).cpu().long()                  # B x Hs x Ws
        wrong = ((grain < 0) | (grain >= num_levels)).flatten(1).any(1).nonzero().flatten().tolist()
        if wrong:
            raise ValueError(f"decode: grain values must be in 0..{num_levels - 1} (the levels), images "
                             f"{wrong} are not")
        lengths = torch.tensor([c.codes.shape[0] for c in codes])
        expected = num_codes(grain)
        wrong = (lengths != expected).nonzero().flatten().tolist()
        if wrong:
            raise ValueError(f"decode: image {wrong[0]} has {int(lengths[wrong[0]])} code rows but its grain map "
                             f"implies L = {int(expected[wrong[0]])} (images at fault: {wrong})")
        device = self.last_layer.device
        values = _join([c.codes for c in codes], torch.cat).to(device=device, dtype=torch.long)  # sum L x K
        outside = ((values < 0) | (values >= torch.tensor(sizes, device=device))).any(1)
        if bool(outside.any()):
            rows = outside.nonzero().flatten().cpu()
            images = torch.bucketize(rows, lengths.cumsum(0), right=True).unique().tolist()
            raise ValueError(f"decode: codes must be L x {len(sizes)} with values below {sizes}, images {images} "
                             f"are not")
        indices = batch_codes_to_level_maps(grain, values, num_levels, fill=0)
        gates = F.one_hot(grain.to(device), num_levels).permute(0, 3, 1, 2).float()
        return self.decoder(merge_levels(self.quantizer.embed(indices), gates))


def _is_integer(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds integers (bool, float and complex do not)."""
    return not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)


def _join(tensors: Sequence[torch.Tensor], join) -> torch.Tensor:
    """``join`` (torch.cat or torch.stack) of integer tensors that may differ in device and dtype: on the first
    one's device, in their common dtype (int64 when they differ; torch does not promote unsigned 16/32-bit)."""
    dtypes = {t.dtype for t in tensors}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.long
    return join([t.to(device=tensors[0].device, dtype=dtype) for t in tensors])
