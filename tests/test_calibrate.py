"""calibrate-entropy: bounded-memory region sample (exact when it fits, DKW-bounded share error when not),
the CLI with a progress bar and decoding workers."""
import json

import pytest
import torch

from models.tokenizer.router import calibrate_entropy
from pipeline.calibrate import RegionSample, dkw_share_error, thresholds_for


def skewed_population(n, seed):
    """Entropy-like values in [0, ln 32] with a 30% point mass at 0 (flat regions) and a long tail."""
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.6 + 0.4).exp().clamp_max(3.4657)
    values[torch.rand(n, generator=gen) < 0.3] = 0.0
    return values


def test_region_sample_is_everything_when_it_fits_and_bounded_when_not():
    population = skewed_population(5000, seed=0)
    exact = RegionSample(capacity=8192, seed=0)
    for chunk in population.split(700):
        exact.add(chunk)
    assert exact.seen == 5000 and torch.equal(exact.values().sort().values, population.sort().values)

    small = RegionSample(capacity=300, seed=0)
    for chunk in population.view(50, 100):
        small.add(chunk)
        assert small.held <= 2 * 300
    sample = small.values()
    assert small.seen == 5000 and sample.numel() == 300
    assert torch.isin(sample, population).all()
    with pytest.raises(ValueError, match="capacity"):
        RegionSample(capacity=1)


@pytest.mark.parametrize("ratios,factors", [([0.25], [8, 16]), ([0.2, 0.35], [4, 8, 16])])
def test_sampled_table_gives_the_requested_shares_on_the_whole_population(ratios, factors):
    population = skewed_population(400_000, seed=1)
    sample = RegionSample(capacity=4096, seed=2)
    for chunk in population.split(16_384):
        sample.add(chunk)
    thresholds = torch.tensor(thresholds_for(calibrate_entropy(sample.values(), 16)["quantiles"], ratios, factors),
                              dtype=torch.float64)
    level = (population.unsqueeze(-1) > thresholds).sum(-1)
    shares = [float((level == g).double().mean()) for g in range(1, len(factors))]
    bound = dkw_share_error(4096)                     # 0.030 at probability 0.999
    # a level's share is the difference of two CDF values, so its error is at most twice the CDF bound
    assert all(abs(got - want) <= 2 * bound for got, want in zip(shares, ratios)), (shares, ratios, bound)


def test_calibrate_cli_samples_with_workers_and_shows_progress(tmp_path, image_folder, capsys):
    from data.shards import ShardOptions, shard_images
    from pipeline.cli import main

    shard_images([str(image_folder)], tmp_path / "shards", ShardOptions(image_size=64, format="png", shard_size=6),
                 progress=False)
    out = tmp_path / "table.json"
    assert main(["calibrate-entropy", "--shards", str(tmp_path / "shards"), "--config", "tiny", "--ratios", "0.5",
                 "--max-images", "0", "--sample-regions", "40", "--num-workers", "2", "--batch-size", "4",
                 "--out", str(out), "data.image_size=64"]) == 0
    table = json.loads(out.read_text())
    assert table["num_images"] == 12 and table["num_regions"] == 12 * 16 and table["sampled_regions"] == 40
    assert table["share_error_bound"] == pytest.approx(dkw_share_error(40))
    assert table["achieved_shares"] == [0.5]          # measured on the 40 sampled regions
    captured = capsys.readouterr()
    assert "calibrate-entropy" in captured.err and "12/12" in captured.err and "img/s" in captured.err
    assert "(40 sampled)" in captured.out


@pytest.mark.slow
def test_calibrate_reads_the_stage_schema_without_importing_the_training_stage():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, pipeline.calibrate; "
            "print(sorted(m for m in ('pipeline.train_tokenizer', 'pipeline.runtime', 'data.stream') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
