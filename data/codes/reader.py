"""CodeReader: memory-mapped, O(1) random access to the complete parts of a code directory."""
from __future__ import annotations

import bisect
import hashlib
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from data.codes.format import code_schema, sequence_lengths
from data.codes.manifest import CodeManifest

MAX_LISTED = 5


class CodeRecord(NamedTuple):
    """One row. grain: uint8 [Hs, Ws]; codes: uint16|uint32 [L, K] (read-only views into the mapped file)."""
    key: str
    label: int
    view: int
    grain: np.ndarray
    codes: np.ndarray


class CodeBatch(NamedTuple):
    """Rows packed in the order asked for. codes: the rows' (L_i, K) codes concatenated, (sum L_i, K) in the
    stored dtype (a copy); lengths int32 [B] (L_i); grains uint8 [B, Hs, Ws]; labels int32 [B]; views uint8 [B]."""
    keys: list[str]
    labels: np.ndarray
    views: np.ndarray
    grains: np.ndarray
    codes: np.ndarray
    lengths: np.ndarray


class RecordBlock:
    """Zero-copy numpy views of one Arrow record batch of a part (n rows).

    key_offsets int32 [n+1] into key_data (bytes); labels int32 [n]; views uint8 [n]; grain_offsets
    int32 [n+1] into grain_data uint8; code_offsets int32 [n+1] into code_values (flattened (L, K) rows);
    lengths int32 [n]. When the buffers are laid out as the writer lays them out (grain maps of
    grain_shape back to back, code offsets multiples of K) also grains uint8 [n, Hs, Ws] and code_rows
    [sum L, K], which ``record`` uses; otherwise those are None and ``layout_problem`` says why.
    """

    __slots__ = ("batch", "num_rows", "num_subcodes", "key_offsets", "key_data", "labels", "views",
                 "grain_offsets", "grain_data", "code_offsets", "code_values", "lengths", "null_count",
                 "grains", "code_rows")

    def __init__(self, batch: pa.RecordBatch, num_subcodes: int, grain_shape: tuple[int, int]):
        self.batch = batch
        self.num_rows = n = batch.num_rows
        self.num_subcodes = k = num_subcodes
        keys, grains, codes = batch.column("key"), batch.column("grain"), batch.column("codes")
        self.key_offsets = _offsets(keys)
        self.key_data = memoryview(keys.buffers()[2] or b"")
        self.labels = batch.column("label").to_numpy()
        self.views = batch.column("view").to_numpy()
        self.grain_offsets = _offsets(grains)
        self.grain_data = np.frombuffer(grains.buffers()[2] or b"", dtype=np.uint8)
        self.code_offsets = codes.offsets.to_numpy()
        self.code_values = codes.values.to_numpy()
        self.lengths = batch.column("length").to_numpy()
        self.null_count = sum(column.null_count for column in batch.columns) + codes.values.null_count
        g0, g1 = self.grain_offsets.item(0), self.grain_offsets.item(n)
        regular_grains = g1 - g0 == n * grain_shape[0] * grain_shape[1]
        self.grains = self.grain_data[g0:g1].reshape(n, *grain_shape) if regular_grains else None
        c1 = self.code_offsets.item(n)
        regular_codes = self.code_offsets.item(0) % k == 0 and c1 % k == 0
        self.code_rows = self.code_values[:c1].reshape(-1, k) if regular_codes else None

    def layout_problem(self) -> str | None:
        if self.grains is None:
            return "grain maps do not add up to rows x grain_shape bytes"
        if self.code_rows is None:
            return "code offsets are not multiples of K"
        return None

    def record(self, row: int) -> CodeRecord:
        key_offsets, code_offsets, k = self.key_offsets, self.code_offsets, self.num_subcodes
        return CodeRecord(str(self.key_data[key_offsets.item(row): key_offsets.item(row + 1)], "utf-8"),
                          self.labels.item(row), self.views.item(row), self.grains[row],
                          self.code_rows[code_offsets.item(row) // k: code_offsets.item(row + 1) // k])

    def keys(self) -> np.ndarray:
        """Object array of str [n]."""
        return self.batch.column("key").to_numpy(zero_copy_only=False)


def _offsets(array: pa.Array) -> np.ndarray:
    """The n+1 int32 offsets of a string/binary array, honouring a slice offset."""
    return np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset: array.offset + len(array) + 1]


class CodeFileError(ValueError):
    """A part file that cannot be used as it is (damaged, truncated, values out of range); names the file."""


def open_part(path: str | os.PathLike, manifest: CodeManifest,
              validate: bool = True) -> tuple[pa.ipc.RecordBatchFileReader, list[RecordBlock]]:
    """Memory-maps one part file and returns its reader (keep it alive) and its non-empty blocks.

    Raises CodeFileError when the file is not a readable Arrow IPC file, its schema differs from the one
    the manifest implies, or a record batch fails Arrow's full validation (offsets monotone and inside
    their buffers, keys valid UTF-8): nothing is ever indexed through an unchecked offset.
    ``validate=False`` skips the full validation (for re-opening files already validated by this run).
    """
    try:
        file = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (OSError, pa.ArrowException) as exc:
        raise CodeFileError(f"{path}: not a readable Arrow IPC file (truncated or damaged?): {exc}") from None
    expected = code_schema(manifest.dtype)
    if not file.schema.remove_metadata().equals(expected):
        raise CodeFileError(f"{path} has schema {file.schema} but the manifest implies {expected}")
    blocks = []
    for index in range(file.num_record_batches):
        try:
            batch = file.get_batch(index)
            if validate:
                batch.validate(full=True)
        except (OSError, pa.ArrowException) as exc:
            raise CodeFileError(f"{path}: record batch {index} is damaged: {exc}") from None
        if batch.num_rows:
            blocks.append(RecordBlock(batch, manifest.num_subcodes, manifest.grain_shape))
    return file, blocks


def block_problems(block: RecordBlock, manifest: CodeManifest, name: str, row0: int = 0,
                   num_classes: int | None = None) -> list[str]:
    """Value checks of one record batch (empty = fine); row numbers in messages count from ``row0``.

    Checks: no nulls; labels >= -1 (and < num_classes when given); code list length == length * K; grain
    maps of grain_shape with levels < G; length == sum 4**grain; codes < the codebook sizes.
    """
    problems = []
    k, sizes = manifest.num_subcodes, np.asarray(manifest.codebook_sizes, dtype=np.int64)
    n, grain_size = block.num_rows, int(np.prod(manifest.grain_shape))

    def rows(mask: np.ndarray) -> str:
        return listed((np.flatnonzero(mask) + row0).tolist())

    if block.null_count:
        problems.append(f"{name}: {block.null_count} null values (every column must be non-null)")
    bad_label = (block.labels < -1) | ((block.labels >= num_classes) if num_classes is not None else False)
    if np.any(bad_label):
        allowed = f"-1..{num_classes - 1}" if num_classes is not None else ">= -1"
        problems.append(f"{name}: labels outside {allowed} at rows {rows(bad_label)}")
    code_counts = np.diff(block.code_offsets).astype(np.int64)
    bad_count = code_counts != block.lengths.astype(np.int64) * k
    if bad_count.any():
        problems.append(f"{name}: codes list length != length * K ({k}) at rows {rows(bad_count)}")
    grain_bytes = np.diff(block.grain_offsets)
    if (grain_bytes != grain_size).any():
        problems.append(f"{name}: grain maps of the wrong size (expected {grain_size} bytes = grain_shape "
                        f"{list(manifest.grain_shape)}) at rows {rows(grain_bytes != grain_size)}")
        return problems
    grains = block.grain_data[block.grain_offsets[0]: block.grain_offsets[-1]].reshape(n, grain_size)
    bad_level = (grains >= manifest.num_levels).any(axis=1)
    if bad_level.any():
        problems.append(f"{name}: grain levels >= G ({manifest.num_levels}) at rows {rows(bad_level)}")
    bad_length = sequence_lengths(grains) != block.lengths
    if bad_length.any():
        problems.append(f"{name}: length != sum 4**grain at rows {rows(bad_length)}")
    values = block.code_values[block.code_offsets[0]: block.code_offsets[-1]]
    if block.code_offsets[0] % k == 0 and not bad_count.any():  # the writer's layout: (sum L, K) rows
        if not (values.reshape(-1, k) >= sizes).any():
            return problems  # the common case: one vectorized comparison, no index arrays
    column = (np.arange(len(values)) - np.repeat(block.code_offsets[:-1] - block.code_offsets[0], code_counts)) % k
    bad_code = values >= sizes[column]
    if bad_code.any():
        hit = np.zeros(n, dtype=bool)
        hit[np.repeat(np.arange(n), code_counts)[bad_code]] = True
        problems.append(f"{name}: codes outside the codebook sizes {sizes.tolist()} (sub-codebooks "
                        f"{np.unique(column[bad_code]).tolist()}) at rows {rows(hit)}")
    return problems


def listed(items: Sequence) -> str:
    """The first MAX_LISTED items, comma-separated, with the total when there are more."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:MAX_LISTED])
    return shown + (f" ... ({len(items)} in all)" if len(items) > MAX_LISTED else "")


def part_file_problem(path: Path, entry: dict) -> str | None:
    """Whether a recorded part's file is present and of the recorded size (None = it is)."""
    if not path.is_file():
        return f"{entry['file']}: missing (recorded with {entry['rows']} rows)"
    size = path.stat().st_size
    if entry.get("file_bytes") and size != entry["file_bytes"]:
        return f"{entry['file']}: {size} bytes on disk but {entry['file_bytes']} recorded (truncated or rewritten)"
    return None


def part_digest_problem(path: Path, entry: dict) -> str | None:
    """Whether a part's bytes differ from the sha256 recorded when it was written (None = same, or none)."""
    if entry.get("sha256"):
        with open(path, "rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != entry["sha256"]:
                return f"{entry['file']}: contents differ from the sha256 recorded when it was written (damaged)"
    return None


class CodeReader:
    """Reads the complete parts (those recorded in the manifest) of ``out_dir``; temp files and
    unrecorded parts are ignored.

    Every part is checked when the reader opens, before anything is trained on it: the file's size and
    sha256 against the manifest (``check_digests``), Arrow's full validation, and the values
    (:func:`block_problems`: codes < codebook sizes, length == sum 4**grain, labels >= -1 and
    < ``num_classes`` when given). The first problems raise CodeFileError naming the file.
    ``validate=False`` keeps only the size and layout checks: for re-opening, in a worker, a directory this
    run has already opened with the checks (they cost one pass over the files).

    ``reader[i]`` -> CodeRecord for a global index i in [0, len) (part order, then row order), found via
    cumulative row offsets (bisect over record batches, O(log batches)); data stays memory-mapped.
    """

    def __init__(self, out_dir: str | os.PathLike, num_classes: int | None = None, check_digests: bool = True,
                 validate: bool = True):
        self.out_dir = Path(out_dir)
        self.manifest = CodeManifest.load(out_dir)
        self._files: list[pa.ipc.RecordBatchFileReader] = []
        self.blocks: list[RecordBlock] = []
        self.part_rows: dict[int, int] = {}
        hint = f"run `varitok verify codes {out_dir}` for the full list, then re-tokenize the damaged parts"
        for index, entry in sorted(self.manifest.parts.items()):
            path = self.out_dir / entry["file"]
            check = check_digests and validate
            problem = part_file_problem(path, entry) or (part_digest_problem(path, entry) if check else None)
            if problem:
                raise CodeFileError(f"{self.out_dir}/{problem}; {hint}")
            file, blocks = open_part(path, self.manifest, validate)
            starts = np.cumsum([0] + [b.num_rows for b in blocks]).tolist()
            problems = [p for block, row0 in zip(blocks, starts) if validate
                        for p in block_problems(block, self.manifest, str(path), row0, num_classes)]
            problems += [f"{path}: {p}" for p in (b.layout_problem() for b in blocks) if p][:1]
            if problems:
                raise CodeFileError(f"{'; '.join(problems[:3])}; {hint}")
            rows = sum(block.num_rows for block in blocks)
            if rows != entry["rows"]:
                raise CodeFileError(f"{path} holds {rows} rows but the manifest records {entry['rows']}; {hint}")
            self._files.append(file)
            self.blocks.extend(blocks)
            self.part_rows[index] = rows
        self._starts = np.concatenate([[0], np.cumsum([b.num_rows for b in self.blocks], dtype=np.int64)]).tolist()
        self._lengths: np.ndarray | None = None

    @property
    def num_levels(self) -> int:
        return self.manifest.num_levels

    @property
    def num_subcodes(self) -> int:
        return self.manifest.num_subcodes

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return self.manifest.codebook_sizes

    @property
    def grain_shape(self) -> tuple[int, int]:
        return self.manifest.grain_shape

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> CodeRecord:
        total = self._starts[-1]
        if index < 0:
            index += total
        if not 0 <= index < total:
            raise IndexError(f"index {index} out of range for {total} rows")
        block = bisect.bisect_right(self._starts, index) - 1
        return self.blocks[block].record(index - self._starts[block])

    def gather(self, indices: Sequence[int]) -> CodeBatch:
        """The rows at global ``indices`` (e.g. one TokenBudgetBatcher batch) packed into one CodeBatch."""
        records = [self[i] for i in indices]
        k, shape = self.num_subcodes, self.grain_shape
        return CodeBatch(
            keys=[r.key for r in records],
            labels=np.array([r.label for r in records], dtype=np.int32),
            views=np.array([r.view for r in records], dtype=np.uint8),
            grains=np.stack([r.grain for r in records]) if records else np.zeros((0, *shape), dtype=np.uint8),
            codes=(np.concatenate([r.codes for r in records]) if records
                   else np.zeros((0, k), dtype=self.manifest.dtype)),
            lengths=np.array([len(r.codes) for r in records], dtype=np.int32))

    @property
    def lengths(self) -> np.ndarray:
        """L of every row, int32 [len], in global index order (from the length column; no codes read)."""
        if self._lengths is None:
            self._lengths = (np.concatenate([b.lengths for b in self.blocks]) if self.blocks
                             else np.zeros(0, dtype=np.int32))
        return self._lengths

    def keys(self) -> np.ndarray:
        """The key of every row, object array of str [len], in global index order."""
        return np.concatenate([b.keys() for b in self.blocks]) if self.blocks else np.zeros(0, dtype=object)

    def views(self) -> np.ndarray:
        """The view id of every row, uint8 [len]."""
        return np.concatenate([b.views for b in self.blocks]) if self.blocks else np.zeros(0, dtype=np.uint8)

    def length_histogram(self, bins: int | np.ndarray = 50) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of L: (counts int64 [bins], edges float64 [bins + 1]) as np.histogram returns them."""
        return np.histogram(self.lengths, bins=bins)
