"""`varitok shard`: contents, determinism, kill -9 resume, bad inputs, node split, errors."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.demo_images import procedural_image, write_image_folder
from data.shards import (Rejected, ShardError, ShardOptions, discover_inputs, merge_manifests, process_image,
                         resolve_node, shard_images)
from pipeline.cli import main as cli_main

from conftest import REPO, kill_shard_run_mid_way
NODE_VARS = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_RANK",
             "OMPI_COMM_WORLD_SIZE")


@pytest.fixture(autouse=True)
def single_node(monkeypatch):
    """Tests run as one node even inside a SLURM job or a torchrun launch (subprocesses inherit this)."""
    for var in NODE_VARS:
        monkeypatch.delenv(var, raising=False)


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}}; also checks that the members of a sample are adjacent."""
    samples: dict[str, dict[str, bytes]] = {}
    order = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            if not order or order[-1] != key:
                assert key not in samples, f"members of {key} are not adjacent in {path.name}"
                order.append(key)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_all(out: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for tar in sorted(out.glob("*.tar")):
        part = read_tar(tar)
        assert not set(part) & set(samples), "a key appears in two shards"
        samples.update(part)
    return samples


def output_files(out: Path) -> dict[str, bytes]:
    """Every output file except per-shard stats (they hold timings) and the run file."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and not p.name.endswith(".stats.json")}


def rejected(out: Path) -> dict[str, str]:
    lines = (out / "rejected.jsonl").read_text().splitlines()
    return {Path(entry["path"]).name: entry["reason"] for entry in map(json.loads, lines)}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no real pixel data): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_round_trip_folders_and_lists(tmp_path, image_folder):
    (image_folder / "forest" / "000001.txt").write_text("a forest\n")
    extra = tmp_path / "extra"
    extra.mkdir()
    for i in range(3):
        Image.fromarray(procedural_image(100 + i, 48 + 8 * i)).save(extra / f"e{i}.jpg", quality=90)
    with open(tmp_path / "list.csv", "w", newline="") as handle:  # relative paths, name labels, captions
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "caption"])
        writer.writerows([["extra/e0.jpg", "ocean", "first extra"], ["extra/e1.jpg", "zebra", ""]])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [str(extra / "e2.jpg")], "text": ["from parquet"]}), tmp_path / "l.parquet")

    out = tmp_path / "out"
    options = ShardOptions(image_size=32, format="png", shard_size=5, captions=True)
    summary = shard_images([str(image_folder), str(tmp_path / "list.csv"), str(tmp_path / "l.parquet")],
                           out, options, progress=False)
    assert summary["written"] == 15 and summary["merged"]

    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"city": 0, "forest": 1, "ocean": 2, "sunset": 3, "zebra": 4}
    samples = read_all(out)
    assert len(samples) == 15 and all("." not in key for key in samples)
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 5, "shard-000001.tar": 5,
                                                            "shard-000002.tar": 5}
    by_source = {}
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert meta["key"] == key
        source = Path(meta["source"])
        assert meta["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        with Image.open(source) as original:
            assert (meta["original_width"], meta["original_height"]) == original.size
        pixels = decode(sample["png"])
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
        by_source[source] = sample
    for path in image_folder.rglob("*.png"):
        assert int(by_source[path]["cls"]) == classes[path.parent.name]
    assert by_source[image_folder / "forest" / "000001.png"]["txt"] == b"a forest"
    assert "txt" not in by_source[image_folder / "forest" / "000005.png"]
    assert int(by_source[extra / "e0.jpg"]["cls"]) == 2 and by_source[extra / "e0.jpg"]["txt"] == b"first extra"
    assert int(by_source[extra / "e1.jpg"]["cls"]) == 4 and "txt" not in by_source[extra / "e1.jpg"]
    assert "cls" not in by_source[extra / "e2.jpg"] and by_source[extra / "e2.jpg"]["txt"] == b"from parquet"

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 15 and manifest["num_rejected"] == 0 and manifest["image_size"] == 32
    assert manifest["classes"] == list(classes) and manifest["version"]

    import webdataset as wds  # the format must group into samples with a stock reader

    keys = [s["__key__"] for s in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False)]
    assert keys == sorted(samples)


def test_resize_modes_crop_and_exif(tmp_path):
    stripes = np.zeros((30, 60, 3), np.uint8)
    stripes[:, :15] = (255, 0, 0)
    stripes[:, 15:45] = (0, 255, 0)
    stripes[:, 45:] = (0, 0, 255)
    crop, _ = process_image(_png(stripes), ShardOptions(image_size=30, format="png"))
    assert (decode(crop) == (0, 255, 0)).all()  # the centred 30x30 square, no resampling

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    Image.fromarray(procedural_image(1, 80)[:40]).save(buffer, "JPEG", exif=exif)  # stored 80 wide x 40 high
    data, original = process_image(buffer.getvalue(), ShardOptions(image_size=20, resize="shorter-side"))
    assert original == (40, 80) and decode(data).shape == (40, 20, 3)
    data, original = process_image(buffer.getvalue(), ShardOptions(resize="none", format="png"))
    assert decode(data).shape == (80, 40, 3)


def test_large_jpeg_reduced_decode_matches_full_decode():
    big = np.asarray(Image.fromarray(procedural_image(7, 512)).resize((1024, 768)))
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, "JPEG", quality=95)
    data, original = process_image(buffer.getvalue(), ShardOptions(image_size=64, format="png"))
    assert original == (1024, 768)
    reference = Image.open(buffer).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS, box=(128, 0, 896, 768))
    diff = np.abs(decode(data).astype(int) - np.asarray(reference).astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4


def _png(pixels: np.ndarray, mode: str | None = None, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def test_bomb_limit_from_options():
    small = _png(np.zeros((12, 12, 3), np.uint8))
    for limit in (100, 50):  # 144 px: PIL warns above the limit and raises above twice the limit
        with pytest.raises(Rejected) as err:
            process_image(small, ShardOptions(max_pixels=limit))
        assert err.value.reason == "decompression_bomb"
    process_image(small, ShardOptions(max_pixels=144))


def test_bad_inputs_rejected_and_modes_converted(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = procedural_image(3, 32)
    save(src / "a_good.png", Image.fromarray(good))
    shutil.copy(src / "a_good.png", src / "z_dup.png")
    (src / "empty.png").write_bytes(b"")
    (src / "text.jpg").write_text("not an image at all")
    jpeg = io.BytesIO()
    Image.fromarray(procedural_image(4, 128)).save(jpeg, "JPEG")
    (src / "truncated.jpg").write_bytes(jpeg.getvalue()[: int(len(jpeg.getvalue()) * 0.7)])
    (src / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    save(src / "tiny.png", Image.fromarray(good[:8, :8]))
    save(src / "locked.png", Image.fromarray(procedural_image(5, 32))).chmod(0)

    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    cmyk.paste((255, 0, 0, 0), (0, 0, 8, 16))
    save(src / "cmyk.tif", cmyk)
    grey16 = np.zeros((16, 16), np.uint16)
    grey16[:, 4:8], grey16[:, 8:] = 65535, 32896  # 32896 = 128 * 257
    save(src / "grey16.png", Image.fromarray(grey16))
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (8, 0, 16, 16))
    save(src / "palette.png", palette, transparency=0)  # index 0 (red) is transparent
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :5] = (255, 0, 0, 0)
    rgba[:, 5:10] = (0, 0, 255, 255)
    rgba[:, 10:] = (0, 0, 0, 128)
    save(src / "rgba.png", Image.fromarray(rgba, "RGBA"))
    save(src / "la.png", Image.fromarray(np.stack([np.full((16, 16), 50, np.uint8),
                                                    np.zeros((16, 16), np.uint8)], -1), "LA"))
    save(src / "grey.png", Image.fromarray(np.full((16, 16), 77, np.uint8), "L"))
    (tmp_path / "list.txt").write_text(f"# a file list\n{tmp_path / 'gone.png'}\n")

    out = tmp_path / "out"
    options = ShardOptions(resize="none", format="png", shard_size=4, min_size=16, dedupe=True)
    summary = shard_images([str(src), str(tmp_path / "list.txt")], out, options, workers=2, progress=False)

    as_root = os.geteuid() == 0  # root reads chmod-000 files
    expected = {"z_dup.png": "duplicate", "empty.png": "empty", "text.jpg": "not_an_image",
                "truncated.jpg": "truncated", "bomb.png": "decompression_bomb", "tiny.png": "too_small",
                "gone.png": "missing"}
    if not as_root:
        expected["locked.png"] = "unreadable"
    assert rejected(out) == expected
    counts = json.loads((out / "manifest.json").read_text())["rejected_by_reason"]
    assert counts == {reason: list(expected.values()).count(reason) for reason in set(expected.values())}
    assert summary["rejected_by_reason"] == counts

    samples = {Path(json.loads(s["json"])["source"]).name: decode(s["png"]) for s in read_all(out).values()}
    all_inputs = {p.name for p in src.iterdir()} | {"gone.png"}
    assert set(samples) | set(expected) == all_inputs and not set(samples) & set(expected)
    assert all(pixels.shape[2] == 3 for pixels in samples.values())
    assert (samples["a_good.png"] == good).all()
    assert (samples["cmyk.tif"][:, :8] == (0, 255, 255)).all() and (samples["cmyk.tif"][:, 8:] == 255).all()
    assert (samples["grey16.png"][:, :4] == 0).all() and (samples["grey16.png"][:, 4:8] == 255).all()
    assert (samples["grey16.png"][:, 8:] == 128).all()
    assert (samples["palette.png"][:, :8] == 255).all() and (samples["palette.png"][:, 8:] == (0, 0, 255)).all()
    assert (samples["rgba.png"][:, :5] == 255).all() and (samples["rgba.png"][:, 5:10] == (0, 0, 255)).all()
    assert (np.abs(samples["rgba.png"][:, 10:].astype(int) - 127) <= 1).all()
    assert (samples["la.png"] == 255).all() and (samples["grey.png"] == 77).all()


def test_rerun_is_byte_identical_across_worker_counts(tmp_path, image_folder):
    options = ShardOptions(image_size=48, shard_size=5, quality=90)
    shard_images([str(image_folder)], tmp_path / "one", options, workers=1, progress=False)
    shard_images([str(image_folder)], tmp_path / "two", options, workers=2, progress=False)
    first, second = output_files(tmp_path / "one"), output_files(tmp_path / "two")
    assert len([n for n in first if n.endswith(".tar")]) == 3
    assert first == second


@pytest.mark.slow
def test_kill_minus_nine_then_resume_equals_clean_run(tmp_path):
    src = write_image_folder(tmp_path / "in", num_images=60, size=256, num_classes=3)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.cli", "shard", "--input", str(src), "--output", str(out),
               "--shard-size", "2", "--format", "png", "--resize", "none"]
    kill_shard_run_mid_way(command, out)
    (out / "shard-000029.tar").write_bytes(b"half a tar")     # killed between tar rename and stats write
    (out / ".shard-000028.tar.k1ll3d.tmp").write_bytes(b"\0" * 100)   # killed while writing the tar

    assert subprocess.run(command, cwd=REPO, capture_output=True).returncode == 0
    shard_images([str(src)], tmp_path / "clean", ShardOptions(shard_size=2, format="png", resize="none"),
                 progress=False)
    assert output_files(out) == output_files(tmp_path / "clean")
    assert not list(out.glob("*.tmp"))
    keys = [key for tar in sorted(out.glob("*.tar")) for key in read_tar(tar)]
    assert len(keys) == len(set(keys)) == 60


@pytest.mark.slow
def test_workers_end_with_a_killed_sharder_and_the_rerun_completes(tmp_path):
    """SIGTERM (a scheduler's preemption) or SIGKILL of `shard --workers 2` ends its spawn workers within
    seconds instead of leaving them waiting on their task queue forever."""
    import psutil

    src = write_image_folder(tmp_path / "in", num_images=60, size=256, num_classes=3)
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        out = tmp_path / f"out-{signal_number}"
        command = [sys.executable, "-m", "pipeline.cli", "shard", "--input", str(src), "--output", str(out),
                   "--shard-size", "2", "--format", "png", "--resize", "none", "--workers", "2"]
        workers = kill_shard_run_mid_way(command, out, signal_number)
        assert workers, "the sharder had started no worker processes"
        procs = []
        for pid in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.append(psutil.Process(pid))
        _, alive = psutil.wait_procs(procs, timeout=10)
        assert not alive, f"workers still running 10 s after the sharder got signal {signal_number}: {alive}"
        assert subprocess.run(command, cwd=REPO, capture_output=True).returncode == 0
        assert (out / "manifest.json").exists() and not list(out.glob("*.tmp"))


def test_nodes_write_disjoint_shards_and_merge_equals_single_node(tmp_path, image_folder, monkeypatch):
    options = ShardOptions(image_size=32, shard_size=2, dedupe=True)
    (image_folder / "city" / "000003.png").write_bytes((image_folder / "city" / "000007.png").read_bytes())
    out = tmp_path / "multi"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    summary = shard_images([str(image_folder)], out, options, progress=False)
    assert summary["shards_mine"] == 3 and not summary["merged"] and not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-{i:06d}.tar" for i in (0, 2, 4)]
    with pytest.raises(ShardError, match="3 of 6 shards are not complete"):
        merge_manifests(out)
    shard_images([str(image_folder)], out, options, node_rank=1, num_nodes=2, progress=False)
    assert cli_main(["shard", "--merge-manifests", str(out)]) == 0

    shard_images([str(image_folder)], tmp_path / "single", options, node_rank=0, num_nodes=1, progress=False)
    assert output_files(out) == output_files(tmp_path / "single")
    assert list(rejected(out).values()) == ["duplicate"]


def test_resolve_node_sources(monkeypatch):
    assert resolve_node() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert resolve_node() == (0, 1)                # an sbatch script's own command: one process
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert resolve_node() == (3, 4)                # task 3 of an srun step of 4
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_node() == (1, 2) and resolve_node(0, 3) == (0, 3)
    with pytest.raises(ShardError, match="rank"):
        resolve_node(2, 2)


def test_file_lists_numeric_labels_and_sorting(tmp_path):
    for name in ("b.png", "a.png"):
        save(tmp_path / "img" / name, Image.fromarray(procedural_image(0, 16)))
    (tmp_path / "l.tsv").write_text("label\tfilepath\n7\timg/b.png\n2\timg/a.png\n")
    found = discover_inputs([tmp_path / "l.tsv"])
    assert [(Path(i.path).name, i.label) for i in found.items] == [("a.png", 2), ("b.png", 7)]
    assert found.classes == []
    (tmp_path / "names.csv").write_text("path,label,caption\nimg/a.png,cat\n")  # short row: no caption
    named = discover_inputs([tmp_path / "names.csv"])
    assert named.classes == ["cat"] and named.items[0].label == 0 and named.items[0].caption is None
    with pytest.raises(ShardError, match="mix class names"):
        discover_inputs([tmp_path / "l.tsv", tmp_path / "names.csv"])
    (tmp_path / "bad.csv").write_text("where,label\nimg/a.png,1\n")
    with pytest.raises(ShardError, match="no path column"):
        discover_inputs([tmp_path / "bad.csv"])


def test_errors_before_any_work(tmp_path, image_folder, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    out = tmp_path / "out"
    assert cli_main(["shard", "--input", str(tmp_path / "empty"), "--output", str(out)]) == 2
    assert "no input images found" in capsys.readouterr().err and not out.exists()

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli_main(["shard", "--input", str(image_folder), "--output", str(blocker / "out")]) == 2
    assert "not a writable folder" in capsys.readouterr().err

    assert cli_main(["shard", "--input", str(image_folder), "--output", str(out), "--image-size", "16"]) == 0
    before = output_files(out)
    assert cli_main(["shard", "--input", str(image_folder), "--output", str(out), "--image-size", "24"]) == 2
    assert "image_size: 16 -> 24" in capsys.readouterr().err and output_files(out) == before
