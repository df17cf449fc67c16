"""Checkpoints that resume on another world size: real DeepSpeed engines, real multi-process runs (gloo, CPU).

This file is also the training harness the slow tests launch (``python tests/test_elastic_checkpoint.py ...``,
under torchrun for 2 processes): a tiny module trained through the real build_accelerator / CheckpointManager
path, the way a stage does it: :func:`saved_layout` + ``grad_accum_for`` before the accelerator,
``resume``, train, ``save``. It dumps the consolidated state (full fp32 master weight and Adam's exp_avg,
exp_avg_sq per parameter name, step and hyperparameters per param group) gathered from the live engine, so a
test compares the state before a save with the state after a load on another world size, bit for bit.
Models: "pair" = the stage-1 shape (ToyNet + critic in one module, two param groups, GroupClippedAdamW),
"generator" = the stage-3 shape (one model, decay / no-decay groups with different weight decay, AdamW).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

_STARTED = time.perf_counter()

import pytest  # noqa: E402
import torch  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for _path in (str(REPO), str(TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from data.epoch import grad_accum_for  # noqa: E402
from pipeline.checkpoint import (CHECKSUMS, ResumeError, UNIVERSAL, check_compatible, layout_of,  # noqa: E402
                                 no_pickled_code, read_meta, saved_layout, write_checksums)

LR = 1e-2
ADAM_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------------------------------ the harness
def _batch(index: int, dim: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Global micro-batch ``index`` (the same data whatever the layout)."""
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1000 + index))
    return x, torch.sin(3 * x).flip(-1)


class _Positions:
    """An ``extra`` object: micro-batches this rank drew; remembers the state it was handed on resume."""

    def __init__(self, rank: int):
        self.rank, self.micro_batches, self.received = rank, 0, None

    def state_dict(self) -> dict:
        return {"rank": self.rank, "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        self.received = state
        ranks = state if isinstance(state, list) else [state]   # every saved rank's state after a world change
        self.micro_batches = sum(int(s["micro_batches"]) for s in ranks)


def _build(kind: str, config):
    from models.tokenizer.training import GroupClippedAdamW
    from toy_train import ToyNet, ToyPair

    torch.manual_seed(0)
    if kind == "pair":
        model = ToyPair(config)
        groups = [{"params": list(model.net.parameters()), "lr": LR, "name": "tokenizer", "max_grad_norm": 1.0},
                  {"params": list(model.critic.parameters()), "lr": 10 * LR, "name": "discriminator",
                   "max_grad_norm": 0.5}]
        return model, GroupClippedAdamW(groups, betas=(0.5, 0.9), weight_decay=0.0)
    model = ToyNet(config)
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n.endswith("weight")], "weight_decay": 0.05, "name": "decay"},
              {"params": [p for n, p in named if not n.endswith("weight")], "weight_decay": 0.0, "name": "no_decay"}]
    return model, torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))


