"""Image-quality metrics on local weights: PSNR / SSIM (torchmetrics), FID / sFID / IS / KID and k-NN
precision / recall on the FID Inception, codebook usage.

Inception: torch-fidelity's ``FeatureExtractorInceptionV3``, the PyTorch port of the TF Inception
(``pt_inception-2015-12-05-6726825d.pth``) that torch-fidelity, pytorch-fid, torchmetrics and (within ~1e-3)
OpenAI's ADM evaluator use, so the numbers are the published protocol's: uint8 RGB in, torch-fidelity's
TF1-compatible bilinear resize to 299 x 299, ``(x - 128) / 128``. The weights come from ONE local file read
with ``torch.load(weights_only=True)`` (or safetensors) and checked against that architecture; nothing is
downloaded and torch-fidelity never unpickles the file itself.

One forward pass per image (:class:`InceptionFeatures`) gives everything the metrics need:
``pool`` (pool3, 2048-d: FID, KID, precision / recall), ``logits`` (1008 unbiased logits: IS, as ADM and
torch-fidelity) and ``spatial`` (``mixed_6/conv``, first 7 channels, flattened channels-last: sFID, as ADM).
FID / sFID are computed from Gaussian statistics (:class:`GaussianStats`, streamed with
:class:`MomentAccumulator`, or read from an ADM reference batch); IS and KID are torchmetrics'.
"""
from __future__ import annotations

import dataclasses
import io
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.hub import file_sha256, load_tensor_file

__all__ = ["InceptionFeatures", "InceptionOutputs", "GaussianStats", "MomentAccumulator", "PrecomputedFeatures",
           "MissingWeightsError", "psnr", "ssim", "frechet_distance", "inception_score", "kernel_inception_distance",
           "precision_recall", "codebook_usage", "FID_WEIGHTS_NAME"]

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"     # torch.hub's hash prefix in the published file's name
SPATIAL_CHANNELS = 7                        # ADM's sFID: mixed_6/conv[..., :7]


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
    pool: Tensor      # float32 [N, 2048]: pool3 features (FID, KID, precision / recall)
    logits: Tensor    # float32 [N, 1008]: unbiased logits, pool3 @ W (Inception Score)
    spatial: Tensor   # float32 [N, 17 * 17 * 7]: mixed_6/conv[..., :7], flattened H, W, C (sFID)


def _spatial_side(size: int) -> int:
    """Side of the 17 x 17 (at 299 px) mixed_6 feature map for a ``size`` px input: the stem's and Mixed_6a's
    unpadded stride-2 convolutions / pools and unpadded 3 x 3 convolutions."""
    side = (size - 3) // 2 + 1 - 2      # Conv2d_1a (3x3 s2), Conv2d_2a (3x3); Conv2d_2b is padded
    side = (side - 3) // 2 + 1 - 2      # MaxPool_1 (3 s2), Conv2d_4a (3x3)
    side = (side - 3) // 2 + 1          # MaxPool_2 (3 s2); Mixed_5b..5d keep the size
    return (side - 3) // 2 + 1          # Mixed_6a (3x3 s2)


