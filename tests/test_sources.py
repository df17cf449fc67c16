"""`varitok shard` from Parquet / Arrow image tables, datasets.save_to_disk folders and tar shards (re-shard)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data import sources
from data.demo_images import procedural_image
from data.shards import ShardError, ShardOptions, discover_inputs, process_image, shard_images, write_shard
from test_shard import output_files, read_all, single_node  # noqa: F401  (the fixture runs as one node)

from conftest import REPO, kill_shard_run_mid_way


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def mixed_images(count: int, size: int = 40) -> list[bytes | None]:
    """Encoded images of every kind a Hub dataset holds, with one corrupt, one truncated, one null and
    one non-image cell at fixed places (rows 3, 5, 8, 11)."""
    cells: list[bytes | None] = []
    for i in range(count):
        rgb = Image.fromarray(procedural_image(i, size + i % 3))
        kind = i % 6
        if kind == 0:
            cells.append(encoded(rgb, "JPEG", quality=90))
        elif kind == 1:
            cells.append(encoded(rgb.convert("CMYK"), "JPEG", quality=90))
        elif kind == 2:
            cells.append(encoded(rgb.convert("RGBA"), "PNG"))
        elif kind == 3:
            grey = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
            cells.append(encoded(Image.fromarray(grey), "PNG"))  # 16-bit grey
        else:
            cells.append(encoded(rgb, "PNG"))
    cells[3] = b"\xff\xd8\xff\xe0 not really a jpeg"
    cells[5] = cells[4][: len(cells[4]) // 2]
    cells[8] = None
    cells[11] = b"plain text, not an image"
    return cells


BAD_ROWS = {3: {"not_an_image", "corrupt", "truncated"}, 5: {"truncated", "corrupt"}, 8: {"no_image"},
            11: {"not_an_image"}}


def write_parquet(path: Path, cells: list, labels: list, captions: list, row_group_size: int = 4) -> Path:
    """The Hugging Face layout: ``image`` is a struct {bytes, path}; several row groups."""
    image = pa.array([None if c is None else {"bytes": c, "path": f"{i}.img"} for i, c in enumerate(cells)],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "label": labels, "caption": captions})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def rejected_rows(out: Path) -> dict[tuple[str, int], str]:
    entries = map(json.loads, (out / "rejected.jsonl").read_text().splitlines())
    return {(Path(e["path"]).name, e["row"]): e["reason"] for e in entries}


def check_rows(out: Path, cells: list, options: ShardOptions, file_name: str) -> dict[int, dict]:
    """Every row is in exactly one tar (bytes equal to processing the cell directly) or rejected."""
    samples = read_all(out)
    by_row = {}
    for sample in samples.values():
        meta = json.loads(sample["json"])
        assert Path(meta["source"]).name == file_name
        assert meta["source_row"] not in by_row
        by_row[meta["source_row"]] = sample
    bad = rejected_rows(out)
    assert set(by_row) | {row for _, row in bad} == set(range(len(cells)))
    assert not set(by_row) & {row for _, row in bad}
    for (name, row), reason in bad.items():
        assert name == file_name and reason in BAD_ROWS[row], (row, reason)
    for row, sample in by_row.items():
        assert sample[options.format] == process_image(cells[row], options)[0]
    return by_row


def test_parquet_rows_labels_captions_rejections_and_workers(tmp_path):
    cells = mixed_images(14)
    path = write_parquet(tmp_path / "train.parquet", cells, [i % 3 for i in range(14)],
                         [f"caption {i}" if i != 2 else None for i in range(14)])
    assert pq.ParquetFile(path).num_row_groups == 4
    options = ShardOptions(image_size=32, format="png", shard_size=3, captions=True)
    one = shard_images([str(path)], tmp_path / "one", options, workers=1, progress=False)
    assert one["inputs"] == 14 and one["written"] == 10
    by_row = check_rows(tmp_path / "one", cells, options, "train.parquet")
    for row, sample in by_row.items():
        assert sample["cls"] == str(row % 3).encode()
        assert sample.get("txt") == (None if row == 2 else f"caption {row}".encode())
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["num_inputs"] == 14 and manifest["num_shards"] == 5 and manifest["classes"] == []

    shard_images([str(path)], tmp_path / "two", options, workers=2, progress=False)
    assert output_files(tmp_path / "one") == output_files(tmp_path / "two")
    for rank in range(3):  # one file still spreads over nodes: shard j (3 rows) belongs to node j % 3
        node = shard_images([str(path)], tmp_path / "nodes", options, node_rank=rank, num_nodes=3, progress=False)
        assert node["shards_mine"] == len(range(rank, 5, 3))
    from data.shards import merge_manifests

    merge_manifests(tmp_path / "nodes")
    assert output_files(tmp_path / "nodes") == output_files(tmp_path / "one")


TORCH_PROBE = """
import json, sys
from data.shards import ShardOptions, shard_images
summary = shard_images(sys.argv[1:-1], sys.argv[-1], ShardOptions(image_size=32, shard_size=4), progress=False)
print(json.dumps({"written": summary["written"], "heavy": sorted(m for m in ("torch", "torchvision", "webdataset")
                                                                 if m in sys.modules)}))
