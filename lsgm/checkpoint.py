"""Atomic, checksummed, rotating training checkpoints (never lose work, never load a torn file).

Layout of a run directory's ``checkpoints/``::

    ckpt-000000400.pt          torch.save of the full training state (plain tensors/primitives only)
    ckpt-000000400.pt.sha256   hex digest of the .pt file, written after it

Both are written to a temp name, fsynced and renamed, so a crash leaves either the old set or the new one.
On resume the newest checkpoint whose digest matches is used; a truncated or corrupt one is skipped with a
warning. States are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from lsgm.atomic import atomic_write_bytes
from lsgm.provenance import sha256_file

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save`` atomically; returns the sha256 of the written bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(data, path)
    return hashlib.sha256(data).hexdigest()


class CheckpointManager:
    """Keeps the last ``keep`` checkpoints of a run in ``directory``.

    Args:
        directory: the run's ``checkpoints/`` folder (created on first save).
        keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep={keep} is not allowed; need >= 1")
        self.directory = Path(directory)
        self.keep = keep

    def paths(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint file present, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, state: dict, step: int) -> Path:
        """Write the checkpoint for ``step`` (+ its digest) atomically, then prune old ones."""
        path = self.directory / f"ckpt-{step:09d}.pt"
        digest = atomic_torch_save(state, path)
        atomic_write_bytes(f"{digest}  {path.name}\n".encode(), path.with_name(path.name + ".sha256"))
        for _, old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        for stray in self.directory.glob(".ckpt-*.tmp"):  # temp files of a killed writer
            stray.unlink(missing_ok=True)
        return path

    def verify(self, path: Path) -> bool:
        """True if ``path`` has a digest file and its bytes match it."""
        side = path.with_name(path.name + ".sha256")
        if not side.exists():
            return False
        expected = side.read_text().split()[0] if side.read_text().strip() else ""
        return expected == sha256_file(path)

    def load_latest(self, map_location: str | torch.device = "cpu") -> Optional[tuple[int, dict]]:
        """(step, state) of the newest valid checkpoint, or None. Invalid ones are skipped with a warning."""
        for step, path in reversed(self.paths()):
            if not self.verify(path):
                log.warning("checkpoint %s is truncated or corrupt (checksum mismatch or missing); skipping it", path)
                continue
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, not fatal
                log.warning("checkpoint %s could not be read (%s); skipping it", path, exc)
                continue
            return step, state
        return None
