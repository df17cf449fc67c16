"""Constrained sampling: validity rule, filters, every sample a valid code map, CFG, reproducibility, cache == recompute."""
import pytest
import torch

from models.generator import Generator, GeneratorConfig, SequenceSpec, TokenFilter, ValidityRule, generate_tokens, sample
from models.generator.sampling import filter_logits
from models.layout import codes_to_level_maps, level_maps_to_codes, num_codes


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(num_levels=2, num_subcodes=2, grain_shape=(2, 2), num_classes=3, seed=0, position_bias=None):
    config = GeneratorConfig(num_levels=num_levels, num_subcodes=num_subcodes,
                             codebook_sizes=[9, 5, 7][:num_subcodes], grain_shape=list(grain_shape),
                             num_classes=num_classes, dim=32, heads=2, position_depth=1, content_depth=1,
                             head_dim=16, head_depth=1, head_heads=2)
    torch.manual_seed(seed)
    model = Generator(config).eval()
    # larger random weights so that logits are far from uniform and samples differ between settings
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(20.0 if param.dim() > 1 else 1.0)
    return model


def assert_valid(model, maps, count):
    spec = model.spec
    assert len(maps) == count
    for grain, codes in maps:
        assert grain.dtype == torch.uint8 and tuple(grain.shape) == spec.grain_shape
        assert int(grain.max()) < spec.num_levels
        assert codes.shape == (int(num_codes(grain.long())), spec.num_subcodes)
        for j, size in enumerate(spec.codebook_sizes):
            assert 0 <= int(codes[:, j].min()) and int(codes[:, j].max()) < size
        # coverage seen through models.layout: every cell of every level map is either coded or outside the level
        maps_per_level = codes_to_level_maps(grain.long(), codes, spec.num_levels)
        coded = sum((m[0] >= 0).float().reshape(spec.grain_shape[0], 1 << g, spec.grain_shape[1], 1 << g)
                    .sum((1, 3)) / 4 ** g for g, m in enumerate(maps_per_level))
        assert torch.equal(coded, torch.ones_like(coded))
        assert torch.equal(level_maps_to_codes(grain.long(), maps_per_level), codes)


def test_validity_rule_hand_computed():
    spec = SequenceSpec(2, (1, 3), (4,))  # level 0: cells 0..2; level 1: 2 x 6 grid, ids 3..14; EOL_0 = 15, END = 16
    rule = ValidityRule(spec, 1, torch.device("cpu"))

    def allowed():
        return rule.allowed()[0].nonzero().squeeze(1).tolist()

    assert allowed() == [0, 1, 2, 15]
    rule.advance(torch.tensor([1]))          # region 1 at level 0
    assert allowed() == [2, 15]              # only regions after 1, or end the level
    rule.advance(torch.tensor([15]))
    assert allowed() == [3]                  # finest level: region 0 is forced, its top-left cell (0, 0)
    for cell in (3, 4, 9):                   # ... then cells (0,1), (1,0), (1,1) of region 0
        rule.advance(torch.tensor([cell]))
        assert allowed() == [{3: 4, 4: 9, 9: 10}[cell]]
    rule.advance(torch.tensor([10]))
    assert allowed() == [7]                  # region 1 is taken: region 2 opens at cell (0, 4)
    for cell in (7, 8, 13, 14):
        rule.advance(torch.tensor([cell]))
    assert allowed() == [16] and not rule.done.item()
    rule.advance(torch.tensor([16]))
    assert rule.done.item() and allowed() == [16]


def test_validity_rule_multi_cell_regions_at_a_middle_level():
    spec = SequenceSpec(3, (1, 2), (4,))  # level 1 ids 2..9 (2 x 4), level 2 ids 10..41 (4 x 8)
    rule = ValidityRule(spec, 1, torch.device("cpu"))
    rule.advance(torch.tensor([spec.end_id(0)]))
    assert rule.allowed()[0].nonzero().squeeze(1).tolist() == [2, 4, spec.end_id(1)]  # region openings 0 and 1
    rule.advance(torch.tensor([4]))          # open region 1 at level 1: cells (0,2) (0,3) (1,2) (1,3) follow
    forced = []
    for _ in range(3):
        forced.append(int(rule.allowed()[0].nonzero()))
        rule.advance(torch.tensor([forced[-1]]))
    assert forced == [5, 8, 9]
    assert rule.allowed()[0].nonzero().squeeze(1).tolist() == [spec.end_id(1)]


