"""Hostile and damaged inputs: each case builds its file, then checks the readers skip it with a reason or stop
with an error naming it, never hang (test timeouts), never crash, and never write outside the output folder."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from data.codes import CodeManifest, CodeReader, verify_codes, write_corpus
from data.codes.format import code_schema
from data.codes.reader import CodeFileError
from data.demo_images import write_image_folder
from data.files import AtomicFile, atomic_write, temp_files_of
from data.shards import ShardOptions, discover_inputs, shard_images
from data.stream import ShardStream
from data.tar import (BadSample, ShardReadError, count_tar_samples, iter_tar_members, read_samples, sample_contents,
                      shard_sizes)
from pipeline.tokenize import decode_views

REPO = Path(__file__).resolve().parent.parent
BLOCK = 512


# ------------------------------------------------------------------------------------ hand-made tars
def tar_header(name: bytes, size: int, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    """A ustar header with a correct checksum (``size_field`` replaces the encoded size verbatim)."""
    header = bytearray(BLOCK)
    header[:len(name)] = name
    header[100:108], header[108:116], header[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    header[124:136] = size_field if size_field is not None else b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def tar_member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return tar_header(name, len(data), kind) + data + b"\0" * (-len(data) % BLOCK)


def tar_bytes(*members: bytes) -> bytes:
    return b"".join(members) + b"\0" * (2 * BLOCK)


def png_bytes(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def good_sample(key: str, seed: int, label: int = 1) -> bytes:
    return tar_member(f"{key}.png".encode(), png_bytes(seed)) + tar_member(f"{key}.cls".encode(), str(label).encode())


# ------------------------------------------------------------------------------------ tar headers
@pytest.mark.timeout(30)
@pytest.mark.parametrize("record", [b"0 path=x\n", b"-5 path=x\n", b"3 path=x\n", b"999 path=x\n", b"x path=y\n",
                                    b"11 nokeyval\n"])
def test_bad_pax_records_are_an_error_not_a_hang(tmp_path, record):
    path = tmp_path / "pax.tar"
    path.write_bytes(tar_bytes(good_sample("a", 0), good_sample("a2", 1), tar_member(b"PaxHeader", record, b"x"),
                               good_sample("b", 2)))
    with pytest.raises(ShardReadError, match=r"pax\.tar.*pax record"):
        list(iter_tar_members(str(path)))
    assert count_tar_samples(str(path)) == 2  # the samples before the damage, with a warning
    samples = list(read_samples(str(path)))  # the sample being assembled when the damage came ("a2") is unusable
    assert [(s.key, "pax record" in s.error) for s in samples] == [("a", False), ("a2", True)]
    with pytest.raises(BadSample, match="tar_error") as caught:
        sample_contents(samples[1])
    assert caught.value.reason == "tar_error" and sample_contents(samples[0]) == ("png", 1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", ["garbage", "size_not_octal", "size_past_end", "negative_base256", "fifo"])
def test_garbled_headers_name_the_shard(tmp_path, case):
    path = tmp_path / f"{case}.tar"
    if case == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif case == "size_not_octal":
        path.write_bytes(tar_bytes(tar_header(b"a.png", 0, size_field=b"9z9z9z9z9z9\0")))
    elif case == "size_past_end":
        path.write_bytes(tar_bytes(tar_header(b"a.png", 1 << 40)))
    elif case == "negative_base256":
        path.write_bytes(tar_bytes(tar_header(b"a.png", 0, size_field=b"\xff" * 12)))
    else:
        os.mkfifo(path)  # opening it for reading would block forever
    with pytest.raises(ShardReadError, match=case):
        list(iter_tar_members(str(path)))


def test_non_utf8_member_names_are_skipped_with_a_reason(tmp_path):
    path = tmp_path / "names.tar"
    path.write_bytes(tar_bytes(good_sample("a", 0), tar_member(b"b\xff\xfe.png", png_bytes(1)),
                               tar_member(b"b\xff\xfe.cls", b"2"), good_sample("c", 2)))
    samples = list(read_samples(str(path)))  # one entry per unusable key, not per member
    assert [(s.key, bool(s.error)) for s in samples] == [("a", False), ("b\\xff\\xfe", True), ("c", False)]
    assert samples[1].error.startswith("bad_name: ") and "not valid UTF-8" in samples[1].error
    stream = ShardStream(path, batch_size=2, image_size=16, rank=0, world_size=1, shuffle=False)
    assert sorted(k for batch in stream for k in batch["key"]) == ["a", "c"]
    assert stream.stats["reasons"] == {"bad_name": 1}
    json.dumps([s.key for s in samples])  # the skipped list and the code file can hold every key


def test_sizes_json_is_checked(tmp_path, caplog):
    shard = tmp_path / "s-000000.tar"
    shard.write_bytes(tar_bytes(good_sample("a", 0), good_sample("b", 1)))
    sizes = tmp_path / "sizes.json"
    for bad in ("{", '{"s-000000.tar": -1}', '{"s-000000.tar": "2"}', "[2]"):
        sizes.write_text(bad)
        with pytest.raises(ValueError, match="sizes.json"):
            shard_sizes([str(shard)])
    sizes.write_text('{"s-000000.tar": 1000000}')  # more samples than the file can hold
    with pytest.raises(ValueError, match=r"lists 1000000 samples for .*s-000000\.tar"):
        shard_sizes([str(shard)])
    sizes.write_text('{"s-000000.tar": 3}')
    assert shard_sizes([str(shard)]) == ([3], "sizes.json")
    with caplog.at_level(logging.WARNING, logger="varitok.tar"):
        assert shard_sizes([str(shard)], recount=True)[0] == [2]
    assert "listed 3, counted 2" in caplog.text


# ------------------------------------------------------------------------------------ a whole stage
@pytest.fixture(scope="module")
def hostile_shards(tmp_path_factory):
    """A shard folder from `varitok shard` (2 shards), plus a garbage tar and a tar with a non-UTF-8 member
    name, and no sizes.json (so every tar is counted from its headers)."""
    root = tmp_path_factory.mktemp("hostile")
    images = write_image_folder(root / "images", num_images=8, size=32, num_classes=2)
    shard_images([images], root / "shards", ShardOptions(image_size=32, format="png", shard_size=4), progress=False)
    shards = root / "shards"
    (shards / "sizes.json").unlink()
    (shards / "shard-000002.tar").write_bytes(b"this is not a tar" * 100)
    bad_name = tar_member(b"z\xff.png", png_bytes(6))
    (shards / "shard-000003.tar").write_bytes(tar_bytes(good_sample("z1", 5, 0), bad_name))
    return shards


@pytest.mark.timeout(120)
def test_one_bad_shard_does_not_stop_the_stream(hostile_shards, caplog):
    with caplog.at_level(logging.WARNING):
        stream = ShardStream(hostile_shards, batch_size=3, image_size=32, num_workers=0, shuffle=False)
    assert stream.sizes == [4, 4, 0, 2] and "shard-000002.tar" in caplog.text  # header counts: an upper bound
    keys = [key for batch in stream for key in batch["key"]]
    assert len(keys) == 9 and "z1" in keys
    assert stream.stats["reasons"].get("tar_error", 0) >= 1
    # 4 batches: the unit's stream goes past the non-UTF-8 key (counted) and repeats from its start
    stream = ShardStream(hostile_shards, batch_size=3, image_size=32, num_workers=0, shuffle=False, drop_last=False)
    keys = [key for batch in stream for key in batch["key"]]
    assert len(keys) == 12 and stream.stats["reasons"] == {"tar_error": 1, "bad_name": 1}


@pytest.mark.timeout(300)
def test_one_bad_shard_does_not_stop_tokenize(hostile_shards, tmp_path, monkeypatch):
    from models.tokenizer import Tokenizer, TokenizerConfig
    from pipeline.cli import main as cli
    from pipeline.tokenize import read_skipped, tokenize

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(0)
    tok = tmp_path / "tok"
    Tokenizer(TokenizerConfig.from_yaml(REPO / "configs/tokenizer/tiny.yaml", [])).save_pretrained(tok)
    out = tmp_path / "codes"
    summary = tokenize(tok, str(hostile_shards), out, batch_size=4, image_size=32, rank=0, world_size=1,
                       progress=False)
    assert summary["parts_written"] == 4 and summary["images"] == 9
    skipped = read_skipped(out)
    reasons = {entry["shard"]: entry["reason"] for entry in skipped}
    assert reasons["shard-000002.tar"].startswith("tar_error") and "shard-000002.tar" in reasons["shard-000002.tar"]
    assert reasons["shard-000003.tar"].startswith("bad_name")
    assert len(CodeReader(out)) == 9 and verify_codes(out).ok
    assert cli(["verify", "codes", str(out), "--shards", str(hostile_shards)]) == 0


@pytest.mark.timeout(120)
def test_damaged_sample_bytes_are_caught_by_the_member_digests(tmp_path):
    images = write_image_folder(tmp_path / "images", num_images=2, size=32, num_classes=2)
    shard_images([images], tmp_path / "shards", ShardOptions(image_size=32, format="png", shard_size=2),
                 progress=False)
    path = tmp_path / "shards" / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    members = {name: offset for name, offset in _member_offsets(bytes(data))}
    cls_name = next(n for n in members if n.endswith(".cls"))
    data[members[cls_name]] ^= 0x01  # the label "0" becomes "1": a decodable, silently wrong sample
    path.write_bytes(bytes(data))
    samples = list(read_samples(str(path)))
    assert len(samples) == 2 and not [s.error for s in samples if s.error]  # the tar itself is fine
    reasons = []
    for sample in samples:
        try:
            decode_views(sample, "center", 32)
            reasons.append("ok")
        except BadSample as exc:
            reasons.append(exc.reason)
    assert sorted(reasons) == ["damaged_sample", "ok"]
    stream = ShardStream(path, batch_size=1, image_size=32, rank=0, world_size=1)
    keys = {k for batch in stream for k in batch["key"]}
    assert len(keys) == 1 and stream.stats["reasons"]["damaged_sample"] >= 1  # the stream decodes the same way


def _member_offsets(data: bytes):
    """(name, data offset) of every member of a well-formed tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            yield member.name, member.offset_data


