"""benchmarks/gpu_check.py rehearsed on the CPU: every stage it runs on a GPU works and its JSON is complete."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import launch_env

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_rehearsal_on_the_cpu_prints_its_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--workdir",
                             str(tmp_path)], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(result.stdout)
    figures = record["figures"]
    assert record["benchmark"] == "gpu_check" and figures["devices"] == 2
    assert {"tokenizer-bf16-1", "tokenizer-bf16-2", "tokenizer-fp32-compare"} <= figures["tokenizer"].keys()
    assert figures["tokenizer"]["tokenizer-bf16-2"]["processes"] == 2
    for run in figures["tokenizer"].values():
        assert run["images_per_s"] > 0 and run["peak_memory_gib"] > 0
    generator = figures["generator"]
    zero3 = generator["generator-bf16-zero3"]
    assert zero3["zero_stage"] == 3 and zero3["processes"] == 2 and zero3["tokens_per_s"] > 0
    assert generator["flops_per_token"] > 0 and generator["mfu"] > 0   # vs a measured CPU bf16 matmul rate
    assert figures["tokenize"]["images"] == 32 and figures["sample"]["images"] == 4
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 4
    losses = figures["agreement"]["tokenizer_losses"]
    assert len(losses[0]) == len(losses[1]) == 3 and losses[0] != losses[1]      # two precisions really ran
    assert record["targets"]["bf16_vs_fp32_loss_rel_diff"]["met"], figures["agreement"]