def consolidated_state(engine, zero: int) -> dict:
    """Full fp32 master weights and Adam moments per trained parameter name, step and hyperparameters per group,
    and the module state no optimizer holds: its persistent buffers and frozen parameters (collective under
    ZeRO-1/2/3: every rank calls it)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero_optimizer = engine.optimizer
    base = getattr(zero_optimizer, "optimizer", zero_optimizer)
    if zero in (1, 2):
        # DeepSpeed 0.19 links the per-parameter views of the optimizer state after the first param group's
        # first step, when the other groups have no state yet: link again to read every group's moments.
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()
    params, frozen = {}, {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            with deepspeed.zero.GatheredParameters([param]):   # ZeRO-3 partitions frozen parameters too
                frozen[name] = param.detach().clone()
        elif zero == 0:
            state = base.state[param]
            params[name] = {"fp32": param.detach().clone(), "exp_avg": state["exp_avg"].clone(),
                            "exp_avg_sq": state["exp_avg_sq"].clone()}
        else:
            params[name] = {"fp32": safe_get_full_fp32_param(param).clone(),
                            **{k: safe_get_full_optimizer_state(param, k).clone() for k in ADAM_KEYS[1:]}}
    flats = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups",
             3: "fp32_partitioned_groups_flat"}
    keys = getattr(zero_optimizer, flats[zero]) if zero else [g["params"][0] for g in base.param_groups]
    steps = [float(base.state[key]["step"]) for key in keys]
    groups = [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups]
    buffers = {name: value.detach().clone() for name, value in engine.module.state_dict().items()
               if name not in dict(engine.module.named_parameters(remove_duplicate=False))}
    return {"params": params, "steps": steps, "groups": groups, "buffers": buffers, "frozen": frozen}


def _ema_copy(ema) -> dict:
    """``ema.state_dict()`` detached from the live shadow (unpartitioned, it returns the shadow tensors)."""
    state = ema.state_dict()
    return {**state, "shadow": {name: value.clone() for name, value in state["shadow"].items()}}


def harness(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--kind", choices=("pair", "generator"), default="pair")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=1, help="train.grad_accum of the config")
    parser.add_argument("--allow-new-global-batch", action="store_true")
    parser.add_argument("--keep-grad-accum", action="store_true", help="skip grad_accum_for (a stage bug)")
    parser.add_argument("--resume", default="auto")
    parser.add_argument("--out", required=True, help="the dump (torch.save of plain types), written by rank 0")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=16, help="model size: 2 x dim x hidden weights")
    parser.add_argument("--no-universal", action="store_true", help="CheckpointManager(universal=False)")
    args = parser.parse_args(argv)

    from data.world import resolve_world
    from pipeline.checkpoint import CheckpointManager
    from pipeline.config import TrainConfig
    from pipeline.ema import EMA
    from pipeline.runtime import build_accelerator, finish_training
    from pipeline.schedule import warmup_cosine
    from toy_train import ToyConfig

    world = resolve_world().size
    grad_accum, new_global_batch = args.grad_accum, False
    layout = saved_layout(args.run_dir, args.resume)
    if layout is not None and layout["grad_accum"] is not None and not args.keep_grad_accum:  # keep its global batch
        global_batch = layout["world_size"] * layout["grad_accum"]
        grad_accum = grad_accum_for(global_batch, world, args.allow_new_global_batch)
        new_global_batch = grad_accum * world != global_batch
    train = TrainConfig(max_steps=args.steps, grad_accum=grad_accum, zero_stage=args.zero)
    accelerator = build_accelerator(train, args.run_dir, micro_batch_size=4, seed=5, log_with=())
    model, optimizer = _build(args.kind, ToyConfig(dim=args.dim, hidden=args.hidden))
    scheduler = warmup_cosine(optimizer, 2, 20, min_lr_ratio=0.1)
    base_optimizer = optimizer
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if args.kind == "pair":   # as the tokenizer stage does: ZeRO-1/2 hand step() this rank's partition
        stepped = sum(p.numel() for group in base_optimizer.param_groups for p in group["params"])
        base_optimizer.partitioned = world > 1 and stepped < sum(p.numel() for p in model.module.parameters())
    unwrapped = accelerator.unwrap_model(model)
    ema = EMA(unwrapped.net if args.kind == "pair" else unwrapped, 0.8)
    positions = _Positions(accelerator.process_index)
    ckpt = CheckpointManager(args.run_dir, accelerator, 2, {"kind": args.kind, "lr": LR}, stage="toy",
                             model_class="toy_train:ToyNet", num_workers=0, universal=not args.no_universal,
                             allow_new_global_batch=args.allow_new_global_batch)
    load_started = time.perf_counter()
    step = resumed_from = ckpt.resume(args.resume, ema=ema, extra={"stream": positions})
    load_s = time.perf_counter() - load_started
    loaded = {**consolidated_state(model, args.zero), "ema": _ema_copy(ema)} if resumed_from else None
    first_step_s = None
    while step < args.steps:
        for micro in range(grad_accum):
            x, target = _batch(step * world * grad_accum + micro * world + accelerator.process_index, args.dim)
            positions.micro_batches += 1
            with accelerator.accumulate(model):
                loss = model(x, target) if args.kind == "pair" else (model(x) - target).pow(2).mean()
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        scheduler.step()
        step += 1
        ema.update()
        # a persistent buffer that training moves, the same on every rank (as the router's level_bias)
        (unwrapped.net if args.kind == "pair" else unwrapped).scale.add_(0.01)
        first_step_s = first_step_s or time.perf_counter() - _STARTED
    save_s = None
    if step > resumed_from:
        save_started = time.perf_counter()
        ckpt.save(step, ema=ema, extra={"stream": positions})
        save_s = time.perf_counter() - save_started
    final = {**consolidated_state(model, args.zero), "ema": _ema_copy(ema)}
    finish_training(accelerator)
    if accelerator.is_main_process:
        torch.save({"loaded": loaded, "final": final, "resumed_from": resumed_from, "steps": step,
                    "world_size": world, "grad_accum": grad_accum, "new_global_batch": new_global_batch,
                    "scheduler_epoch": scheduler.state_dict()["last_epoch"], "received": positions.received,
                    "resumed_layout": ckpt.resumed_layout, "load_s": load_s, "first_step_s": first_step_s,
                    "save_s": save_s, "lrs": [group["lr"] for group in optimizer.param_groups]}, args.out)
    return 0


# ------------------------------------------------------------------------------------------ launching
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def start_harness(run_dir: Path, processes: int, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """Start the harness on ``processes`` processes (1: plain python, 2: torchrun); (process, log, dump path)."""
    from conftest import free_port, start_process

    name = f"{run_dir.name}-{len(list(run_dir.parent.glob(run_dir.name + '-*.log')))}"
    out, log = run_dir.parent / f"{name}.pt", run_dir.parent / f"{name}.log"
    launcher = [sys.executable] if processes == 1 else [*TORCHRUN, "--master_port", str(free_port())]
    argv = [*launcher, str(Path(__file__)), "--run-dir", str(run_dir), "--out", str(out), *args]
    return start_process(argv, log), log, out


def finish_harness(started: tuple[subprocess.Popen, Path, Path], check: bool = True) -> tuple[int, str, dict | None]:
    """Wait for a :func:`start_harness` run: (exit code, log, dump)."""
    process, log, out = started
    code = process.wait(timeout=300)
    text = log.read_text()
    if check:
        assert code == 0, text[-4000:]
    return code, text, torch.load(out, weights_only=True) if out.is_file() else None


def run_harness(run_dir: Path, processes: int, *args: str, check: bool = True) -> tuple[int, str, dict | None]:
    return finish_harness(start_harness(run_dir, processes, *args), check)


def universal_state(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``checkpoint/universal/zero/<name>/*.pt`` (restricted loads of the converter's pickles)."""
    found = {}
    with no_pickled_code():
        for folder in sorted((checkpoint / UNIVERSAL / "zero").iterdir()):
            if folder.is_dir():
                found[folder.name] = {key: torch.load(folder / f"{key}.pt", weights_only=True)
                                      for key in (*ADAM_KEYS, "step") if (folder / f"{key}.pt").is_file()}
    return found


