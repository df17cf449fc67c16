"""The command line and the config system."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from models.config import ConfigBase, ConfigError
from pipeline.cli import STAGES, main
from pipeline.config import OptimConfig, RunConfig, TrainConfig, load_config, save_resolved_config


@dataclasses.dataclass
class Inner(ConfigBase):
    width: int = 8
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])


@dataclasses.dataclass
class Stage(ConfigBase):
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    model: Inner = dataclasses.field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.002\nmodel:\n  width: 16\n")
    cfg = load_config(Stage, path, ["train.max_steps=7", "model.names=[x,y]"])
    assert cfg.optim.lr == 0.002 and cfg.model.width == 16
    assert cfg.train.max_steps == 7 and cfg.model.names == ["x", "y"]
    assert isinstance(cfg.model, Inner)


def test_unknown_key_names_path_and_allowed_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  widht: 16\n")
    with pytest.raises(ConfigError) as err:
        load_config(Stage, path)
    assert "model.widht" in str(err.value) and "width" in str(err.value) and "names" in str(err.value)


def test_wrong_type_names_path():
    with pytest.raises(ConfigError) as err:
        load_config(Stage, None, ["train.max_steps=many"])
    assert "train.max_steps" in str(err.value)


def test_semantic_check_names_path():
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(Stage, None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(Stage, None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="train.image_every"):
        load_config(Stage, None, ["train.image_every=0"])
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(Stage, None, ["train.ema_decay=1.5"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(Stage, None, ["train.max_steps"])


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(Stage, None, ["model.width=3"])
    written = save_resolved_config(cfg, tmp_path)
    assert load_config(Stage, written) == cfg


def test_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in STAGES:
        assert name in out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True)
    assert "train-tokenizer" in out.stdout and "shard" in out.stdout


# Stages a launcher starts (`torchrun ... -m pipeline.cli STAGE ...`, `accelerate launch ... -m pipeline.cli ...`);
# `launch` and `demo` start launchers themselves.
LAUNCHED_STAGES = [name for name in STAGES if name not in ("launch", "demo")]


@pytest.mark.parametrize("stage", LAUNCHED_STAGES)
def test_every_flag_passes_through_torchrun_and_accelerate_untouched(stage):
    """argparse in the launchers also matches abbreviations after the script name: a stage flag that is a prefix
    of a launcher option (``--num`` vs torchrun's ``--numa-binding``) is stolen or rejected as ambiguous."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    from pipeline.cli import _stage_parser

    parser, _ = _stage_parser(stage)
    flags = sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"})
    for launcher in (get_args_parser(), launch_command_parser()):
        for flag in flags:
            argv = ["-m", "pipeline.cli", stage, flag, "1"]
            try:
                parsed, _ = launcher.parse_known_args(argv)
            except SystemExit:
                pytest.fail(f"{launcher.prog} rejects `{stage} {flag}` (ambiguous with one of its own options)")
            assert parsed.training_script_args == [stage, flag, "1"], f"{launcher.prog} took `{stage} {flag}`"


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=inf", "optim.lr=-inf", "optim.grad_clip=nan",
                                      "optim.betas=[0.9,nan]", "train.ema_decay=nan"])
def test_non_finite_floats_are_refused_naming_the_key(override):
    key = override.split("=")[0].replace("[0.9,nan]", "")
    with pytest.raises(ConfigError, match=r"must be a finite number"):
        load_config(Stage, None, [override])
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load_config(Stage, None, [override])


@pytest.mark.parametrize("override, message", [
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"), ("optim.eps=0", "optim.eps must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.min_lr_ratio=2", r"optim.min_lr_ratio must be in \[0, 1\]"),
    ("optim.betas=[0.9,1.5]", r"optim.betas must be 2 values in \[0, 1\)")])
def test_optim_numbers_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Stage, None, [override])


@pytest.mark.parametrize("stage, override", [("train-tokenizer", "optim.lr=nan"),
                                             ("train-tokenizer", "model.router.targets=[nan]"),
                                             ("train-generator", "optim.grad_clip=nan")])
def test_stages_refuse_non_finite_config_before_any_process_group(stage, override, capsys):
    import torch.distributed

    assert main([stage, "--config", "tiny", override]) == 2
    assert "must be a finite number" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_stage_schemas_share_the_base_sections_and_save_them_in_the_documented_order(tmp_path):
    from pipeline.config import SECTION_ORDER, LoggingConfig, StageConfig
    from pipeline.stages import GeneratorStageConfig, TokenizerStageConfig

    for schema in (TokenizerStageConfig, GeneratorStageConfig):
        cfg = schema.from_dict({})
        assert isinstance(cfg, StageConfig) and isinstance(cfg.logging, LoggingConfig)
        assert list(cfg.to_dict()) == [s for s in SECTION_ORDER if hasattr(cfg, s)]
        assert load_config(schema, save_resolved_config(cfg, tmp_path / schema.__name__)) == cfg
    assert GeneratorStageConfig.from_dict({}, ["logging.grid_cfg=2.0"]).logging.grid_cfg == 2.0
    with pytest.raises(ConfigError, match="logging.grid_cfg"):
        TokenizerStageConfig.from_dict({}, ["logging.grid_cfg=2.0"])   # the generator's logging keys only


def test_model_configs_read_the_model_section_with_one_from_yaml(tmp_path):
    from models.generator import GeneratorConfig
    from models.tokenizer import TokenizerConfig

    stage = tmp_path / "stage.yaml"
    stage.write_text("run: {dir: x}\nmodel:\n  z_channels: 32\n  dim: 64\n")
    bare = tmp_path / "bare.yaml"
    bare.write_text("dim: 96\n")
    assert GeneratorConfig.from_yaml(bare).dim == 96                       # a bare model config
    # overrides with or without the section prefix; errors name the key with it, for both model configs
    assert GeneratorConfig.from_yaml(bare, ["model.heads=8"]).heads == 8
    assert GeneratorConfig.from_yaml(bare, ["heads=8"]).heads == 8
    for schema, bad in ((GeneratorConfig, "z_channels"), (TokenizerConfig, "dim")):
        with pytest.raises(ConfigError, match=rf"{stage}: model\.{bad}: unknown key"):
            schema.from_yaml(stage)
    tokenizer_stage = _write(tmp_path / "tok.yaml", "model:\n  z_channels: 32\n")
    assert TokenizerConfig.from_yaml(tokenizer_stage).z_channels == 32
    assert TokenizerConfig.from_yaml(tokenizer_stage, ["model.z_channels=48"]).z_channels == 48
    for text, message in (("- a\n- b\n", "top level must be a mapping"), ("model: [unclosed\n", "cannot parse YAML")):
        with pytest.raises(ConfigError, match=message):
            TokenizerConfig.from_yaml(_write(tmp_path / "broken.yaml", text))
    with pytest.raises(ConfigError, match="config file not found"):
        GeneratorConfig.from_yaml(tmp_path / "missing.yaml")


def _write(path, text: str):
    path.write_text(text)
    return path
