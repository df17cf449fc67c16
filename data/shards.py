"""Stage 0 writer: pack image folders, file lists and image tables / tar shards into deterministic WebDataset shards.

Layout of an output directory ``OUT`` (docs/formats.md, "Shards")::

    OUT/{name}-{i:06d}.tar          samples <key>.<fmt>, <key>.json, <key>.cls?, <key>.txt?
                                    (<key>.json lists the sha256 of the sample's other members, which
                                    the readers check: data.tar.sample_problem)
    OUT/{name}-{i:06d}.stats.json   written last and atomically: its presence means shard i is complete
    OUT/shard_run.json              the flags and the input fingerprint; a resume must match it
    OUT/manifest.json, OUT/sizes.json, OUT/rejected.jsonl, OUT/classes.json   (merge step)

Shard assignment is a pure function of the sorted input list: input ``i`` goes to shard
``i // shard_size`` under key ``{shard:06d}{i % shard_size:06d}``, and shard ``j`` belongs to node
``j % num_nodes``. Nodes and worker processes therefore write disjoint shards, any shard can be redone
on its own, and the merged result does not depend on how many nodes or workers produced it.
Rejected inputs leave their shard shorter (``sizes.json`` records the counts).

An input is an image file or one row of a source file (a Parquet / Arrow table with image bytes, or a sample
of a tar shard: :mod:`data.sources`); rows are inputs ``(file, row index)`` in row order, so a big source
file spreads over shards, workers and nodes like a folder does, and each shard reads only its rows.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import socket
import stat
import tarfile
import threading
import time
import warnings
from collections import Counter, defaultdict
from concurrent import futures
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data import sources
from data.files import AtomicFile, NotRegularFile, atomic_write, open_regular_file, temp_files_of
from data.tar import MEMBER_DIGESTS, META_DIGEST, meta_json
from data.world import resolve_world

__all__ = [
    "ShardError", "Rejected", "ShardOptions", "InputItem", "InputSet", "IMAGE_EXTENSIONS", "RESIZE_MODES",
    "FORMATS", "REJECT_REASONS", "RUN_FILE", "discover_inputs", "to_rgb", "resize_image", "encode_image",
    "process_image", "sample_key", "atomic_tar", "write_shard", "resolve_node", "node_shards",
    "find_duplicates", "shard_images", "merge_manifests", "tool_version",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif")
LIST_EXTENSIONS = (".txt", ".lst", ".csv", ".tsv", ".parquet")
RESIZE_MODES = ("center-crop", "shorter-side", "none")
FORMATS = ("jpg", "png", "webp")
REJECT_REASONS = ("missing", "unreadable", "not_a_file", "too_large", "empty", "not_an_image", "truncated",
                  "corrupt", "decompression_bomb", "too_small", "duplicate", "no_image")
WALK_SKIP_REASONS = ("symlink_loop", "duplicate_link", "not_a_file", "broken_link", "unreadable", "unreadable_folder")
MAX_CAPTION_BYTES = 1 << 20
RUN_FILE = "shard_run.json"
log = logging.getLogger("varitok.shard")
REDUCING_GAP = 3.0  # resampling keeps >= 3x the target resolution before the final Lanczos step
MAX_SHARD_SIZE = 1_000_000  # the in-shard part of a key has 6 digits
PATH_COLUMNS = ("path", "filepath", "file", "filename", "image", "image_path")


class ShardError(Exception):
    """A problem with the command itself (inputs, output, flags): raised before any shard is written."""


class Rejected(Exception):
    """One input cannot be written; ``reason`` is one of REJECT_REASONS, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("varitok")
    except PackageNotFoundError:
        return "0.1.0"


@dataclasses.dataclass(frozen=True)
class ShardOptions:
    """Everything that determines the bytes of the shards (``shard_run.json`` stores it for resumes)."""

    name: str = "shard"
    image_size: int = 256             # pixels: the square side (center-crop) or the shorter side
    resize: str = "center-crop"       # center-crop | shorter-side | none
    format: str = "jpg"               # jpg | png | webp
    quality: int = 95                 # jpg / webp quality (1..100); png is lossless
    shard_size: int = 1000            # inputs (not samples) per shard
    min_size: int = 0                 # reject images whose shorter side (pixels) is below this
    dedupe: bool = False              # reject later inputs with the same sha256 as an earlier one
    captions: bool = False            # write <key>.txt from caption columns or sibling <image>.txt
    max_pixels: int = 89_478_485      # width * height above this is a decompression bomb (PIL's default)
    max_input_bytes: int = 256 << 20  # larger input files (or image cells / tar members) are rejected (too_large)
    image_column: Optional[str] = None    # source tables: the image-bytes column (tars: member extension)
    label_column: Optional[str] = None    # source tables and file lists: the label column (tars: extension)
    caption_column: Optional[str] = None  # source tables and file lists: the caption column (tars: extension)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "./\\ "):
            raise ShardError(f"--name must be non-empty without dots, slashes or spaces, got {self.name!r}")
        if self.resize not in RESIZE_MODES:
            raise ShardError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.format not in FORMATS:
            raise ShardError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 1 <= self.quality <= 100:
            raise ShardError(f"--quality must be in 1..100, got {self.quality}")
        if self.image_size < 1 and self.resize != "none":
            raise ShardError(f"--image-size must be >= 1, got {self.image_size}")
        if not 1 <= self.shard_size <= MAX_SHARD_SIZE:
            raise ShardError(f"--shard-size must be in 1..{MAX_SHARD_SIZE}, got {self.shard_size}")
        if self.min_size < 0:
            raise ShardError(f"--min-size must be >= 0, got {self.min_size}")
        if self.max_pixels < 1:
            raise ShardError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.max_input_bytes < 1:
            raise ShardError(f"--max-input-bytes must be >= 1, got {self.max_input_bytes}")


