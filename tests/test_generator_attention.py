"""Packed attention without a dense mask: block mask, per-sequence SDPA and FlexAttention == the dense reference."""
import pytest
import torch
import torch.nn.functional as F

from models.generator import Generator, GeneratorConfig, encode_sequences, pack
from models.generator.attention import (DocumentMask, PerSequenceAttention, document_block_mask, sequence_spans,
                                        uncovered_slots)
from models.layout import num_codes

pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**overrides) -> GeneratorConfig:
    values = dict(num_levels=2, num_subcodes=2, codebook_sizes=[11, 13], grain_shape=[2, 2], num_classes=3, dim=32,
                  heads=2, position_depth=2, content_depth=2, head_dim=16, head_depth=1, head_heads=2,
                  dropout=0.0, class_dropout=0.0)
    values.update(overrides)
    return GeneratorConfig(**values)


def random_batch(config: GeneratorConfig, count: int, seed: int, max_tokens: int, row_length=None):
    spec = config.spec
    gen = torch.Generator().manual_seed(seed)
    grains = [torch.randint(0, spec.num_levels, spec.grain_shape, generator=gen) for _ in range(count)]
    codes = [torch.stack([torch.randint(0, size, (int(num_codes(g)),), generator=gen) for size in spec.codebook_sizes],
                         1) for g in grains]
    labels = torch.randint(0, config.num_classes, (count,), generator=gen)
    return pack(spec, encode_sequences(spec, grains, codes), labels, max_tokens, config.null_class, row_length)


def random_docs(rows: int, length: int, seed: int) -> torch.Tensor:
    """Document ids ``[rows, length]``: contiguous documents of random lengths, padding (-1) at row ends."""
    gen = torch.Generator().manual_seed(seed)
    doc = torch.full((rows, length), -1)
    next_id = 0
    for row in range(rows):
        col = 0
        while True:
            size = int(torch.randint(1, length // 2, (1,), generator=gen))
            if col + size > length - int(torch.randint(0, 8, (1,), generator=gen)):
                break
            doc[row, col:col + size] = next_id
            next_id, col = next_id + 1, col + size
    return doc


def dense_mask(doc: torch.Tensor) -> torch.Tensor:
    causal = torch.ones(doc.shape[1], doc.shape[1], dtype=torch.bool).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def test_block_mask_blocks_by_hand():
    # one row of 8 slots, blocks of 2: documents [0 0 0 | 1 1 1 1 | pad]
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1]])
    mask = document_block_mask(doc, block=2)
    dense = mask.to_dense()[0, 0]      # [Q blocks, KV blocks]: 1 where any score is computed
    expected = torch.tensor([[1, 0, 0, 0],
                             [1, 1, 0, 0],     # q block 1 = docs (0, 1): sees doc 0's first block
                             [0, 1, 1, 0],     # q block 2 = doc 1 only: block 0 holds doc 0 only -> skipped
                             [0, 1, 1, 1]])
    assert torch.equal(dense.int(), expected)
    # no block is full here: every candidate mixes documents, padding, or sits on the diagonal
    assert mask.full_kv_num_blocks[0, 0].tolist() == [0, 0, 0, 0]
    doc = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1]])
    # below-diagonal blocks inside document 0 run without the mask function
    assert document_block_mask(doc, block=2).full_kv_num_blocks[0, 0].tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("length, block", [(64, 8), (50, 16), (40, 128)])
def test_flex_and_per_sequence_attention_equal_dense_sdpa(length, block):
    doc = random_docs(3, length, seed=length)
    q, k, v = (torch.randn(3, 2, length, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc))
    from torch.nn.attention.flex_attention import flex_attention

    flex = flex_attention(q, k, v, block_mask=document_block_mask(doc, block=block))
    torch.testing.assert_close(flex, reference, atol=1e-5, rtol=1e-5)
    masks = DocumentMask(doc), DocumentMask(doc, sequence_spans(doc))
    for mask in masks:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = mask.attend(*leaves)       # CPU + gradients: the per-sequence SDPA kernel
        valid = (doc >= 0)[:, None, :, None]
        torch.testing.assert_close(out * valid, reference * valid, atol=1e-5, rtol=1e-5)
        (out * valid).square().sum().backward()
        dense_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        (F.scaled_dot_product_attention(*dense_leaves, attn_mask=dense_mask(doc)) * valid).square().sum().backward()
        for got, want in zip(leaves, dense_leaves):
            torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


