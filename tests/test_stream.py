"""Streaming loader: shard specs, round trips, equal steps per rank, exact resume, bad data, transforms."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from data.demo_images import procedural_image
import data.stream as stream_module
from data.stream import ShardStream
from data.tar import expand_shard_spec, iter_tar_members
from data.transforms import (crop_resize_flip, decode_pil, decode_torchvision, load_image, sample_augmentation,
                             to_unit_range)

SIZE = 16


def encode(pixels: np.ndarray, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def pixels_for(shard: int, index: int, width: int = SIZE, height: int = SIZE) -> np.ndarray:
    """A deterministic ``height x width x 3`` image for sample (shard, index)."""
    return procedural_image(shard * 1000 + index, max(width, height), label=index % 4)[:height, :width]


def write_shards(root: Path, counts: list[int], naming: str = "ours", sizes_json: bool = True,
                 width: int = SIZE, height: int = SIZE) -> dict[str, tuple[np.ndarray, int]]:
    """Write shards with ``counts[i]`` samples each; returns {key: (pixels, label)}.

    ``ours``: ``test-{i:06d}.tar`` with png + json + cls and sizes.json; ``img2dataset``:
    ``{i:05d}.tar``, 9-digit keys, jpg + json + txt and a parquet beside each tar (no labels).
    """
    root.mkdir(parents=True, exist_ok=True)
    expected, sizes = {}, {}
    for shard, count in enumerate(counts):
        name = f"test-{shard:06d}.tar" if naming == "ours" else f"{shard:05d}.tar"
        with wds.TarWriter(str(root / name), mtime=0) as writer:
            for index in range(count):
                pixels = pixels_for(shard, index, width, height)
                if naming == "ours":
                    key, label = f"s{shard:03d}i{index:04d}", index % 4
                    writer.write({"__key__": key, "png": encode(pixels), "cls": str(label).encode(),
                                  "json": json.dumps({"width": width, "height": height}).encode()})
                else:
                    key, label = f"{shard:05d}{index:04d}", -1
                    writer.write({"__key__": key, "jpg": encode(pixels, "jpeg"), "txt": b"a caption",
                                  "json": json.dumps({"key": key, "status": "success"}).encode()})
                expected[key] = (pixels, label)
        sizes[name] = count
        if naming == "img2dataset":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"key": [f"{shard:05d}{i:04d}" for i in range(count)]}),
                           root / f"{shard:05d}.parquet")
    if sizes_json:
        (root / "sizes.json").write_text(json.dumps(sizes))
    return expected


def run_batches(stream: ShardStream, count: int | None = None) -> list[dict]:
    """The next ``count`` batches, across epoch ends (default: the rest of the current epoch)."""
    out: list[dict] = []
    while True:
        for batch in stream:
            out.append(batch)
            if count is not None and len(out) == count:
                return out
        if count is None:
            return out


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


# ----------------------------------------------------------------------------------------- shard specs
def test_expand_shard_spec_forms_and_errors(tmp_path):
    write_shards(tmp_path, [1, 1, 1])
    names = [str(tmp_path / f"test-{i:06d}.tar") for i in range(3)]
    assert expand_shard_spec(tmp_path) == names
    assert expand_shard_spec(str(tmp_path / "test-{000000..000002}.tar")) == names
    assert expand_shard_spec(",".join(names[:2])) == names[:2]
    assert expand_shard_spec([names[2], names[0]]) == [names[2], names[0]]
    with pytest.raises(FileNotFoundError, match="1 of 4 shards do not exist"):
        expand_shard_spec(str(tmp_path / "test-{000000..000003}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar files"):
        expand_shard_spec(tmp_path / "empty")


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, tar_format):
    path = tmp_path / "x.tar"
    members = {"a.jpg": b"1" * 700, "d" * 120 + "/k.cls": b"3", "p" * 90 + "/" + "q" * 60 + ".txt": b"",
               "\u00e9t\u00e9.json": b"{}" * 300, "__meta__": b"skipped"}
    with tarfile.open(path, "w", format=tar_format) as archive:
        directory = tarfile.TarInfo("a_dir")
        directory.type = tarfile.DIRTYPE  # not a regular file: skipped
        archive.addfile(directory)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    del members["__meta__"]
    assert list(iter_tar_members(str(path))) == list(members.items())
    assert [n for n, d in iter_tar_members(str(path), read_data=False)] == list(members)
    path.write_bytes(path.read_bytes()[:1200])  # cut inside the second member's header
    with pytest.raises(tarfile.ReadError, match="truncated|garbled"):
        list(iter_tar_members(str(path)))


# ----------------------------------------------------------------------------------------- round trips
def test_round_trip_pixels_labels_each_key_once(tmp_path):
    expected = write_shards(tmp_path, [5, 7, 4])
    stream = ShardStream(tmp_path, batch_size=4, image_size=SIZE, crop="center", flip=False, seed=3,
                         shuffle_buffer=8, world_size=1, rank=0)
    assert stream.sizes_source == "sizes.json" and stream.steps_per_epoch == 4
    batches = run_batches(stream)
    keys = keys_of(batches)
    assert len(batches) == 4 and sorted(keys) == sorted(expected)
    for batch in batches:
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, SIZE, SIZE)
        for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
            pixels, want_label = expected[key]
            want = torch.from_numpy(pixels).permute(2, 0, 1)
            assert torch.equal(((image + 1) * 127.5).round().to(torch.uint8), want) and int(label) == want_label
    assert stream.epoch == 1 and stream.stats["samples"] == 16 and stream.stats["corrupt"] == 0


def test_img2dataset_shards_without_sizes_json(tmp_path):
    expected = write_shards(tmp_path, [6, 3], naming="img2dataset", sizes_json=False)
    stream = ShardStream(str(tmp_path / "{00000..00001}.tar"), batch_size=3, image_size=12, world_size=1, rank=0)
    assert stream.sizes_source == "tar headers" and stream.sizes == [6, 3]
    batches = run_batches(stream)
    assert sorted(keys_of(batches)) == sorted(expected)
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (9, 3, 12, 12) and images.min() >= -1 and images.max() <= 1
    assert all((b["label"] == -1).all() for b in batches)


def test_shardwriter_output_without_sizes_json(tmp_path):
    pattern = str(tmp_path / "writer-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=4, verbose=0) as sink:
        for index in range(10):
            sink.write({"__key__": f"k{index:03d}", "webp": encode(pixels_for(9, index), "webp"),
                        "cls": index % 3, "txt": "caption"})
    stream = ShardStream(tmp_path, batch_size=5, image_size=SIZE, world_size=1, rank=0, shuffle=False)
    assert stream.sizes_source == "tar headers" and stream.sizes == [4, 4, 2]
    batches = run_batches(stream)
    assert keys_of(batches) == [f"k{i:03d}" for i in range(10)]  # shuffle=False keeps shard order
    assert torch.cat([b["label"] for b in batches]).tolist() == [i % 3 for i in range(10)]


# ----------------------------------------------------------------------------------------- equal steps
@pytest.mark.parametrize("counts", [[23], [3, 11, 6], [1, 9, 2, 5, 8, 3, 4]], ids=["1shard", "3shards", "7shards"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_every_rank_yields_steps_per_epoch(tmp_path, counts, world_size):
    write_shards(tmp_path, counts)
    per_rank_keys = []
    for rank in range(world_size):
        stream = ShardStream(tmp_path, batch_size=2, image_size=8, rank=rank, world_size=world_size,
                             num_workers=2, shuffle_buffer=4)
        assert stream.steps_per_epoch == sum(counts) // (2 * world_size)
        batches = run_batches(stream)
        assert len(batches) == stream.steps_per_epoch
        assert all(len(b["key"]) == 2 for b in batches)
        per_rank_keys.append(set(keys_of(batches)))
    for a in range(world_size):  # ranks read disjoint samples; repeats stay inside a rank
        for b in range(a + 1, world_size):
            assert not per_rank_keys[a] & per_rank_keys[b]


def test_drop_last_false_rounds_up_and_fills_by_repeating(tmp_path):
    expected = write_shards(tmp_path, [7])
    stream = ShardStream(tmp_path, batch_size=3, image_size=8, world_size=1, rank=0, drop_last=False)
    batches = run_batches(stream)
    keys = keys_of(batches)
    assert len(batches) == 3 and len(keys) == 9 and set(keys) == set(expected)
    assert stream.stats["repeated"] == 2
    with pytest.raises(ValueError, match="no full batch"):
        ShardStream(tmp_path, batch_size=4, image_size=8, world_size=2, rank=0)


# ----------------------------------------------------------------------------------------- resume
@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_mid_epoch_and_across_epoch_boundary(tmp_path, num_workers):
    write_shards(tmp_path, [9, 4, 7, 6, 5], width=24, height=18)
    settings = dict(batch_size=3, image_size=12, rank=1, world_size=2, num_workers=num_workers, seed=5,
                    shuffle_buffer=5)
    reference = ShardStream(tmp_path, **settings)
    steps = reference.steps_per_epoch
    uninterrupted = run_batches(reference) + run_batches(reference)  # epochs 0 and 1
    assert len(uninterrupted) == 2 * steps == 10

    for stop in (3, steps, steps + 2):  # mid-epoch, exactly at the boundary, mid next epoch
        first = ShardStream(tmp_path, **settings)
        consumed = run_batches(first, stop)
        first.save_state_file(tmp_path / f"ckpt-{stop}")
        resumed = ShardStream(tmp_path, **settings)
        resumed.load_state_file(tmp_path / f"ckpt-{stop}")
        rest = run_batches(resumed, 2 * steps - stop)
        for got, want in zip(consumed + rest, uninterrupted, strict=True):
            assert got["key"] == want["key"]
            assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"])
        assert (resumed.stats["resume_skipped"] > 0) == (stop != steps)


def test_workers_run_on_across_epochs_and_wait_for_their_ring_slots(tmp_path, monkeypatch):
    """One DataLoader serves consecutive epochs (15 steps, odd, so the two workers swap logical roles at
    each boundary); a one-slot ring makes every worker wait until the main process has converted its
    previous batch. Every epoch equals a fresh stream started at that epoch."""
    write_shards(tmp_path, [9, 4, 7, 6, 5], width=24, height=18)
    settings = dict(batch_size=2, image_size=12, rank=0, world_size=1, num_workers=2, seed=2, shuffle_buffer=5)

    def fresh_epoch(epoch: int) -> list[dict]:
        fresh = ShardStream(tmp_path, **settings)
        fresh.set_epoch(epoch)
        return run_batches(fresh)

    expected = [fresh_epoch(epoch) for epoch in range(3)]
    loaders = []
    monkeypatch.setattr(stream_module, "DataLoader", lambda *a, **k: loaders.append(1) or DataLoader(*a, **k))
    monkeypatch.setattr(stream_module, "RING_SLOTS", 1)
    stream = ShardStream(tmp_path, **settings)
    assert stream.steps_per_epoch == 15
    got = [run_batches(stream), run_batches(stream)]
    stream.set_epoch(2)  # where the stream is anyway: the workers go on
    got.append(run_batches(stream))
    assert len(loaders) == 1
    stream.set_epoch(0)  # anywhere else: they restart there
    got[0:0] = [run_batches(stream)]
    assert len(loaders) == 2
    for epoch_got, epoch_want in zip(got, [expected[0]] + expected, strict=True):
        assert keys_of(epoch_got) == keys_of(epoch_want)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(epoch_got, epoch_want))


def test_to_unit_range_maps_bytes_to_minus_one_one_for_any_leading_shape():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 3, 16, 16)
    for images in (pixels, pixels[0], pixels[0, 0], pixels[0].permute(0, 1, 3, 2)):
        unit = to_unit_range(images)
        assert unit.dtype == torch.float32 and unit.shape == images.shape and unit.is_contiguous()
        assert torch.equal(unit, images.float() / 127.5 - 1)
    assert unit.min() == -1 and unit.max() == 1


def test_uint8_output_is_the_float_output_in_bytes(tmp_path):
    write_shards(tmp_path, [6, 5], width=20, height=16)
    settings = dict(batch_size=2, image_size=12, rank=0, world_size=1, num_workers=1, seed=4, shuffle_buffer=4)
    floats = run_batches(ShardStream(tmp_path, **settings))
    stream = ShardStream(tmp_path, dtype=torch.uint8, **settings)
    raw = run_batches(stream) + run_batches(stream)  # held across a whole epoch of ring reuse
    assert keys_of(raw[:len(floats)]) == keys_of(floats)
    for got, want in zip(raw, floats):
        assert got["image"].dtype == torch.uint8 and torch.equal(to_unit_range(got["image"]), want["image"])
    assert len({batch["image"].untyped_storage().data_ptr() for batch in raw}) == len(raw)  # not ring slots
    with pytest.raises(ValueError, match="dtype must be"):
        ShardStream(tmp_path, dtype=torch.float16, **settings)


def test_state_from_another_setup_is_refused(tmp_path):
    write_shards(tmp_path, [8])
    stream = ShardStream(tmp_path, batch_size=2, image_size=8, world_size=1, rank=0)
    run_batches(stream, 1)
    other = ShardStream(tmp_path, batch_size=4, image_size=8, world_size=1, rank=0)
    with pytest.raises(ValueError, match="batch_size: saved 2, now 4"):
        other.load_state_dict(stream.state_dict())
    merged = {"ranks": {"0": stream.state_dict()}}
    again = ShardStream(tmp_path, batch_size=2, image_size=8, world_size=1, rank=0)
    again.load_state_dict(merged)
    assert again.batch_in_epoch == 1


# ----------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("resampled", [False, True])
def test_deterministic_and_epochs_differ(tmp_path, resampled):
    write_shards(tmp_path, [6, 6, 6], width=20, height=16)

    def epoch_batches(seed: int, epoch: int) -> list[dict]:
        stream = ShardStream(tmp_path, batch_size=3, image_size=12, world_size=1, rank=0, seed=seed,
                             resampled=resampled, shuffle_buffer=6)
        stream.set_epoch(epoch)
        return run_batches(stream)

    a, b = epoch_batches(0, 0), epoch_batches(0, 0)
    assert keys_of(a) == keys_of(b) and all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert keys_of(epoch_batches(0, 1)) != keys_of(a)
    assert keys_of(epoch_batches(1, 0)) != keys_of(a)
    if not resampled:
        assert sorted(keys_of(epoch_batches(0, 1))) == sorted(keys_of(a))


# ----------------------------------------------------------------------------------------- bad data
def test_corrupt_member_and_truncated_tar_are_skipped_and_counted(tmp_path, caplog):
    write_shards(tmp_path, [6, 6, 6])
    bad = tmp_path / "test-000001.tar"
    with wds.TarWriter(str(bad), mtime=0) as writer:  # sample 2 of shard 1 holds garbage bytes
        for index in range(6):
            png = b"\x89PNG not really" if index == 2 else encode(pixels_for(1, index))
            writer.write({"__key__": f"s001i{index:04d}", "png": png, "cls": b"1"})
    truncated = tmp_path / "test-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    for world_size in (1, 2):
        totals = {"corrupt": 0, "decode_error": 0, "tar_error": 0}
        for rank in range(world_size):
            stream = ShardStream(tmp_path, batch_size=2, image_size=8, rank=rank, world_size=world_size,
                                 num_workers=0)
            batches = run_batches(stream)
            assert len(batches) == stream.steps_per_epoch == 18 // (2 * world_size)
            stats = stream.stats
            totals["corrupt"] += stats["corrupt"]
            for reason in ("decode_error", "tar_error"):
                totals[reason] += stats["reasons"].get(reason, 0)
            assert "s001i0002" not in keys_of(batches)
        assert totals["decode_error"] >= 1 and totals["tar_error"] >= 1
        assert totals["corrupt"] == totals["decode_error"] + totals["tar_error"]
    assert "skipping" in caplog.text


def test_unreadable_shards_raise_a_clear_error_instead_of_spinning(tmp_path, caplog):
    write_shards(tmp_path, [4])
    shard = tmp_path / "test-000000.tar"
    with wds.TarWriter(str(shard), mtime=0) as writer:
        for index in range(4):
            writer.write({"__key__": f"x{index}", "png": b"garbage"})
    stream = ShardStream(tmp_path, batch_size=2, image_size=8, world_size=1, rank=0)
    with pytest.raises(RuntimeError, match="could be decoded"):
        run_batches(stream)
    assert caplog.text.count("(decode_error)") == 3  # 9 failures before giving up, 3 warnings


# ----------------------------------------------------------------------------------------- transforms
def test_gray_and_rgba_become_rgb_over_white():
    gray = np.full((4, 6), 77, dtype=np.uint8)
    assert decode_pil(encode(gray)).shape == (3, 4, 6) and (decode_pil(encode(gray)) == 77).all()
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :2, 3] = 255  # left half opaque red, right half fully transparent
    for decode in (decode_pil, decode_torchvision):
        rgb = decode(encode(rgba))
        assert rgb.shape == (3, 4, 4)
        assert rgb[:, :, :2].tolist() == [[[200] * 2] * 4, [[0] * 2] * 4, [[0] * 2] * 4]
        assert (rgb[:, :, 2:] == 255).all()


def test_crop_offset_and_flip_geometry():
    image = torch.arange(2 * 5, dtype=torch.uint8).reshape(1, 2, 5).expand(3, -1, -1)  # H=2, W=5
    assert crop_resize_flip(image, 2, 0.0, False)[0].tolist() == [[0, 1], [5, 6]]
    assert crop_resize_flip(image, 2, 0.5, False)[0].tolist() == [[2, 3], [7, 8]]  # round(0.5 * 3) = 2
    assert crop_resize_flip(image, 2, 1.0, True)[0].tolist() == [[4, 3], [9, 8]]
    pixels = pixels_for(0, 0, 40, 30)
    pil = load_image(encode(pixels), 12, 0.5, False, "pil")
    tv = load_image(encode(pixels), 12, 0.5, False, "torchvision")
    assert pil.shape == (3, 12, 12) and torch.equal(pil, tv)  # lossless png: both decoders agree


def test_sample_augmentation_is_a_pure_function_of_its_seed():
    draws = [sample_augmentation((0, 0, 0, p), "random", True) for p in range(64)]
    assert draws == [sample_augmentation((0, 0, 0, p), "random", True) for p in range(64)]
    assert 20 < sum(flip for _, flip in draws) < 44 and len({o for o, _ in draws}) == 64
    assert all(0 <= o <= 1 for o, _ in draws)
    assert sample_augmentation((1, 2), "center", False) == (0.5, False)


def test_decoders_refuse_decompression_bombs_without_touching_pil_globals():
    import struct
    import zlib

    from PIL import Image

    from data.transforms import MAX_PIXELS, decode_pil, decode_torchvision

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    limit_before = Image.MAX_IMAGE_PIXELS
    side = int(MAX_PIXELS ** 0.5) + 1  # header-only PNG declaring just over the limit
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")
    for decode in (decode_pil, decode_torchvision):
        with pytest.raises(ValueError, match="pixels"):
            decode(bomb)
    assert Image.MAX_IMAGE_PIXELS == limit_before


# ----------------------------------------------------------------------------------------- elastic resume
def run_layout(root: Path, world_size: int, workers: int, batches: int | None = None, *, load: Path | None = None,
               save: Path | None = None, **settings) -> dict[int, dict]:
    """Every rank of a ``world_size x workers`` layout (one ShardStream per rank, ``workers`` real DataLoader
    workers each) runs ``batches`` batches (default: the rest of the epoch), after loading the states in
    ``load``; saves the states to ``save``. Returns {global entry: batch}: rank r's batch t is entry t * R + r."""
    streams = [ShardStream(root, rank=rank, world_size=world_size, num_workers=workers, **settings)
               for rank in range(world_size)]
    by_entry: dict[int, dict] = {}
    counts = []
    for rank, stream in enumerate(streams):
        if load is not None:
            stream.load_state_file(load)
        start = stream.batch_in_epoch
        got = run_batches(stream, batches)
        counts.append(len(got))
        by_entry.update({(start + index) * world_size + rank: batch for index, batch in enumerate(got)})
        if save is not None:
            stream.save_state_file(save)
        stream.close()
    assert len(set(counts)) == 1, f"ranks yielded different batch counts {counts}"
    return by_entry


