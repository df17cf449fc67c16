"""Readers of images stored inside bigger files: Parquet, Arrow IPC (``datasets.save_to_disk``) and tar shards.

Each reader turns one source file into *rows* in a fixed order (Parquet / Arrow: the table's row order;
tar: the samples, i.e. runs of adjacent members sharing a key, in file order). Discovery needs only the
row count (:func:`count_rows`, from Parquet metadata / Arrow batch lengths / tar headers) and the labels
(:func:`read_labels`, one small column); the sharder then asks for a row range ``[start, stop)``
(:func:`iter_rows`), reading row groups / record batches / tar members incrementally, so memory is bounded
by one batch whatever the file size and a shard worker reads only the part of a file its shard covers.

Columns (Parquet / Arrow): the image is a binary column or a struct with a binary ``bytes`` field (the
Hugging Face ``Image`` feature); label and caption columns are picked by name. Tar samples: the image is the
first member whose last extension is an image type; ``cls`` holds the label and ``txt`` the caption.
``--image-column`` / ``--label-column`` / ``--caption-column`` override the names (for tars: extensions).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from data.files import open_regular_file
from data.tar import ShardReadError, count_tar_samples, iter_tar_members, sample_problem, split_key

__all__ = ["SOURCE_EXTENSIONS", "Columns", "Row", "pick_column", "is_image_table", "arrow_files_of",
           "count_rows", "read_labels", "iter_rows", "SourceError", "LABEL_COLUMNS", "CAPTION_COLUMNS"]


SOURCE_EXTENSIONS = (".parquet", ".arrow", ".tar")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes")
LABEL_COLUMNS = ("label", "cls", "class", "class_name")
CAPTION_COLUMNS = ("caption", "text", "txt")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "jfif")
TAR_LABEL_EXTENSIONS = ("cls", "label", "class")
TAR_CAPTION_EXTENSIONS = ("txt", "caption", "text")
BATCH_ROWS = 256  # rows per decoded record batch: bounds memory to ~256 images whatever the row-group size


class SourceError(Exception):
    """A source file that cannot be used at all (no image column, not Parquet/Arrow): names the file."""


@dataclasses.dataclass(frozen=True)
class Columns:
    """Names chosen by the user (None: pick by the usual names)."""

    image: Optional[str] = None
    label: Optional[str] = None
    caption: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Row:
    """One source row: ``data`` is the encoded image; ``problem`` says why the row cannot be used (``data`` None:
    it has no image, or ``reason`` when given; else its bytes failed a check), None when it can."""

    index: int
    data: Optional[bytes]
    label: Any = None
    caption: Optional[str] = None
    problem: Optional[str] = None
    reason: Optional[str] = None


def pick_column(names: Sequence[str], candidates: Sequence[str], wanted: Optional[str] = None) -> Optional[str]:
    """The column of ``names`` matching ``wanted`` (the user's choice), else the first of ``candidates``;
    case-insensitive, surrounding spaces ignored. None when there is none."""
    lowered = {n.strip().lower(): n for n in names}
    return next((lowered[c.lower()] for c in ([wanted] if wanted is not None else candidates)
                 if c.lower() in lowered), None)


def _image_column(schema, wanted: Optional[str], where: str) -> Optional[str]:
    """The image-bytes column of an Arrow schema: ``wanted``, else a binary / struct-with-bytes column
    (by the usual names first, then the first in schema order). None when the table has none."""
    import pyarrow as pa

    def holds_bytes(field) -> bool:
        kind = field.type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return True
        return pa.types.is_struct(kind) and any(
            sub.name == "bytes" and (pa.types.is_binary(sub.type) or pa.types.is_large_binary(sub.type))
            for sub in kind)

    fields = {field.name: field for field in schema}
    if wanted is not None:
        name = pick_column(list(fields), (), wanted)
        if name is None:
            raise SourceError(f"{where}: --image-column {wanted!r} is not a column (columns: {list(fields)})")
        if not holds_bytes(fields[name]):
            raise SourceError(f"{where}: --image-column {wanted!r} is {fields[name].type}, not binary image bytes "
                              "or a struct with a binary 'bytes' field")
        return name
    binary = [name for name, field in fields.items() if holds_bytes(field)]
    return pick_column(binary, IMAGE_COLUMNS) or (binary[0] if binary else None)


def is_image_table(path: Path, columns: Columns) -> bool:
    """Whether a ``.parquet`` file holds image bytes (else it is a file list of paths)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{path}: not a readable Parquet file ({exc})") from None
    if pick_column(schema.names, (), columns.image) is not None:
        return _image_column(schema, columns.image, str(path)) is not None
    return _image_column(schema, None, str(path)) is not None


def arrow_files_of(folder: Path) -> Optional[list[Path]]:
    """The Arrow files of a ``datasets.save_to_disk`` folder in order (from ``state.json``), else None."""
    state = folder / "state.json"
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.parent.name for p in folder.glob("*/state.json"))
        raise SourceError(f"{folder} is a datasets DatasetDict: give one split folder ({', '.join(splits)}), "
                          f"e.g. --input {folder / (splits[0] if splits else 'train')}")
    if not state.is_file():
        return None
    try:
        files = [folder / entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{state}: not a datasets state.json with _data_files ({exc})") from None
    if any(Path(f.name) != Path(f.relative_to(folder)) or not f.is_file() for f in files):
        raise SourceError(f"{state} lists data files that are missing or outside {folder}")
    return files


# ---- Parquet / Arrow ------------------------------------------------------------------------------

def _arrow_batches(path: str, columns: Optional[Sequence[str]] = None) -> Iterator[Any]:
    """Record batches of an Arrow IPC file (file or stream format, as ``datasets`` writes), memory-mapped."""
    import pyarrow as pa

    source = pa.memory_map(path, "r")
    try:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = iter(pa.ipc.open_stream(source))
        for batch in batches:
            yield batch.select(list(columns)) if columns is not None else batch
    except pa.ArrowInvalid as exc:
        raise SourceError(f"{path}: not an Arrow IPC file ({exc})") from None
    finally:
        source.close()


def _schema(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.lower().endswith(".parquet"):
        return pq.read_schema(path)
    source = pa.memory_map(path, "r")
    try:
        try:
            return pa.ipc.open_file(source).schema
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).schema
    except pa.ArrowInvalid as exc:
        raise SourceError(f"{path}: not an Arrow IPC file ({exc})") from None
    finally:
        source.close()


def _table_columns(path: str, columns: Columns) -> tuple[str, Optional[str], Optional[str]]:
    schema = _schema(path)
    image = _image_column(schema, columns.image, path)
    if image is None:
        raise SourceError(f"{path}: no image column (a binary column or a struct with 'bytes'); columns: "
                          f"{schema.names}. Name it with --image-column")
    label = pick_column(schema.names, LABEL_COLUMNS, columns.label)
    caption = pick_column(schema.names, CAPTION_COLUMNS, columns.caption)
    for flag, wanted, found in (("--label-column", columns.label, label), ("--caption-column", columns.caption,
                                                                         caption)):
        if wanted is not None and found is None:
            raise SourceError(f"{path}: {flag} {wanted!r} is not a column (columns: {schema.names})")
    return image, label, caption


def _table_batches(path: str, names: Sequence[str], start: int = 0,
                   stop: Optional[int] = None) -> Iterator[tuple[int, Any]]:
    """``(index of the batch's first row, batch)`` of the row groups / record batches holding rows
    ``start <= row < stop`` (``stop`` None: to the end); a batch may also hold rows outside the range."""
    import pyarrow.parquet as pq

    if not path.lower().endswith(".parquet"):
        first = 0
        for batch in _arrow_batches(path, names):
            if stop is not None and first >= stop:
                return
            if first + batch.num_rows > start:
                yield first, batch
            first += batch.num_rows
        return
    handle, _ = open_regular_file(path)
    # buffered page-by-page reading: a huge row group is not loaded whole (pre_buffer reads column chunks at once)
    with handle, pq.ParquetFile(handle, buffer_size=1 << 20, pre_buffer=False) as parquet:
        first, groups, skipped = 0, [], 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if first + rows > start and (stop is None or first < stop):
                groups.append(group)
            elif not groups:
                skipped += rows
            first += rows
        if groups:  # one thread, no read-ahead: only the groups of this range are read
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=list(names),
                                              use_threads=False):
                yield skipped, batch
                skipped += batch.num_rows


