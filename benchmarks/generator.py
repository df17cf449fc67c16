"""Generator throughput: packed attention vs a dense mask, packed vs padded training, KV-cached vs recompute sampling.

Attention (``attention`` section): one packed row of ``--row-length`` slots (8192) filled with sequences of the
base length distribution (16 x 16 dual grid, fine share ~ Beta(4, 4): about 12 sequences per row), a model
of mid widths (dim 512, 8 heads; ``--attn-depth`` position + content layers), one training step (forward +
backward) with the document mask (no dense mask: per-sequence SDPA on the CPU, FlexAttention on a GPU) vs
the dense ``[R, 1, S, S]`` boolean mask through SDPA, on the same batch; the losses must agree to 1e-4.
The two steps take turns (document, dense, document, dense, ...: ``--repeats`` rounds, after one untimed
document step) and every figure is the median of its runs, in wall and in CPU seconds (``time.process_time``);
the target uses CPU seconds on the CPU at one torch thread (the work of one step, whatever else runs on the
machine; ``*_measure`` in the record), wall seconds elsewhere.
Attention memory: bytes kept for backward by the attention cores of both stacks (every tensor saved by their
``scaled_dot_product_attention`` and document-mask kernel calls, each once, measured with
``torch.autograd.graph.saved_tensors_hooks``: the dense path's float mask bias, q/k/v/output, log-sum-exp) plus
the mask tensor itself; also the whole first layer's saved bytes (projections and RoPE included, the same in
both paths). Also the no-gradient forward (compiled FlexAttention on the CPU) vs the dense mask.

Training: the same variable-length batch (dual granularity, 16 x 16 coarse grid, fine share of the
regions ~ Beta(a, a) around 0.5, so about 640 codes per image) trained forward + backward either
packed into rows (block-diagonal mask) or in the reference layout, where the coarse and fine segments
of every image are each padded to their maximum (256 and 1024 codes). Figure: real tokens / s (wall and CPU;
the two layouts take turns as above, the target on the same measure).

Sampling: the first ``--steps`` steps of the same seeded sampling run, with the KV cache and with the
reference decoder that re-runs both stacks over the whole prefix at every step, at the tiny widths and at a
mid config of about 50M parameters (both on the 16 x 16 dual grid, sequences of 256 - 1024 codes).

    flock /tmp/varitok-bench.lock .venv/bin/python -m benchmarks.generator [--device cpu] [--sections ...]
"""
from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import emit, interleaved_times, median_time, target  # noqa: E402  (first: it sets the process env before torch loads)
import torch  # noqa: E402
from models.generator import Generator, GeneratorConfig, PackedBatch, encode_sequences, generate_tokens, pack
from models.generator.attention import DocumentMask

GRID = [16, 16]
TINY_WIDTHS = dict(dim=128, heads=4, position_depth=2, content_depth=4, head_dim=64, head_depth=1, head_heads=2)
MID_WIDTHS = dict(dim=512, heads=8, position_depth=4, content_depth=10, head_dim=256, head_depth=1, head_heads=4)


def config(widths: dict, codebook: int) -> GeneratorConfig:
    return GeneratorConfig(num_levels=2, num_subcodes=2, codebook_sizes=[codebook, codebook], grain_shape=GRID,
                           num_classes=1000, dropout=0.0, class_dropout=0.1, **widths)


def realistic_maps(count: int, beta: float, codebook: int, seed: int):
    """Dual-granularity code maps whose fine share of the regions is Beta(beta, beta)-distributed."""
    gen = torch.Generator().manual_seed(seed)
    regions = GRID[0] * GRID[1]
    share = torch.distributions.Beta(beta, beta).sample((count,))
    grains, codes = [], []
    for fine in (share * regions).round().long().tolist():
        order = torch.randperm(regions, generator=gen)
        grain = torch.zeros(regions, dtype=torch.long)
        grain[order[:fine]] = 1
        grains.append(grain.view(*GRID))
        length = (regions - fine) + 4 * fine
        codes.append(torch.randint(0, codebook, (length, 2), generator=gen))
    return grains, codes


