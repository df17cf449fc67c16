"""A watchdog for distributed stages: when a rank stops making progress, every rank exits with a clear error.

    dog = Watchdog(out_dir, timeout_s=1800, rank=rank, world_size=world, token=shared_token()).start()
    for batch in loader:
        ...                       # one unit of work (a step, a batch)
        dog.beat("part 3")        # cheap: a counter; ``what`` shows up in the error message
    dog.idle()                    # done: waiting for the others (e.g. at the final barrier) is not a stall
    dog.stop()

Each rank's monitor thread publishes its rank's progress counter to ``DIR/.heartbeats/rank-RRRRR.json``
(atomically, at most every ``poll_s``) and reads every other rank's file. It notes, by its own clock, when
each rank's counter last changed (so machines' clocks need not agree); a rank that is neither idle nor
changed for ``timeout_s`` seconds makes the monitor print which ranks stalled and what they last did, and
end its process with exit code :data:`EXIT_CODE` (``os._exit``: the main thread may be stuck inside a
collective or a C call). Every rank runs the same check, so all of them exit within about
``timeout_s + poll_s`` of the stall, instead of waiting forever on the stalled one (under ``torchrun`` or
SLURM the job then ends). ``DIR`` must be on the file system the ranks share (the run or output folder).

The monitor runs in a thread, so it also fires when the main thread spins in Python (a parser that does
not advance) or blocks in a collective, file read or device call that releases the GIL.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence

from data.files import atomic_write, make_folder

__all__ = ["Watchdog", "shared_token", "EXIT_CODE", "HEARTBEATS"]

EXIT_CODE = 124  # as timeout(1): "gave up waiting"
HEARTBEATS = ".heartbeats"


def shared_token() -> str:
    """A token that is the same on every rank of this launch (rank 0's, broadcast over the default process
    group), so heartbeat files left by an earlier run are never taken for this run's progress. Without a
    process group it is a fresh random token (only this process is watched then)."""
    import torch.distributed as dist

    token = [uuid.uuid4().hex]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _exit(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


class Watchdog:
    """Watches the progress counters of ``world_size`` ranks (see the module docstring).

    ``timeout_s`` <= 0 disables it (every method is then a no-op). ``watched``: the ranks to watch (default
    all; ``[rank]`` for processes that share no collective and so cannot wait on each other).
    ``on_stall(message)`` replaces the default (print to stderr and ``os._exit(EXIT_CODE)``), for callers
    that can stop in another way.
    """

    def __init__(self, directory: str | os.PathLike, timeout_s: float, *, rank: int = 0, world_size: int = 1,
                 token: str = "", name: str = "varitok", poll_s: Optional[float] = None,
                 watched: Optional[Sequence[int]] = None, on_stall: Optional[Callable[[str], None]] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.enabled = timeout_s > 0
        self.timeout_s = float(timeout_s)
        self.poll_s = float(poll_s) if poll_s else max(0.05, min(10.0, self.timeout_s / 5))
        self.rank, self.world_size, self.name = rank, world_size, name
        self.watched = list(range(world_size)) if watched is None else [int(r) for r in watched]
        self.token = token or uuid.uuid4().hex
        self.directory = Path(directory) / HEARTBEATS
        self.on_stall = on_stall or _exit
        self._beats, self._what, self._idle = 0, "started", False
        self._written: Optional[tuple] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="varitok-watchdog", daemon=True)

    # ------------------------------------------------------------------------------------- main thread
    def start(self) -> "Watchdog":
        if self.enabled:
            make_folder(self.directory)
            self._publish()
            self._thread.start()
        return self

    def beat(self, what: str = "") -> None:
        """One unit of progress (a counter increment; the thread publishes it)."""
        self._beats += 1
        self._idle = False
        if what:
            self._what = what

    def idle(self, what: str = "done, waiting for the other ranks") -> None:
        """This rank has finished its work: from now on only the other ranks can stall."""
        self._idle, self._what = True, what
        if self.enabled:
            self._publish()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------- monitor thread
    def _path(self, rank: int) -> Path:
        return self.directory / f"rank-{rank:05d}.json"

    def _own_state(self) -> tuple:
        return (self._beats, self._idle, self._what)

    def _publish(self) -> None:
        state = self._own_state()
        if state != self._written:
            atomic_write(self._path(self.rank), json.dumps({
                "token": self.token, "beats": state[0], "idle": state[1], "what": state[2],
                "host": socket.gethostname(), "pid": os.getpid()}))
            self._written = state

    def _state(self, rank: int) -> Optional[tuple]:
        """(beats, idle, what) of a rank in this launch; None before it published anything."""
        if rank == self.rank:
            return self._own_state()
        try:
            record = json.loads(self._path(rank).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("token") != self.token:
            return None  # a file from an earlier run, or not started yet
        return (record.get("beats"), bool(record.get("idle")), str(record.get("what", "")))

    def _watch(self) -> None:
        start = time.monotonic()
        seen: dict[int, tuple[Optional[tuple], float]] = {r: (None, start) for r in self.watched}
        while not self._stop.wait(self.poll_s):
            try:
                self._publish()
            except OSError:
                pass  # a shared file system hiccup: the next poll tries again
            now = time.monotonic()
            stalled = []
            for rank in self.watched:
                state = self._state(rank)
                last, since = seen[rank]
                if state != last:
                    seen[rank] = (state, now)
                elif not (state is not None and state[1]) and now - since > self.timeout_s:
                    stalled.append((rank, now - since, state))
            if stalled:
                details = "; ".join(
                    f"rank {r}: no progress for {age:.0f} s"
                    + (f" (after {s[0]} steps, last: {s[2]})" if s is not None else " (never reported)")
                    for r, age, s in stalled)
                self.on_stall(f"varitok {self.name}: watchdog (rank {self.rank}): {details}. Exiting so that no "
                              f"rank waits forever (timeout {self.timeout_s:.0f} s; raise it if a step can "
                              f"legitimately take longer, 0 disables the watchdog)")
                return
