"""Shared fixtures and launch helpers. Tests generate their own data: nothing here reads ../shared or the network."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from pipeline.process_env import apply_process_env_defaults  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")
apply_process_env_defaults()  # as pipeline.cli does (before torch loads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """12 procedural 64px PNGs in a class-per-subfolder layout (4 classes)."""
    from data.demo_images import write_image_folder

    return write_image_folder(tmp_path / "images", num_images=12, size=64, num_classes=4)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of tiny models: avoids oversubscribing the 2 shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- subprocess launches
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch_env() -> dict[str, str]:
    """This environment without any launcher's rank variables, one OpenMP thread, the repo importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "SLURM_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return env


def free_port() -> int:
    from pipeline.runtime import free_port as port

    return port()


def start_process(argv: list[str], log: Path) -> subprocess.Popen:
    """Start ``argv`` in the repo root with ``launch_env()``, stdout and stderr into ``log``."""
    with open(log, "w") as handle:
        return subprocess.Popen(argv, env=launch_env(), stdout=handle, stderr=subprocess.STDOUT, cwd=str(REPO))


def kill_shard_run_mid_way(command: list[str], out: Path, signal_number: int = signal.SIGKILL) -> list[int]:
    """Start ``varitok shard`` (``command``), send it ``signal_number`` as soon as its first shard's stats file
    appears in ``out`` (checked: the signal landed mid-run, some shards, no manifest), and return the pids of
    the processes it had started by then (its ``--workers``)."""
    import psutil

    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.glob("*.stats.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    children = [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal_number)
    proc.wait()
    done = list(out.glob("*.stats.json"))
    assert 1 <= len(done) < 30 and not (out / "manifest.json").exists(), "the signal did not land mid-run"
    return children


def run_gloo_ranks(target, *args, world: int = 2) -> list:
    """Run ``target(rank, world, port, *args, queue)`` in ``world`` spawned processes (each initialises its own gloo
    group on ``port``); every rank puts one result tuple starting with its rank on the queue. Returns the results
    sorted by rank, after checking that every process exited cleanly."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=target, args=(rank, world, port, *args, queue)) for rank in range(world)]
    for proc in procs:
        proc.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return results
