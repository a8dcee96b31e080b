"""Errors a user can cause or meet, as opposed to bugs (torch-free).

Every :class:`LsgmError` — a bad config, a bad or missing file, a full disk, an unreadable model — reaches the
command line as ONE line, ``lsgm: error: <what, which file, what to do>``, with exit status 2 (:func:`lsgm.cli.main`).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os

__all__ = ["LsgmError", "ModelFileError", "StorageError", "storage_error"]


class LsgmError(Exception):
    """Base class of the errors the CLI reports in one line (exit 2)."""


class ModelFileError(LsgmError):
    """A model or checkpoint file exists but cannot be read (truncated, corrupt, not ours)."""


class StorageError(LsgmError, OSError):
    """Writing or reading a file failed at the operating-system level (full disk, read-only file system, ...)."""

    def __str__(self) -> str:
        return str(self.strerror)


_HINTS = {
    errno.ENOSPC: "the disk is full: free space (or move data/ to a larger disk) and rerun the same command; "
                  "finished outputs are kept and training resumes from its last checkpoint",
    errno.EDQUOT: "the disk quota is exceeded: free space and rerun the same command",
    errno.EROFS: "the file system is read-only: run from a writable checkout (or point --run-root / --out-dir at one)",
    errno.EACCES: "permission denied: check the owner and mode of the file and its folder "
                  "(outputs DVC restored are plain copies you own; the DVC cache under .dvc/cache is read-only)",
    errno.EPERM: "operation not permitted: check the owner and mode of the file and its folder",
}


def storage_error(exc: OSError, path: str | os.PathLike, action: str = "write") -> StorageError:
    """A :class:`StorageError` naming ``path``, the system's reason and what to do (``raise storage_error(...) from exc``)."""
    reason = exc.strerror or str(exc)
    hint = _HINTS.get(exc.errno or -1, "")
    return StorageError(exc.errno or 0, f"cannot {action} {path}: {reason}" + (f"; {hint}" if hint else ""), str(path))
