"""The one tar reader of varitok: members of WebDataset shards, validated header by header, and shard sizes.

Every stage that reads shards (train-tokenizer's stream, tokenize, calibrate-entropy, verify, eval) goes
through :func:`iter_tar_members`. A shard is untrusted input, so every number in it is checked before it
is used: header checksums, octal / base-256 size fields, pax record lengths (each record must end inside
the header and advance the parser), member sizes (inside the file, at most ``max_member_bytes``), and the
file itself must be a regular file. Anything else raises :class:`ShardReadError` naming the shard and
the byte offset; members before the damage have been yielded by then. Reading always advances by at
least one 512-byte block per header, so a tar of ``n`` bytes is parsed in ``O(n / 512)`` steps whatever
its contents. Member names may hold any bytes: they are decoded as UTF-8 with ``surrogateescape``
(lossless); :func:`name_problem` tells a consumer that a name is not valid UTF-8.

``sizes.json`` (written by ``varitok shard``) maps shard file names to sample counts; :func:`shard_sizes`
checks its type and each count against what the tar's size can hold, and counts shards it does not list
(or all of them, ``recount=True``) from their headers.

:func:`read_samples` groups members into samples (:class:`RawSample`) for every consumer (the training stream,
tokenize, verify); :func:`sample_contents` says what a sample holds (image member, label) or why it is unusable
(:class:`BadSample`); :func:`expand_shard_spec` turns a directory / brace pattern / list into shard paths.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import braceexpand

from data.files import NotRegularFile, open_regular_file

__all__ = ["ShardReadError", "iter_tar_members", "count_tar_samples", "name_problem", "display_name", "sample_problem",
           "read_sizes_file", "shard_sizes", "meta_json", "SIZES_FILE", "MAX_MEMBER_BYTES", "MEMBER_DIGESTS",
           "META_DIGEST", "IMAGE_EXTENSIONS", "RawSample", "BadSample", "read_samples", "sample_contents",
           "shard_keys", "split_key", "expand_shard_spec"]

log = logging.getLogger("varitok.tar")

BLOCK = tarfile.BLOCKSIZE
SIZES_FILE = "sizes.json"
MAX_MEMBER_BYTES = 1 << 30  # a sample file above 1 GiB is not an image a tokenizer reads
MAX_HEADER_BYTES = 1 << 20  # pax / GNU long-name headers hold names and a few numbers
_META_MEMBER = re.compile(r"(.*/)?__[^/]*__$")  # webdataset metadata members, not samples
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule: key = up to the first dot of the name
_DATA_TYPES = (b"0", b"\0", b"7")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_OCTAL_DIGITS = frozenset(b"01234567")
MEMBER_DIGESTS = "members_sha256"  # key of <key>.json: {extension: sha256 hex of that member's bytes}
META_DIGEST = "meta_sha256"  # key of <key>.json: sha256 of the rest of the .json (meta_json without this key)


class ShardReadError(tarfile.ReadError):
    """A shard that is truncated, garbled or not a tar; the message names the file and the byte offset."""


def name_problem(name: str) -> Optional[str]:
    """Why a member name cannot serve as a sample key (None when it can): only invalid UTF-8 is refused."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"member name {display_name(name)!r} is not valid UTF-8"
    return None


def sample_problem(members: Mapping[str, Any]) -> Optional[str]:
    """Why a sample's member bytes cannot be trusted (None when they can), from its ``.json`` member.

    ``varitok shard`` lists the sha256 of every other member of a sample in ``<key>.json`` (``MEMBER_DIGESTS``)
    and of the ``.json`` itself (``META_DIGEST``); a member that is missing or differs (a flipped bit, a member
    swapped in) is a problem. The tar headers'
    own checksums cover names and sizes, so together a damaged sample is never passed on as a good one.
    Samples without that list (shards from other tools) are not checked. ``members``: {extension: bytes}.
    """
    raw = members.get("json")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
        digests = meta.get(MEMBER_DIGESTS)
    except (ValueError, AttributeError):
        return "its .json member is not a JSON object"
    if digests is None:
        return None
    if not isinstance(digests, dict):
        return f"{MEMBER_DIGESTS} in its .json member is not an object"
    own = meta.pop(META_DIGEST, None)
    if own != hashlib.sha256(meta_json(meta)).hexdigest():
        return "its .json member does not match its own sha256 (damaged)"
    for ext, digest in digests.items():
        data = members.get(ext)
        if not isinstance(data, bytes):
            return f"member .{ext} listed in its .json is missing"
        if hashlib.sha256(data).hexdigest() != digest:
            return f"member .{ext} does not match the sha256 its .json lists (damaged)"
    return None