def assert_same_state(before: dict, after: dict) -> None:
    assert before["params"].keys() == after["params"].keys()
    for name, entry in before["params"].items():
        for key in ADAM_KEYS:
            assert torch.equal(entry[key], after["params"][name][key]), f"{name}.{key} differs after the load"
    assert before["steps"] == after["steps"]
    assert before["groups"] == after["groups"]  # lr, weight decay, name, max_grad_norm, betas, initial_lr
    assert before["buffers"].keys() == after["buffers"].keys() and before["frozen"].keys() == after["frozen"].keys()
    for name, value in {**before["buffers"], **before["frozen"]}.items():
        assert torch.equal(value, {**after["buffers"], **after["frozen"]}[name]), f"{name} differs after the load"
    scale = next(value for name, value in before["buffers"].items() if name.endswith("scale"))
    assert not torch.equal(scale, torch.full_like(scale, 0.5))   # trained away from its init value
    assert before["ema"]["num_updates"] == after["ema"]["num_updates"] > 0
    assert before["ema"]["shadow"].keys() == after["ema"]["shadow"].keys()
    for name, value in before["ema"]["shadow"].items():
        assert torch.equal(value, after["ema"]["shadow"][name]), f"EMA {name} differs after the load"


# ------------------------------------------------------------------------------------------ unit tests
def test_check_compatible_accepts_another_world_size_only_with_the_independent_state():
    meta = {"world_size": 2, "zero_stage": 2, "config_identity": {"a": 1}}
    with pytest.raises(ResumeError, match="world size: checkpoint 2 processes, this run 1.*no world-size-independent "
                                          "universal/ state.*relaunch with 2 processes"):
        check_compatible(meta, 1, 2, {"a": 1})
    check_compatible({**meta, "world_size_independent": True}, 1, 2, {"a": 1})
    check_compatible({**meta, "world_size_independent": True}, 8, 2, {"a": 1})
    with pytest.raises(ResumeError, match="ZeRO stage: checkpoint 2, this run 3") as info:
        check_compatible({**meta, "world_size_independent": True}, 1, 3, {"a": 1})
    assert "world size" not in str(info.value)
    assert layout_of(meta) == {"world_size": 2, "grad_accum": None, "num_workers": None}
    check_compatible(meta, 2, 2, {"a": 1}, grad_accum=5)                     # no saved grad_accum: unchecked
    kept = {**meta, "world_size_independent": True, "layout": {"world_size": 2, "grad_accum": 3, "num_workers": 1}}
    check_compatible(kept, 1, 2, {"a": 1}, grad_accum=6)                     # 6 micro-batches per step, kept
    check_compatible(kept, 3, 2, {"a": 1}, grad_accum=2)
    with pytest.raises(ResumeError, match=r"global batch: .*2 processes x grad_accum 3 micro-batches, this run 3 x 3 "
                                          r"\(grad_accum 2 keeps it on 3 processes\)"):
        check_compatible(kept, 3, 2, {"a": 1}, grad_accum=3)
    with pytest.raises(ResumeError, match=r"this run 4 x 3 \(.*use a number of ranks in \[1, 2, 3, 6\]"):
        check_compatible(kept, 4, 2, {"a": 1}, grad_accum=3)
    check_compatible(kept, 4, 2, {"a": 1}, grad_accum=2, allow_new_global_batch=True)


