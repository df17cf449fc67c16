"""Mixed precision (fp32 weights + bf16 autocast) run for real on the CPU, and the training step's host syncs.

Launches (subprocesses started together to share the start-up cost), each under PROBE, which records what the
training forward computed in (parameter and activation dtypes) and every host sync made by varitok's own code
inside a training step (``.item()``, ``.tolist()``, ``.cpu()``, ``float()`` ... of a tensor):
``tok1`` (train-tokenizer bf16, 1 process, ZeRO-0, long enough at a high LR for its codes to become decisive),
``tok2`` (bf16, 2 processes, ZeRO-2, grad_accum 2),
``gen2`` / ``gen3`` (train-generator bf16, 2 processes, ZeRO-2 / ZeRO-3 with the sample grid),
``sync1`` (train-tokenizer fp32, 1 process, 2 micro-batches per step, no logging inside the counted steps).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ACCELERATE, free_port, start_process
from models.config import ConfigError
from pipeline.precision import autocast, check_launcher_precision, deepspeed_precision_config, resolve_precision

REPO = Path(__file__).resolve().parent.parent
SIZE = 32
TOK1_STEPS = 30
TOKENIZER = ["-m", "pipeline.cli", "train-tokenizer", "--config", "tiny", f"data.image_size={SIZE}",
             f"model.encoder.resolution={SIZE}", f"model.decoder.resolution={SIZE}", "data.batch_size=2",
             "data.num_workers=0", "loss.disc_ndf=16", "train.zero_stage=0", "logging.tensorboard=false"]
GENERATOR = ["-m", "pipeline.cli", "train-generator", "--config", str(REPO / "configs" / "generator" / "tiny.yaml"),
             "data.max_tokens=160", "data.num_workers=0", "train.log_every=1", "train.ckpt_every=3",
             "optim.warmup_steps=1", "train.ema_decay=0.9", "logging.tensorboard=false", "model.dim=32",
             "model.heads=2", "model.position_depth=1", "model.content_depth=1", "model.head_dim=16",
             "model.head_heads=1", "model.num_classes=4"]

# argv: OUT <varitok args>. Writes OUT-rank{R}.json: {"forward": [{param_dtypes, conv_or_linear_dtypes, loss}],
# "syncs_per_step": [n, ...]} even when the run fails.
PROBE = """
import collections, json, os, sys, traceback
import torch
from pipeline import training
from pipeline.cli import main

out, repo = sys.argv[1], os.getcwd()
rank = int(os.environ.get("RANK", "0"))
record = {"forward": [], "syncs_per_step": [], "sync_sites": []}
counting, syncs = [False], [0]

def count_sync(name):
    original = getattr(torch.Tensor, name)
    def wrapped(self, *args, **kwargs):
        if counting[0]:
            caller = sys._getframe(1).f_code.co_filename
            ours = caller.startswith(repo) and "site-packages" not in caller   # the venv may live in the repo
            if ours and "/tests/" not in caller and "/data/" not in caller:
                syncs[0] += 1
                record["sync_sites"].append(f"{caller}:{sys._getframe(1).f_lineno} {name}")
        return original(self, *args, **kwargs)
    setattr(torch.Tensor, name, wrapped)

for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
    count_sync(name)

activations = []
def keep_dtype(module, inputs, output):
    if torch.is_tensor(output):
        activations.append(str(output.dtype))