def padded_in_the_middle(packed: PackedBatch, spec) -> PackedBatch:
    """Reference layout: one image per row, ``BOS | coarse codes padded to 256 | EOL | fine padded to 1024 | END``.

    Padding slots (``doc = -1``, excluded from the loss) sit in the middle of the rows and are attended
    to, as in the reference implementation.
    """
    valid = packed.valid
    doc, index = packed.doc[valid], packed.index[valid]
    position, content, label = packed.position[valid], packed.content[valid], packed.label[valid]
    coarse_cells, fine_cells = spec.level_sizes  # dual granularity
    is_coarse = position < coarse_cells
    coarse_count = torch.zeros(int(doc.max()) + 1, dtype=torch.long).scatter_add(0, doc, is_coarse.long())[doc]
    slot = torch.where(position == spec.end_id(0), torch.full_like(index, 1 + coarse_cells), index)
    fine = (position >= coarse_cells) & (position < spec.num_cells)
    slot = torch.where(fine, index - coarse_count + coarse_cells, slot)  # fine code j sits at index 2 + n0 + j
    slot = torch.where(position == spec.end, torch.full_like(index, 2 + coarse_cells + fine_cells), slot)
    rows, width = int(doc.max()) + 1, 3 + coarse_cells + fine_cells
    out = PackedBatch(torch.full((rows, width), spec.end, dtype=torch.long),
                      spec.none_content.repeat(rows, width, 1), torch.zeros((rows, width), dtype=torch.long),
                      torch.full((rows, width), -1, dtype=torch.long), torch.arange(width).repeat(rows, 1))
    out.position[doc, slot], out.content[doc, slot], out.label[doc, slot], out.doc[doc, slot] = \
        position, content, label, doc
    return out


def causal_mask(batch: PackedBatch) -> torch.Tensor:
    width = batch.doc.shape[1]
    return torch.ones(width, width, dtype=torch.bool, device=batch.doc.device).tril().expand(batch.doc.shape[0], 1,
                                                                                           width, width)


def timed_pair(fns: dict, args, warmup: dict) -> tuple[dict, str]:
    """Interleaved timing (A B A B, ``--repeats`` rounds) of two steps: per-name median wall and CPU seconds,
    and the measure the targets use: CPU seconds on the CPU at one torch thread (the work of one step, not
    the time other processes hold the cores), wall seconds elsewhere."""
    times = interleaved_times(fns, rounds=args.repeats, warmup=warmup, sync=args.device != "cpu")
    measure = "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"
    medians = {name: {kind: statistics.median(values) for kind, values in runs.items()} for name, runs in times.items()}
    return {"times": times, "medians": medians}, measure


def ratio_figures(prefix: str, timing: dict, slow: str, fast: str) -> dict:
    """``slow / fast`` of the median wall and CPU seconds, and of every round (``*_per_round``)."""
    times, medians = timing["times"], timing["medians"]
    figures = {}
    for kind in ("wall", "cpu"):
        figures[f"{prefix}_{kind}"] = round(medians[slow][kind] / medians[fast][kind], 3)
        figures[f"{prefix}_{kind}_per_round"] = [round(a / b, 3) for a, b in zip(times[slow][kind], times[fast][kind])]
    return figures


def bench_training(args) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = Generator(config(TINY_WIDTHS, args.codebook)).to(args.device).train()
    spec = model.spec
    grains, codes = realistic_maps(args.batch, args.beta, args.codebook, seed=1)
    labels = torch.randint(0, 1000, (args.batch,))
    packed = pack(spec, encode_sequences(spec, grains, codes), labels, args.max_tokens, model.config.null_class)
    padded = padded_in_the_middle(packed, spec)
    assert padded.num_tokens == packed.num_tokens
    layouts = {"packed": (packed.to(args.device), None),
               "padded": (padded.to(args.device), causal_mask(padded.to(args.device)))}
    figures = {"train_model_params_M": round(model.num_parameters() / 1e6, 2), "train_sequences": args.batch,
               "train_real_tokens": packed.num_tokens, "mean_codes_per_image": round(sum(c.shape[0] for c in codes)
                                                                                     / len(codes), 1)}
    steps = {}
    for name, (batch, mask) in layouts.items():
        def step(batch=batch, mask=mask):
            model.zero_grad(set_to_none=True)
            model(batch, mask)["loss"].backward()
        steps[name] = step
        figures[f"{name}_slots"] = batch.doc.numel()
        figures[f"{name}_efficiency"] = round(batch.efficiency, 4)
    timing, measure = timed_pair(steps, args, warmup={"packed": 1, "padded": 1})
    for name, (batch, _) in layouts.items():
        figures[f"{name}_train_tokens_per_s"] = round(batch.num_tokens / timing["medians"][name]["wall"], 1)
        figures[f"{name}_train_tokens_per_cpu_s"] = round(batch.num_tokens / timing["medians"][name]["cpu"], 1)
    figures.update(ratio_figures("train_speedup_packed_vs_padded", timing, "padded", "packed"))
    speedup = figures[f"train_speedup_packed_vs_padded_{measure}"]
    figures["train_speedup_packed_vs_padded"] = speedup
    figures["train_speedup_measure"] = measure
    return figures, {"train_packed_vs_padded": target(speedup, ">= 1.5")}


