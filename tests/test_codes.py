"""data.codes: Arrow IPC code files, manifest, reader, verify, stats, rank-sharded iteration, batching."""
from __future__ import annotations

import itertools
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data.codes import (CodeIterator, CodeManifest, CodeReader, CodeWriter, ManifestMismatchError, TokenBudgetBatcher,
                        code_schema, code_stats, pack_by_token_budget, rank_positions, verify_codes)

IDENTITY = {"config_hash": "cfg-1", "weights_sha256": "w-1"}
GRAIN_SHAPE = (4, 4)


def synthetic_rows(n: int, seed: int, codebook_sizes=(16384, 4096), num_levels=2, views=1, prefix="img"):
    """n keys x `views` rows of valid random code maps: L = sum 4**grain, codes below the sizes."""
    rng = np.random.default_rng(seed)
    rows = n * views
    grains = rng.integers(0, num_levels, (rows, *GRAIN_SHAPE)).astype(np.uint8)
    lengths = (4 ** grains.astype(np.int64)).reshape(rows, -1).sum(1)
    codes = [np.stack([rng.integers(0, s, length) for s in codebook_sizes], axis=1) for length in lengths]
    keys = [f"{prefix}{seed}_{i // views:04d}" for i in range(rows)]
    return {"keys": keys, "labels": rng.integers(-1, 10, rows), "views": np.tile(np.arange(views), n),
            "grains": grains, "codes": codes}


def write_corpus(out: Path, part_rows=(30, 25, 40), codebook_sizes=(16384, 4096), views=1, max_rows=16):
    manifest = CodeManifest.create(out, IDENTITY, 2, len(codebook_sizes), codebook_sizes, GRAIN_SHAPE)
    parts = []
    for index, n in enumerate(part_rows):
        rows = synthetic_rows(n, index, codebook_sizes, views=views)
        with CodeWriter(out, index, manifest, max_rows_per_batch=max_rows, source_shard=f"s-{index}.tar") as w:
            half = len(rows["keys"]) // 3   # two write calls: batches must still be full-sized
            for sl in (slice(0, half), slice(half, None)):
                w.write(rows["keys"][sl], rows["labels"][sl], rows["views"][sl], rows["grains"][sl],
                        rows["codes"][sl])
        parts.append(rows)
    return manifest, parts


def concat_rows(parts):
    return {k: [x for p in parts for x in p[k]] for k in parts[0]}


def assert_row_equal(record, rows, i):
    assert record.key == rows["keys"][i]
    assert record.label == rows["labels"][i] and record.view == rows["views"][i]
    np.testing.assert_array_equal(record.grain, rows["grains"][i])
    np.testing.assert_array_equal(record.codes, rows["codes"][i])


@pytest.mark.parametrize("sizes, dtype", [((16384, 4096), np.uint16), ((65536, 70000, 16), np.uint32)])
def test_round_trip_bit_exact(tmp_path, sizes, dtype):
    manifest, parts = write_corpus(tmp_path, codebook_sizes=sizes)
    reader = CodeReader(tmp_path)
    rows = concat_rows(parts)
    assert len(reader) == 95 == manifest.refresh().totals["rows"]
    assert all(b.num_rows <= 16 for b in reader.blocks) and [b.num_rows for b in reader.blocks][:2] == [16, 14]
    for i in range(len(reader)):
        record = reader[i]
        assert record.codes.dtype == dtype and record.codes.shape == (len(rows["codes"][i]), len(sizes))
        assert_row_equal(record, rows, i)
    np.testing.assert_array_equal(reader.lengths, [len(c) for c in rows["codes"]])
    assert manifest.parts[1]["source_shard"] == "s-1.tar"
    assert manifest.totals["codes"] == sum(len(c) for c in rows["codes"])


def test_parts_open_with_plain_pyarrow(tmp_path):
    _, parts = write_corpus(tmp_path, part_rows=(10,))
    table = pa.ipc.open_file(str(tmp_path / "part-000000.arrow")).read_all()
    assert table.schema.equals(code_schema(np.dtype(np.uint16)))
    assert table.column_names == ["key", "label", "view", "grain", "codes", "length"]
    row = table.slice(3, 1).to_pylist()[0]
    rows = parts[0]
    assert row["key"] == rows["keys"][3] and row["label"] == rows["labels"][3]
    assert row["grain"] == rows["grains"][3].tobytes()
    assert row["codes"] == rows["codes"][3].reshape(-1).tolist() and row["length"] == len(rows["codes"][3])