def _image_bytes(array) -> list[Optional[bytes]]:
    import pyarrow as pa

    if pa.types.is_struct(array.type):
        array = array.field("bytes")
    return array.to_pylist()


def _table_rows(path: str, columns: Columns, start: int, stop: int) -> Iterator[Row]:
    image, label, caption = _table_columns(path, columns)
    names = [n for n in (image, label, caption) if n is not None]
    for first, batch in _table_batches(path, names, start, stop):
        lo, hi = max(start - first, 0), min(stop - first, batch.num_rows)
        if lo >= hi:
            continue
        part = batch.slice(lo, hi - lo)
        images = _image_bytes(part.column(names.index(image)))
        labels = part.column(names.index(label)).to_pylist() if label else [None] * len(images)
        captions = part.column(names.index(caption)).to_pylist() if caption else [None] * len(images)
        for offset, (data, lab, cap) in enumerate(zip(images, labels, captions)):
            yield Row(first + lo + offset, data, lab, None if cap is None else str(cap),
                      None if data is not None else "the image cell is null")


# ---- tar shards ---------------------------------------------------------------------------------

def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of each sample (adjacent members sharing a key), in file order."""
    key, members = None, {}
    try:
        for name, data in iter_tar_members(path):  # the same member limit as the count (--max-input-bytes: per row)
            base, ext = split_key(name)
            if base is None:
                continue
            if base != key:
                if key is not None:
                    yield key, members
                key, members = base, {}
            members.setdefault(ext, data)
    except ShardReadError:
        if key is not None:  # the members read before the damage (the count saw this sample's headers too)
            yield key, members
        raise
    if key is not None:
        yield key, members


def _tar_rows(path: str, columns: Columns, start: int, stop: int) -> Iterator[Row]:
    def member(members: dict[str, bytes], wanted: Optional[str], candidates: Sequence[str]) -> Optional[bytes]:
        if wanted is not None:
            return members.get(wanted)
        return next((data for ext, data in members.items() if ext.rsplit(".", 1)[-1].lower() in candidates), None)

    index = -1
    try:
        for index, (key, members) in enumerate(_tar_samples(path)):
            if index >= stop:
                return
            if index < start:
                continue
            data = member(members, columns.image, TAR_IMAGE_EXTENSIONS)
            problem = sample_problem(members)  # varitok shards list their members' sha256
            if data is None:
                problem = f"has no image member (members: {sorted(members)})"
            label = member(members, columns.label, TAR_LABEL_EXTENSIONS)
            caption = member(members, columns.caption, TAR_CAPTION_EXTENSIONS)
            yield Row(index, data, None if label is None else label.decode("utf-8", "replace").strip(),
                      None if caption is None else caption.decode("utf-8", "replace"),
                      None if problem is None else f"sample {key!r} {problem}")
    except (ShardReadError, OSError) as exc:
        for missing in range(max(index + 1, start), stop):  # counted at discovery, unreadable now
            yield Row(missing, None, problem=f"source tar unreadable here: {exc}", reason="unreadable")


# ---- the interface the sharder uses ---------------------------------------------------------------

def count_rows(path: str, columns: Columns) -> int:
    """Rows of a source file (Parquet metadata, Arrow batch lengths, tar sample headers)."""
    import pyarrow.parquet as pq

    if path.lower().endswith(".tar"):
        return count_tar_samples(path)  # a damaged tar: the samples before the damage are its rows
    _table_columns(path, columns)  # refuse a table without an image column before any work
    if path.lower().endswith(".parquet"):
        return pq.read_metadata(path).num_rows
    return sum(batch.num_rows for batch in _arrow_batches(path, []))


def read_labels(path: str, columns: Columns) -> Optional[list[Any]]:
    """The label column of a Parquet / Arrow source, one value per row (None: no label column). Tar labels
    are read with the rows (``cls`` members must then be integers)."""
    if path.lower().endswith(".tar"):
        return None
    _, label, _ = _table_columns(path, columns)
    if label is None:
        return None
    labels: list[Any] = []
    for _, batch in _table_batches(path, [label]):
        labels.extend(batch.column(0).to_pylist())
    return labels


def iter_rows(path: str, columns: Columns, start: int, stop: int) -> Iterator[Row]:
    """Rows ``start <= index < stop`` of a source file, in order, read incrementally."""
    if path.lower().endswith(".tar"):
        return _tar_rows(path, columns, start, stop)
    return _table_rows(path, columns, start, stop)

