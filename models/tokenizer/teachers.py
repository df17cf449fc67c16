"""Frozen semantic teachers (CLIP, DINOv2) for FQGAN-style sub-codebook alignment.

Three backends build the same :class:`FrozenTeacher` interface from LOCAL weights only (nothing is
downloaded):

- ``open_clip``: ``open_clip.create_model(arch, pretrained=<file>)``, only the visual tower is kept;
  pooled = the tower's projected pooled output, patches = its patch tokens projected the same way.
- ``timm``: ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": ...})`` (timm's
  own checkpoint filter, e.g. position-embedding resampling to ``image_size``); pooled = CLS after the
  final norm (``forward_features``), patches = the patch tokens after it (register tokens skipped).
- ``hf``: a transformers ``CLIPVisionModel`` / ``Dinov2Model`` directory; pooled = ``pooler_output``
  (CLS after the final norm), patches = the patch tokens after the same norm.

Teacher weights never enter a checkpoint of the model that holds the teacher: ``state_dict()`` leaves
them out and ``load_state_dict()`` keeps the weights already loaded from the teacher's own file.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ConfigBase, ConfigError, check_choice

BACKENDS = ("open_clip", "timm", "hf")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class TeacherConfig(ConfigBase):
    """One frozen teacher. ``name`` is what a sub-codebook's ``align`` field refers to."""

    name: str = "dinov2"
    backend: str = "timm"
    arch: str = "vit_small_patch14_dinov2"   # open_clip: a model name or a model-config .json path
    weights: str = ""
    image_size: int = 224
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("teacher", "backend", self.backend, BACKENDS)
        if not self.name:
            raise ConfigError("teacher.name: must be a non-empty name (sub-codebooks refer to it in `align`)")
        if self.image_size <= 0:
            raise ConfigError(f"teacher.image_size: must be positive, got {self.image_size}")


