"""Code files (data.codes) against the reference layout: one int64 .npy per image per sub-codebook.

Synthetic corpus with the length distribution of a dual F8/F16 tokenizer at 256 px: a 16 x 16 grain
map, each region coarse (1 code) or fine (4 codes), so L = 256 + 3 * n_fine; the fine share per image
is drawn from Beta(2, 2) (mean L ~ 640). K sub-codebooks of 16384 entries, uniform random codes.

Figures: bytes per image (file sizes incl. headers; allocated filesystem blocks reported separately),
write throughput, and random-access read rate (uniform random indices; a read = one (L, K) int64 array,
as a training loader needs) of CodeReader over the whole corpus vs np.load of per-image .npy files
(a subset of --npy-rows images, so the .npy side holds fewer files than the corpus). Both sides read
from a warm page cache (files just written), one Python thread.

    .venv/bin/python -m benchmarks.codes [--rows 100000] [--npy-rows 5000] [--num-subcodes 2]

Each figure group is one ``*_figures(args, workdir) -> (figures, targets)`` function listed in
SECTIONS; tokenization throughput (issue 5) belongs in a further function added there by the
tokenize stage.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


from benchmarks.common import emit, median_time, target  # noqa: E402
from data.codes import CodeManifest, CodeReader, CodeWriter  # noqa: E402

GRAIN_SHAPE = (16, 16)
IDENTITY = {"config_hash": "benchmark", "weights_sha256": "synthetic"}


def synthetic_part(rows: int, first_key: int, num_subcodes: int, codebook_size: int, rng: np.random.Generator):
    """rows valid code maps: grains uint8 rows x 16 x 16 in {0, 1}, codes list of (L_i, K) uint16."""
    fine_share = rng.beta(2.0, 2.0, rows)
    grains = (rng.random((rows, *GRAIN_SHAPE)) < fine_share[:, None, None]).astype(np.uint8)
    lengths = (4 ** grains.astype(np.int64)).reshape(rows, -1).sum(1)
    flat = rng.integers(0, codebook_size, (int(lengths.sum()), num_subcodes), dtype=np.uint16)
    codes = np.split(flat, np.cumsum(lengths)[:-1])
    keys = [f"{first_key + i:09d}" for i in range(rows)]
    return keys, rng.integers(0, 1000, rows), np.zeros(rows, dtype=np.uint8), grains, codes


def write_code_dir(out: Path, parts: list[tuple], num_subcodes: int, codebook_size: int) -> None:
    manifest = CodeManifest.create(out, IDENTITY, 2, num_subcodes, [codebook_size] * num_subcodes, GRAIN_SHAPE)
    for index, part in enumerate(parts):
        with CodeWriter(out, index, manifest, source_shard=f"synthetic-{index:06d}.tar") as writer:
            writer.write(*part)


def disk_usage(paths: list[Path]) -> tuple[int, int]:
    """(sum of file sizes, sum of allocated bytes = st_blocks * 512)."""
    stats = [p.stat() for p in paths]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def build_corpus(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    rows_per_part = -(-args.rows // args.parts)
    parts = [synthetic_part(min(rows_per_part, args.rows - start), start, args.num_subcodes, args.codebook_size, rng)
             for start in range(0, args.rows, rows_per_part)]
    start = time.perf_counter()
    write_code_dir(workdir / "codes", parts, args.num_subcodes, args.codebook_size)
    write_seconds = time.perf_counter() - start
    keys, labels, views, grains, codes = (np.concatenate([p[i] for p in parts]) if i < 4 else
                                          [c for p in parts for c in p[4]] for i in range(5))
    npy = slice(0, args.npy_rows)
    write_code_dir(workdir / "codes-subset", [(keys[npy].tolist(), labels[npy], views[npy], grains[npy], codes[npy])],
                   args.num_subcodes, args.codebook_size)
    npy_dir = workdir / "npy"
    npy_dir.mkdir()
    for key, image_codes in zip(keys[npy], codes[npy]):
        for k in range(args.num_subcodes):
            np.save(npy_dir / f"{key}_{k}.npy", image_codes[:, k].astype(np.int64))
    return {"keys": keys, "codes": codes, "write_seconds": write_seconds}


def storage_figures(args: argparse.Namespace, workdir: Path, corpus: dict[str, Any]):
    subset_size, subset_alloc = disk_usage(sorted((workdir / "codes-subset").glob("part-*.arrow")))
    full_size, _ = disk_usage(sorted((workdir / "codes").glob("part-*.arrow")))
    npy_size, npy_alloc = disk_usage(sorted((workdir / "npy").glob("*.npy")))
    lengths = np.array([len(c) for c in corpus["codes"]])
    n = args.npy_rows
    ratio = (npy_size / n) / (subset_size / n)
    figures = {
        "rows": args.rows, "num_subcodes": args.num_subcodes, "codebook_size": args.codebook_size,
        "mean_codes_per_image": round(float(lengths.mean()), 1),
        "arrow_bytes_per_image": round(subset_size / n, 1),
        "arrow_bytes_per_image_full_corpus": round(full_size / args.rows, 1),
        "arrow_code_bytes_per_image": round(float(lengths[:n].mean()) * 2 * args.num_subcodes, 1),
        "arrow_grain_bytes_per_image": int(np.prod(GRAIN_SHAPE)),
        "npy_bytes_per_image": round(npy_size / n, 1),
        "storage_ratio": round(ratio, 3),
        "arrow_allocated_bytes_per_image": round(subset_alloc / n, 1),
        "npy_allocated_bytes_per_image": round(npy_alloc / n, 1),
        "storage_ratio_allocated": round(npy_alloc / subset_alloc, 3),
        "write_rows_per_s": round(args.rows / corpus["write_seconds"], 1),
        "storage_compared_on": f"the same first {n} images",
    }
    # "On disk" = allocated filesystem blocks (what `du` reports): the per-image .npy layout pays a block per
    # file. The apparent-size ratio (storage_ratio, ~3.7x: uint16 vs int64 is exactly 4x on the codes, and the
    # grain map the .npy layout does not store adds ~9%) is reported beside it.
    return figures, {"storage_ratio_on_disk": target(npy_alloc / subset_alloc, ">= 4.0")}


def read_figures(args: argparse.Namespace, workdir: Path, corpus: dict[str, Any]):
    reader = CodeReader(workdir / "codes")
    rng = np.random.default_rng(args.seed + 1)
    arrow_indices = rng.integers(0, len(reader), args.reads).tolist()
    npy_files = [[workdir / "npy" / f"{key}_{k}.npy" for k in range(args.num_subcodes)]
                 for key in corpus["keys"][: args.npy_rows]]
    npy_indices = rng.integers(0, args.npy_rows, args.npy_reads).tolist()

    def read_arrow() -> None:
        for i in arrow_indices:
            reader[i].codes.astype(np.int64)

    def read_arrow_views() -> None:
        for i in arrow_indices:
            reader[i]

    def read_npy() -> None:
        for i in npy_indices:
            np.stack([np.load(path) for path in npy_files[i]], axis=1)

    probe = arrow_indices[0] % args.npy_rows
    assert (reader[probe].codes.astype(np.int64)
            == np.stack([np.load(p) for p in npy_files[probe]], axis=1)).all(), "layouts disagree"
    arrow_rate, arrow_cpu_rate = read_rates(read_arrow, args.reads, args.repeats)
    view_rate, _ = read_rates(read_arrow_views, args.reads, args.repeats)
    npy_rate, npy_cpu_rate = read_rates(read_npy, args.npy_reads, args.repeats)
    figures = {"arrow_sequences_per_s": round(arrow_rate), "arrow_zero_copy_records_per_s": round(view_rate),
               "npy_sequences_per_s": round(npy_rate), "random_access_speedup": round(arrow_rate / npy_rate, 2),
               "arrow_sequences_per_cpu_s": round(arrow_cpu_rate), "npy_sequences_per_cpu_s": round(npy_cpu_rate),
               "load_average_1min": round(os.getloadavg()[0], 2),
               "npy_files": args.npy_rows * args.num_subcodes,
               "read_note": "uniform random indices over all rows (arrow) / the npy subset; warm page cache; "
                            "one thread; a sequence = (L, K) int64 array; zero-copy = the "
                            "CodeRecord of memory-mapped views only; *_per_s from wall-clock medians, "
                            "*_per_cpu_s from process CPU time medians (less sensitive to other load)"}
    return figures, {"random_access_speedup": target(arrow_rate / npy_rate, ">= 20.0"),
                     "arrow_sequences_per_s": target(arrow_rate, ">= 100000")}


def read_rates(fn: Callable[[], None], count: int, repeats: int) -> tuple[float, float]:
    """(items per wall-clock second, items per process-CPU second), medians over ``repeats`` runs."""
    wall = median_time(fn, repeats=repeats, warmup=1)
    cpu = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        cpu.append(time.process_time() - start)
    return count / wall, count / float(np.median(cpu))


SECTIONS = [storage_figures, read_figures]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the Arrow corpus")
    parser.add_argument("--parts", type=int, default=10, help="part files the corpus is split into")
    parser.add_argument("--npy-rows", type=int, default=5_000, help="images also written as per-image .npy")
    parser.add_argument("--num-subcodes", type=int, default=2, help="K")
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--reads", type=int, default=50_000, help="random Arrow reads per timing")
    parser.add_argument("--npy-reads", type=int, default=2_000, help="random .npy reads per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the temporary corpora go (default: system temp)")
    args = parser.parse_args()
    if not 0 < args.npy_rows <= args.rows:
        parser.error("--npy-rows must be in 1..--rows")
    figures, targets = {}, {}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="varitok-bench-codes-") as tmp:
        corpus = build_corpus(args, Path(tmp))
        for section in SECTIONS:
            section_figures, section_targets = section(args, Path(tmp), corpus)
            figures.update(section_figures)
            targets.update(section_targets)
    emit("codes", figures, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