def test_check_compatible_names_options_the_checkpoint_predates_apart_from_changed_ones():
    meta = {"world_size": 1, "zero_stage": 0, "config_identity": {"router": {"tau": 1.0}, "lr": 1.0}}
    current = {"router": {"tau": 1.0, "detach_features": True}, "lr": 2.0}
    with pytest.raises(ResumeError) as info:
        check_compatible(meta, 1, 0, current)
    message = str(info.value)
    assert "written by an older varitok, before the options router.detach_features existed" in message
    assert "config differs (lr: checkpoint 1.0, this run 2.0)" in message
    assert "detach_features: checkpoint" not in message       # not offered as a setting to change back
    with pytest.raises(ResumeError, match="older varitok") as info:
        check_compatible(meta, 1, 0, {**current, "lr": 1.0})
    assert "config differs" not in str(info.value)


def test_an_option_the_checkpoint_predates_resumes_at_its_default_and_is_named_when_set():
    from pipeline.stages import TokenizerStageConfig
    cfg = TokenizerStageConfig()
    older = cfg.resume_identity()
    del older["model"]["router"]["entropy_prior"]          # written before the option existed
    meta = {"world_size": 1, "zero_stage": 0, "config_identity": older}
    defaults = TokenizerStageConfig.identity_defaults()
    assert defaults["model.router.entropy_prior"] == 0.0
    check_compatible(meta, 1, 0, cfg.resume_identity(), identity_defaults=defaults)
    cfg.model.router.entropy_prior = 3.0
    with pytest.raises(ResumeError, match=r"config differs \(model.router.entropy_prior: checkpoint 0.0, this run 3"):
        check_compatible(meta, 1, 0, cfg.resume_identity(), identity_defaults=defaults)