def test_per_sequence_kernel_is_bitwise_the_per_sequence_sdpa_calls():
    """One autograd node for all sequences == one causal SDPA per sequence (outputs and gradients, exactly);
    slots outside every sequence (a gap, a row end, an empty row) get 0 output and 0 gradient."""
    spans = ((0, 0, 5), (0, 7, 9), (1, 0, 16))     # row 0: gap at 5..6, then 16..19 free; row 2: empty
    assert uncovered_slots(spans, 3, 20) == ((0, 5, 7), (0, 16, 20), (1, 16, 20), (2, 0, 20))
    q, k, v = (torch.randn(3, 2, 20, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    grad = torch.randn(3, 2, 20, 8, generator=torch.Generator().manual_seed(9))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = PerSequenceAttention.apply(*leaves, spans, uncovered_slots(spans, 3, 20))
    out.backward(grad)
    reference = [x.clone().requires_grad_() for x in (q, k, v)]
    for row, start, size in spans:
        piece = [x[row:row + 1, :, start:start + size] for x in reference]
        expected = F.scaled_dot_product_attention(*piece, is_causal=True)
        assert torch.equal(out[row:row + 1, :, start:start + size], expected)
        expected.backward(grad[row:row + 1, :, start:start + size])
    covered = torch.zeros(3, 1, 20, 1, dtype=torch.bool)
    for row, start, size in spans:
        covered[row, :, start:start + size] = True
    assert (out.masked_fill(covered, 0) == 0).all()
    for got, want in zip(leaves, reference):
        assert torch.equal(got.grad, want.grad)      # 0 outside the spans on both sides
    assert out.transpose(1, 2).is_contiguous()         # [R, S, H, Dh] storage: the output projection reads it as is


@pytest.mark.parametrize("rope_2d", [False, True])
def test_model_losses_and_gradients_equal_the_dense_mask_path(rope_2d):
    config = small_config(dim=64, heads=4, rope_2d=rope_2d, dropout=0.1, zero_init=False)
    torch.manual_seed(0)
    model = Generator(config)
    batch = random_batch(config, 7, seed=3, max_tokens=48)
    assert batch.position.shape[0] > 1 and (batch.doc < 0).any()
    metrics, grads = {}, {}
    for name, mask in (("document", None), ("dense", batch.attention_mask())):
        torch.manual_seed(1)  # the same residual-dropout draws
        model.zero_grad()
        values = model(batch, mask)
        values["loss"].backward()
        metrics[name] = values
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for key, value in metrics["dense"].items():
        torch.testing.assert_close(metrics["document"][key], value, atol=1e-5, rtol=1e-5, msg=key)
    for got, want in zip(grads["document"], grads["dense"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with torch.no_grad():   # FlexAttention (eager at this size) on the CPU without gradients
        model.eval()
        torch.testing.assert_close(model(batch)["loss"], model(batch, batch.attention_mask())["loss"],
                                   atol=1e-5, rtol=1e-5)


def test_fixed_row_length_packing():
    config = small_config()
    batch = random_batch(config, 5, seed=2, max_tokens=120, row_length=40)
    assert batch.position.shape == (3, 40)      # ceil(120 / 40) rows of exactly 40 slots
    small = random_batch(config, 1, seed=2, max_tokens=120, row_length=40)
    assert small.position.shape == (3, 40) and small.num_tokens == int((small.doc >= 0).sum())
    spans = batch.sequence_spans
    lengths = batch.doc[batch.valid].bincount()
    assert spans.shape == (5, 3) and torch.equal(spans[:, 2].sort().values, lengths.sort().values)
    for row, start, length in spans.tolist():
        sequence = batch.doc[row, start:start + length]
        assert (sequence == sequence[0]).all() and torch.equal(batch.index[row, start:start + length],
                                                                torch.arange(length))
    assert spans[:, 0].tolist() == sorted(spans[:, 0].tolist())
    with pytest.raises(ValueError, match="does not fit"):
        random_batch(small_config(grain_shape=[4, 4]), 2, seed=0, max_tokens=40, row_length=20)


@pytest.mark.slow
def test_compiled_flex_attention_matches_dense_at_a_long_row():
    """Rows longer than EAGER_MAX_LENGTH run the compiled kernel (about 40 s to compile on a CPU)."""
    from models.generator.attention import EAGER_MAX_LENGTH

    length = 2 * EAGER_MAX_LENGTH
    doc = random_docs(1, length, seed=7)
    q, k, v = (torch.randn(1, 2, length, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with torch.no_grad():
        out = DocumentMask(doc).attend(q, k, v)
    valid = (doc >= 0)[:, None, :, None]
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc))
    torch.testing.assert_close(out * valid, reference * valid, atol=1e-5, rtol=1e-5)


def test_bf16_training_and_evaluation_paths_run_on_the_cpu():
    """bf16 weights (DeepSpeed bf16) and fp32 weights under autocast, through both packed-attention kernels."""
    config = small_config(head_slot_tokens=True, next_position_norm=True, zero_init=True, rope_2d=True)
    torch.manual_seed(0)
    model = Generator(config)
    batch = random_batch(config, 5, seed=1, max_tokens=64, row_length=64)
    reference = model(batch)["loss"].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(batch)["loss"]
    autocast.backward()
    model.to(torch.bfloat16)
    loss = model(batch)["loss"]
    loss.backward()
    with torch.no_grad():
        evaluated = model.eval()(batch)["loss"]
    for value in (autocast, loss, evaluated):
        assert value.item() == pytest.approx(reference, rel=0.02)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
