"""Exact valid-set training: the training likelihood is the sampler's; conditioning options; guidance options."""
import pytest
import torch

from models.generator import (Generator, GeneratorConfig, IGNORE, SequenceSpec, encode_sequences, generate_tokens,
                              next_token_targets, pack)
from models.generator.sequence import valid_choices
from models.generator.stacked import chunked_cross_entropy
from models.layout import num_codes

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0, **overrides) -> Generator:
    values = dict(num_levels=2, num_subcodes=2, codebook_sizes=[7, 5], grain_shape=[2, 3], num_classes=3, dim=32,
                  heads=2, position_depth=1, content_depth=2, head_dim=16, head_depth=1, head_heads=2,
                  dropout=0.0, class_dropout=0.0)
    values.update(overrides)
    torch.manual_seed(seed)
    model = Generator(GeneratorConfig(**values)).eval()
    with torch.no_grad():   # far from uniform, so that a wrong normalisation set shows
        for param in model.parameters():
            param.mul_(8.0 if param.dim() > 1 else 1.0)
    return model


def random_maps(spec: SequenceSpec, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    grains = [torch.randint(0, spec.num_levels, spec.grain_shape, generator=gen) for _ in range(count)]
    codes = [torch.stack([torch.randint(0, size, (int(num_codes(g)),), generator=gen) for size in spec.codebook_sizes],
                         1) for g in grains]
    return grains, codes


def test_valid_choices_hand_computed():
    # G = 2, grain [[0, 1], [0, 0]]: BOS 0 2 3 EOL_0 | 6 7 10 11 END (the sequence module's worked example)
    spec = SequenceSpec(2, (2, 2), (5,))
    grain = torch.tensor([[0, 1], [0, 0]])
    batch = pack(spec, encode_sequences(spec, [grain], [torch.zeros(7, 1, dtype=torch.long)]), torch.zeros(1),
                 64, null_label=0)
    assert batch.position[0].tolist() == [22, 0, 2, 3, 20, 6, 7, 10, 11, 21]
    choices = valid_choices(spec, batch)[0]
    assert choices[0].tolist() == [True, True, True, True]      # after BOS: every region
    assert choices[1].tolist() == [False, True, True, True]     # after opening region 0
    assert choices[2].tolist() == [False, False, False, True]   # after opening region 2: only region 3 (or EOL)
    assert choices[3].tolist() == [False, False, False, False]  # after region 3: EOL_0 is the only legal id
    assert choices[4].tolist() == [False, True, False, False]   # level 1: region 1 is the one left
    model = Generator(GeneratorConfig(num_levels=2, num_subcodes=1, codebook_sizes=[5], grain_shape=[2, 2],
                                      num_classes=0, dim=16, heads=2, position_depth=1, content_depth=1, head_dim=8,
                                      head_depth=1, head_heads=1))
    targets = next_token_targets(spec, batch)
    _, scored, _ = model.position_scores(torch.randn(1, 10, spec.position_vocab), targets, batch)
    assert (targets.position[0] != IGNORE).tolist()[:4] == [True, True, True, True]   # level-wide: 4 scored
    assert scored[0].tolist() == [True, True, True] + [False] * 7                    # EOL_0 was forced


@pytest.mark.parametrize("overrides", [dict(), dict(num_levels=3, grain_shape=[1, 2]),
                                       dict(num_subcodes=1, codebook_sizes=[6], rope_2d=True),
                                       dict(head_slot_tokens=True, next_position_norm=True, zero_init=True),
                                       dict(num_levels=3, grain_shape=[2, 2], rope=False, head_slot_tokens=True)])
def test_training_log_likelihood_equals_the_samplers(overrides):
    """Training's log-likelihood of a sequence == the sum of the sampler's log-probs of the same choices."""
    model = make_model(seed=len(overrides), **overrides)
    spec = model.spec
    grains, codes = random_maps(spec, 6, seed=11)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])   # 3 = the null class
    seqs = encode_sequences(spec, grains, codes)
    batch = pack(spec, seqs, labels, max_tokens=2 * int(seqs.lengths.max()), null_label=model.config.null_class)
    assert batch.position.shape[0] > 1
    training = model.log_likelihood(batch)
    # The sampler, teacher-forced, one row per sequence (END-padded after the sequence ends).
    length = int(seqs.lengths.max())
    position = torch.full((6, length), spec.end, dtype=torch.long)
    content = spec.none_content.repeat(6, length, 1)
    index = seqs.index
    position[seqs.doc, index], content[seqs.doc, index] = seqs.position, seqs.content
    sampled = generate_tokens(model, labels, teacher=(position, content))
    assert sampled.done.all() and torch.equal(sampled.position, position)
    torch.testing.assert_close(training, sampled.log_prob, atol=1e-5, rtol=1e-6)
    # the level-wide normalisation gives a different (lower) likelihood whenever a choice was restricted
    model.config.valid_set_loss = False
    assert (model.log_likelihood(batch) < training - 1e-4).any()


