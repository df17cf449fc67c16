"""Tokenizer assembly: shapes for G, K, sizes; gradients; encode/decode; alignment; save/load; presets."""
from pathlib import Path

import pytest
import torch

from models.config import ConfigError
from models.layout import codes_to_level_maps, num_codes
from models.tokenizer import ImageCodes, Tokenizer, TokenizerConfig, calibrate_entropy, region_entropy

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted((REPO / "configs" / "tokenizer").glob("*.yaml"))


def small_config(num_levels=2, k=2, mode="learned", **extra) -> TokenizerConfig:
    """A tiny tokenizer with finest factor 4 and num_levels granularities (4, 8, 16)."""
    factors = [4 << g for g in range(num_levels)]
    values = {
        "factors": factors, "z_channels": 8,
        "encoder": {"ch": 8, "ch_mult": [1] * (num_levels + 2), "num_res_blocks": 1, "attn_resolutions": [2],
                    "resolution": 32},
        "router": {"mode": mode if num_levels > 1 else "fixed", "targets": [0.5 / (num_levels - 1)] * (num_levels - 1)
                   if num_levels > 1 else [], "hidden": 8},
        "quantizer": {"codebooks": [{"size": 32 + 16 * i, "dim": 4} for i in range(k)], "adapter_channels": 8,
                      "chunk_size": 50},
        "decoder": {"ch": 8, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 32,
                    "fourier_bands": 2, "pos_grid": 4},
    }
    for key, value in extra.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return TokenizerConfig.from_dict(values)


