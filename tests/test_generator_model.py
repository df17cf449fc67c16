"""The stacked generator: configs, packing isolation, training == incremental logits (no bug B1), overfit, save/load."""
import dataclasses
from pathlib import Path

import pytest
import torch

from models.config import ConfigError
from models.generator import (Generator, GeneratorConfig, IGNORE, encode_sequences, next_token_targets, pack)
from models.generator.decoding import CachedDecoder, RecomputeDecoder
from models.layout import num_codes

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**overrides) -> GeneratorConfig:
    values = dict(num_levels=2, num_subcodes=2, codebook_sizes=[11, 13], grain_shape=[2, 2], num_classes=3, dim=32,
                  heads=2, position_depth=2, content_depth=2, head_dim=16, head_depth=1, head_heads=2,
                  dropout=0.1, class_dropout=0.1)
    values.update(overrides)
    return GeneratorConfig(**values)


def random_batch(config: GeneratorConfig, count: int, seed: int, max_tokens: int = 10_000):
    spec = config.spec
    gen = torch.Generator().manual_seed(seed)
    grains, codes = [], []
    for _ in range(count):
        grain = torch.randint(0, spec.num_levels, spec.grain_shape, generator=gen)
        grains.append(grain)
        codes.append(torch.stack([torch.randint(0, size, (int(num_codes(grain)),), generator=gen)
                                  for size in spec.codebook_sizes], 1))
    labels = torch.randint(0, config.num_classes, (count,), generator=gen)
    seqs = encode_sequences(spec, grains, codes)
    return pack(spec, seqs, labels, max_tokens=max_tokens, null_label=config.null_class)


@pytest.mark.parametrize("preset, low, high", [("tiny", 0.2e6, 5e6), ("base", 250e6, 400e6), ("large", 600e6, 1.2e9)])
def test_presets_load_and_have_the_intended_size(preset, low, high):
    path = REPO / "configs" / "generator" / f"{preset}.yaml"
    config = GeneratorConfig.from_yaml(path)
    with torch.device("meta"):
        model = Generator(config)
    assert low <= model.num_parameters() <= high
    if preset == "base":
        assert config.grain_shape == [16, 16] and config.codebook_sizes == [16384] * 3


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.codebook_sizes"):
        GeneratorConfig.from_dict({"num_subcodes": 3, "codebook_sizes": [8, 8]})
    with pytest.raises(ConfigError, match="dim/heads"):
        GeneratorConfig.from_dict({"dim": 30, "heads": 4})
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {dir: x}\nmodel:\n  dimm: 3\n")
    with pytest.raises(ConfigError, match=r"model\.dimm: unknown key"):
        GeneratorConfig.from_yaml(bad)
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  dim: 64\n")
    assert GeneratorConfig.from_yaml(good, ["heads=8"]).heads == 8


def test_packed_sequences_never_see_each_other():
    config = small_config()
    torch.manual_seed(0)
    model = Generator(config).eval()
    batch = random_batch(config, 6, seed=1, max_tokens=40)
    assert batch.position.shape[0] < 6, "the test needs several sequences per row"
    out = model.logits(batch)
    victim = int(batch.doc[0, 0])  # perturb the sequence that opens row 0; others share the row
    perturbed = batch.to("cpu")
    hit = batch.doc == victim
    perturbed.content = torch.where(hit[..., None] & (batch.content < 11), (batch.content + 1) % 11, batch.content)
    perturbed.label = torch.where(hit, (batch.label + 1) % 3, batch.label)
    again = model.logits(perturbed)
    others = (batch.doc >= 0) & ~hit
    assert torch.equal(out.position_logits[others], again.position_logits[others])
    assert not torch.allclose(out.position_logits[hit], again.position_logits[hit])
    other_content = others[out.content_mask]
    for j in range(2):
        assert torch.equal(out.content_logits[j][other_content], again.content_logits[j][other_content])