class InceptionFeatures(nn.Module):
    """Frozen FID Inception: uint8 ``N x 3 x H x W`` (or ``N x H x W x 3``) -> :class:`InceptionOutputs`.

    ``state_dict``: tensors of torch-fidelity's ``FeatureExtractorInceptionV3`` (the published file's keys);
    a missing, unexpected or mis-shaped tensor is a ValueError naming ``source``. ``weights_file`` / ``sha256``
    (set by :meth:`from_file`) are recorded in :meth:`protocol`.
    """

    num_features = 2048

    def __init__(self, state_dict: dict[str, Tensor], source: str = "the state dict",
                 weights_file: Optional[str] = None, sha256: Optional[str] = None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        bad = [k for k, v in state_dict.items()
               if not isinstance(v, Tensor) or (not v.is_floating_point() and not k.endswith("num_batches_tracked"))]
        if bad:
            raise ValueError(f"{source}: not FID Inception weights, entries that are not float tensors: {bad[:6]}")
        # torch-fidelity unpickles its weights file (weights_only off); it gets a buffer of the tensors
        # checked above (serialized here), never the user's file, and never a None path (which downloads).
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
        buffer.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=buffer)
        except RuntimeError as exc:
            raise ValueError(f"{source} does not hold the FID Inception (torch-fidelity FeatureExtractorInceptionV3, "
                             f"{FID_WEIGHTS_NAME}): {' '.join(str(exc).split())[:900]}") from None
        self.weights_file, self.sha256 = weights_file, sha256
        self._spatial: Optional[Tensor] = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)

    @classmethod
    def from_file(cls, path: Optional[str | Path], flag: str = "--inception-weights") -> "InceptionFeatures":
        """Load the FID Inception from a local ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors``
        file; ``flag`` names the option in error messages."""
        file = Path(path) if path else None
        if file is None or not file.is_file():
            raise MissingWeightsError(
                f"needs weights: {flag} (a local {FID_WEIGHTS_NAME}, torch-fidelity's FID Inception; got {path!r}). "
                f"Nothing is downloaded at run time; see docs/sample-and-eval.md, 'Inception and LPIPS weights'.")
        try:
            state = load_tensor_file(file)
        except Exception as exc:   # weights_only refuses pickled objects; any unreadable file lands here too
            raise ValueError(f"{flag}: cannot read {file} as a tensor file ({type(exc).__name__}: "
                             f"{str(exc)[:300]})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{flag}: {file} holds a {type(state).__name__}, not a state dict of tensors")
        return cls(state, source=f"{flag}: {file}", weights_file=str(file), sha256=file_sha256(file))

    @property
    def input_size(self) -> int:
        return int(self.net.INPUT_IMAGE_SIZE)

    @property
    def spatial_features(self) -> int:
        return SPATIAL_CHANNELS * _spatial_side(self.input_size) ** 2

    @property
    def standard_weights(self) -> bool:
        """True when the file is the published FID Inception (its sha256 starts with the name's hash prefix)."""
        return bool(self.sha256 and self.sha256.startswith(FID_WEIGHTS_SHA256_PREFIX))

    def protocol(self) -> dict[str, Any]:
        """How the features are computed, for the metrics JSON."""
        return {"network": f"torch-fidelity FeatureExtractorInceptionV3 ({FID_WEIGHTS_NAME} architecture)",
                "weights": self.weights_file, "weights_sha256": self.sha256,
                "standard_weights": self.standard_weights,
                "input": f"uint8 RGB, TF1-compatible bilinear resize to {self.input_size}x{self.input_size} "
                         f"(torch-fidelity), (x - 128) / 128, fp32",
                "features": {"fid/kid/precision/recall": "pool3 (2048)", "is": "unbiased logits (1008)",
                             "sfid": f"mixed_6/conv[:{SPATIAL_CHANNELS}] ({self.spatial_features})"}}

    def _keep_spatial(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)   # TF's NHWC order

    @torch.no_grad()
    def forward(self, images: Tensor) -> InceptionOutputs:
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionFeatures expects uint8 images (0..255), got {images.dtype}")
        if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
            raise ValueError(f"InceptionFeatures expects N x 3 x H x W or N x H x W x 3 images, got {images.shape}")
        if images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        device = self.net.fc.weight.device
        with torch.autocast(device.type, enabled=False):    # the protocol is fp32 even under a bf16 caller
            pool, logits = self.net(images.to(device))
        spatial, self._spatial = self._spatial, None
        return InceptionOutputs(pool, logits, spatial.float())

    def extract(self, batches: Iterable[Tensor]) -> InceptionOutputs:
        """Concatenated outputs (on the CPU) over an iterable of uint8 image batches."""
        outputs = [self(batch) for batch in batches]
        if not outputs:
            raise ValueError("no images to extract Inception features from")
        return InceptionOutputs(*(torch.cat([getattr(o, f.name) for o in outputs]).cpu()
                                  for f in dataclasses.fields(InceptionOutputs)))