def test_random_access_by_global_index_across_parts(tmp_path):
    _, parts = write_corpus(tmp_path)
    reader = CodeReader(tmp_path)
    rows = concat_rows(parts)
    for i in np.random.default_rng(0).integers(0, len(reader), 50).tolist() + [29, 30, 54, 55, 94]:
        assert_row_equal(reader[i], rows, i)
    batch = reader.gather([94, 3, 31, 3])
    assert batch.keys == [rows["keys"][i] for i in (94, 3, 31, 3)] and batch.grains.shape == (4, *GRAIN_SHAPE)
    np.testing.assert_array_equal(batch.codes, np.concatenate([rows["codes"][i] for i in (94, 3, 31, 3)]))
    np.testing.assert_array_equal(batch.lengths, reader.lengths[[94, 3, 31, 3]])
    np.testing.assert_array_equal(batch.labels, np.asarray(rows["labels"])[[94, 3, 31, 3]])
    assert reader[-1].key == rows["keys"][-1] == "img2_0039"
    with pytest.raises(IndexError):
        reader[95]
    counts, edges = reader.length_histogram(bins=4)
    assert counts.sum() == 95 and edges[0] == reader.lengths.min() and edges[-1] == reader.lengths.max()


def test_manifest_refuses_other_tokenizer_or_layout(tmp_path):
    write_corpus(tmp_path, part_rows=(5,))
    with pytest.raises(ManifestMismatchError, match="refusing to mix tokenizers"):
        CodeManifest.create(tmp_path, {**IDENTITY, "weights_sha256": "w-2"}, 2, 2, (16384, 4096), GRAIN_SHAPE)
    with pytest.raises(ManifestMismatchError, match="codebook_sizes"):
        CodeManifest.create(tmp_path, IDENTITY, 2, 2, (16384, 8192), GRAIN_SHAPE)
    again = CodeManifest.create(tmp_path, IDENTITY, 2, 2, (16384, 4096), GRAIN_SHAPE)
    assert again.is_complete(0) and not again.is_complete(1)


def test_writer_rejects_invalid_codes(tmp_path):
    manifest = CodeManifest.create(tmp_path, IDENTITY, 2, 2, (16384, 4096), GRAIN_SHAPE)
    rows = synthetic_rows(4, 0)
    with CodeWriter(tmp_path, 0, manifest) as w:
        with pytest.raises(ValueError, match="img0_0002.*sum 4\\*\\*grain"):
            w.write(rows["keys"], rows["labels"], rows["views"], rows["grains"],
                    rows["codes"][:2] + [rows["codes"][2][:-1]] + rows["codes"][3:])
        bad = [c.copy() for c in rows["codes"]]
        bad[1][0, 1] = 4096
        with pytest.raises(ValueError, match="img0_0001.*outside the codebook"):
            w.write(rows["keys"], rows["labels"], rows["views"], rows["grains"], bad)
        with pytest.raises(ValueError, match="grain levels"):
            w.write(rows["keys"], rows["labels"], rows["views"], rows["grains"] + 2, rows["codes"])
        assert w.rows == 0