def test_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, None, TokenFilter(top_k=2))).tolist() == [[True, False, False, True]]
    allowed = torch.tensor([[True, False, True, True]])
    assert filter_logits(logits, allowed, TokenFilter(top_k=1)).argmax().item() == 2
    # probs of [3, 2, 1, 0] are [.64, .24, .09, .03]: top_p 0.8 keeps the two first
    kept = ~torch.isinf(filter_logits(logits, None, TokenFilter(top_p=0.8)))
    assert kept.tolist() == [[False, True, True, False]]
    halved = filter_logits(logits, None, TokenFilter(temperature=0.5))
    torch.testing.assert_close(halved, logits * 2)
    with pytest.raises(ValueError):
        TokenFilter(top_p=0.0)


SETTINGS = [
    dict(),
    dict(position=TokenFilter(top_k=3), content=TokenFilter(top_k=2)),
    dict(position=TokenFilter(top_p=0.5), content=TokenFilter(temperature=1.5, top_p=0.9)),
    dict(cfg_scale=3.0),
    dict(cfg_scale=2.0, cfg_interval=(0, 0), position=TokenFilter(temperature=0.0)),
    dict(position=TokenFilter(temperature=0.0), content=TokenFilter(temperature=0.0)),
]


@pytest.mark.parametrize("num_levels, num_subcodes, grain_shape", [(2, 2, (2, 3)), (3, 3, (2, 2)), (1, 1, (2, 2))])
def test_every_sample_is_a_valid_code_map(num_levels, num_subcodes, grain_shape):
    levels_seen = set()
    for seed, options in enumerate(SETTINGS):
        model = make_model(num_levels, num_subcodes, grain_shape, seed=seed)
        labels = torch.tensor([0, 1, 2, 3, 0, 1])  # 3 = null class
        maps = sample(model, labels, generator=torch.Generator().manual_seed(seed), **options)
        assert_valid(model, maps, 6)
        levels_seen |= {int(v) for grain, _ in maps for v in grain.unique()}
    assert levels_seen == set(range(num_levels)), "the property test should reach every level"


def test_reproducible_and_seed_dependent():
    model = make_model(num_levels=3, grain_shape=(2, 2))
    runs = [sample(model, [0, 1, 2], generator=torch.Generator().manual_seed(s), cfg_scale=1.5) for s in (7, 7, 8)]
    for (g1, c1), (g2, c2) in zip(runs[0], runs[1]):
        assert torch.equal(g1, g2) and torch.equal(c1, c2)
    assert any(not torch.equal(a[1], b[1]) or not torch.equal(a[0], b[0]) for a, b in zip(runs[0], runs[2]))


def test_cfg_scale_one_is_conditional_sampling_and_guidance_changes_samples():
    model = make_model(num_levels=2, grain_shape=(2, 3))
    labels = [0, 2, 1, 1]
    plain = sample(model, labels, generator=torch.Generator().manual_seed(3))
    unit = sample(model, labels, generator=torch.Generator().manual_seed(3), cfg_scale=1.0)
    strong = sample(model, labels, generator=torch.Generator().manual_seed(3), cfg_scale=4.0)
    for (g1, c1), (g2, c2) in zip(plain, unit):
        assert torch.equal(g1, g2) and torch.equal(c1, c2)
    assert any(not torch.equal(a[0], b[0]) or not torch.equal(a[1], b[1]) for a, b in zip(plain, strong))


def test_cached_and_recompute_samplers_agree():
    model = make_model(num_levels=3, num_subcodes=2, grain_shape=(1, 2))
    cached = sample(model, [0, 1], generator=torch.Generator().manual_seed(5), cfg_scale=2.0)
    recomputed = sample(model, [0, 1], generator=torch.Generator().manual_seed(5), cfg_scale=2.0, use_cache=False)
    for (g1, c1), (g2, c2) in zip(cached, recomputed):
        assert torch.equal(g1, g2) and torch.equal(c1, c2)


def test_generate_tokens_partial_and_errors():
    model = make_model()
    tokens = generate_tokens(model, torch.tensor([0, 1]), max_steps=4, generator=torch.Generator().manual_seed(0))
    assert tokens.position.shape == (2, 5) and tokens.position[:, 0].eq(model.spec.bos).all()
    with pytest.raises(ValueError, match="did not reach END"):
        tokens.sequences(model.spec)
    with pytest.raises(ValueError, match="labels"):
        sample(model, [4])
    with pytest.raises(ValueError, match="class-conditional"):
        sample(make_model(num_classes=0), [0], cfg_scale=2.0)
