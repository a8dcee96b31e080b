"""Atomic file writes: temp file in the same directory + fsync + rename, so a reader (or a job killed mid-write)
never sees a partial file. One home for this rule; every output of the pipeline is written through it."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lsgm.errors import StorageError, storage_error

__all__ = ["atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "replace_dir"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsynced and renamed onto ``path`` (mode 0644),
    on error removed (the old ``path``, if any, is untouched). An operating-system failure (full disk, read-only
    file system, permissions) becomes a :class:`lsgm.errors.StorageError` naming ``path`` and what to do."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _remove(tmp)
        if isinstance(exc, StorageError):
            raise
        raise storage_error(exc, path) from exc
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path | None) -> None:
    if tmp is not None:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (readers never see a partial file)."""
    atomic_write_bytes(text.encode(), path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON (one trailing newline) to ``path`` atomically.

    Metrics files never hold NaN or ±inf: a non-finite number raises ``ValueError`` naming the file and the key
    (write ``None`` for "not defined", e.g. the standard error of one value)."""
    bad = _nonfinite_keys(obj)
    if bad:
        raise ValueError(f"refusing to write non-finite values to {path}: {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")


def _nonfinite_keys(obj: Any, where: str = "") -> list[str]:
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [f"{where or '<value>'} = {obj}"]
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _nonfinite_keys(v, f"{where}.{key}" if where else str(key))]
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in _nonfinite_keys(v, f"{where}[{i}]")]
    return []


def replace_dir(tmp_dir: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the complete folder ``tmp_dir`` onto ``target``; an existing ``target`` is removed only after the swap
    (a crash leaves the old folder, the new one, or both: never a half-written one at ``target``)."""
    import shutil

    tmp_dir, target = Path(tmp_dir), Path(target)
    if not target.exists():
        os.replace(tmp_dir, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    backup.rmdir()
    os.replace(target, backup)
    try:
        os.replace(tmp_dir, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; on success it replaces ``path`` (:func:`replace_dir`), on error it
    is removed and ``path`` is untouched."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
