"""`varitok shard` throughput per core for folder, Parquet-bytes and re-shard inputs vs the raw per-core rate.

The images of ``--images`` (their original bytes) are laid out three ways in a temporary folder: an image folder,
a Parquet file with a Hugging Face style ``image`` struct column {bytes, path} and an integer ``label`` column
(row groups of 100 rows), and WebDataset tars from ``webdataset.ShardWriter`` (img2dataset-like: jpg, cls, txt).
Measured side by side in one run, interleaved round-robin over ``--repeats`` rounds, at ``--image-size``
(center-crop, JPEG q95):

* ``raw``: a plain single-threaded loop over the same in-memory bytes calling ``data.shards.process_image``
  (decode + EXIF + RGB + resize + encode), the per-image work every input kind shares;
* ``folder``, ``parquet``, ``reshard``: ``data.shards.shard_images`` with one worker on each layout: discovery,
  reading, hashing, tar writing, stats and manifests included.
Rates are images per CPU-second of this process (one core), so a machine shared with other jobs moves them less.
The ratio of an input kind is the median over rounds of its rate over the raw rate of the same round (measured
seconds apart, under the same load); medians, best rounds and wall-clock rates are reported too. Target: each
input kind >= 0.85 of the raw rate.

Memory: a ~``--parquet-gb`` GB Parquet of small rows (the images downscaled to 64 px JPEGs, repeated; no
compression, 2,000-row row groups) is sharded whole by ``varitok shard --input big.parquet --output OUT`` in a
fresh process (the CLI, default flags and workers, one node, under ``nice``), while this process samples the
RSS of that process and all its children from ``/proc`` every 0.1 s. Reported: the peak of that sum (target
< 500 MB), each process's own peak (VmHWM), whether torch's libraries were ever mapped, and the parts: the RSS
of the modules the command imports, of discovering every row, and what importing ``torch.distributed`` would
add. ``--memory-node-flags`` runs it as ``--node-rank 0 --num-nodes 1`` instead of from the environment.

    .venv/bin/python -m benchmarks.shard [--images DIR] [--repeats 3] [--bench-lock /tmp/varitok-bench.lock]

``--bench-lock FILE`` holds an exclusive ``flock`` on FILE during the timed rounds only (the memory run is not
timing-sensitive and runs niced without it).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, emit, target  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
NODE_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                  "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
PARTS_SCRIPT = """
import json, sys
def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
import pipeline.cli, pipeline.shard, data.shards, data.sources, pyarrow.parquet, tqdm
from data.shards import ShardOptions, discover_inputs, resolve_node
parts = {"imports_rss_mb": rss_mb("VmRSS")}
inputs = discover_inputs([sys.argv[1]], ShardOptions())
parts.update(discovery_peak_rss_mb=rss_mb("VmHWM"), discovery_rss_mb=rss_mb("VmRSS"), inputs=len(inputs.items))
before = rss_mb("VmRSS")
resolve_node()  # the node from the environment (data.world.resolve_world)
parts["node_from_environment_imports_torch"] = "torch" in sys.modules
import torch.distributed
parts["torch_distributed_import_adds_mb"] = round(rss_mb("VmRSS") - before, 1)
print(json.dumps(parts))
"""


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/PID/task/*/children)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(child) for child in children.read_text().split())
            except OSError:
                pass
    return tree


def _status_kb(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) for line in lines if line.startswith(("VmRSS:", "VmHWM:"))}


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def sampled_run(command: list[str], cwd: Path, interval: float = 0.1) -> dict:
    """Run ``command`` (niced, one node: no launcher variables), sampling the summed RSS of its process tree."""
    env = {k: v for k, v in os.environ.items() if k not in NODE_VARIABLES}
    start = time.perf_counter()
    process = subprocess.Popen(["nice", "-n", "10", *command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)  # nice execs: the same process
    peak_kb, peak_at, peak_processes, own_peaks, torch_seen, samples, last_check = 0, 0.0, 0, {}, False, 0, 0.0
    while process.poll() is None:
        total = 0
        pids = _process_tree(process.pid)
        for pid in pids:
            status = _status_kb(pid)
            total += status.get("VmRSS", 0)
            if "VmHWM" in status:
                own_peaks[pid] = status["VmHWM"]
        if total > peak_kb:
            peak_kb, peak_at, peak_processes = total, time.perf_counter() - start, len(pids)
        if time.perf_counter() - last_check > 2.0:  # reading maps costs more: every 2 s
            torch_seen = torch_seen or any(_maps_torch(pid) for pid in pids)
            last_check = time.perf_counter()
        samples += 1
        time.sleep(interval)
    stdout = process.stdout.read()
    if process.wait() != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    main_peak = own_peaks.get(process.pid, 0)
    return {"command": " ".join(["varitok"] + command[3:]), "seconds": round(time.perf_counter() - start, 1),
            "summary": stdout.strip().splitlines()[-1] if stdout.strip() else "",
            "peak_total_rss_mb": round(peak_kb / 1024, 1), "peak_at_s": round(peak_at, 1),
            "processes_at_peak": peak_processes, "processes_seen": len(own_peaks), "samples": samples,
            "main_peak_rss_mb": round(main_peak / 1024, 1),
            "sum_of_process_peaks_mb": round(sum(own_peaks.values()) / 1024, 1), "torch_mapped": torch_seen}


@contextlib.contextmanager
def held_lock(path: str | None):
    """An exclusive flock on ``path`` (the shared machine's benchmark lock) for the timed section; None: none."""
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_layouts(paths: list[Path], root: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    folder = root / "folder"
    folder.mkdir()
    blobs = [p.read_bytes() for p in paths]
    for i, blob in enumerate(blobs):
        (folder / f"{i:05d}{paths[i].suffix.lower()}").write_bytes(blob)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": b, "path": p.name} for b, p in zip(blobs, paths)], image_type),
                      "label": [i % 10 for i in range(len(blobs))]})
    pq.write_table(table, root / "train.parquet", row_group_size=100)
    (root / "tars").mkdir()
    with wds.ShardWriter(str(root / "tars" / "part-%05d.tar"), maxcount=250, verbose=0) as sink:
        for i, blob in enumerate(blobs):
            sink.write({"__key__": f"{i:05d}", "jpg": blob, "cls": str(i % 10), "txt": f"image {i}"})
    return {"folder": folder, "parquet": root / "train.parquet", "reshard": root / "tars"}


