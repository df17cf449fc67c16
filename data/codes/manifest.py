"""``OUT/manifest.json`` of a code directory: tokenizer identity, code layout and the complete parts.

The manifest is the single source of truth for completeness: a part file counts only once its row
count is recorded here. Every update re-reads the file under an exclusive ``fcntl`` lock on
``OUT/manifest.json.lock`` and replaces it atomically (temp file + rename), so any number of ranks or
processes on a shared POSIX file system can record parts concurrently without losing entries, and
readers (which take no lock) always see a whole file.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from data.files import atomic_write, open_no_follow
from data.identity import check_same
from data.codes.format import code_dtype, part_file_name

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "varitok-codes"
FORMAT_VERSION = 1


class ManifestMismatchError(ValueError):
    """An existing code directory was made by another tokenizer or with another code layout."""


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    lock = out_dir / f"{MANIFEST_NAME}.lock"
    try:
        fd = open_no_follow(lock)  # a planted symlink is refused, never followed
    except OSError:
        if lock.is_symlink():
            raise ValueError(f"{lock} is a symbolic link; refusing to follow it out of {out_dir} (delete it)") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=1, sort_keys=False))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): the code manifest is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object: the code manifest is damaged")
    return data


def _layout(num_levels: int, num_subcodes: int, codebook_sizes: Sequence[int],
            grain_shape: Sequence[int]) -> dict[str, Any]:
    sizes = [int(s) for s in codebook_sizes]
    shape = [int(s) for s in grain_shape]
    if not 1 <= int(num_levels) <= 8:
        raise ValueError(f"num_levels must be in 1..8 (grain levels are stored as uint8 and a region holds "
                         f"4**level codes), got {num_levels}")
    if int(num_subcodes) < 1 or len(sizes) != int(num_subcodes):
        raise ValueError(f"codebook_sizes must list one size per sub-codebook: num_subcodes={num_subcodes}, "
                         f"codebook_sizes={sizes}")
    if any(not 1 <= s <= 1 << 32 for s in sizes):
        raise ValueError(f"codebook sizes must be in 1..2**32, got {sizes}")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"grain_shape must be two positive ints (Hs, Ws), got {list(grain_shape)}")
    return {"num_levels": int(num_levels), "num_subcodes": int(num_subcodes), "codebook_sizes": sizes,
            "dtype": code_dtype(sizes).name, "grain_shape": shape}


class CodeManifest:
    """The manifest of one code directory. Create with ``create`` (writer side) or ``load`` (reader side).

    Attributes mirror the JSON: ``tokenizer_identity`` (dict, e.g. config hash + weights sha256),
    ``num_levels`` (G), ``num_subcodes`` (K), ``codebook_sizes`` (K ints), ``dtype`` (numpy uint16|uint32),
    ``grain_shape`` ((Hs, Ws)), ``parts`` ({part index: entry with rows, file, source_shard, num_codes,
    file_bytes, sha256}), ``totals``.
    """

    def __init__(self, out_dir: str | os.PathLike, data: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self._data = data

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @classmethod
    def create(cls, out_dir: str | os.PathLike, tokenizer_identity: dict[str, Any], num_levels: int,
               num_subcodes: int, codebook_sizes: Sequence[int], grain_shape: Sequence[int]) -> "CodeManifest":
        """Start a code directory, or join an existing one made by the same tokenizer with the same layout.

        Raises ManifestMismatchError when ``out_dir`` already holds codes of another tokenizer or layout.
        """
        if not isinstance(tokenizer_identity, dict) or not tokenizer_identity:
            raise ValueError("tokenizer_identity must be a non-empty dict, e.g. "
                             "{'config_hash': ..., 'weights_sha256': ...}")
        identity = json.loads(json.dumps(tokenizer_identity, sort_keys=True))
        layout = _layout(num_levels, num_subcodes, codebook_sizes, grain_shape)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with _locked(out):
            path = out / MANIFEST_NAME
            if path.exists():
                manifest = cls(out, _read_json(path))
                manifest._check_matches(identity, layout)
                return manifest
            data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tokenizer": identity, **layout,
                    "parts": [], "totals": _totals([])}
            _write_json_atomic(path, data)
            return cls(out, data)

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "CodeManifest":
        path = Path(out_dir) / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: {out_dir} is not a code directory "
                                    f"(run `varitok tokenize --output {out_dir}` first)")
        data = _read_json(path)
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a varitok code manifest (format={data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {data.get('version')}; this reader reads "
                             f"version {FORMAT_VERSION}")
        return cls(path.parent, data)

    def _check_matches(self, identity: dict[str, Any], layout: dict[str, Any]) -> None:
        if self._data["tokenizer"] != identity:
            raise ManifestMismatchError(
                f"{self.out_dir} already holds codes from tokenizer {self._data['tokenizer']}, but this run uses "
                f"tokenizer {identity}; refusing to mix tokenizers: choose another output directory or delete "
                f"{self.out_dir}")
        check_same(self._data, layout, only=tuple(layout), what=f"code directory {self.out_dir}",
                   hint=f"choose another output directory or delete {self.out_dir}", error=ManifestMismatchError,
                   saved_name="existing", current_name="this run")

    def refresh(self) -> "CodeManifest":
        """Re-read the file (other processes may have recorded parts since)."""
        self._data = _read_json(self.path)
        return self

    @property
    def tokenizer_identity(self) -> dict[str, Any]:
        return dict(self._data["tokenizer"])

    @property
    def num_levels(self) -> int:
        return self._data["num_levels"]

    @property
    def num_subcodes(self) -> int:
        return self._data["num_subcodes"]

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(self._data["codebook_sizes"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._data["dtype"])

    @property
    def grain_shape(self) -> tuple[int, int]:
        return tuple(self._data["grain_shape"])

    @property
    def parts(self) -> dict[int, dict[str, Any]]:
        """{part index: {index, file, rows, source_shard, num_codes, file_bytes}} as of the last read."""
        return {entry["index"]: dict(entry) for entry in self._data["parts"]}

    @property
    def totals(self) -> dict[str, int]:
        return dict(self._data["totals"])

    def is_complete(self, part_index: int) -> bool:
        """Whether ``part_index`` is recorded (re-reads the file so other ranks' parts are seen)."""
        return part_index in self.refresh().parts

    def record_part(self, part_index: int, rows: int, source_shard: str = "", num_codes: int = 0,
                    file_bytes: int = 0, sha256: str = "") -> None:
        """Mark part ``part_index`` complete with ``rows`` rows (call only after its file is in place).

        num_codes: sum of L over its rows; file_bytes, sha256: its size on disk and digest (readers and
        verify compare them to catch truncation and damage). Atomic and safe under concurrent calls from
        several processes.
        """
        entry = {"index": int(part_index), "file": part_file_name(part_index), "rows": int(rows),
                 "source_shard": str(source_shard), "num_codes": int(num_codes), "file_bytes": int(file_bytes)}
        if sha256:
            entry["sha256"] = str(sha256)
        with _locked(self.out_dir):
            data = _read_json(self.path)
            parts = {p["index"]: p for p in data["parts"]}
            parts[entry["index"]] = entry
            data["parts"] = [parts[i] for i in sorted(parts)]
            data["totals"] = _totals(data["parts"])
            _write_json_atomic(self.path, data)
        self._data = data


def _totals(parts: list[dict[str, Any]]) -> dict[str, int]:
    return {"parts": len(parts), "rows": sum(p["rows"] for p in parts),
            "codes": sum(p["num_codes"] for p in parts), "file_bytes": sum(p["file_bytes"] for p in parts)}
