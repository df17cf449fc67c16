"""Held-out NLL of the generator: level-wide vs valid-set position loss, and the conditioning options.

Demo-like codes (the tiny preset's vocabulary: 2 levels on a 4 x 4 grid, K = 2 sub-codebooks of 256) with
learnable structure, written from a fixed seed: per image a class, a fine disc (regions within a random
radius of a random centre are coded at the fine level) and sub-codes that are a function of (class, cell,
level) for sub-code 0 and of sub-code 0 for sub-code 1, each replaced by a uniform draw with probability
``--noise``. Every variant trains the tiny preset's widths for the same ``--steps`` steps on the same packed
micro batches (``--max-tokens`` per step), ``--seeds`` seeds each; the figure is the held-out NLL per token
(nats) under the *sampler's* distribution (valid-set normalised positions + all sub-codes,
``Generator.log_likelihood``), so all variants are scored on the same quantity.

Variants: ``today`` (level-wide position softmax, no conditioning changes), ``valid_set`` (position loss over
the sampler's legal ids), ``valid_set_conditioning`` (plus next-position norm, FAR slot tokens, zero-init),
``valid_set_conditioning_rope2d`` (plus 2-D RoPE).

    nice -n 10 .venv/bin/python -m benchmarks.generator_nll [--steps 300] [--seeds 3]
"""
from __future__ import annotations

import argparse
import math
import statistics

from benchmarks.common import emit, target  # noqa: E402  (first: it sets the process env before torch loads)
import torch  # noqa: E402
from models.generator import Generator, GeneratorConfig, encode_sequences, pack  # noqa: E402
from models.layout import num_codes  # noqa: E402

GRID, CLASSES, CODEBOOK = (4, 4), 10, 256
WIDTHS = dict(dim=128, heads=4, position_depth=2, content_depth=4, head_dim=64, head_depth=1, head_heads=2)
VARIANTS = {
    "today": dict(valid_set_loss=False),
    "valid_set": dict(valid_set_loss=True),
    "valid_set_conditioning": dict(valid_set_loss=True, next_position_norm=True, head_slot_tokens=True, zero_init=True),
    "valid_set_conditioning_rope2d": dict(valid_set_loss=True, next_position_norm=True, head_slot_tokens=True,
                                          zero_init=True, rope_2d=True),
}


def structured_maps(count: int, noise: float, seed: int):
    """``count`` (grain [4, 4], codes [L, 2], label) triples with the structure of the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    maps = []
    for _ in range(count):
        label = int(torch.randint(0, CLASSES, (1,), generator=gen))
        centre = torch.rand(2, generator=gen) * torch.tensor(GRID, dtype=torch.float32)
        radius = 0.5 + 1.5 * float(torch.rand(1, generator=gen))
        grain = (((ys + 0.5 - centre[0]) ** 2 + (xs + 0.5 - centre[1]) ** 2).sqrt() < radius).long()
        cells = []
        for level, (height, width) in enumerate([GRID, (2 * GRID[0], 2 * GRID[1])]):
            coarse = grain.repeat_interleave(1 << level, 0).repeat_interleave(1 << level, 1)
            y, x = torch.nonzero(coarse == level, as_tuple=True)
            cells.append((level, y, x))
        first = torch.cat([(label * 37 + y * 11 + x * 5 + level * 101) % CODEBOOK for level, y, x in cells])
        second = (first * 7 + 13 + label) % CODEBOOK
        codes = torch.stack([first, second], 1)
        flip = torch.rand(codes.shape, generator=gen) < noise
        codes = torch.where(flip, torch.randint(0, CODEBOOK, codes.shape, generator=gen), codes)
        assert codes.shape[0] == int(num_codes(grain))
        maps.append((grain, codes, label))
    return maps


def batches(spec, maps, max_tokens: int, null_label: int):
    """Packed micro batches of ``maps`` in order, greedily filled to ``max_tokens`` tokens."""
    out, group, used = [], [], 0
    for item in maps:
        length = item[1].shape[0] + spec.num_levels + 1
        if group and used + length > max_tokens:
            out.append(group)
            group, used = [], 0
        group.append(item)
        used += length
    out.append(group)
    packed = []
    for group in out:
        seqs = encode_sequences(spec, [g for g, _, _ in group], [c for _, c, _ in group])
        packed.append(pack(spec, seqs, torch.tensor([lab for _, _, lab in group]), max_tokens, null_label,
                           row_length=max_tokens))
    return packed


def run_variant(options: dict, seed: int, train, held_out, steps: int, lr: float) -> float:
    torch.manual_seed(seed)
    config = GeneratorConfig(num_levels=2, num_subcodes=2, codebook_sizes=[CODEBOOK, CODEBOOK], grain_shape=list(GRID),
                             num_classes=CLASSES, dropout=0.0, class_dropout=0.1, **WIDTHS, **options)
    model = Generator(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    for step in range(steps):
        batch = train[step % len(train)]
        loss = model(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    model.config.valid_set_loss = True   # score every variant under the sampler's distribution
    total, tokens = 0.0, 0
    for batch in held_out:
        total -= float(model.log_likelihood(batch).sum())
        tokens += int((batch.doc >= 0).sum()) - int(batch.doc.max() + 1)   # predicted tokens: all but BOS
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--held-out-images", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = GeneratorConfig(num_levels=2, num_subcodes=2, codebook_sizes=[CODEBOOK, CODEBOOK], grain_shape=list(GRID),
                           num_classes=CLASSES).spec
    train = batches(spec, structured_maps(args.train_images, args.noise, seed=1), args.max_tokens, CLASSES)
    held_out = batches(spec, structured_maps(args.held_out_images, args.noise, seed=2), args.max_tokens, CLASSES)
    figures = {"steps": args.steps, "seeds": args.seeds, "max_tokens": args.max_tokens, "noise": args.noise,
               "train_batches": len(train), "held_out_images": args.held_out_images}
    for name in args.variants:
        values = [run_variant(VARIANTS[name], seed, train, held_out, args.steps, args.lr) for seed in range(args.seeds)]
        figures[f"{name}_nll_per_token"] = [round(v, 4) for v in values]
        figures[f"{name}_nll_mean"] = round(statistics.mean(values), 4)
        figures[f"{name}_nll_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
    targets = {}
    if "today" in args.variants and "valid_set" in args.variants:
        gain = figures["today_nll_mean"] - figures["valid_set_nll_mean"]
        targets["valid_set_nll_below_today"] = target(gain, ">= 0.0")
    emit("generator_nll", figures, targets)


if __name__ == "__main__":
    main()