def test_incomplete_parts_are_ignored_and_complete_ones_skipped(tmp_path):
    manifest, parts = write_corpus(tmp_path, part_rows=(10, 12))
    with pytest.raises(ValueError, match="already complete"):
        CodeWriter(tmp_path, 1, manifest)
    interrupted = CodeWriter(tmp_path, 2, manifest)   # killed before close: only a temp file exists
    rows = synthetic_rows(5, 9)
    interrupted.write(rows["keys"], rows["labels"], rows["views"], rows["grains"], rows["codes"])
    interrupted._flush(final=True)
    assert interrupted.temp_path.exists() and not (tmp_path / "part-000002.arrow").exists()
    with pytest.raises(RuntimeError):
        with CodeWriter(tmp_path, 3, manifest) as failing:
            failing.write(rows["keys"], rows["labels"], rows["views"], rows["grains"], rows["codes"])
            raise RuntimeError("tokenizer crashed")
    assert not failing.temp_path.exists() and not manifest.is_complete(3)
    reader = CodeReader(tmp_path)
    assert len(reader) == 22 and sorted(reader.part_rows) == [0, 1]
    assert [manifest.is_complete(i) for i in range(4)] == [True, True, False, False]
    report = verify_codes(tmp_path)
    assert report.ok and "leftover temp" in report.notes[0]
    shutil.copy(tmp_path / "part-000000.arrow", tmp_path / "part-000005.arrow")   # renamed, never recorded
    assert len(CodeReader(tmp_path)) == 22
    report = verify_codes(tmp_path)
    assert not report.ok and "part-000005.arrow: part file not recorded" in report.problems[0]


def test_empty_part_is_complete_and_readable(tmp_path):
    manifest = CodeManifest.create(tmp_path, IDENTITY, 2, 2, (16384, 4096), GRAIN_SHAPE)
    with CodeWriter(tmp_path, 0, manifest):
        pass                                                        # a shard whose images were all rejected
    rows = synthetic_rows(3, 1)
    with CodeWriter(tmp_path, 1, manifest) as w:
        w.write(rows["keys"], rows["labels"], rows["views"], rows["grains"], rows["codes"])
    reader = CodeReader(tmp_path)
    assert manifest.parts[0]["rows"] == 0 and len(reader) == 3 and reader[0].key == rows["keys"][0]
    assert verify_codes(tmp_path, expected_keys=rows["keys"]).ok


KILLED_WRITER = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {repo!r} + "/tests"]  # site-packages may hold an unrelated "tests" package
from test_codes import synthetic_rows, CodeManifest, CodeWriter, IDENTITY, GRAIN_SHAPE
manifest = CodeManifest.create({out!r}, IDENTITY, 2, 2, (16384, 4096), GRAIN_SHAPE)
for part in (0, 1):
    if manifest.is_complete(part):
        continue
    rows = synthetic_rows(20, part)
    with CodeWriter({out!r}, part, manifest, max_rows_per_batch=8) as w:
        w.write(rows["keys"], rows["labels"], rows["views"], rows["grains"], rows["codes"])
        if part == 1 and {kill}:
            os.kill(os.getpid(), signal.SIGKILL)   # after two full record batches reached the temp file
"""


def test_kill_9_mid_part_then_rerun(tmp_path):
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parent.parent)

    def run(kill: bool) -> subprocess.CompletedProcess:
        script = KILLED_WRITER.format(repo=repo, out=str(tmp_path), kill=kill)
        return subprocess.run([sys.executable, "-c", script], cwd=repo, timeout=60)

    assert run(True).returncode == -9
    assert len(CodeReader(tmp_path)) == 20 and len(list(tmp_path.glob(".part-000001.arrow.*.tmp"))) == 1
    assert verify_codes(tmp_path).ok
    assert run(False).returncode == 0
    reader = CodeReader(tmp_path)
    rows = concat_rows([synthetic_rows(20, 0), synthetic_rows(20, 1)])
    assert len(reader) == 40 and all(reader[i].key == rows["keys"][i] for i in range(40))
    np.testing.assert_array_equal(reader[39].codes, rows["codes"][39])


def write_raw_part(out: Path, manifest: CodeManifest, index: int, rows: dict, lengths: list[int]):
    """Writes a part bypassing CodeWriter's checks (to plant corrupt values) and records it."""
    offsets = np.concatenate([[0], np.cumsum([c.size for c in rows["codes"]])]).astype(np.int32)
    values = np.concatenate([c.reshape(-1) for c in rows["codes"]]).astype(np.uint16)
    table = pa.table([pa.array(rows["keys"]), pa.array(rows["labels"].astype(np.int32)),
                      pa.array(rows["views"].astype(np.uint8)), pa.array([g.tobytes() for g in rows["grains"]]),
                      pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                      pa.array(np.asarray(lengths, dtype=np.int32))], schema=code_schema(manifest.dtype))
    path = out / f"part-{index:06d}.arrow"
    with pa.ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)
    manifest.record_part(index, len(rows["keys"]), "raw", int(sum(lengths)), path.stat().st_size)