def test_valid_set_loss_trains_and_has_no_nan_gradients():
    model = make_model(seed=3)
    model.train()
    grains, codes = random_maps(model.spec, 4, seed=2)
    batch = pack(model.spec, encode_sequences(model.spec, grains, codes), torch.tensor([0, 1, 2, 0]), 40,
                 model.config.null_class)
    metrics = model(batch)
    metrics["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert 0.0 < metrics["position"].item() and torch.isfinite(metrics["loss"])


def test_chunked_cross_entropy_equals_the_full_one():
    torch.manual_seed(0)
    out = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(10, 8, requires_grad=True)
    target = torch.randint(0, 11, (10,))
    loss, hit = chunked_cross_entropy(hidden, out, target, chunk=3)
    logits = out(hidden)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, target, reduction="none"))
    assert torch.equal(hit, logits.argmax(-1) == target)
    grad_chunked = torch.autograd.grad(loss.sum(), [hidden, out.weight])
    grad_full = torch.autograd.grad(torch.nn.functional.cross_entropy(out(hidden), target, reduction="sum"),
                                    [hidden, out.weight])
    for a, b in zip(grad_chunked, grad_full):
        torch.testing.assert_close(a, b)


def test_model_loss_does_not_depend_on_the_loss_chunk():
    model = make_model(seed=5)
    grains, codes = random_maps(model.spec, 3, seed=4)
    batch = pack(model.spec, encode_sequences(model.spec, grains, codes), torch.tensor([0, 1, 2]), 200,
                 model.config.null_class)
    whole = model(batch)["loss"]
    model.config.loss_chunk = 5
    torch.testing.assert_close(model(batch)["loss"], whole)


def test_conditioning_options_change_the_architecture_as_documented():
    plain, normed = make_model(), make_model(next_position_norm=True)
    assert plain.next_position_norm is None and normed.next_position_norm is not None
    raw = Generator(GeneratorConfig(zero_init=True, num_classes=2, codebook_sizes=[4, 4], dim=32, heads=2,
                                    head_dim=16, head_heads=2))
    for stack in (raw.position_stack, raw.content_stack, raw.content_head.stack):
        for block in stack.blocks:
            assert block.attn.proj.weight.abs().sum() == 0 and block.mlp.down.weight.abs().sum() == 0
    # slot tokens: the head's slot j > 0 input does not contain the context
    head = make_model(head_slot_tokens=True).content_head
    context = torch.randn(4, 32)
    codes = torch.randint(0, 5, (4, 1))
    slots = head.slot_inputs(context, codes)
    torch.testing.assert_close(slots[:, 1], head.code_embed[0](codes[:, 0]) + head.slot_embed[1])
    torch.testing.assert_close(slots[:, 0], head.input(context) + head.slot_embed[0])


def test_guidance_options():
    # One sub-code of one entry: content log-probs are 0 whatever the guidance, so log_prob is the positions'.
    model = make_model(num_subcodes=1, codebook_sizes=[1])
    spec = model.spec
    grains, codes = random_maps(spec, 3, seed=8)
    seqs = encode_sequences(spec, grains, codes)
    length = int(seqs.lengths.max())
    position = torch.full((3, length), spec.end, dtype=torch.long)
    content = spec.none_content.repeat(3, length, 1)
    position[seqs.doc, seqs.index], content[seqs.doc, seqs.index] = seqs.position, seqs.content
    labels, teacher = torch.tensor([0, 1, 2]), (position, content)

    def log_prob(**options):
        return generate_tokens(model, labels, teacher=teacher, **options).log_prob

    unguided = log_prob()
    assert not torch.allclose(log_prob(cfg_scale=4.0), unguided)
    torch.testing.assert_close(log_prob(cfg_scale=4.0, cfg_positions=False), unguided)
    # the linear ramp starts at scale 1: the first choice is unguided, later ones are not
    first = dict(max_steps=1)
    torch.testing.assert_close(log_prob(cfg_scale=4.0, cfg_schedule="linear", **first), log_prob(**first))
    assert not torch.allclose(log_prob(cfg_scale=4.0, cfg_schedule="linear"), unguided)
    assert not torch.allclose(log_prob(cfg_scale=4.0, cfg_schedule="linear"), log_prob(cfg_scale=4.0))
    with pytest.raises(ValueError, match="cfg_schedule"):
        log_prob(cfg_scale=2.0, cfg_schedule="cosine")