@pytest.mark.parametrize("num_levels, num_subcodes, rope", [(2, 2, True), (3, 3, True), (2, 1, False)])
@pytest.mark.parametrize("decoder_kind", ["cached", "recompute"])
def test_training_logits_equal_incremental_logits(num_levels, num_subcodes, rope, decoder_kind):
    """Bug B1 of the reference code: sampling logits must equal the teacher-forced ones at every step."""
    config = small_config(num_levels=num_levels, num_subcodes=num_subcodes, codebook_sizes=[11, 13, 7][:num_subcodes],
                          rope=rope)
    torch.manual_seed(1)
    model = Generator(config).eval()
    batch = random_batch(config, 3, seed=num_levels, max_tokens=200)
    out = model.logits(batch)
    targets = next_token_targets(model.spec, batch)
    content_row = torch.cumsum(out.content_mask.flatten(), 0).view_as(out.content_mask) - 1
    checked = 0
    for doc in range(3):
        row, cols = (batch.doc == doc).nonzero(as_tuple=True)
        row = int(row[0])
        decoder = CachedDecoder(model, 1, len(cols)) if decoder_kind == "cached" else RecomputeDecoder(model, 1)
        for col in cols.tolist():
            inputs = model.embed_inputs(batch.position[row, col].view(1, 1), batch.content[row, col].view(1, 1, -1),
                                        batch.label[row, col].view(1, 1))
            hidden = decoder.position(inputs, batch.position[row, col].view(1))
            torch.testing.assert_close(model.position_logits(hidden)[0], out.position_logits[row, col],
                                       atol=1e-5, rtol=1e-5)
            context = decoder.content(hidden, targets.next_position[row, col].view(1))
            if not out.content_mask[row, col]:
                continue
            caches = model.content_head.new_caches(1, context)
            previous = None
            for j in range(num_subcodes):
                logits = model.content_head.step(context, previous, j, caches)
                torch.testing.assert_close(logits[0], out.content_logits[j][content_row[row, col]],
                                           atol=1e-5, rtol=1e-5)
                previous = targets.content[row, col, j].view(1)
                checked += 1
    assert checked >= 3 * num_subcodes