# ------------------------------------------------------------------------------------ input discovery
def _one_image_folder(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "a" / "img.png")
    return root


@pytest.mark.timeout(60)
def test_symlink_loops_give_each_image_once_and_finish(tmp_path):
    root = _one_image_folder(tmp_path / "in")
    os.symlink("..", root / "a" / "up")            # a/up -> in: a loop
    os.symlink(".", root / "a" / "here")           # a/here -> a
    (root / "b").mkdir()
    os.symlink("../a", root / "b" / "to_a")        # a second way into a
    os.symlink("../..", root / "b" / "up2")        # b/up2 -> the parent of in: walks in again
    os.symlink("a/img.png", root / "alias.png")    # a link to a file already found
    start = time.monotonic()
    found = discover_inputs([root])
    assert time.monotonic() - start < 10
    assert [Path(item.path).relative_to(root).as_posix() for item in found.items] == ["a/img.png"]
    reasons = sorted(entry["reason"] for entry in found.skipped)
    assert "symlink_loop" in reasons and "duplicate_link" in reasons


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_folder_tree_deeper_than_the_recursion_limit_is_walked(tmp_path):
    deep = tmp_path / "in"
    deep.mkdir()
    for _ in range(1200):  # deeper than Python's recursion limit (1000)
        deep = deep / "d"
        os.mkdir(deep)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(deep / "img.png")
    try:
        assert len(discover_inputs([tmp_path / "in"]).items) == 1
    finally:  # shutil.rmtree (pytest's clean-up) recurses per level: remove the tree bottom up
        (deep / "img.png").unlink()
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent


