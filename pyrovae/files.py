"""Files that never lose work: atomic, durable writes and folder locks.

Every file pyrovae writes goes through :func:`write_atomic` (or
:func:`atomic_path` for writers that want a path, such as ``torch.save`` and
matplotlib): the content goes to a uniquely named temporary file in the same
folder, is flushed and fsynced, renamed over the target, and the folder is
fsynced so the rename itself survives a crash. A reader, or a process killed
at any instant, sees the old file or the new one, never half of one.

:class:`FolderLock` makes a second writer to a run or suite folder fail at
once, naming the process that holds it; the lock is released by the kernel
when its holder dies, however it dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
LOCK_FILE = ".pyrovae.lock"


class FolderLockedError(RuntimeError):
    """Another process is writing to the folder."""


def fsync_folder(folder: PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a unique temporary path beside ``path``; when the block ends
    without an error, fsync it and rename it to ``path``; else remove it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp makes the file private (0600); give it the usual mode under the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: PathLike, data: Union[str, bytes]) -> Path:
    """Write ``data`` to ``path`` atomically and durably; return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
    return path


def remove_stale_temporaries(folder: PathLike) -> None:
    """Delete temporary files a killed writer left in ``folder``."""
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def check_writable(folder: PathLike, what: str = "--out") -> Path:
    """Raise ``ValueError`` unless ``folder`` is, or can be made, a writable
    folder; creates nothing."""
    if not str(folder).strip():
        raise ValueError(f"{what} is empty; give the folder to write to, e.g. {what} runs/my-run")
    folder = Path(folder)
    try:
        folder.exists()
    except OSError as err:  # a name too long, a loop of links
        raise ValueError(f"{what} {folder} cannot be used: {err.strerror}; choose another "
                         f"{what}") from None
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file, not a folder; choose another {what}")
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {folder} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder} is not writable (no write permission on {probe}); "
                         f"choose another {what}")
    return folder


class FolderLock:
    """An exclusive, non-blocking lock on a folder (``fcntl.flock`` on a file
    inside it), held for the lifetime of a ``with`` block."""

    def __init__(self, folder: PathLike, what: str = "run") -> None:
        self.folder = Path(folder)
        self.what = what
        self._fd: Optional[int] = None

    def __enter__(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
                holder = f" by process {info.get('pid')} on {info.get('host')} since {info.get('since')}"
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FolderLockedError(
                    f"{self.folder} is being written{holder}; wait for that {self.what} to "
                    "finish or choose another folder"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
