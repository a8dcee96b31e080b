#!/usr/bin/env python
"""Fault-injection campaign: random kills and non-finite values against a tiny digits training run; every trial must
end bit-identical to the uninterrupted run (or, for non-finite cases, with only finite checkpoints and model).

    PYTHONPATH=. .venv/bin/python benchmarks/fault_campaign.py --trials 12 --seed 0 --out campaign.json

Faults (tests/faults.py seams, the real `lsgm` CLI in subprocesses): SIGKILL right after a random step; SIGKILL in
the middle of the k-th checkpoint write; SIGKILL between the last checkpoint and `model.pt`; SIGKILL from outside at a
random wall-clock moment; a NaN batch at a random step (rolled back); a NaN weight after a random step's update
(rolled back). After a kill the same command is rerun until it exits 0. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from train_helpers import model_state, tiny_config  # noqa: E402

KINDS = ("kill_after_step", "kill_during_checkpoint", "kill_before_model", "kill_wall_clock", "nan_batch",
         "nan_weights")


def _run(args: list[str], faults: list[str], env: dict) -> subprocess.CompletedProcess:
    entry = [str(REPO / "tests" / "faults.py"), *faults, "--"] if faults else ["-m", "lsgm.cli"]
    return subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


def _finite_checkpoints(stage: Path) -> bool:
    import torch

    from lsgm.checkpoint import CheckpointManager, nonfinite_entries

    ok = True
    for _, path in CheckpointManager(stage / "checkpoints").paths():
        ok &= not nonfinite_entries(torch.load(path, map_location="cpu", weights_only=True))
    return ok and not nonfinite_entries(torch.load(stage / "model.pt", map_location="cpu", weights_only=True))


def trial(kind: str, rng: random.Random, root: Path, cfg: Path, data: Path, reference: dict, total: int,
          env: dict) -> dict:
    import torch

    runs = root / f"{kind}-{rng.randrange(10**6)}"
    args = ["train-vae", str(cfg), "--data-root", str(data), "--run-root", str(runs)]
    stage = runs / "tiny" / "vae"
    record: dict = {"kind": kind}
    if kind == "kill_after_step":
        record["step"] = k = rng.randrange(1, total - 1)
        first = _run(args, ["--kill-after-step", str(k)], env)
    elif kind == "kill_during_checkpoint":
        record["checkpoint"] = k = rng.randrange(2, 5)
        first = _run(args, ["--kill-during-checkpoint", str(k)], env)
    elif kind == "kill_before_model":
        first = _run(args, ["--kill-before-model"], env)
    elif kind == "kill_wall_clock":
        proc = subprocess.Popen([sys.executable, "-m", "lsgm.cli", *args], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        record["after_s"] = delay = rng.uniform(2.0, 6.0)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = subprocess.CompletedProcess(args, proc.returncode)
    else:
        record["step"] = k = rng.randrange(2, total - 1)
        flag = "--poison" if kind == "nan_batch" else "--poison-weights"
        first = _run(args, [flag, f"{k}:1"], env)
    record["first_exit"] = first.returncode
    reruns = 0
    while first.returncode != 0 and reruns < 3:
        first = _run(args, [], env)
        reruns += 1
    record["reruns"] = reruns
    record["finished"] = first.returncode == 0 and (stage / "model.pt").is_file()
    if kind.startswith("nan"):
        record["only_finite_saved"] = record["finished"] and _finite_checkpoints(stage)
        record["ok"] = record["only_finite_saved"]
    else:
        got = model_state(stage / "model.pt") if record["finished"] else {}
        record["bit_identical"] = record["finished"] and got.keys() == reference.keys() and all(
            torch.equal(got[k], reference[k]) for k in reference)
        record["ok"] = record["bit_identical"]
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from lsgm.data.prepare import prepare_dataset

    rng = random.Random(args.seed)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1")
    with tempfile.TemporaryDirectory(prefix="lsgm-faults-") as tmp:
        root = Path(tmp)
        data = root / "prepared"
        prepare_dataset("digits", out_dir=data)
        cfg = tiny_config(root, vae_epochs=3, every=3)
        ref = _run(["train-vae", str(cfg), "--data-root", str(data), "--run-root", str(root / "ref")], [], env)
        if ref.returncode != 0:
            raise SystemExit(ref.stderr[-3000:])
        reference = model_state(root / "ref" / "tiny" / "vae" / "model.pt")
        total = 3 * (256 // 32)
        kinds = [KINDS[i % len(KINDS)] for i in range(args.trials)]
        rng.shuffle(kinds)
        records = [trial(kind, rng, root, cfg, data, reference, total, env) for kind in kinds]
    doc = {"trials": len(records), "ok": sum(r["ok"] for r in records), "records": records}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if doc["ok"] == doc["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