@dataclasses.dataclass
class GaussianStats:
    """Mean ``mu [D]`` and unbiased covariance ``sigma [D, D]`` (float64, as ``np.cov``) of a feature set."""

    mu: Tensor
    sigma: Tensor
    num: Optional[int] = None       # images behind the statistics; None when a reference npz does not say

    @classmethod
    def from_features(cls, features: Tensor) -> "GaussianStats":
        accumulator = MomentAccumulator()
        accumulator.update(features)
        return accumulator.stats()

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu.cpu().numpy(), self.sigma.cpu().numpy()


class MomentAccumulator:
    """Streaming sum and sum of outer products (float64) of feature rows ``[B, D]`` -> :class:`GaussianStats`."""

    def __init__(self) -> None:
        self.num = 0
        self.total: Optional[Tensor] = None
        self.outer: Optional[Tensor] = None

    def update(self, features: Tensor) -> None:
        x = features.detach().double()
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        self.total += x.sum(dim=0)
        self.outer.addmm_(x.T, x)
        self.num += x.shape[0]

    def stats(self) -> GaussianStats:
        if self.num < 2:
            raise ValueError(f"Gaussian statistics (FID) need at least 2 images, got {self.num}")
        mu = self.total / self.num
        sigma = (self.outer - self.num * torch.outer(mu, mu)) / (self.num - 1)
        return GaussianStats(mu.cpu(), sigma.cpu(), self.num)


class PrecomputedFeatures(nn.Module):
    """The ``feature=`` module handed to torchmetrics when features were already extracted: identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """FID between two Gaussians: ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2)`` (float64).

    ``Tr((S_a S_b)^1/2)`` is computed as ``Tr((S_a^1/2 S_b S_a^1/2)^1/2)``, a similar symmetric PSD matrix: two
    symmetric eigendecompositions instead of the general eigenvalues of torchmetrics / ``scipy.linalg.sqrtm``
    (ADM), several times faster at 2048-d, and exact when a covariance is rank-deficient (fewer images than
    features), where the general ones leave errors of ~1e-3. Equal to both otherwise (tested).
    """
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"FID of statistics of different feature sizes: {tuple(a.mu.shape)} vs {tuple(b.mu.shape)}")
    mu_a, sigma_a, mu_b, sigma_b = (t.double() for t in (a.mu, a.sigma, b.mu, b.sigma.to(a.sigma.device)))
    values, vectors = torch.linalg.eigh(sigma_a)
    root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    trace_root = torch.linalg.eigvalsh(root_a @ sigma_b @ root_a).clamp(min=0).sqrt().sum()
    mean_term = (mu_a - mu_b.to(mu_a.device)).square().sum()
    return float(mean_term + sigma_a.trace() + sigma_b.trace() - 2 * trace_root)


def inception_score(logits: Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` splits of ``logits [N, 1008]`` (torchmetrics; its random
    split assignment is drawn from ``seed`` so the value is reproducible)."""
    from torchmetrics.image.inception import InceptionScore

    splits = max(1, min(splits, logits.shape[0]))
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", UserWarning)     # "saves all features in a buffer"; std of 1 split
        metric = InceptionScore(feature=PrecomputedFeatures(logits.shape[1]), splits=splits)
        metric.update(logits.double())
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std) if splits > 1 else 0.0


def kernel_inception_distance(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """(mean, std) of KID (torchmetrics: cubic polynomial kernel MMD over ``subsets`` random subsets of
    ``min(subset_size, N)`` rows of ``real`` / ``fake [N, D]``, drawn from ``seed``)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", UserWarning)     # "saves all features in a buffer"
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=size)
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


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


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 4096) -> tuple[float, float]:
    """Improved precision / recall (Kynkaanniemi et al. 2019) on feature sets ``[N, D]``, as ADM's evaluator.

    Each set's manifold is the union of balls around its points with radius = distance to the k-th nearest
    neighbour within the set (ADM: k = 3, reference = the batch's ``arr_0``, samples = all). Precision: share of
    fake points inside the real manifold; recall: share of real points inside the fake manifold. Distances are
    fp32 (ADM's fp16), computed in blocks of ``chunk`` rows on the features' device.
    """
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set "
                         f"(got {real.shape[0]} real, {fake.shape[0]} fake)")
    real, fake = real.float(), fake.float()
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
