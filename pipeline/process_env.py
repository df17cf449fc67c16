"""Environment defaults for every varitok process, applied before torch is imported.

Each is a ``setdefault``: a value already in the environment wins. Child processes (launchers, ranks,
DataLoader workers) inherit them. The CLI, the test suite and the benchmark scripts all apply the same set,
so that tests and benchmarks run torch the way ``varitok`` does.
"""
from __future__ import annotations

import os

PROCESS_ENV_DEFAULTS = {
    # OpenMP threads that spin while they wait make torch 20-50x slower whenever the cores are shared
    # (other ranks, data workers, other jobs); sleeping waiters cost little when they are not.
    "OMP_WAIT_POLICY": "PASSIVE",
    # Large CPU tensors (>= 2 MB) on transparent huge pages: a fresh float32 image batch then takes
    # ~12 page faults instead of ~6000 4 KB ones (the stream's uint8 -> float conversion costs 0.4 instead of
    # 0.65 ms per 256 px image in the main process). Read once by torch, at its first allocation.
    "THP_MEM_ALLOC_ENABLE": "1",
}


def apply_process_env_defaults() -> dict[str, str]:
    """Set the defaults that the environment does not set already; return the values in effect."""
    for name, value in PROCESS_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in PROCESS_ENV_DEFAULTS}