def images(batch, height, width, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("num_levels,k", [(1, 1), (2, 2), (3, 3)])
def test_forward_shapes_losses_and_stats(num_levels, k):
    torch.manual_seed(0)
    tok = Tokenizer(small_config(num_levels, k))
    coarsest = tok.factors[0]
    assert tok.num_levels == num_levels and len(tok.codebook_sizes) == k
    for height, width in [(coarsest, 2 * coarsest), (2 * coarsest, 3 * coarsest)]:
        rec, losses, stats = tok(images(2, height, width))
        assert rec.shape == (2, 3, height, width)
        assert {"codebook", "commitment", "entropy", "disentangle", "budget"} <= set(losses)
        assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
        grid = tok.grain_shape((height, width))
        shares = torch.stack([stats[f"share/level{g}"] for g in range(num_levels)])
        assert torch.isclose(shares.sum(), torch.tensor(1.0))
        per_region = torch.tensor([4.0 ** g for g in range(num_levels)])
        assert torch.isclose(stats["codes_per_image"], (shares * per_region).sum() * grid[0] * grid[1])
        assert all(f"perplexity/{i}" in stats and f"usage/{i}" in stats for i in range(k))
        codes = tok.encode(images(2, height, width))
        assert [c.grain.shape for c in codes] == [grid, grid] and codes[0].grain.dtype == torch.uint8
        assert all(c.codes.shape == (int(num_codes(c.grain.long())), k) for c in codes)


def test_gradients_reach_encoder_router_codebooks():
    torch.manual_seed(0)
    tok = Tokenizer(small_config(2, 3))
    x = images(2, 16, 16)
    rec, losses, _ = tok(x)
    ((rec - x) ** 2).mean().backward()     # task loss only: reaches the router through the gate value
    assert tok.router.mlp[0].weight.grad.abs().sum() > 0
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    tok.zero_grad()
    rec, losses, _ = tok(x)
    (((rec - x) ** 2).mean() + sum(losses.values())).backward()
    for k in range(3):
        assert tok.quantizer.codebooks[k].grad.abs().sum() > 0
    assert tok.decoder.row_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("num_levels", [2, 3])
def test_decode_of_encode_equals_eval_reconstruction_and_canonical_order(num_levels):
    torch.manual_seed(1)
    tok = Tokenizer(small_config(num_levels, 2)).eval()
    x = images(3, 32, 48, seed=2)
    codes = tok.encode(x)
    with torch.no_grad():
        rec, _, _ = tok(x)
        _, quant = tok._quantize(x)
    assert torch.equal(tok.decode(codes), rec)
    for i, item in enumerate(codes):       # codes -> per-level maps agree with the quantizer's own maps
        maps = codes_to_level_maps(item.grain.long(), item.codes, num_levels)
        for level, level_map in enumerate(maps):
            coded = level_map[0] >= 0
            assert torch.equal(level_map[:, coded], quant.indices[level][i][:, coded])
    lengths = {c.codes.shape[0] for c in codes}
    assert tok.decode([ImageCodes(c.grain, c.codes.to(torch.int32)) for c in codes]).shape == (3, 3, 32, 48)
    assert len(lengths) >= 1
    with pytest.raises(ValueError, match="values below"):
        tok.decode([ImageCodes(codes[0].grain, codes[0].codes + 1000)])


@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_decode_of_a_mixed_batch_equals_decoding_each_image_alone(num_levels):
    """One scatter for the whole batch: the decoder gets exactly the input it gets one image at a time, whatever
    the lengths and dtypes (its convolutions need not be bit-identical across batch sizes, so the images are
    compared to float tolerance)."""
    torch.manual_seed(2)
    tok = Tokenizer(small_config(num_levels, 2)).eval()
    inputs = []
    tok.decoder.register_forward_hook(lambda _module, args, _output: inputs.append(args[0]))
    gen = torch.Generator().manual_seed(num_levels)
    grain = torch.randint(0, num_levels, (6, 2, 3), generator=gen).to(torch.uint8)
    grain[0], grain[1] = num_levels - 1, 0                         # all finest, all coarsest
    dtypes = [torch.int64, torch.int32, torch.uint16, torch.int64, torch.int16, torch.uint8]
    batch = [ImageCodes(g, torch.randint(0, 32, (int(num_codes(g.long())), 2), generator=gen).to(dtype))
             for g, dtype in zip(grain, dtypes)]
    assert len({c.codes.shape[0] for c in batch}) >= (4 if num_levels > 1 else 1)
    together = tok.decode(batch)
    alone = torch.cat([tok.decode([c]) for c in batch])
    assert torch.equal(inputs[0], torch.cat(inputs[1:]))
    side = tok.factors[0]
    assert together.shape == (6, 3, 2 * side, 3 * side)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_decode_names_the_images_at_fault():
    tok = Tokenizer(small_config(2, 2)).eval()
    grain = torch.tensor([[0, 1, 0], [0, 0, 0]], dtype=torch.uint8)       # L = 5 + 4 = 9
    good = ImageCodes(grain, torch.zeros(9, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"image 1 has 8 code rows but its grain map implies L = 9 "
                                         r"\(images at fault: \[1, 2\]\)"):
        tok.decode([good, ImageCodes(grain, good.codes[:8]), ImageCodes(grain, good.codes[:1]), good])
    with pytest.raises(ValueError, match=r"grain values must be in 0\.\.1.*images \[1\]"):
        tok.decode([good, ImageCodes(grain * 2, good.codes)])
    with pytest.raises(ValueError, match="same grain shape"):
        tok.decode([good, ImageCodes(grain[:1], good.codes[:5])])
    with pytest.raises(ValueError, match=r"integer L x 2.*image 1 has codes torch.int64 \(9, 3\)"):
        tok.decode([good, ImageCodes(grain, torch.zeros(9, 3, dtype=torch.long))])
    with pytest.raises(ValueError, match=r"image 0 has codes torch.float32"):
        tok.decode([ImageCodes(grain, good.codes.float())])
    too_big = good.codes.clone()
    too_big[4, 1] = 48                                                     # sizes are 32 and 48
    negative = good.codes.clone()
    negative[0, 0] = -1
    with pytest.raises(ValueError, match=r"values below \[32, 48\], images \[1, 3\]"):
        tok.decode([good, ImageCodes(grain, too_big), good, ImageCodes(grain, negative)])
    tok.decode([good, ImageCodes(grain, too_big.clamp(max=47))])           # 47 is a valid code


@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_batched_code_assembly_equals_the_per_image_one(num_levels):
    """encode gathers the canonical codes of the whole batch at once; reference: per image, per level nonzero."""
    tok = Tokenizer(small_config(num_levels, 2))
    gen = torch.Generator().manual_seed(num_levels)
    grain = torch.randint(0, num_levels, (5, 2, 3), generator=gen)
    grain[0] = num_levels - 1
    indices = [torch.randint(0, 32, (5, 2, 2 << g, 3 << g), generator=gen) for g in range(num_levels)]
    codes = tok._image_codes(grain, indices)
    assert len(codes) == 5
    for b, item in enumerate(codes):
        assert item.grain.dtype == torch.uint8 and torch.equal(item.grain.long(), grain[b])
        expected = torch.cat([indices[g][b].flatten(1)[:, (grain[b] == g).repeat_interleave(1 << g, 0)
                                                          .repeat_interleave(1 << g, 1).flatten()].T
                              for g in range(num_levels)])
        assert torch.equal(item.codes, expected)


def entropy_config(num_levels, x):
    table = calibrate_entropy(region_entropy(x, 4 << (num_levels - 1)), region_size=4 << (num_levels - 1))
    return small_config(num_levels, 2, mode="entropy", router={"entropy_quantiles": table["quantiles"]})


@pytest.mark.parametrize("mode,num_levels", [("learned", 2), ("learned", 3), ("entropy", 2), ("entropy", 3)])
def test_imposing_the_routers_own_map_gives_identical_output(mode, num_levels):
    torch.manual_seed(3)
    x = images(3, 32, 48, seed=4)
    tok = Tokenizer(entropy_config(num_levels, x) if mode == "entropy" else small_config(num_levels, 2)).eval()
    codes = tok.encode(x)
    own = torch.stack([c.grain for c in codes])                   # uint8, as encode hands it out
    assert len(own.unique()) > 1                                  # a mixed map, not a trivial one
    imposed = tok.encode(x, grain=own)
    assert all(torch.equal(a.grain, b.grain) and torch.equal(a.codes, b.codes) for a, b in zip(codes, imposed))
    with torch.no_grad():
        for train in ([False, True] if mode == "entropy" else [False]):   # the entropy map is deterministic
            tok.train(train)
            rec, losses, stats = tok(x)
            rec_i, losses_i, stats_i = tok(x, grain=own.long())
            assert torch.equal(rec, rec_i)
            assert losses.keys() == losses_i.keys() and all(torch.equal(losses[k], losses_i[k]) for k in losses)
            assert stats.keys() == stats_i.keys() and all(torch.equal(stats[k], stats_i[k]) for k in stats)


@pytest.mark.parametrize("mode", ["learned", "entropy"])
def test_imposed_uniform_maps_give_hand_computed_code_counts(mode):
    torch.manual_seed(0)
    x = images(2, 32, 48, seed=1)
    tok = Tokenizer(entropy_config(3, x) if mode == "entropy" else small_config(3, 2)).eval()
    # factors 16, 8, 4 on 32 x 48: a 2 x 3 coarsest grid; a region at level g holds 4**g codes
    for level, per_image in [(0, 6), (1, 24), (2, 96)]:
        grain = torch.full((2, 2, 3), level, dtype=torch.uint8)
        codes = tok.encode(x, grain=grain)
        assert [tuple(c.codes.shape) for c in codes] == [(per_image, 2)] * 2
        assert all(torch.equal(c.grain, grain[0]) for c in codes)
        with torch.no_grad():
            rec, losses, stats = tok(x, grain=grain)
        assert float(stats["codes_per_image"]) == per_image
        assert [float(stats[f"share/level{g}"]) for g in range(3)] == [float(g == level) for g in range(3)]
        # learned: the budget the map pays, 10 * sum_g (share_g - target_g)**2 with targets .5 .25 .25
        shares = torch.tensor([float(g == level) for g in range(3)])
        budget = 10.0 * float(((shares - torch.tensor([0.5, 0.25, 0.25])) ** 2).sum()) if mode == "learned" else 0.0
        assert float(losses["budget"]) == pytest.approx(budget)
        assert torch.equal(tok.decode(codes), rec)
    mixed = torch.tensor([[[0, 1, 2], [2, 1, 0]], [[0, 0, 0], [0, 0, 1]]])
    assert [c.codes.shape[0] for c in tok.encode(x, grain=mixed)] == [2 * (1 + 4 + 16), 5 + 4]


def test_imposed_map_in_training_reaches_everything_but_the_router():
    torch.manual_seed(0)
    tok = Tokenizer(small_config(2, 2)).train()
    x = images(2, 16, 16)
    rec, losses, stats = tok(x, grain=torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]]))   # 2 x 2 grid
    assert float(stats["fine_share"]) == 0.25 and not losses["budget"].requires_grad
    (((rec - x) ** 2).mean() + sum(losses.values())).backward()
    assert tok.router.mlp[0].weight.grad is None                 # the router chose nothing
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0 and tok.quantizer.codebooks[0].grad.abs().sum() > 0


