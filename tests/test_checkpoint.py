"""Hostile and damaged checkpoints: checksum lists, fallback to the newest intact checkpoint, no code from pickles.

The slow tests train tests/toy_train.py with a real DeepSpeed ZeRO-2 engine in one plain python process, damage
or plant files in copies of its run directory, and resume each copy in its own process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

from conftest import launch_env  # noqa: E402
from models.config import ConfigError  # noqa: E402
from pipeline.checkpoint import (CHECKSUMS, ResumeError, checkpoint_problem, import_class,  # noqa: E402
                                 newest_intact_checkpoint, no_pickled_code, write_checksums)

TOY = [sys.executable, str(TESTS / "toy_train.py")]
COMMON = ["--zero", "2", "--ckpt-every", "2", "--keep-last", "3"]


def _fake_checkpoint(root: Path, step: int) -> Path:
    path = root / "checkpoints" / f"step-{step}"
    (path / "pytorch_model").mkdir(parents=True)
    (path / "pytorch_model" / "states.pt").write_bytes(os.urandom(3000))
    (path / "meta.json").write_text(json.dumps({"step": step, "world_size": 1, "zero_stage": 2}))
    write_checksums(path)
    return path


def test_checksum_list_catches_truncation_changes_plants_and_removal(tmp_path, caplog):
    old, new = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    assert checkpoint_problem(new) is None and newest_intact_checkpoint(tmp_path) == new
    states = new / "pytorch_model" / "states.pt"
    data = states.read_bytes()
    states.write_bytes(data[:1000])
    assert "has 1000 bytes, 3000 were written" in checkpoint_problem(new)
    states.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    assert "sha256 mismatch" in checkpoint_problem(new)
    states.write_bytes(data)
    (new / "planted.pkl").write_bytes(b"x")
    assert "not in its checksum list" in checkpoint_problem(new) and "planted.pkl" in checkpoint_problem(new)
    (new / "planted.pkl").unlink()
    (new / "meta.json").write_text("{")  # truncated meta, checksums rewritten: still refused
    write_checksums(new)
    assert "meta.json is unreadable" in checkpoint_problem(new)
    (new / CHECKSUMS).unlink()
    assert "checksums.json is missing" in checkpoint_problem(new)
    with caplog.at_level("WARNING", logger="varitok.checkpoint"):
        assert newest_intact_checkpoint(tmp_path) == old
    assert "skipping checkpoint step-4" in caplog.text and "checksums.json is missing" in caplog.text
    (old / "meta.json").unlink()
    assert newest_intact_checkpoint(tmp_path) is None


def test_no_pickled_code_refuses_payloads_but_loads_plain_state(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "step": 3, "names": ["a"]}, tmp_path / "plain.pt")
    torch.save({"w": torch.ones(2), "evil": _Payload(str(marker))}, tmp_path / "evil.pt")
    with no_pickled_code():
        assert torch.load(tmp_path / "plain.pt", weights_only=False)["step"] == 3
        with pytest.raises(Exception, match="Unsupported global|not an allowed global|weights_only"):
            torch.load(tmp_path / "evil.pt", weights_only=False)  # what DeepSpeed's loader asks for
    assert not marker.exists()
    assert torch.load is torch.serialization.load  # restored


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "code ran"))


def test_import_class_only_imports_varitok_models(tmp_path, monkeypatch):
    (tmp_path / "evil_model.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("evil_model:Evil", "os:system", "subprocess:Popen"):
        with pytest.raises(ConfigError, match="not one of varitok's model classes|not a PretrainedMixin"):
            import_class(name)
    assert not (tmp_path / "imported").exists()
    assert import_class("models.tokenizer:Tokenizer").__name__ == "Tokenizer"


# ------------------------------------------------------------------------------------ real DeepSpeed runs
def _run(run_dir: Path, steps: int, log: Path) -> subprocess.Popen:
    env = {**launch_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}   # no launcher variables
    handle = open(log, "w")
    return subprocess.Popen([*TOY, "--run-dir", str(run_dir), "--steps", str(steps), *COMMON], cwd=REPO, env=env,
                            stdout=handle, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ckpt") / "base"
    log = run_dir.parent / "base.log"
    assert _run(run_dir, 4, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-2", "step-4"]
    return run_dir


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


DAMAGES = {
    "model_states": lambda step: _truncate(step / "pytorch_model" / "mp_rank_00_model_states.pt"),
    "optim_states": lambda step: _truncate(step / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    "ema": lambda step: _truncate(step / "ema.safetensors"),
    "stream_state": lambda step: _truncate(step / "extra-rank00000.pt"),
    "meta": lambda step: _truncate(step / "meta.json"),
}


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_older_intact_one(trained, caplog):
    # every kind of file, damaged in a copy of the real run: --resume auto's choice skips step-4, naming why
    for name, damage in DAMAGES.items():
        run_dir = trained.parent / f"damaged-{name}"
        shutil.copytree(trained, run_dir)
        damage(run_dir / "checkpoints" / "step-4")
        caplog.clear()
        with caplog.at_level("WARNING", logger="varitok.checkpoint"):
            assert newest_intact_checkpoint(run_dir) == run_dir / "checkpoints" / "step-2", name
        assert "skipping checkpoint step-4" in caplog.text, name
    # one of them resumed for real (a DeepSpeed shard: each resume is a process of its own, ~30 s of CPU)
    run_dir, log = trained.parent / "damaged-optim_states", trained.parent / "optim_states.log"
    code = _run(run_dir, 6, log).wait(timeout=400)
    text = log.read_text()
    assert code == 0, text[-3000:]
    result = json.loads((run_dir / "results-rank0.json").read_text())
    assert result["resumed_from"] == 2 and result["steps"] == 6 and result["stream_position"] == 12
    assert "skipping checkpoint step-4" in text
    # The damaged step-4 was another timeline's once step 4 was saved again: moved aside, not loaded.
    assert checkpoint_problem(run_dir / "checkpoints" / "step-6") is None
    assert list((run_dir / "checkpoints").glob("abandoned-step-4-*"))


@pytest.mark.slow
def test_planted_pickle_in_deepspeed_states_does_not_run_on_resume(trained):
    run_dir = trained.parent / "planted"
    shutil.copytree(trained, run_dir)
    marker = run_dir.parent / "PWNED"
    step = run_dir / "checkpoints" / "step-4"
    target = step / "pytorch_model" / "mp_rank_00_model_states.pt"
    state = torch.load(target, map_location="cpu", weights_only=False)  # our own file: a real DeepSpeed state
    state["payload"] = _Payload(str(marker))
    torch.save(state, target)
    write_checksums(step)  # whoever can plant a file can rewrite the checksum list: it is no defence here
    log = run_dir.parent / "planted.log"
    code = _run(run_dir, 6, log).wait(timeout=400)
    text = log.read_text()
    assert not marker.exists(), "the planted pickle ran code on resume"
    assert code != 0 and "refusing to load" in text and "pickled objects other than plain state" in text, text[-3000:]


@pytest.mark.slow
def test_export_refuses_a_model_class_outside_varitok(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (tmp_path / "evil_export.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    step = run_dir / "checkpoints" / "step-4"
    meta = json.loads((step / "meta.json").read_text())
    (step / "meta.json").write_text(json.dumps({**meta, "model_class": "evil_export:Model"}))
    write_checksums(step)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(run_dir), "--out", str(tmp_path / "x")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "not one of varitok's model classes" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "imported").exists()


class _OneProcess:
    """The slice of an Accelerator that CheckpointManager.resume touches before loading (one process)."""

    is_main_process, process_index, num_processes, device = True, 0, 1, torch.device("cpu")

    class state:  # noqa: N801
        deepspeed_plugin = None

    def wait_for_everyone(self):
        pass

    def load_state(self, directory):
        raise AssertionError("a damaged checkpoint must not be loaded")


def test_explicit_damaged_checkpoint_is_a_clear_error_and_auto_starts_fresh(tmp_path, caplog):
    from pipeline.checkpoint import CheckpointManager

    step = _fake_checkpoint(tmp_path, 2)
    meta = json.loads((step / "meta.json").read_text())
    (step / "meta.json").write_text(json.dumps({**meta, "config_identity": {}}))
    write_checksums(step)
    _truncate(step / "pytorch_model" / "states.pt")
    manager = CheckpointManager(tmp_path, _OneProcess(), 2, {})
    with pytest.raises(ResumeError, match="cannot resume from .*step-2.*states.pt has 1000 bytes"):
        manager.resume(str(step))
    with caplog.at_level("WARNING", logger="varitok.checkpoint"):
        assert manager.resume("auto") == 0
    assert "none of the 1 checkpoints" in caplog.text
