"""varitok train-generator: 2-process ZeRO-2 / ZeRO-3 training from a synthetic code corpus, NaN/Inf losses
skipped on every rank (ZeRO-3) and stopping the run after train.max_bad_steps, exact resume, vocabulary checks,
packed data stream and optimiser groups."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ACCELERATE, free_port, launch_env
from data.codes import write_corpus
from models.config import ConfigError
from models.generator import Generator, GeneratorConfig, unpack
from pipeline.cli import main as cli
from pipeline.config import TrainConfig
from pipeline.stages import GeneratorStageConfig
from pipeline.train_generator import PackedCodeStream, check_labels_and_lengths, check_vocabulary, optimizer_groups

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "generator" / "tiny.yaml"
# A smaller model than the preset (same vocabulary) keeps every launch within a few seconds of compute.
SMALL = ["model.dim=32", "model.heads=2", "model.position_depth=1", "model.content_depth=1", "model.head_dim=16",
         "model.head_heads=1", "model.num_classes=4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("codes"), rows=48, max_rows_per_batch=16)


def _train_args(run_dir: Path, corpus: Path, steps: int, extra=()) -> list[str]:
    return ["train-generator", "--config", str(TINY), f"run.dir={run_dir}", f"data.codes={corpus}",
            "data.max_tokens=160", "data.num_workers=0", f"train.max_steps={steps}", "train.log_every=1",
            "train.ckpt_every=2", "train.keep_last=3", "optim.warmup_steps=1", "train.ema_decay=0.9",
            "logging.tensorboard=false", *SMALL, *extra]


# Runs the CLI with Generator.forward wrapped: before every training forward it records a digest of this
# rank's copy of the weights (its ZeRO-3 partition, else the whole tensors) and the loss; on rank POISON_RANK
# it turns the loss of the listed forward calls (1-based) into NaN. Writes OUT-rank{R}.json even on failure.
# argv: POISON_RANK CALLS OUT <train-generator args>
NAN_HOOK = """
import hashlib, json, os, sys
from models.generator import Generator
from pipeline.cli import main

poison_rank, poison_calls, out = int(sys.argv[1]), {int(c) for c in sys.argv[2].split(",")}, sys.argv[3]
rank, calls, forward = int(os.environ.get("RANK", "0")), [], Generator.forward

def local_digest(module):
    blob = hashlib.sha256()
    for p in module.parameters():
        blob.update(getattr(p, "ds_tensor", p).detach().float().contiguous().numpy().tobytes())
    return blob.hexdigest()

def poisoned(self, batch):
    digest = local_digest(self)
    metrics = forward(self, batch)
    calls.append({"digest": digest, "loss": metrics["loss"].item()})
    if rank == poison_rank and len(calls) in poison_calls:
        metrics["loss"] = metrics["loss"] * float("nan")
    return metrics

Generator.forward = poisoned
try:
    code = main(sys.argv[4:])
finally:
    with open(f"{out}-rank{rank}.json", "w") as handle:
        json.dump(calls, handle)
