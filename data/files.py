"""Safe file I/O: atomic output files that never follow a link, and input files opened without blocking.

Writing (the one way varitok writes a file into an output folder)::

    with AtomicFile(out / "sizes.json") as handle:   # a binary file object
        handle.write(data)                           # the file appears under its name only on a clean exit
    atomic_write(out / "manifest.json", data)        # the same for bytes / str in one call

The data goes to a fresh temporary file in the destination's folder, created with ``O_CREAT | O_EXCL |
O_NOFOLLOW`` under a unique name (``tempfile.mkstemp``: ``.{name}.<random>.tmp``), so a file or symlink
planted under any name in the output folder is never opened, let alone written through. A clean exit
fsyncs the file, renames it over the destination (``rename`` replaces a link at the destination instead
of following it) and fsyncs the folder; an exception deletes the temporary file. Readers therefore see
the old file or the whole new one, and a kill -9 leaves at most a ``.{name}.*.tmp`` file
(:func:`temp_files_of` finds them).

Reading an untrusted path: :func:`open_regular_file` refuses FIFOs, devices, sockets and folders without
blocking (``O_NONBLOCK``: ``open`` of a FIFO would wait for a writer forever) and reports the size, so a
caller can refuse a ``/dev/zero`` or a 5 GB sparse file before reading a byte of it.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Optional

__all__ = ["AtomicFile", "atomic_write", "temp_files_of", "open_no_follow", "fsync_directory", "NotRegularFile",
           "open_regular_file", "make_folder"]

FILE_MODE = 0o644
TEMP_SUFFIX = ".tmp"


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


def open_no_follow(path: str | os.PathLike, flags: int = os.O_RDWR | os.O_CREAT, mode: int = FILE_MODE) -> int:
    """``os.open`` that refuses a symlink at ``path`` (``O_NOFOLLOW``): for lock files and the like, which are
    opened in place rather than replaced. Returns the file descriptor; raises OSError (ELOOP) on a link."""
    return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)


def make_folder(path: str | os.PathLike) -> Path:
    """Create a folder a stage owns inside its output (parents too); a symlink planted in its place is refused
    (ValueError) instead of being written through."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; refusing to write through it out of {path.parent} (delete it)")
    return path


def temp_files_of(path: str | os.PathLike) -> list[Path]:
    """The temporary files that interrupted writers of ``path`` left behind (sorted)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"))


class AtomicFile:
    """A binary file that replaces ``path`` atomically when closed cleanly (see the module docstring).

    Use as a context manager (``with AtomicFile(p) as handle``), or call :meth:`commit` / :meth:`abort`
    yourself. ``temp_path`` is the temporary file, for writers that need a path (they must write to the
    same inode, i.e. open it without ``O_EXCL`` and without replacing it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX)
        self.temp_path = Path(temp)
        try:
            os.fchmod(fd, FILE_MODE)  # mkstemp creates 0600; outputs are meant to be shared
        except OSError:
            pass
        self.file: BinaryIO = os.fdopen(fd, "w+b")
        self.done = False

    def commit(self) -> Path:
        """Flush, fsync, rename over ``path`` and fsync the folder; returns ``path``."""
        if self.done:
            raise ValueError(f"{self.path}: this atomic write is already finished")
        self.done = True
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temp_path, self.path)
        except BaseException:
            self.file.close()
            self.temp_path.unlink(missing_ok=True)
            raise
        fsync_directory(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        if self.done:
            return
        self.done = True
        self.file.close()
        self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> BinaryIO:
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write(path: str | os.PathLike, data: bytes | str, encoding: Optional[str] = "utf-8") -> Path:
    """Replace ``path`` by ``data`` (str is encoded with ``encoding``) atomically; returns ``path``."""
    payload = data.encode(encoding) if isinstance(data, str) else data
    with AtomicFile(path) as handle:
        handle.write(payload)
    return Path(path)


class NotRegularFile(OSError):
    """A path that is a FIFO, device, socket or folder where a regular file was expected."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def open_regular_file(path: str | os.PathLike, buffering: int = -1) -> tuple[BinaryIO, int]:
    """``(binary reader, size in bytes)`` of a regular file (links followed); raises :class:`NotRegularFile`
    for anything else, without blocking, and OSError when it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(f"{path} is a {_kind(info.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering), info.st_size
    except BaseException:
        os.close(fd)
        raise
