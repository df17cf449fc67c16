"""Stage configs: the sections every stage shares, loading with overrides, saving the resolved config.

A stage config is a :class:`StageConfig` with the top-level sections ``run``, ``data``, ``model``, ``loss``,
``optim``, ``train``, ``logging`` (docs/formats.md, "Configs"). The shared sections and their base live here;
the stage schemas are in pipeline.stages, their ``model`` and ``loss`` sections come from the model packages.
Load with::

    cfg = load_config(TokenizerStageConfig, "configs/tokenizer/tiny.yaml", ["optim.lr=1e-4"])

Errors (unknown key, wrong type, bad value) are :class:`ConfigError` naming the key path.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Optional, TypeVar

from data.files import atomic_write
from data.identity import flatten
from models.config import ConfigBase, ConfigError, check_choice
from pipeline.precision import PRECISIONS

__all__ = ["ConfigError", "RunConfig", "OptimConfig", "TrainConfig", "LoggingConfig", "StageConfig", "load_config",
           "save_resolved_config", "config_search_path", "resolve_config_path"]

C = TypeVar("C", bound=ConfigBase)


@dataclasses.dataclass
class RunConfig(ConfigBase):
    dir: str = "runs/default"   # outputs: checkpoints/, export/, logs/, config.yaml
    seed: int = 0


@dataclasses.dataclass
class OptimConfig(ConfigBase):
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0     # cosine decays to lr * min_lr_ratio at train.max_steps
    grad_clip: float = 1.0        # global norm; 0 disables

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be 2 values in [0, 1), got {list(self.betas)}")
        checks = {"weight_decay": self.weight_decay >= 0, "eps": self.eps > 0, "warmup_steps": self.warmup_steps >= 0,
                  "min_lr_ratio": 0.0 <= self.min_lr_ratio <= 1.0, "grad_clip": self.grad_clip >= 0}
        allowed = {"weight_decay": ">= 0", "eps": "> 0", "warmup_steps": ">= 0", "min_lr_ratio": "in [0, 1]",
                   "grad_clip": ">= 0 (0 disables clipping)"}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"optim.{name} must be {allowed[name]}, got {getattr(self, name)}")


@dataclasses.dataclass
class TrainConfig(ConfigBase):
    max_steps: int = 1000          # optimizer steps
    grad_accum: int = 1
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 3
    image_every: int = 500         # reconstruction / sample grids, PNG
    precision: str = "auto"        # auto: bf16 on GPU, fp32 on CPU
    ema_decay: float = 0.999       # 0 disables EMA
    zero_stage: int = 2            # DeepSpeed ZeRO stage when not launched with an accelerate config
    max_bad_steps: int = 20        # consecutive non-finite losses before the run stops
    watchdog_s: float = 1800.0     # every rank exits (code 124) when any rank makes no step for this long; 0 = off
    # On resume at another world size, grad_accum keeps world size x grad_accum (the global batch) of the
    # checkpoint; true accepts a world size that cannot keep it (grad_accum rounded, the change logged).
    allow_new_global_batch: bool = False

    def __post_init__(self) -> None:
        check_choice("train", "precision", self.precision, PRECISIONS)
        check_choice("train", "zero_stage", self.zero_stage, (0, 1, 2, 3))
        for name in ("max_steps", "grad_accum", "log_every", "ckpt_every", "keep_last", "image_every",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (0 disables EMA), got {self.ema_decay}")
        if self.watchdog_s < 0:
            raise ConfigError(f"train.watchdog_s must be >= 0 seconds (0 disables the watchdog), got {self.watchdog_s}")


@dataclasses.dataclass
class LoggingConfig(ConfigBase):
    tensorboard: bool = True
    wandb: bool = False
    project: str = "varitok"


# Top-level sections in the order a resolved config.yaml lists them.
SECTION_ORDER = ("run", "data", "model", "loss", "optim", "train", "logging")


@dataclasses.dataclass
class StageConfig(ConfigBase):
    """Base of every training stage's schema: the shared ``run``, ``optim``, ``train`` and ``logging`` sections
    (a stage adds ``data``, ``model`` and maybe ``loss``, and may narrow ``logging`` to a subclass).

    ``RESUMABLE`` declares, per stage, the keys that may change between a checkpoint and the run resuming it
    (``section.key``, or a whole ``section``). Everything else in the resolved config must match:
    :meth:`resume_identity`, so a key added to a schema is checked on resume unless it is declared here.
    """

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    RESUMABLE: ClassVar[tuple[str, ...]] = ()
    # Keys of the shared sections (and the launch layout) that every stage lets change on resume: where the run
    # lives, how often it logs and saves, its guards, and the layout (train.grad_accum is recomputed to keep
    # processes x grad_accum, the global batch, which the data state checks).
    RESUMABLE_IN_EVERY_STAGE: ClassVar[tuple[str, ...]] = (
        "run.dir", "train.log_every", "train.ckpt_every", "train.keep_last", "train.image_every",
        "train.max_bad_steps", "train.zero_stage", "train.watchdog_s", "logging", "train.grad_accum",
        "train.allow_new_global_batch", "data.num_workers")

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        return {name: values[name] for name in sorted(values, key=_section_rank)}

    def resume_identity(self, facts: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint: the resolved config without the ``RESUMABLE``
        keys, updated with ``facts`` (``{section: {key: value}}``: values resolved from the inputs, such as the
        number of rows of the data, which replace or extend the configured ones)."""
        values = self.to_dict()
        for key in self.RESUMABLE:
            section, _, name = key.partition(".")
            if name:
                values[section].pop(name)
            else:
                values.pop(section)
        for section, more in (facts or {}).items():
            values.setdefault(section, {}).update(more)
        return values

    @classmethod
    def identity_defaults(cls) -> dict[str, Any]:
        """The schema's default of every :meth:`resume_identity` key (``{dotted key: value}``): what a checkpoint
        written before an option existed is compared as, since an option's default keeps the behaviour from before
        it (``data.identity.differences``)."""
        return flatten(cls().resume_identity())


def _section_rank(name: str) -> tuple[int, str]:
    return (SECTION_ORDER.index(name), name) if name in SECTION_ORDER else (len(SECTION_ORDER), name)


def config_search_path() -> list[Path]:
    """Where a bare config name (``tiny`` or ``tokenizer/tiny.yaml``) is looked up: ./configs, then the repo's."""
    return [Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"]


def resolve_config_path(path: str | os.PathLike, kind: Optional[str] = None) -> Path:
    """Accept a file path, or a preset name such as ``tiny`` (looked up under ``configs/<kind>/``)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    names = [candidate, candidate.with_suffix(".yaml")]
    for root in config_search_path():
        for name in names:
            for base in ([root / kind] if kind else []) + [root]:
                if (base / name).is_file():
                    return base / name
    raise ConfigError(f"config {path} not found (looked in the current directory and "
                      f"{', '.join(str(r / (kind or '')) for r in config_search_path())})")


def load_config(schema: type[C], path: Optional[str | os.PathLike], overrides: Iterable[str] = (),
                kind: Optional[str] = None) -> C:
    """Load ``path`` (or the schema defaults when None) with dotlist ``overrides`` into ``schema``."""
    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key.path=value, got {bad}")
    if path is None:
        return schema.from_dict({}, overrides)
    return schema.from_yaml(resolve_config_path(path, kind), overrides)


def save_resolved_config(config: ConfigBase, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config next to a run's outputs (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write(directory / name, config.to_yaml())
