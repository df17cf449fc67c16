"""FID Inception and metrics: parity with torch-fidelity's extractor, the input protocol, FID's closed form, ADM
reference batches (stored statistics, built by ``varitok eval reference``), precision / recall as ADM's, and bad
input (npz keys / dtype / shape, weights of another architecture, too few images) caught before any forward."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
import webdataset as wds
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torchmetrics.image.fid import _compute_fid

from data.demo_images import procedural_image
from inception_helpers import save_random_fid_inception
from pipeline.cli import main as cli
from pipeline.metrics import (GaussianStats, InceptionFeatures, MomentAccumulator, frechet_distance, inception_score,
                              precision_recall)

REPO = Path(__file__).resolve().parent.parent
SMALL = 75      # smallest input the Inception-v3 architecture takes; the protocol tests use the real 299


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights (torch-fidelity's URL, torch.hub) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_fid_inception(tmp_path_factory.mktemp("inception") / "fid_inception.pth", seed=0)


@pytest.fixture
def small_input(monkeypatch):
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", SMALL)


def _images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 N x 3 x H x W."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=generator)


@pytest.mark.slow
def test_features_equal_torch_fidelity_on_the_same_file(weights):
    """varitok's one forward = torch-fidelity's extractor reading the same file (pool3, unbiased logits), and the
    sFID features = mixed_6/conv's first 7 channels in TF's channels-last order."""
    images = _images(2, 48, 64)
    ours = InceptionFeatures.from_file(weights)(images.permute(0, 2, 3, 1))      # channels-last input
    reference = FeatureExtractorInceptionV3("reference", ["2048", "logits_unbiased", "logits"],
                                            feature_extractor_weights_path=str(weights))
    pool, logits_unbiased, logits = reference(images)
    assert ours.pool.shape == (2, 2048) and ours.logits.shape == (2, 1008) and ours.spatial.shape == (2, 7 * 17 * 17)
    assert pool.std() > 0.1 and not torch.allclose(logits, logits_unbiased)     # O(1) features; a real bias
    torch.testing.assert_close(ours.pool, pool, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.logits, logits_unbiased, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            x = getattr(reference, name)(x)
        mixed_6_conv = reference.Mixed_6d.branch1x1(x)                           # N x 192 x 17 x 17
    expected = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(ours.spatial, expected, rtol=1e-5, atol=1e-5)


class _Captured(Exception):
    pass


def test_inception_receives_exactly_the_protocol_input(weights):
    """The first convolution sees torch-fidelity's TF1-bilinear 299 px resize of the uint8 values, scaled by
    (x - 128) / 128: 0 -> -1 and 255 -> 127/128 exactly (no ImageNet mean / std, no [0, 1] scaling)."""
    inception = InceptionFeatures.from_file(weights)
    seen = {}

    def capture(module, inputs):
        seen["x"] = inputs[0].clone()
        raise _Captured

    inception.net.Conv2d_1a_3x3.register_forward_pre_hook(capture)
    ramp = torch.arange(40 * 30, dtype=torch.float32).reshape(40, 30) * 255 / (40 * 30 - 1)
    images = torch.stack([torch.zeros(3, 40, 30), torch.full((3, 40, 30), 255.0), ramp.expand(3, 40, 30)])
    images = images.round().to(torch.uint8)
    with pytest.raises(_Captured):
        inception(images)
    x = seen["x"]
    assert x.shape == (3, 3, 299, 299) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.full_like(x[0], -1.0)) and torch.equal(x[1], torch.full_like(x[1], 127 / 128))
    expected = (interpolate_bilinear_2d_like_tensorflow1x(images[2:].float(), size=(299, 299),
                                                          align_corners=False) - 128) / 128
    torch.testing.assert_close(x[2:], expected, rtol=0, atol=1e-6)
    assert x[2].min() >= -1.0 and x[2].max() <= 1.0
    with pytest.raises(TypeError, match="uint8"):
        inception(images.float())


def _with_moments(z: np.ndarray, mean: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Rows whose sample mean is exactly ``mean`` and sample covariance exactly ``factor @ factor.T``."""
    z = z - z.mean(axis=0)
    white = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False)).T)
    return white @ factor.T + mean


