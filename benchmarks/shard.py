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
compression, 2,000-row row groups) is sharded in a fresh process as node 0 of ``--memory-nodes`` (discovery of
every row, then this node's shards spread over the whole file). Reported: that process's peak RSS (VmHWM), its
RSS once its modules are imported (about 0.7 GB: ``webdataset`` imports torch, whose libraries are mapped) and
the difference, the memory the run itself took (target < 500 MB).

    flock /tmp/varitok-bench.lock .venv/bin/python -m benchmarks.shard [--images DIR] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, emit, target  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
MEMORY_SCRIPT = """
import json, sys
from data.shards import ShardOptions, shard_images

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

baseline = status_mb("VmRSS")  # after the imports: torch's libraries (imported by webdataset) are most of it
summary = shard_images([sys.argv[1]], sys.argv[2], ShardOptions(image_size=int(sys.argv[4]), shard_size=500),
                       node_rank=0, num_nodes=int(sys.argv[3]), progress=False)
print(json.dumps({"peak_rss_mb": round(status_mb("VmHWM"), 1), "rss_after_imports_mb": round(baseline, 1),
                  "peak_rss_growth_mb": round(status_mb("VmHWM") - baseline, 1),
                  "rss_anon_at_end_mb": round(status_mb("RssAnon"), 1),
                  "shards_total": summary["shards_total"], "shards_mine": summary["shards_mine"],
                  "processed": summary["processed_this_run"], "seconds": summary["seconds"]}))
"""

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "imagenet-samples",
                        help="folder of images (default: ../shared/data/imagenet-samples)")
    parser.add_argument("--limit", type=int, default=600, help="images used for the rate figures")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parquet-gb", type=float, default=1.0)
    parser.add_argument("--memory-nodes", type=int, default=100)
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
        cpu = {name: [] for name in runs}
        wall = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                c0, w0 = time.process_time(), time.perf_counter()
                count = fn()
                cpu[name].append(count / (time.process_time() - c0))
                wall[name].append(count / (time.perf_counter() - w0))
        medians = {name: statistics.median(values) for name, values in cpu.items()}
        figures["images_per_cpu_s_median"] = {name: round(rate, 1) for name, rate in medians.items()}
        figures["images_per_cpu_s_best"] = {name: round(max(values), 1) for name, values in cpu.items()}
        figures["images_per_wall_s_median"] = {name: round(statistics.median(v), 1) for name, v in wall.items()}
        # each round's rate over the raw rate of the same round (seconds apart, under the same load), median
        figures["ratio_to_raw"] = {kind: round(statistics.median(k / r for k, r in zip(cpu[kind], cpu["raw"])), 3)
                                   for kind in layouts}
        figures["ratio_to_raw_per_round"] = {kind: [round(k / r, 3) for k, r in zip(cpu[kind], cpu["raw"])]
                                             for kind in layouts}

        big = root / "big.parquet"
        figures["memory_parquet"] = write_big_parquet(paths, int(args.parquet_gb * 1e9), big)
        result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(big), str(root / "out-big"),
                                 str(args.memory_nodes), str(args.image_size)],
                                cwd=REPO, capture_output=True, text=True, check=True)
        figures["memory_run"] = json.loads(result.stdout.strip().splitlines()[-1])
        figures["memory_run"]["nodes"] = args.memory_nodes
    targets = {f"{kind}_vs_raw": target(figures["ratio_to_raw"][kind], ">= 0.85") for kind in layouts}
    # the growth over the process's RSS once its modules are loaded: what reading the 1 GB file costs
    targets["peak_rss_growth_mb_1gb_parquet"] = target(figures["memory_run"]["peak_rss_growth_mb"], "<= 500")
    emit("shard", figures, targets)


if __name__ == "__main__":
    main()
