"""Shared pytest setup: small thread counts (CI has 2 cores) and the repo root as working directory."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A prepared `digits` dataset (the real `prepare_dataset`), shared by the training tests."""
    from lsgm.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("prepared")
    prepare_dataset("digits", out_dir=root)
    return root


@pytest.fixture
def repo_root() -> Path:
    """The repository root (params/, workflow/, ...)."""
    return REPO


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")


def _slurm_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm needs root (it installs Debian's slurm packages and runs the daemons)"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "neither Slurm nor apt-get is available"
    return None


def _slurm_up(env: dict) -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mixed", "alloc")) for s in out.stdout.split())


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    """A real single-node Slurm: the one `.ci/run` started (SLURM_CONF exported), else one started here.

    Yields the environment variables a Slurm client needs. Skips with the reason only where Slurm cannot run.
    """
    conf = os.environ.get("SLURM_CONF")
    if conf:  # the CI's cluster: give a busy machine a minute to answer before restarting it
        for _ in range(30):
            if _slurm_up(dict(os.environ)):
                yield {"SLURM_CONF": conf}
                return
            time.sleep(2)
    reason = _slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    # restart the CI's own cluster in place (its daemons hold the ports), else start one here
    base = Path(conf).parent.parent if conf and Path(conf).is_file() else tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURM_BASE=str(base))
    start = subprocess.run(["bash", str(REPO / ".ci/slurm/start_local_slurm.sh")], env=env, capture_output=True,
                           text=True, timeout=300)
    if start.returncode != 0:
        raise RuntimeError(f"could not start the local Slurm:\n{start.stdout[-2000:]}\n{start.stderr[-2000:]}")
    try:
        yield {"SLURM_CONF": str(base / "etc/slurm.conf"), "SLURM_BASE": str(base)}
    finally:
        subprocess.run(["bash", str(REPO / ".ci/slurm/stop_local_slurm.sh"), "--purge"], env=env,
                       capture_output=True, timeout=120)
