"""The training runtime: schedule, EMA, checkpoints, launch/export commands, and real multi-process runs.

Multi-process runs (tests/toy_train.py under accelerate launch / torchrun / plain python) are started
once per module, independent launches side by side, and shared by the tests that check them.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))

from conftest import ACCELERATE, free_port, start_process  # noqa: E402
from toy_train import ToyConfig, ToyNet  # noqa: E402

from pipeline.checkpoint import (CheckpointManager, ResumeError, check_compatible, complete_checkpoints,  # noqa: E402
                                 export_pretrained)
from pipeline.ema import EMA  # noqa: E402
from pipeline.launch import build_command  # noqa: E402
from pipeline.schedule import warmup_cosine, warmup_cosine_factor  # noqa: E402

STEPS, LR = 8, 1e-2


# ----------------------------------------------------------------------------------------------- units
def test_warmup_cosine_hand_values_and_group_lrs():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 10.0}])
    scheduler = warmup_cosine(optimizer, warmup_steps=2, max_steps=6, min_lr_ratio=0.2)
    seen = []
    for _ in range(7):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    # warmup 1/3, 2/3, then cosine over 4 steps from 1 to 0.2: 1, 0.2 + 0.8 * (1 + cos(pi/4)) / 2, 0.6, ..., 0.2
    expected = [1 / 3, 2 / 3, 1.0, 0.2 + 0.4 * (1 + math.cos(math.pi / 4)), 0.6,
                0.2 + 0.4 * (1 - math.cos(math.pi / 4)), 0.2]
    assert [s[0] for s in seen] == pytest.approx(expected)
    assert [s[1] for s in seen] == pytest.approx([10 * e for e in expected])
    assert warmup_cosine_factor(100, 2, 6, 0.2) == pytest.approx(0.2)


def test_ema_hand_values_round_trip_buffers_and_tied_weights():
    module = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    module.tied = module[0]  # the same parameter under two names
    with torch.no_grad():
        module[0].weight.fill_(1.0)
    ema = EMA(module, decay=0.5)
    for value, expected in ((3.0, 2.0), (3.0, 2.5), (-1.0, 0.75)):
        with torch.no_grad():
            module[0].weight.fill_(value)
        ema.update()
        assert torch.allclose(ema.shadow[0], torch.full((2, 2), expected))
    state = ema.state_dict_for()
    assert set(state) == set(module.state_dict())  # buffers (running stats) included, tied name too
    assert torch.equal(state["0.weight"], state["tied.weight"])
    assert torch.equal(state["1.running_var"], module[1].running_var)

    clone = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    clone.tied = clone[0]
    restored = EMA(clone, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.5 and restored.num_updates == 3
    restored.copy_to()
    assert torch.allclose(clone[0].weight, torch.full((2, 2), 0.75))
    with pytest.raises(ValueError, match="parameter list"):
        EMA(list(module.parameters()), 0.9).state_dict_for()


def test_check_compatible_names_every_difference():
    meta = {"world_size": 2, "zero_stage": 2, "config_identity": {"model": {"dim": 8}, "lr": 0.01}}
    check_compatible(meta, 2, 2, {"model": {"dim": 8}, "lr": 0.01})
    with pytest.raises(ResumeError) as info:
        check_compatible(meta, 4, 3, {"model": {"dim": 16}, "lr": 0.01})
    text = str(info.value)
    assert "world size: checkpoint 2 processes, this run 4" in text and "relaunch with 2 processes" in text
    assert "ZeRO stage: checkpoint 2, this run 3" in text
    assert "model.dim: checkpoint 8, this run 16" in text and "lr:" not in text


class _FakeAccelerator:
    """The single-process slice of Accelerate that CheckpointManager uses, writing plain files."""

    is_main_process, process_index, num_processes = True, 0, 1
    device = torch.device("cpu")

    class state:  # noqa: N801
        deepspeed_plugin = None

    def __init__(self, model: nn.Module, fail_in_save: bool = False):
        self._models, self.model, self.fail_in_save = [model], model, fail_in_save

    def wait_for_everyone(self):
        pass

    def save_state(self, directory):
        Path(directory, "weights.pt").write_bytes(b"partial")
        if self.fail_in_save:
            raise RuntimeError("killed mid-save")

    def load_state(self, directory):
        assert Path(directory, "weights.pt").is_file()

    def get_state_dict(self, model):
        return model.state_dict()


class _Counter:
    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position, "seen": torch.arange(self.position)}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_checkpoint_manager_atomic_pruned_resumable(tmp_path):
    model = nn.Linear(3, 2)
    manager = CheckpointManager(tmp_path, _FakeAccelerator(model), keep_last=2, config_identity={"a": 1}, stage="toy")
    counter, ema = _Counter(), EMA(model, 0.9)
    for step in (1, 2, 3):
        counter.position = step * 10
        manager.save(step, ema=ema, extra={"stream": counter})
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".shared")) == [
        "step-2", "step-3"]
    meta = json.loads((tmp_path / "checkpoints/step-3/meta.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 1 and meta["config_identity"] == {"a": 1}

    failing = CheckpointManager(tmp_path, _FakeAccelerator(model, fail_in_save=True), 2, {"a": 1})
    with pytest.raises(RuntimeError, match="killed"):
        failing.save(4, extra={"stream": counter})
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 3]  # the interrupted step-4 is not complete

    restored = _Counter()
    assert manager.resume("auto", ema=ema, extra={"stream": restored}) == 3 and restored.position == 30
    assert manager.resume(None) == 0
    with pytest.raises(ResumeError, match=r"config differs \(a: checkpoint 1, this run 2\)"):
        CheckpointManager(tmp_path, _FakeAccelerator(model), 2, {"a": 2}).resume("auto")
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        manager.resume(str(tmp_path / "checkpoints" / ".tmp-step-4"))
    with pytest.raises(ResumeError, match="has no state for 'missing'"):
        manager.resume(str(tmp_path / "checkpoints/step-2"), extra={"missing": _Counter()})


def test_export_pretrained_checks_names_and_shapes(tmp_path):
    net = ToyNet(ToyConfig(dim=4, hidden=6))
    out = export_pretrained("toy_train:ToyNet", {"dim": 4, "hidden": 6}, net.state_dict(), tmp_path / "exp")
    loaded = ToyNet.from_pretrained(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="shape mismatch"):
        export_pretrained("toy_train:ToyNet", {"dim": 4, "hidden": 7}, net.state_dict(), tmp_path / "bad")


def test_launch_dry_run_prints_the_accelerate_command(capsys):
    from pipeline.cli import main

    code = main(["launch", "tokenizer", "--nproc", "2", "--zero", "1", "--num-machines", "2", "--machine-rank", "1",
                 "--main-ip", "10.1.2.3", "--main-port", "29611", "--cpu", "--dry-run", "--",
                 "--config", "tiny", "train.max_steps=5"])
    line = capsys.readouterr().out.strip()
    assert code == 0
    assert line.startswith("DS_ACCELERATOR=cpu ") and "-m accelerate.commands.launch" in line
    for part in ("--config_file " + str(REPO / "configs/accelerate/multinode.yaml"),
                 "--deepspeed_config_file " + str(REPO / "configs/deepspeed/zero1.json"),
                 "--num_processes 4 --num_machines 2 --machine_rank 1 --main_process_port 29611",
                 "--main_process_ip 10.1.2.3 --rdzv_backend static",
                 "-m pipeline.cli train-tokenizer --config tiny train.max_steps=5"):
        assert part in line, part
    assert main(["launch", "generator", "--dry-run", "--cpu"]) == 0
    assert "single.yaml" in capsys.readouterr().out


def test_config_files_are_consistent():
    import yaml

    for stage in (0, 1, 2, 3):
        config = json.loads((REPO / f"configs/deepspeed/zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_batch_size"] == config["train_micro_batch_size_per_gpu"] == "auto"
    for name in ("single", "cpu-2proc", "gpu-8", "multinode"):
        config = yaml.safe_load((REPO / f"configs/accelerate/{name}.yaml").read_text())
        assert config["distributed_type"] == "DEEPSPEED" and config["use_cpu"] is False
        assert (REPO / config["deepspeed_config"]["deepspeed_config_file"]).is_file()
    multinode = yaml.safe_load((REPO / "configs/accelerate/multinode.yaml").read_text())
    assert multinode["num_processes"] % multinode["num_machines"] == 0 and multinode["rdzv_backend"] == "static"


# ------------------------------------------------------------------------------------ real launches
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
TOY = str(TESTS / "toy_train.py")


def _finish(processes: dict[str, subprocess.Popen], timeout: float = 400) -> dict[str, int]:
    return {name: process.wait(timeout=timeout) for name, process in processes.items()}


# Plain `python` (a world of one, ZeRO-0), then, in the same process, a resume that must be refused.
ONE_PROCESS_THEN_MISMATCH = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import toy_train
assert toy_train.main(["--run-dir", sys.argv[1], "--steps", "2", "--zero", "0"]) == 0
toy_train.main(["--run-dir", *sys.argv[2:]])
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Phase 1: ZeRO-2 (accelerate launch), ZeRO-1 on 2 simulated machines (the commands `varitok launch` builds,
    static rendezvous on localhost) killed while saving step 6, ZeRO-3 (torchrun).
    Phase 2: resume of the killed run (torchrun), the same run straight as ZeRO-1 (the resume's reference),
    a 1-process resume with another world size and lr."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {name: root / name for name in ("zero2", "killed", "zero1", "zero3", "one", "mismatch")}
    logs = {name: root / f"{name}.log" for name in ("zero2", "node0", "node1", "zero3", "resume", "zero1", "mismatch")}
    common = ["--steps", str(STEPS), "--lr", str(LR), "--ckpt-every", "2", "--keep-last", "2"]
    port = free_port()
    killed = [TOY, "--run-dir", str(dirs["killed"]), *common, "--die-in-save", "6"]

    def machine(rank: int) -> list[str]:
        """The command `varitok launch` builds for machine ``rank`` of 2 (configs/accelerate + zero1.json)."""
        args = argparse.Namespace(stage="tokenizer", nproc=1, zero=1, num_machines=2, machine_rank=rank,
                                  main_ip="127.0.0.1", main_port=port, stage_args=[])
        return build_command(args, cpu=True, entry=killed)[0]

    phase1 = {
        "zero2": start_process(ACCELERATE + ["--num_processes", "2", "--main_process_port", str(free_port()),
                                             "--use_deepspeed", "--zero_stage", "2", TOY, "--run-dir",
                                             str(dirs["zero2"]), *common], logs["zero2"]),
        "node0": start_process(machine(0), logs["node0"]),
        "node1": start_process(machine(1), logs["node1"]),
        "zero3": start_process(TORCHRUN + ["--master_port", str(free_port()), TOY, "--run-dir", str(dirs["zero3"]),
                                           "--zero", "3", "--single-model", *common], logs["zero3"]),
    }
    codes = _finish(phase1)
    partial = dirs["killed"] / "checkpoints" / ".tmp-step-6"
    codes["partial_save_left"] = int(partial.is_dir() and (partial / "pytorch_model").is_dir())
    shutil.copytree(dirs["zero2"], dirs["mismatch"])
    phase2 = {
        "resume": start_process(TORCHRUN + ["--master_port", str(free_port()), TOY, "--run-dir", str(dirs["killed"]),
                                            "--zero", "1", *common], logs["resume"]),
        "zero1": start_process(TORCHRUN + ["--master_port", str(free_port()), TOY, "--run-dir", str(dirs["zero1"]),
                                           "--zero", "1", *common], logs["zero1"]),
        "mismatch": start_process([sys.executable, "-c", ONE_PROCESS_THEN_MISMATCH, str(dirs["one"]),
                                   str(dirs["mismatch"]), *common[:2], "--lr", str(2 * LR), *common[4:]],
                                  logs["mismatch"]),
    }
    codes.update(_finish(phase2))
    return {"dirs": dirs, "logs": logs, "codes": codes}


def _results(run_dir: Path, world: int = 2) -> list[dict]:
    return [json.loads((run_dir / f"results-rank{r}.json").read_text()) for r in range(world)]


def _check(runs, *names):
    for name in names:
        assert runs["codes"][name] == 0, runs["logs"][name].read_text()[-4000:]


@pytest.mark.slow
def test_zero2_two_processes_sync_schedule_checkpoints_export(runs, tmp_path):
    _check(runs, "zero2")
    run_dir = runs["dirs"]["zero2"]
    rank0, rank1 = _results(run_dir)
    for result in (rank0, rank1):
        assert result["distributed_type"] == "DistributedType.DEEPSPEED"
        assert result["world_size"] == 2 and result["zero_stage"] == 2 and result["stream_position"] == 2 * STEPS
    assert rank0["digest"] == rank1["digest"]  # identical parameters on both ranks
    assert rank0["net_change"] > 1e-3 and rank0["critic_change"] > 1e-3  # both param groups trained
    expected = [[LR * warmup_cosine_factor(s, 2, STEPS, 0.1), 10 * LR * warmup_cosine_factor(s, 2, STEPS, 0.1)]
                for s in range(1, STEPS + 1)]
    assert [lr for pair in rank0["lrs"] for lr in pair] == pytest.approx([lr for pair in expected for lr in pair])
    assert rank0["lrs"][0] == pytest.approx([LR * 2 / 3, 10 * LR * 2 / 3])
    assert rank0["lrs"][4][0] == pytest.approx(0.0055)

    assert list((run_dir / "logs").rglob("events.out.tfevents*"))  # TensorBoard tracker wrote on rank 0
    assert [s for s, _ in complete_checkpoints(run_dir)] == [6, 8]  # keep_last=2
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    last = run_dir / "checkpoints" / "step-8"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2 and meta["step"] == STEPS
    assert (last / "extra-rank00000.pt").is_file() and (last / "extra-rank00001.pt").is_file()

    from pipeline.cli import main

    assert main(["export", str(run_dir), "--out", str(tmp_path / "ema")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "raw"), "--raw", "--step", "6"]) == 0
    ema_net, raw_net = ToyNet.from_pretrained(tmp_path / "ema"), ToyNet.from_pretrained(tmp_path / "raw")
    ema_weights = load_file(str(last / "ema.safetensors"))
    raw_weights = load_file(str(run_dir / "checkpoints/step-6/model.safetensors"))
    assert all(torch.equal(ema_net.state_dict()[k], v) for k, v in ema_weights.items())
    assert all(torch.equal(raw_net.state_dict()[k], v) for k, v in raw_weights.items())
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def test_kill_and_resume_on_two_simulated_machines_matches_straight_run(runs):
    assert runs["codes"]["node0"] != 0 and runs["codes"]["node1"] != 0  # both "machines" died saving step 6
    assert runs["codes"]["partial_save_left"] == 1  # a half-written .tmp-step-6 (DeepSpeed shards, no meta.json)
    _check(runs, "resume", "zero1")
    # Same ZeRO stage as the straight run: ZeRO-1 and ZeRO-2 sum micro-batches in another order, so only a
    # same-stage reference can demand bit-exact equality (tests/test_train_tokenizer.py shows the drift).
    killed, straight = runs["dirs"]["killed"], runs["dirs"]["zero1"]
    rank0, rank1 = _results(killed)
    assert rank0["resumed_from"] == 4 and rank0["digest"] == rank1["digest"] and rank0["zero_stage"] == 1
    assert rank0["digest"] == _results(straight)[0]["digest"]  # every parameter and buffer, critic included
    assert rank0["lrs"] == _results(straight)[0]["lrs"][4:]
    assert rank0["stream_position"] == _results(straight)[0]["stream_position"] == 2 * STEPS
    assert not (killed / "checkpoints" / ".tmp-step-6").exists()
    for name in ("model.safetensors", "ema.safetensors"):
        resumed = load_file(str(killed / "checkpoints/step-8" / name))
        reference = load_file(str(straight / "checkpoints/step-8" / name))
        for key, value in reference.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=f"{name}:{key}")


def test_zero3_single_model_trains_and_exports_consolidated_weights(runs, tmp_path):
    _check(runs, "zero3")
    run_dir = runs["dirs"]["zero3"]
    rank0, _ = _results(run_dir)
    assert rank0["zero_stage"] == 3 and rank0["distributed_type"] == "DistributedType.DEEPSPEED"
    assert rank0["net_change"] > 1e-3
    assert rank0["ema_copy_max_diff"] == 0.0  # EMA gather of the partitions == DeepSpeed's gather after copy_to
    reference = ToyNet(ToyConfig()).state_dict()
    for name in ("model.safetensors", "ema.safetensors"):
        weights = load_file(str(run_dir / "checkpoints/step-8" / name))
        assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in reference.items()}
    from pipeline.export import export_run

    loaded = ToyNet.from_pretrained(export_run(run_dir, tmp_path / "exp"))
    assert torch.isfinite(loaded.body[0].weight).all() and not torch.equal(loaded.body[0].weight,
                                                                          reference["body.0.weight"])


def test_one_process_run_then_resume_with_other_world_size_and_config_fails_before_training(runs):
    one = json.loads((runs["dirs"]["one"] / "results-rank0.json").read_text())
    assert one["distributed_type"] == "DistributedType.DEEPSPEED" and one["world_size"] == 1
    assert one["zero_stage"] == 0 and one["steps"] == 2 and one["net_change"] > 1e-3 and one["critic_change"] > 1e-3
    log = runs["logs"]["mismatch"].read_text()
    assert runs["codes"]["mismatch"] != 0
    assert "world size:" not in log  # a ZeRO-2 checkpoint carries its universal state: any world size resumes
    assert f"config differs (lr: checkpoint {LR}, this run {2 * LR})" in log
    run_dir = runs["dirs"]["mismatch"]
    # no training happened: the results are still the copied ones of the ZeRO-2 run
    assert (run_dir / "results-rank0.json").read_text() == (runs["dirs"]["zero2"] / "results-rank0.json").read_text()
    assert [s for s, _ in complete_checkpoints(run_dir)] == [6, 8]


@pytest.mark.parametrize("keep_last", [1, 3])
def test_rollback_resume_abandons_newer_checkpoints(tmp_path, keep_last, caplog):
    model = nn.Linear(3, 2)
    writer = CheckpointManager(tmp_path, _FakeAccelerator(model), 3, config_identity={"a": 1})
    for step in (2, 4, 6):
        writer.save(step, extra={"stream": _Counter()})
    manager = CheckpointManager(tmp_path, _FakeAccelerator(model), keep_last, config_identity={"a": 1})
    restored = _Counter()
    with caplog.at_level("WARNING", logger="varitok.checkpoint"):
        assert manager.resume(str(tmp_path / "checkpoints/step-2"), extra={"stream": restored}) == 2
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2]
    abandoned = sorted(p.name.rsplit("-", 2)[0] for p in (tmp_path / "checkpoints").glob("abandoned-step-*"))
    assert abandoned == ["abandoned-step-4", "abandoned-step-6"]
    assert "step-4" in caplog.text and "step-6" in caplog.text and "abandoned" in caplog.text

    # The continued run's checkpoint survives its own pruning, and auto resumes the continued run.
    manager.save(3, extra={"stream": restored})
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 3][-keep_last:]
    assert manager.resume("auto", extra={"stream": _Counter()}) == 3

    # A fresh start (--resume none) in the same run dir abandons everything newer at its first save.
    assert manager.resume(None) == 0
    manager.save(1, extra={"stream": _Counter()})
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1]
    assert len(list((tmp_path / "checkpoints").glob("abandoned-step-3-*"))) == 1
    assert manager.resume("auto", extra={"stream": _Counter()}) == 1
