"""Router: budget loss formula and effect, entropy map vs NumPy, calibration hits the requested shares."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from conftest import run_gloo_ranks
from models.config import ConfigError
from models.tokenizer.router import Router, RouterConfig, budget_loss, calibrate_entropy, region_entropy


def test_budget_loss_on_hand_made_gates():
    gates = torch.zeros(2, 2, 2, 2)
    gates[:, 1] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])   # fine share r = 0.75
    gates[:, 0] = 1 - gates[:, 1]
    loss, shares = budget_loss(gates, [0.5], weight=10.0)
    assert torch.isclose(loss, torch.tensor(2 * 10.0 * (0.75 - 0.5) ** 2))       # DQ-VAE: 2 gamma (r - t)^2
    assert torch.allclose(shares, torch.tensor([0.25, 0.75]))
    three = torch.nn.functional.one_hot(torch.tensor([[0, 1], [2, 2]]), 3).permute(2, 0, 1)[None].float()
    loss3, _ = budget_loss(three, [0.3, 0.3], weight=2.0)                        # shares .25 .25 .5
    assert math.isclose(float(loss3), 2.0 * ((0.25 - 0.4) ** 2 + (0.25 - 0.3) ** 2 + (0.5 - 0.3) ** 2), rel_tol=1e-6)


def test_budget_loss_drives_learned_router_to_target():
    torch.manual_seed(0)
    router = Router(RouterConfig(mode="learned", targets=[0.8], hidden=16), factors=[16, 8], z_channels=8)
    features = [torch.randn(8, 8, 4, 4), torch.randn(8, 8, 8, 8)]
    with torch.no_grad():
        router.mlp[-1].bias.copy_(torch.tensor([2.0, -2.0]))          # start nearly all coarse
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    router.train()
    for _ in range(60):
        loss = router(features, None).budget
        opt.zero_grad()
        loss.backward()
        opt.step()
    router.eval()
    share = float(router(features, None).shares[1])
    assert abs(share - 0.8) < 0.1, share


def test_region_entropy_matches_numpy_formula():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 12, generator=gen) * 2 - 1
    images[0, :, :4, :4] = 0.25                                      # a flat region: entropy ~ 0 or ln 2
    got = region_entropy(images, 4).numpy()
    x = images.double().numpy()
    grey = 0.2989 * x[:, 0] + 0.5870 * x[:, 1] + 0.1140 * x[:, 2]
    bins = np.linspace(-1, 1, 32)
    expected = np.zeros((2, 2, 3))
    for b in range(2):
        for i in range(2):
            for j in range(3):
                patch = grey[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1, 1)
                hist = np.exp(-0.5 * ((patch - bins) / 0.01) ** 2).mean(0)
                p = hist / (hist.sum() + 1e-40) + 1e-40
                expected[b, i, j] = -(p * np.log(p)).sum()
    assert got.shape == (2, 2, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert expected[0, 0, 0] < expected[0, 1, 1]


def textured_images(n, size, seed):
    """Images whose regions range from flat to noisy, so region entropies spread out."""
    gen = torch.Generator().manual_seed(seed)
    amplitude = torch.rand(n, 1, size // 16, size // 16, generator=gen)
    amplitude = amplitude.repeat_interleave(16, 2).repeat_interleave(16, 3)
    base = torch.rand(n, 3, 1, 1, generator=gen) * 1.6 - 0.8
    return (base + amplitude * (torch.rand(n, 3, size, size, generator=gen) * 2 - 1)).clamp(-1, 1)


@pytest.mark.parametrize("factors,targets", [([8, 16], [0.3]), ([4, 8, 16], [0.25, 0.4])])
def test_calibration_gives_requested_shares_on_its_own_data(factors, targets):
    images = textured_images(16, 64, seed=1)
    table = calibrate_entropy(region_entropy(images, 16), region_size=16)
    assert len(table["quantiles"]) == 1001 and table["bins"] == 32
    router = Router(RouterConfig(mode="entropy", targets=targets, entropy_quantiles=table["quantiles"]),
                    factors=factors, z_channels=4)
    coarse = torch.zeros(16, 4, 4, 4)
    shares = router([coarse], images).shares
    expected = torch.tensor([1 - sum(targets), *targets])
    assert torch.allclose(shares.float(), expected, atol=1.5 / 256), shares
    router.set_granularity_ratio([0.5] + [0.0] * (len(factors) - 2))
    assert abs(float(router([coarse], images).shares[1]) - 0.5) < 1.5 / 256


def test_entropy_table_file_is_inlined_by_the_pipeline_and_refused_by_the_model(tmp_path):
    from pipeline.calibrate import inline_entropy_table

    table = calibrate_entropy(torch.rand(100), region_size=16)
    (tmp_path / "good.json").write_text(json.dumps(table))
    cfg = RouterConfig(mode="entropy", entropy_table=str(tmp_path / "good.json"))
    with pytest.raises(ConfigError, match="pipeline.calibrate.inline_entropy_table"):
        Router(cfg, factors=[8, 16], z_channels=4)          # models read no files
    inlined = inline_entropy_table(cfg, region_size=16)
    assert cfg.entropy_table and not cfg.entropy_quantiles  # the caller's config is left alone
    assert inlined.entropy_table == "" and inlined.entropy_quantiles == table["quantiles"]
    Router(inlined, factors=[8, 16], z_channels=4)
    assert inline_entropy_table(inlined, region_size=16) is inlined
    (tmp_path / "bad.json").write_text(json.dumps({**table, "region_size": 32}))
    with pytest.raises(ConfigError, match="calibrated with"):
        inline_entropy_table(RouterConfig(mode="entropy", entropy_table=str(tmp_path / "bad.json")), 16)
    with pytest.raises(ConfigError, match="not found"):
        inline_entropy_table(RouterConfig(mode="entropy", entropy_table=str(tmp_path / "none.json")), 16)
    with pytest.raises(ConfigError, match="calibrate-entropy"):
        Router(RouterConfig(mode="entropy"), [8, 16], 4)


def test_router_and_tokenizer_copy_their_config_and_exports_round_trip_exactly(tmp_path):
    from models.tokenizer import Tokenizer, TokenizerConfig

    quantiles = calibrate_entropy(region_entropy(textured_images(4, 32, seed=3), 16), 16)["quantiles"]
    router_cfg = RouterConfig(mode="entropy", targets=[0.3], entropy_quantiles=quantiles)
    router = Router(router_cfg, [8, 16], 4)
    router.set_granularity_ratio([0.6])
    assert router_cfg.targets == [0.3] and router.config.targets == [0.6]

    config = TokenizerConfig.from_dict({
        "factors": [8, 16], "z_channels": 8, "router": router_cfg.to_dict(),
        "encoder": {"ch": 8, "ch_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                    "resolution": 32},
        "quantizer": {"codebooks": [{"size": 16, "dim": 4}], "adapter_channels": 8},
        "decoder": {"ch": 8, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                    "resolution": 32, "fourier_bands": 2, "pos_grid": 4}})
    before = config.to_dict()
    tok = Tokenizer(config)
    tok.set_granularity_ratio([0.6])
    assert config.to_dict() == before                      # the caller's config is not mutated
    assert tok.config.router.targets == [0.6]              # ... the model's own copy records the re-targeting
    tok.save_pretrained(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "config.json").read_text())
    assert saved["router"]["entropy_quantiles"] == quantiles and saved["router"]["entropy_table"] == ""
    loaded = Tokenizer.from_pretrained(tmp_path / "export")
    assert loaded.config.to_dict() == tok.config.to_dict()
    assert torch.equal(loaded.router.thresholds, tok.router.thresholds)
    assert torch.equal(loaded.router.quantiles, torch.tensor(quantiles, dtype=torch.float64))


def test_fixed_mode_and_tau_schedule():
    router = Router(RouterConfig(mode="fixed", fixed_level=1), factors=[8, 16], z_channels=4)
    out = router([torch.zeros(2, 4, 3, 3)], None)
    assert torch.equal(out.grain, torch.ones(2, 3, 3, dtype=torch.long)) and float(out.budget) == 0.0
    with pytest.raises(ConfigError, match="fixed"):
        Router(RouterConfig(mode="learned"), factors=[16], z_channels=4)
    cos = Router(RouterConfig(tau=1.0, tau_end=0.1, tau_schedule="cosine", anneal_steps=100, hidden=4), [8, 16], 4)
    lin = Router(RouterConfig(tau=1.0, tau_end=0.1, tau_schedule="linear", anneal_steps=100, hidden=4), [8, 16], 4)
    for step, expected_cos, expected_lin in [(0, 1.0, 1.0), (50, 0.55, 0.55), (100, 0.1, 0.1), (500, 0.1, 0.1)]:
        cos.set_step(step)
        lin.set_step(step)
        assert math.isclose(cos.tau, expected_cos, abs_tol=1e-9) and math.isclose(lin.tau, expected_lin, abs_tol=1e-9)
    lin.set_step(25)
    assert math.isclose(lin.tau, 0.775)


@pytest.mark.parametrize("mode", ["learned", "entropy", "fixed"])
def test_imposed_grain_gives_its_gates_shares_and_budget(mode):
    config = {"learned": RouterConfig(mode="learned", targets=[0.25], hidden=4),
              "entropy": RouterConfig(mode="entropy", targets=[0.25], entropy_quantiles=[0.0, 1.0, 2.0]),
              "fixed": RouterConfig(mode="fixed", fixed_level=1)}[mode]
    router = Router(config, factors=[8, 16], z_channels=4)
    features = [torch.randn(2, 4, 2, 2), torch.randn(2, 4, 4, 4)]
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    grain = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [0, 1]]], dtype=torch.uint8)     # shares 0.5, 0.5
    for train in (True, False):
        out = router.train(train)(features, images, grain)
        assert out.grain.dtype == torch.long and torch.equal(out.grain, grain.long())
        assert torch.equal(out.gates, torch.nn.functional.one_hot(grain.long(), 2).permute(0, 3, 1, 2).float())
        assert torch.equal(out.shares, torch.tensor([0.5, 0.5])) and not out.gates.requires_grad
        # learned: the budget the imposed map pays (targets 0.75 / 0.25, weight 10), a constant
        budget = 10.0 * ((0.5 - 0.75) ** 2 + (0.5 - 0.25) ** 2) if mode == "learned" else 0.0
        assert float(out.budget) == pytest.approx(budget) and not out.budget.requires_grad
    expected = r"integer B x Hs x Ws = \(2, 2, 2\) map of levels in 0\.\.1"
    with pytest.raises(ValueError, match=expected + ".*dtype torch.bool"):
        router(features, images, grain.bool())
    with pytest.raises(ValueError, match=r"\(the coarsest grid\), got shape \(2, 4, 4\)"):
        router(features, images, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"the number of levels is 2\), got values in 0\.\.2"):
        router(features, images, grain * 2)


def test_eval_offsets_move_by_the_share_error_in_units_of_the_logit_spread():
    router = Router(RouterConfig(mode="learned", targets=[0.25], hidden=4), factors=[16, 8], z_channels=4)
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])      # fine wins argmax everywhere: share 1, target 0.25
    spread = (0.0 + torch.tensor([1.0, 2.0, 3.0, 4.0]).std(unbiased=False)) / 2   # mean of the levels' stds: 0.559
    router._calibrate(logits)
    assert torch.allclose(router.level_bias, spread * torch.tensor([0.75, -0.75]))
    # eval now scores coarse 0 + 0.419, fine l - 0.419: all four regions stay fine
    assert router.eval_gates(logits)[0, 1].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    for _ in range(20):
        router._calibrate(logits)
    assert router.eval_gates(logits)[0, 1].sum() == 1.0       # one region of four: the target share exactly
    assert "level_bias" in router.state_dict()                # saved with the model (exports, checkpoints)
    before = router.level_bias.clone()
    router._calibrate(torch.full((1, 2, 2, 2), float("nan")))   # a non-finite batch leaves the offsets alone
    assert torch.equal(router.level_bias, before)
    frozen = Router(RouterConfig(mode="learned", targets=[0.25], hidden=4, calibration_rate=0.0), [16, 8], 4)
    frozen.train()
    frozen([torch.randn(2, 4, 3, 3), torch.randn(2, 4, 6, 6)], None)
    assert torch.equal(frozen.level_bias, torch.zeros(2))


def test_calibrated_eval_shares_meet_the_targets_on_new_batches():
    """Random router weights give region-dependent logits: argmax alone misses the target share; after training
    forwards (no optimizer) the calibrated eval share on unseen batches of the same distribution meets it."""
    torch.manual_seed(0)
    for targets in ([0.75], [0.2]):
        router = Router(RouterConfig(mode="learned", targets=targets, hidden=16), factors=[16, 8], z_channels=8)
        with torch.no_grad():
            router.mlp[-1].bias.copy_(torch.tensor([0.0, 3.0 if targets[0] < 0.5 else -3.0]))  # argmax far off
        batch = lambda: [torch.randn(8, 8, 4, 4), torch.randn(8, 8, 8, 8)]  # noqa: E731
        router.eval()
        held_out = [batch() for _ in range(4)]
        before = sum(float(router(f, None).shares[1]) for f in held_out) / 4
        router.train()
        for _ in range(200):
            router(batch(), None)
        router.eval()
        after = sum(float(router(f, None).shares[1]) for f in held_out) / 4
        assert abs(before - targets[0]) > 0.3, before
        assert abs(after - targets[0]) < 0.05, (targets, after)


@pytest.mark.parametrize("detach", [True, False])
def test_router_gradient_reaches_the_encoder_features_only_when_not_detached(detach):
    torch.manual_seed(0)
    router = Router(RouterConfig(mode="learned", targets=[0.5], hidden=8, detach_features=detach),
                    factors=[16, 8], z_channels=4)
    features = [torch.randn(2, 4, 2, 2, requires_grad=True), torch.randn(2, 4, 4, 4, requires_grad=True)]
    router.train()
    out = router(features, None)
    (out.budget + (out.gates * torch.randn_like(out.gates)).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.mlp.parameters())
    if detach:
        assert all(f.grad is None for f in features)
    else:
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)


def _calibration_rank(rank: int, world: int, port: int, batches, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)                # identical weights; the Gumbel draws differ per rank below
        router = Router(RouterConfig(mode="learned", targets=[0.6], hidden=8), factors=[16, 8], z_channels=4)
        torch.manual_seed(10 + rank)
        router.train()
        for features in batches:
            router([f[rank * 2:rank * 2 + 2] for f in features], None)
        queue.put((rank, router.level_bias.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_keep_identical_eval_offsets_from_the_reduced_shares():
    """Two gloo ranks with half of each batch: the argmax shares and the logit spread are all-reduced, so both
    ranks hold the same offsets (and not the ones rank 0's halves alone give)."""
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randn(4, 4, 2, 2, generator=gen), torch.randn(4, 4, 4, 4, generator=gen)] for _ in range(5)]
    results = run_gloo_ranks(_calibration_rank, batches)
    torch.manual_seed(0)
    single = Router(RouterConfig(mode="learned", targets=[0.6], hidden=8), factors=[16, 8], z_channels=4)
    single.train()
    for features in batches:                 # rank 0's halves alone: what the ranks hold only if nothing was reduced
        single([f[:2] for f in features], None)
    assert results[0][1] == results[1][1]
    assert single.level_bias.abs().sum() > 0 and not torch.allclose(torch.tensor(results[0][1]), single.level_bias)


