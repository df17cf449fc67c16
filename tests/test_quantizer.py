"""Factorized cosine quantizer: fp32 lookup, chunked entropy == dense formula, disentanglement, STE."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_gloo_ranks
from models.tokenizer.quantizer import (ChunkedLookupEntropy, FactorizedQuantizer, QuantizerConfig,
                                        SubCodebookConfig, cosine_lookup, disentanglement_loss)


def dense_entropy_loss(z, codebook, weights, temperature):
    """The FQGAN formula, written densely: d = ||z - e||^2, p = softmax(-d/T)."""
    d = (z ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * z @ codebook.T
    logp = (-d / temperature).log_softmax(1)
    p = logp.exp()
    w = weights / weights.sum()
    sample = (w * -(p * logp).sum(1)).sum()
    pbar = (w[:, None] * p).sum(0)
    return sample + (pbar * pbar.log()).sum(), d.argmin(1)


@pytest.mark.parametrize("chunk", [7, 1000])
def test_chunked_entropy_equals_dense_formula_and_gradients(chunk):
    gen = torch.Generator().manual_seed(0)
    # raw leaves, l2-normalised inside the graph as in the quantizer (the formulas agree on the sphere)
    z = torch.randn(50, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    e = torch.randn(37, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = (torch.rand(50, generator=gen) > 0.3).double()
    temperature = 0.3
    idx, loss = ChunkedLookupEntropy.apply(F.normalize(z, dim=1), F.normalize(e, dim=1), weights, temperature, chunk)
    gz, ge = torch.autograd.grad(loss, (z, e))
    ref, ref_idx = dense_entropy_loss(F.normalize(z, dim=1), F.normalize(e, dim=1), weights, temperature)
    rz, re = torch.autograd.grad(ref, (z, e))
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(loss, ref, atol=1e-10)
    assert torch.allclose(gz, rz, atol=1e-9) and torch.allclose(ge, re, atol=1e-9)


def test_lookup_is_fp32_under_bf16_autocast_and_matches_l2_argmin():
    gen = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(300, 8, generator=gen), dim=1)
    codebook = F.normalize(torch.randn(512, 8, generator=gen), dim=1)
    plain = cosine_lookup(z, codebook, chunk_size=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = cosine_lookup(z, codebook, chunk_size=64)
    assert torch.equal(plain, under_autocast)
    assert torch.equal(plain, torch.cdist(z.double(), codebook.double()).argmin(1))
    assert not torch.equal(plain, (z.bfloat16() @ codebook.bfloat16().T).argmax(1))  # bf16 would differ


def test_disentanglement_loss_on_hand_made_vectors():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])            # <a,b>^2 = 1, 0
    c = torch.tensor([[0.6, 0.8], [0.6, 0.8]])            # <a,c>^2 = .36, .36 ; <b,c>^2 = .36, .64
    w = torch.ones(2)
    assert torch.isclose(disentanglement_loss([a, b], w), torch.tensor(0.5))
    expected = (0.5 + 0.36 + 0.5) / 3
    assert torch.isclose(disentanglement_loss([a, b, c], w), torch.tensor(expected))
    assert torch.isclose(disentanglement_loss([a, b], torch.tensor([1.0, 0.0])), torch.tensor(1.0))


def make_quantizer(k=3, sizes=(64, 32, 16), dim=4):
    cfg = QuantizerConfig(codebooks=[SubCodebookConfig(size=s, dim=dim) for s in sizes[:k]], adapter_channels=8,
                          adapter_blocks=1, chunk_size=40)
    return FactorizedQuantizer(cfg, z_channels=8)


def test_levels_quantized_at_own_resolution_with_masked_losses_and_ste():
    torch.manual_seed(0)
    quant = make_quantizer()
    levels = [torch.randn(2, 8, 3, 4, requires_grad=True), torch.randn(2, 8, 6, 8, requires_grad=True)]
    coarse = (torch.rand(2, 3, 4) > 0.5).float()
    masks = [coarse, 1 - coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)]
    out = quant(levels, masks)
    assert [q.shape for q in out.quantized] == [(2, 12, 3, 4), (2, 12, 6, 8)]
    assert [i.shape for i in out.indices] == [(2, 3, 3, 4), (2, 3, 6, 8)]
    assert set(out.losses) == {"codebook", "commitment", "entropy", "disentangle"}
    # straight-through: quantized values equal the codes, gradients reach input, adapters and codebooks
    codes = F.normalize(quant.codebooks[1].detach(), dim=1)[out.indices[1][:, 1]].permute(0, 3, 1, 2)
    assert torch.allclose(out.quantized[1][:, 4:8], codes, atol=1e-6)
    total = sum(q.sum() for q in out.quantized) + sum(out.losses.values())
    total.backward()
    assert levels[0].grad.abs().sum() > 0 and levels[1].grad.abs().sum() > 0
    for k in range(3):
        assert quant.codebooks[k].grad.abs().sum() > 0
        assert quant.adapters[k][-1].weight.grad.abs().sum() > 0
    # masked-out cells carry no codebook/commitment gradient
    levels[0].grad = None
    out = quant(levels, [torch.zeros_like(coarse), torch.ones_like(masks[1])])
    (out.losses["codebook"] + out.losses["commitment"] + out.losses["entropy"]).backward()
    assert levels[0].grad.abs().sum() == 0


def test_usage_perplexity_and_code_dtype():
    quant = make_quantizer(k=1, sizes=(4,), dim=2)
    with torch.no_grad():
        quant.codebooks[0].copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
        quant.adapters[0][-1].weight.zero_()
        quant.adapters[0][-1].bias.copy_(torch.tensor([1.0, 0.0]))   # every token -> code 0
    out = quant([torch.randn(1, 8, 2, 2)], [torch.ones(1, 2, 2)])
    assert torch.equal(out.indices[0], torch.zeros(1, 1, 2, 2, dtype=torch.long))
    assert math.isclose(float(out.stats["perplexity/0"]), 1.0, rel_tol=1e-6)
    assert math.isclose(float(out.stats["usage/0"]), 0.25)
    assert math.isclose(float(quant.reduced_usage()["usage/0"]), 0.25)
    quant.reset_usage()
    assert float(quant.reduced_usage()["usage/0"]) == 0.0
    assert make_quantizer(k=1, sizes=(65536,)).code_dtype == torch.uint16
    assert make_quantizer(k=2, sizes=(16, 65537)).code_dtype == torch.uint32


def test_unequal_dims_with_disentanglement_is_a_config_error():
    from models.config import ConfigError
    with pytest.raises(ConfigError, match="equal"):
        QuantizerConfig.from_dict({"codebooks": [{"size": 8, "dim": 4}, {"size": 8, "dim": 8}]})
    QuantizerConfig.from_dict({"codebooks": [{"size": 8, "dim": 4}, {"size": 8, "dim": 8}],
                               "disentangle_weight": 0.0})


def test_uniform_init_codes_turn_further_per_adam_step_than_randn():
    """The codes are used l2-normalised, so the raw init norm sets how far one Adam step turns a code:
    U(-1/V, 1/V) (LlamaGen / FQGAN, here V = 64) turns them by degrees, N(0, 1) by a twentieth of one."""
    angles = {}
    for init in ("uniform", "randn"):
        torch.manual_seed(0)
        cfg = QuantizerConfig(codebooks=[SubCodebookConfig(size=64, dim=8)], adapter_channels=8, adapter_blocks=0,
                              entropy_weight=0.0, codebook_init=init)
        quant = FactorizedQuantizer(cfg, z_channels=8)
        before = quant.normalized_codebook(0).detach().clone()
        if init == "uniform":
            assert quant.codebooks[0].abs().max() <= 1 / 64
        optimizer = torch.optim.Adam([quant.codebooks[0]], lr=1e-3)
        out = quant([torch.randn(4, 8, 4, 4)], [torch.ones(4, 4, 4)])
        out.losses["codebook"].backward()
        optimizer.step()
        moved = quant.usage_counts(0) > 0
        cosine = (before * quant.normalized_codebook(0).detach()).sum(1)[moved].clamp(-1, 1)
        angles[init] = float(torch.rad2deg(torch.acos(cosine)).median())
    assert angles["uniform"] > 3 and angles["uniform"] > 50 * angles["randn"], angles


def test_losses_are_averaged_over_subcodebooks():
    """K identical sub-codebooks give the K = 1 loss terms (mean, not sum: K does not scale the pull on the
    trunk), and each reports its code-to-input cosine."""
    torch.manual_seed(0)
    single = make_quantizer(k=1, sizes=(16,))
    double = make_quantizer(k=2, sizes=(16, 16))
    for k in range(2):
        double.adapters[k].load_state_dict(single.adapters[0].state_dict())
        double.codebooks[k].data.copy_(single.codebooks[0].data)
    levels, masks = [torch.randn(2, 8, 3, 3)], [torch.ones(2, 3, 3)]
    one, two = single(levels, masks), double(levels, masks)
    for name in ("codebook", "commitment", "entropy"):
        assert torch.allclose(one.losses[name], two.losses[name], rtol=1e-5), name
    cosine = one.stats["code_cosine/0"]
    assert 0 < float(cosine) <= 1 and torch.allclose(two.stats["code_cosine/1"], cosine)
    assert float(double.reduced_usage()["dead_codes/0"]) == 16 - int((double.usage_counts(0) > 0).sum())


def _entropy_rank(rank: int, world: int, port: int, z, codebook, queue) -> None:
    import torch.distributed as dist

    from models.tokenizer.training import GroupClippedAdamW

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        part = z.chunk(world)[rank].clone().requires_grad_(True)
        book = codebook.clone().requires_grad_(True)
        _, loss = ChunkedLookupEntropy.apply(part, book, torch.ones(part.shape[0], dtype=z.dtype), 0.5, 7)
        loss.backward()
        # a partitioned param group (ZeRO-1/2): this rank holds half of one flat gradient
        flat = torch.nn.Parameter(torch.zeros(4))
        flat.grad = torch.tensor([3.0, 0.0, 0.0, 0.0]) if rank == 0 else torch.tensor([0.0, 4.0, 0.0, 0.0])
        optimizer = GroupClippedAdamW([{"params": [flat], "name": "tokenizer", "max_grad_norm": 1.0}], lr=0.1)
        optimizer.partitioned = True
        optimizer.step()
        # plain lists: tensors would travel as shared memory that dies with this process
        queue.put((rank, float(loss.detach()), part.grad.tolist(), book.grad.tolist(),
                   float(optimizer.grad_norms["tokenizer"]), flat.grad.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_entropy_batch_term_and_partitioned_grad_norm_are_all_reduced():
    """Two gloo ranks with half of the tokens each: the mean of the ranks' entropy losses is the one-process
    loss over all tokens and their gradients, averaged as data parallelism does, are its gradients. A group
    partitioned over the ranks is clipped by its global norm (3, 4 -> 5)."""
    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(24, 4, generator=gen, dtype=torch.float64), dim=1)
    codebook = F.normalize(torch.randn(11, 4, generator=gen, dtype=torch.float64), dim=1)
    full_z, full_book = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
    _, reference = ChunkedLookupEntropy.apply(full_z, full_book, torch.ones(24, dtype=z.dtype), 0.5, 7)
    reference.backward()
    results = run_gloo_ranks(_entropy_rank, z, codebook)
    results = [(r[0], r[1], *(torch.tensor(v, dtype=torch.float64) for v in r[2:4]), r[4], torch.tensor(r[5]))
               for r in results]
    assert sum(r[1] for r in results) / 2 == pytest.approx(float(reference), rel=1e-10)
    # each rank's z-gradient is world x its tokens' share; DDP's average over ranks of the codebook gradient
    assert torch.allclose(torch.cat([r[2] for r in results]) / 2, full_z.grad, rtol=1e-8, atol=1e-12)
    assert torch.allclose((results[0][3] + results[1][3]) / 2, full_book.grad, rtol=1e-8, atol=1e-12)
    assert [r[4] for r in results] == [pytest.approx(5.0), pytest.approx(5.0)]
    assert torch.allclose(results[0][5], torch.tensor([0.6, 0.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(results[1][5], torch.tensor([0.0, 0.8, 0.0, 0.0]), atol=1e-6)


# ------------------------------------------------------------------------------------------ EMA codebooks
def ema_quantizer(size=3, dim=2, k=1, **overrides):
    cfg = QuantizerConfig(codebooks=[SubCodebookConfig(size=size, dim=dim) for _ in range(k)], adapter_channels=8,
                          adapter_blocks=1, codebook_update="ema", **overrides)
    return FactorizedQuantizer(cfg, z_channels=8)


def _three_code_case(quant):
    """Codes e0 = (1, 0), e1 = (0, 1), e2 = (-1, 0) with EMA counts 2 and sums 2 e_j; a batch of (1, 0) -> e0,
    (0.6, 0.8) -> e1 and a masked (0, 1) -> e1 of weight 0."""
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    count, total = quant.ema_statistics(0)
    with torch.no_grad():
        quant.codebooks[0].copy_(codes)
        count.fill_(2.0)
        total.copy_(2 * codes)
    u = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    weights = torch.tensor([1.0, 1.0, 0.0])
    idx = cosine_lookup(u, quant.normalized_codebook(0))
    assert idx.tolist() == [0, 1, 1]
    quant.update_ema(0, u, idx, weights)
    return count, total


def test_ema_update_matches_a_hand_computed_three_code_example():
    quant = ema_quantizer(ema_decay=0.5, dead_code_threshold=0.0)
    assert not quant.codebooks[0].requires_grad
    count, total = _three_code_case(quant)
    # N = 0.5 * 2 + 0.5 * (1, 1, 0); S = 0.5 * 2 e + 0.5 * ((1, 0), (0.6, 0.8), 0); the masked token adds nothing
    assert torch.allclose(count, torch.tensor([1.5, 1.5, 1.0]))
    assert torch.allclose(total, torch.tensor([[1.5, 0.0], [0.3, 1.4], [-1.0, 0.0]]))
    # e = normalize(S / N~): Laplace smoothing rescales each code, the direction is that of S
    n, eps = 4.0, 1e-5
    smoothed = n * (count + eps) / (n + 3 * eps)
    expected = F.normalize(total / smoothed[:, None], dim=1)
    assert torch.allclose(quant.codebooks[0], expected)
    assert torch.allclose(quant.codebooks[0][1], torch.tensor([0.3, 1.4]) / math.hypot(0.3, 1.4))


def test_dead_code_is_restarted_to_a_batch_vector():
    """Threshold 1.2: e2 (count 1.0 after the update) restarts at one of the two weighted tokens (plus noise of
    std 0.01 / sqrt(D)), its count at one token; the used codes are untouched."""
    torch.manual_seed(0)
    quant = ema_quantizer(ema_decay=0.5, dead_code_threshold=1.2)
    count, total = _three_code_case(quant)
    assert count.tolist() == [1.5, 1.5, 1.0]
    restarted = quant.codebooks[0][2]
    distances = (torch.tensor([[1.0, 0.0], [0.6, 0.8]]) - restarted).norm(dim=1)
    assert float(distances.min()) < 0.05 and float(restarted.norm()) == pytest.approx(1.0)
    assert torch.allclose(total[2], restarted)
    assert torch.allclose(quant.codebooks[0][0], torch.tensor([1.0, 0.0]))
    # the masked token (0, 1) is never a candidate
    draws = torch.stack([quantizer_sample(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 0.0]))
                         for _ in range(20)])
    assert float((draws - torch.tensor([1.0, 0.0])).norm(dim=-1).max()) < 0.05


def quantizer_sample(u, weights):
    from models.tokenizer.quantizer import _sample_tokens

    return _sample_tokens(u, weights, 1)[0]


def test_kmeans_init_gives_codes_that_are_batch_means():
    """Three tight clusters of adapter outputs, three codes: after kmeans_init every code is the normalised
    (weighted) mean of the unmasked tokens nearest to it, each cluster gets its own code, and the EMA buffers
    hold the clusters' counts and sums."""
    torch.manual_seed(0)
    quant = ema_quantizer(size=3, dim=2, kmeans_iters=20, codebook_init="kmeans")
    # a linear adapter whose output is the first two input channels: the tokens are what we draw
    adapter = torch.nn.Conv2d(8, 2, 1, bias=False)
    with torch.no_grad():
        adapter.weight.zero_()
        adapter.weight[0, 0] = adapter.weight[1, 1] = 1.0
    quant.adapters[0] = adapter
    centres = torch.tensor([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    points = (centres.repeat(10, 1) + 0.05 * torch.randn(30, 2))
    level = torch.zeros(1, 8, 5, 6)
    level[0, :2] = points.T.reshape(2, 5, 6)
    mask = torch.ones(1, 5, 6)
    mask[0, 0, 0] = 0.0                    # a masked token far from its cluster must not move it
    level[0, :2, 0, 0] = torch.tensor([0.0, 1.0])
    quant.kmeans_init([level], [mask])
    u = F.normalize(level[0, :2].reshape(2, -1).T, dim=1)
    codes = quant.codebooks[0].detach()
    idx = cosine_lookup(u, codes)
    weights = mask.flatten()
    cluster = torch.arange(30) % 3
    codes_of = [set(idx[(cluster == c) & (weights > 0)].tolist()) for c in range(3)]
    assert all(len(c) == 1 for c in codes_of) and set.union(*codes_of) == {0, 1, 2}   # one code per cluster
    for j in range(3):
        members = (idx == j) & (weights > 0)
        assert torch.allclose(codes[j], F.normalize(u[members].mean(0), dim=0), atol=1e-6)
    count, total = quant.ema_statistics(0)
    assert count.sum() == pytest.approx(29.0)
    assert torch.allclose(F.normalize(total, dim=1), codes, atol=1e-6)


def test_ema_codebooks_leave_the_optimizer_groups_and_round_trip_a_checkpoint(tmp_path):
    """No gradient reaches an EMA codebook and TokenizerTrainingModule's groups leave it out (GroupClippedAdamW
    steps the rest); the EMA buffers are in the state dict, and a quantizer loaded from a saved one continues
    exactly as the original."""
    from safetensors.torch import load_file, save_file

    from models.tokenizer.training import GroupClippedAdamW

    torch.manual_seed(0)
    quant = ema_quantizer(size=16, dim=4, k=2, dead_code_threshold=0.5)
    levels, masks = [torch.randn(2, 8, 3, 3)], [torch.ones(2, 3, 3)]
    out = quant(levels, masks)
    (sum(out.losses.values()) + sum(q.square().sum() for q in out.quantized)).backward()
    assert all(c.grad is None for c in quant.codebooks) and float(out.losses["codebook"]) == 0.0
    trainable = [p for p in quant.parameters() if p.requires_grad]
    assert not {id(c) for c in quant.codebooks} & {id(p) for p in trainable}
    GroupClippedAdamW([{"params": trainable, "name": "tokenizer", "max_grad_norm": 1.0}], lr=1e-3).step()
    state = quant.state_dict()
    assert {"ema_count_0", "ema_sum_0", "ema_count_1", "ema_sum_1"} <= set(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "q.safetensors"))
    torch.manual_seed(1)
    resumed = ema_quantizer(size=16, dim=4, k=2, dead_code_threshold=0.5)
    resumed.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
    batch = [torch.randn(2, 8, 3, 3)]
    for model in (quant, resumed):
        torch.manual_seed(5)               # the same restart draws
        model(batch, masks)
    for key, value in quant.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def _ema_rank(rank: int, world: int, port: int, batches, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)               # identical initial weights
        restarting = ema_quantizer(size=32, dim=4, k=2, dead_code_threshold=1.0, kmeans_iters=3)
        plain = ema_quantizer(size=32, dim=4, k=2, dead_code_threshold=0.0)
        torch.manual_seed(100 + rank)      # different restart draws on each rank: only rank 0's may count
        restarting.kmeans_init([batches[0][rank]], [torch.ones(2, 3, 3)])
        for batch in batches[1:]:
            restarting([batch[rank]], [torch.ones(2, 3, 3)])
            plain([batch[rank]], [torch.ones(2, 3, 3)])
        queue.put((rank, {k: v.tolist() for k, v in restarting.state_dict().items()},
                   {k: v.tolist() for k, v in plain.state_dict().items() if "ema" in k or "codebooks" in k}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_keep_identical_ema_codebooks():
    """Two gloo ranks, different batches: k-means init, EMA steps and dead-code restarts leave identical
    codebooks and EMA buffers on both ranks (counts and sums all-reduced, restart candidates broadcast), and
    without restarts the EMA equals one process's on both ranks' batches together."""
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randn(2, 8, 3, 3, generator=gen) for _ in range(2)] for _ in range(4)]
    results = run_gloo_ranks(_ema_rank, batches)
    (_, restart0, plain0), (_, restart1, plain1) = results
    assert restart0.keys() == restart1.keys() and "ema_count_1" in restart0
    for key in restart0:
        assert restart0[key] == restart1[key], key
    assert any(c == 1.0 for c in restart0["ema_count_0"])          # some codes were restarted
    torch.manual_seed(0)
    restarting = ema_quantizer(size=32, dim=4, k=2, dead_code_threshold=1.0)
    single = ema_quantizer(size=32, dim=4, k=2, dead_code_threshold=0.0)
    assert restart0["codebooks.0"] != restarting.state_dict()["codebooks.0"]
    for batch in batches[1:]:
        single([torch.cat(batch)], [torch.ones(4, 3, 3)])
    for key, value in plain0.items():
        assert plain1[key] == value, key
        assert torch.allclose(torch.tensor(value), single.state_dict()[key], atol=1e-6), key
