"""Elastic resume of both training stages: real accelerate launches (DeepSpeed, gloo, CPU) that continue a run
on another number of processes or data workers with ``--resume auto`` and nothing else.

Three chains run side by side (each one sequential), every launch under PROBE, which records the sample keys
(stage 1) or global code-batch positions (stage 3) of every micro-batch the loop draws, and the consolidated
fp32 weights + Adam moments, persistent buffers and frozen parameters (tests/test_elastic_checkpoint.py
``consolidated_state``) right before each checkpoint save and right after the resume:

- ``tok``: train-tokenizer with EMA codebooks, 24 images of batch 2 = 6 optimizer steps per epoch at 4 images per
  step: 2 processes ZeRO-2 to step 2, 1 process to step 4 (grad_accum 2), 2 processes to step 6 (the epoch's end).
- ``workers``: train-tokenizer 2 processes x 2 data workers to step 3, then 2 processes x 1 worker to 6.
- ``gen``: train-generator ZeRO-3, 2 processes to step 2, 1 process to step 4 (grad_accum 2), 2 processes to 6
  (train.max_steps=6 throughout: it shapes the learning-rate schedule; the first legs exit after a checkpoint).

The continued run is not compared with an uninterrupted one: a new world size changes the summation order of
the gradient all-reduce (and of ZeRO's partitioned norms), so it agrees to float rounding only.
"""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ACCELERATE, free_port, start_process
from test_train_tokenizer import SMALL as TOKENIZER_SMALL, make_shards

REPO = Path(__file__).resolve().parent.parent
IMAGES, BATCH = 24, 2
TOKENIZER = ["-m", "pipeline.cli", "train-tokenizer", "--config", "tiny", *TOKENIZER_SMALL, "train.zero_stage=2",
             "train.log_every=1", "train.ckpt_every=100", "train.image_every=100", "loss.disc_start=1",
             "train.ema_decay=0.9", "logging.tensorboard=false"]
EMA_CODEBOOKS = "model.quantizer.codebook_update=ema"   # the "tok" chain's: frozen codebooks + EMA buffers
GENERATOR = ["-m", "pipeline.cli", "train-generator", "--config", str(REPO / "configs" / "generator" / "tiny.yaml"),
             "data.max_tokens=160", "data.num_workers=0", "train.zero_stage=3", "train.log_every=1",
             "train.ckpt_every=2", "optim.warmup_steps=1", "train.ema_decay=0.9", "logging.tensorboard=false",
             "model.dim=32", "model.heads=2", "model.position_depth=1", "model.content_depth=1", "model.head_dim=16",
             "model.head_heads=1", "model.num_classes=4"]

# argv: OUT STOP <varitok args>. Appends OUT-draws-rank{R}.jsonl (one line per micro-batch drawn by the loop: the
# image keys, or the code batch's epoch and global position), writes OUT-saved-rank{R}.pt before every
# checkpoint save and OUT-resumed-rank{R}.pt after a resume that loaded one (consolidated_state). STOP > 0: every
# rank exits (code 0) right after the checkpoint of step STOP is saved, as a preempted job would (stage 3 keeps
# train.max_steps, which shapes its learning-rate schedule, so its legs stop early instead).
PROBE = """
import json, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import torch
from data.stream import ShardStream
from pipeline import checkpoint, train_generator
from pipeline.cli import main
from pipeline.training import zero_stage
from test_elastic_checkpoint import consolidated_state

out, stop, rank = sys.argv[1], int(sys.argv[2]), int(os.environ.get("RANK", "0"))

def draw(record):
    with open(f"{out}-draws-rank{rank}.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\\n")

shard_iter = ShardStream.__iter__
def keyed_iter(self):
    for batch in shard_iter(self):
        draw({"keys": list(batch["key"])})
        yield batch
ShardStream.__iter__ = keyed_iter

code_next = train_generator.PackedCodeStream.__next__
def positioned_next(self):
    batch = code_next(self)
    b = self.batcher
    draw({"epoch": b.epoch, "position": b.start + (b.position - 1) * b.world_size + b.rank})
    return batch
train_generator.PackedCodeStream.__next__ = positioned_next

def dump(manager, name):
    state = consolidated_state(manager.accelerator._models[0], zero_stage(manager.accelerator))
    torch.save(state, f"{out}-{name}-rank{rank}.pt")

save, resume = checkpoint.CheckpointManager.save, checkpoint.CheckpointManager.resume
def probed_save(self, step, *args, **kwargs):
    dump(self, "saved")
    path = save(self, step, *args, **kwargs)
    if step == stop:
        os._exit(0)
    return path
def probed_resume(self, *args, **kwargs):
    step = resume(self, *args, **kwargs)
    if step:
        dump(self, "resumed")
    return step
checkpoint.CheckpointManager.save, checkpoint.CheckpointManager.resume = probed_save, probed_resume
sys.exit(main(sys.argv[3:]))
"""