def test_frechet_distance_closed_form_and_identity():
    rng = np.random.default_rng(0)
    dim = 5
    mean_a, mean_b = rng.normal(size=dim), rng.normal(size=dim)
    factor_a, factor_b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    a = _with_moments(rng.normal(size=(64, dim)), mean_a, factor_a)
    b = _with_moments(rng.normal(size=(80, dim)), mean_b, factor_b)
    cov_a, cov_b = factor_a @ factor_a.T, factor_b @ factor_b.T
    closed = (np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
              - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real)
    stats_a = GaussianStats.from_features(torch.from_numpy(a))
    stats_b = GaussianStats.from_features(torch.from_numpy(b))
    assert frechet_distance(stats_a, stats_b) == pytest.approx(closed, rel=1e-8)
    assert frechet_distance(stats_a, stats_b) == pytest.approx(
        float(_compute_fid(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)), rel=1e-8)   # torchmetrics' form
    torch.testing.assert_close(stats_a.sigma, torch.from_numpy(cov_a))
    # streamed in batches = numpy's mean / np.cov; FID(x, x) = 0 even for rank-deficient (N < D) statistics
    features = torch.randn(10, 256, generator=torch.Generator().manual_seed(0)).abs()
    streamed = MomentAccumulator()
    for part in features.split(3):
        streamed.update(part)
    stats = streamed.stats()
    assert stats.num == 10
    np.testing.assert_allclose(stats.mu.numpy(), features.double().numpy().mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma.numpy(), np.cov(features.double().numpy(), rowvar=False), atol=1e-12)
    assert abs(frechet_distance(stats, stats)) < 1e-6 * float(stats.sigma.trace())
    with pytest.raises(ValueError, match="at least 2 images"):
        GaussianStats.from_features(features[:1])


