"""varitok tokenize / verify codes / stats codes / decode-codes on tiny shards with a random tiny tokenizer.

The corpus: 24 procedural 64 px PNGs in 12 shards of 2, tokenized once (module fixture) as the reference
that the round-trip, resume, multi-process and verify tests compare against.
"""
from __future__ import annotations

import io
import hashlib
import json
import os
import shutil
import signal
import socket
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

from data.codes import CodeReader, ManifestMismatchError
from data.demo_images import write_image_folder
from data.shards import ShardOptions, shard_images
from models.tokenizer import ImageCodes, Tokenizer, TokenizerConfig
from pipeline.cli import main as cli
from pipeline.tokenize import tokenize

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tokenizer" / "tiny.yaml"
NUM_IMAGES, SHARD_SIZE = 24, 2
NUM_SHARDS = NUM_IMAGES // SHARD_SIZE
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)


def _save_tokenizer(directory: Path, seed: int, *overrides: str) -> Path:
    torch.manual_seed(seed)
    Tokenizer(TokenizerConfig.from_yaml(TINY, list(overrides))).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(shard dir, tokenizer export dir, reference code dir) with the reference tokenized in process."""
    root = tmp_path_factory.mktemp("tokenize")
    images = write_image_folder(root / "images", num_images=NUM_IMAGES, size=64, num_classes=4)
    shard_images([images], root / "shards", ShardOptions(image_size=64, format="png", shard_size=SHARD_SIZE),
                 progress=False)
    tok_dir = _save_tokenizer(root / "tok", seed=0)
    summary = tokenize(tok_dir, str(root / "shards"), root / "ref", batch_size=4, rank=0, world_size=1,
                       progress=False)
    assert summary["images"] == NUM_IMAGES and summary["rows"] == NUM_IMAGES and summary["skipped"] == 0
    return root / "shards", tok_dir, root / "ref"


def _rows(code_dir: Path) -> list[tuple]:
    """Every row as (key, label, view, grain bytes, codes bytes), sorted."""
    reader = CodeReader(code_dir)
    return sorted((r.key, r.label, r.view, r.grain.tobytes(), r.codes.tobytes())
                  for r in (reader[i] for i in range(len(reader))))


def _shard_images(shard: Path) -> tuple[list[str], torch.Tensor, list[int]]:
    """(keys, float N x 3 x 64 x 64 in [-1, 1], labels) of a shard, read with tarfile + PIL."""
    keys, images, labels = [], [], []
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in sorted(n for n in members if n.endswith(".png")):
        key = name[:-4]
        pixels = np.array(Image.open(io.BytesIO(members[name])).convert("RGB"))
        keys.append(key)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)
        labels.append(int(members[f"{key}.cls"]))
    return keys, torch.stack(images), labels


def _run_cli(*args: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_round_trip_matches_the_tokenizer_on_the_same_images(corpus):
    shards, tok_dir, ref = corpus
    tok = Tokenizer.from_pretrained(tok_dir).eval()
    reader = CodeReader(ref)
    rows = {(reader[i].key, reader[i].view): reader[i] for i in range(len(reader))}
    assert len(rows) == NUM_IMAGES and {view for _, view in rows} == {0}
    for shard in sorted(shards.glob("*.tar"))[:2]:
        keys, images, labels = _shard_images(shard)
        expected = tok.encode(images)  # one batch per shard, as tokenize batches them
        stored = [rows[(key, 0)] for key in keys]
        assert [r.label for r in stored] == labels
        for record, codes in zip(stored, expected):
            assert np.array_equal(record.grain, codes.grain.numpy())
            assert np.array_equal(record.codes, codes.codes.numpy())
        decoded = tok.decode([ImageCodes(torch.from_numpy(np.array(r.grain)),
                                         torch.from_numpy(r.codes.astype(np.int64)))
                              for r in stored])
        assert torch.equal(decoded, tok.decode(expected))
    grains = np.stack([r.grain for r in rows.values()])
    assert 0 < grains.mean() < 1, "a random router should use both levels somewhere in the corpus"


@pytest.mark.slow
def test_kill_9_then_resume_gives_identical_rows(corpus, tmp_path):
    shards, tok_dir, ref = corpus
    out = tmp_path / "codes"
    proc = _run_cli("tokenize", "--tokenizer", str(tok_dir), "--shards", str(shards), "--output", str(out),
                    "--batch-size", "4", "--workers", "0", "--no-progress")
    deadline = time.time() + 90
    while not list(out.glob("part-*.arrow")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    recorded = json.loads((out / "manifest.json").read_text())["parts"]
    assert 1 <= len(list(out.glob("part-*.arrow"))) < NUM_SHARDS and len(recorded) < NUM_SHARDS, \
        "the run was not interrupted mid-way"
    summary = tokenize(tok_dir, str(shards), out, batch_size=4, rank=0, world_size=1, progress=False)
    assert summary["parts_already_complete"] == len(recorded)
    assert summary["parts_written"] == NUM_SHARDS - len(recorded)
    assert not list(out.glob(".part-*"))
    assert _rows(out) == _rows(ref)
    assert cli(["verify", "codes", str(out), "--shards", str(shards)]) == 0


@pytest.mark.slow
def test_two_processes_equal_one_process(corpus, tmp_path):
    shards, tok_dir, ref = corpus
    out = tmp_path / "codes"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_run_cli("tokenize", "--tokenizer", str(tok_dir), "--shards", str(shards), "--output", str(out),
                      "--batch-size", "4", "--workers", "0", "--no-progress",
                      env_extra={"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                 "MASTER_PORT": str(port)})
             for rank in range(2)]
    outputs = [p.communicate(timeout=100) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    summary = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["images"] == NUM_IMAGES and summary["parts_written"] == NUM_SHARDS
    assert outputs[1][0] == ""  # only rank 0 reports
    parts = json.loads((out / "manifest.json").read_text())["parts"]
    assert [p["index"] for p in parts] == list(range(NUM_SHARDS))
    assert [p["source_shard"] for p in parts] == [f"shard-{i:06d}.tar" for i in range(NUM_SHARDS)]
    assert _rows(out) == _rows(ref)


@pytest.mark.slow
def test_srun_tasks_without_a_launcher_split_the_parts(corpus, tmp_path):
    """``srun -n 2 varitok tokenize ...`` (no torchrun, no rendezvous): each task takes its own parts from
    SLURM's variables, so together they write every part once (before, every task was rank 0 of 1)."""
    shards, tok_dir, ref = corpus
    out = tmp_path / "codes"
    procs = [_run_cli("tokenize", "--tokenizer", str(tok_dir), "--shards", str(shards), "--output", str(out),
                      "--batch-size", "4", "--workers", "0", "--no-progress",
                      env_extra={"SLURM_PROCID": str(task), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                                 "SLURM_LOCALID": str(task)})
             for task in range(2)]
    outputs = [p.communicate(timeout=100) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    summary = json.loads(outputs[0][0].strip().splitlines()[-1])   # without a group, task 0 reports its own parts
    assert summary["world_size"] == 2 and summary["parts_written"] == NUM_SHARDS // 2
    parts = json.loads((out / "manifest.json").read_text())["parts"]
    assert [p["index"] for p in parts] == list(range(NUM_SHARDS))
    assert _rows(out) == _rows(ref)


def _rewrite_part(code_dir: Path, index: int, table: pa.Table) -> None:
    """Replace part ``index`` with ``table`` and update its manifest entry (as a buggy writer would)."""
    path = code_dir / f"part-{index:06d}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    manifest = json.loads((code_dir / "manifest.json").read_text())
    entry = next(p for p in manifest["parts"] if p["index"] == index)
    entry["rows"], entry["file_bytes"] = table.num_rows, path.stat().st_size
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest["totals"]["rows"] = sum(p["rows"] for p in manifest["parts"])
    (code_dir / "manifest.json").write_text(json.dumps(manifest))


def _read_part(code_dir: Path, index: int) -> pa.Table:
    return pa.ipc.open_file(str(code_dir / f"part-{index:06d}.arrow")).read_all()


def _verify(code_dir: Path, shards: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli(["verify", "codes", str(code_dir), "--shards", str(shards)])
    return code, capsys.readouterr().out


def test_verify_catches_damage(corpus, tmp_path, capsys):
    shards, _, ref = corpus
    code, report = _verify(ref, shards, capsys)
    assert code == 0 and report.startswith("OK"), report

    deleted = shutil.copytree(ref, tmp_path / "deleted")
    (deleted / "part-000003.arrow").unlink()
    code, report = _verify(deleted, shards, capsys)
    assert code == 1 and "part-000003.arrow: missing" in report and "expected key(s) missing" in report

    truncated = shutil.copytree(ref, tmp_path / "truncated")
    path = truncated / "part-000005.arrow"
    path.write_bytes(path.read_bytes()[:-100])
    code, report = _verify(truncated, shards, capsys)
    assert code == 1 and "part-000005.arrow" in report and "truncated" in report

    out_of_range = shutil.copytree(ref, tmp_path / "out_of_range")
    table = _read_part(out_of_range, 2)
    codes = table.column("codes").combine_chunks()
    values = codes.values.to_numpy().copy()
    values[0] = 256  # tiny.yaml codebooks have 256 entries
    bad = pa.ListArray.from_arrays(codes.offsets, pa.array(values), type=codes.type)
    column = table.schema.get_field_index("codes")
    _rewrite_part(out_of_range, 2, table.set_column(column, table.schema.field("codes"), bad))
    code, report = _verify(out_of_range, shards, capsys)
    assert code == 1 and "part-000002.arrow: codes outside the codebook sizes [256, 256]" in report

    missing_key = shutil.copytree(ref, tmp_path / "missing_key")
    table = _read_part(missing_key, 7)
    dropped = table.column("key")[0].as_py()
    _rewrite_part(missing_key, 7, table.slice(1))
    code, report = _verify(missing_key, shards, capsys)
    assert code == 1 and "1 expected key(s) missing" in report and dropped in report

    assert cli(["verify", "codes", str(missing_key)]) == 0, "without --shards the keys are not checked"


def test_tencrop_gives_ten_distinct_views_per_image(corpus, tmp_path, capsys):
    shards, tok_dir, _ = corpus
    first = str(sorted(shards.glob("*.tar"))[0])
    out = tmp_path / "tencrop"
    summary = tokenize(tok_dir, first, out, views="tencrop", batch_size=8, rank=0, world_size=1, progress=False)
    assert summary["images"] == SHARD_SIZE and summary["rows"] == 10 * SHARD_SIZE
    reader = CodeReader(out)
    keys, views = reader.keys(), reader.views()
    for key in np.unique(keys):
        assert sorted(views[keys == key].tolist()) == list(range(10))
    codes = {(r.key, r.view): r.codes.tobytes() for r in (reader[i] for i in range(len(reader)))}
    assert len({codes[(keys[0], v)] for v in range(10)}) > 1, "views must be different crops"
    capsys.readouterr()
    assert cli(["verify", "codes", str(out), "--shards", first]) == 0, capsys.readouterr().out


def test_another_tokenizer_is_refused(corpus, tmp_path, capsys):
    shards, tok_dir, ref = corpus
    other = _save_tokenizer(tmp_path / "other", seed=1)
    before = (ref / "manifest.json").read_text()
    with pytest.raises(ManifestMismatchError, match="refusing to mix tokenizers"):
        tokenize(other, str(shards), ref, rank=0, world_size=1, progress=False)
    capsys.readouterr()
    assert cli(["tokenize", "--tokenizer", str(other), "--shards", str(shards), "--output", str(ref),
                "--workers", "0", "--no-progress"]) == 2
    assert "refusing to mix tokenizers" in capsys.readouterr().err
    assert (ref / "manifest.json").read_text() == before
    with pytest.raises(ManifestMismatchError):  # same tokenizer, other views: also another corpus
        tokenize(tok_dir, str(shards), ref, views="flip", rank=0, world_size=1, progress=False)


@pytest.mark.slow
def test_granularity_ratio_retargets_an_entropy_router_and_is_refused_otherwise(corpus, tmp_path, capsys):
    shards, tok_dir, _ = corpus
    first = str(sorted(shards.glob("*.tar"))[0])
    entropy = _save_tokenizer(tmp_path / "entropy", 0, "router.mode=entropy",
                              "router.entropy_quantiles=[0.0,1.0,2.0,3.5]")
    lengths = {}
    for ratio in (0.0, 1.0):
        out = tmp_path / f"ratio-{ratio}"
        tokenize(entropy, first, out, granularity_ratio=[ratio], rank=0, world_size=1, progress=False)
        lengths[ratio] = CodeReader(out).lengths.tolist()
    assert lengths == {0.0: [16] * SHARD_SIZE, 1.0: [64] * SHARD_SIZE}  # 4x4 regions: all coarse / all fine
    capsys.readouterr()
    assert cli(["tokenize", "--tokenizer", str(tok_dir), "--shards", first, "--output", str(tmp_path / "x"),
                "--granularity-ratio", "0.3", "--workers", "0", "--no-progress"]) == 2
    assert "needs a tokenizer with an entropy router" in capsys.readouterr().err


def test_corrupt_samples_are_skipped_and_listed(corpus, tmp_path, capsys):
    _, tok_dir, _ = corpus
    shard = tmp_path / "bad-000000.tar"
    good = Image.new("RGB", (64, 64), (200, 30, 30))
    buffer = io.BytesIO()
    good.save(buffer, format="PNG")
    with tarfile.open(shard, "w") as tar:
        for name, data in [("a.png", buffer.getvalue()), ("b.png", b"not a png"), ("c.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "codes"
    summary = tokenize(tok_dir, str(shard), out, rank=0, world_size=1, progress=False)
    assert summary["images"] == 1 and summary["skipped"] == 2
    skipped = [json.loads(line) for line in (out / "skipped" / "part-000000.jsonl").read_text().splitlines()]
    assert [(e["key"], e["reason"].split(":")[0]) for e in skipped] == [("b", "decode_error"), ("c", "missing_image")]
    capsys.readouterr()
    assert cli(["verify", "codes", str(out), "--shards", str(shard)]) == 0
    assert "2 sample(s) skipped" in capsys.readouterr().out


def test_stats_and_decode_codes_write_pngs(corpus, tmp_path, capsys):
    _, tok_dir, ref = corpus
    capsys.readouterr()
    assert cli(["stats", "codes", str(ref), "--png", str(tmp_path / "lengths.png"),
                "--json", str(tmp_path / "stats.json")]) == 0
    assert "region share" in capsys.readouterr().out
    stats = json.loads((tmp_path / "stats.json").read_text())
    lengths = CodeReader(ref).lengths
    assert stats["rows"] == NUM_IMAGES and stats["codes"] == int(lengths.sum())
    assert stats["codes_per_image"]["mean"] == pytest.approx(lengths.mean())
    assert sum(stats["region_share"]) == pytest.approx(1.0)
    assert Image.open(tmp_path / "lengths.png").size[0] > 100

    keys = CodeReader(ref).keys()[:3].tolist()
    assert cli(["decode-codes", str(ref), "--tokenizer", str(tok_dir), "--keys", *keys,
                "--out", str(tmp_path / "grid.png")]) == 0
    grid = np.array(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 68, 2 * 68, 3)  # 3 keys x (decoded | overlay), 2 px padding
    assert cli(["decode-codes", str(ref), "--tokenizer", str(tok_dir), "--keys", "nokey",
                "--out", str(tmp_path / "x.png")]) == 2


def test_parts_of_any_rank_layout_are_reused(corpus, tmp_path):
    """Parts finished under one rank layout are reused, not rewritten, under another: rank 0 of 2 writes the
    even parts; rank 1 of 3 owns parts 1, 4, 7, 10, reuses 4 and 10, writes 1 and 7; one rank finishes the rest."""
    shards, tok_dir, ref = corpus
    out = tmp_path / "codes"

    def part_files() -> dict[int, tuple[int, str]]:
        parts = json.loads((out / "manifest.json").read_text())["parts"]
        return {p["index"]: ((out / f"part-{p['index']:06d}.arrow").stat().st_mtime_ns, p["sha256"]) for p in parts}

    first = tokenize(tok_dir, str(shards), out, batch_size=4, rank=0, world_size=2, progress=False)
    assert (first["parts_mine"], first["parts_already_complete"], first["parts_written"]) == (6, 0, 6)
    written = part_files()
    assert sorted(written) == [0, 2, 4, 6, 8, 10]
    second = tokenize(tok_dir, str(shards), out, batch_size=4, rank=1, world_size=3, progress=False)
    assert (second["parts_mine"], second["parts_already_complete"], second["parts_written"]) == (4, 2, 2)
    assert sorted(part_files()) == [0, 1, 2, 4, 6, 7, 8, 10]
    last = tokenize(tok_dir, str(shards), out, batch_size=4, rank=0, world_size=1, progress=False)
    assert (last["parts_mine"], last["parts_already_complete"], last["parts_written"]) == (NUM_SHARDS, 8, 4)
    after = part_files()
    assert sorted(after) == list(range(NUM_SHARDS))
    assert all(after[i] == written[i] for i in written)  # the 2-rank run's files are untouched
    assert _rows(out) == _rows(ref)
    assert cli(["verify", "codes", str(out), "--shards", str(shards)]) == 0
