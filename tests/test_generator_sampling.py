"""Constrained sampling: validity rule, filters, every sample a valid code map, CFG, reproducibility, static KV cache
== recompute, bf16 autocast, host reads only every N steps."""
import pytest
import torch

from models.generator import (Generator, GeneratorConfig, SequenceSpec, TokenFilter, ValidityRule, generate_tokens,
                              sample)
from models.generator.layers import KVCache
from models.generator.decoding import CachedDecoder, filter_logits
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


@pytest.mark.parametrize("seed, labels, cfg_scale", [(5, [0, 1], 2.0), (6, [2], None), (7, [0, 1, 2, 3, 1], 3.0),
                                                     (8, [1, 1, 0, 2], None)])
def test_static_cache_gives_the_tokens_of_the_recompute_path(seed, labels, cfg_scale):
    model = make_model(num_levels=3, num_subcodes=2, grain_shape=(1, 2), seed=seed)
    runs = [generate_tokens(model, torch.tensor(labels), generator=torch.Generator().manual_seed(seed),
                            cfg_scale=cfg_scale, use_cache=use_cache) for use_cache in (True, False)]
    assert runs[0].done.all()
    assert torch.equal(runs[0].position, runs[1].position) and torch.equal(runs[0].content, runs[1].content)
    torch.testing.assert_close(runs[0].log_prob, runs[1].log_prob)


def test_full_length_kv_cache_writes_at_the_device_index_and_masks_the_rest():
    cache = KVCache(2, 1, 5, 3, full_length=True)
    keys = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    _, _, valid = cache.update(keys, -keys)
    assert cache.length.tolist() == [2] and valid.tolist() == [[[[True, False, False, False, False],
                                                                  [True, True, False, False, False]]]]
    all_keys, all_values, valid = cache.update(keys[:, :, :1] + 100, keys[:, :, :1])
    assert valid.tolist() == [[[[True, True, True, False, False]]]]
    assert torch.equal(all_keys[:, :, :2], keys) and torch.equal(all_keys[:, :, 2], keys[:, :, 0] + 100)
    assert torch.equal(all_values[:, :, :2], -keys) and all_keys[:, :, 3:].eq(0).all()
    cache.reset()
    assert cache.length.tolist() == [0] and cache.token_index(torch.zeros(2, 1)).tolist() == [[0], [0]]


def test_prefix_kv_cache_writes_in_place_and_returns_the_filled_prefix():
    cache = KVCache(2, 1, 5, 3)
    keys = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    all_keys, all_values, causal = cache.update(keys, -keys)
    assert cache.filled == 2 and all_keys.shape == (2, 1, 2, 3) and causal.tolist() == [[[[True, False],
                                                                                           [True, True]]]]
    all_keys, all_values, mask = cache.update(keys[:, :, :1] + 100, keys[:, :, :1])
    assert mask is None and all_keys.shape == (2, 1, 3, 3)   # one new token sees every filled slot
    assert all_keys.data_ptr() == cache.keys.data_ptr()       # a view of the preallocated buffer, not a copy
    assert torch.equal(all_keys[:, :, :2], keys) and torch.equal(all_keys[:, :, 2], keys[:, :, 0] + 100)
    assert torch.equal(all_values[:, :, :2], -keys) and torch.equal(all_values[:, :, 2], keys[:, :, 0])
    _, _, causal = cache.update(keys, keys)   # two new tokens after three: causal among the new ones only
    assert causal.tolist() == [[[[True, True, True, True, False], [True, True, True, True, True]]]]
    assert cache.token_index(torch.zeros(2, 1)).tolist() == [[5], [5]] and cache.length.tolist() == [0]
    with pytest.raises(RuntimeError, match="overflow"):
        cache.update(keys[:, :, :1], keys[:, :, :1])
    cache.reset()
    assert cache.filled == 0 and cache.token_index(torch.zeros(1, 1)).tolist() == [[0]]


@pytest.mark.parametrize("seed, labels, cfg_scale", [(3, [0, 1, 2], 2.0), (4, [1, 2], None)])
def test_prefix_and_full_length_caches_give_the_same_tokens_and_log_probs(monkeypatch, seed, labels, cfg_scale):
    """Eager decoding attends over the filled prefix; compiled decoding over all slots under the validity mask."""
    model = make_model(num_levels=3, grain_shape=(2, 2), seed=seed)
    labels = torch.tensor(labels)

    def run(compile, teacher=None):
        return generate_tokens(model, labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(seed),
                               compile=compile, teacher=teacher)

    prefix = run(False)
    scored_prefix = run(False, teacher=(prefix.position, prefix.content))
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)   # the full-length steps, run eagerly
    assert CachedDecoder(model, 2, 8, compile=True).cache.content[0].full_length
    assert all(cache.full_length for cache in CachedDecoder(model, 2, 8, compile=True).head_caches)
    assert not CachedDecoder(model, 2, 8, compile=False).cache.position[0].full_length
    full = run(True)
    scored_full = run(True, teacher=(prefix.position, prefix.content))
    assert prefix.done.all() and full.done.all()
    assert torch.equal(prefix.position, full.position) and torch.equal(prefix.content, full.content)
    assert torch.isfinite(scored_prefix.log_prob).all() and scored_prefix.log_prob.lt(0).all()
    torch.testing.assert_close(scored_full.log_prob, scored_prefix.log_prob)


def test_bf16_autocast_sampling_uses_a_bf16_cache_and_gives_valid_maps():
    model = make_model(num_levels=2, grain_shape=(2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.new_cache(2, 4).position[0].keys.dtype == torch.bfloat16
        tokens = generate_tokens(model, torch.tensor([0, 1, 2]), cfg_scale=2.0,
                                 generator=torch.Generator().manual_seed(1))
        maps = sample(model, [0, 1, 2], cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    assert model.new_cache(2, 4).position[0].keys.dtype == torch.float32   # fp32 outside autocast, weights untouched
    assert model.position_embed.weight.dtype == torch.float32
    assert tokens.done.all() and torch.isfinite(tokens.log_prob).all()
    assert_valid(model, maps, 3)


@pytest.mark.parametrize("every", [1, 3, 64])
def test_checking_done_every_n_steps_gives_the_same_samples(every):
    model = make_model(num_levels=3, grain_shape=(2, 2))
    reference = generate_tokens(model, torch.tensor([0, 1, 2, 3]), cfg_scale=1.5, check_done_every=1,
                                generator=torch.Generator().manual_seed(4))
    tokens = generate_tokens(model, torch.tensor([0, 1, 2, 3]), cfg_scale=1.5, check_done_every=every,
                             generator=torch.Generator().manual_seed(4))
    assert torch.equal(tokens.position, reference.position) and torch.equal(tokens.content, reference.content)
    torch.testing.assert_close(tokens.log_prob, reference.log_prob)


def test_the_decode_loop_reads_the_device_only_every_n_steps(monkeypatch):
    model = make_model(num_levels=2, grain_shape=(2, 3))
    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or real_bool(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() in the decode loop"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist() in the decode loop"))
    tokens = generate_tokens(model, torch.tensor([0, 1]), cfg_scale=2.0, check_done_every=4,
                             generator=torch.Generator().manual_seed(0))
    steps = tokens.position.shape[1] - 1
    # one read per 4 steps, plus the label range check (2) and the final cut (1); per token it was 2 a step
    assert steps > 8 and len(reads) <= -(-steps // 4) + 3


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
