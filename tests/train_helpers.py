"""Shared helpers of the training tests: a tiny digits config, the real `lsgm` CLI in a subprocess (optionally with
faults injected at the engine's seams, tests/faults.py), and bit-level comparison of model files."""

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

TINY = """
extends: [{digits}]
data: {{max_train_images: 256}}
train_vae: {{epochs: {vae_epochs}, batch_size: 32, warmup_epochs: 1}}
prior:
  lsgm:
    score_net: {{nf: 16, num_res_blocks: 1}}
    train: {{epochs: 2, batch_size: 32, warmup_epochs: 1, {extra}}}
engine: {{checkpoint_every_steps: {every}, keep_checkpoints: 2, max_nan_failures: 3, num_threads: 1,
          log_every_steps: 5}}
"""


def tiny_config(tmp_path: Path, name: str = "tiny", *, vae_epochs: int = 2, every: int = 5, extra: str = "") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(TINY.format(digits=REPO / "params" / "digits.yaml", vae_epochs=vae_epochs, every=every,
                             extra=extra or "seed: 0"))
    return p


def run_cli(*args: str, faults: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess:
    """``lsgm ARGS`` in a subprocess; with ``faults`` (tests/faults.py options) the engine's seams inject them."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    entry = [str(REPO / "tests" / "faults.py"), *faults, "--"] if faults else ["-m", "lsgm.cli"]
    res = subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"lsgm {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def model_state(path: Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    out = {f"vae.{k}": v for k, v in payload["vae"].items()}
    if payload["prior"] is not None:
        out.update({f"prior.{k}": v for k, v in payload["prior"].items()})
        out.update({f"ema.{k}": v for k, v in payload["prior_ema"].items()})
    return out


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