"""


def test_table_and_tar_shard_paths_import_no_torch(tmp_path):
    """Sharding a Parquet table or re-sharding tars (discovery, row reads, tar writing, merge) must not load
    torch: its libraries alone are ~0.45 GB of RSS, most of the memory budget of a 1 GB table."""
    cells = [encoded(Image.fromarray(procedural_image(i, 24)), "JPEG") for i in range(10)]
    path = write_parquet(tmp_path / "t.parquet", cells, list(range(10)), [None] * 10, row_group_size=3)
    (tmp_path / "tars").mkdir()
    with wds.ShardWriter(str(tmp_path / "tars" / "part-%05d.tar"), maxcount=4, verbose=0) as sink:
        for i, cell in enumerate(cells):
            sink.write({"__key__": f"{i:05d}", "jpg": cell, "cls": str(i), "txt": f"image {i}"})
    for inputs, out in (([path], "out-table"), ([tmp_path / "tars"], "out-tars")):
        result = subprocess.run([sys.executable, "-c", TORCH_PROBE, *map(str, inputs), str(tmp_path / out)],
                                cwd=REPO, capture_output=True, text=True, check=True)
        assert json.loads(result.stdout.strip().splitlines()[-1]) == {"written": 10, "heavy": []}, out


def test_iter_rows_reads_exactly_the_range_across_row_groups(tmp_path):
    cells = [encoded(Image.new("RGB", (4, 4), (i, 0, 0)), "PNG") for i in range(23)]
    path = write_parquet(tmp_path / "t.parquet", cells, list(range(23)), [str(i) for i in range(23)],
                         row_group_size=5)
    columns = sources.Columns()
    for start, stop in ((0, 23), (4, 6), (5, 10), (7, 22), (22, 23), (10, 10)):
        rows = list(sources.iter_rows(str(path), columns, start, stop))
        assert [r.index for r in rows] == list(range(start, stop))
        assert [r.data for r in rows] == cells[start:stop] and [r.label for r in rows] == list(range(start, stop))
    assert sources.count_rows(str(path), columns) == 23


def write_save_to_disk(folder: Path, cells: list, labels: list, parts: int = 2) -> Path:
    """The ``datasets.save_to_disk`` layout: Arrow stream files listed in state.json (written with pyarrow)."""
    folder.mkdir(parents=True)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.string())])
    per = -(-len(cells) // parts)
    names = []
    for part in range(parts):
        name = f"data-{part:05d}-of-{parts:05d}.arrow"
        names.append(name)
        chunk = range(part * per, min(len(cells), (part + 1) * per))
        with pa.ipc.new_stream(folder / name, schema) as writer:
            for start in range(chunk.start, chunk.stop, 3):  # several record batches per file
                rows = range(start, min(chunk.stop, start + 3))
                writer.write_batch(pa.record_batch(
                    [pa.array([None if cells[i] is None else {"bytes": cells[i], "path": None} for i in rows],
                              type=schema.field("image").type), pa.array([labels[i] for i in rows])],
                    schema=schema))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (folder / "cache-stray.arrow").write_bytes(b"not listed in state.json, so not an input")
    return folder


def test_save_to_disk_folder_with_class_names(tmp_path):
    cells = mixed_images(12)
    names = ["zebra", "cat", "dog"]
    folder = write_save_to_disk(tmp_path / "ds", cells, [names[i % 3] for i in range(12)])
    options = ShardOptions(image_size=24, format="png", shard_size=4)
    summary = shard_images([str(folder)], tmp_path / "out", options, workers=2, progress=False)
    assert summary["inputs"] == 12
    shard_images([str(folder)], tmp_path / "one", options, workers=1, progress=False)
    assert output_files(tmp_path / "out") == output_files(tmp_path / "one")
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {"cat": 0, "dog": 1, "zebra": 2}
    samples = read_all(tmp_path / "out")
    rows = {}
    for sample in samples.values():
        meta = json.loads(sample["json"])
        part = int(Path(meta["source"]).name[5:10])
        rows[part * 6 + meta["source_row"]] = sample
    bad = rejected_rows(tmp_path / "out")
    bad_rows = {int(name[5:10]) * 6 + row for name, row in bad}
    assert set(rows) | bad_rows == set(range(12)) and not set(rows) & bad_rows
    assert bad_rows == set(BAD_ROWS)
    for row, sample in rows.items():
        assert sample["cls"] == str({"cat": 0, "dog": 1, "zebra": 2}[names[row % 3]]).encode()
        assert sample["png"] == process_image(cells[row], options)[0]

    (tmp_path / "dict").mkdir()
    folder.rename(tmp_path / "dict" / "train")
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(ShardError, match="DatasetDict: give one split folder \\(train\\)"):
        discover_inputs([tmp_path / "dict"])
    assert len(discover_inputs([tmp_path / "dict" / "train"]).items) == 12


def write_wds_tars(folder: Path, count: int = 10) -> list[dict]:
    """img2dataset-like tars from webdataset.ShardWriter (4 samples each) with odd samples: a key with dots,
    a sample without an image, a corrupt image, a text label, a .jpeg and a .webp member."""
    folder.mkdir(parents=True)
    written = []
    with wds.ShardWriter(str(folder / "part-%05d.tar"), maxcount=4) as sink:
        for i in range(count):
            rgb = Image.fromarray(procedural_image(50 + i, 36))
            sample = {"__key__": f"{i:04d}", "txt": f"photo {i}", "cls": str(i % 5)}
            if i == 1:
                sample["__key__"] = "0001.with.dots"
            if i == 2:
                sample.pop("cls")
                sample["json"] = json.dumps({"url": "http://x"})  # no image member at all
            elif i == 4:
                sample["jpg"] = b"\xff\xd8 garbage"
            elif i == 6:
                sample["cls"], sample["jpg"] = "dog", encoded(rgb, "JPEG", quality=85)
            elif i == 7:
                sample["jpeg"] = encoded(rgb, "JPEG", quality=85)
            elif i == 9:
                sample["webp"] = encoded(rgb, "WEBP", quality=80)
            else:
                sample["jpg"] = encoded(rgb, "JPEG", quality=85)
            sink.write(sample)
            written.append(sample)
    return written


def test_reshard_img2dataset_tars_and_varitok_shards(tmp_path):
    written = write_wds_tars(tmp_path / "wds")
    assert len(list((tmp_path / "wds").glob("*.tar"))) == 3
    options = ShardOptions(image_size=24, format="jpg", shard_size=3, captions=True, dedupe=True)
    summary = shard_images([str(tmp_path / "wds")], tmp_path / "out", options, workers=2, progress=False)
    assert summary["inputs"] == 10
    shard_images([str(tmp_path / "wds")], tmp_path / "one", options, workers=1, progress=False)
    assert output_files(tmp_path / "out") == output_files(tmp_path / "one")
    reasons = {(name, row): reason for (name, row), reason in rejected_rows(tmp_path / "out").items()}
    assert reasons == {("part-00000.tar", 2): "no_image", ("part-00001.tar", 0): "not_an_image",
                       ("part-00001.tar", 2): "corrupt"}
    samples = read_all(tmp_path / "out")
    assert len(samples) == 7
    for sample in samples.values():
        meta = json.loads(sample["json"])
        i = int(Path(meta["source"]).name[5:10]) * 4 + meta["source_row"]
        image = next(v for k, v in written[i].items() if k in ("jpg", "jpeg", "webp"))
        assert sample["jpg"] == process_image(image, options)[0]
        assert sample["cls"] == str(i % 5).encode() and sample["txt"] == f"photo {i}".encode()

    # re-shard varitok's own output into bigger shards: its digests are checked, a tampered member is refused
    tampered = tmp_path / "out" / "shard-000001.tar"
    with tarfile.open(tampered) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tampered, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name.endswith(".jpg") and member.name == members[0][0].name:
                data = data[:-3] + bytes(3)
            tar.addfile(member, io.BytesIO(data))
    resharded = shard_images([str(tmp_path / "out")], tmp_path / "big", ShardOptions(image_size=16, shard_size=100),
                             progress=False)
    assert resharded["inputs"] == 7 and resharded["written"] == 6
    [entry] = map(json.loads, (tmp_path / "big" / "rejected.jsonl").read_text().splitlines())
    assert entry["reason"] == "corrupt" and entry["path"] == str(tampered) and entry["row"] == 0
    assert "sha256" in entry["detail"]


def test_tar_damaged_after_discovery_rejects_the_rest_as_unreadable(tmp_path):
    write_wds_tars(tmp_path / "wds", count=4)
    tar = tmp_path / "wds" / "part-00000.tar"
    found = discover_inputs([tar])
    assert [item.row for item in found.items] == [0, 1, 2, 3]
    offsets = [m.offset for m in tarfile.open(tar).getmembers()]
    with open(tar, "r+b") as handle:  # cut inside sample 2: samples 0 and 1 stay readable
        handle.truncate(offsets[len(offsets) // 2 + 1] + 100)
    (tmp_path / "out").mkdir()
    stats = write_shard(tmp_path / "out", 0, found.items, 0, ShardOptions(image_size=16))
    assert stats["count"] == 2  # rows 0 and 1 (whose members all precede the cut); 2 and 3 are cut off
    reasons = {entry["row"]: entry["reason"] for entry in stats["rejected"]}
    assert reasons == {2: "unreadable", 3: "unreadable"}
    assert "truncated" in stats["rejected"][-1]["detail"]


def test_dedupe_and_column_flags(tmp_path):
    base = [encoded(Image.fromarray(procedural_image(i, 32)), "PNG") for i in range(5)]
    cells = base + [base[1], base[3]]
    table = pa.table({"id": list(range(7)), "png": cells, "y": [7] * 7, "alt": [f"c{i}" for i in range(7)],
                      "caption": ["wrong"] * 7})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    options = ShardOptions(image_size=16, format="png", shard_size=2, dedupe=True, captions=True,
                           label_column="y", caption_column="alt")
    summary = shard_images([str(tmp_path / "t.parquet")], tmp_path / "out", options, workers=2, progress=False)
    assert summary["written"] == 5 and summary["rejected_by_reason"] == {"duplicate": 2}
    entries = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(e["row"], e["detail"].rsplit("#", 1)[1]) for e in entries] == [(5, "1"), (6, "3")]
    for sample in read_all(tmp_path / "out").values():
        row = json.loads(sample["json"])["source_row"]
        assert sample["cls"] == b"7" and sample["txt"] == f"c{row}".encode()

    with pytest.raises(ShardError, match="--image-column 'alt'.*not binary"):
        discover_inputs([tmp_path / "t.parquet"], ShardOptions(image_column="alt"))
    with pytest.raises(ShardError, match="--label-column 'nope'"):
        discover_inputs([tmp_path / "t.parquet"], ShardOptions(label_column="nope"))
    pq.write_table(pa.table({"name": ["a"], "n": [1]}), tmp_path / "neither.parquet")
    with pytest.raises(ShardError, match="no path column"):  # no image bytes: read as a file list
        discover_inputs([tmp_path / "neither.parquet"])
    (tmp_path / "broken.arrow").write_bytes(b"ARROW1 but not really")
    with pytest.raises(ShardError, match="broken.arrow"):
        discover_inputs([tmp_path / "broken.arrow"])


@pytest.mark.slow
def test_kill_minus_nine_then_resume_equals_clean_run_parquet(tmp_path):
    cells = [encoded(Image.fromarray(procedural_image(i, 256)), "PNG") for i in range(60)]
    path = write_parquet(tmp_path / "big.parquet", cells, [i % 4 for i in range(60)], [None] * 60,
                         row_group_size=7)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.cli", "shard", "--input", str(path), "--output", str(out),
               "--shard-size", "2", "--format", "png", "--resize", "none"]
    kill_shard_run_mid_way(command, out)
    assert subprocess.run(command, cwd=REPO, capture_output=True).returncode == 0
    shard_images([str(path)], tmp_path / "clean", ShardOptions(shard_size=2, format="png", resize="none"),
                 progress=False)
    assert output_files(out) == output_files(tmp_path / "clean")
    assert len(read_all(out)) == 60
