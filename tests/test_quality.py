"""benchmarks/quality.py: the quality study end to end on generated images (tiny sizes), and its pieces."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from benchmarks import quality
from data.demo_images import write_image_folder
from models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One tiny run of the whole study: 24 generated 64px images, 32px models, a few seconds of training."""
    root = tmp_path_factory.mktemp("quality")
    images = write_image_folder(root / "images", num_images=24, size=64, num_classes=4)
    out = root / "results"
    record = quality.main(["--images", str(images), "--minutes", "0.02", "--image-size", "32", "--width", "8",
                           "--z-channels", "16", "--codebook-size", "32", "--batch-size", "4", "--threads", "1",
                           "--examples", "3", "--out", str(out)])
    return images, out, record


def test_study_writes_consistent_json_table_and_plots(study):
    images, out, record = study
    assert json.loads((out / "quality.json").read_text()) == json.loads(json.dumps(record))
    figures = record["figures"]
    points = figures["points"]
    assert set(points) == {"a", "a8", "b", "c@0.25", "c@0.25 random", "c@0.5", "c@0.5 random", "d@0.5",
                           "d@0.5 random"}
    # 32px: the F16 grid is 2 x 2 (4 codes), the F8 grid 4 x 4 (16 codes); two-level maps lie in between.
    assert points["a"]["codes_per_image"] == points["b"]["codes_per_image"] == 4
    assert points["a8"]["codes_per_image"] == 16
    for name in ("c@0.25", "c@0.5", "d@0.5"):
        assert 4 <= points[name]["codes_per_image"] <= 16
        # the random-map control codes exactly as many positions per image as the adaptive map
        assert points[f"{name} random"]["codes_per_image"] == points[name]["codes_per_image"]
    assert points["c@0.25"]["codes_per_image"] <= points["c@0.5"]["codes_per_image"]
    for name, point in points.items():
        k = 2 if name[0] in "bd" else 1
        assert len(point["usage"]) == len(point["perplexity"]) == k
        assert all(0 < u <= 1 for u in point["usage"])
        # perplexity of a code histogram lies between 1 and the number of codes in use
        assert all(1 - 1e-6 <= p <= u * 32 + 1e-6 for p, u in zip(point["perplexity"], point["usage"]))
        assert math.isfinite(point["psnr"]) and -1 <= point["ssim"] <= 1

    split = figures["split"]
    names = sorted(p.name for p in images.rglob("*.png"))
    assert split["train"] + split["held_out"] == len(names) == 24
    assert split["held_out_files"] == sorted(n for n in names if quality.is_held_out(n, 0.2))
    assert figures["steps"] >= 2 and set(figures["train_seconds"]) == {"a", "a8", "b", "c", "d"}

    claim2 = figures["claims"]["claim2"]
    psnr_gain = points["b"]["psnr"] - points["a"]["psnr"]
    usage_gain = sum(points["b"]["usage"]) / 2 - points["a"]["usage"][0]
    assert claim2["psnr_gain_db"] == pytest.approx(psnr_gain, abs=1e-3)
    assert claim2["usage_gain"] == pytest.approx(usage_gain, abs=1e-4)
    assert claim2["holds"] == (psnr_gain > 0 and usage_gain > 0) == (
        record["targets"]["claim2_psnr_gain_db"]["met"] and record["targets"]["claim2_usage_gain"]["met"])
    table = (out / "quality.md").read_text()
    assert table.count("\n| (") == len(points)
    for number, holds in ((1, figures["claims"]["claim1"]["holds"]), (2, claim2["holds"])):
        verdict = "**HOLDS**" if holds else "**DOES NOT HOLD**"
        assert any(line.startswith(f"Claim {number}") and verdict in line for line in table.splitlines())

    with Image.open(out / "quality_examples.png") as grid:
        # 3 held-out rows, original + 9 points as columns, each 32px with a 2px pad on both sides
        assert grid.size == (10 * 36, 3 * 36)
    with Image.open(out / "quality_psnr_vs_codes.png") as plot:
        assert plot.size[0] > 300


