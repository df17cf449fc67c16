"""Statistics of outputs: `varitok stats codes DIR [--png PATH] [--json PATH]`.

Prints totals, bytes per image, codes per image, the share of regions and of codes per granularity
level, codebook usage and perplexity per sub-codebook and the skipped samples; writes a PNG histogram of
sequence lengths L (default ``DIR/length_histogram.png``) and, with --json, the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from data.codes import CodeReader, code_stats
from pipeline.tokenize import read_skipped
from pipeline.visual import plot_histogram


def codes_stats(out_dir: str | os.PathLike, png: Optional[str | os.PathLike] = None,
                bins: int = 50) -> dict[str, Any]:
    """code_stats plus ``skipped`` (samples skipped at tokenization); writes the length histogram to ``png``."""
    stats = code_stats(out_dir, bins=bins)
    stats["skipped"] = len(read_skipped(out_dir))
    if png:
        lengths = CodeReader(out_dir).lengths
        plot_histogram(lengths, png, f"sequence lengths ({len(lengths)} rows)", "codes per image (L)", bins=bins)
        stats["png"] = str(png)
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """Human-readable lines of a codes_stats dict."""
    per = stats["codes_per_image"]
    lines = [f"parts {stats['parts']}, rows {stats['rows']}, codes {stats['codes']}, "
             f"{stats['file_bytes'] / 2 ** 20:.2f} MiB ({stats['bytes_per_image']:.1f} bytes per row)",
             f"codes per row: mean {per['mean']:.2f}, min {per['min']}, max {per['max']}",
             "level:        " + "  ".join(f"{g:>7d}" for g in range(len(stats["region_share"]))),
             "region share: " + "  ".join(f"{s:7.2%}" for s in stats["region_share"]),
             "code share:   " + "  ".join(f"{s:7.2%}" for s in stats["code_share"])]
    for k, (usage, perplexity) in enumerate(zip(stats["codebook_usage"], stats["codebook_perplexity"])):
        lines.append(f"sub-codebook {k}: {usage:.1%} of entries used, perplexity {perplexity:.1f}")
    lines.append(f"skipped samples: {stats['skipped']}")
    if "png" in stats:
        lines.append(f"length histogram: {stats['png']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="<what>")
    codes = sub.add_parser("codes", help="code files written by `varitok tokenize`")
    codes.add_argument("dir", help="code directory")
    codes.add_argument("--png", default=None, help="length histogram PNG (default: DIR/length_histogram.png)")
    codes.add_argument("--json", default=None, help="also write the statistics as JSON here")
    codes.add_argument("--bins", type=int, default=50, help="histogram bins")


def run(args: argparse.Namespace) -> int:
    png = args.png or str(Path(args.dir) / "length_histogram.png")
    try:
        stats = codes_stats(args.dir, png, bins=args.bins)
    except (FileNotFoundError, ValueError) as exc:
        print(f"varitok stats codes: error: {exc}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(stats, indent=1) + "\n")
    return 0