def _launch(out: Path, args: list[str], nproc: int, zero: int, stop: int) -> int:
    probe = [sys.executable, "-c", PROBE, str(out), str(stop)]
    if nproc > 1:
        probe = ACCELERATE + ["--num_processes", str(nproc), "--use_deepspeed", "--zero_stage", str(zero),
                              "--main_process_port", str(free_port()), "--no_python", *probe]
    return start_process(probe + args, Path(f"{out}.log")).wait(timeout=600)


def _chain(root: Path, name: str, stage: list[str], legs: list[tuple[int, int, list[str]]], zero: int,
           max_steps: int = 0) -> dict:
    """Run the legs (processes, last step, extra args) one after the other on one run directory; a leg ends at
    train.max_steps = its last step, or (``max_steps``: the run's train.max_steps) by exiting after that
    step's checkpoint."""
    run_dir, codes = root / name, []
    for leg, (nproc, steps, extra) in enumerate(legs):
        args = [*stage[2:], f"run.dir={run_dir}", f"train.max_steps={max_steps or steps}", *extra, "--resume", "auto"]
        stop = steps if max_steps and steps < max_steps else 0
        codes.append(_launch(root / f"{name}{leg}", args, nproc, zero, stop))
        if codes[-1]:
            break
    return {"dir": run_dir, "codes": codes, "out": [root / f"{name}{leg}" for leg in range(len(legs))]}


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    from data.codes import write_corpus

    root = tmp_path_factory.mktemp("elastic")
    shards = make_shards(root / "data", num_images=IMAGES, per_shard=6)
    corpus = write_corpus(root / "codes", rows=48, max_rows_per_batch=16)
    images = [f"data.shards={shards}"]
    ema = [*images, EMA_CODEBOOKS]
    jobs = {
        "tok": (TOKENIZER, [(2, 2, ema), (1, 4, ema), (2, 6, ema)], 2),
        "workers": (TOKENIZER, [(2, 3, images + ["data.num_workers=2"]), (2, 6, images + ["data.num_workers=1"])], 2),
        "gen": (GENERATOR, [(2, 2, [f"data.codes={corpus}"]), (1, 4, [f"data.codes={corpus}"]),
                            (2, 6, [f"data.codes={corpus}"])], 3, 6),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(_chain, root, name, *job) for name, job in jobs.items()}
        results = {name: future.result() for name, future in futures.items()}
    results["shards"] = shards
    return results


def _ok(chains, name: str) -> dict:
    chain = chains[name]
    for out, code in zip(chain["out"], chain["codes"]):
        assert code == 0, Path(f"{out}.log").read_text()[-5000:]
    assert len(chain["codes"]) == len(chain["out"])
    return chain


def _draws(out: Path, world: int) -> list[list[dict]]:
    return [[json.loads(line) for line in Path(f"{out}-draws-rank{rank}.jsonl").read_text().splitlines()]
            for rank in range(world)]


def _state(out: Path, name: str, rank: int = 0) -> dict:
    return torch.load(f"{out}-{name}-rank{rank}.pt", map_location="cpu", weights_only=True)


def _assert_bit_exact(saved: dict, loaded: dict) -> None:
    """Trained parameters, Adam moments, steps, group hyperparameters, and the state no optimizer holds:
    persistent buffers (router calibration, EMA codebook statistics) and frozen parameters (EMA codebooks)."""
    assert saved["params"].keys() == loaded["params"].keys()
    for name, entry in saved["params"].items():
        for key, value in entry.items():
            assert torch.equal(value, loaded["params"][name][key]), (name, key)
    assert sorted(saved["steps"]) == sorted(loaded["steps"])
    assert saved["groups"] == loaded["groups"]
    for kind in ("buffers", "frozen"):
        assert saved[kind].keys() == loaded[kind].keys(), kind
        for name, value in saved[kind].items():
            assert torch.equal(value, loaded[kind][name]), (kind, name)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def _layout(world: int, accum: int, workers: int, step: int | None = None) -> dict:
    layout = {"world_size": world, "grad_accum": accum, "num_workers": workers}
    return layout if step is None else {"step": step, **layout}


