"""varitok train-generator: 2-process ZeRO-2 / ZeRO-3 training from a synthetic code corpus, exact resume,
vocabulary checks, packed data stream and optimiser groups."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmarks.train_generator import write_corpus
from models.config import ConfigError
from models.generator import Generator, GeneratorConfig, unpack
from pipeline.cli import main as cli
from pipeline.train_generator import (GeneratorStageConfig, PackedCodeStream, check_vocabulary, optimizer_groups)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "generator" / "tiny.yaml"
# A smaller model than the preset (same vocabulary) keeps every launch within a few seconds of compute.
SMALL = ["model.dim=32", "model.heads=2", "model.position_depth=1", "model.content_depth=1", "model.head_dim=16",
         "model.head_heads=1", "model.num_classes=4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("codes"), rows=48, max_rows_per_batch=16)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK",
                                                                    "WORLD_SIZE", "MASTER_"))}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _train_args(run_dir: Path, corpus: Path, steps: int, extra=()) -> list[str]:
    return ["train-generator", "--config", str(TINY), f"run.dir={run_dir}", f"data.codes={corpus}",
            "data.max_tokens=160", "data.num_workers=0", f"train.max_steps={steps}", "train.log_every=1",
            "train.ckpt_every=2", "train.keep_last=3", "optim.warmup_steps=1", "train.ema_decay=0.9",
            "logging.tensorboard=false", *SMALL, *extra]


def _launch(args: list[str], nproc: int, zero: int, timeout: int = 240) -> subprocess.CompletedProcess:
    if nproc == 1:
        command = [sys.executable, "-m", "pipeline.cli", *args]
    else:
        from pipeline.runtime import free_port

        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
                   "--num_machines", "1", "--use_deepspeed", "--zero_stage", str(zero),
                   "--main_process_port", str(free_port()), "-m", "pipeline.cli", *args]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer_export(tmp_path_factory) -> Path:
    """Random-weight tiny tokenizer (64px, 2 levels, K=2 x 256: the tiny generator's vocabulary)."""
    from models.tokenizer import Tokenizer, TokenizerConfig

    torch.manual_seed(0)
    tokenizer = Tokenizer(TokenizerConfig.from_yaml(REPO / "configs" / "tokenizer" / "tiny.yaml"))
    return tokenizer.save_pretrained(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_zero_training_exports_a_loadable_generator(tmp_path, corpus, tokenizer_export, zero):
    run_dir = tmp_path / "run"
    # Under ZeRO-3 the sample grid gathers partitioned (EMA) weights: exercise it there.
    grid = [f"logging.tokenizer={tokenizer_export}", "train.image_every=4"] if zero == 3 else []
    _launch(_train_args(run_dir, corpus, steps=4, extra=grid), nproc=2, zero=zero)
    if zero == 3:
        from PIL import Image

        picture = Image.open(run_dir / "images" / "samples-step-4.png")
        assert picture.size[0] > 4 * 64 and picture.size[1] > 2 * 64    # 4 classes, samples + granularity rows
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == zero and summary["steps"] == 4
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"loss", "position", "content/0", "content/1", "accuracy/position", "accuracy/content/0",
                "tokens_per_s", "packing_efficiency", "lr"} <= row.keys()
        assert np.isfinite(row["loss"]) and row["tokens_per_s"] > 0 and 0 < row["packing_efficiency"] <= 1
        assert 0.05 < row["memory_gb"] < 16
        assert row["loss"] == pytest.approx(row["position"] + (row["content/0"] + row["content/1"]) / 2, rel=1e-5)
    exported = Generator.from_pretrained(run_dir / "export")
    ema = load_file(str(run_dir / "checkpoints" / "step-4" / "ema.safetensors"))
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, ema[name])
    raw = load_file(str(run_dir / "checkpoints" / "step-4" / "model.safetensors"))
    initial = Generator(exported.config).state_dict()
    assert any(not torch.equal(raw[k], initial[k]) for k in raw)   # the weights were trained


