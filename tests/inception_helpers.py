"""Random-weight FID Inception files for the evaluation tests: torch-fidelity's real FeatureExtractorInceptionV3
architecture, weights drawn from a seed (activations stay O(1) through the 94 conv + BN layers)."""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3


class _Unloaded(FeatureExtractorInceptionV3):
    """The architecture with PyTorch's default init: the loader gets an empty state dict, loaded non-strictly."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return super().load_state_dict(state_dict, strict=False)


def random_fid_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _Unloaded("random", ["2048"], feature_extractor_weights_path=empty)
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        nn.init.normal_(net.fc.weight, std=0.05)
        nn.init.normal_(net.fc.bias, std=0.5)
    return {k: v.clone() for k, v in net.state_dict().items()}


def save_random_fid_inception(path: Path, seed: int = 0) -> Path:
    """A ``.pth`` state dict of plain tensors (what ``torch.load(weights_only=True)`` reads)."""
    torch.save(random_fid_inception_state(seed), path)
    return path