@pytest.mark.timeout(120)
def test_fifos_devices_and_huge_files_are_rejected_without_reading_them(tmp_path):
    root = _one_image_folder(tmp_path / "in")
    os.mkfifo(root / "a" / "b.jpg")                  # open() of a FIFO waits for a writer forever
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as handle:
        handle.truncate(5 << 30)                     # a 5 GB sparse file: no disk used, 5 GB if read whole
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "list.txt").write_text(f"/dev/zero.png\n{sparse}\n{tmp_path / 'pipe.png'}\n")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    (tmp_path / "list2.txt").write_text(f"{tmp_path / 'zero.png'}\n")
    found = discover_inputs([root])
    assert [e["reason"] for e in found.skipped] == ["not_a_file"] and len(found.items) == 1
    out = tmp_path / "out"
    summary = shard_images([str(root), str(tmp_path / "list.txt"), str(tmp_path / "list2.txt")], out,
                           ShardOptions(image_size=8, shard_size=10, dedupe=True), workers=1, progress=False)
    assert summary["written"] == 1 and summary["walk_skipped_by_reason"] == {"not_a_file": 1}
    rejected = {Path(e["path"]).name: e["reason"] for e in map(json.loads, (out / "rejected.jsonl").open())}
    assert rejected == {"dev/zero.png".split("/")[-1]: "missing", "huge.jpg": "too_large", "pipe.png": "not_a_file",
                        "zero.png": "not_a_file"}


