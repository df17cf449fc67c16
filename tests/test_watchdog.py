"""The distributed watchdog: two real processes in a gloo group; one stalls, both exit; slow progress is not a stall."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from pipeline.watchdog import EXIT_CODE, Watchdog

REPO = Path(__file__).resolve().parent.parent

WORKER = """
import sys, time
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
from pipeline.watchdog import Watchdog, shared_token
dist.init_process_group("gloo")
rank, mode = dist.get_rank(), sys.argv[2]
dog = Watchdog(sys.argv[1], timeout_s=3, rank=rank, world_size=2, token=shared_token(), name="test", poll_s=0.2)
dog.start()
for step in range(5):
    dist.all_reduce(torch.ones(1))
    dog.beat(f"step {{step}}")
if mode == "hang":
    if rank == 1:
        while True:  # spins in Python, as a parser that never advances did
            pass
    dist.all_reduce(torch.ones(1))  # rank 0 waits for rank 1 forever
else:  # "slow": rank 0 is done and waits; rank 1 keeps making (slow) progress for longer than the timeout
    if rank == 0:
        dog.idle()
    else:
        for i in range(12):
            time.sleep(0.5)
            dog.beat(f"slow step {{i}}")
    dist.barrier()
dog.stop()
print("finished", rank, flush=True)
"""


def _launch(tmp_path: Path, mode: str) -> list[subprocess.Popen]:
    port = free_port()
    script = WORKER.format(repo=str(REPO))
    processes = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, "-c", script, str(tmp_path), mode], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


@pytest.mark.slow
def test_a_stalled_rank_makes_every_rank_exit_with_a_clear_error(tmp_path):
    start = time.monotonic()
    processes = _launch(tmp_path, "hang")
    try:
        outcomes = [(p.wait(timeout=60), p.stderr.read()) for p in processes]
    finally:
        for p in processes:
            p.kill()
    elapsed = time.monotonic() - start
    (code0, err0), (code1, err1) = outcomes
    assert code1 == EXIT_CODE and "rank 1: no progress for" in err1 and "after 5 steps, last: step 4" in err1, err1
    # Rank 0 (blocked in the collective, so not progressing either) exits too: by its own watchdog, or because
    # its collective fails once rank 1 is gone.
    assert code0 != 0 and ("no progress for" in err0 or "onnection" in err0), err0[-2000:]
    assert elapsed < 45


@pytest.mark.slow
def test_slow_progress_and_a_rank_waiting_for_it_are_not_stalls(tmp_path):
    processes = _launch(tmp_path, "slow")
    outcomes = [(p.wait(timeout=90), p.stdout.read(), p.stderr.read()) for p in processes]
    for rank, (code, out, err) in enumerate(outcomes):
        assert code == 0 and f"finished {rank}" in out, err[-2000:]


def test_stale_heartbeat_files_of_an_earlier_run_do_not_count(tmp_path):
    earlier = Watchdog(tmp_path, 10, rank=1, world_size=2, token="earlier").start()
    earlier.idle()  # an earlier run's rank 1 finished
    earlier.stop()
    messages = []
    dog = Watchdog(tmp_path, 0.5, rank=0, world_size=2, token="now", poll_s=0.05, on_stall=messages.append).start()
    deadline = time.monotonic() + 10
    while not messages and time.monotonic() < deadline:
        dog.beat("working")
        time.sleep(0.02)
    dog.stop()
    assert messages and "rank 1: no progress" in messages[0] and "never reported" in messages[0]
    assert "rank 0" not in messages[0].split("):", 1)[1]  # rank 0 kept beating


def test_disabled_watchdog_does_nothing(tmp_path):
    with Watchdog(tmp_path, 0, rank=0, world_size=1) as dog:
        dog.beat()
        dog.idle()
    assert not (tmp_path / ".heartbeats").exists()