def probe_forward(cls):
    forward = cls.forward
    def wrapped(self, *args, **kwargs):
        activations.clear()
        hooks = [m.register_forward_hook(keep_dtype) for m in self.modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        try:
            result = forward(self, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        loss = result[0] if isinstance(result, tuple) else result["loss"]
        record["forward"].append({"params": sorted({str(p.dtype) for p in self.parameters()}),
                                  "activations": sorted(set(activations)), "loss_dtype": str(loss.dtype)})
        return result
    cls.forward = wrapped

from models.generator import Generator
from models.tokenizer.training import TokenizerTrainingModule
probe_forward(TokenizerTrainingModule)
probe_forward(Generator)

# A training step = from one GuardedStep to the next: its data fetch, forward, backward and optimizer step.
init = training.GuardedStep.__init__
def step_started(self, *args, **kwargs):
    if counting[0]:
        record["syncs_per_step"].append(syncs[0])
    counting[0], syncs[0] = True, 0
    init(self, *args, **kwargs)
training.GuardedStep.__init__ = step_started
try:
    code = main(sys.argv[2:])
finally:
    with open(f"{out}-rank{rank}.json", "w") as handle:
        json.dump(record, handle)
sys.exit(code)
"""


# ------------------------------------------------------------------------------------------ policy
def test_precision_rules():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("fp16", "cuda:1") == "fp16"
    with pytest.warns(UserWarning, match="slow"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", "cpu")
    assert deepspeed_precision_config("fp32") == {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    assert deepspeed_precision_config("bf16")["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert deepspeed_precision_config("fp16")["torch_autocast"] == {"enabled": True, "dtype": "float16"}
    check_launcher_precision({"bf16": {"enabled": "auto"}, "fp16": {"enabled": False}})   # "auto" is ours to fill
    with pytest.raises(ConfigError, match="train.precision=bf16"):
        check_launcher_precision({"bf16": {"enabled": True}})
    with torch.autocast("cpu", enabled=False):
        with autocast("bf16", "cpu"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with autocast("fp32", "cpu"):
            assert not torch.is_autocast_enabled("cpu")


def test_codes_are_looked_up_in_fp32_under_bf16_autocast():
    """Under autocast the quantizer's choice is the fp32 (here: fp64) nearest code of the same inputs; a bf16
    lookup of the same inputs would pick other codes for some tokens (so this test can fail)."""
    from models.tokenizer.quantizer import QuantizerConfig, quantize_tokens

    generator = torch.Generator().manual_seed(0)
    u = torch.randn(4096, 8, generator=generator)
    codebook = torch.randn(1024, 8, generator=generator)
    config = QuantizerConfig()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, indices, _ = quantize_tokens(u, codebook, torch.ones(4096), config, training=False)
    unit = torch.nn.functional.normalize
    reference = (unit(u.double(), dim=-1) @ unit(codebook.double(), dim=-1).T).argmax(1)
    assert q.dtype == torch.float32 and torch.equal(indices, reference)
    in_bf16 = (unit(u, dim=-1).bfloat16() @ unit(codebook, dim=-1).bfloat16().T).argmax(1)
    assert (in_bf16 != reference).float().mean() > 0.005


# ------------------------------------------------------------------------------------------ launches
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from data.codes import write_corpus
    from models.tokenizer import Tokenizer, TokenizerConfig
    from test_train_tokenizer import make_shards

    root = tmp_path_factory.mktemp("precision")
    shards = make_shards(root / "data", num_images=16, per_shard=8)
    corpus = write_corpus(root / "codes", rows=48, max_rows_per_batch=16)
    torch.manual_seed(0)
    tokenizer = Tokenizer(TokenizerConfig.from_yaml(REPO / "configs" / "tokenizer" / "tiny.yaml"))
    tokenizer_export = tokenizer.save_pretrained(root / "tokenizer")
    two = lambda zero: ACCELERATE + ["--num_processes", "2", "--use_deepspeed", "--zero_stage", str(zero),  # noqa
                                     "--main_process_port", str(free_port())]
    probe = [sys.executable, "-c", PROBE]
    bf16_tokenizer = [*TOKENIZER, f"data.shards={shards}", "train.precision=bf16", "train.log_every=1",
                      "loss.disc_start=1"]
    steps = lambda n: [f"train.max_steps={n}", f"train.ckpt_every={n}", f"train.image_every={n}"]  # noqa
    launches = {
        # A random or 3-step tokenizer has near-ties in its cosine lookup (~96% of codes survive bf16 autocast);
        # 30 steps at 5x the tiny LR make the codes decisive (see test_bf16_codes_agree_with_fp32_codes).
        "tok1": probe + [str(root / "tok1"), *bf16_tokenizer[2:], *steps(TOK1_STEPS), "optim.lr=5e-3",
                         "optim.warmup_steps=2", f"run.dir={root / 'run-tok1'}"],
        "tok2": two(2) + ["--no_python", *probe, str(root / "tok2"), *bf16_tokenizer[2:], *steps(3),
                          f"run.dir={root / 'run-tok2'}", "train.grad_accum=2", "train.ema_decay=0.9"],
        "gen2": two(2) + ["--no_python", *probe, str(root / "gen2"), *GENERATOR[2:], f"data.codes={corpus}",
                          f"run.dir={root / 'run-gen2'}", "train.max_steps=3", "train.precision=bf16"],
        "gen3": two(3) + ["--no_python", *probe, str(root / "gen3"), *GENERATOR[2:], f"data.codes={corpus}",
                          f"run.dir={root / 'run-gen3'}", "train.max_steps=3", "train.precision=bf16",
                          f"logging.tokenizer={tokenizer_export}", "train.image_every=3"],
        "sync1": probe + [str(root / "sync1"), *TOKENIZER[2:], f"data.shards={shards}", f"run.dir={root / 'run-sync1'}",
                          "train.max_steps=5", "train.grad_accum=2", "train.log_every=100", "train.ckpt_every=100",
                          "train.image_every=100", "loss.disc_start=1"],
    }
    procs = {name: start_process(argv, root / f"{name}.log") for name, argv in launches.items()}
    codes = {name: proc.wait(timeout=600) for name, proc in procs.items()}
    return {"root": root, "codes": codes}


def _check(runs, name: str, world: int = 1) -> list[dict]:
    root = runs["root"]
    assert runs["codes"][name] == 0, (root / f"{name}.log").read_text()[-4000:]
    return [json.loads((root / f"{name}-rank{rank}.json").read_text()) for rank in range(world)]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def _assert_fp32_files(run_dir: Path, step: int) -> None:
    for path in (run_dir / "export" / "model.safetensors",
                 run_dir / "checkpoints" / f"step-{step}" / "model.safetensors"):
        assert {value.dtype for value in load_file(str(path)).values()} == {torch.float32}, path


@pytest.mark.slow
@pytest.mark.parametrize("name, world, steps", [("tok1", 1, TOK1_STEPS), ("tok2", 2, 3)])
def test_bf16_tokenizer_training_computes_in_bf16_over_fp32_weights(runs, name, world, steps):
    for record in _check(runs, name, world):
        assert len(record["forward"]) == steps * (2 if name == "tok2" else 1)
        for forward in record["forward"]:
            # fp32 master weights (never cast by DeepSpeed), bf16 convs (autocast), fp32 loss.
            assert forward["params"] == ["torch.float32"] and forward["activations"] == ["torch.bfloat16"]
            assert forward["loss_dtype"] == "torch.float32"
    run_dir = runs["root"] / f"run-{name}"
    rows = _metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(row["loss/total"])) for row in rows)
    assert "loss/gan_d" in rows[-1] and torch.isfinite(torch.tensor(rows[-1]["loss/gan_d"]))   # the GAN ran
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bad_steps"] == 0 and summary["world_size"] == world
    _assert_fp32_files(run_dir, steps)
    assert (run_dir / "images" / f"step-{steps:07d}.png").is_file()   # grids from the bf16 reconstruction


@pytest.mark.slow
def test_bf16_codes_agree_with_fp32_codes(runs):
    """The tokenizer trained in bf16 (tok1) encodes held-out images under bf16 autocast into the codes of an
    fp32 forward of the same weights on the same batch: the same grain maps and the same codes at >= 99% of
    positions (the lookup runs in fp32; what differs is the bf16 encoder's features)."""
    from data.demo_images import procedural_image
    from models.tokenizer import Tokenizer

    _check(runs, "tok1")
    tokenizer = Tokenizer.from_pretrained(runs["root"] / "run-tok1" / "export")
    pixels = [procedural_image(10_000 + i, SIZE, label=i % 2) for i in range(64)]   # not among the 16 shards'
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    features = []
    hook = tokenizer.encoder.register_forward_hook(lambda module, inputs, output: features.append(
        sorted({str(level.dtype) for level in output})))
    fp32 = tokenizer.encode(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = tokenizer.encode(images)
    hook.remove()
    assert features == [["torch.float32"], ["torch.bfloat16"]]     # the second encode really computed in bf16

    grain_fp32, grain_bf16 = torch.stack([c.grain for c in fp32]), torch.stack([c.grain for c in bf16])
    assert len(grain_fp32.unique()) == tokenizer.num_levels    # the router uses every granularity
    assert (grain_fp32 == grain_bf16).float().mean() >= 0.99
    same_map = [b for b in range(len(images)) if torch.equal(fp32[b].grain, bf16[b].grain)]
    assert len(same_map) >= 0.95 * len(images)
    # A position agrees when all K factorized codes agree.
    agree = torch.cat([(fp32[b].codes == bf16[b].codes).all(1) for b in same_map]).float().mean()
    assert agree >= 0.99, f"{float(agree):.4f} of positions kept their codes under bf16"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gen2", "gen3"])
def test_bf16_generator_training_under_zero2_and_zero3(runs, name):
    for record in _check(runs, name, world=2):
        assert len(record["forward"]) == 3
        for forward in record["forward"]:
            assert forward["activations"] == ["torch.bfloat16"] and forward["loss_dtype"] == "torch.float32"
            if name == "gen2":    # ZeRO-3 partitions parameters into placeholders outside its gather
                assert forward["params"] == ["torch.float32"]
    run_dir = runs["root"] / f"run-{name}"
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in _metrics(run_dir))
    assert json.loads((run_dir / "summary.json").read_text())["bad_steps"] == 0
    _assert_fp32_files(run_dir, 3)
    if name == "gen3":
        assert (run_dir / "images" / "samples-step-3.png").is_file()   # sampled on the device under autocast


@pytest.mark.slow
def test_training_step_makes_at_most_one_host_sync(runs):
    """Between two optimizer steps (data, 2 forwards, 2 backwards, the step), varitok's own code reads a device
    value back at most once: the all-reduced count of NaN/Inf losses."""
    record, = _check(runs, "sync1")
    assert len(record["syncs_per_step"]) == 4
    assert max(record["syncs_per_step"]) <= 1, record["sync_sites"]
    assert sum(record["syncs_per_step"]) == 4      # and the guard's one sync is really made (the probe sees it)
