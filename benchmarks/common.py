"""Shared pieces of the benchmark scripts: machine description, timing, the JSON record.

Every script prints ONE JSON object (docs/formats.md, "Benchmark records"):
``{"benchmark", "machine": {cpu, threads, gpu}, "figures": {...}, "targets": {name: {value, target, met}}}``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
from pipeline.process_env import apply_process_env_defaults  # noqa: E402  (run as `python -m benchmarks.NAME`)

PROCESS_ENV = apply_process_env_defaults()  # the scripts run torch as `varitok` does (set before torch loads)


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "env": dict(PROCESS_ENV)}


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, sync: bool = False) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    import torch

    def _sync():
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int | dict[str, int] = 1,
                      sync: bool = False) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of every ``fns[name]()``, run in turns (A B A B ...) ``rounds`` times after
    ``warmup`` untimed runs each (a number, or one per name): ``{name: {"wall": [...], "cpu": [...]}}``.

    Taking turns exposes every function to the same drift of a shared machine's load. CPU seconds
    (``time.process_time``: user + system time of this process, all its threads) leave out the time other
    processes hold the cores; at one torch thread they are the work of one run.
    """
    import torch

    def _sync():
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()

    for name, fn in fns.items():
        for _ in range(warmup if isinstance(warmup, int) else warmup.get(name, 0)):
            fn()
    _sync()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            _sync()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def target(value: float, condition: str) -> dict[str, Any]:
    """A target record; ``condition`` is ``">= 2.0"`` or ``"<= 0.25"``."""
    op, bound = condition.split()
    bound_f = float(bound)
    met = value >= bound_f if op == ">=" else value <= bound_f if op == "<=" else None
    if met is None:
        raise ValueError(f"unsupported condition {condition!r}")
    return {"value": round(float(value), 4), "target": condition, "met": bool(met)}


def emit(name: str, figures: dict[str, Any], targets: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    record = {"benchmark": name, "machine": machine_info(), "figures": figures, "targets": targets or {}}
    print(json.dumps(record, indent=2, sort_keys=False))
    return record
