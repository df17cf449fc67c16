"""The training stages' config schemas and, next to each, the keys a resumed run may change.

    cfg = load_config(TokenizerStageConfig, "tiny", ["optim.lr=1e-4"], kind="tokenizer")   # pipeline.config

Stage 1 (``train-tokenizer``, pipeline.train_tokenizer) and stage 3 (``train-generator``,
pipeline.train_generator) share ``run``, ``optim``, ``train`` and ``logging`` (pipeline.config.StageConfig).
A checkpoint resumes only under the same resolved config except the keys its stage declares in ``RESUMABLE``
(cadences, run directory, launch layout, logging): see :meth:`StageConfig.resume_identity`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from models.config import ConfigBase, ConfigError, check_choice
from models.generator import GeneratorConfig
from models.tokenizer import TokenizerConfig
from models.tokenizer.losses import LossConfig
from pipeline.config import LoggingConfig, StageConfig

__all__ = ["TokenizerDataConfig", "TokenizerStageConfig", "GeneratorDataConfig", "GeneratorLoggingConfig",
           "GeneratorStageConfig", "VIEW_MODES"]

VIEW_MODES = ("random", "all")


# ------------------------------------------------------------------------------------------ stage 1
@dataclasses.dataclass
class TokenizerDataConfig(ConfigBase):
    shards: str = ""             # directory, brace pattern or comma list of WebDataset .tar shards
    batch_size: int = 32         # images per rank per micro-step
    num_workers: int = 2         # decoding processes per rank
    image_size: int = 256        # square crop side, pixels
    shuffle_buffer: int = 1000
    # Canonical units of the data order (null = processes x max(1, num_workers) of the run's first launch). A
    # resumed run keeps the checkpoint's; any later processes x workers dividing it continues the epoch exactly.
    canonical_units: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.canonical_units is not None and self.canonical_units < 1:
            raise ConfigError(f"data.canonical_units must be >= 1 (or null), got {self.canonical_units}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ConfigError("data.num_workers and data.shuffle_buffer must be >= 0")


@dataclasses.dataclass
class TokenizerStageConfig(StageConfig):
    data: TokenizerDataConfig = dataclasses.field(default_factory=TokenizerDataConfig)
    model: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)

    # data.canonical_units is checked by the stream state.
    RESUMABLE = (*StageConfig.RESUMABLE_IN_EVERY_STAGE, "train.max_steps", "data.canonical_units")


# ------------------------------------------------------------------------------------------ stage 3
@dataclasses.dataclass
class GeneratorDataConfig(ConfigBase):
    codes: str = ""              # directory written by `varitok tokenize` (manifest.json + part-*.arrow)
    max_tokens: int = 512        # token budget (incl. BOS / level markers) of one packed micro batch per rank
    row_length: int = 0          # slots per packed row (0 = max_tokens); ceil(max_tokens / row_length) rows or more
    num_workers: int = 2         # DataLoader worker processes packing micro batches ahead of the step
    views: str = "random"        # random: one view per image per epoch; all: every stored view

    def __post_init__(self) -> None:
        check_choice("data", "views", self.views, VIEW_MODES)
        if self.max_tokens < 1 or self.num_workers < 0 or self.row_length < 0:
            raise ConfigError(f"data.max_tokens must be >= 1, data.row_length >= 0 and data.num_workers >= 0, got "
                              f"{self.max_tokens}, {self.row_length}, {self.num_workers}")

    @property
    def slots_per_row(self) -> int:
        return self.row_length or self.max_tokens


@dataclasses.dataclass
class GeneratorLoggingConfig(LoggingConfig):
    tokenizer: str = ""          # Tokenizer export dir for sample grids every train.image_every steps ("" = none)
    grid_classes: list[int] = dataclasses.field(default_factory=list)  # classes of the grid ([] = 0..7)
    grid_cfg: float = 1.5        # classifier-free guidance scale of the grid samples (1 = none)


@dataclasses.dataclass
class GeneratorStageConfig(StageConfig):
    data: GeneratorDataConfig = dataclasses.field(default_factory=GeneratorDataConfig)
    model: GeneratorConfig = dataclasses.field(default_factory=GeneratorConfig)
    logging: GeneratorLoggingConfig = dataclasses.field(default_factory=GeneratorLoggingConfig)

    # data.codes may move: the code files' identity (rows, tokenizer) is checked instead (train_generator.prepare);
    # data.row_length is checked as resolved (0 = data.max_tokens). The global batch is processes x grad_accum
    # micro batches of data.max_tokens per optimizer step.
    RESUMABLE = (*StageConfig.RESUMABLE_IN_EVERY_STAGE, "data.codes", "train.precision")
