"""The ``varitok`` command: one subcommand per stage.

Each stage lives in its own module under ``pipeline/`` exposing ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand is used, so ``varitok --help``
is instant and a broken optional dependency of one stage does not take down the others.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Optional, Sequence

from pipeline.process_env import apply_process_env_defaults

# name -> (module, one-line help). Order is the pipeline order shown by `varitok --help`.
STAGES: dict[str, tuple[str, str]] = {
    "shard": ("pipeline.shard", "stage 0: pack image folders / file lists into WebDataset tar shards"),
    "calibrate-entropy": ("pipeline.calibrate", "entropy-router thresholds from shards (JSON for the tokenizer)"),
    "train-tokenizer": ("pipeline.train_tokenizer", "stage 1: train the DQ x FQ VQ-GAN tokenizer (DeepSpeed)"),
    "export": ("pipeline.export", "consolidate a training run (ZeRO shards, EMA) into a from_pretrained directory"),
    "tokenize": ("pipeline.tokenize", "stage 2: pre-tokenize shards into variable-length Arrow code files"),
    "verify": ("pipeline.verify", "check code files against their manifest and input shards"),
    "stats": ("pipeline.stats", "statistics of code files (lengths, granularity shares, codebook usage)"),
    "decode-codes": ("pipeline.decode_codes", "decode stored codes back to images (PNG grid)"),
    "train-generator": ("pipeline.train_generator", "stage 3: train the coarse-to-fine generator on code files"),
    "sample": ("pipeline.sample_images", "generate images with a trained generator + tokenizer"),
    "eval": ("pipeline.evaluate", "reconstruction / generation metrics and ADM reference batches (PSNR, SSIM, "
                                  "LPIPS, rFID, FID, sFID, IS, KID, precision / recall)"),
    "launch": ("pipeline.launch", "build and run the `accelerate launch` command for a training stage"),
    "demo": ("pipeline.demo", "run the whole pipeline end to end on a small embedded image set"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written; appends a flag's default only when it says something (not None/False,
    not a required or already-described default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or action.required or "default" in text.lower()
                or not action.option_strings or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="varitok",
        description="varitok: from a pile of images to a pretrained coarse-to-fine image generator.\n"
        "Stages: shard -> train-tokenizer -> tokenize -> train-generator -> sample / eval.",
        formatter_class=_Formatter,
        epilog="Run `varitok <command> --help` for the flags of each command.",
    )
    parser.add_argument("--version", action="version", version="varitok 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, help_text) in STAGES.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _plain_text(doc: str) -> str:
    """Module docstrings use reStructuredText markup; --help shows plain text."""
    doc = re.sub(r":(?:func|class|meth|mod|attr):`~?([^`]+)`", r"\1", doc.strip())
    return doc.replace("``", "`")


def _stage_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_text = STAGES[name]
    module = importlib.import_module(module_name)
    doc = _plain_text(module.__doc__ or help_text)
    parser = argparse.ArgumentParser(prog=f"varitok {name}", description=doc, formatter_class=_Formatter)
    module.add_arguments(parser)
    return parser, module


def main(argv: Optional[Sequence[str]] = None) -> int:
    apply_process_env_defaults()  # before torch loads: OMP_WAIT_POLICY=PASSIVE, THP_MEM_ALLOC_ENABLE=1
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        top.parse_args(argv)
    name = argv[0]
    if name not in STAGES:
        top.error(f"unknown command {name!r}; choose from: {', '.join(STAGES)}")
    try:
        parser, module = _stage_parser(name)
    except ModuleNotFoundError as exc:
        if exc.name == STAGES[name][0]:
            print(f"varitok {name}: not yet available in this version", file=sys.stderr)
            return 0 if name == "demo" else 2
        raise
    args = parser.parse_args(argv[1:])
    from models.config import ConfigError

    try:
        return int(module.run(args) or 0)
    except ConfigError as exc:
        print(f"varitok {name}: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"varitok {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
