"""`varitok demo` at its smallest size, end to end: every stage runs for real (2 DeepSpeed ranks per training stage)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_smoke_end_to_end(tmp_path):
    work = tmp_path / "demo"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--smoke", "--workdir", str(work)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = [line.split(":")[0].removeprefix("[demo] ") for line in proc.stdout.splitlines()
              if line.startswith("[demo]") and ": done in" in line]
    assert stages == ["shard", "train-tokenizer", "tokenize", "verify", "stats", "train-generator", "sample", "eval"]

    # every stage left its real output
    assert json.loads((work / "shards" / "manifest.json").read_text())
    assert (work / "tokenizer" / "export" / "model.safetensors").is_file()
    assert (work / "codes" / "manifest.json").is_file() and list((work / "codes").glob("part-*.arrow"))
    assert (work / "generator" / "export" / "model.safetensors").is_file()
    assert list((work / "samples").glob("*.npz"))
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert "psnr" in {k.lower() for k in metrics}

    report = (work / "report.md").read_text()
    for heading in ("Stage 0", "Stage 1", "Stage 2", "Stage 3", "Evaluation"):
        assert heading in report
    assert "needs weights: --lpips-weights" in report and "random-weight" in report
    html = (work / "report.html").read_text()
    for image in [line.split("'")[1] for line in html.splitlines() if "<img src='" in line]:
        assert (work / image).is_file(), image
