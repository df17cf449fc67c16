"""CodeReader: memory-mapped, O(1) random access to the complete parts of a code directory."""
from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

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


class RecordBlock:
    """Zero-copy numpy views of one Arrow record batch of a part (n rows).

    key_offsets int32 [n+1] into key_data (bytes); labels int32 [n]; views uint8 [n]; grain_offsets
    int32 [n+1] into grain_data uint8; code_offsets int32 [n+1] into code_values (flattened (L, K) rows);
    lengths int32 [n].
    """

    __slots__ = ("batch", "num_rows", "num_subcodes", "grain_shape", "key_offsets", "key_data", "labels", "views",
                 "grain_offsets", "grain_data", "code_offsets", "code_values", "lengths", "null_count")

    def __init__(self, batch: pa.RecordBatch, num_subcodes: int, grain_shape: tuple[int, int]):
        self.batch = batch
        self.num_rows = batch.num_rows
        self.num_subcodes = num_subcodes
        self.grain_shape = grain_shape
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

    def record(self, row: int) -> CodeRecord:
        k0, k1 = self.key_offsets[row], self.key_offsets[row + 1]
        g0, g1 = self.grain_offsets[row], self.grain_offsets[row + 1]
        c0, c1 = self.code_offsets[row], self.code_offsets[row + 1]
        return CodeRecord(str(self.key_data[k0:k1], "utf-8"), int(self.labels[row]), int(self.views[row]),
                          self.grain_data[g0:g1].reshape(self.grain_shape),
                          self.code_values[c0:c1].reshape(-1, self.num_subcodes))

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