def test_verify_passes_good_corpus_and_checks_keys(tmp_path):
    _, parts = write_corpus(tmp_path, part_rows=(6, 7), views=2)
    keys = sorted(set(concat_rows(parts)["keys"]))
    assert len(keys) == 13
    report = verify_codes(tmp_path, expected_keys=keys, views_per_key=2)
    assert report.ok, report.summary()
    assert report.rows == 26 and report.summary().startswith("OK")
    report = verify_codes(tmp_path, expected_keys=keys + ["img9_0000"], views_per_key=2)
    assert not report.ok and report.problems == ["1 expected key(s) missing: img9_0000"]
    report = verify_codes(tmp_path, expected_keys=keys[1:], views_per_key=2)
    assert report.problems == [f"1 key(s) not among the expected keys: {keys[0]}"]
    report = verify_codes(tmp_path, expected_keys=keys, views_per_key=3)
    assert "13 key(s) do not have exactly 3 distinct views" in report.problems[0]


def test_verify_catches_deleted_and_truncated_parts(tmp_path):
    write_corpus(tmp_path)
    (tmp_path / "part-000001.arrow").unlink()
    data = (tmp_path / "part-000002.arrow").read_bytes()
    (tmp_path / "part-000002.arrow").write_bytes(data[: len(data) // 2])
    report = verify_codes(tmp_path)
    assert not report.ok and len(report.problems) == 2
    assert report.problems[0] == "part-000001.arrow: missing (recorded with 25 rows)"
    assert report.problems[1].startswith("part-000002.arrow:") and "truncated" in report.problems[1]
    assert "FAILED" in report.summary() and report.parts == 1


def test_verify_catches_bad_values_and_duplicates(tmp_path):
    manifest, _ = write_corpus(tmp_path, part_rows=(5,))
    rows = synthetic_rows(6, 7)
    lengths = [len(c) for c in rows["codes"]]
    rows["codes"][4][2, 0] = 16384                                 # out of range in sub-codebook 0
    bad_lengths = list(lengths)
    bad_lengths[1] += 3                                             # inconsistent with grain and codes
    write_raw_part(tmp_path, manifest, 1, rows, bad_lengths)
    rows2 = synthetic_rows(2, 8)
    rows2["keys"] = ["img0_0000", "img0_0000"]                      # duplicates a key of part 0 (view 0)
    rows2["grains"][0, 0, 0] = 3                                    # grain level >= G
    write_raw_part(tmp_path, manifest, 2, rows2, [len(c) for c in rows2["codes"]])
    report = verify_codes(tmp_path, expected_keys=[f"img0_{i:04d}" for i in range(5)] + [f"img7_{i:04d}"
                                                                                          for i in range(6)])
    text = "\n".join(report.problems)
    assert "part-000001.arrow: codes list length != length * K (2) at rows 1" in text
    assert "part-000001.arrow: length != sum 4**grain at rows 1" in text
    assert "part-000001.arrow: codes outside the codebook sizes [16384, 4096] (sub-codebooks [0]) at rows 4" in text
    assert "part-000002.arrow: grain levels >= G (2) at rows 0" in text
    assert "duplicate (key, view) rows: img0_0000/view 0" in text
    assert len(report.problems) == 6   # + "length != sum 4**grain" for the planted grain level 3


def _record_many(out_dir: str, start: int, count: int) -> None:
    manifest = CodeManifest.load(out_dir)
    for index in range(start, start + count):
        manifest.record_part(index, index + 1, f"shard-{index}")


def test_concurrent_manifest_updates_lose_nothing(tmp_path):
    CodeManifest.create(tmp_path, IDENTITY, 2, 2, (16384, 4096), GRAIN_SHAPE)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_record_many, args=(str(tmp_path), start, 40)) for start in (0, 40)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    manifest = CodeManifest.load(tmp_path)
    assert sorted(manifest.parts) == list(range(80))
    assert manifest.totals["rows"] == sum(range(1, 81)) and manifest.totals["parts"] == 80


def test_rank_positions_rule():
    assert rank_positions(5, 0, 2, drop_last=False).tolist() == [0, 2, 4]
    assert rank_positions(5, 1, 2, drop_last=False).tolist() == [1, 3, 0]   # padded by repeating item 0
    assert rank_positions(5, 1, 2, drop_last=True).tolist() == [1, 3]
    assert rank_positions(2, 2, 3, drop_last=False).tolist() == [0]


def test_rank_positions_continue_at_a_global_position():
    # 7 items, 4 consumed, 2 ranks: the remaining 4, 5, 6 padded with item 0 (or truncated to 4, 5)
    assert rank_positions(7, 0, 2, drop_last=False, start=4).tolist() == [4, 6]
    assert rank_positions(7, 1, 2, drop_last=False, start=4).tolist() == [5, 0]
    assert rank_positions(7, 1, 2, drop_last=True, start=4).tolist() == [5]
    assert rank_positions(7, 2, 3, drop_last=False, start=3).tolist() == [5, 1]   # 3..8 over 3 ranks, 7 -> 0, 8 -> 1
    assert rank_positions(7, 0, 3, drop_last=False, start=7).tolist() == []


def run_ranks(make, world: int, saved: list | None, steps: int | None, tmp_path: Path):
    """``world`` iterators ``make(rank, world)``, loaded from the saved ranks' states (any saved world size), each
    taking ``steps`` items (None: the rest of the epoch). Returns (items in global order, states as saved and
    read back the way checkpoints store them: one torch file per rank, weights_only)."""
    import torch

    ranks = [make(rank, world) for rank in range(world)]
    for it in ranks:
        if saved is not None:
            it.load_state_dict(saved)
    per_rank = [list(itertools.islice(iter(it), steps)) for it in ranks]
    assert len({len(items) for items in per_rank}) == 1                 # equal counts per rank
    order = [item for step in zip(*per_rank) for item in step]          # rank r's t-th item: position S + t*R + r
    folder = tmp_path / f"states-{len(list(tmp_path.glob('states-*')))}"
    folder.mkdir()
    for rank, it in enumerate(ranks):
        torch.save(it.state_dict(), folder / f"rank{rank}.pt")
    return order, [torch.load(path, weights_only=True) for path in sorted(folder.glob("rank*.pt"))]


def epoch_positions(num_items: int, segments: list[tuple[int, int | None]], drop_last: bool) -> list[int]:
    """Global positions an epoch hands out in segments of (world, steps per rank; None = to the end)."""
    positions, start = [], 0
    for world, steps in segments:
        remaining = max(0, num_items - start)
        per_rank = remaining // world if drop_last else -(-remaining // world)
        taken = world * (per_rank if steps is None else steps)
        positions += [p % num_items for p in range(start, start + taken)]
        start = min(start + taken, num_items)
    return positions


@pytest.mark.parametrize("drop_last", [False, True])
def test_iterator_resumes_on_another_world_size(tmp_path, drop_last):
    write_corpus(tmp_path / "codes")                                    # 95 rows
    reader = CodeReader(tmp_path / "codes")
    keys = reader.keys()

    def make(rank, world):
        return CodeIterator(reader, rank, world, seed=7, drop_last=drop_last)

    epoch = keys[make(0, 1).indices()].tolist()                         # the global list: one rank, no padding
    uninterrupted, _ = run_ranks(make, 2, None, None, tmp_path)
    first, states = run_ranks(make, 2, None, 10, tmp_path)              # 2 ranks: 20 rows
    assert states[0] == states[1] and states[0]["consumed"] == 20
    second, states = run_ranks(make, 1, states, 16, tmp_path)           # 1 rank: 16 more
    assert states[0]["consumed"] == 36
    third, states = run_ranks(make, 2, states, None, tmp_path)          # 2 ranks: the 59 left, 30 each
    resumed = [r.key for r in first + second + third]
    expected = epoch_positions(95, [(2, 10), (1, 16), (2, None)], drop_last)
    assert resumed == [epoch[p] for p in expected]
    if drop_last:   # the last row of the epoch dropped (59 left on 2 ranks), every other row exactly once
        assert resumed == epoch[:94]
    else:           # every row once, plus the epoch's first row as the one padding item; as an uninterrupted run
        assert resumed == epoch + epoch[:1] == [r.key for r in uninterrupted]
    assert states[0] == states[1] and states[0]["consumed"] == 95
    next_epoch, _ = run_ranks(make, 2, states, None, tmp_path)          # the next epoch, as any 2-rank run has it
    fresh = [make(rank, 2) for rank in range(2)]
    for it in fresh:
        it.set_epoch(1)
    assert [r.key for r in next_epoch] == [r.key for step in zip(*fresh) for r in step]


def test_token_budget_batches_resume_on_another_world_size(tmp_path):
    write_corpus(tmp_path / "codes", part_rows=(20, 24), views=3)
    reader = CodeReader(tmp_path / "codes")
    max_tokens, extra = int(reader.lengths.max()) * 3, 3
    tokens = reader.lengths.astype(np.int64) + extra

    def make(rank, world):
        return TokenBudgetBatcher(reader, max_tokens, rank, world, seed=4, extra_tokens=extra)

    batches = [list(b) for b in make(0, 1).global_items()]
    assert batches == list(make(0, 1)) == [b.tolist() for b in make(0, 3).global_items()]   # layout independent
    num_batches = len(batches)
    assert num_batches > 12 and num_batches % 2 == 0                   # 2 ranks: no padding; after 9 (odd): one
    first, states = run_ranks(make, 2, None, 3, tmp_path)
    second, states = run_ranks(make, 1, states, 3, tmp_path)
    third, states = run_ranks(make, 2, states, None, tmp_path)
    resumed = first + second + third
    assert resumed == batches + batches[:1]                             # every batch once + the padding batch
    assert all(tokens[b].sum() <= max_tokens for b in resumed)
    assert resumed[:-1] == run_ranks(make, 2, None, None, tmp_path)[0]  # as an uninterrupted run (even count)
    assert states[0]["consumed"] == num_batches


@pytest.mark.slow
def test_packed_code_stream_resumes_on_another_world_size(tmp_path):
    """The stage-3 stream (DataLoader workers prefetching packed micro batches): 2 ranks x 2 workers -> 1 rank
    in-process -> 2 ranks x 1 worker reproduce the one-rank epoch, plus one padding batch."""
    import torch

    from data.codes import write_corpus as write_synthetic
    from models.generator import GeneratorConfig
    from pipeline.train_generator import PackedCodeStream

    codes = write_synthetic(tmp_path / "codes", rows=48, max_rows_per_batch=16)
    repo = Path(__file__).resolve().parents[1]
    config = GeneratorConfig.from_yaml(repo / "configs" / "generator" / "tiny.yaml", [
        "dim=32", "heads=2", "position_depth=1", "content_depth=1", "head_dim=16", "head_heads=1", "num_classes=4"])

    def segment(world, workers, steps, saved):
        streams = [PackedCodeStream(str(codes), config, 160, rank, world, seed=5, num_workers=workers)
                   for rank in range(world)]
        for stream in streams:
            if saved is not None:
                stream.load_state_dict(saved)
        steps = len(streams[0].batcher) if steps is None else steps
        per_rank = [[next(stream) for _ in range(steps)] for stream in streams]
        return [b for step in zip(*per_rank) for b in step], [stream.state_dict() for stream in streams]

    whole, _ = segment(1, 0, None, None)
    first, states = segment(2, 2, 2, None)
    second, states = segment(1, 0, 3, states)
    third, states = segment(2, 1, None, states)
    resumed = first + second + third
    assert (len(whole) - 7) % 2 == 1 and len(resumed) == len(whole) + 1 and states[0] == states[1]   # 9 left: 1 pad
    for got, want in zip(resumed, whole + whole[:1]):
        assert all(torch.equal(getattr(got, name), getattr(want, name)) for name in ("position", "content", "label"))
        assert got.num_tokens <= 160


def test_bad_code_order_state_is_refused(tmp_path):
    write_corpus(tmp_path / "codes", part_rows=(20, 24), views=3)
    write_corpus(tmp_path / "other", part_rows=(20, 24), views=3, codebook_sizes=(16384, 4095))  # same rows, lengths
    reader, other = CodeReader(tmp_path / "codes"), CodeReader(tmp_path / "other")
    budget = int(reader.lengths.max()) * 3
    batcher = TokenBudgetBatcher(reader, budget, seed=4)
    list(itertools.islice(batcher, 4))
    state = batcher.state_dict()
    assert state == {"format": "varitok.code-order/2", "epoch": 0, "consumed": 4, "seed": 4, "num_rows": 132,
                     "corpus": state["corpus"], "drop_last": False, "max_tokens": budget, "views": "random",
                     "extra_tokens": 0}
    refusals = {"seed: saved 4, now 5": TokenBudgetBatcher(reader, budget, seed=5),
                f"max_tokens: saved {budget}, now {budget + 1}": TokenBudgetBatcher(reader, budget + 1, seed=4),
                "corpus: saved": TokenBudgetBatcher(other, budget, seed=4),
                "views: saved 'random', now 'all'": TokenBudgetBatcher(reader, budget, seed=4, views="all")}
    for message, fresh in refusals.items():
        with pytest.raises(ValueError, match=f"cannot use the saved code order position.*{message}"):
            fresh.load_state_dict(state)
    num_batches = len(batcher.global_items())
    garbage = {"need counts >= 0": [{**state, "consumed": -1}, {**state, "consumed": "4"}, {**state, "epoch": 1.5},
                                    {**state, "epoch": True}, {k: v for k, v in state.items() if k != "consumed"}],
               f"has only {num_batches} items": [{**state, "consumed": num_batches + 1}],
               "format: saved 'varitok.code-order/9'": [{**state, "format": "varitok.code-order/9"}],
               "expected a state dict": ["garbage", [], [state, 3]],
               "the ranks' states disagree": [[state, {**state, "consumed": 5}]]}
    for message, states in garbage.items():
        for bad in states:
            with pytest.raises(ValueError, match=message):
                TokenBudgetBatcher(reader, budget, seed=4).load_state_dict(bad)
    again = TokenBudgetBatcher(reader, budget, seed=4)
    again.load_state_dict([state, dict(state)])                         # the saved ranks agree: fine
    assert list(again) == [b.tolist() for b in batcher.global_items()[4:]]


def test_format_1_state_continues_at_its_global_position(tmp_path):
    write_corpus(tmp_path / "codes")
    reader = CodeReader(tmp_path / "codes")
    epoch = CodeIterator(reader, seed=3).indices()
    legacy = {"epoch": 0, "position": 30, "seed": 3, "rank": 1, "world_size": 2, "num_rows": 95, "drop_last": False,
              "shuffle": True}                                          # rank 1 of 2 after 30 rows each
    resumed = CodeIterator(reader, 0, 3, seed=3)
    resumed.load_state_dict(legacy)
    assert resumed.indices() == [epoch[p] for p in range(60, 95, 3)]
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        CodeIterator(reader, seed=4).load_state_dict(legacy)
    done = CodeIterator(reader, seed=3)
    done.load_state_dict({**legacy, "position": 48})                    # the padded end of the epoch: 96 > 95
    assert done.consumed == 95 and len(done) == 0


def test_iterator_covers_shards_and_resumes(tmp_path):
    write_corpus(tmp_path)
    reader = CodeReader(tmp_path)
    single = CodeIterator(reader, seed=3)
    epoch0 = [r.key for r in single]
    epoch1 = [r.key for r in single]
    assert sorted(epoch0) == sorted(epoch1) == sorted(reader.keys().tolist()) and len(set(epoch0)) == 95
    assert epoch0 != epoch1 and single.epoch == 1
    for world in (2, 3):
        shards = [CodeIterator(reader, rank, world, seed=3).indices() for rank in range(world)]
        assert {len(s) for s in shards} == {-(-95 // world)}
        assert set().union(*shards) == set(range(95))
        dropped = [CodeIterator(reader, rank, world, seed=3, drop_last=True).indices() for rank in range(world)]
        assert {len(s) for s in dropped} == {95 // world} and len(set().union(*dropped)) == 95 // world * world
    full = CodeIterator(reader, 1, 2, seed=5)
    expected = [r.key for _ in range(3) for r in full]              # 3 epochs of 48
    resumed_keys, it = [], CodeIterator(reader, 1, 2, seed=5)
    for record in it:
        resumed_keys.append(record.key)
        if len(resumed_keys) == 30:
            break
    state = it.state_dict()
    fresh = CodeIterator(reader, 1, 2, seed=5)
    fresh.load_state_dict(state)
    resumed_keys += [r.key for r in fresh] + [r.key for _ in range(2) for r in fresh]
    assert resumed_keys == expected
    assert state["consumed"] == 60 and "world_size" not in state and "rank" not in state


def test_pack_by_token_budget_hand_computed():
    batches = pack_by_token_budget(np.array([3, 4, 2, 5, 1]), 7)
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3], [4]]


def test_token_budget_batcher(tmp_path):
    write_corpus(tmp_path, part_rows=(20, 24), views=3)
    reader = CodeReader(tmp_path)
    lengths, keys, views = reader.lengths, reader.keys(), reader.views()
    budget = int(lengths.max()) * 3
    with pytest.raises(ValueError, match="below the longest sequence"):
        TokenBudgetBatcher(reader, int(lengths.max()) - 1)
    everything = list(TokenBudgetBatcher(reader, budget, views="all", seed=1))
    assert sorted(i for b in everything for i in b) == list(range(len(reader)))
    assert all(lengths[b].sum() <= budget for b in everything)
    assert all(lengths[a].sum() + lengths[b[0]] > budget for a, b in zip(everything, everything[1:]))
    one_view = TokenBudgetBatcher(reader, budget, seed=1)
    picks = [[i for b in one_view for i in b] for _ in range(2)]
    for picked in picks:
        assert sorted(keys[picked].tolist()) == sorted(set(keys.tolist()))   # one row per key
    assert len(set(zip(keys[picks[0]], views[picks[0]])) ^ set(zip(keys[picks[1]], views[picks[1]]))) > 0
    assert len(set(views[picks[0]].tolist())) == 3
    for world in (2, 3):
        per_rank = [list(TokenBudgetBatcher(reader, budget, rank, world, seed=2)) for rank in range(world)]
        assert len({len(batches) for batches in per_rank}) == 1
        assert all(lengths[b].sum() <= budget for batches in per_rank for b in batches)
    full = TokenBudgetBatcher(reader, budget, 0, 2, seed=4, extra_tokens=1)
    expected = [b for _ in range(2) for b in full]
    first = TokenBudgetBatcher(reader, budget, 0, 2, seed=4, extra_tokens=1)
    taken = list(itertools.islice(first, 5))
    second = TokenBudgetBatcher(reader, budget, 0, 2, seed=4, extra_tokens=1)
    second.load_state_dict(first.state_dict())
    assert taken + [b for b in second] + [b for b in second] == expected


def test_code_stats_hand_computed(tmp_path):
    manifest = CodeManifest.create(tmp_path, IDENTITY, 2, 2, (4, 8), (1, 2))
    grains = np.array([[[0, 0]], [[0, 1]]], dtype=np.uint8)          # L = 2 and 5
    codes = [np.array([[0, 1], [1, 1]]), np.array([[0, 2], [0, 2], [0, 2], [0, 2], [3, 2]])]
    with CodeWriter(tmp_path, 0, manifest) as w:
        w.write(["a", "b"], np.array([-1, 3]), np.array([0, 0]), grains, codes)
    stats = code_stats(tmp_path, bins=3)
    assert stats["rows"] == 2 and stats["codes"] == 7 and stats["codes_per_image"] == {"mean": 3.5, "min": 2,
                                                                                       "max": 5}
    assert stats["region_share"] == [0.75, 0.25]
    assert stats["code_share"] == [3 / 7, 4 / 7]
    assert stats["codebook_usage"] == [3 / 4, 2 / 8]                 # codes {0,1,3} of 4; {1,2} of 8
    assert stats["codebook_perplexity"][1] == pytest.approx(np.exp(-(2 / 7 * np.log(2 / 7) + 5 / 7 * np.log(5 / 7))))
    assert stats["bytes_per_image"] == (tmp_path / "part-000000.arrow").stat().st_size / 2
    assert stats["length_histogram"]["counts"] == [1, 0, 1]