class _Untrained(torch.nn.Module):
    """A trained weight, a frozen parameter and a persistent buffer: what the universal loader leaves behind."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
        self.register_buffer("bias", torch.zeros(4))


def _engine_of(module):
    engine = type("Engine", (), {"module": module})()
    return type("Accelerator", (), {"_models": [engine]})()


def test_restore_untrained_state_copies_buffers_and_frozen_parameters_only_after_checking_them(tmp_path):
    from pipeline.checkpoint import _restore_untrained_state

    saved = {"weight": torch.full((3,), 7.0), "frozen": torch.full((2, 2), 2.0), "bias": torch.arange(4.0)}
    torch.save({"module": saved}, tmp_path / "mp_rank_00_model_states.pt")
    module = _Untrained()
    assert _restore_untrained_state(_engine_of(module), tmp_path) == ["bias", "frozen"]
    assert torch.equal(module.bias, saved["bias"]) and torch.equal(module.frozen, saved["frozen"])
    assert torch.equal(module.weight, torch.zeros(3))          # the optimizer's universal state restores this one

    torch.save({"module": {**saved, "bias": torch.zeros(5)}}, tmp_path / "mp_rank_00_model_states.pt")
    fresh = _Untrained()
    with pytest.raises(ResumeError, match=r"shape \(saved, model\) differs for \[\('bias', \(5,\), \(4,\)\)\]"):
        _restore_untrained_state(_engine_of(fresh), tmp_path)
    assert torch.equal(fresh.frozen, torch.zeros(2, 2))        # nothing copied before the check passed
    torch.save({"module": {"weight": saved["weight"]}}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(ResumeError, match=r"missing \['bias', 'frozen'\]"):
        _restore_untrained_state(_engine_of(_Untrained()), tmp_path)
    partitioned = _Untrained()
    partitioned.frozen.ds_id = 0                                 # what ZeRO-3 marks its partitioned parameters with
    with pytest.raises(ResumeError, match=r"frozen parameters \['frozen'\] are partitioned \(ZeRO-3\).*resume "
                                          r"on the checkpoint's world size"):
        _restore_untrained_state(_engine_of(partitioned), tmp_path)
    with pytest.raises(ResumeError, match="no DeepSpeed model-states file"):
        _restore_untrained_state(_engine_of(_Untrained()), tmp_path / "empty")


# ------------------------------------------------------------------------------------------ real runs
@pytest.mark.slow
def test_zero2_two_processes_to_one_bit_exact_then_layout_history(tmp_path):
    run = tmp_path / "run"
    _, _, saved = run_harness(run, 2, "--zero", "2", "--steps", "3")
    step3 = run / "checkpoints" / "step-3"
    meta = read_meta(step3)
    assert meta["format"] == 2 and meta["universal"] == UNIVERSAL and meta["world_size_independent"] is True
    assert meta["layout"] == {"world_size": 2, "grad_accum": 1, "num_workers": 0}
    assert meta["layouts"] == [{"step": 0, "world_size": 2, "grad_accum": 1, "num_workers": 0}]
    assert (step3 / UNIVERSAL / "zero" / "optimizer_state.pt").is_file()
    model_states = "mp_rank_00_model_states.pt"       # the converter's unchanged copy: a hard link
    assert (step3 / UNIVERSAL / model_states).stat().st_ino == (step3 / "pytorch_model" / model_states).stat().st_ino
    listed = json.loads((step3 / CHECKSUMS).read_text())["files"]
    assert f"{UNIVERSAL}/zero/net.body.0.weight/exp_avg.pt" in listed  # covered by the checksum list

    # The universal files are the consolidated state of the 2-process engine.
    before, universal = saved["final"], universal_state(step3)
    assert set(universal) == set(before["params"]) | {"net.scale"}     # a buffer: its value only
    for name, entry in before["params"].items():
        for key in ADAM_KEYS:
            assert torch.equal(universal[name][key]["param"], entry[key]), f"{name}.{key}"
        assert float(universal[name]["step"]) == before["steps"][0] == 3.0

    # 1 process: grad_accum 2 keeps 2 micro-batches per step; everything equals the saved state.
    _, _, loaded = run_harness(run, 1, "--zero", "2", "--steps", "4")
    assert loaded["resumed_from"] == 3 and loaded["grad_accum"] == 2 and not loaded["new_global_batch"]
    assert loaded["resumed_layout"] == {"world_size": 2, "grad_accum": 1, "num_workers": 0}
    assert_same_state(before, loaded["loaded"])
    assert loaded["scheduler_epoch"] == 4 and loaded["final"]["steps"] == [4.0, 4.0]
    assert loaded["received"] == [{"rank": 0, "micro_batches": 3}, {"rank": 1, "micro_batches": 3}]
    for name, entry in loaded["final"]["params"].items():     # the continued step trained
        assert not torch.equal(entry["fp32"], before["params"][name]["fp32"]), name
    meta = read_meta(run / "checkpoints" / "step-4")
    assert meta["world_size"] == 1 and meta["layout"] == {"world_size": 1, "grad_accum": 2, "num_workers": 0}
    assert meta["layouts"] == [{"step": 0, "world_size": 2, "grad_accum": 1, "num_workers": 0},
                               {"step": 3, "world_size": 1, "grad_accum": 2, "num_workers": 0}]


@pytest.mark.slow
def test_zero1_one_process_to_two_bit_exact(tmp_path):
    run = tmp_path / "run"
    _, _, saved = run_harness(run, 1, "--zero", "1", "--steps", "2", "--grad-accum", "2")
    _, _, loaded = run_harness(run, 2, "--zero", "1", "--steps", "3", "--grad-accum", "2")
    assert loaded["resumed_from"] == 2 and loaded["grad_accum"] == 1 and loaded["world_size"] == 2
    assert_same_state(saved["final"], loaded["loaded"])
    assert loaded["received"] == [{"rank": 0, "micro_batches": 4}]


@pytest.mark.slow
def test_zero3_generator_two_processes_to_one_keeps_each_groups_hyperparameters(tmp_path):
    run = tmp_path / "run"
    _, _, saved = run_harness(run, 2, "--zero", "3", "--kind", "generator", "--steps", "3")
    assert [g["weight_decay"] for g in saved["final"]["groups"]] == [0.05, 0.0]
    _, _, loaded = run_harness(run, 1, "--zero", "3", "--kind", "generator", "--steps", "4")
    assert loaded["grad_accum"] == 2
    assert_same_state(saved["final"], loaded["loaded"])   # DeepSpeed alone would give no_decay weight_decay 0.05
    assert all(torch.isfinite(e["fp32"]).all() for e in loaded["final"]["params"].values())


@pytest.mark.slow
def test_zero0_two_processes_to_one(tmp_path):
    run = tmp_path / "run"
    _, _, saved = run_harness(run, 2, "--zero", "0", "--steps", "2")
    meta = read_meta(run / "checkpoints" / "step-2")
    assert meta["universal"] is None and meta["world_size_independent"] is True   # nothing is partitioned
    assert not (run / "checkpoints" / "step-2" / UNIVERSAL).exists()
    _, _, loaded = run_harness(run, 1, "--zero", "0", "--steps", "3")
    assert loaded["resumed_from"] == 2 and loaded["grad_accum"] == 2
    assert_same_state(saved["final"], loaded["loaded"])


@pytest.mark.slow
def test_refusals_before_loading_old_checkpoint_zero_stage_change_global_batch(tmp_path):
    run = tmp_path / "run"
    run_harness(run, 2, "--zero", "2", "--steps", "2")
    checkpoint = run / "checkpoints" / "step-2"
    # As an older version wrote it: per-rank shards only.
    old = tmp_path / "old"
    shutil.copytree(run, old)
    old_step = old / "checkpoints" / "step-2"
    shutil.rmtree(old_step / UNIVERSAL)
    meta = read_meta(old_step)
    for key in ("layout", "layouts", "universal", "world_size_independent"):
        meta.pop(key)
    (old_step / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    (old_step / "latest_universal").unlink()
    write_checksums(old_step)
    # A pickle planted in the universal state (checksums rewritten: no defence there) never runs.
    from test_checkpoint import _Payload

    planted = tmp_path / "planted"
    shutil.copytree(run, planted)
    target = planted / "checkpoints" / "step-2" / UNIVERSAL / "zero" / "net.body.0.weight" / "exp_avg.pt"
    state = torch.load(target, weights_only=True)
    torch.save({**state, "payload": _Payload(str(tmp_path / "PWNED"))}, target)
    write_checksums(planted / "checkpoints" / "step-2")
    same = tmp_path / "same"   # one run directory per concurrent run (each probes its file system)
    shutil.copytree(run, same)
    one = ("--zero", "2", "--steps", "3")
    runs = {"old": start_harness(old, 1, *one), "stage": start_harness(run, 1, "--zero", "1", "--steps", "3"),
            # a stage that keeps the config's grad_accum on another world size
            "batch": start_harness(same, 1, *one, "--keep-grad-accum"), "planted": start_harness(planted, 1, *one)}
    done = {name: finish_harness(started, check=False) for name, started in runs.items()}
    assert all(code != 0 for code, _, _ in done.values()), {name: log[-2000:] for name, (_, log, _) in done.items()}
    log = done["old"][1]
    assert "world size: checkpoint 2 processes, this run 1" in log, log[-3000:]
    assert "no world-size-independent universal/ state" in log and "relaunch with 2 processes" in log
    log = done["stage"][1]
    assert "ZeRO stage: checkpoint 2, this run 1" in log and "world size" not in log, log[-3000:]
    log = done["batch"][1]
    assert "global batch: the checkpoint made optimizer steps of 2 processes x grad_accum 1" in log, log[-3000:]
    assert "this run 1 x 1 (grad_accum 2 keeps it on 1 processes)" in log
    assert "refusing to load" in done["planted"][1] and not (tmp_path / "PWNED").exists(), done["planted"][1][-3000:]
    assert read_meta(checkpoint)["step"] == 2 and not (run / "checkpoints" / "step-3").exists()


if __name__ == "__main__":
    sys.exit(harness())
