"""Check outputs against their manifests: `varitok verify codes DIR [--shards SPEC] [--views N]`.

Without --shards: every recorded part is present, of its recorded size, readable, with the schema, row
count and value ranges the manifest implies (data.codes.verify_codes). With --shards: also that every
part i was made from shard i of the sorted spec, and that every key of those shards is present exactly
once per view, except the samples listed as skipped in ``DIR/skipped/``. Exit 0 when everything
matches, 1 with a report line per mismatch otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from data.codes import CodeManifest, VerifyReport, verify_codes
from data.codes.reader import listed
from data.tar import expand_shard_spec, shard_keys
from pipeline.tokenize import VIEW_COUNTS, read_skipped


def verify_code_dir(out_dir: str | os.PathLike, shards: Optional[str] = None,
                    views: Optional[int] = None) -> VerifyReport:
    """verify_codes plus, with ``shards``, part <-> shard and key coverage checks (see the module doc).

    views: distinct views expected per key (default: from the views mode recorded in the manifest).
    """
    if shards is None:
        return verify_codes(out_dir, views_per_key=views)
    try:
        manifest = CodeManifest.load(out_dir)
    except (OSError, ValueError) as exc:
        return VerifyReport(str(out_dir), problems=[f"manifest unreadable: {exc}"])
    shard_list = sorted(expand_shard_spec(shards))
    parts = manifest.parts
    if views is None:
        views = VIEW_COUNTS.get(manifest.tokenizer_identity.get("views"))
    skipped = read_skipped(out_dir, [i for i in parts if i < len(shard_list)])
    skipped_keys = {entry["key"] for entry in skipped}
    expected = [key for shard in shard_list for key in shard_keys(shard) if key not in skipped_keys]
    report = verify_codes(out_dir, expected_keys=expected, views_per_key=views)
    missing_parts = [i for i in range(len(shard_list)) if i not in parts]
    if missing_parts:
        report.problems.append(f"{len(missing_parts)} of {len(shard_list)} shards have no complete part "
                               f"(shard indices {listed(missing_parts)}): re-run `varitok tokenize` to finish them")
    extra_parts = [i for i in parts if i >= len(shard_list)]
    if extra_parts:
        report.problems.append(f"parts {listed(extra_parts)} lie beyond the {len(shard_list)} shards of --shards")
    wrong_source = [f"part {i} from {parts[i]['source_shard']} (shard {i} is {os.path.basename(shard_list[i])})"
                    for i in sorted(parts) if i < len(shard_list)
                    and parts[i]["source_shard"] not in ("", os.path.basename(shard_list[i]))]
    if wrong_source:
        report.problems.append("parts made from other shards than --shards lists: " + listed(wrong_source))
    if skipped:
        report.notes.append(f"{len(skipped)} sample(s) skipped at tokenization (listed in "
                            f"{Path(out_dir) / 'skipped'}): {listed([e['key'] or e['shard'] for e in skipped])}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="<what>")
    codes = sub.add_parser("codes", help="code files written by `varitok tokenize`")
    codes.add_argument("dir", help="code directory")
    codes.add_argument("--shards", default=None, help="the input shard spec: check every key is present per view")
    codes.add_argument("--views", type=int, default=None,
                       help="distinct views expected per key (default: from the manifest's views mode)")


def run(args: argparse.Namespace) -> int:
    try:
        report = verify_code_dir(args.dir, args.shards, args.views)
    except (FileNotFoundError, ValueError) as exc:
        print(f"varitok verify codes: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1