def meta_json(meta: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a sample's ``.json`` (sorted keys), as ``varitok shard`` writes and hashes them."""
    return json.dumps(meta, sort_keys=True).encode()


def display_name(name: str) -> str:
    """A printable, JSON-safe form of a member name decoded with surrogateescape (bad bytes as ``\\xNN``)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _number(field: bytes, what: str, where: str) -> int:
    """A numeric header field: NUL/space padded octal, or GNU base-256 (top bit set; negative refused)."""
    if field[0] & 0x80:
        if field[0] & 0x40:
            raise ShardReadError(f"{where}: negative base-256 {what} field")
        return int.from_bytes(bytes([field[0] & 0x3F]) + field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        return 0
    if not _OCTAL_DIGITS.issuperset(digits):
        raise ShardReadError(f"{where}: {what} field {field!r} is not an octal number")
    return int(digits, 8)


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """``"<len> key=value\\n"`` records of a pax extended header; each must fit and end where it says."""
    records, offset = {}, 0
    while offset < len(data) and data[offset] != 0:  # some writers pad the header data with NULs
        space = data.find(b" ", offset, offset + 21)
        digits = data[offset:space] if space > offset else b""
        if not digits.isdigit():
            raise ShardReadError(f"{where}: pax record at offset {offset} has no decimal length")
        end = offset + int(digits)
        if end <= space + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise ShardReadError(f"{where}: pax record at offset {offset} claims length {int(digits)}, which does "
                                 f"not end inside the {len(data)}-byte header with a newline")
        key, equals, value = data[space + 1:end - 1].partition(b"=")
        if not equals or not key:
            raise ShardReadError(f"{where}: pax record at offset {offset} is not key=value")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        offset = end
    return records


def iter_tar_members(path: str, read_data: bool = True,
                     max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes | None]]:
    """``(name, data)`` of every regular file in a tar (ustar, GNU long names, pax), in file order.

    About 7x faster than ``tarfile`` streaming on small members. ``read_data=False`` seeks over the data
    and yields ``None``. Raises :class:`ShardReadError` (a ``tarfile.ReadError``) on any damage: truncated
    (a member or the end-of-archive block cut off), a garbled header (bad checksum, a non-numeric field, a
    bad pax record), a member larger than the file or than ``max_member_bytes``; also OSError when the
    file cannot be opened.
    """
    try:
        stream, file_size = open_regular_file(path, buffering=1 << 20)
    except NotRegularFile as exc:
        raise ShardReadError(str(exc)) from None
    with stream:
        long_name, pax = None, {}
        while True:
            at = stream.tell()
            where = f"{path} at byte {at}"
            header = stream.read(BLOCK)
            if len(header) < BLOCK:
                raise ShardReadError(f"{path}: truncated at byte {at}: no end-of-archive block")
            if not any(header):
                return
            checksum = _number(header[148:156], "checksum", where)
            unsigned = sum(header[:148]) + 256 + sum(header[156:])
            if checksum != unsigned and checksum != unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:]):
                raise ShardReadError(f"{where}: garbled header (checksum mismatch): not a tar, or damaged")
            kind = header[156:157]
            if "size" in pax:
                if not pax["size"].isdigit():
                    raise ShardReadError(f"{where}: pax size {pax['size']!r} is not a number")
                size = int(pax["size"])
            else:
                size = _number(header[124:136], "size", where)
            data_end = at + BLOCK + size
            if data_end > file_size:
                raise ShardReadError(f"{where}: member of {size} bytes runs past the end of the "
                                     f"{file_size}-byte file (truncated)")
            limit = MAX_HEADER_BYTES if kind in (b"L", b"K", b"x", b"g") else max_member_bytes
            if size > limit:
                raise ShardReadError(f"{where}: member of {size} bytes is above the limit of {limit} bytes")
            padding = -size % BLOCK
            if kind in (b"L", b"x") or (kind in _DATA_TYPES and read_data):
                data = stream.read(size)
                if len(data) < size:
                    raise ShardReadError(f"{path}: truncated inside member data at byte {stream.tell()}")
            else:
                data = None
            stream.seek(data_end + padding)
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            if kind == b"x":
                pax = _pax_records(data, where)
                continue
            if kind in (b"K", b"g"):  # long link target, global pax header: nothing a sample uses
                continue
            name = pax.get("path") or long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}" if prefix else name
            long_name, pax = None, {}
            if kind in _DATA_TYPES and not _META_MEMBER.match(name):
                yield name, data


def count_tar_samples(path: str) -> int:
    """Number of samples (distinct adjacent keys) in a tar, from its headers only (data is seeked over).

    A damaged tar counts the samples whose headers could be read, with a warning naming it.
    """
    count, previous = 0, None
    try:
        for name, _ in iter_tar_members(path, read_data=False):
            key, _ = split_key(name)
            if key is not None and key != previous:
                count, previous = count + 1, key
    except (tarfile.ReadError, OSError) as exc:
        log.warning("while counting samples of %s: %s (counted %d)", path, exc, count)
    return count


def read_sizes_file(path: str | os.PathLike) -> dict[str, int]:
    """``sizes.json``: {shard file name: sample count >= 0}. Raises ValueError naming the file and the entry."""
    path = Path(path)
    try:
        sizes = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); delete it to have the shards counted from their "
                         f"headers, or re-create it with `varitok shard --merge-manifests {path.parent}`") from None
    bad = ([] if isinstance(sizes, dict) else ["<top level is not an object>"]) or [
        name for name, count in sizes.items() if type(count) is not int or count < 0]
    if bad:
        raise ValueError(f"{path}: sample counts must be integers >= 0 keyed by shard file name, got bad entries "
                         f"{bad[:5]}; delete it or re-create it with `varitok shard --merge-manifests {path.parent}`")
    return sizes


def shard_sizes(shards: Sequence[str], recount: bool = False) -> tuple[list[int], str]:
    """Sample count per shard and where it came from: ``"sizes.json"`` when every shard is listed in the
    ``sizes.json`` beside it, else ``"tar headers"`` (missing ones are counted by scanning headers).

    A listed count that the tar cannot hold (each sample needs at least one 512-byte header) is a
    ValueError naming the shard. ``recount=True`` counts every shard from its headers and warns about
    each listed count that differs.
    """
    listed: dict[str, dict[str, int]] = {}
    sizes, scanned, wrong = [], 0, []
    for shard in shards:
        directory, name = os.path.split(os.path.abspath(shard))
        if directory not in listed:
            sizes_path = os.path.join(directory, SIZES_FILE)
            listed[directory] = read_sizes_file(sizes_path) if os.path.isfile(sizes_path) else {}
        claimed = listed[directory].get(name)
        if claimed is not None and claimed * BLOCK + 2 * BLOCK > os.path.getsize(shard) and claimed:
            raise ValueError(f"{os.path.join(directory, SIZES_FILE)} lists {claimed} samples for {shard}, more than "
                             f"its {os.path.getsize(shard)} bytes can hold: the shard was truncated or replaced; "
                             f"re-create it, or delete {SIZES_FILE} to count samples from the tar headers")
        if claimed is None or recount:
            counted = count_tar_samples(shard)
            scanned += 1
            if claimed is not None and counted != claimed:
                wrong.append(f"{name}: listed {claimed}, counted {counted}")
            claimed = counted
        sizes.append(claimed)
    if wrong:
        log.warning("%s disagrees with the tar headers of %d shard(s), using the counts: %s", SIZES_FILE, len(wrong),
                    "; ".join(wrong[:5]))
    if scanned and not recount:
        log.info("no %s entry for %d of %d shards: counted their samples from tar headers",
                 SIZES_FILE, scanned, len(shards))
    return sizes, ("tar headers" if scanned else SIZES_FILE)


# ----------------------------------------------------------------------------------------- samples
def split_key(name: str) -> tuple[Optional[str], Optional[str]]:
    """``(key, extension)`` of a member name (webdataset's rule: the key ends at the first dot of the base
    name); ``(None, None)`` for a name without an extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


@dataclasses.dataclass
class RawSample:
    """One shard sample: its key, members ({lowercase extension: bytes, or None when read without data}), the
    shard it came from, and ``error`` ("reason: detail") when the tar broke while (or before) this sample was
    read, or its member names are unusable (members may then be incomplete)."""
    key: str
    members: dict[str, Optional[bytes]]
    shard: str = ""
    error: str = ""


class BadSample(ValueError):
    """A sample that cannot be used: ``reason`` (a short word counted in summaries) and ``detail``."""

    def __init__(self, reason: str, detail: Any) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, str(detail)


def read_samples(path: str, read_data: bool = True) -> Iterator[RawSample]:
    """Samples of one tar (adjacent members sharing a key), in file order; never raises on bad data.

    A truncated or garbled tar ends the shard with one RawSample carrying ``error`` (``tar_error``; its key is
    the sample being assembled, or "" when the damage fell between samples); a key whose member names are not
    valid UTF-8 gives one RawSample with ``error`` (``bad_name``; key shown with ``\\xNN`` escapes) and reading
    goes on; a sample with two members of one extension carries ``duplicate_member``. ``read_data=False`` reads
    only the headers (members map to None).
    """
    key, members, error, last_bad = None, {}, "", None
    try:
        for name, data in iter_tar_members(path, read_data=read_data):
            base, ext = split_key(name)
            if base is None:
                continue
            problem = name_problem(name)
            if problem:  # not a usable key: skip its members, listed once per key
                if key is not None:
                    yield RawSample(key, members, path, error)
                key, members, error = None, {}, ""
                if display_name(base) != last_bad:
                    last_bad = display_name(base)
                    yield RawSample(last_bad, {}, path, f"bad_name: {problem}")
                continue
            if base != key and key is not None:
                yield RawSample(key, members, path, error)
                members, error = {}, ""
            key, ext = base, ext.lower()
            if ext in members and not error:
                error = f"duplicate_member: two .{ext} members"
            members[ext] = data
    except (tarfile.TarError, OSError, ValueError) as exc:  # truncated / garbled archive, unreadable file
        yield RawSample(key or "", members, path, f"tar_error: {exc!r}")
        return
    if key is not None:
        yield RawSample(key, members, path, error)


def shard_keys(path: str) -> list[str]:
    """The keys of the complete samples of a shard, from its tar headers."""
    return [s.key for s in read_samples(path, read_data=False) if not s.error]


def sample_contents(sample: RawSample) -> tuple[str, int]:
    """``(image extension, label)`` of a usable sample (label -1 without a ``.cls`` member).

    Raises :class:`BadSample` with reason ``tar_error`` / ``bad_name`` / ``duplicate_member`` (from reading),
    ``damaged_sample`` (members differ from the digests of its ``.json``), ``missing_image`` or ``bad_label``.
    """
    if sample.error:
        reason, _, detail = sample.error.partition(": ")
        raise BadSample(reason, detail)
    problem = sample_problem(sample.members)
    if problem:
        raise BadSample("damaged_sample", problem)
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
    if ext is None:
        raise BadSample("missing_image", f"members {sorted(sample.members)}")
    label = -1
    if "cls" in sample.members:
        try:
            label = int(sample.members["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise BadSample("bad_label", exc) from None
        if not -1 <= label < 2 ** 31:
            raise BadSample("bad_label", f"{label} is outside int32")
    return ext, label


# ----------------------------------------------------------------------------------------- shard lists
def expand_shard_spec(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths named by ``spec``, in order.

    ``spec`` is a directory (its ``*.tar`` files, sorted), a brace pattern
    (``dir/name-{000000..000099}.tar``), a comma-separated string of those, or a list of those.
    Raises ``FileNotFoundError`` naming missing files and ``ValueError`` when nothing matches.
    """
    if isinstance(spec, (str, os.PathLike)):
        parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    else:
        parts = [str(p) for p in spec]
    shards: list[str] = []
    for part in parts:
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise ValueError(f"shard directory {part!r} contains no .tar files")
            shards.extend(found)
        else:
            shards.extend(braceexpand.braceexpand(part))
    if not shards:
        raise ValueError(f"shard spec {spec!r} names no shards; give a directory, a brace pattern "
                         "like 'dir/name-{000000..000009}.tar', or a list of tar paths")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards do not exist: {missing[:5]}{more}")
    return shards