# ------------------------------------------------------------------------------------ writes
def test_planted_links_in_the_output_are_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    src = _one_image_folder(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("shard-000000.tar.tmp", "sizes.json.tmp", "manifest.json.tmp", "shard-000000.stats.json.tmp",
                 "sizes.json", "manifest.json", "rejected.jsonl"):
        os.symlink(victim, out / name)
    shard_images([src], out, ShardOptions(image_size=8), progress=False)
    assert victim.read_text() == "precious"
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 1}
    assert not (out / "sizes.json").is_symlink()

    codes = tmp_path / "codes"
    codes.mkdir()
    os.symlink(victim, codes / "manifest.json.lock")
    with pytest.raises(ValueError, match="manifest.json.lock is a symbolic link"):
        CodeManifest.create(codes, {"config_hash": "x"}, 2, 1, [16], [2, 2])
    assert victim.read_text() == "precious"

    from pipeline.config import RunConfig, save_resolved_config

    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / "config.yaml")
    save_resolved_config(RunConfig(), run)
    assert victim.read_text() == "precious" and "seed" in (run / "config.yaml").read_text()


def test_atomic_file_leaves_nothing_on_error_and_fresh_temp_names(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with AtomicFile(target) as handle:
            handle.write(b"half")
            assert len(temp_files_of(target)) == 1
            raise RuntimeError("killed")
    assert not target.exists() and not temp_files_of(target)
    atomic_write(target, b"whole")
    assert target.read_bytes() == b"whole" and oct(target.stat().st_mode & 0o777) == "0o644"


# ------------------------------------------------------------------------------------ code parts
def _raw_part(out: Path, index: int, keys, labels, grains, codes, lengths, sizes=(16, 16)) -> None:
    """Write part ``index`` bypassing CodeWriter's checks and record it consistently (size and sha256),
    as a buggy or hostile writer would."""
    manifest = CodeManifest.load(out)
    offsets = np.concatenate([[0], np.cumsum([c.size for c in codes])]).astype(np.int32)
    values = np.concatenate([c.reshape(-1) for c in codes]).astype(np.uint16)
    table = pa.table([pa.array(keys), pa.array(np.asarray(labels, dtype=np.int32)),
                      pa.array(np.zeros(len(keys), dtype=np.uint8)), pa.array([g.tobytes() for g in grains]),
                      pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                      pa.array(np.asarray(lengths, dtype=np.int32))], schema=code_schema(manifest.dtype))
    path = out / f"part-{index:06d}.arrow"
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    manifest.record_part(index, len(keys), "raw", int(sum(lengths)), path.stat().st_size,
                         hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.mark.parametrize("case, message", [
    ("code_too_big", "codes outside the codebook sizes"), ("length_lies", "length != sum 4\\*\\*grain"),
    ("label_too_small", "labels outside"), ("label_too_big", "labels outside -1..3"),
    ("truncated", "bytes on disk but"), ("truncated_unrecorded_size", "not a readable Arrow IPC file")])
def test_code_parts_are_validated_when_opened(tmp_path, case, message):
    out = tmp_path / "codes"
    CodeManifest.create(out, {"config_hash": "x"}, 2, 2, [16, 16], [2, 2])
    grains = [np.zeros((2, 2), dtype=np.uint8), np.array([[1, 0], [0, 0]], dtype=np.uint8)]
    codes = [np.ones((4, 2), dtype=np.uint16), np.ones((7, 2), dtype=np.uint16)]
    labels, lengths = [0, 1], [4, 7]
    if case == "code_too_big":
        codes[1][3, 1] = 16
    elif case == "length_lies":
        codes[1], lengths[1] = np.ones((100, 2), dtype=np.uint16), 100  # consistent with the codes, not the grain
    elif case == "label_too_small":
        labels[0] = -7
    elif case == "label_too_big":
        labels[1] = 4
    _raw_part(out, 0, ["a", "b"], labels, grains, codes, lengths)
    path = out / "part-000000.arrow"
    if case.startswith("truncated"):
        path.write_bytes(path.read_bytes()[:-200])
        if case == "truncated_unrecorded_size":
            manifest = json.loads((out / "manifest.json").read_text())
            manifest["parts"][0].update(file_bytes=0, sha256="")
            (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CodeFileError, match=f"part-000000.arrow.*{message}"):
        CodeReader(out, num_classes=4)
    if case == "label_too_big":
        assert len(CodeReader(out)) == 2  # without a class count only labels < -1 are wrong
    if case == "code_too_big":  # a trusted re-open (a worker, after the main process checked) skips the value pass
        assert len(CodeReader(out, validate=False)) == 2


# ------------------------------------------------------------------------------------ property tests
PROPERTY_SCRIPT = r"""
import hashlib, json, os, random, shutil, signal, sys, tempfile
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import numpy as np
from data.tar import BadSample, ShardReadError, count_tar_samples, iter_tar_members, read_samples, sample_contents
from pipeline.tokenize import decode_views
from data.codes import CodeReader
from data.codes.reader import CodeFileError

shard, codes_dir, work, count = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
rng = random.Random(0)

def mutants(data):
    for i in range(count):
        kind = i % 3
        if kind == 0:
            yield "random", bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, len(data))))
        elif kind == 1:
            yield "truncate", data[:rng.randrange(0, len(data))]
        else:
            flipped = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                position = rng.randrange(len(data))
                flipped[position] ^= 1 << rng.randrange(8)
            yield "flip", bytes(flipped)

def alarm(*_):
    raise TimeoutError("a reader took more than 10 s")
signal.signal(signal.SIGALRM, alarm)

def decoded(sample):
    try:
        return decode_views(sample, "center", 32)
    except BadSample as exc:
        return None, str(exc)

def original_samples(path):
    return {s.key: (s.members, decoded(s)) for s in read_samples(str(path))}

reference = original_samples(shard)
outcomes, violations = {}, []
for kind, blob in mutants(shard.read_bytes()):
    path = work / "mutant.tar"
    path.write_bytes(blob)
    signal.alarm(10)
    try:
        try:
            list(iter_tar_members(str(path)))
            outcome = "read"
        except ShardReadError as exc:
            assert str(path) in str(exc), exc
            outcome = "error"
        count_tar_samples(str(path))
        for sample in read_samples(str(path)):
            try:
                sample_contents(sample)  # what the stream and tokenize accept before decoding
            except BadSample:
                continue
            original = reference.get(sample.key)
            if original is None or any(original[0].get(k) != v for k, v in sample.members.items()):
                violations.append(f"reader passed on a changed sample {sample.key!r} ({kind})")
        for sample in read_samples(str(path)):
            views, label = decoded(sample)
            if views is None:
                continue  # skipped with a reason
            original = reference.get(sample.key)
            if original is None or original[1][1] != label or not (original[1][0] == views).all():
                violations.append(f"tokenize decoded a changed sample {sample.key!r} ({kind})")
    finally:
        signal.alarm(0)
    outcomes[f"shard {kind} {outcome}"] = outcomes.get(f"shard {kind} {outcome}", 0) + 1

part = codes_dir / "part-000000.arrow"
original_part = part.read_bytes()
reference = [(r.key, r.label, r.grain.tobytes(), r.codes.tobytes()) for r in CodeReader(codes_dir)]
for kind, blob in mutants(original_part):
    copy = work / "codes"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(codes_dir, copy)
    (copy / "part-000000.arrow").write_bytes(blob)
    signal.alarm(10)
    try:
        for digests in (True, False):
            try:
                reader = CodeReader(copy, check_digests=digests)
                rows = [(r.key, r.label, r.grain.tobytes(), r.codes.tobytes()) for r in reader]
                reader.gather(list(range(len(reader))))
                outcome = "read"
                if digests and rows != reference:
                    violations.append(f"CodeReader passed on changed rows ({kind})")
            except CodeFileError as exc:
                assert "part-000000.arrow" in str(exc), exc
                outcome = "error"
            outcomes[f"part {kind} digests={digests} {outcome}"] = outcomes.get(
                f"part {kind} digests={digests} {outcome}", 0) + 1
    finally:
        signal.alarm(0)
print(json.dumps({"outcomes": outcomes, "violations": violations}))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_bytes_truncations_and_bit_flips_never_hang_crash_or_pass_wrong_samples(tmp_path):
    images = write_image_folder(tmp_path / "images", num_images=4, size=32, num_classes=2)
    shard_images([images], tmp_path / "shards", ShardOptions(image_size=32, format="png", shard_size=4),
                 progress=False)
    codes = write_corpus(tmp_path / "codes", rows=6, views=2, sizes=(64, 32), max_rows_per_batch=4)
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, "-c", PROPERTY_SCRIPT, str(REPO), str(tmp_path / "shards/shard-000000.tar"),
                           str(codes), str(work), "300"], capture_output=True, text=True, timeout=850,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]  # a crash of the interpreter would show as a signal here
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["violations"] == [], result
    outcomes = result["outcomes"]
    assert sum(v for k, v in outcomes.items() if k.startswith("shard")) == 300
    assert outcomes.get("shard flip error", 0) > 0 and outcomes.get("shard truncate error", 0) > 0
    assert sum(v for k, v in outcomes.items() if k.startswith("part") and "digests=True" in k) == 300
    assert all(not k.endswith("read") for k in outcomes if k.startswith("part") and "digests=True" in k), outcomes


def test_planted_folder_links_are_refused_not_written_through(tmp_path):
    from pipeline.checkpoint import CheckpointManager
    from pipeline.tokenize import _write_skipped

    outside = tmp_path / "outside"
    outside.mkdir()
    codes = tmp_path / "codes"
    codes.mkdir()
    os.symlink(outside, codes / "skipped")
    with pytest.raises(ValueError, match="skipped is a symbolic link"):
        _write_skipped(codes, 0, "s.tar", [{"key": "k", "reason": "r"}])
    assert not list(outside.iterdir())

    class OneProcess:  # what CheckpointManager touches before the DeepSpeed save
        is_main_process, process_index, num_processes, device = True, 0, 1, torch.device("cpu")

        class state:  # noqa: N801
            deepspeed_plugin = None

        def wait_for_everyone(self):
            pass

        def save_state(self, directory):
            Path(directory, "state.bin").write_bytes(b"x")
            raise RuntimeError("stop after the temporary folder was made")

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.symlink(outside, run / "checkpoints" / ".tmp-step-1")
    os.symlink(tmp_path / "victim", run / "checkpoints" / ".shared-fs-probe")
    manager = CheckpointManager(run, OneProcess(), 1, {})
    with pytest.raises(RuntimeError, match="stop after"):
        manager.save(1)
    assert not list(outside.iterdir()) and not (tmp_path / "victim").exists()
    assert (run / "checkpoints" / ".tmp-step-1" / "state.bin").is_file()  # a real folder replaced the link
