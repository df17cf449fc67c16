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
    """One tiny run of the whole study: 24 generated 64px images, 32px models, 2 steps x 2 seeds."""
    root = tmp_path_factory.mktemp("quality")
    images = write_image_folder(root / "images", num_images=24, size=64, num_classes=4)
    out = root / "results"
    every = ",".join(s.name for s in quality.SPECS + quality.EXTRA_SPECS)
    record = quality.main(["--images", str(images), "--models", every, "--steps", "2", "--seeds", "0,1",
                           "--image-size", "32", "--width", "8", "--z-channels", "16", "--codebook-size", "32",
                           "--batch-size", "4", "--threads", "1", "--examples", "3", "--out", str(out)])
    return images, out, record


@pytest.mark.slow
def test_study_writes_consistent_json_table_and_plots(study):
    images, out, record = study
    assert json.loads((out / "quality.json").read_text()) == json.loads(json.dumps(record))
    figures = record["figures"]
    points = figures["points"]
    assert set(points) == {"ref", "f8", "f16", "f16k2", "ent@0.25", "ent@0.25 random", "ent@0.5", "ent@0.5 random",
                           "learn25", "learn25 random", "learn50", "learn50 random", "dqfq", "dqfq random", "dqfq3",
                           "dqfq3 random", "dqfq-nodis", "dqfq-nodis random", "dqfq-ema", "dqfq-ema random", "dqfq-km",
                           "dqfq-km random", "dqfq75", "dqfq75 random", "dqfq75-ema", "dqfq75-ema random", "learn25p",
                           "learn25p random", "learn50p", "learn50p random", "learn50p3", "learn50p3 random",
                           "ceil-sphere", "ceil-cont"}
    # 32px: the F16 grid is 2 x 2 (4 codes), the F8 grid 4 x 4 (16 codes); two-level maps lie in between.
    codes = {name: p["codes_per_image"]["mean"] for name, p in points.items()}
    assert codes["f16"] == codes["f16k2"] == 4 and codes["f8"] == codes["ref"] == 16
    for name in ("ent@0.25", "ent@0.5", "learn25", "learn50", "dqfq", "dqfq3", "dqfq-ema", "dqfq-km", "dqfq75"):
        assert 4 <= codes[name] <= 16
        # the random-map control codes exactly as many positions per image as the adaptive map
        assert codes[f"{name} random"] == codes[name]
        assert 0 <= points[name]["fine_share"]["mean"] <= 1
    assert codes["ent@0.25"] <= codes["ent@0.5"]
    assert codes["ceil-sphere"] == codes["ceil-cont"] == 16
    for name, point in points.items():
        k = 3 if name.startswith("dqfq3") else 2 if name.startswith(("f16k2", "dqfq")) else 0 if name.startswith(
            "ceil") else 1
        assert len(point["usage"]) == k and all(0 < u <= 1 for u in point["usage"])
        assert point["psnr"]["n"] == 2 and math.isfinite(point["psnr"]["mean"]) and point["psnr"]["std"] >= 0
        assert 0 <= point["retrieval"]["mean"] <= 1
    # mean +- std over the seeds, from the per-seed records
    per_seed = [r["points"]["f8"]["psnr"] for r in figures["per_seed"]]
    assert points["f8"]["psnr"]["mean"] == pytest.approx(sum(per_seed) / 2, abs=1e-4)
    assert points["f8"]["psnr"]["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2), abs=1e-4)

    split = figures["split"]
    names = sorted(p.name for p in images.rglob("*.png"))
    assert split["train"] + split["held_out"] == len(names) == 24
    assert split["held_out_files"] == sorted(n for n in names if quality.is_held_out(n, 0.2))
    assert figures["steps"] == 2
    assert set(figures["train_seconds"]) == {s.name for s in quality.SPECS + quality.EXTRA_SPECS}

    for name in ("ceil-sphere", "ceil-cont"):   # the ceilings are margins over the reference, not targets
        gap = [r["points"][name]["psnr"] - r["points"]["ref"]["psnr"] for r in figures["per_seed"]]
        assert figures["margins_db"][f"{name}_minus_ref"]["mean"] == pytest.approx(sum(gap) / 2, abs=1e-3)
    targets = record["targets"]
    assert not any("ceil" in key for key in targets)
    gaps = [r["points"]["f8"]["psnr"] - r["points"]["ref"]["psnr"] for r in figures["per_seed"]]
    assert targets["varitok_f8_k1_minus_reference_db"]["value"] == pytest.approx(sum(gaps) / 2, abs=1e-3)
    claim2 = targets["claim2_k2_minus_k1_mean_minus_2std_db"]
    assert claim2["value"] == pytest.approx(claim2["mean"] - 2 * claim2["std"], abs=1e-3)
    assert claim2["met"] == (claim2["value"] >= 0)
    for name in ("ent@0.25", "ent@0.5", "learn25", "learn50", "learn50p3"):   # claim 1: K = 1 two-level models only
        assert f"claim1_{name}_over_random_mean_minus_2std_db" in targets
        assert f"claim1_{name}_over_line_mean_minus_2std_db" in targets
    assert not any("dqfq" in key for key in targets if key.startswith("claim1"))
    for name in ("dqfq", "dqfq-nodis", "dqfq-ema", "dqfq-km", "dqfq75-ema"):   # every variant against the reference
        assert targets[f"{name}_minus_reference_db"]["at_fewer_codes_than_reference"] is True
    assert quality.DEFAULT_MODEL == "dqfq75" and "dqfq_default_minus_reference_db" in targets
    assert figures["config"]["dqfq75"]["router"]["targets"] == [0.75] == figures["config"]["dqfq3"]["router"]["targets"]
    assert figures["config"]["dqfq-ema"]["quantizer"]["codebook_update"] == "ema"
    assert figures["config"]["dqfq-km"]["quantizer"]["codebook_init"] == "kmeans"
    assert figures["config"]["learn50p3"]["router"]["entropy_prior"] == 3.0
    assert figures["config"]["f8"]["quantizer"]["adapter_blocks"] == 0 < figures["config"]["dqfq75"]["quantizer"][
        "adapter_blocks"]
    disentangle = {name: figures["config"][name]["quantizer"]["disentangle_weight"]
                   for name in ("dqfq", "dqfq-nodis", "dqfq3")}
    assert disentangle == {"dqfq": 0.1, "dqfq-nodis": 0.0, "dqfq3": 0.1}
    table = (out / "quality.md").read_text()
    assert all(f"| {name} |" in table for name in targets)

    with Image.open(out / "quality_examples.png") as grid:
        # 3 held-out rows, original + 20 non-random points as columns, each 32px with a 2px pad on both sides
        assert grid.size == (21 * 36, 3 * 36)
    with Image.open(out / "quality_psnr_vs_codes.png") as plot:
        assert plot.size[0] > 300


def test_default_models_are_the_study_without_the_ablations():
    args = quality.parse_args(["--images", "x"])
    assert [s.name for s in quality.chosen_specs(args)] == [s.name for s in quality.SPECS]
    args = quality.parse_args(["--images", "x", "--models", "dqfq-ema,ref", "--no-teachers"])
    assert [s.name for s in quality.chosen_specs(args)] == ["ref", "dqfq-ema"]
    assert [s.name for s in quality.chosen_specs(quality.parse_args(["--images", "x", "--no-teachers"]))] == [
        s.name for s in quality.SPECS if not s.teachers]
    with pytest.raises(SystemExit):
        quality.parse_args(["--images", "x", "--models", "nope"])


def test_ceiling_reference_decodes_its_latents_unsnapped():
    from models.tokenizer.reference import ReferenceVQ

    torch.manual_seed(0)
    args = quality.parse_args(["--images", "x", "--image-size", "32", "--width", "8", "--z-channels", "16"])
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    vq = quality.build_reference(args)
    raw = vq.quant_conv(vq.encoder(images)[0])
    for latent, expected in (("sphere", torch.nn.functional.normalize(raw, dim=1)), ("continuous", raw)):
        model = quality.build_reference(args, latent=latent)
        model.load_state_dict(vq.state_dict())
        q, indices, losses = model.quantize(images)
        torch.testing.assert_close(q, expected)
        assert losses == {} and indices.shape == (2, 4, 4) and not indices.any()
    snapped, indices, losses = vq.quantize(images)    # the reference itself: every latent is its codebook row
    codes = torch.nn.functional.normalize(vq.codebook, dim=-1)
    torch.testing.assert_close(snapped.permute(0, 2, 3, 1), codes[indices])
    assert set(losses) == {"codebook", "commitment"}
    with pytest.raises(ValueError, match="latent must be one of"):
        ReferenceVQ(None, None, 16, 8, 32, latent="fsq")


def test_identity_retrieval_and_psnr_by_hand():
    from models.tokenizer.reference import identity_retrieval, psnr_per_image

    images = torch.stack([torch.full((3, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    assert identity_retrieval(images, images) == 1.0
    mean = images.mean(0, keepdim=True).expand_as(images)         # collapse to the dataset mean: only the
    assert identity_retrieval(mean, images) == pytest.approx(1 / 3)   # image nearest the mean is its own
    assert identity_retrieval(images[:2] * 0, torch.stack([images[1], images[1]])) == 0.0   # ties are not "closer"
    assert identity_retrieval(images.flip(0), images) == pytest.approx(1 / 3)   # only the middle one is its own
    # [-1, 1] pixels -> [0, 1]: an error of 0.2 is 0.1 in [0, 1], MSE 0.01, PSNR 20 dB
    assert psnr_per_image(images[:1] + 0.2, images[:1]).item() == pytest.approx(20.0, abs=1e-4)


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

    args = argparse.Namespace(image_size=32, width=8, z_channels=16, codebook_size=16)
    spec = next(s for s in quality.SPECS if s.name == "ent")
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