def test_imposed_map_is_validated():
    tok = Tokenizer(small_config(3, 2)).eval()
    x = images(2, 32, 48)
    expected = r"B x Hs x Ws = \(2, 2, 3\) map of levels in 0\.\.2"
    for grain, detail in [(torch.zeros(2, 3, 2, dtype=torch.long), r"got shape \(2, 3, 2\)"),
                          (torch.zeros(1, 2, 3, dtype=torch.long), r"got shape \(1, 2, 3\)"),
                          (torch.zeros(2, 2, 3), "got dtype torch.float32"),
                          (torch.full((2, 2, 3), 3), r"got values in 3\.\.3"),
                          (torch.full((2, 2, 3), -1), r"got values in -1\.\.-1"),
                          ([[0, 1, 2], [0, 1, 2]], "got list")]:
        for call in (tok.encode, tok):
            with pytest.raises(ValueError, match=f"{expected}.*{detail}"):
                call(x, grain=grain)


def test_entropy_router_tokenizer_end_to_end():
    x = images(4, 32, 32, seed=3)
    x[0] = 0.1                                                   # one flat image: all coarse
    table = calibrate_entropy(region_entropy(x, 8), region_size=8)
    tok = Tokenizer(small_config(2, 2, mode="entropy", router={"entropy_quantiles": table["quantiles"]})).eval()
    codes = tok.encode(x)
    assert int(codes[0].grain.sum()) == 0
    fine = torch.stack([c.grain for c in codes]).float().mean()
    assert abs(float(fine) - 0.5) <= 1 / 16
    rec, losses, stats = tok.train()(x)
    assert float(losses["budget"]) == 0.0 and abs(float(stats["fine_share"]) - 0.5) <= 1 / 16


