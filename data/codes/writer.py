"""CodeWriter: one Arrow IPC part per input shard, written atomically (data.files) when complete."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from data.files import AtomicFile
from data.codes.format import code_schema, part_file_name, sequence_lengths
from data.codes.manifest import CodeManifest

INT32_MAX = np.iinfo(np.int32).max


class CodeWriter:
    """Writes the rows of one part; on a clean ``close`` the file is renamed into place and the part is
    recorded in the manifest, so an interrupted writer leaves only a temp file that readers ignore.

    ``max_rows_per_batch`` bounds the Arrow record batches (rows are buffered across ``write`` calls so
    batches are full-sized except the last). Use as a context manager: an exception aborts the part.
    """

    def __init__(self, out_dir: str | os.PathLike, part_index: int, manifest: CodeManifest,
                 max_rows_per_batch: int = 1024, source_shard: str = ""):
        if max_rows_per_batch < 1:
            raise ValueError(f"max_rows_per_batch must be >= 1, got {max_rows_per_batch}")
        if Path(out_dir).resolve() != manifest.out_dir.resolve():
            raise ValueError(f"the manifest belongs to {manifest.out_dir}, not to {out_dir}")
        if manifest.is_complete(part_index):
            raise ValueError(f"part {part_index} is already complete in {manifest.path}; skip it "
                             f"(check manifest.is_complete) instead of writing it again")
        self.manifest = manifest
        self.part_index = part_index
        self.source_shard = source_shard
        self.max_rows_per_batch = max_rows_per_batch
        self.final_path = manifest.out_dir / part_file_name(part_index)
        self.schema = code_schema(manifest.dtype)
        self._sizes = np.asarray(manifest.codebook_sizes, dtype=np.int64)
        self._file = AtomicFile(self.final_path)
        self.temp_path = self._file.temp_path
        self._ipc = pa.ipc.new_file(self._file.file, self.schema)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0
        self.num_codes = 0
        self.closed = False

    def write(self, keys: Sequence[str], labels: np.ndarray, views: np.ndarray, grains: np.ndarray,
              codes: Sequence[np.ndarray]) -> None:
        """Append N rows.

        keys: N str; labels: int [N] (-1 = none); views: int [N] in 0..255; grains: int N x Hs x Ws with
        values < G; codes: N integer arrays (L_i, K) in canonical order with L_i = sum 4**grain_i and
        codes[:, k] < codebook_sizes[k]. Raises ValueError naming the first offending key.
        """
        if self.closed:
            raise ValueError(f"writer for part {self.part_index} is closed")
        keys = list(keys)
        n = len(keys)
        labels = self._column(labels, n, "labels", -1, INT32_MAX, np.int32)
        views = self._column(views, n, "views", 0, 255, np.uint8)
        grains = self._grains(grains, n)
        codes = list(codes)
        if len(codes) != n:
            raise ValueError(f"got {n} keys but {len(codes)} code arrays")
        if not all(isinstance(k, str) and k for k in keys):
            raise ValueError("keys must be non-empty strings")
        lengths, flat = self._check_codes(keys, grains, codes)
        positions = np.concatenate([[0], np.cumsum(lengths)])
        for start in range(0, n, self.max_rows_per_batch):
            stop = min(n, start + self.max_rows_per_batch)
            self._pending.append(self._record_batch(keys[start:stop], labels[start:stop], views[start:stop],
                                                    grains[start:stop], flat[positions[start]:positions[stop]],
                                                    lengths[start:stop]))
            self._pending_rows += stop - start
        self.rows += n
        self.num_codes += int(lengths.sum())
        if self._pending_rows >= self.max_rows_per_batch:
            self._flush(final=False)

    @staticmethod
    def _column(values: np.ndarray, n: int, name: str, low: int, high: int, dtype: type) -> np.ndarray:
        array = np.asarray(values)
        if array.shape != (n,) or (n and not np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{name} must be an integer array of shape ({n},), got {array.dtype} {array.shape}")
        if n and (array.min() < low or array.max() > high):
            raise ValueError(f"{name} must lie in {low}..{high}, got {array.min()}..{array.max()}")
        return array.astype(dtype, copy=False)

    def _grains(self, grains: np.ndarray, n: int) -> np.ndarray:
        array = np.asarray(grains)
        shape = (n, *self.manifest.grain_shape)
        if array.shape != shape or (n and not np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"grains must be an integer array of shape {shape} (grain_shape from the manifest), "
                             f"got {array.dtype} {array.shape}")
        if n and (array.min() < 0 or array.max() >= self.manifest.num_levels):
            raise ValueError(f"grain levels must lie in 0..{self.manifest.num_levels - 1}, "
                             f"got {array.min()}..{array.max()}")
        return np.ascontiguousarray(array, dtype=np.uint8)

    def _check_codes(self, keys: list[str], grains: np.ndarray,
                     codes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Validates shapes (L_i == sum 4**grain_i, K columns) and code ranges.

        Returns L as int64 [N] and all codes concatenated, (sum L_i, K) in the input dtype.
        """
        k = self.manifest.num_subcodes
        bad = next((i for i, c in enumerate(codes) if np.ndim(c) != 2 or np.shape(c)[1] != k), None)
        if bad is not None:
            raise ValueError(f"codes for key {keys[bad]!r} have shape {np.shape(codes[bad])}; expected (L, {k})")
        lengths = np.array([len(c) for c in codes], dtype=np.int64)
        expected = sequence_lengths(grains)
        mismatch = np.flatnonzero(lengths != expected)
        if mismatch.size:
            i = mismatch[0]
            raise ValueError(f"codes for key {keys[i]!r} hold L={lengths[i]} positions but its grain map implies "
                             f"L = sum 4**grain = {expected[i]}")
        for key, c in zip(keys, codes):
            if not np.issubdtype(np.asarray(c).dtype, np.integer):
                raise ValueError(f"codes for key {key!r} must be integers, got {np.asarray(c).dtype}")
        flat = (np.concatenate([np.asarray(c).reshape(-1, k) for c in codes]) if codes
                else np.zeros((0, k), dtype=np.int64))
        if flat.size:
            bad_rows = np.flatnonzero(((flat < 0) | (flat >= self._sizes)).any(axis=1))
            if bad_rows.size:
                row = int(np.searchsorted(np.cumsum(lengths), bad_rows[0], side="right"))
                raise ValueError(f"codes for key {keys[row]!r} hold {flat[bad_rows[0]].tolist()}, outside the "
                                 f"codebook sizes {list(self.manifest.codebook_sizes)}")
        return lengths, flat

    def _record_batch(self, keys: list[str], labels: np.ndarray, views: np.ndarray, grains: np.ndarray,
                      codes: np.ndarray, lengths: np.ndarray) -> pa.RecordBatch:
        """codes: the rows' codes concatenated, (sum L, K); lengths: int64 [n]."""
        n, k = len(keys), self.manifest.num_subcodes
        code_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths * k, out=code_offsets[1:])
        if code_offsets[-1] > INT32_MAX:
            raise ValueError(f"{code_offsets[-1]} code values in one record batch overflow int32 offsets; "
                             f"lower max_rows_per_batch (now {self.max_rows_per_batch})")
        dtype = self.manifest.dtype
        values = codes.astype(dtype).reshape(-1)
        codes_array = pa.ListArray.from_arrays(pa.array(code_offsets.astype(np.int32)), pa.array(values),
                                               type=self.schema.field("codes").type)
        grain_size = grains[0].size if n else 0
        grain_offsets = np.arange(n + 1, dtype=np.int32) * grain_size
        grain_array = pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(grain_offsets),
                                                                    pa.py_buffer(grains.tobytes())])
        return pa.RecordBatch.from_arrays(
            [pa.array(keys, pa.string()), pa.array(labels), pa.array(views), grain_array, codes_array,
             pa.array(lengths.astype(np.int32))], schema=self.schema)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, self.schema).combine_chunks()
        full = table.num_rows if final else table.num_rows // self.max_rows_per_batch * self.max_rows_per_batch
        for batch in table.slice(0, full).to_batches(max_chunksize=self.max_rows_per_batch):
            self._ipc.write_batch(batch)
        rest = table.slice(full)
        self._pending = rest.to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self) -> None:
        """Finish the file, rename it into place, then record the part in the manifest."""
        if self.closed:
            return
        self._flush(final=True)
        self._ipc.close()
        self.closed = True
        self._file.file.seek(0)
        digest = hashlib.file_digest(self._file.file, "sha256").hexdigest()  # readers check it on open
        self._file.commit()
        self.manifest.record_part(self.part_index, self.rows, self.source_shard, self.num_codes,
                                  self.final_path.stat().st_size, digest)

    def abort(self) -> None:
        """Drop the partial part: close and delete the temp file; nothing is recorded."""
        if self.closed:
            return
        self.closed = True
        try:
            self._ipc.close()
        finally:
            self._file.abort()

    def __enter__(self) -> "CodeWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