def test_resume_after_kill_equals_straight_run(tmp_path, corpus):
    straight = tmp_path / "straight"
    _launch(_train_args(straight, corpus, steps=4), nproc=1, zero=0)
    # Simulate kill -9 right after step 2: only step-2 on disk, plus a half-written checkpoint directory.
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-2", killed / "checkpoints" / "step-2")
    shutil.copytree(straight / "checkpoints" / "step-4", killed / "checkpoints" / ".tmp-step-4")
    (killed / "checkpoints" / ".tmp-step-4" / "meta.json").unlink()
    result = _launch(_train_args(killed, corpus, steps=4), nproc=1, zero=0)
    assert "(from 2)" in result.stdout
    assert not (killed / "checkpoints" / ".tmp-step-4").exists()
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(straight / "checkpoints" / "step-4" / name))
        b = load_file(str(killed / "checkpoints" / "step-4" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert [r["loss"] for r in _metrics(killed)] == [r["loss"] for r in _metrics(straight)][2:]
    saved = torch.load(straight / "checkpoints" / "step-2" / "extra-rank00000.pt", weights_only=True)["stream"]
    assert saved["position"] == 2 and saved["views"] == "random"


def test_vocabulary_mismatch_names_both_sides(tmp_path, capsys):
    codes = write_corpus(tmp_path / "codes", rows=4, sizes=(256, 512))
    from data.codes import CodeReader

    with pytest.raises(ConfigError, match=r"codebook_sizes: code files \[256, 512\] vs model.codebook_sizes \[256, 256\]"):
        check_vocabulary(CodeReader(codes), GeneratorConfig(), str(codes))
    assert cli(_train_args(tmp_path / "run", codes, 1)) == 2           # fails before any DeepSpeed set-up
    error = capsys.readouterr().err
    assert "codebook_sizes" in error and "[256, 512]" in error and str(codes) in error


def test_packed_stream_covers_one_view_per_image_and_resumes_exactly(corpus):
    config = GeneratorConfig.from_yaml(TINY, [s.removeprefix("model.") for s in SMALL])
    streams = [PackedCodeStream(str(corpus), config, 160, rank, 2, seed=5) for rank in range(2)]
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch
    epoch = [next(s) for s in streams for _ in range(s.steps_per_epoch)]
    total = sum(b.doc.max().item() + 1 for b in epoch)
    assert 48 <= total <= 48 + 2 * 8            # every image once (+ rank padding repeats at most a batch each)
    for batch in epoch:
        assert batch.position.shape[0] == 1 and batch.num_tokens <= 160
        assert (batch.label[batch.valid] < 4).all()
        lengths = unpack(batch).lengths
        assert ((lengths - 3 >= 16) & (lengths - 3 <= 64)).all()   # L in [16, 64] plus BOS and 2 markers
    fresh = PackedCodeStream(str(corpus), config, 160, 0, 2, seed=5)
    state = None
    for i in range(streams[0].steps_per_epoch + 1):   # cross an epoch boundary
        if i == 2:
            state = fresh.state_dict()
        next(fresh)
    expected = [next(fresh) for _ in range(2)]
    replay = PackedCodeStream(str(corpus), config, 160, 0, 2, seed=5)
    replay.load_state_dict(state)
    for _ in range(streams[0].steps_per_epoch - 1):
        next(replay)
    again = [next(replay) for _ in range(2)]
    for a, b in zip(expected, again):
        assert torch.equal(a.position, b.position) and torch.equal(a.content, b.content)


def test_weight_decay_only_on_linear_matrices():
    model = Generator(GeneratorConfig(dim=32, heads=2, position_depth=1, content_depth=1, head_dim=16, head_heads=1))
    decayed, plain = optimizer_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    ids = {id(p) for p in decayed["params"]}
    assert all(p.ndim == 2 for p in decayed["params"])
    assert id(model.position_embed.weight) not in ids and id(model.content_head.code_embed[0].weight) not in ids
    assert id(model.content_head.slot_embed) not in ids
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_stage_config_rejects_unknown_keys_and_bad_views():
    with pytest.raises(ConfigError, match="data.views"):
        GeneratorStageConfig.from_yaml(TINY, ["data.views=some"])
    with pytest.raises(ConfigError, match="data.bogus"):
        GeneratorStageConfig.from_yaml(TINY, ["data.bogus=1"])
