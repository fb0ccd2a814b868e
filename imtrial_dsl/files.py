"""File primitives every stage shares: atomic write-then-rename, content hashing, advisory locks.

One owner for these policies, so that "a reader never sees half a file" and "a file's identity is
its sha256" mean the same thing in ingest, de-identification, the archive, transfer and the exporters.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Optional

TMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """The hidden temp file next to ``path`` that :func:`atomic_write_bytes` renames into place.

    Named ``.<name>.<pid>.tmp`` so that a sweep after a crash (``Workdir.sweep_temp``) finds it."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False, mode: Optional[int] = None) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it over ``path``.

    A reader, or a re-run after ``kill -9``, sees the old file or the new one, never half of either.
    ``durable`` also fsyncs the file and its folder (survives power loss, not only a killed process);
    ask for it when the only other copy is about to be deleted. ``mode`` sets permissions before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write() names no file: say which
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_dataset(path: str | os.PathLike, ds: Any, *, durable: bool = False) -> None:
    """A pydicom data set as a DICOM Part 10 file (preamble, file meta), written like :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(path, buf.getvalue(), durable=durable)


def dumps_json(obj: Any) -> str:
    """The project's JSON file format: indented, keys sorted (stable diffs and hashes), trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any, *, durable: bool = False) -> None:
    atomic_write_bytes(path, dumps_json(obj).encode("utf-8"), durable=durable)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The parsed JSON at ``path``, or ``default`` when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (POSIX: the directory entry lives in the folder)."""
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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(folder: str | os.PathLike) -> str:
    """One hash over every file under ``folder`` (relative names and contents, in name order)."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def try_lock(path: str | os.PathLike) -> Optional[IO]:
    """An exclusive ``flock`` on ``path`` without waiting: the open file holds it (close to release), or None."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block, waiting for it if another process holds it.

    The lock dies with the process, so a ``kill -9`` never leaves a workdir locked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