def test_semantic_alignment_with_random_teacher():
    from models.tokenizer.teachers import TeacherConfig, build_teacher

    teacher_cfg = {"name": "dino", "backend": "timm", "arch": "vit_small_patch14_dinov2", "image_size": 28,
                   "model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2}}
    cfg = small_config(2, 2, teachers=[teacher_cfg], semantic={"width": 16, "depth": 1, "heads": 2,
                                                               "patch_weight": 0.5},
                       quantizer={"codebooks": [{"size": 32, "dim": 4},
                                                {"size": 32, "dim": 4, "align": "dino", "align_dim": 16}],
                                  "adapter_channels": 8})
    tok = Tokenizer(cfg)
    x = images(2, 16, 16)
    with pytest.raises(RuntimeError, match="dino"):
        tok(x)
    teacher = build_teacher(TeacherConfig.from_dict(teacher_cfg), random_init=True)
    tok.attach_teachers({"dino": teacher})
    rec, losses, _ = tok(x)
    assert "semantic/dino" in losses and torch.isfinite(losses["semantic/dino"])
    losses["semantic/dino"].backward()
    assert tok.semantic_heads["1"].proj.weight.grad.abs().sum() > 0
    assert tok.quantizer.adapters[1][-1].weight.grad.abs().sum() > 0
    assert not any(k.startswith("_teachers") or "network" in k for k in tok.state_dict())
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_params for p in tok.parameters())
    with pytest.raises(ValueError, match="align_dim"):
        tok.attach_teachers({"dino": build_teacher(TeacherConfig.from_dict(
            {**teacher_cfg, "model_kwargs": {"depth": 1, "embed_dim": 8, "num_heads": 2}}), random_init=True)})
    with pytest.raises(ConfigError, match="clip"):
        small_config(2, 2, quantizer={"codebooks": [{"size": 8, "dim": 4, "align": "clip", "align_dim": 8}]})


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer(small_config(3, 2))
    tok(images(2, 32, 32))                  # one training forward (usage buffers are not saved)
    tok.save_pretrained(tmp_path / "export")
    loaded = Tokenizer.from_pretrained(tmp_path / "export")
    assert loaded.config.to_dict() == tok.config.to_dict()
    for (name, a), (_, b) in zip(tok.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = images(2, 32, 32, seed=5)
    tok.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(tok(x)[0], loaded(x)[0])


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load(path):
    cfg = TokenizerConfig.from_yaml(path, ["model.z_channels=64"] if path.stem == "tiny" else [])
    assert cfg.quantizer.codebooks and sorted(cfg.factors)[-1] == 2 ** (len(cfg.encoder.ch_mult) - 1)
    assert 2 ** (len(cfg.decoder.ch_mult) - 1) == min(cfg.factors)


def test_paper_scale_preset_matches_reference_sizes():
    tok = Tokenizer(TokenizerConfig.from_yaml(REPO / "configs/tokenizer/dqfq-f8f16-k3.yaml"))

    def millions(module):
        return sum(p.numel() for p in module.parameters()) / 1e6

    # DQ-VAE reference: encoder about 33.3M, router 0.26M, decoder about 14.4M parameters
    assert abs(millions(tok.encoder) - 33.3) < 0.5 and abs(millions(tok.router) - 0.26) < 0.01
    assert abs(millions(tok.decoder) - 14.4) < 0.3
    assert tok.codebook_sizes == [16384] * 3 and tok.quantizer.code_dtype == torch.uint16
    assert sorted(tok.semantic_heads) == ["1", "2"] and tok.grain_shape(256) == (16, 16)


def test_tiny_preset_trains_and_config_errors():
    tok = Tokenizer(TokenizerConfig.from_yaml(REPO / "configs/tokenizer/tiny.yaml"))
    x = images(2, 64, 64)
    rec, losses, _ = tok(x)
    (rec.abs().mean() + sum(losses.values())).backward()
    with pytest.raises(ConfigError, match="factors"):
        TokenizerConfig.from_dict({"factors": [8, 32]})
    with pytest.raises(ConfigError, match="ch_mult"):
        Tokenizer(small_config(2, 1, encoder={"ch_mult": [1, 1]}))
    with pytest.raises(ValueError, match="divisible"):
        tok(images(1, 40, 64))


def test_param_groups_exempt_codebooks_norms_biases_embeddings_and_clip_each_model():
    from models.tokenizer.losses import LossConfig, TokenizerGANLoss
    from models.tokenizer.training import GroupClippedAdamW, TokenizerTrainingModule

    torch.manual_seed(0)
    module = TokenizerTrainingModule(Tokenizer(small_config(2, 2)), TokenizerGANLoss(LossConfig(disc_ndf=8)))
    groups = module.param_groups(1e-3, 0.5, weight_decay=0.05, max_grad_norm=1.0)
    assert [g["name"] for g in groups] == ["tokenizer", "tokenizer/no_decay", "discriminator",
                                           "discriminator/no_decay"]
    ids = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    tok = module.tokenizer
    no_decay = [*tok.quantizer.codebooks, tok.decoder.row_embed, tok.decoder.col_embed,
                tok.encoder.conv_in.bias, tok.router.norms[0].weight]
    assert all(id(p) in ids["tokenizer/no_decay"] for p in no_decay)
    assert id(tok.encoder.conv_in.weight) in ids["tokenizer"] and groups[0]["weight_decay"] == 0.05
    assert groups[1]["weight_decay"] == 0.0 and groups[2]["lr"] == 5e-4
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in module.parameters())    # each parameter exactly once
    # no weight decay: one group per model
    assert [g["name"] for g in module.param_groups(1e-3, 1.0)] == ["tokenizer", "discriminator"]

    # each model is clipped on its own: a huge discriminator gradient leaves the tokenizer's alone
    groups = module.param_groups(1e-3, 1.0, max_grad_norm=1.0)
    optimizer = GroupClippedAdamW(groups, lr=1e-3)
    for p in module.tokenizer.parameters():
        p.grad = torch.full_like(p, 1e-4)
    for p in module.gan_loss.discriminator.parameters():
        p.grad = torch.full_like(p, 10.0)
    tokenizer_grads = [p.grad.clone() for p in module.tokenizer.parameters()]
    optimizer.step()
    norms = {name: float(value) for name, value in optimizer.grad_norms.items()}
    assert norms["discriminator"] > 1.0 > norms["tokenizer"]
    assert all(torch.equal(p.grad, g) for p, g in zip(module.tokenizer.parameters(), tokenizer_grads))
    clipped = torch.stack([p.grad.norm() for p in module.gan_loss.discriminator.parameters()]).norm()
    assert float(clipped) == pytest.approx(1.0, rel=1e-4)


def test_one_directional_infonce_leaves_predictions_alone_when_teacher_features_are_alike():
    """Random-weight teachers give (nearly) one feature for every image: FQGAN's one-directional InfoNCE then
    has no gradient, the symmetric form pushes all predictions together (towards image-invariant codes)."""
    from models.tokenizer.semantic import info_nce

    pred = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    alike = torch.randn(1, 8).expand(6, 8)
    info_nce(pred, alike, 0.1, symmetric=False).backward()
    assert pred.grad.abs().max() < 1e-6
    pred.grad = None
    info_nce(pred, alike, 0.1).backward()
    assert pred.grad.abs().max() > 1e-2
    # one-directional, distinct targets: CE of each prediction against the batch's targets
    target = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    logits = torch.nn.functional.normalize(pred, dim=1) @ torch.nn.functional.normalize(target, dim=1).T / 0.1
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(6))
    assert torch.allclose(info_nce(pred, target, 0.1, symmetric=False), expected)
