"""CodeReader: memory-mapped, O(1) random access to the complete parts of a code directory."""
from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from data.codes.format import code_schema
from data.codes.manifest import CodeManifest

if TYPE_CHECKING:
    from data.codes.sampling import CodeIterator


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


def open_part(path: str | os.PathLike, manifest: CodeManifest) -> tuple[pa.ipc.RecordBatchFileReader, list[RecordBlock]]:
    """Memory-maps one part file and returns its reader (keep it alive) and its non-empty blocks.

    Raises ValueError when the schema differs from the one the manifest implies.
    """
    source = pa.memory_map(str(path), "r")
    file = pa.ipc.open_file(source)
    expected = code_schema(manifest.dtype)
    if not file.schema.remove_metadata().equals(expected):
        raise ValueError(f"{path} has schema {file.schema} but the manifest implies {expected}")
    blocks = [RecordBlock(file.get_batch(b), manifest.num_subcodes, manifest.grain_shape)
              for b in range(file.num_record_batches)]
    return file, [block for block in blocks if block.num_rows]


class CodeReader:
    """Reads the complete parts (those recorded in the manifest) of ``out_dir``; temp files and
    unrecorded parts are ignored.

    ``reader[i]`` -> CodeRecord for a global index i in [0, len) (part order, then row order), found via
    cumulative row offsets (bisect over record batches, O(log batches)); data stays memory-mapped.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.manifest = CodeManifest.load(out_dir)
        self._files: list[pa.ipc.RecordBatchFileReader] = []
        self.blocks: list[RecordBlock] = []
        self.part_rows: dict[int, int] = {}
        for index, entry in sorted(self.manifest.parts.items()):
            file, blocks = open_part(self.out_dir / entry["file"], self.manifest)
            rows = sum(block.num_rows for block in blocks)
            problem = next((p for p in (b.layout_problem() for b in blocks) if p), None)
            if problem:
                raise ValueError(f"{entry['file']}: {problem}; run `varitok verify codes {out_dir}`")
            if rows != entry["rows"]:
                raise ValueError(f"{entry['file']} holds {rows} rows but the manifest records {entry['rows']}; "
                                 f"run `varitok verify codes {out_dir}`")
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

    def iterate(self, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                drop_last: bool = False) -> "CodeIterator":
        """A resumable, rank-sharded iterator of CodeRecords (see data.codes.sampling.CodeIterator)."""
        from data.codes.sampling import CodeIterator

        return CodeIterator(self, rank=rank, world_size=world_size, seed=seed, epoch=epoch, shuffle=shuffle,
                            drop_last=drop_last)