def same_batches(got: dict[int, dict], want: dict[int, dict]) -> bool:
    return sorted(got) == sorted(want) and all(
        got[e]["key"] == want[e]["key"] and torch.equal(got[e]["image"], want[e]["image"])
        and torch.equal(got[e]["label"], want[e]["label"]) for e in got)


ELASTIC = dict(batch_size=2, image_size=8, seed=7, shuffle_buffer=4, canonical_units=4)


@pytest.mark.slow
def test_epoch_resumed_on_other_layouts_sees_every_sample_once(tmp_path):
    """2 ranks x 2 workers (grad_accum 1: K = 2 micro-batches per optimizer step) run 2 steps, resume as
    1 rank x 1 worker (grad_accum 2) for 2 steps, then as 2 ranks x 1 worker to the end of the epoch. 4 units
    with 6 samples each, 3 batches of 2 per unit: the epoch uses every sample exactly once. Every entry equals
    the uninterrupted run's, and two resumes from the same state give identical batches."""
    expected = write_shards(tmp_path / "shards", [6, 6, 6, 6], width=12, height=10)
    shards = tmp_path / "shards"
    reference = run_layout(shards, 2, 2, **ELASTIC)
    assert sorted(reference) == list(range(12)) and sorted(keys_of(list(reference.values()))) == sorted(expected)

    part1 = run_layout(shards, 2, 2, 2, save=tmp_path / "a", **ELASTIC)
    part2 = run_layout(shards, 1, 1, 4, load=tmp_path / "a", save=tmp_path / "b", grad_accum=2, **ELASTIC)
    again = run_layout(shards, 1, 1, 4, load=tmp_path / "a", grad_accum=2, **ELASTIC)
    part3 = run_layout(shards, 2, 1, load=tmp_path / "b", **ELASTIC)
    assert sorted(part1) == [0, 1, 2, 3] and sorted(part2) == [4, 5, 6, 7] and sorted(part3) == [8, 9, 10, 11]
    assert same_batches(part2, again)  # deterministic in the saved state and the new layout
    epoch = {**part1, **part2, **part3}
    keys = keys_of([epoch[e] for e in sorted(epoch)])
    assert len(keys) == len(expected) and set(keys) == set(expected)  # every sample exactly once
    assert same_batches(epoch, reference)  # and each entry as in the uninterrupted run
    state = json.loads((tmp_path / "b" / "stream-rank00000.json").read_text())
    assert state["format"] == "varitok.stream/2" and state["entries"] == 8 and len(state["positions"]) == 4
    assert "world_size" not in state and state["layout"] == {"world_size": 1, "workers": 1, "grad_accum": 2}