def _adm_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """ADM evaluator's ManifoldEstimator in numpy: squared distances, radius = k-th entry of the sorted row."""
    def squared(u, v):
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0)

    radii_real = np.partition(squared(real, real), k, axis=1)[:, k]
    radii_fake = np.partition(squared(fake, fake), k, axis=1)[:, k]
    distances = squared(real, fake)
    precision = (distances <= radii_real[:, None]).any(axis=0).mean()
    recall = (distances <= radii_fake[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_precision_recall_equals_adm_manifold_estimator():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(60, 16)).astype(np.float32)
    fake = (rng.normal(size=(90, 16)) * 1.3 + 0.4).astype(np.float32)
    expected = _adm_precision_recall(real.astype(np.float64), fake.astype(np.float64), k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, chunk=7) == pytest.approx(expected)


def test_inception_score_of_confident_distinct_predictions_and_reproducible():
    logits = torch.full((8, 1008), -30.0)
    logits[torch.arange(8), torch.arange(8) * 3] = 30.0          # 8 images, 8 different confident classes
    assert inception_score(logits, splits=1)[0] == pytest.approx(8.0, rel=1e-6)
    noisy = torch.randn(40, 1008, generator=torch.Generator().manual_seed(0)) * 3
    assert inception_score(noisy, splits=4) == inception_score(noisy, splits=4)


def _write_shards(root, count: int, size: int = 48):
    root.mkdir(parents=True)
    with wds.TarWriter(str(root / "train-000000.tar"), mtime=0) as writer:
        for i in range(count):
            buffer = io.BytesIO()
            Image.fromarray(procedural_image(200 + i, size, label=i % 3)).save(buffer, format="PNG")
            writer.write({"__key__": f"img{i:03d}", "png": buffer.getvalue(), "cls": str(i % 3).encode()})
    return root


@pytest.mark.slow
def test_eval_reference_writes_adm_batch_and_generation_uses_its_statistics(tmp_path, weights, small_input, capsys):
    """``varitok eval reference`` writes ADM's keys with the statistics of ALL images and a subset in arr_0;
    ``eval generation`` then uses the stored mu / sigma (FID of the same images ~ 0), not the 4-image arr_0."""
    from data.stream import ShardStream

    shards = _write_shards(tmp_path / "shards", 6)
    ref = tmp_path / "ref.npz"
    assert cli(["eval", "reference", "--shards", str(shards), "--out", str(ref), "--inception-weights", str(weights),
                "--image-size", "32", "--keep-images", "4", "--batch-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == 6 and summary["arr_0_images"] == 4
    stream = ShardStream(str(shards), batch_size=6, image_size=32, rank=0, world_size=1, shuffle=False, crop="center",
                         flip=False, drop_last=False, dtype=torch.uint8)
    images = next(iter(stream))["image"]
    features = InceptionFeatures.from_file(weights).extract([images])
    with np.load(ref, allow_pickle=False) as data:
        assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(data.files)
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 32, 32, 3)
        assert int(data["num_images"]) == 6 and str(data["inception_sha256"]) == summary["inception"]["weights_sha256"]
        all_images = images.permute(0, 2, 3, 1).numpy()
        assert all(any(np.array_equal(kept, image) for image in all_images) for kept in data["arr_0"])
        np.testing.assert_allclose(data["mu"], features.pool.double().mean(0).numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(data["sigma"], np.cov(features.pool.double().numpy(), rowvar=False), atol=1e-5)
        assert data["mu_s"].shape == (7 * 3 * 3,)                   # mixed_6 is 3 x 3 at the 75 px test input
        np.testing.assert_allclose(data["sigma_s"], np.cov(features.spatial.double().numpy(), rowvar=False), atol=1e-5)

    np.savez(tmp_path / "samples.npz", arr_0=all_images)
    assert cli(["eval", "generation", "--samples", str(tmp_path / "samples.npz"), "--reference", str(ref),
                "--inception-weights", str(weights), "--num-samples", "6", "--kid-subset-size", "4",
                "--out", str(tmp_path / "gen")]) == 0
    metrics = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert abs(metrics["fid"]) < 1e-3 and abs(metrics["sfid"]) < 1e-3   # stored statistics of the same 6 images
    assert "reference stored statistics (6 images)" in metrics["fid_protocol"]
    assert "reference arr_0 (4 images)" in metrics["precision_protocol"] and metrics["num_reference_images"] == 4
    assert metrics["inception"]["standard_weights"] is False and "not comparable" in metrics["fid_protocol"]
    assert metrics["precision"] == 1.0 and np.isfinite(metrics["kid"])
    assert "| fid |" in (tmp_path / "gen" / "metrics.md").read_text()


@pytest.mark.slow
def test_adm_npz_with_stored_statistics_and_10_image_arr_0(tmp_path, weights, small_input):
    """An ADM-format batch (mu / sigma / mu_s / sigma_s + a 10-image arr_0, no varitok keys): FID is taken
    against the stored statistics; here they are the samples' own, so FID ~ 0 although arr_0 is unrelated noise
    (FID against arr_0 itself, the fallback without statistics, is > 1); precision / recall use arr_0."""
    samples = _images(6, 32, 32, seed=1).permute(0, 2, 3, 1).contiguous()
    features = InceptionFeatures.from_file(weights).extract([samples])
    pool, spatial = features.pool.double().numpy(), features.spatial.double().numpy()
    noise = _images(10, 32, 32, seed=2).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=samples.numpy())
    np.savez(tmp_path / "adm.npz", arr_0=noise, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))
    assert cli(["eval", "generation", "--samples", str(tmp_path / "samples.npz"), "--reference",
                str(tmp_path / "adm.npz"), "--inception-weights", str(weights), "--num-samples", "6",
                "--kid-subset-size", "5", "--out", str(tmp_path / "gen")]) == 0
    stored = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert abs(stored["fid"]) < 1e-3 and abs(stored["sfid"]) < 1e-3
    assert "stored statistics (unstated images)" in stored["fid_protocol"]
    noise_features = InceptionFeatures.from_file(weights).extract([torch.from_numpy(noise)])
    noise_stats = GaussianStats.from_features(noise_features.spatial)      # 63-d: cheap
    assert frechet_distance(GaussianStats.from_features(features.spatial), noise_stats) > 1.0
    expected = precision_recall(noise_features.pool, features.pool, k=3)
    assert (stored["precision"], stored["recall"]) == pytest.approx(expected) and stored["num_reference_images"] == 10


@pytest.fixture
def no_forward(monkeypatch):
    """Bad input must be reported before the Inception runs."""
    def refuse(self, images):
        raise AssertionError("the Inception ran before the input was checked")

    monkeypatch.setattr(InceptionFeatures, "forward", refuse)


@pytest.mark.slow
def test_bad_npz_and_too_few_images_are_clear_errors_before_any_forward(tmp_path, weights, no_forward, capsys):
    good = _images(4, 16, 16).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "good.npz", arr_0=good)
    np.savez(tmp_path / "no_arr0.npz", images=good)
    np.savez(tmp_path / "float.npz", arr_0=good.astype(np.float32))
    np.savez(tmp_path / "gray.npz", arr_0=good[..., 0])
    np.savez(tmp_path / "bad_mu.npz", arr_0=good, mu=np.zeros(10), sigma=np.eye(10))
    np.savez(tmp_path / "half_stats.npz", arr_0=good, mu=np.zeros(2048))
    np.savez(tmp_path / "other_inception.npz", arr_0=good, inception_sha256=np.str_("0" * 64))
    (tmp_path / "not_zip.npz").write_bytes(b"not a zip file")

    def error(samples: str, reference: str = "good.npz", num: str = "4") -> str:
        code = cli(["eval", "generation", "--samples", str(tmp_path / samples), "--reference",
                    str(tmp_path / reference), "--inception-weights", str(weights), "--num-samples", num])
        assert code == 2
        return capsys.readouterr().err

    assert "no_arr0.npz has no arr_0 array (keys: ['images'])" in error("no_arr0.npz")
    assert "arr_0 must be uint8 N x H x W x 3" in error("float.npz") and "float32" in error("float.npz")
    assert "(4, 16, 16)" in error("gray.npz")
    assert "not an .npz" in error("not_zip.npz")
    assert "has 4 images, fewer than --num-samples 5" in error("good.npz", num="5")
    assert "mu / sigma must be float (2048,) / (2048, 2048)" in error("good.npz", "bad_mu.npz")
    assert "has mu without sigma" in error("good.npz", "half_stats.npz")
    assert "computed with another Inception" in error("good.npz", "other_inception.npz")
    assert "needs more than 3 images" in error("good.npz", num="3")


