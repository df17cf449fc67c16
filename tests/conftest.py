"""Shared fixtures. Tests generate their own data: nothing here reads ../shared or the network."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """12 procedural 64px PNGs in a class-per-subfolder layout (4 classes)."""
    from data.demo_images import write_image_folder

    return write_image_folder(tmp_path / "images", num_images=12, size=64, num_classes=4)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of tiny models: avoids oversubscribing the 2 shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