@pytest.mark.slow
@pytest.mark.parametrize("counts", [[5, 9, 2, 7, 4, 6, 3, 8], [23]], ids=["8shards", "1shard"])
def test_entries_do_not_depend_on_the_layout(tmp_path, counts):
    """With 8 canonical units a fresh epoch is the same sequence of entries on 1 x 1, 2 x 2 and 4 x 2 (one
    worker serving 8 units, shuffle buffers per unit), also with more units than shards (modulo split)."""
    write_shards(tmp_path, counts)
    settings = dict(ELASTIC, canonical_units=8)
    one = run_layout(tmp_path, 1, 1, grad_accum=4, **settings)
    assert len(one) == ShardStream(tmp_path, rank=0, world_size=4, **settings).entries_per_epoch
    assert same_batches(run_layout(tmp_path, 2, 2, grad_accum=2, **settings), one)
    assert same_batches(run_layout(tmp_path, 4, 2, **settings), one)


@pytest.mark.slow
def test_equal_steps_per_rank_after_a_layout_change(tmp_path):
    """T = 12 entries (K = 4: 25 samples, 2 x 4 = 8 per step, 3 steps). 1 rank (grad_accum 4) stops after one
    step; 2 ranks (grad_accum 2) and 4 ranks each yield the same number of batches, (12 - 4) / R."""
    write_shards(tmp_path, [7, 6, 5, 7])
    settings = dict(ELASTIC)
    first = run_layout(tmp_path, 1, 1, 4, save=tmp_path / "s", grad_accum=4, **settings)
    assert sorted(first) == [0, 1, 2, 3]
    for world_size, accum in ((2, 2), (4, 1)):
        streams = [ShardStream(tmp_path, rank=r, world_size=world_size, grad_accum=accum, **settings)
                   for r in range(world_size)]
        assert {s.entries_per_epoch for s in streams} == {12}
        for stream in streams:
            stream.load_state_file(tmp_path / "s")
            assert stream.entries == 4 and stream.steps_per_epoch - stream.batch_in_epoch == 8 // world_size
        assert [len(run_batches(s)) for s in streams] == [8 // world_size] * world_size


def test_canonical_unit_and_state_file_errors(tmp_path):
    write_shards(tmp_path / "shards", [6, 6, 6, 6])
    shards = tmp_path / "shards"
    with pytest.raises(ValueError, match=r"4 canonical units cannot be served by 2 ranks x 4 workers = 8 readers"):
        ShardStream(shards, rank=0, world_size=2, num_workers=4, **ELASTIC)
    with pytest.raises(ValueError, match=r"6 canonical units .* 2 ranks x 2 workers .*\(one of \[1, 2, 3, 6\]\)"):
        ShardStream(shards, rank=0, world_size=2, num_workers=2, **dict(ELASTIC, canonical_units=6))
    run_layout(shards, 2, 1, 1, save=tmp_path / "s", **ELASTIC)  # K = 2
    with pytest.raises(ValueError, match="step_entries: saved 2, now 1"):  # the global batch changed
        ShardStream(shards, rank=0, world_size=1, **ELASTIC).load_state_file(tmp_path / "s")
    single = ShardStream(shards, rank=0, world_size=1, grad_accum=2, **ELASTIC)
    single.load_state_file(tmp_path / "s")
    assert single.entries == 2
    states = [json.loads(f.read_text()) for f in sorted((tmp_path / "s").glob("stream-rank*.json"))]
    new_batch = ShardStream(shards, rank=0, world_size=1, **ELASTIC)  # K = 1: accepted only when asked
    new_batch.load_state_dict(states, allow_new_global_batch=True)
    assert new_batch.entries == 2 and len(run_batches(new_batch)) == new_batch.entries_per_epoch - 2 == 10
    with pytest.raises(ValueError, match=r"no position for canonical units \[1, 3\]"):  # rank 1's state missing
        ShardStream(shards, rank=0, world_size=1, grad_accum=2, **ELASTIC).load_state_dict(states[:1])

    (tmp_path / "s" / "stream-rank00001.json").rename(tmp_path / "rank1.json")
    with pytest.raises(ValueError, match=r"no position for canonical units \[1, 3\].*stream-rank\*\.json file"):
        ShardStream(shards, rank=0, world_size=1, grad_accum=2, **ELASTIC).load_state_file(tmp_path / "s")
    same_layout = ShardStream(shards, rank=0, world_size=2, **ELASTIC)
    same_layout.load_state_file(tmp_path / "s")  # node-local checkpoints: each rank needs its own file only
    with pytest.raises(ValueError, match=r"no position for canonical units \[1, 3\] that rank 1 of 2 serves"):
        ShardStream(shards, rank=1, world_size=2, **ELASTIC).load_state_file(tmp_path / "s")
    other = json.loads((tmp_path / "rank1.json").read_text())
    other["entries"] = 4  # a file of another save
    (tmp_path / "s" / "stream-rank00001.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"contradict each other .*stream-rank00001.json: entries: first 2, this 4"):
        ShardStream(shards, rank=0, world_size=1, grad_accum=2, **ELASTIC).load_state_file(tmp_path / "s")
    other["entries"], other["positions"] = 2, {"0": 3, "1": 3}
    (tmp_path / "s" / "stream-rank00001.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="canonical unit 0 has a position in both"):
        ShardStream(shards, rank=0, world_size=1, grad_accum=2, **ELASTIC).load_state_file(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no stream state"):
        ShardStream(shards, rank=0, world_size=1, **ELASTIC).load_state_file(tmp_path / "empty")
    old = {**other, "format": "varitok.stream/1"}
    with pytest.raises(ValueError, match="older varitok whose data order depends on the process layout"):
        ShardStream(shards, rank=0, world_size=1, **ELASTIC).load_state_dict(old)
