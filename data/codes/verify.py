"""verify_codes (manifest vs files, value checks, key coverage) and code_stats (corpus statistics)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from data.codes.format import PART_NAME_RE
from data.codes.manifest import CodeManifest
from data.codes.reader import (CodeReader, block_problems, listed, open_part, part_digest_problem,
                               part_file_problem)


@dataclass
class VerifyReport:
    """problems: readable lines, one per mismatch (empty = ok); notes: harmless findings (leftover temps)."""
    out_dir: str
    parts: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"{'OK' if self.ok else 'FAILED'}: {self.out_dir}: {self.parts} parts, {self.rows} rows checked"
                + ("" if self.ok else f", {len(self.problems)} problem(s)"))
        return "\n".join([head, *(f"  problem: {p}" for p in self.problems), *(f"  note: {n}" for n in self.notes)])


def _check_keys(keys: np.ndarray, views: np.ndarray, expected_keys: Iterable[str],
                views_per_key: int | None) -> list[str]:
    problems = []
    unique_keys, key_ids = np.unique(keys, return_inverse=True) if len(keys) else (np.zeros(0, object), keys)
    pairs, pair_counts = np.unique(key_ids.astype(np.int64) * 256 + views, return_counts=True)
    if (pair_counts > 1).any():
        dup = pairs[pair_counts > 1]
        problems.append("duplicate (key, view) rows: " + listed(
            f"{unique_keys[p // 256]}/view {p % 256}" for p in dup.tolist()))
    expected = np.unique(np.asarray(list(expected_keys), dtype=object))
    missing = np.setdiff1d(expected, unique_keys)
    if missing.size:
        problems.append(f"{missing.size} expected key(s) missing: {listed(missing.tolist())}")
    unexpected = np.setdiff1d(unique_keys, expected)
    if unexpected.size:
        problems.append(f"{unexpected.size} key(s) not among the expected keys: {listed(unexpected.tolist())}")
    wanted = views_per_key if views_per_key is not None else len(np.unique(views))
    views_found = np.bincount(pairs // 256, minlength=len(unique_keys))
    short = views_found != wanted
    if short.any():
        problems.append(f"{int(short.sum())} key(s) do not have exactly {wanted} distinct views: "
                        + listed(f"{key} ({count})" for key, count in zip(unique_keys[short], views_found[short])))
    return problems


def verify_codes(out_dir: str | os.PathLike, expected_keys: Iterable[str] | None = None,
                 views_per_key: int | None = None) -> VerifyReport:
    """Checks a code directory; never raises on bad data, every mismatch becomes a problem line.

    Checks: manifest readable; every recorded part present, of the recorded size and sha256, readable
    (Arrow's full validation), with the expected schema and row count; no unrecorded part files; totals;
    non-null columns; code list length == L * K; grain maps of grain_shape with levels < G and
    L == sum 4**grain; codes < codebook sizes.
    With expected_keys: every expected key present, no other key, no duplicate (key, view), and each key
    with exactly views_per_key distinct views (default: the number of distinct view ids in the corpus).
    """
    out = Path(out_dir)
    report = VerifyReport(str(out))
    try:
        manifest = CodeManifest.load(out)
    except (OSError, ValueError, KeyError) as error:
        report.problems.append(f"manifest unreadable: {error}")
        return report
    parts = manifest.parts
    recorded = {entry["file"] for entry in parts.values()}
    on_disk = {p.name for p in out.iterdir() if PART_NAME_RE.match(p.name)}
    for name in sorted(on_disk - recorded):
        report.problems.append(f"{name}: part file not recorded in the manifest (an interrupted write? re-run "
                               f"tokenize, or delete it)")
    temps = sorted(p.name for p in out.glob(".part-*.arrow.*.tmp"))
    if temps:
        report.notes.append(f"{len(temps)} leftover temp file(s) from interrupted writers: {listed(temps)}")
    totals = manifest.totals
    if totals["rows"] != sum(e["rows"] for e in parts.values()) or totals["parts"] != len(parts):
        report.problems.append(f"manifest totals {totals} disagree with its part list")
    all_keys, all_views = [], []
    for index, entry in sorted(parts.items()):
        name, path = entry["file"], out / entry["file"]
        problem = part_file_problem(path, entry)
        if problem:
            report.problems.append(problem)
            continue
        problem = part_digest_problem(path, entry)
        if problem:
            report.problems.append(problem)  # and go on: the value checks below say what changed
        try:
            _file, blocks = open_part(path, manifest)
        except (OSError, ValueError, pa.ArrowException) as error:
            report.problems.append(f"{name}: unreadable: {error}")
            continue
        rows = sum(b.num_rows for b in blocks)
        if rows != entry["rows"]:
            report.problems.append(f"{name}: {rows} rows but {entry['rows']} recorded")
        row0 = 0
        for block in blocks:
            report.problems.extend(block_problems(block, manifest, name, row0))
            row0 += block.num_rows
            if expected_keys is not None:
                all_keys.append(block.keys())
                all_views.append(block.views.astype(np.int64))
        report.parts += 1
        report.rows += rows
    if expected_keys is not None:
        keys = np.concatenate(all_keys) if all_keys else np.zeros(0, dtype=object)
        views = np.concatenate(all_views) if all_views else np.zeros(0, dtype=np.int64)
        report.problems.extend(_check_keys(keys, views, expected_keys, views_per_key))
    return report


def code_stats(out_dir: str | os.PathLike, bins: int = 50) -> dict[str, Any]:
    """Statistics of the complete parts of a code directory (JSON-ready).

    Returns parts, rows, codes (sum of L), file_bytes (part files only), bytes_per_image,
    codes_per_image {mean, min, max}, region_share[g] (share of grain-map regions at level g),
    code_share[g] (share of code positions at level g), codebook_usage[k] (fraction of sub-codebook k's
    entries used at least once), codebook_perplexity[k] (exp of the entropy of sub-code k's usage), and
    length_histogram {counts, edges} of L with ``bins`` bins.
    """
    reader = CodeReader(out_dir)
    g, sizes = reader.num_levels, reader.codebook_sizes
    region_counts = np.zeros(g, dtype=np.int64)
    usage = [np.zeros(size, dtype=np.int64) for size in sizes]
    for block in reader.blocks:
        grains = block.grain_data[block.grain_offsets[0]: block.grain_offsets[-1]]
        region_counts += np.bincount(grains, minlength=g)[:g]
        values = block.code_values[block.code_offsets[0]: block.code_offsets[-1]].reshape(-1, reader.num_subcodes)
        for k, size in enumerate(sizes):
            usage[k] += np.bincount(values[:, k], minlength=size)[:size]
    rows, lengths = len(reader), reader.lengths
    file_bytes = sum((reader.out_dir / reader.manifest.parts[i]["file"]).stat().st_size for i in reader.part_rows)
    codes_per_level = region_counts * (4 ** np.arange(g))
    counts, edges = reader.length_histogram(bins)

    def share(counts: np.ndarray) -> list[float]:
        return (counts / max(1, counts.sum())).tolist()

    def perplexity(counts: np.ndarray) -> float:
        p = counts[counts > 0] / max(1, counts.sum())
        return float(np.exp(-(p * np.log(p)).sum()))

    return {
        "parts": len(reader.part_rows), "rows": rows, "codes": int(lengths.sum()), "file_bytes": file_bytes,
        "bytes_per_image": file_bytes / max(1, rows),
        "codes_per_image": {"mean": float(lengths.mean()) if rows else 0.0,
                            "min": int(lengths.min()) if rows else 0, "max": int(lengths.max()) if rows else 0},
        "region_share": share(region_counts), "code_share": share(codes_per_level),
        "codebook_usage": [float((u > 0).mean()) for u in usage],
        "codebook_perplexity": [perplexity(u) for u in usage],
        "length_histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
    }
