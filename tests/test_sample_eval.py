"""varitok sample and varitok eval: valid images and npz, class-balanced labels, hand-checked PSNR, metric
paths on random-weight FID Inception / LPIPS files, missing-weights errors (the Inception itself: test_metrics)."""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data.demo_images import procedural_image
from models.config import ConfigError
from models.generator import Generator, GeneratorConfig
from models.hub import file_sha256
from models.tokenizer import Tokenizer, TokenizerConfig
from pipeline.cli import main as cli
from pipeline.evaluate import Extremes, ReconstructionAccumulator
from inception_helpers import save_random_fid_inception
from pipeline.metrics import (GaussianStats, InceptionFeatures, codebook_usage, frechet_distance, precision_recall,
                              psnr)
from pipeline.sample_images import sample_labels

REPO = Path(__file__).resolve().parent.parent
SIZE = 64


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Random-weight tiny tokenizer (64px, 2 levels, K=2 x 256) and a matching tiny generator."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    tokenizer = Tokenizer(TokenizerConfig.from_yaml(REPO / "configs" / "tokenizer" / "tiny.yaml"))
    generator = Generator(GeneratorConfig(dim=32, heads=2, position_depth=1, content_depth=1, head_dim=16,
                                          head_heads=1, num_classes=4))
    return {"tokenizer": tokenizer.save_pretrained(root / "tokenizer"),
            "generator": generator.save_pretrained(root / "generator")}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Random-weight FID Inception (torch-fidelity's architecture) and LPIPS-VGG files in the formats the commands
    load."""
    from safetensors.torch import save_file

    from models.tokenizer.losses import LPIPS

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    lpips = LPIPS()
    for head in lpips.heads:
        head.weight.data.abs_()
    save_file({k: v.contiguous() for k, v in lpips.state_dict().items()}, str(root / "lpips.safetensors"))
    return {"lpips": root / "lpips.safetensors", "inception": save_random_fid_inception(root / "inception.pth")}


@pytest.fixture
def small_inception_input(monkeypatch):
    """The Inception at its smallest input (75 px) keeps these end-to-end tests fast; 299 px parity: test_metrics."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)


def _shards(root: Path, count: int) -> tuple[Path, np.ndarray]:
    root.mkdir(parents=True)
    pixels = np.stack([procedural_image(100 + i, SIZE, label=i % 4) for i in range(count)])
    with wds.TarWriter(str(root / "val-000000.tar"), mtime=0) as writer:
        for i, image in enumerate(pixels):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            writer.write({"__key__": f"img{i:03d}", "png": buffer.getvalue(), "cls": str(i % 4).encode()})
    return root, pixels


def test_sample_labels_balanced_cycled_and_unconditional():
    assert sample_labels(6, 4, balanced=True).tolist() == [0, 1, 2, 3, 0, 1]
    assert sample_labels(5, 4, classes=[2, 3]).tolist() == [2, 3, 2, 3, 2]
    assert sample_labels(3, 0).tolist() == [0, 0, 0]            # null class of an unconditional model
    with pytest.raises(ConfigError, match="outside the generator's classes 0..3"):
        sample_labels(3, 4, classes=[4])


def test_sample_writes_pngs_grid_and_adm_npz(tmp_path, exports):
    out = tmp_path / "samples"
    assert cli(["sample", "--generator", str(exports["generator"]), "--tokenizer", str(exports["tokenizer"]),
                "--num-samples", "5", "--class-balanced", "--cfg", "2.0", "--top-k", "50", "--batch-size", "3",
                "--seed", "3", "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["labels"]
    assert images.dtype == np.uint8 and images.shape == (5, SIZE, SIZE, 3)
    assert labels.tolist() == [0, 1, 2, 3, 0]
    assert images.std() > 0                                      # decoded pictures, not a constant fill
    for i in range(5):
        png = np.asarray(Image.open(out / "images" / f"{i:06d}.png"))
        assert np.array_equal(png, images[i])
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > SIZE * 5 and grid.size[1] > SIZE * 2    # 5 columns, images and granularity rows
    summary = json.loads((out / "samples.json").read_text())
    assert summary["class_counts"] == [2, 1, 1, 1] and not list(out.glob(".part-*"))


@pytest.mark.slow
def test_two_process_sampling_gives_each_rank_its_slice_and_merges_in_order(tmp_path, exports, one_thread):
    """torchrun, 2 CPU processes (gloo): sample i is made by rank i % 2 from that rank's seeded generator, and
    rank 0 merges the parts back into sample order."""
    from conftest import free_port, start_process

    from pipeline.sample_images import generate_images

    out, seed, num = tmp_path / "samples", 3, 5
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "pipeline.cli", "sample", "--generator", str(exports["generator"]),
            "--tokenizer", str(exports["tokenizer"]), "--num-samples", str(num), "--cfg", "2.0", "--top-k", "50",
            "--batch-size", "2", "--seed", str(seed), "--out", str(out)]
    process = start_process(argv, tmp_path / "torchrun.log")
    assert process.wait(timeout=300) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["labels"]
    assert labels.tolist() == [0, 1, 2, 3, 0] and images.shape == (num, SIZE, SIZE, 3)
    assert json.loads((out / "samples.json").read_text())["world_size"] == 2 and not list(out.glob(".part-*"))
    generator = Generator.from_pretrained(exports["generator"]).eval()
    tokenizer = Tokenizer.from_pretrained(exports["tokenizer"]).eval()
    for rank in (0, 1):
        expected, _ = generate_images(generator, tokenizer, labels[rank::2].tolist(), batch_size=2, cfg_scale=2.0,
                                      top_k=50, seed_generator=torch.Generator().manual_seed(seed * 1000003 + rank))
        assert np.array_equal(images[rank::2], expected)
        for index in range(rank, num, 2):
            assert np.array_equal(np.asarray(Image.open(out / "images" / f"{index:06d}.png")), images[index])


def test_psnr_hand_values_and_extremes():
    x = torch.rand(3, 3, 8, 8) - 0.5                             # in [-0.5, 0.5]: +0.1 stays inside [-1, 1]
    assert torch.isinf(psnr(x, x)).all()
    # MSE 0.01 on a data range of 2: 10 log10(4 / 0.01) = 26.0206 dB
    torch.testing.assert_close(psnr(x + 0.1, x), torch.full((3,), 10 * math.log10(400.0)))
    accumulator = ReconstructionAccumulator(2, [4, 4], extremes=1)
    grains = torch.tensor([[[0, 1]], [[1, 1]], [[0, 0]]], dtype=torch.uint8)
    codes = [torch.tensor([[0, 1]] * 5), torch.tensor([[1, 1]] * 8), torch.tensor([[2, 1]] * 2)]
    noisy = x.clone()
    noisy[1] += 0.2                                              # image 1: MSE 0.04 -> 20.0 dB, the worst
    accumulator.update(x, noisy, grains, codes)
    result = accumulator.result()
    assert math.isinf(result["psnr"])                            # two identical reconstructions
    assert result["codes_per_image"] == pytest.approx(15 / 3)
    assert result["region_share_per_level"] == pytest.approx([3 / 6, 3 / 6])
    assert result["codebooks"][0]["used"] == 3 and result["codebooks"][1]["perplexity"] == pytest.approx(1.0)
    assert result["ssim"] < 1.0
    worst = accumulator.extremes.lowest()
    torch.testing.assert_close(worst["recs"], noisy[1:2])
    extremes = Extremes(count=1)
    extremes.update(torch.tensor([3.0, 1.0, 2.0]), tag=torch.tensor([30, 10, 20]))
    assert extremes.lowest()["tag"].tolist() == [10] and extremes.highest()["tag"].tolist() == [30]


def test_codebook_usage_and_precision_recall_by_hand():
    usage = codebook_usage(np.array([[0, 3], [1, 3], [2, 3], [3, 3]]), [4, 8])
    assert usage[0]["perplexity"] == pytest.approx(4.0) and usage[0]["usage"] == 1.0
    assert usage[1]["perplexity"] == pytest.approx(1.0) and usage[1]["used"] == 1
    real = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    fake = torch.tensor([[0.5, 0.5], [10.0, 10.0], [0.1, 0.0], [20.0, 0.0]])
    # k=1 real radii are 1 (the unit square), so fakes 0 and 2 lie inside: precision 2/4.
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.5)
    # fake radii (k=1): 0.640, 13.435, 0.640, 14.142. Real (0,0) is 0.1 from fake (0.1,0) and (1,1) is 12.73
    # from fake (10,10): covered; (1,0) and (0,1) are 0.707 from (0.5,0.5) and 13.454 from (10,10): not.
    assert recall == pytest.approx(0.5)


@pytest.mark.slow
def test_eval_reconstruction_end_to_end_matches_independent_psnr(tmp_path, exports, weights, small_inception_input):
    shards, pixels = _shards(tmp_path / "shards", 4)
    out = tmp_path / "rec"
    assert cli(["eval", "reconstruction", "--tokenizer", str(exports["tokenizer"]), "--shards", str(shards),
                "--num-images", "3", "--batch-size", "2", "--lpips-weights", str(weights["lpips"]),
                "--inception-weights", str(weights["inception"]), "--extremes", "2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    tokenizer = Tokenizer.from_pretrained(exports["tokenizer"]).eval()
    images = torch.from_numpy(pixels[:3]).permute(0, 3, 1, 2).float() / 127.5 - 1
    codes = tokenizer.encode(images)
    recs = tokenizer.decode(codes).clamp(-1, 1)
    mse = (recs - images).double().pow(2).mean(dim=(1, 2, 3))
    expected = (10 * torch.log10(4.0 / mse)).mean().item()
    assert metrics["images"] == 3
    assert metrics["psnr"] == pytest.approx(expected, rel=1e-4)
    assert metrics["codes_per_image"] == pytest.approx(np.mean([len(c.codes) for c in codes]))
    assert sum(metrics["region_share_per_level"]) == pytest.approx(1.0)
    assert metrics["lpips"] > 0 and math.isfinite(metrics["rfid"]) and metrics["rfid"] >= -1e-6
    assert metrics["rfid_images"] == 3 and metrics["rfid_protocol"].startswith("3 reconstructions vs the same 3")
    assert metrics["inception"]["weights_sha256"] == file_sha256(weights["inception"])
    assert len(metrics["codebooks"]) == 2 and all(1 <= c["perplexity"] <= 256 for c in metrics["codebooks"])
    assert "| psnr |" in (out / "metrics.md").read_text()
    extremes = Image.open(out / "extremes.png")
    assert extremes.size[0] > 3 * SIZE and extremes.size[1] > 3 * SIZE   # 3 columns, 2 worst + 2 best of 3


@pytest.mark.slow
def test_eval_generation_metrics_from_npz(tmp_path, weights, small_inception_input):
    samples = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples, labels=np.zeros(4, dtype=np.int64))
    assert cli(["eval", "generation", "--samples", str(tmp_path / "samples.npz"), "--reference",
                str(tmp_path / "samples.npz"), "--inception-weights", str(weights["inception"]), "--k", "2",
                "--is-splits", "1", "--num-samples", "4", "--kid-subset-size", "4",
                "--out", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "metrics.json").read_text())
    assert abs(same["fid"]) < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["inception_score"] >= 1.0 - 1e-6 and same["num_samples"] == 4
    features = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(same["sfid"]) < 1e-3 and math.isfinite(same["kid"])   # KID: independent random subsets
    shifted = frechet_distance(GaussianStats.from_features(features), GaussianStats.from_features(features + 1.0))
    assert shifted == pytest.approx(8.0, rel=1e-6)                                    # |mean shift|^2


def test_missing_weights_are_clear_errors(tmp_path, exports, capsys):
    shards, _ = _shards(tmp_path / "shards", 2)
    code = cli(["eval", "reconstruction", "--tokenizer", str(exports["tokenizer"]), "--shards", str(shards),
                "--no-lpips", "--out", str(tmp_path / "rec")])
    assert code == 2 and "needs weights: --inception-weights" in capsys.readouterr().err
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((3, 8, 8, 3), dtype=np.uint8))
    code = cli(["eval", "generation", "--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "s.npz"),
                "--num-samples", "3"])
    assert code == 2 and "needs weights: --inception-weights" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="needs weights"):
        InceptionFeatures.from_file(tmp_path / "absent.pth")