def test_held_out_split_is_a_stable_fifth():
    names = [f"n{i:08d}_class.JPEG" for i in range(2000)]
    held = [quality.is_held_out(n, 0.2) for n in names]
    assert held == [quality.is_held_out(n, 0.2) for n in names]
    assert 0.17 < sum(held) / len(held) < 0.23
    # a larger held-out fraction only adds files: the split is a threshold on one hash value
    assert all(quality.is_held_out(n, 0.5) for n, h in zip(names, held) if h)


def test_shuffle_regions_keeps_each_images_levels_and_moves_them():
    grain = torch.zeros(3, 8, 8, dtype=torch.long)
    grain[0, :2] = 1                        # 16 fine regions on top
    grain[1, :, :4] = 1                     # 32 fine regions on the left
    shuffled = quality.shuffle_regions(grain, torch.Generator().manual_seed(0))
    assert shuffled.shape == grain.shape and shuffled.dtype == grain.dtype
    assert torch.equal(shuffled.flatten(1).sort(1).values, grain.flatten(1).sort(1).values)
    assert not torch.equal(shuffled[:2], grain[:2])
    assert torch.equal(shuffled[2], grain[2])


def test_evaluate_codes_an_imposed_map():
    """The random-map control: evaluate codes the imposed grain maps; lengths follow 4**level."""
    import argparse

    args = argparse.Namespace(image_size=32, width=8, z_channels=16, codebook_size=16, entropy_weight=0.0)
    spec = next(s for s in quality.SPECS if s.name == "c")
    torch.manual_seed(0)
    tokenizer = Tokenizer(quality.build_config(spec, args, torch.linspace(0, 3.5, 11).tolist())).eval()
    cache = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    forced = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 1]], [[0, 0], [0, 0]]])
    imposed = quality.evaluate(tokenizer, cache, batch_size=2, num_examples=2, grain=forced)
    assert torch.equal(imposed.grain, forced) and imposed.examples.shape == (2, 3, 32, 32)
    assert imposed.metrics["codes_per_image"] == pytest.approx(((3 + 4) + (1 + 3 * 4) + 4) / 3)
    adaptive = quality.evaluate(tokenizer, cache, batch_size=2, num_examples=2)
    routed = torch.stack([c.grain.long() for c in tokenizer.encode(quality.to_unit_range(cache))])
    assert torch.equal(adaptive.grain, routed)
    # imposing the router's own maps is the adaptive evaluation itself
    again = quality.evaluate(tokenizer, cache, batch_size=2, num_examples=2, grain=routed)
    assert again.metrics == adaptive.metrics and torch.equal(again.examples, adaptive.examples)


def test_training_batches_are_shared_and_deterministic():
    cache = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    first = quality.training_batch(cache, 3, 4, seed=0)
    assert torch.equal(first, quality.training_batch(cache, 3, 4, seed=0))
    assert not torch.equal(first, quality.training_batch(cache, 4, 4, seed=0))
    # every image appears exactly once per epoch (steps 0..4 of batch 2 cover one permutation of 10)
    epoch = torch.cat([quality.training_batch(cache, s, 2, seed=1) for s in range(5)])
    originals = quality.to_unit_range(cache)
    matches = [(originals == img).flatten(1).all(1) | (originals.flip(-1) == img).flatten(1).all(1) for img in epoch]
    assert torch.stack(matches).sum(0).tolist() == [1] * 10


def test_line_psnr_interpolates_between_the_fixed_points():
    coarse = {"codes_per_image": 64, "psnr": 20.0}
    fine = {"codes_per_image": 256, "psnr": 24.0}
    assert quality.line_psnr(160, coarse, fine) == pytest.approx(22.0)
    assert quality.line_psnr(112, coarse, fine) == pytest.approx(21.0)