@dataclasses.dataclass(frozen=True, slots=True)
class InputItem:
    path: str                       # absolute path of the image file, or of the source file holding the row
    label: Optional[int] = None     # class index, when known (tar rows: read with the row)
    caption: Optional[str] = None   # from a file list's caption column (sibling .txt files, rows: read later)
    row: Optional[int] = None       # row index inside a source file (data.sources); None for an image file


@dataclasses.dataclass(frozen=True)
class InputSet:
    items: list[InputItem]          # sorted: the order that fixes shard assignment
    classes: list[str]              # class names; label i is classes[i] (empty for numeric labels)
    skipped: list[dict] = dataclasses.field(default_factory=list)  # {path, reason, detail} found while walking

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for item in self.items:
            fields = [item.path, item.label, item.caption] + ([] if item.row is None else [item.row])
            digest.update(json.dumps(fields).encode())
            digest.update(b"\n")
        digest.update(json.dumps(self.classes).encode())
        source_files = sorted({item.path for item in self.items if item.row is not None})
        if source_files:  # a table or tar replaced by another with as many rows is a different input
            digest.update(json.dumps([[path, os.stat(path).st_size] for path in source_files]).encode())
        return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Input discovery
# ----------------------------------------------------------------------------------------------

def _walk_images(root: Path, skipped: list[dict], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files (or other ``extensions``) under ``root``, each real file once, in a deterministic order
    (sorted, depth first).

    Links are followed, but every folder (device, inode) is entered once, so a symlink loop or a second
    link to a folder adds nothing, and a file reached by several paths (links, hard links) counts once,
    under its path without links when it has one (links are followed only after every real folder).
    FIFOs, devices and sockets with an image suffix, broken links and unreadable folders are not inputs:
    each is appended to ``skipped`` as {path, reason, detail}. Nothing here opens a file.
    """
    seen_folders, seen_files, files, links, stack = set(), set(), [], [], []

    def skip(path: Path, reason: str, detail: str) -> None:
        skipped.append({"path": str(path), "reason": reason, "detail": detail})

    def add(path: Path, info: os.stat_result) -> Optional[Path]:
        """A directory entry (``info`` followed any link): returns it when it is a folder to walk."""
        identity = (info.st_dev, info.st_ino)
        if stat.S_ISDIR(info.st_mode):
            if identity in seen_folders:
                skip(path, "symlink_loop", f"links to {os.path.realpath(path)}, a folder already walked")
                return None
            seen_folders.add(identity)
            return path
        if path.suffix.lower() not in extensions:
            return None
        if not stat.S_ISREG(info.st_mode):
            skip(path, "not_a_file", "a FIFO, device or socket, not a regular file")
        elif identity in seen_files:
            skip(path, "duplicate_link", f"the same file as an earlier input ({os.path.realpath(path)})")
        else:
            seen_files.add(identity)
            files.append(path)
        return None

    def walk(folder: Path) -> None:
        """Depth first, sorted, without recursion (a hostile tree may be thousands of folders deep)."""
        stack.append(folder)
        while stack:
            current = stack.pop()
            try:
                with os.scandir(current) as scan:
                    entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
            except OSError as exc:
                skip(current, "unreadable_folder", exc.strerror or str(exc))
                continue
            subfolders = []
            for entry in entries:
                if entry.is_symlink():
                    links.append(Path(entry.path))  # followed once every real folder has been walked
                    continue
                try:
                    subfolders.append(add(Path(entry.path), entry.stat(follow_symlinks=False)))
                except OSError as exc:
                    skip(Path(entry.path), "unreadable", exc.strerror or str(exc))
            stack.extend(sorted((f for f in subfolders if f is not None), reverse=True))

    info = root.stat()
    seen_folders.add((info.st_dev, info.st_ino))
    walk(root)
    while links:
        link = links.pop(0)
        try:
            folder = add(link, link.stat())
        except OSError as exc:
            skip(link, "broken_link", exc.strerror or str(exc))
            continue
        if folder is not None:
            walk(folder)
    return files


def _folder_entries(root: Path, skipped: list[dict]) -> list[tuple[str, Optional[str], None]]:
    """Image files under ``root`` (recursive, see ``_walk_images``). If every image sits in a subfolder,
    the first subfolder name is its class (the ImageFolder layout); otherwise images get no label."""
    files = _walk_images(root, skipped)
    rel = [f.relative_to(root) for f in files]
    class_layout = bool(rel) and all(len(r.parts) > 1 for r in rel)
    return [(os.path.abspath(f), r.parts[0] if class_layout else None, None, None) for f, r in zip(files, rel)]


def _table_entries(list_file: Path, columns: list[str], rows: Iterable[Sequence[Any]],
                   chosen: sources.Columns) -> list[tuple]:
    path_col = sources.pick_column(columns, PATH_COLUMNS)
    if path_col is None:
        raise ShardError(f"file list {list_file} has no path column: found {columns}, "
                         f"expected one of {', '.join(PATH_COLUMNS)}")
    label_col = sources.pick_column(columns, sources.LABEL_COLUMNS, chosen.label)
    caption_col = sources.pick_column(columns, sources.CAPTION_COLUMNS, chosen.caption)
    for flag, wanted, found in (("--label-column", chosen.label, label_col),
                                ("--caption-column", chosen.caption, caption_col)):
        if wanted is not None and found is None:
            raise ShardError(f"file list {list_file}: {flag} {wanted!r} is not a column (found {columns})")
    index = {c: i for i, c in enumerate(columns)}

    def cell(row: Sequence[Any], column: Optional[str]) -> Any:
        return row[index[column]] if column is not None and index[column] < len(row) else None

    entries = []
    for row in rows:
        path = cell(row, path_col)
        if path is None or str(path).strip() == "":
            continue
        entries.append((os.path.abspath(list_file.parent / str(path).strip()), cell(row, label_col),
                        cell(row, caption_col), None))
    return entries


def _list_entries(list_file: Path, chosen: sources.Columns) -> list[tuple]:
    """Entries of a file list: ``.txt``/``.lst`` (one path per line, ``#`` comments), ``.csv``/``.tsv``
    (header naming a path column and optional label / caption columns) or ``.parquet`` (same columns).
    Relative paths are relative to the list file's folder."""
    suffix = list_file.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(list_file)
            return _table_entries(list_file, table.column_names, zip(*table.to_pydict().values()), chosen)
        with open(list_file, newline="", encoding="utf-8") as handle:
            if suffix in (".csv", ".tsv"):
                reader = csv.reader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                header = next(reader, [])
                return _table_entries(list_file, header, reader, chosen)
            lines = (line.strip() for line in handle)
            return _table_entries(list_file, ["path"], ([line] for line in lines if not line.startswith("#")),
                                  sources.Columns())  # no columns to choose
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise ShardError(f"cannot read file list {list_file}: {exc}") from exc


def _normalise_label(raw: Any) -> Optional[int | str]:
    if raw is None or (isinstance(raw, float) and np.isnan(raw)) or str(raw).strip() == "":
        return None
    if isinstance(raw, (int, np.integer)):
        return int(raw)
    text = str(raw).strip()
    try:
        return int(text)
    except ValueError:
        return text


def _columns(options: ShardOptions) -> sources.Columns:
    return sources.Columns(options.image_column, options.label_column, options.caption_column)


def _source_entries(files: Sequence[Path], options: ShardOptions) -> list[tuple]:
    """One entry per row of each source file (row count and labels only; the images are read per shard)."""
    entries = []
    for file in files:
        path = os.path.abspath(file)
        try:
            count = sources.count_rows(path, _columns(options))
            labels = sources.read_labels(path, _columns(options)) or [None] * count
        except (sources.SourceError, OSError) as exc:
            raise ShardError(f"--input {file}: {exc}") from None
        except Exception as exc:  # pyarrow raises ArrowInvalid / ArrowIOError on a damaged file
            raise ShardError(f"--input {file}: cannot read it as {file.suffix[1:]}: {exc}") from None
        entries.extend((path, label, None, row) for row, label in zip(range(count), labels))
    return entries


def _folder_inputs(folder: Path, options: ShardOptions, skipped: list[dict]) -> list[tuple]:
    """A ``datasets.save_to_disk`` folder, an image folder, or else a folder of source files."""
    arrow_files = sources.arrow_files_of(folder)
    if arrow_files is not None:
        return _source_entries(arrow_files, options)
    entries = _folder_entries(folder, skipped)
    if entries:
        return entries
    found = _walk_images(folder, skipped, sources.SOURCE_EXTENSIONS)
    tables = [f for f in found if f.suffix.lower() != ".parquet" or sources.is_image_table(f, _columns(options))]
    return _source_entries(tables, options)


def discover_inputs(paths: Sequence[str | os.PathLike], options: Optional[ShardOptions] = None) -> InputSet:
    """The sorted input list from image folders, file lists (see ``_list_entries``) and source files
    (Parquet / Arrow tables holding image bytes, ``datasets.save_to_disk`` folders, tar shards: one input
    per row, see :mod:`data.sources`; a folder without images is searched for them).

    Labels are class names (folders, or text in a label column), mapped to indices in sorted name
    order and listed in ``classes``, or integers from a numeric label column. Mixing both is an error.
    Folders are walked with each real file and folder once (``_walk_images``); what the walk refuses is
    listed in ``skipped``. Raises ShardError for a missing input path or when no image is found.
    """
    options = options or ShardOptions()
    entries: list[tuple] = []
    skipped: list[dict] = []
    for given in paths:
        path = Path(given)
        suffix = path.suffix.lower()
        try:
            if path.is_dir():
                entries.extend(_folder_inputs(path, options, skipped))
            elif path.is_file() and suffix in (".arrow", ".tar") or (
                    suffix == ".parquet" and path.is_file() and sources.is_image_table(path, _columns(options))):
                entries.extend(_source_entries([path], options))
            elif path.is_file() and suffix in LIST_EXTENSIONS:
                entries.extend(_list_entries(path, _columns(options)))
            elif path.is_file() and suffix in IMAGE_EXTENSIONS:
                entries.append((os.path.abspath(path), None, None, None))
            elif path.exists():
                raise ShardError(f"--input {given}: not a folder, an image, a file list ({', '.join(LIST_EXTENSIONS)}) "
                                 f"or a source file ({', '.join(sources.SOURCE_EXTENSIONS)})")
            else:
                raise ShardError(f"--input {given}: no such file or folder")
        except sources.SourceError as exc:
            raise ShardError(f"--input {given}: {exc}") from None
    if not entries:
        raise ShardError(f"no input images found in {', '.join(map(str, paths))} "
                         f"(looked for {', '.join(IMAGE_EXTENSIONS)} files, file lists and "
                         f"{', '.join(sources.SOURCE_EXTENSIONS)} sources)")
    labels = [_normalise_label(label) for _, label, _, _ in entries]
    names = sorted({label for label in labels if isinstance(label, str)})
    if names and any(isinstance(label, int) for label in labels):
        raise ShardError("inputs mix class names (folders or text labels) with numeric labels; "
                         "use one kind of label for all inputs")
    class_index = {name: i for i, name in enumerate(names)}
    items = [InputItem(path, class_index.get(label, label) if label is not None else None,
                       None if caption is None or str(caption).strip() == "" else str(caption).strip(), row)
             for (path, _, caption, row), label in zip(entries, labels)]
    items.sort(key=lambda it: (it.path, -1 if it.row is None else it.row, -1 if it.label is None else it.label,
                               it.caption or ""))
    if skipped:
        log.warning("skipped %d path(s) while walking the inputs (%s), e.g. %s", len(skipped),
                    ", ".join(f"{r} {n}" for r, n in sorted(Counter(e["reason"] for e in skipped).items())),
                    "; ".join(f"{e['path']}: {e['reason']}" for e in skipped[:3]))
    return InputSet(items, names, skipped)


# ----------------------------------------------------------------------------------------------
# One image: bytes in, encoded RGB bytes out (or Rejected)
# ----------------------------------------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha (RGBA, LA, palette transparency) is composited on white;
    16-bit grey (I;16*, I) is scaled from 0..65535 to 0..255; CMYK, L, 1 and the rest use PIL."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_image(img: Image.Image, size: int, mode: str) -> Image.Image:
    """``center-crop``: the centred square of side min(w, h) resampled to size x size;
    ``shorter-side``: shorter side -> size, aspect kept; ``none``: unchanged. Lanczos, antialiased."""
    width, height = img.size
    if mode == "none":
        return img
    if mode == "center-crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        target = (size, size)
    elif mode == "shorter-side":
        box = (0, 0, width, height)
        target = ((size, max(1, round(height * size / width))) if width <= height
                  else (max(1, round(width * size / height)), size))
    else:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if target == (width, height) and box == (0, 0, width, height):
        return img
    return img.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


def encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    """Encode with fixed settings and no metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    if fmt == "jpg":
        img.save(buffer, "JPEG", quality=quality, optimize=False, progressive=False, subsampling="4:2:0")
    elif fmt == "png":
        img.save(buffer, "PNG", compress_level=6)
    elif fmt == "webp":
        img.save(buffer, "WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return buffer.getvalue()


@contextlib.contextmanager
def _pixel_limit(max_pixels: int):
    """PIL's bomb check reads a module global: set it for one decode, then restore it."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


@contextlib.contextmanager
def _decoding():
    """Map the many ways PIL fails on bad bytes to Rejected with a reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except Rejected:
        raise
    except UnidentifiedImageError:  # PIL's message names the BytesIO's address: not reproducible
        raise Rejected("not_an_image", "cannot identify the image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("decompression_bomb", str(exc)) from None
    except OSError as exc:
        raise Rejected("truncated" if "truncat" in str(exc).lower() else "corrupt", str(exc)) from None
    except Exception as exc:  # decoders raise SyntaxError, ValueError, struct.error, ... on bad data
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}") from None


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, from the header: EXIF orientations 5-8 swap the axes."""
    width, height = img.size
    return (height, width) if img.getexif().get(0x0112) in (5, 6, 7, 8) else (width, height)


def process_image(data: bytes, options: ShardOptions) -> tuple[bytes, tuple[int, int]]:
    """Source bytes -> (encoded RGB image bytes, original (width, height) after EXIF orientation).

    Size checks (bomb, --min-size) use the header, before any pixel is decoded. JPEGs that will be
    downscaled by more than REDUCING_GAP are decoded at a reduced DCT scale (libjpeg "draft"),
    keeping at least REDUCING_GAP x the target side for the Lanczos step.
    """
    if not data:
        raise Rejected("empty", "zero-byte file")
    with _decoding():
        with _pixel_limit(options.max_pixels):
            img = Image.open(io.BytesIO(data))
        original = _oriented_size(img)
        if min(original) < options.min_size:
            raise Rejected("too_small", f"{original[0]}x{original[1]} is below --min-size {options.min_size}")
        scale = REDUCING_GAP * options.image_size / min(img.size)
        if options.resize != "none" and img.format == "JPEG" and scale < 1:
            img.draft(None, (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
        img.load()
        img = ImageOps.exif_transpose(img)
    try:
        rgb = resize_image(to_rgb(img), options.image_size, options.resize)
    except Exception as exc:  # exotic modes PIL cannot convert
        raise Rejected("corrupt", f"cannot convert mode {img.mode} to RGB: {type(exc).__name__}: {exc}") from None
    return encode_image(rgb, options.format, options.quality), original


def _read_source(path: str, limit: int) -> bytes:
    """The bytes of an input file of at most ``limit`` bytes; FIFOs, devices (``/dev/zero``) and bigger
    files (a 5 GB sparse ``.jpg``) are Rejected before anything is read."""
    try:
        handle, size = open_regular_file(path)
    except FileNotFoundError:
        raise Rejected("missing", "no such file") from None
    except NotRegularFile as exc:
        raise Rejected("not_a_file", str(exc)) from None
    except OSError as exc:
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    with handle:
        if size > limit:
            raise Rejected("too_large", f"{size} bytes is above --max-input-bytes {limit}")
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise Rejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise Rejected("too_large", f"grew above --max-input-bytes {limit} while being read")
    return data


def _source_id(item: InputItem) -> str:
    """How rejected.jsonl and duplicate messages name an input: its path, plus ``#row`` for a source row."""
    return item.path if item.row is None else f"{item.path}#{item.row}"


def _row_payload(row: sources.Row, item: InputItem, limit: int) -> tuple[bytes, Optional[int], Optional[str]]:
    """(image bytes, label, caption) of a source row, or Rejected."""
    if row.data is None:
        raise Rejected(row.reason or "no_image", row.problem or "no image bytes")
    if row.problem is not None:
        raise Rejected("corrupt", row.problem)
    if len(row.data) > limit:
        raise Rejected("too_large", f"{len(row.data)} bytes is above --max-input-bytes {limit}")
    label = item.label
    if label is None and row.label not in (None, ""):
        parsed = _normalise_label(row.label)
        if not isinstance(parsed, int):
            raise Rejected("corrupt", f"label member {row.label!r} is not an integer (tar labels must be class "
                           "indices)")
        label = parsed
    return row.data, label, row.caption


def _payloads(items: Sequence[InputItem], options: ShardOptions) -> Iterator[tuple[Any, Optional[int], Optional[str]]]:
    """Per item, in order: (image bytes or a Rejected, label, caption from the source row or None). Runs of
    rows of one source file are read in one incremental pass over that file's rows (data.sources.iter_rows)."""
    position = 0
    while position < len(items):
        item = items[position]
        if item.row is None:
            try:
                yield _read_source(item.path, options.max_input_bytes), item.label, None
            except Rejected as rej:
                yield rej, item.label, None
            position += 1
            continue
        end = position
        while end < len(items) and items[end].path == item.path and items[end].row is not None:
            end += 1
        rows = sources.iter_rows(item.path, _columns(options), item.row, items[end - 1].row + 1)
        current: Optional[sources.Row] = None
        failure: Optional[str] = None  # the source broke mid-read (changed after discovery): the rest is unreadable
        for wanted in items[position:end]:
            try:
                if failure is not None:
                    raise Rejected("unreadable", failure)
                while current is None or current.index < wanted.row:
                    current = next(rows, None)
                    if current is None:
                        break
                if current is None or current.index != wanted.row:
                    raise Rejected("missing", f"row {wanted.row} is no longer in {wanted.path} (file changed?)")
                yield _row_payload(current, wanted, options.max_input_bytes)
            except Rejected as rej:
                yield rej, wanted.label, None
            except Exception as exc:  # pyarrow / OS errors on a damaged file
                failure = f"{type(exc).__name__}: {exc}"
                yield Rejected("unreadable", failure), wanted.label, None
        position = end


def _sibling_caption(path: str) -> Optional[str]:
    try:
        text = _read_source(os.path.splitext(path)[0] + ".txt", MAX_CAPTION_BYTES)
    except Rejected:
        return None
    return text.decode("utf-8", errors="replace").strip() or None


# ----------------------------------------------------------------------------------------------
# Shard files
# ----------------------------------------------------------------------------------------------

def sample_key(shard: int, offset: int) -> str:
    """Key of input ``offset`` (0-based, within the shard) of shard ``shard``: 12 digits, no dots."""
    return f"{shard:06d}{offset:06d}"


def shard_stem(name: str, shard: int) -> str:
    return f"{name}-{shard:06d}"


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=1) + "\n").encode()


@contextlib.contextmanager
def atomic_tar(path: str | os.PathLike) -> Iterator[Callable[[str, bytes], None]]:
    """Stream a reproducible tar to ``path``: yields ``add(member_name, data)``; members keep their order
    and get mtime 0, root:root, mode 0644. The file appears under ``path`` only once complete
    (:class:`data.files.AtomicFile`); an exception leaves nothing behind."""
    with AtomicFile(path) as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
            yield add


def write_shard(out_dir: str | os.PathLike, shard: int, items: Sequence[InputItem], first_index: int,
                options: ShardOptions, duplicate_of: Optional[dict[int, str]] = None,
                on_item: Optional[Callable[[], None]] = None) -> dict:
    """Write shard ``shard`` (inputs ``items`` = global indices first_index, first_index + 1, ...):
    the tar, then ``{name}-{shard:06d}.stats.json`` last. ``duplicate_of`` maps a global index to the
    earlier path with the same content. Returns the stats dict (count, rejections, seconds)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    stem = shard_stem(options.name, shard)
    duplicate_of = duplicate_of or {}
    rejected: list[dict] = []
    for stale in temp_files_of(out_dir / f"{stem}.tar") + temp_files_of(out_dir / f"{stem}.stats.json"):
        stale.unlink(missing_ok=True)  # left by a killed writer of this shard (this node owns it)
    with atomic_tar(out_dir / f"{stem}.tar") as add:
        for offset, (item, (data, label, row_caption)) in enumerate(zip(items, _payloads(items, options))):
            key = sample_key(shard, offset)
            try:
                if first_index + offset in duplicate_of:
                    raise Rejected("duplicate", f"same content as {duplicate_of[first_index + offset]}")
                if isinstance(data, Rejected):
                    raise data
                encoded, (width, height) = process_image(data, options)
            except Rejected as rej:
                where = {"path": item.path} if item.row is None else {"path": item.path, "row": item.row}
                rejected.append({"key": key, **where, "reason": rej.reason, "detail": rej.detail})
            else:
                members = {options.format: encoded}
                if label is not None:
                    members["cls"] = str(label).encode()
                caption = None
                if options.captions:
                    caption = item.caption or (row_caption.strip() or None if row_caption is not None else None)
                    if caption is None and item.row is None:
                        caption = _sibling_caption(item.path)
                if caption is not None:
                    members["txt"] = caption.encode()
                meta = {"key": key, "source": item.path, "sha256": hashlib.sha256(data).hexdigest(),
                        "original_width": width, "original_height": height,
                        MEMBER_DIGESTS: {ext: hashlib.sha256(blob).hexdigest() for ext, blob in members.items()}}
                if item.row is not None:
                    meta["source_row"] = item.row
                meta[META_DIGEST] = hashlib.sha256(meta_json(meta)).hexdigest()
                add(f"{key}.{options.format}", encoded)
                add(f"{key}.json", meta_json(meta))
                for ext in ("cls", "txt"):
                    if ext in members:
                        add(f"{key}.{ext}", members[ext])
            if on_item is not None:
                on_item()
    stats = {
        "shard": f"{stem}.tar", "index": shard, "inputs": len(items), "count": len(items) - len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "rejected": rejected, "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write(out_dir / f"{stem}.stats.json", _json_bytes(stats))
    return stats


# ----------------------------------------------------------------------------------------------
# Nodes, workers, resume, merge
# ----------------------------------------------------------------------------------------------

def resolve_node(node_rank: Optional[int] = None, num_nodes: Optional[int] = None) -> tuple[int, int]:
    """(rank, count) from the flags, else this process's place in its job (:func:`data.world.resolve_world`:
    launcher env, an srun step, mpirun), else (0, 1)."""
    if (node_rank is None) != (num_nodes is None):
        raise ShardError("give both --node-rank and --num-nodes, or neither")
    if node_rank is None:
        try:
            world = resolve_world()
        except ValueError as exc:
            raise ShardError(str(exc)) from None
        node_rank, num_nodes = world.rank, world.size
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ShardError(f"node rank must be in 0..num_nodes-1, got rank {node_rank} of {num_nodes}")
    return node_rank, num_nodes


def node_shards(num_shards: int, node_rank: int, num_nodes: int) -> list[int]:
    return list(range(node_rank, num_shards, num_nodes))


def _hash_items(items: Sequence[InputItem], options: ShardOptions) -> list[Optional[str]]:
    """sha256 of each input's bytes (None for inputs that will be rejected anyway), read as write_shard reads them."""
    return [None if isinstance(data, Rejected) else hashlib.sha256(data).hexdigest()
            for data, _, _ in _payloads(items, options)]


def find_duplicates(paths: Sequence[str], hashes: Iterable[Optional[str]]) -> dict[int, str]:
    """{index: path of the first earlier input with the same hash} for every later repeat."""
    first: dict[str, str] = {}
    duplicates = {}
    for index, (path, digest) in enumerate(zip(paths, hashes)):
        if digest is None:
            continue
        if digest in first:
            duplicates[index] = first[digest]
        else:
            first[digest] = path
    return duplicates


def _writer_id() -> str:
    """Unique among the nodes sharing an output folder (pids alone can collide across hosts)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _check_output(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / f".write-probe-{_writer_id()}", b"").unlink()
    except OSError as exc:
        raise ShardError(f"--output {out_dir} is not a writable folder: {exc.strerror or exc}") from None


def _run_record(inputs: InputSet, options: ShardOptions) -> dict:
    return {"tool": "varitok shard", "version": tool_version(), "options": dataclasses.asdict(options),
            "num_inputs": len(inputs.items), "num_shards": -(-len(inputs.items) // options.shard_size),
            "inputs_sha256": inputs.fingerprint(), "classes": inputs.classes}


def _claim_output(out_dir: Path, record: dict) -> None:
    """Write the run file, or check that the existing one describes the same run (resume)."""
    run_file = out_dir / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        before = {**dataclasses.asdict(ShardOptions()), **previous.get("options", {})}  # older runs lack new flags
        diffs = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in record["options"].items() if before.get(k) != v]
        if previous.get("inputs_sha256") != record["inputs_sha256"]:
            diffs.append(f"input list: {previous.get('num_inputs')} -> {record['num_inputs']} inputs "
                         "(files added, removed or relabelled)")
        if diffs:
            raise ShardError(f"{out_dir} holds shards made with different settings; cannot resume into it "
                             f"({'; '.join(diffs)}). Use the original flags or a new --output.")
        return
    atomic_write(run_file, _json_bytes(record))


_progress_counter = None


def _init_worker(counter, parent: int) -> None:
    global _progress_counter
    _progress_counter = counter
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="exit-with-parent").start()


def _exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """End this worker within ``poll_s`` once the sharder ``parent`` (its pid, passed in: the sharder may die
    while the worker is still starting) is gone, killed or SIGTERM'd by a scheduler: a spawn worker would
    otherwise wait on its task queue forever. Its unfinished shard is a temporary file the next run removes."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


def _tick() -> None:
    with _progress_counter.get_lock():
        _progress_counter.value += 1


def _write_shard_task(args: tuple) -> dict:
    return write_shard(*args, on_item=_tick)


def _hash_pass(items: Sequence[InputItem], options: ShardOptions, executor: Optional[ProcessPoolExecutor],
               bar_factory) -> list[Optional[str]]:
    """Hashes of ``items`` in chunks of one shard (a chunk of source rows is one pass over its rows)."""
    size = options.shard_size
    chunks = [items[start:start + size] for start in range(0, len(items), size)]
    hash_chunk = functools.partial(_hash_items, options=options)
    hashes = executor.map(hash_chunk, chunks) if executor is not None else map(hash_chunk, chunks)
    with bar_factory(len(items), "hashing") as bar:
        result = []
        for digests in hashes:
            result.extend(digests)
            bar.update(len(digests))
    return result


def shard_images(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, options: ShardOptions,
                 workers: int = 1, node_rank: Optional[int] = None, num_nodes: Optional[int] = None,
                 progress: bool = True) -> dict:
    """Write this node's shards of ``inputs`` into ``output``; skip shards already complete.

    Errors in the command (no input, unwritable output, a resume with other flags) raise ShardError
    before any shard is written. With a single node the merged files are written at the end.
    Returns this node's summary: shards (total / mine / skipped), written, rejected_by_reason, seconds,
    walk_skipped (paths the folder walk refused: links to folders already walked, FIFOs, ...).
    """
    start = time.perf_counter()
    if workers < 1:
        raise ShardError(f"--workers must be >= 1, got {workers}")
    rank, world = resolve_node(node_rank, num_nodes)
    input_set = discover_inputs(inputs, options)
    out_dir = Path(output)
    _check_output(out_dir)
    record = _run_record(input_set, options)
    _claim_output(out_dir, record)

    items, size = input_set.items, options.shard_size
    mine = node_shards(record["num_shards"], rank, world)
    todo = [s for s in mine if not (out_dir / f"{shard_stem(options.name, s)}.stats.json").exists()]
    show = progress and rank == 0

    def bar_factory(total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", disable=not show, dynamic_ncols=True)

    executor = counter = None
    if workers > 1 and todo:
        ctx = multiprocessing.get_context("spawn")
        counter = ctx.Value("q", 0)
        processes = workers if options.dedupe else min(workers, len(todo))  # hashing splits by shard
        executor = ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init_worker,
                                       initargs=(counter, os.getpid()))
    try:
        duplicates_by_shard: dict[int, dict[int, str]] = defaultdict(dict)
        if options.dedupe and todo:
            last = (todo[-1] + 1) * size  # only inputs up to the end of this node's last shard matter
            hashes = _hash_pass(items[:last], options, executor, bar_factory)
            for index, first in find_duplicates([_source_id(item) for item in items[:last]], hashes).items():
                duplicates_by_shard[index // size][index] = first
        tasks = [(out_dir, s, items[s * size:(s + 1) * size], s * size, options, duplicates_by_shard[s])
                 for s in todo]
        with bar_factory(sum(len(t[2]) for t in tasks), f"shards ({len(todo)}/{len(mine)} to do)") as bar:
            if executor is None:
                for task in tasks:
                    write_shard(*task, on_item=lambda: bar.update(1))
            else:
                pending = {executor.submit(_write_shard_task, task) for task in tasks}
                while pending:
                    done, pending = futures.wait(pending, timeout=0.5, return_when=futures.FIRST_EXCEPTION)
                    for future in done:
                        future.result()  # a crashed worker raises here instead of hanging the run
                    bar.update(counter.value - bar.n)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    node_stats = [json.loads((out_dir / f"{shard_stem(options.name, s)}.stats.json").read_text()) for s in mine]
    reasons: Counter = Counter()
    for stats in node_stats:
        reasons.update(stats["rejected_by_reason"])
    summary = {"node_rank": rank, "num_nodes": world, "shards_total": record["num_shards"],
               "shards_mine": len(mine), "shards_skipped": len(mine) - len(todo),
               "inputs": sum(s["inputs"] for s in node_stats), "written": sum(s["count"] for s in node_stats),
               "rejected_by_reason": dict(sorted(reasons.items())), "merged": False,
               "processed_this_run": sum(len(t[2]) for t in tasks),
               "walk_skipped_by_reason": dict(sorted(Counter(e["reason"] for e in input_set.skipped).items())),
               "walk_skipped": input_set.skipped}
    if world == 1:
        merge_manifests(out_dir)
        summary["merged"] = True
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def merge_manifests(out_dir: str | os.PathLike) -> dict:
    """Combine the per-shard stats of a finished run (all nodes) into manifest.json, sizes.json,
    rejected.jsonl and classes.json. Raises ShardError naming the shards that are not complete."""
    out_dir = Path(out_dir)
    run_file = out_dir / RUN_FILE
    if not run_file.is_file():
        raise ShardError(f"{out_dir} has no {RUN_FILE}: not an output folder of `varitok shard`")
    record = json.loads(run_file.read_text())
    name, num_shards = record["options"]["name"], record["num_shards"]
    stems = [shard_stem(name, s) for s in range(num_shards)]
    missing = [s for s, stem in enumerate(stems)
               if not (out_dir / f"{stem}.stats.json").is_file() or not (out_dir / f"{stem}.tar").is_file()]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ShardError(f"{len(missing)} of {num_shards} shards are not complete in {out_dir} (shards {shown}); "
                         "re-run the shard command on the nodes that own them (shard j belongs to node "
                         "j % num_nodes), then merge again")
    all_stats = [json.loads((out_dir / f"{stem}.stats.json").read_text()) for stem in stems]
    sizes = {stats["shard"]: stats["count"] for stats in all_stats}
    rejected = [entry for stats in all_stats for entry in stats["rejected"]]
    reasons = Counter(entry["reason"] for entry in rejected)
    options = record["options"]
    manifest = {
        "tool": record["tool"], "version": record["version"], "name": name,
        "image_size": options["image_size"], "resize": options["resize"], "format": options["format"],
        "options": options, "num_inputs": record["num_inputs"], "num_samples": sum(sizes.values()),
        "num_rejected": len(rejected), "rejected_by_reason": dict(sorted(reasons.items())),
        "num_shards": num_shards, "shards": list(sizes), "classes": record["classes"],
        "num_classes": len(record["classes"]), "inputs_sha256": record["inputs_sha256"],
    }
    atomic_write(out_dir / "sizes.json", _json_bytes(sizes))
    atomic_write(out_dir / "rejected.jsonl",
                  b"".join(json.dumps(entry, sort_keys=True).encode() + b"\n" for entry in rejected))
    if record["classes"]:
        atomic_write(out_dir / "classes.json", _json_bytes({c: i for i, c in enumerate(record["classes"])}))
    atomic_write(out_dir / "manifest.json", _json_bytes(manifest))
    return manifest
