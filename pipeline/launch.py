"""Build, print and run the ``accelerate launch`` command of a training stage.

    varitok launch tokenizer --nproc 8 --zero 2 -- --config configs/tokenizer/dqfq-f8f16-k3.yaml
    varitok launch generator --nproc 8 --num-machines 2 --machine-rank 0 --main-ip 10.0.0.1 -- --config ...

The accelerate config (configs/accelerate/) is picked from the machine count and the device; the
DeepSpeed JSON is configs/deepspeed/zero{N}.json; ``--num_processes`` is the total over all machines.
Everything after ``--`` goes to ``varitok train-tokenizer`` / ``varitok train-generator``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
STAGE_COMMANDS = {"tokenizer": "train-tokenizer", "generator": "train-generator"}


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs, or CPU processes) per machine")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2,
                        help="DeepSpeed ZeRO stage (0: plain data parallel)")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0 .. num-machines-1")
    parser.add_argument("--main-ip", default=None, help="address of machine 0 (required with several machines)")
    parser.add_argument("--main-port", type=int, default=29500, help="rendezvous TCP port on machine 0")
    parser.add_argument("--cpu", action="store_true", default=None,
                        help="force the CPU setup (gloo, DS_ACCELERATOR=cpu); default: when CUDA is absent")
    parser.add_argument("--dry-run", action="store_true", help="print the command without running it")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_options(parser)
    # argparse cannot mix options after a positional with a "--" tail, so the rest is parsed in parse_command.
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="{tokenizer,generator} [options] -- STAGE_ARGS",
                        help="the stage to launch, then (after --) the arguments of varitok train-<stage>")


def parse_command(args: argparse.Namespace) -> argparse.Namespace:
    """Split ``args.command`` into ``stage``, the launch options given after it, and ``stage_args``."""
    tokens = list(args.command)
    head, tail = (tokens[:tokens.index("--")], tokens[tokens.index("--") + 1:]) if "--" in tokens else (tokens, [])
    parser = argparse.ArgumentParser(prog="varitok launch")
    parser.add_argument("stage", choices=sorted(STAGE_COMMANDS), help="which training stage to launch")
    _add_options(parser)
    parser.set_defaults(**{k: v for k, v in vars(args).items() if k != "command"})
    parsed = parser.parse_args(head)
    parsed.stage_args = tail
    return parsed


def accelerate_config(num_machines: int, nproc: int, cpu: bool) -> Path:
    """The configs/accelerate file matching the launch shape (flags override its sizes)."""
    if num_machines > 1:
        name = "multinode.yaml"
    elif nproc == 1:
        name = "single.yaml"
    else:
        name = "cpu-2proc.yaml" if cpu else "gpu-8.yaml"
    return CONFIGS / "accelerate" / name


def build_command(args: argparse.Namespace, cpu: bool,
                  entry: Optional[Sequence[str]] = None) -> tuple[list[str], dict[str, str]]:
    """``(argv, extra environment)`` of the ``accelerate launch`` command for ``args``.

    ``entry`` is what every process runs: by default ``-m pipeline.cli train-<stage> <stage args>``.
    """
    if args.nproc < 1 or args.num_machines < 1:
        raise SystemExit("varitok launch: --nproc and --num-machines must be >= 1")
    if not 0 <= args.machine_rank < args.num_machines:
        raise SystemExit(f"varitok launch: --machine-rank must be in 0..{args.num_machines - 1}")
    if args.num_machines > 1 and not args.main_ip:
        raise SystemExit("varitok launch: several machines need --main-ip (the address of machine 0)")
    if args.stage == "tokenizer" and args.zero == 3:
        raise SystemExit("varitok launch: the tokenizer stage supports ZeRO 0, 1 and 2 (ZeRO-3 partitions the "
                         "discriminator parameters that the GAN loss calls with detached weights); use --zero 2")
    argv = [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(accelerate_config(args.num_machines, args.nproc, cpu)),
            "--use_deepspeed", "--deepspeed_config_file", str(CONFIGS / "deepspeed" / f"zero{args.zero}.json"),
            "--num_processes", str(args.nproc * args.num_machines),
            "--num_machines", str(args.num_machines),
            "--machine_rank", str(args.machine_rank),
            "--main_process_port", str(args.main_port),
            # precision is train.precision's business (the runtime passes it to the Accelerator)
            "--mixed_precision", "no", "--dynamo_backend", "no"]
    if args.main_ip:
        argv += ["--main_process_ip", args.main_ip]
    if args.num_machines > 1:
        argv += ["--rdzv_backend", "static", "--deepspeed_multinode_launcher", "standard"]
    argv += list(entry) if entry is not None else ["-m", "pipeline.cli", STAGE_COMMANDS[args.stage], *args.stage_args]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    return argv, env


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    args = parse_command(args)
    cpu = args.cpu if args.cpu is not None else not _cuda_available()
    argv, env = build_command(args, cpu)
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k != "PYTHONPATH")
    print((shown + " " if shown else "") + shlex.join(argv), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(argv, env={**os.environ, **env})

