"""Atomic, checksummed, rotating training checkpoints (never lose work, never load a torn or poisoned file).

Layout of a run directory's ``checkpoints/``::

    ckpt-000000400.pt          torch.save of the full training state (plain tensors/primitives only)
    ckpt-000000400.pt.sha256   hex digest of the .pt file, written after it (``sha256sum -c`` format)

Both are written to a temp name, fsynced and renamed, so a crash leaves either the old set or the new one.

**One validity test** (:meth:`CheckpointManager.check`), used by resume, the NaN guard's rollback and pruning
alike: a checkpoint is valid only if its digest file matches, it loads (``torch.load(weights_only=True)``) and every
floating-point tensor in it is finite. A state with a non-finite tensor is never written
(:class:`NonFiniteStateError`). Pruning keeps the newest ``keep`` VALID checkpoints and removes the rest (invalid
ones included), so it never deletes the newest valid checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from lsgm.atomic import atomic_write_bytes
from lsgm.provenance import sha256_file

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")

__all__ = ["CheckpointManager", "NonFiniteStateError", "Verdict", "atomic_torch_save", "nonfinite_entries"]


class NonFiniteStateError(ValueError):
    """A state to be written holds NaN or ±inf (it is not written)."""


def nonfinite_entries(state: Any, where: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors in a nested state that hold NaN or ±inf."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():
            return [] if bool(torch.isfinite(state).all()) else [where or "<tensor>"]
        return []
    if isinstance(state, float):
        return [] if state == state and abs(state) != float("inf") else [where or "<float>"]
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in nonfinite_entries(v, f"{where}.{k}" if where else str(k))]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in nonfinite_entries(v, f"{where}[{i}]")]
    return []


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save`` atomically; returns the sha256 of the written bytes. Refuses a state with non-finite tensors
    (:class:`NonFiniteStateError`): no NaN or ±inf ever reaches a checkpoint or a model file."""
    bad = nonfinite_entries(obj)
    if bad:
        raise NonFiniteStateError(f"refusing to write {path}: {len(bad)} non-finite tensor(s), e.g. "
                                  f"{', '.join(bad[:5])}")
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(data, path)
    return hashlib.sha256(data).hexdigest()


@dataclass
class Verdict:
    """Result of the validity test: ``valid``, the ``reason`` when not, and the loaded ``state`` when asked for."""

    valid: bool
    reason: str = ""
    state: Optional[dict] = None


class CheckpointManager:
    """Keeps the newest ``keep`` valid checkpoints of a run in ``directory``.

    Args:
        directory: the run's ``checkpoints/`` folder (created on first save).
        keep: how many of the newest valid checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep={keep} is not allowed; need >= 1")
        self.directory = Path(directory)
        self.keep = keep
        self._known_valid: set[tuple[str, int, int]] = set()  # (name, mtime_ns, size) that passed the full test

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

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return path.name, st.st_mtime_ns, st.st_size

    def save(self, state: dict, step: int) -> Path:
        """Write the checkpoint for ``step`` (+ its digest) atomically, then prune.

        Raises:
            NonFiniteStateError: the state holds NaN/inf (nothing is written).
        """
        path = self.directory / f"ckpt-{step:09d}.pt"
        digest = atomic_torch_save(state, path)
        atomic_write_bytes(f"{digest}  {path.name}\n".encode(), self._digest_path(path))
        self._known_valid.add(self._key(path))  # its tensors were checked and its bytes digested just now
        self.prune()
        for stray in self.directory.glob(".ckpt-*.tmp"):  # temp files of a killed writer
            stray.unlink(missing_ok=True)
        return path

    @staticmethod
    def _digest_path(path: Path) -> Path:
        return path.with_name(path.name + ".sha256")

    def verify(self, path: Path) -> bool:
        """True if ``path`` has a digest file and its bytes match it (the first part of :meth:`check`)."""
        side = self._digest_path(path)
        if not side.exists():
            return False
        text = side.read_text().strip()
        return bool(text) and text.split()[0] == sha256_file(path)

    def check(self, path: Path, *, need_state: bool = False, map_location: str | torch.device = "cpu") -> Verdict:
        """THE validity test: digest matches, the file loads, every floating-point tensor is finite.

        Args:
            path: a checkpoint file.
            need_state: return the loaded state (resume, rollback); otherwise a checkpoint that passed the full
                test in this process and is unchanged since (same name, mtime and size) is not re-read.
            map_location: where loaded tensors go.
        """
        try:
            known = self._key(path) in self._known_valid
        except OSError as exc:
            return Verdict(False, f"cannot stat ({exc})")
        if known and not need_state:
            return Verdict(True)
        if not self.verify(path):
            return Verdict(False, "truncated or corrupt (checksum mismatch or missing)")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is invalid, not fatal
            return Verdict(False, f"could not be read ({exc})")
        bad = nonfinite_entries(state)
        if bad:
            return Verdict(False, f"holds non-finite values ({len(bad)} tensor(s), e.g. {', '.join(bad[:3])})")
        self._known_valid.add(self._key(path))
        return Verdict(True, "", state if need_state else None)

    def newest_first(self) -> Iterator[tuple[int, Path]]:
        return reversed(self.paths())

    def prune(self) -> None:
        """Keep the newest ``keep`` valid checkpoints; remove every other checkpoint (invalid ones with a warning)."""
        kept = 0
        for _, path in self.newest_first():
            verdict = self.check(path) if kept < self.keep else Verdict(True)
            if verdict.valid and kept < self.keep:
                kept += 1
                continue
            if not verdict.valid:
                log.warning("checkpoint %s is invalid: %s; removing it", path, verdict.reason)
            path.unlink(missing_ok=True)
            self._digest_path(path).unlink(missing_ok=True)

    def load_latest(self, map_location: str | torch.device = "cpu") -> Optional[tuple[int, dict]]:
        """(step, state) of the newest valid checkpoint, or None. Invalid ones are skipped with a warning."""
        for step, path in self.newest_first():
            verdict = self.check(path, need_state=True, map_location=map_location)
            if verdict.valid:
                return step, verdict.state
            log.warning("checkpoint %s is %s; skipping it", path, verdict.reason)
        return None