def bench_sampling(args, name: str, widths: dict, repeats_recompute: int) -> dict:
    torch.manual_seed(0)
    model = Generator(config(widths, args.codebook)).to(args.device).eval()
    labels = torch.arange(args.sample_batch) % 1000

    def run(use_cache: bool):
        gen = torch.Generator(device=args.device).manual_seed(0)
        return generate_tokens(model, labels, generator=gen, use_cache=use_cache, max_steps=args.steps)

    same = torch.equal(run(True).position, run(False).position)
    sync = args.device != "cpu"
    cached = median_time(lambda: run(True), repeats=args.repeats, warmup=1, sync=sync)
    recompute = median_time(lambda: run(False), repeats=repeats_recompute, warmup=0, sync=sync)
    return {f"{name}_params_M": round(model.num_parameters() / 1e6, 2),
            f"{name}_cached_steps_per_s": round(args.steps / cached, 2),
            f"{name}_recompute_steps_per_s": round(args.steps / recompute, 2),
            f"{name}_sampling_speedup": round(recompute / cached, 3),
            f"{name}_same_tokens": same}


def saved_bytes(model: Generator, batch: PackedBatch, mask, layer_only: bool) -> int:
    """Bytes kept for backward during one training step (each saved tensor once, by data pointer and shape).

    ``layer_only``: everything the first position-stack attention layer saves (its projections included);
    else what the attention cores of both stacks save (their ``scaled_dot_product_attention`` and
    ``DocumentMask.attend`` calls; the factorized head's own small attention is the same in both paths and
    left out).
    """
    seen: dict[tuple, int] = {}
    inside = [False]

    def pack_hook(tensor):
        seen[(tensor.data_ptr(), tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor

    def recorded(function, flag_only: bool = False):
        def call(*args, **kwargs):
            if flag_only:
                inside[0] = True
                try:
                    return function(*args, **kwargs)
                finally:
                    inside[0] = False
            if not inside[0] and not layer_only:
                return function(*args, **kwargs)
            with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda tensor: tensor):
                return function(*args, **kwargs)
        return call

    sdpa, attend = torch.nn.functional.scaled_dot_product_attention, DocumentMask.attend
    patched = [model.position_stack.blocks[0].attn] if layer_only else [model.position_stack, model.content_stack]
    for module in patched:
        module.forward = recorded(module.forward, flag_only=not layer_only)
    if not layer_only:   # the cores: SDPA (dense mask) and the document mask's kernels
        torch.nn.functional.scaled_dot_product_attention = recorded(sdpa)
        DocumentMask.attend = recorded(attend)
    try:
        model(batch, mask)["loss"].backward()
    finally:
        torch.nn.functional.scaled_dot_product_attention, DocumentMask.attend = sdpa, attend
        for module in patched:
            module.__dict__.pop("forward", None)
    weights = {(p.data_ptr(), tuple(p.shape)) for p in model.parameters()}
    return sum(size for key, size in seen.items() if key not in weights)


def bench_attention(args) -> tuple[dict, dict]:
    torch.manual_seed(0)
    widths = dict(MID_WIDTHS, position_depth=args.attn_depth[0], content_depth=args.attn_depth[1])
    model = Generator(config(widths, args.codebook)).to(args.device).train()
    model.config.class_dropout = 0.0   # the same labels in both paths
    spec = model.spec
    grains, codes = realistic_maps(64, args.beta, args.codebook, seed=2)
    lengths = [c.shape[0] + spec.num_levels + 1 for c in codes]
    count = next(i for i in range(1, len(lengths) + 1) if sum(lengths[:i + 1]) > args.row_length)
    labels = torch.randint(0, 1000, (count,))
    seqs = encode_sequences(spec, grains[:count], codes[:count])
    batch = pack(spec, seqs, labels, args.row_length, model.config.null_class, row_length=args.row_length)
    batch = batch.to(args.device)
    dense = batch.attention_mask()
    layers = args.attn_depth[0] + args.attn_depth[1]
    figures = {"attn_row_length": args.row_length, "attn_sequences_per_row": count,
               "attn_real_tokens": batch.num_tokens, "attn_layers": layers,
               "attn_model_params_M": round(model.num_parameters() / 1e6, 2)}
    masks = {"document": None, "dense": dense}
    losses = {}

    def step(name: str) -> None:
        model.zero_grad(set_to_none=True)
        loss = model(batch, masks[name])["loss"]
        loss.backward()
        losses[name] = loss.item()

    timing, measure = timed_pair({name: lambda name=name: step(name) for name in masks}, args,
                                 warmup={"document": 1, "dense": 0})
    for name, mask in masks.items():
        figures[f"attn_{name}_step_s"] = round(timing["medians"][name]["wall"], 3)
        figures[f"attn_{name}_step_cpu_s"] = round(timing["medians"][name]["cpu"], 3)
    for name, mask in masks.items():
        core = saved_bytes(model, batch, mask, layer_only=False)
        figures[f"attn_{name}_layer_saved_MiB"] = round(saved_bytes(model, batch, mask, layer_only=True) / 2 ** 20, 2)
        mask_bytes = (dense.numel() * dense.element_size() if name == "dense" else
                      batch.sequence_spans.numel() * batch.sequence_spans.element_size())
        figures[f"attn_{name}_core_saved_MiB_per_layer"] = round(core / layers / 2 ** 20, 2)
        figures[f"attn_{name}_mask_MiB"] = round(mask_bytes / 2 ** 20, 2)
        figures[f"attn_{name}_memory_MiB"] = round((core + mask_bytes) / 2 ** 20, 1)
        model.eval()
        with torch.no_grad():
            started = time.perf_counter()
            model(batch, mask)                       # first call: compiles FlexAttention for the document mask
            first = time.perf_counter() - started
            figures[f"attn_{name}_eval_forward_s"] = round(median_time(lambda: model(batch, mask), repeats=1,
                                                                       warmup=0, sync=args.device != "cpu"), 3)
            if name == "document":
                figures["attn_document_eval_first_call_s"] = round(first, 1)
        model.train()
    figures["attn_loss_document"], figures["attn_loss_dense"] = round(losses["document"], 6), round(losses["dense"], 6)
    loss_diff = abs(losses["document"] - losses["dense"])
    figures.update(ratio_figures("attn_step_speedup", timing, "dense", "document"))
    speedup = figures[f"attn_step_speedup_{measure}"]
    memory = figures["attn_document_memory_MiB"] / figures["attn_dense_memory_MiB"]
    figures.update(attn_loss_abs_diff=loss_diff, attn_step_speedup=speedup, attn_step_speedup_measure=measure,
                   attn_memory_ratio=round(memory, 4),
                   attn_eval_forward_speedup=round(figures["attn_dense_eval_forward_s"]
                                                   / figures["attn_document_eval_forward_s"], 3))
    return figures, {"attention_step_speedup_vs_dense_mask": target(speedup, ">= 2.5"),
                     "attention_memory_vs_dense_mask": target(memory, "<= 0.25"),
                     "attention_same_loss_as_dense_mask": target(loss_diff, "<= 1e-4")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="images in the training batch")
    parser.add_argument("--max-tokens", type=int, default=1536, help="slots per packed row")
    parser.add_argument("--beta", type=float, default=4.0, help="fine share ~ Beta(beta, beta)")
    parser.add_argument("--codebook", type=int, default=1024, help="entries per sub-codebook (K = 2)")
    parser.add_argument("--steps", type=int, default=256, help="sampling steps timed")
    parser.add_argument("--sample-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs; the two training steps compared in each section take turns, this many "
                             "rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--sections", nargs="+", default=["attention", "train", "sampling"],
                        choices=["attention", "train", "sampling"])
    parser.add_argument("--row-length", type=int, default=8192, help="attention section: slots of the packed row")
    parser.add_argument("--attn-depth", type=int, nargs=2, default=[2, 4], metavar=("POSITION", "CONTENT"),
                        help="attention section: layers of the two stacks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures, targets = {"device": args.device}, {}
    if "attention" in args.sections:
        attention_figures, attention_targets = bench_attention(args)
        figures.update(attention_figures)
        targets.update(attention_targets)
    if "train" in args.sections:
        train_figures, train_targets = bench_training(args)
        figures.update(train_figures)
        targets.update(train_targets)
    if "sampling" in args.sections:
        figures.update(bench_sampling(args, "tiny", TINY_WIDTHS, repeats_recompute=args.repeats))
        mid = bench_sampling(args, "mid", MID_WIDTHS, repeats_recompute=1)
        figures.update(mid)
        figures.update({"sampling_steps": args.steps, "sample_batch": args.sample_batch})
        targets["sampling_kv_cache_vs_recompute_mid"] = target(mid["mid_sampling_speedup"], ">= 5.0")
    emit("generator", figures, targets)


if __name__ == "__main__":
    main()
