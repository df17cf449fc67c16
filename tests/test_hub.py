"""models.hub: safetensors files whose bytes depend on the content only."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from models.hub import file_sha256, load_tensor_file, save_state_dict
from conftest import REPO

SAVE = """
import sys, torch
from models.hub import save_state_dict
state = {"b.weight": torch.arange(6.0).view(2, 3), "a.bias": torch.ones(4, dtype=torch.float16)}
save_state_dict(state, sys.argv[1], metadata={"format": "pt", "class": "Tokenizer", "step": "7", "decay": "0.999"})
"""


@pytest.mark.slow
def test_same_weights_saved_by_different_processes_are_byte_identical(tmp_path):
    # safetensors orders the metadata from a per-process random HashMap: several processes would disagree
    paths = [tmp_path / f"w{i}.safetensors" for i in range(4)]
    for path in paths:
        subprocess.run([sys.executable, "-c", SAVE, str(path)], cwd=REPO, check=True)
    assert len({file_sha256(path) for path in paths}) == 1
    loaded = load_tensor_file(paths[0])
    assert torch.equal(loaded["b.weight"], torch.arange(6.0).view(2, 3)) and loaded["a.bias"].dtype == torch.float16
    with safe_open(str(paths[0]), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "class": "Tokenizer", "step": "7", "decay": "0.999"}


def test_tied_tensors_are_saved_once_each(tmp_path):
    shared = torch.randn(3, 2)
    save_state_dict({"embed": shared, "head": shared}, tmp_path / "tied.safetensors")
    loaded = load_tensor_file(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["embed"], shared) and torch.equal(loaded["head"], shared)