class FrozenTeacher(nn.Module):
    """A frozen vision encoder: images in [-1, 1] -> (pooled B x D, patches B x N x D).

    Attributes:
        embed_dim: D, the feature width of both outputs.
        grid: patches per side at ``image_size`` (N = grid**2); 0 when the tower exposes no patch tokens.
        image_size: side length (pixels) the inputs are resized to.
    """

    def __init__(self, backend: str, network: nn.Module, embed_dim: int, grid: int, image_size: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.backend = backend
        self.network = network
        self.embed_dim = int(embed_dim)
        self.grid = int(grid)
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.network.requires_grad_(False)
        self.train(False)
        self._register_state_dict_hook(_drop_own_keys)
        self.register_load_state_dict_pre_hook(_keep_loaded_weights)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """Always eval: a teacher is never trained (dropout / norms stay in inference mode)."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [-1, 1] -> B x 3 x S x S normalised with the teacher's mean/std.

        Antialiased bicubic resize to S = ``image_size`` (non-square inputs are squashed).
        """
        x = (images.float() + 1.0) * 0.5
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=True).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: B x 3 x H x W in [-1, 1] -> (pooled: B x D, patches: B x grid**2 x D), fp32, no grad."""
        x = self.preprocess(images).to(next(self.network.parameters()).dtype)
        pooled, patches = _BACKEND_FORWARD[self.backend](self.network, x)
        return pooled.float(), patches.float()


def _drop_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _keep_loaded_weights(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # Checkpoints omit teacher weights (see _drop_own_keys): fill them from the loaded teacher so
    # strict loading of the enclosing model succeeds and the teacher keeps its own weights.
    own: dict[str, Any] = {}
    for name, sub in module.named_modules():
        sub._save_to_state_dict(own, f"{prefix}{name}." if name else prefix, keep_vars=True)
    for key, tensor in own.items():
        state_dict.setdefault(key, tensor)


def _open_clip_forward(tower: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = tower(x)
    if isinstance(out, tuple):
        pooled, tokens = out
        proj = getattr(tower, "proj", None)
        patches = tokens @ proj if proj is not None else tokens
    else:
        pooled = out
        patches = pooled.new_zeros(pooled.shape[0], 0, pooled.shape[1])
    return pooled, patches


def _timm_forward(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = net.forward_features(x)
    return tokens[:, 0], tokens[:, net.num_prefix_tokens:]


def _hf_forward(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = net(pixel_values=x)
    patches = out.last_hidden_state[:, 1:]
    post_norm = getattr(getattr(net, "vision_model", None), "post_layernorm", None)
    if post_norm is not None:  # CLIP's last_hidden_state is before the final norm, its pooler after
        patches = post_norm(patches)
    return out.pooler_output, patches


_BACKEND_FORWARD = {"open_clip": _open_clip_forward, "timm": _timm_forward, "hf": _hf_forward}


def _missing_weights(cfg: TeacherConfig, key_path: str) -> FileNotFoundError:
    what = "a directory saved by transformers" if cfg.backend == "hf" else "a local weights file"
    shown = repr(cfg.weights) if cfg.weights else "'' (empty)"
    return FileNotFoundError(
        f"{key_path}.weights: teacher {cfg.name!r} ({cfg.backend} {cfg.arch}) weights not found: {shown}. "
        f"Set {key_path}.weights to {what}; nothing is downloaded at run time.")


def build_teacher(cfg: TeacherConfig, key_path: str = "model.teachers[0]",
                  random_init: bool = False) -> FrozenTeacher:
    """Build a frozen teacher from local weights.

    ``random_init=True`` builds the same architecture with random weights (demo / tests only); otherwise
    an empty or missing ``cfg.weights`` raises FileNotFoundError naming ``{key_path}.weights``.
    """
    if not random_init:
        path = Path(cfg.weights) if cfg.weights else None
        exists = path is not None and (path.is_dir() if cfg.backend == "hf" else path.is_file())
        if not exists:
            raise _missing_weights(cfg, key_path)
    builder = {"open_clip": _build_open_clip, "timm": _build_timm, "hf": _build_hf}[cfg.backend]
    return builder(cfg, None if random_init else cfg.weights)


def _build_open_clip(cfg: TeacherConfig, weights: str | None) -> FrozenTeacher:
    import open_clip

    arch = cfg.arch
    if arch.endswith(".json"):  # a model config file (e.g. a small ViT for the demo): register it under its stem
        if not Path(arch).is_file():
            raise ConfigError(f"teacher {cfg.name!r}: open_clip model config {arch} not found")
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    model = open_clip.create_model(arch, pretrained=weights, force_image_size=cfg.image_size,
                                   **cfg.model_kwargs)
    tower = model.visual
    preprocess = getattr(tower, "preprocess_cfg", {}) or {}
    if hasattr(tower, "output_tokens"):
        tower.output_tokens = True
    grid_size = getattr(tower, "grid_size", None)
    grid = int(grid_size[0]) if grid_size is not None and hasattr(tower, "output_tokens") else 0
    with torch.no_grad():
        probe = tower(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
    embed_dim = (probe[0] if isinstance(probe, tuple) else probe).shape[-1]
    return FrozenTeacher("open_clip", tower, embed_dim, grid, cfg.image_size,
                         tuple(preprocess.get("mean", OPENAI_CLIP_MEAN)),
                         tuple(preprocess.get("std", OPENAI_CLIP_STD)))


def _build_timm(cfg: TeacherConfig, weights: str | None) -> FrozenTeacher:
    import timm

    kwargs: dict[str, Any] = {"img_size": cfg.image_size, "num_classes": 0, **cfg.model_kwargs}
    if weights is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights), "source": ""})
    net = timm.create_model(cfg.arch, **kwargs)
    if not hasattr(net, "forward_features") or not hasattr(net, "num_prefix_tokens"):
        raise ConfigError(f"teacher {cfg.name!r}: timm arch {cfg.arch!r} is not a ViT with prefix tokens "
                          f"(use a vit_*_dinov2 model)")
    grid = int(net.patch_embed.grid_size[0])
    data_cfg = net.pretrained_cfg
    return FrozenTeacher("timm", net, net.num_features, grid, cfg.image_size,
                         tuple(data_cfg.get("mean", IMAGENET_MEAN)), tuple(data_cfg.get("std", IMAGENET_STD)))


def _build_hf(cfg: TeacherConfig, weights: str | None) -> FrozenTeacher:
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    if weights is None:
        model_type = cfg.model_kwargs.get("model_type", "dinov2")
        config_cls = {"dinov2": Dinov2Config, "clip_vision_model": CLIPVisionConfig}[model_type]
        options = {k: v for k, v in cfg.model_kwargs.items() if k != "model_type"}
        hf_config = config_cls(image_size=cfg.image_size, **options)
        net = (Dinov2Model if model_type == "dinov2" else CLIPVisionModel)(hf_config)
    else:
        model_type = json.loads((Path(weights) / "config.json").read_text()).get("model_type", "")
        if model_type == "dinov2":
            net = Dinov2Model.from_pretrained(weights, local_files_only=True, **cfg.model_kwargs)
        elif model_type in ("clip", "clip_vision_model"):
            net = CLIPVisionModel.from_pretrained(weights, local_files_only=True, **cfg.model_kwargs)
        else:
            raise ConfigError(f"teacher {cfg.name!r}: hf directory {weights} holds a {model_type!r} model; "
                              f"expected dinov2, clip or clip_vision_model")
    is_clip = model_type != "dinov2"
    mean, std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if is_clip else (IMAGENET_MEAN, IMAGENET_STD)
    processor_file = Path(weights or "") / "preprocessor_config.json"
    if weights is not None and processor_file.is_file():
        processor = json.loads(processor_file.read_text())
        mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
    grid = cfg.image_size // net.config.patch_size
    return FrozenTeacher("hf", net, net.config.hidden_size, grid, cfg.image_size, tuple(mean), tuple(std))