@pytest.mark.slow
def test_weights_of_another_architecture_or_with_objects_are_refused(tmp_path, weights):
    from torchvision.models import inception_v3

    torchvision_net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(torchvision_net.state_dict(), tmp_path / "torchvision.pth")
    with pytest.raises(ValueError, match="does not hold the FID Inception.*AuxLogits"):
        InceptionFeatures.from_file(tmp_path / "torchvision.pth")
    state = torch.load(weights, weights_only=True)
    state.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="Missing key.*Mixed_7c.branch_pool.conv.weight"):
        InceptionFeatures.from_file(tmp_path / "missing.pth")
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled_module.pth")     # needs unpickling: refused
    with pytest.raises(ValueError, match="cannot read"):
        InceptionFeatures.from_file(tmp_path / "pickled_module.pth")


def test_reconstruction_with_more_images_than_the_shards_is_an_error(tmp_path, weights, no_forward, capsys):
    from models.config import ConfigError
    from models.tokenizer import Tokenizer, TokenizerConfig
    from pipeline.evaluate import build_reference

    shards = _write_shards(tmp_path / "shards", 3)
    with pytest.raises(ConfigError, match="has 3 images, fewer than --num-images 4"):
        build_reference(str(shards), tmp_path / "ref.npz", str(weights), image_size=32, num_images=4)
    config = TokenizerConfig.from_yaml(REPO / "configs" / "tokenizer" / "tiny.yaml")
    tokenizer = Tokenizer(config).save_pretrained(tmp_path / "tok")
    code = cli(["eval", "reconstruction", "--tokenizer", str(tokenizer), "--shards", str(shards), "--num-images", "4",
                "--no-lpips", "--inception-weights", str(weights), "--out", str(tmp_path / "rec")])
    assert code == 2 and "fewer than --num-images 4" in capsys.readouterr().err


def test_npz_images_stream_plain_and_compressed_files_exactly(tmp_path):
    from pipeline.evaluate import NpzImages

    images = np.random.default_rng(0).integers(0, 256, size=(7, 8, 9, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=images, labels=np.arange(7))
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    for name in ("plain.npz", "compressed.npz"):
        reader = NpzImages(tmp_path / name, "--samples")
        assert len(reader) == 7 and reader.image_size == "8x9"
        batches = list(reader.batches(3))
        assert [len(b) for b in batches] == [3, 3, 1] and batches[0].dtype == torch.uint8
        assert np.array_equal(torch.cat(batches).numpy(), images)
        assert np.array_equal(torch.cat(list(reader.batches(3, limit=5))).numpy(), images[:5])
