"""Provenance of results: the git commit of this checkout and file digests (torch-free)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Optional

__all__ = ["git_commit", "peak_rss_mb", "sha256_file", "sha256_or_none"]


def git_commit(repo: str | os.PathLike | None = None) -> Optional[str]:
    """``git rev-parse HEAD`` of the repository holding this package (None when not a git checkout)."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_or_none(path: str | os.PathLike) -> Optional[str]:
    """sha256 of ``path`` if it is a file, else None."""
    return sha256_file(path) if Path(path).is_file() else None


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process so far, in MB (``getrusage``; None where unavailable)."""
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB on Linux