def test_losses_and_overfitting_a_few_sequences():
    config = small_config(dim=64, heads=4, dropout=0.0, class_dropout=0.0)
    torch.manual_seed(2)
    model = Generator(config)
    batch = random_batch(config, 4, seed=5)
    losses = model(batch)
    assert {"loss", "position", "content", "content/0", "content/1", "accuracy/position",
            "accuracy/content/0", "accuracy/content/1"} <= set(losses)
    # at init (near-uniform logits) each CE is about log(vocab): 11 and 13 sub-codes, position over <= 5 choices
    assert losses["content/0"].item() == pytest.approx(torch.log(torch.tensor(11.0)).item(), abs=0.3)
    assert losses["content/1"].item() == pytest.approx(torch.log(torch.tensor(13.0)).item(), abs=0.3)
    assert 0.3 < losses["position"].item() < torch.log(torch.tensor(5.0)).item() + 0.3
    torch.testing.assert_close(losses["loss"], losses["position"] + (losses["content/0"] + losses["content/1"]) / 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = losses["loss"].item()
    for _ in range(60):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = model(batch)
    assert final["loss"].item() < 0.25 * first
    assert final["accuracy/content/0"].item() > 0.9


def masked_select_metrics(model: Generator, out) -> dict[str, torch.Tensor]:
    """The former boolean-mask formulation of the losses, computed from the teacher-forced logits."""
    target = out.targets.position[out.targets.position != IGNORE]
    allowed = model.spec.free_positions()[model.spec.position_level(target)]
    logits = out.position_logits[out.targets.position != IGNORE].masked_fill(~allowed, float("-inf"))
    metrics = {"position": torch.nn.functional.cross_entropy(logits, target),
               "accuracy/position": (logits.argmax(-1) == target).float().mean()}
    content_target = out.targets.content[out.content_mask]
    for j, content_logits in enumerate(out.content_logits):
        metrics[f"content/{j}"] = torch.nn.functional.cross_entropy(content_logits, content_target[:, j])
        metrics[f"accuracy/content/{j}"] = (content_logits.argmax(-1) == content_target[:, j]).float().mean()
    return metrics


@pytest.mark.parametrize("num_levels, from_pack", [(2, True), (3, True), (3, False)])
def test_losses_equal_the_masked_select_formulation(num_levels, from_pack):
    """The level-wide normalisation (valid_set_loss=False) equals the former boolean-mask formulation."""
    config = small_config(num_levels=num_levels, dropout=0.0, class_dropout=0.0, valid_set_loss=False)
    torch.manual_seed(4)
    model = Generator(config)
    batch = random_batch(config, 5, seed=num_levels, max_tokens=60)
    assert batch.position.shape[0] > 1 and (batch.doc < 0).any(), "the test needs several rows and padding"
    if not from_pack:
        batch.content_rows = None  # a hand-built batch: the rows are derived in the forward
        batch = batch.to("cpu")
    out = model.logits(batch)
    assert torch.equal(out.content_rows, out.content_mask.flatten().nonzero().squeeze(1))
    expected = masked_select_metrics(model, out)
    metrics = model(batch)
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-6, atol=0.0, msg=name)
    assert out.targets.position.eq(IGNORE).any() and out.targets.position.ne(IGNORE).any()
    # the gradients match too: no NaN leaks from rows without a position loss
    metrics["loss"].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (expected["position"] + torch.stack([expected[f"content/{j}"] for j in range(2)]).mean()).backward()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_forward_has_no_data_dependent_shapes():
    """Training must not sync with the host: under a fake-tensor mode a data-dependent op would raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    config = small_config(dropout=0.0, class_dropout=0.0)
    model = Generator(config)
    batch = random_batch(config, 3, seed=6, max_tokens=40)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor
        # sequence_spans is host metadata (read with .tolist() by the CPU kernel), the rest lives on the device
        fake_batch = type(batch)(*(getattr(batch, field.name) if field.name == "sequence_spans" else
                                   fake(getattr(batch, field.name)) for field in dataclasses.fields(batch)))
        metrics = model(fake_batch)
    assert metrics["loss"].shape == ()


def test_single_level_has_no_position_loss():
    config = small_config(num_levels=1)
    losses = Generator(config)(random_batch(config, 2, seed=0))
    assert losses["position"].item() == 0.0 and losses["loss"].requires_grad
    assert losses["accuracy/position"].item() == 1.0


def test_label_dropout_only_in_training():
    config = small_config(class_dropout=0.5)
    model = Generator(config)
    labels = torch.zeros(10_000, dtype=torch.long)
    dropped = (model.drop_labels(labels) == config.null_class).float().mean().item()
    assert dropped == pytest.approx(0.5, abs=0.03)
    assert torch.equal(model.eval().drop_labels(labels), labels)


def test_save_and_load_round_trip(tmp_path):
    config = small_config(num_levels=3, grain_shape=[1, 2])
    torch.manual_seed(3)
    model = Generator(config).eval()
    batch = random_batch(config, 2, seed=4)
    model.save_pretrained(tmp_path / "gen")
    loaded = Generator.from_pretrained(tmp_path / "gen").eval()
    assert loaded.config == config
    assert loaded.content_head.out[0].weight is loaded.content_head.code_embed[0].weight  # tying survives loading
    before, after = model.logits(batch), loaded.logits(batch)
    assert torch.equal(before.position_logits, after.position_logits)
    for a, b in zip(before.content_logits, after.content_logits):
        assert torch.equal(a, b)
    assert before.targets.position.ne(IGNORE).any()


def test_rope_rotates_channel_pairs_by_hand():
    from models.generator.layers import apply_rope, rope_tables, rope_tables_2d

    # head width 4: pair 0 turns by index * 1, pair 1 by index * 10000^(-1/2) = index / 100 (base 10000)
    index = torch.tensor([[0, 1, 2]])
    table = rope_tables(index, 4)
    assert table.shape == (1, 1, 3, 2) and table.dtype == torch.complex64
    x = torch.tensor([1.0, 0.0, 0.0, 2.0]).expand(1, 1, 3, 4)
    got = apply_rope(x, table)[0, 0]
    angles = index[0].float()
    expected = torch.stack([angles.cos(), angles.sin(), -2 * (angles / 100).sin(), 2 * (angles / 100).cos()], 1)
    torch.testing.assert_close(got, expected)
    # views of a fused qkv projection (the attention layer's q and k), in bf16: the same rotation
    qkv = torch.randn(2, 3, 3, 2, 4).permute(2, 0, 3, 1, 4)     # [3, B, H, T, Dh] views
    for part in qkv:
        real, imag = part.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = table.real, table.imag
        reference = torch.stack((real * cos - imag * sin, real * sin + imag * cos), -1).flatten(-2)
        torch.testing.assert_close(apply_rope(part, table), reference)
        assert apply_rope(part.bfloat16(), table).dtype == torch.bfloat16
    table_2d = rope_tables_2d(index, index + 1, 8)       # y pairs first, then x pairs
    torch.testing.assert_close(table_2d, torch.cat([rope_tables(index, 4), rope_tables(index + 1, 4)], -1))
