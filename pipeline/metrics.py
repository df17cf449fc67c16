"""Image-quality metrics on local weights: PSNR / SSIM (torchmetrics), Inception features for FID / IS
(torchmetrics), k-NN precision / recall, codebook usage.

Inception: torchvision's ``inception_v3`` architecture loaded from ONE local file (``.safetensors`` or a
``.pt/.pth`` read with ``torch.load(weights_only=True)``, e.g. torchvision's ImageNet checkpoint
``inception_v3_google-0cc3c7bd.pth``). Nothing is downloaded. Images are resized to 299 x 299 (bilinear)
and normalised with the ImageNet mean / std that torchvision's weights expect. FID values from these
weights are comparable between varitok runs, not with numbers computed on the TF-ported FID Inception
(pt_inception-2015-12-05) that ADM / torch-fidelity report.

The Inception runs once per image set (:class:`InceptionFeatures`); torchmetrics'
``FrechetInceptionDistance`` and ``InceptionScore`` then receive those features through
:class:`PrecomputedFeatures` (their documented ``feature=<nn.Module>`` hook), so FID, IS and
precision / recall share one forward pass.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.hub import load_tensor_file

__all__ = ["InceptionFeatures", "InceptionOutputs", "PrecomputedFeatures", "MissingWeightsError", "psnr", "ssim",
           "frechet_distance", "inception_score", "precision_recall", "codebook_usage"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_SIZE = 299


class MissingWeightsError(FileNotFoundError):
    """A metric needs local weights that were not given (the message names the flag to set)."""


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of ``x`` vs ``y`` (``B x 3 x H x W`` in [-1, 1], data range 2); inf when equal."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(x.float(), y.float(), data_range=2.0, reduction="none", dim=(1, 2, 3))


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-image SSIM (Gaussian 11 x 11, sigma 1.5) of ``B x 3 x H x W`` images in [-1, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(x.float(), y.float(), data_range=2.0, reduction="none")


@dataclasses.dataclass
class InceptionOutputs:
    pool: Tensor     # float64 [N, 2048]: average-pooled features (FID, precision / recall)
    logits: Tensor   # float64 [N, 1000]: class logits (Inception Score)


class InceptionFeatures(nn.Module):
    """Frozen torchvision Inception-v3: uint8 ``N x 3 x H x W`` (or ``N x H x W x 3``) -> pool + logits."""

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)

    @classmethod
    def from_file(cls, path: Optional[str | Path], flag: str = "--inception-weights") -> "InceptionFeatures":
        """Load Inception-v3 weights from a local file; ``flag`` names the option in error messages."""
        file = Path(path) if path else None
        if file is None or not file.is_file():
            raise MissingWeightsError(
                f"needs weights: {flag} (a local torchvision inception_v3 .pth/.safetensors file; got {path!r}). "
                f"Nothing is downloaded at run time; see the README, 'Inception and LPIPS weights'.")
        state = load_tensor_file(file)
        state = {k[len("net."):] if k.startswith("net.") else k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}   # training-only branch
        model = cls()
        result = model.net.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{flag}: {file} does not hold torchvision inception_v3 weights: missing "
                             f"{result.missing_keys[:6]}, unexpected {result.unexpected_keys[:6]}")
        return model

    def save(self, path: str | Path) -> Path:
        """Write the weights as safetensors (the format :meth:`from_file` reads)."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path))
        return Path(path)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 images (channels first or last) -> normalised float ``N x 3 x 299 x 299``."""
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionFeatures expects uint8 images, got {images.dtype}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        x = images.to(self.mean.device, torch.float32) / 255.0
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> InceptionOutputs:
        net, x = self.net, self.preprocess(images)
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(net, name)(x)
        pool = torch.flatten(x, 1)
        return InceptionOutputs(pool.double(), net.fc(pool).double())

    def extract(self, batches: Iterable[Tensor]) -> InceptionOutputs:
        """Concatenated outputs over an iterable of uint8 image batches."""
        outputs = [self(batch) for batch in batches]
        if not outputs:
            raise ValueError("no images to extract Inception features from")
        return InceptionOutputs(torch.cat([o.pool for o in outputs]).cpu(), torch.cat([o.logits for o in outputs]).cpu())


class PrecomputedFeatures(nn.Module):
    """The ``feature=`` module handed to torchmetrics when features were already extracted: identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FID between two feature sets ``[N, D]`` (torchmetrics: means, covariances, matrix square root)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), reset_real_features=True)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` splits of ``logits [N, 1000]`` (torchmetrics)."""
    from torchmetrics.image.inception import InceptionScore

    splits = max(1, min(splits, logits.shape[0]))
    metric = InceptionScore(feature=PrecomputedFeatures(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    mean, std = metric.compute()
    return float(mean), float(std) if splits > 1 else 0.0


def _kth_neighbour_radius(features: Tensor, k: int, chunk: int) -> Tensor:
    """Distance of every row of ``features [N, D]`` to its k-th nearest other row: ``[N]``."""
    radii = []
    for start in range(0, features.shape[0], chunk):
        distances = torch.cdist(features[start:start + chunk], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)   # +1: the row itself at distance 0
    return torch.cat(radii)


def _covered(queries: Tensor, support: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """bool ``[Q]``: query lies inside at least one ball (support row, radius)."""
    inside = []
    for start in range(0, queries.shape[0], chunk):
        inside.append((torch.cdist(queries[start:start + chunk], support) <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision / recall (Kynkaanniemi et al. 2019) on feature sets ``[N, D]``.

    Each set's manifold is the union of balls around its points with radius = distance to the k-th
    nearest neighbour within the set. Precision: share of fake points inside the real manifold; recall:
    share of real points inside the fake manifold. Pairwise distances are computed in row chunks.
    """
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set "
                         f"(got {real.shape[0]} real, {fake.shape[0]} fake)")
    real, fake = real.double(), fake.double()
    precision = _covered(fake, real, _kth_neighbour_radius(real, k, chunk), chunk).double().mean()
    recall = _covered(real, fake, _kth_neighbour_radius(fake, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


def codebook_usage(codes: np.ndarray | Tensor, codebook_sizes: Sequence[int]) -> list[dict[str, float]]:
    """Per sub-codebook: share of entries used and perplexity (exp of the entropy of the usage histogram).

    codes: integer ``[M, K]`` (all code positions of all images). Perplexity equals the codebook size
    for perfectly uniform use and 1 when a single entry is used.
    """
    codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
    stats = []
    for j, size in enumerate(codebook_sizes):
        counts = torch.bincount(codes[:, j], minlength=size).double()
        probs = counts / counts.sum().clamp(min=1)
        entropy = -(probs * probs.clamp(min=1e-30).log()).sum()
        stats.append({"size": int(size), "used": int((counts > 0).sum()), "usage": float((counts > 0).double().mean()),
                      "perplexity": float(math.exp(float(entropy)))})
    return stats