def test_learned_training_forward_reports_the_eval_decision_shares():
    torch.manual_seed(0)
    router = Router(RouterConfig(mode="learned", targets=[0.5], hidden=8), factors=[16, 8], z_channels=4)
    features = [torch.randn(4, 4, 2, 2), torch.randn(4, 4, 4, 4)]
    router.eval()
    expected = router(features, None).shares
    assert router(features, None).eval_shares is None
    router.train()
    assert torch.equal(router(features, None).eval_shares, expected)   # before this forward's calibration step


def test_a_state_saved_before_the_calibration_loads_with_zero_offsets():
    router = Router(RouterConfig(mode="learned", targets=[0.5], hidden=8), factors=[16, 8], z_channels=4)
    old = {k: v for k, v in router.state_dict().items() if k != "level_bias"}
    router.level_bias.fill_(3.0)
    with pytest.warns(UserWarning, match="level_bias missing"):
        router.load_state_dict(old)
    assert torch.equal(router.level_bias, torch.zeros(2))


def test_entropy_prior_adds_level_times_region_entropy_to_the_learned_logits():
    with pytest.raises(ConfigError, match="entropy_prior must be >= 0"):
        RouterConfig(mode="learned", targets=[0.5], entropy_prior=-1.0)
    config = RouterConfig(mode="learned", targets=[0.25, 0.25], hidden=4, entropy_prior=2.0)
    router = Router(config, factors=[16, 8, 4], z_channels=4)
    plain = Router(dataclasses.replace(config, entropy_prior=0.0), factors=[16, 8, 4], z_channels=4)
    plain.load_state_dict(router.state_dict())                # no new state: the same weights load both ways
    images = textured_images(2, 32, seed=0)
    features = [torch.randn(2, 4, 2 << g, 2 << g) for g in range(3)]
    entropy = region_entropy(images, 16).float()               # B x 2 x 2
    expected = plain.logits(features) + 2.0 * torch.arange(3.0).view(1, 3, 1, 1) * entropy.unsqueeze(1)
    torch.testing.assert_close(router.logits(features, images), expected)
    with pytest.raises(ValueError, match="entropy_prior > 0 needs the images"):
        router.logits(features)
    # with the MLP silent, the (calibrated) eval decision ranks regions by entropy: the entropy router's ranking
    two = Router(RouterConfig(mode="learned", targets=[0.5], hidden=4, entropy_prior=2.0), [16, 8], z_channels=4)
    torch.nn.init.zeros_(two.mlp[-1].weight)
    torch.nn.init.zeros_(two.mlp[-1].bias)
    images = textured_images(4, 64, seed=1)
    entropy = region_entropy(images, 16).float()               # 4 x 4 x 4, distinct values
    median = entropy.flatten().sort().values[31:33].mean()
    two.level_bias.copy_(torch.tensor([0.0, -2.0 * float(median)]))
    two.eval()
    grain = two([torch.randn(4, 4, 4, 4), torch.randn(4, 4, 8, 8)], images).grain
    assert torch.equal(grain, (entropy > median).long())       # the higher-entropy half coded fine
    # the same under bf16 autocast (a GPU run's precision, run on the CPU): the prior and the decision stay fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grain = two([torch.randn(4, 4, 4, 4), torch.randn(4, 4, 8, 8)], images).grain
    assert torch.equal(grain, (entropy > median).long())
    two.train()
    features = [torch.randn(4, 4, 4, 4, requires_grad=True), torch.randn(4, 4, 8, 8, requires_grad=True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = two.logits(features, images)
        out = two(features, images)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[:, 1] - logits[:, 0], 2.0 * entropy)   # silent MLP: the prior exactly
    out.budget.backward()
    grads = [p.grad for p in two.mlp.parameters()]
    assert all(g is not None and g.isfinite().all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
