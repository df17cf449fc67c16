"""Stage 0: pack image folders, file lists, Parquet / Arrow image tables and tar shards into deterministic
WebDataset tar shards.

Writes OUT/{name}-{i:06d}.tar (+ .stats.json when complete), then manifest.json, sizes.json,
rejected.jsonl and classes.json. Input i goes to shard i // shard-size; shard j is written by node
j % num-nodes. Re-running the same command resumes (complete shards are skipped). With several nodes,
run `varitok shard --merge-manifests OUT` once every node has finished.

Examples:
  varitok shard --input photos/ --output shards/ --image-size 256 --workers 8
  varitok shard --input imagenet-parquet/ --output shards/ --workers 16          # image struct + label column
  varitok shard --input cc3m.parquet --output shards/ --captions --caption-column caption
  varitok shard --input saved_dataset/ --output shards/                           # datasets.save_to_disk folder
  varitok shard --input img2dataset-out/ --output reshards/ --shard-size 5000 --dedupe --captions
  varitok shard --input list.csv --output shards/ --captions --node-rank 0 --num-nodes 4
  varitok shard --merge-manifests shards/
"""
from __future__ import annotations

import argparse
import sys

from data.shards import FORMATS, RESIZE_MODES, ShardError, ShardOptions, merge_manifests, shard_images

_DEFAULTS = ShardOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="image folders (recursive; class-per-subfolder gives labels), image files, "
                        "file lists (.txt/.lst one path per line; .csv/.tsv/.parquet with a path column "
                        "and optional label and caption columns), Parquet / Arrow files with an image-bytes column "
                        "(binary, or a struct with 'bytes'), datasets.save_to_disk folders, tar shards (re-shard), "
                        "or folders of those")
    parser.add_argument("--output", metavar="DIR", help="output folder (created; resumable)")
    parser.add_argument("--name", default=_DEFAULTS.name, help="shard file prefix: NAME-000000.tar")
    parser.add_argument("--image-size", type=int, default=_DEFAULTS.image_size,
                        help="output side in pixels (square side for center-crop, shorter side for shorter-side)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default=_DEFAULTS.resize,
                        help="center-crop: square crop; shorter-side: keep aspect; none: keep pixels")
    parser.add_argument("--format", choices=FORMATS, default=_DEFAULTS.format, help="encoding inside the tars")
    parser.add_argument("--quality", type=int, default=_DEFAULTS.quality, help="jpg/webp quality (1-100)")
    parser.add_argument("--shard-size", type=int, default=_DEFAULTS.shard_size,
                        help="inputs per shard (rejected inputs make a shard smaller)")
    parser.add_argument("--min-size", type=int, default=_DEFAULTS.min_size,
                        help="reject images whose shorter side is below this many pixels")
    parser.add_argument("--max-pixels", type=int, default=_DEFAULTS.max_pixels,
                        help="reject images declaring more pixels than this (decompression bombs)")
    parser.add_argument("--max-input-bytes", type=int, default=_DEFAULTS.max_input_bytes,
                        help="reject input files larger than this, unread (default 256 MiB)")
    parser.add_argument("--image-column", default=None, metavar="NAME",
                        help="Parquet/Arrow: the image-bytes column (default: auto-detected); tars: member extension")
    parser.add_argument("--label-column", default=None, metavar="NAME",
                        help="the label column (default: label, cls, class, class_name); tars: member extension "
                        "(default cls, integers)")
    parser.add_argument("--caption-column", default=None, metavar="NAME",
                        help="the caption column (default: caption, text, txt); tars: member extension (default txt)")
    parser.add_argument("--workers", type=int, default=1, help="processes on this node (one shard per task)")
    parser.add_argument("--dedupe", action="store_true",
                        help="reject exact duplicates (same sha256); the first in sorted order is kept")
    parser.add_argument("--captions", action="store_true",
                        help="write <key>.txt from a caption column or a sibling <image>.txt")
    parser.add_argument("--node-rank", type=int, default=None,
                        help="this node's rank (default: $RANK, else $SLURM_PROCID, else 0)")
    parser.add_argument("--num-nodes", type=int, default=None,
                        help="number of nodes (default: $WORLD_SIZE, else $SLURM_NTASKS, else 1)")
    parser.add_argument("--merge-manifests", metavar="DIR", default=None,
                        help="only merge the per-shard stats of a finished multi-node run in DIR")


def _print_summary(summary: dict) -> None:
    reasons = ", ".join(f"{reason} {count}" for reason, count in summary["rejected_by_reason"].items()) or "none"
    rate = summary["processed_this_run"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    node = f"node {summary['node_rank']}/{summary['num_nodes']}: " if summary["num_nodes"] > 1 else ""
    print(f"varitok shard: {node}{summary['shards_mine']} of {summary['shards_total']} shards "
          f"({summary['shards_skipped']} already complete); written {summary['written']} of "
          f"{summary['inputs']} inputs; rejected: {reasons}; {summary['seconds']:.1f} s "
          f"({rate:.1f} images/s)")
    walked = summary.get("walk_skipped_by_reason") or {}
    if walked:
        print("varitok shard: not inputs (found while walking the folders): "
              + ", ".join(f"{reason} {count}" for reason, count in walked.items()))
    if not summary["merged"]:
        print("varitok shard: when every node is done, run `varitok shard --merge-manifests <output>`")


def run(args: argparse.Namespace) -> int:
    try:
        if args.merge_manifests is not None:
            if args.input:
                raise ShardError("--merge-manifests takes no --input; it only reads the output folder")
            manifest = merge_manifests(args.merge_manifests)
            print(f"varitok shard: merged {manifest['num_shards']} shards: {manifest['num_samples']} samples, "
                  f"{manifest['num_rejected']} rejected -> {args.merge_manifests}/manifest.json")
            return 0
        if not args.input or not args.output:
            raise ShardError("give --input PATH [PATH ...] and --output DIR (or --merge-manifests DIR)")
        options = ShardOptions(name=args.name, image_size=args.image_size, resize=args.resize,
                               format=args.format, quality=args.quality, shard_size=args.shard_size,
                               min_size=args.min_size, dedupe=args.dedupe, captions=args.captions,
                               max_pixels=args.max_pixels, max_input_bytes=args.max_input_bytes,
                               image_column=args.image_column, label_column=args.label_column,
                               caption_column=args.caption_column)
        summary = shard_images(args.input, args.output, options, workers=args.workers,
                               node_rank=args.node_rank, num_nodes=args.num_nodes)
    except ShardError as exc:
        print(f"varitok shard: error: {exc}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 0