def write_big_parquet(paths: list[Path], target_bytes: int, out: Path) -> dict:
    """~target_bytes of small JPEG rows, written incrementally (uncompressed, no dictionary)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    small = []
    for p in paths[:300]:
        img = Image.open(p).convert("RGB")
        img.thumbnail((64, 64))
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=90)
        small.append(buffer.getvalue())
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("label", pa.int64())])
    groups = max(1, round(target_bytes / (2000 * sum(map(len, small)) / len(small))))
    with pq.ParquetWriter(out, schema, compression="none", use_dictionary=False) as writer:
        for group in range(groups):
            first = group * 2000
            batch = [small[(first + i) % len(small)] for i in range(2000)]
            writer.write_table(pa.table({"image": pa.array([{"bytes": b, "path": None} for b in batch], image_type),
                                         "label": [(first + i) % 1000 for i in range(2000)]}, schema=schema),
                               row_group_size=2000)
    rows = groups * 2000
    return {"rows": rows, "bytes": out.stat().st_size, "mean_row_bytes": round(out.stat().st_size / rows, 1)}


def rate_figures(runs: dict, repeats: int) -> dict:
    """Rates of each run in images per CPU-second (and wall second), interleaved round-robin over ``repeats``."""
    cpu = {name: [] for name in runs}
    wall = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            count = fn()
            cpu[name].append(count / (time.process_time() - c0))
            wall[name].append(count / (time.perf_counter() - w0))
    kinds = [name for name in runs if name != "raw"]
    return {
        "images_per_cpu_s_median": {name: round(statistics.median(values), 1) for name, values in cpu.items()},
        "images_per_cpu_s_best": {name: round(max(values), 1) for name, values in cpu.items()},
        "images_per_wall_s_median": {name: round(statistics.median(v), 1) for name, v in wall.items()},
        # each round's rate over the raw rate of the same round (seconds apart, under the same load), median
        "ratio_to_raw": {kind: round(statistics.median(k / r for k, r in zip(cpu[kind], cpu["raw"])), 3)
                         for kind in kinds},
        "ratio_to_raw_per_round": {kind: [round(k / r, 3) for k, r in zip(cpu[kind], cpu["raw"])] for kind in kinds},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "imagenet-samples",
                        help="folder of images (default: ../shared/data/imagenet-samples)")
    parser.add_argument("--limit", type=int, default=600, help="images used for the rate figures")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parquet-gb", type=float, default=1.0, help="size of the memory run's Parquet (0: no run)")
    parser.add_argument("--memory-node-flags", action="store_true",
                        help="memory run with --node-rank 0 --num-nodes 1 (default: the node from the environment)")
    parser.add_argument("--bench-lock", default=None, metavar="FILE",
                        help="hold an exclusive flock on FILE during the timed rounds (e.g. /tmp/varitok-bench.lock)")
    parser.add_argument("--skip-rates", action="store_true", help="only the memory run")
    args = parser.parse_args()

    from data.shards import ShardOptions, process_image, shard_images

    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:args.limit]
    if not paths:
        raise SystemExit(f"no images under {args.images}; pass --images DIR")
    options = ShardOptions(image_size=args.image_size, shard_size=100)
    figures: dict = {"images": len(paths), "image_size": args.image_size, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="varitok-bench-shard-") as tmp:
        root = Path(tmp)
        layouts = write_layouts(paths, root)
        blobs = [p.read_bytes() for p in paths]

        def raw() -> int:
            for blob in blobs:
                process_image(blob, options)
            return len(blobs)

        def sharder(kind: str):
            def run() -> int:
                out = root / f"out-{kind}"
                if out.exists():
                    shutil.rmtree(out)
                summary = shard_images([str(layouts[kind])], out, options, workers=1, progress=False)
                assert summary["written"] == len(paths), summary
                return summary["written"]
            return run

        runs = {"raw": raw, **{kind: sharder(kind) for kind in layouts}}
        if not args.skip_rates:
            with held_lock(args.bench_lock):
                figures.update(rate_figures(runs, args.repeats))
        if args.parquet_gb > 0:
            big = root / "big.parquet"
            figures["memory_parquet"] = write_big_parquet(paths, int(args.parquet_gb * 1e9), big)
            parts = subprocess.run([sys.executable, "-c", PARTS_SCRIPT, str(big)], cwd=REPO, capture_output=True,
                                   text=True, check=True, env={k: v for k, v in os.environ.items()
                                                               if k not in NODE_VARIABLES})
            figures["memory_parts"] = json.loads(parts.stdout.strip().splitlines()[-1])
            (root / "big.parquet.shards").mkdir()
            command = [sys.executable, "-m", "pipeline.cli", "shard", "--input", str(big),
                       "--output", str(root / "big.parquet.shards")]
            figures["memory_run"] = sampled_run(command + (["--node-rank", "0", "--num-nodes", "1"]
                                                           if args.memory_node_flags else []), REPO)
            figures["memory_run"]["sampling"] = ("sum of VmRSS over the command's process and all its descendants "
                                                 "(/proc), every 0.1 s; shared pages count once per process")
    targets = {}
    if not args.skip_rates:
        targets.update({f"{kind}_vs_raw": target(figures["ratio_to_raw"][kind], ">= 0.85") for kind in layouts})
    if args.parquet_gb > 0:
        targets["peak_total_rss_mb_1gb_parquet"] = target(figures["memory_run"]["peak_total_rss_mb"], "<= 500")
    emit("shard", figures, targets)


if __name__ == "__main__":
    main()