# ------------------------------------------------------------------------------------------ stage 1
@pytest.mark.slow
def test_tokenizer_two_one_two_processes_sees_every_sample_once_bit_exact(chains):
    chain = _ok(chains, "tok")
    worlds = (2, 1, 2)
    keys = [key for out, world in zip(chain["out"], worlds) for rank in _draws(out, world) for d in rank
            for key in d["keys"]]
    assert len(keys) == IMAGES and len(set(keys)) == IMAGES       # the whole epoch, each sample exactly once
    micro_batches = [len(rank) for out, world in zip(chain["out"], worlds) for rank in _draws(out, world)]
    assert micro_batches == [2, 2, 4, 2, 2]                      # 4 images per optimizer step throughout
    # the weights, Adam moments and buffers right after each resume are the saved ones, bit for bit, on every rank
    # (DeepSpeed's universal loader alone leaves the buffers and frozen EMA codebooks at their init values)
    saved = _state(chain["out"][0], "saved")
    assert saved["buffers"].keys() == {"tokenizer.router.level_bias",
                                       *(f"tokenizer.quantizer.ema_{s}_{k}" for s in ("count", "sum") for k in (0, 1))}
    assert saved["frozen"].keys() == {"tokenizer.quantizer.codebooks.0", "tokenizer.quantizer.codebooks.1"}
    assert all(saved["buffers"][name].abs().max() > 0 for name in saved["buffers"])   # level_bias, counts start at 0
    _assert_bit_exact(saved, _state(chain["out"][1], "resumed"))
    for rank in range(2):
        _assert_bit_exact(_state(chain["out"][1], "saved"), _state(chain["out"][2], "resumed", rank))
    summary = json.loads((chain["dir"] / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"] == 4 and summary["images_per_step"] == 4
    assert summary["canonical_units"] == 2 and summary["layout"] == _layout(2, 1, 0)
    assert summary["layouts"] == [_layout(2, 1, 0, 0), _layout(1, 2, 0, 2), _layout(2, 1, 0, 4)]
    events = [line for line in _metrics(chain["dir"]) if "event" in line]
    assert [(e["event"], e["step"], e["from"], e["to"]) for e in events] == [
        ("layout", 2, _layout(2, 1, 0), _layout(1, 2, 0)), ("layout", 4, _layout(1, 2, 0), _layout(2, 1, 0))]
    assert all(e["global_batch"]["from"] == e["global_batch"]["to"] == 2 and not e["global_batch"]["changed"]
               for e in events)
    assert summary["layout_change"]["step"] == 4
    steps = [line["step"] for line in _metrics(chain["dir"]) if "event" not in line]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_tokenizer_two_workers_to_one_worker_continues_the_epoch(chains):
    chain = _ok(chains, "workers")
    keys = [key for out in chain["out"] for rank in _draws(out, 2) for d in rank for key in d["keys"]]
    assert len(keys) == IMAGES and len(set(keys)) == IMAGES
    assert _state(chain["out"][0], "saved")["buffers"]["tokenizer.router.level_bias"].abs().max() > 0
    for rank in range(2):
        _assert_bit_exact(_state(chain["out"][0], "saved", rank), _state(chain["out"][1], "resumed", rank))
    summary = json.loads((chain["dir"] / "summary.json").read_text())
    assert summary["canonical_units"] == 4 and summary["layouts"] == [_layout(2, 1, 2, 0), _layout(2, 1, 1, 3)]
    events = [line for line in _metrics(chain["dir"]) if "event" in line]
    assert [(e["step"], e["from"], e["to"]) for e in events] == [(3, _layout(2, 1, 2), _layout(2, 1, 1))]


@pytest.mark.slow
def test_world_sizes_that_cannot_keep_the_global_batch_fail_in_prepare(chains, monkeypatch):
    from models.config import ConfigError
    from pipeline.config import load_config
    from pipeline.stages import TokenizerStageConfig
    from pipeline.train_tokenizer import prepare

    run_dir = _ok(chains, "tok")["dir"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    overrides = [*TOKENIZER[5:], f"run.dir={run_dir}", f"data.shards={chains['shards']}", "train.max_steps=8",
                 EMA_CODEBOOKS]
    cfg = load_config(TokenizerStageConfig, "tiny", overrides, kind="tokenizer")
    with pytest.raises(ConfigError, match=r"2 processes x grad_accum 1.*global batch of 2 micro-batches.*cannot be "
                                          r"kept on 3 ranks.*\[1, 2\].*train.allow_new_global_batch=true"):
        prepare(cfg, "auto")
    # accepting a new global batch still needs processes x workers to divide the run's 2 canonical units
    cfg = load_config(TokenizerStageConfig, "tiny", [*overrides, "train.allow_new_global_batch=true"],
                      kind="tokenizer")
    with pytest.raises(ConfigError, match=r"the checkpoint's 2 canonical units cannot be served by 3 ranks x 1 "
                                          r"workers.*\(this run: 3 processes, data.num_workers=0\)"):
        prepare(cfg, "auto")
    monkeypatch.setenv("WORLD_SIZE", "1")           # 1 process keeps it with grad_accum 2
    cfg = load_config(TokenizerStageConfig, "tiny", [*overrides, "data.canonical_units=6"], kind="tokenizer")
    with pytest.raises(ConfigError, match=r"data.canonical_units=6 but the checkpoint's data order has 2"):
        prepare(cfg, "auto")
    cfg = load_config(TokenizerStageConfig, "tiny", overrides, kind="tokenizer")
    prepared = prepare(cfg, "auto")
    assert (prepared.layout.grad_accum, cfg.train.grad_accum, prepared.layout.step_entries) == (2, 2, 2)
    assert prepared.stream.canonical_units == 2 and prepared.stream.step_entries == 2


# ------------------------------------------------------------------------------------------ stage 3
@pytest.mark.slow
def test_generator_zero3_two_one_two_processes_keeps_tokens_per_step(chains):
    chain = _ok(chains, "gen")
    worlds = (2, 1, 2)
    draws = [d for out, world in zip(chain["out"], worlds) for rank in _draws(out, world) for d in rank]
    assert len(draws) == 6 * 2                               # 2 micro batches of 160 tokens per optimizer step
    positions = sorted((d["epoch"], d["position"]) for d in draws)
    assert len(set(positions)) == len(positions)             # no code batch drawn twice
    by_epoch = {}
    for epoch, position in positions:
        by_epoch.setdefault(epoch, []).append(position)
    assert by_epoch[0] == list(range(len(by_epoch[0])))     # the global list in order, nothing skipped
    _assert_bit_exact(_state(chain["out"][0], "saved"), _state(chain["out"][1], "resumed"))
    for rank in range(2):
        _assert_bit_exact(_state(chain["out"][1], "saved"), _state(chain["out"][2], "resumed", rank))
    summary = json.loads((chain["dir"] / "summary.json").read_text())
    assert summary["token_budget_per_step"] == 320 and summary["zero_stage"] == 3
    assert summary["layouts"] == [_layout(2, 1, 0, 0), _layout(1, 2, 0, 2), _layout(2, 1, 0, 4)]
    events = [line for line in _metrics(chain["dir"]) if "event" in line]
    assert [(e["step"], e["to"]["grad_accum"], e["global_batch"]["unit"]) for e in events] == [
        (2, 2, "micro-batches of 160 tokens"), (4, 1, "micro-batches of 160 tokens")]


# ------------------------------------------------------------------------------------------ bad input, fast
def test_canonical_units_smaller_than_processes_x_workers_fail_in_prepare(tmp_path, monkeypatch):
    from models.config import ConfigError
    from pipeline.config import load_config
    from pipeline.stages import TokenizerStageConfig
    from pipeline.train_tokenizer import prepare

    shards = make_shards(tmp_path, num_images=4, per_shard=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    overrides = [*TOKENIZER[5:], f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", "data.num_workers=2"]
    cfg = load_config(TokenizerStageConfig, "tiny", [*overrides, "data.canonical_units=2"], kind="tokenizer")
    with pytest.raises(ConfigError, match=r"data.canonical_units=2: 2 canonical units cannot be served by 2 ranks x 2 "
                                          r"workers = 4 readers.*one of \[1, 2\].*data.num_workers=2"):
        prepare(cfg, None)
    cfg = load_config(TokenizerStageConfig, "tiny", overrides, kind="tokenizer")   # null: processes x workers
    assert prepare(cfg, None).stream.canonical_units == 4 and cfg.data.canonical_units == 4