sys.exit(code)
"""


def _launch(args: list[str], nproc: int, zero: int, poison: tuple = (), ok: bool = True,
            timeout: int = 240) -> subprocess.CompletedProcess:
    """Run train-generator on ``nproc`` processes; ``poison`` = (rank, "call,call", out) runs it under NAN_HOOK."""
    program = [sys.executable, "-c", NAN_HOOK, *map(str, poison)] if poison else [sys.executable, "-m", "pipeline.cli"]
    command = program + args
    if nproc > 1:
        command = ACCELERATE + ["--num_processes", str(nproc), "--num_machines", "1", "--use_deepspeed",
                                "--zero_stage", str(zero), "--main_process_port", str(free_port()), "--no_python",
                                *command]
    result = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert (result.returncode == 0) == ok, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _hook_calls(out: Path, world: int = 2) -> list[list[dict]]:
    return [json.loads(Path(f"{out}-rank{rank}.json").read_text()) for rank in range(world)]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer_export(tmp_path_factory) -> Path:
    """Random-weight tiny tokenizer (64px, 2 levels, K=2 x 256: the tiny generator's vocabulary)."""
    from models.tokenizer import Tokenizer, TokenizerConfig

    torch.manual_seed(0)
    tokenizer = Tokenizer(TokenizerConfig.from_yaml(REPO / "configs" / "tokenizer" / "tiny.yaml"))
    return tokenizer.save_pretrained(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_zero_training_exports_a_loadable_generator(tmp_path, corpus, tokenizer_export, zero):
    run_dir = tmp_path / "run"
    if zero == 2:
        _launch(_train_args(run_dir, corpus, steps=4), nproc=2, zero=zero)
    else:
        # Under ZeRO-3 the sample grid gathers partitioned (EMA) weights, and the loss of rank 1's third
        # micro batch is NaN: that step is skipped on both ranks and training goes on.
        grid = [f"logging.tokenizer={tokenizer_export}", "train.image_every=4"]
        _launch(_train_args(run_dir, corpus, steps=4, extra=grid), nproc=2, zero=zero,
                poison=(1, "3", tmp_path / "hook"))
        from PIL import Image

        picture = Image.open(run_dir / "images" / "samples-step-4.png")
        assert picture.size[0] > 4 * 64 and picture.size[1] > 2 * 64    # 4 classes, samples + granularity rows
        for calls in _hook_calls(tmp_path / "hook"):
            digests = [c["digest"] for c in calls]
            assert len(calls) == 5 and all(np.isfinite(c["loss"]) for c in calls)   # 4 steps + the skipped one
            assert digests[3] == digests[2]                            # the NaN micro batch changed nothing
            assert len({digests[0], digests[1], digests[2], digests[4]}) == 4   # every kept step did
        assert [r["bad_steps"] for r in _metrics(run_dir)] == [0, 0, 1, 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == zero and summary["steps"] == 4
    assert summary["bad_steps"] == (zero == 3)
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


@pytest.mark.slow
def test_non_finite_losses_in_a_row_stop_zero3_training_with_a_clear_error(tmp_path, corpus):
    run_dir = tmp_path / "run"
    result = _launch(_train_args(run_dir, corpus, steps=4, extra=["train.max_bad_steps=2"]), nproc=2, zero=3,
                     poison=(0, "2,3", tmp_path / "hook"), ok=False)
    message = "loss or gradient was NaN/Inf for 2 steps in a row (at step 2; train.max_bad_steps=2)"
    assert message in result.stdout + result.stderr
    for calls in _hook_calls(tmp_path / "hook"):
        assert len(calls) == 3 and calls[2]["digest"] == calls[1]["digest"] != calls[0]["digest"]
    assert not (run_dir / "checkpoints" / "step-2").exists()


@pytest.mark.slow
def test_resume_after_kill_equals_straight_run(tmp_path, corpus, capsys):
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
    assert saved["consumed"] == 2 and saved["views"] == "random"
    # A changed key that is not declared resumable is refused before any process group (prepare);
    # declared ones (log cadence, loader workers, where the code files live) resume to the same weights.
    capsys.readouterr()
    assert cli(_train_args(killed, corpus, steps=4, extra=["optim.weight_decay=0.05"])) == 2
    assert "config differs (optim.weight_decay: checkpoint" in capsys.readouterr().err
    moved = tmp_path / "moved-codes"
    shutil.copytree(corpus, moved)
    result = _launch(_train_args(killed, moved, steps=4, extra=["train.log_every=2", "data.num_workers=1", "--resume",
                                                                 str(killed / "checkpoints" / "step-2")]),
                     nproc=1, zero=0)
    assert "(from 2)" in result.stdout
    a = load_file(str(straight / "checkpoints" / "step-4" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "step-4" / "model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


@dataclasses.dataclass
class NewTrainConfig(TrainConfig):
    new_knob: int = 0                       # a key added to the schema after the resume rule was written


@dataclasses.dataclass
class NewStageConfig(GeneratorStageConfig):
    train: NewTrainConfig = dataclasses.field(default_factory=NewTrainConfig)


def test_resume_identity_is_the_resolved_config_minus_the_declared_resumable_keys(tmp_path, corpus):
    from data.codes import CodeReader
    from pipeline.checkpoint import ResumeError, check_compatible
    from pipeline.train_generator import resume_identity

    reader = CodeReader(corpus)

    def compatible(before: list[str], now: list[str], schema=GeneratorStageConfig) -> None:
        saved = resume_identity(schema.from_dict({}, before), reader)
        check_compatible({"world_size": 1, "zero_stage": 2, "config_identity": saved}, 1, 2,
                         resume_identity(schema.from_dict({}, now), reader))

    with pytest.raises(ResumeError, match=r"train\.new_knob: checkpoint 1, this run 2"):
        compatible(["train.new_knob=1"], ["train.new_knob=2"], NewStageConfig)
    for key, value in [("model.dropout", "0.2"), ("data.views", "all"), ("run.seed", "3"), ("optim.lr", "0.5"),
                       ("train.max_steps", "7"), ("data.max_tokens", "99")]:
        with pytest.raises(ResumeError, match=re.escape(f"{key}: checkpoint")):
            compatible([], [f"{key}={value}"])
    resumable = {"run.dir": "elsewhere", "data.codes": str(tmp_path), "data.num_workers": "7", "train.log_every": "3",
                 "train.ckpt_every": "5", "train.keep_last": "9", "train.image_every": "11", "train.precision": "fp32",
                 "train.zero_stage": "3", "train.max_bad_steps": "4", "train.watchdog_s": "0",
                 "logging.grid_cfg": "3.0", "logging.tensorboard": "false",
                 # the launch layout: grad_accum is recomputed on resume to keep processes x grad_accum
                 "train.grad_accum": "2", "train.allow_new_global_batch": "true"}
    compatible([], [f"{key}={value}" for key, value in resumable.items()])
    compatible(["data.row_length=0", "data.max_tokens=160"], ["data.row_length=160", "data.max_tokens=160"])
    identity = resume_identity(GeneratorStageConfig.from_dict({}), reader)
    assert identity["data"]["rows"] == len(reader) and "tokenizer" in identity["data"]
    assert "codes" not in identity["data"] and "logging" not in identity and "dir" not in identity["run"]


@pytest.mark.parametrize("schema_name", ["TokenizerStageConfig", "GeneratorStageConfig"])
def test_every_declared_resumable_key_is_a_key_of_its_stage_schema(schema_name):
    import pipeline.stages
    from data.identity import flatten

    schema = getattr(pipeline.stages, schema_name)
    values = schema.from_dict({}).to_dict()
    keys = set(flatten(values)) | set(values)
    assert set(schema.RESUMABLE) <= keys, set(schema.RESUMABLE) - keys
    declared = lambda key: any(key == r or key.startswith(r + ".") for r in schema.RESUMABLE)  # noqa: E731
    # the identity is exactly the resolved config's keys that are not declared resumable
    assert set(flatten(schema.from_dict({}).resume_identity())) == {k for k in flatten(values) if not declared(k)}


def test_vocabulary_mismatch_names_both_sides(tmp_path, capsys):
    codes = write_corpus(tmp_path / "codes", rows=4, sizes=(256, 512))
    from data.codes import CodeReader

    with pytest.raises(ConfigError,
                       match=r"codebook_sizes: code files \[256, 512\] vs model.codebook_sizes \[256, 256\]"):
        check_vocabulary(CodeReader(codes), GeneratorConfig(), str(codes))
    assert cli(_train_args(tmp_path / "run", codes, 1)) == 2           # fails before any DeepSpeed set-up
    error = capsys.readouterr().err
    assert "codebook_sizes" in error and "[256, 512]" in error and str(codes) in error


def test_labels_and_lengths_are_checked_before_the_first_step(tmp_path, capsys):
    codes = write_corpus(tmp_path / "codes", rows=8, num_classes=9, seed=1)
    from data.codes import CodeReader

    config = GeneratorConfig.from_yaml(TINY, [s.removeprefix("model.") for s in SMALL])   # 4 classes
    with pytest.raises(ConfigError, match=r"labels >= model.num_classes=4 \(largest [4-8]\); set model.num_classes"):
        check_labels_and_lengths(CodeReader(codes), config, 160, str(codes))
    assert cli(_train_args(tmp_path / "run", codes, 1)) == 2            # before any process group or step
    error = capsys.readouterr().err
    assert "model.num_classes=4" in error and str(codes) in error
    assert not (tmp_path / "run" / "logs" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="data.row_length"):
        check_labels_and_lengths(CodeReader(codes), GeneratorConfig.from_yaml(TINY, ["num_classes=9"]), 40, str(codes))


def test_packed_stream_covers_one_view_per_image_and_resumes_exactly(corpus):
    config = GeneratorConfig.from_yaml(TINY, [s.removeprefix("model.") for s in SMALL])
    streams = [PackedCodeStream(str(corpus), config, 160, rank, 2, seed=5) for rank in range(2)]
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch
    epoch = [next(s) for s in streams for _ in range(s.steps_per_epoch)]
    total = sum(b.doc.max().item() + 1 for b in epoch)
    assert 48 <= total <= 48 + 2 * 8            # every image once (+ rank padding repeats at most a batch each)
    for batch in epoch:
        assert batch.position.shape == (1, 160) and batch.num_tokens <= 160      # fixed row length
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
