#!/usr/bin/env python
"""One prepared GPU check (issue 17): mixed precision, NCCL under torchrun, throughput and sampling at paper size.

Every CUDA path of the engine (fp16 autocast + gradient scaler, bf16, TF32, NCCL, SyncBatchNorm, fused Adam,
``torch.compile``) is written device-agnostically; this script is the one place that runs them, in the few
minutes a GPU is available. Run it from anywhere on a machine with one GPU::

    bash benchmarks/gpu_check.sh --out benchmarks/results/gpu_check.json

(``benchmarks/gpu_check.sh`` cds to the repository root and runs this file with the repo's ``.venv`` python if
there is one.) ``python benchmarks/gpu_check.py --dry-run`` runs the same code at tiny sizes on the CPU (gloo
instead of NCCL, no TF32, one thread, ``torch.compile`` with the ``eager`` backend because inductor needs minutes
for the FIR NCSN++ on 2 cores) in under a minute; ``tests/test_gpu_check.py`` runs it in CI. A second GPU run
can be limited to what the first one missed, e.g. ``--sections compile,sample_celeba256``.

Configs: the real experiment ``cifar10_best_fid`` (``params/cifar10_best_fid.yaml``: NVAE 128 channels, 20x9
latent groups -> 180x16x16 latents; NCSN++ nf 512, 3 scales x 8 res blocks, FIR, attention at 16), overridden
with dotted keys (as ``benchmarks/bench.py --set`` does) to a per-process batch of 16 (global batch 16, no
accumulation), a synthetic prepared cifar10-shaped dataset of 64 images (``bench.write_synthetic_dataset``),
3 epochs, ``engine.precision`` / ``engine.tf32`` per case and ``engine.device`` cuda (cpu in ``--dry-run``,
where every size is shrunk too). ``--set KEY=VALUE`` adds overrides. The overrides are in the JSON.

Sections, in this order (each one's failure is recorded and the script goes on):

``environment``
    device, capability, memory, CUDA/cuDNN/NCCL versions, dense bf16 peak (table below), a GradScaler + fused
    Adam probe on the device, where the work files go.
``train_fp16``, ``train_bf16`` (correctness; also throughput)
    the real ``train_vae`` and then ``train_lsgm`` (joint VAE + SGM step) for 3 warm-up + 7 timed steps
    (3 + 2 in the dry run) with a checkpoint before the last step; checks: no non-finite loss (no NaN-guard
    rollback, every loss finite), the GradScaler's scale / growth tracker at every checkpoint (fp16: must
    evolve), and the resume check: the run is restarted from the checkpoint before the last step and the last
    step's losses of the resumed and the uninterrupted run must agree (relative 1e-2 in bf16/fp16; 1e-6 in
    fp32 on the CPU, 1e-4 on a GPU). images/s = 16 / median step seconds (``metrics.json``).
``ddp_torchrun``
    ``python -m torch.distributed.run --standalone --nproc_per_node 1 gpu_check.py --ddp-worker``: the process
    group (NCCL; gloo in the dry run) initialises and all-reduces to the right value, a BatchNorm model
    converted with ``nn.SyncBatchNorm.convert_sync_batchnorm`` runs forward + backward (and on a GPU the
    synchronised kernel itself, which one rank would otherwise bypass, against plain batch norm; on CPU/gloo
    SyncBatchNorm is not supported: skipped with that reason), and ``train_vae`` runs 2 steps under torchrun.
``train_tf32``, ``train_fp32`` (throughput; TF32 only on a GPU)
    as above without the resume check on a GPU (fp32 does the resume check in the dry run).
``throughput``
    the images/s table of the stage-1 and joint steps for fp32 / tf32 / bf16 / fp16 and speed-ups over fp32.
``flops``
    ``torch.utils.flop_counter`` FLOPs of one NCSN++ (the prior's backbone) forward + backward at the
    latent shape and batch 16, timed in bf16 autocast (CUDA-synchronised median): achieved TFLOP/s and the
    fraction of the device's dense bf16 peak (H100/H200 SXM 989, H100 PCIe 756, A100 312, V100 fp16 125;
    null if unknown or on the CPU).
``sample_cifar10``, ``sample_data_space``
    16 latents through the probability-flow ODE (dopri5, tol 1e-5, the experiment's ode_eps) with the
    untrained prior: seconds per NFE and peak memory (an untrained network's NFE means nothing, so the solve is
    stopped after ``--max-nfe`` evaluations or ``--max-ode-s`` seconds); the same for a data-space NCSN++ of
    the same sizes on 3x32x32 images, for comparison.
``compile``
    backbone forward + backward, eager vs ``torch.compile`` (in a subprocess with a timeout): first-call
    (compile) seconds reported separately from the steady-state median, graph breaks, speed-up. A compile that
    does not finish in the time left is recorded as skipped, with the eager time and the log tail.
``sample_celeba256``
    the ODE per-NFE time for ``celeba256_quantitative`` (160x32x32 latents, NCSN++ nf 256), if time and
    memory allow (out of memory -> skipped with the reason).

Time: ``--budget-s`` (default 450 s on a GPU, 300 s in the dry run) is checked before every section and
before every training stage inside one: what would start after it is recorded as skipped with the reason (a
section cut short lists the parts under ``partial``). A hard limit (``--hard-limit-s``, default budget + 30 s)
interrupts whatever runs then (recorded as a failure) and subprocesses get at most the time left, so the script
is designed to end within 8 minutes on one H200 (the split of that time is an estimate: checkpoint I/O of the
joint stage, ~7 GB a checkpoint, dominates the training sections). The JSON is
rewritten (temp file + rename) to ``--out`` after every section, so a killed run leaves its partial results
(``"complete": false``), and printed to stdout at the end (logs go to stderr; the ``summary`` of the JSON is
also printed to stderr last, as one line). Exit status 0 when every section is ok or skipped, 1 when one failed.

Work files (checkpoints; each section deletes its own) go to ``--work-dir``, default
``/dev/shm`` when it has 48 GiB free on a GPU run (else the system temp folder), and are deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the repository's lsgm (and benchmarks/) before any installed copy
    sys.path.insert(0, str(REPO))

EXPERIMENT = "cifar10_best_fid"
CELEBA_EXPERIMENT = "celeba256_quantitative"
STAGE = "lsgm"  # the prior stage of both experiments
BATCH = 16  # per-process (= global) batch of every training case and of the samplers
TRAIN_IMAGES = 64  # synthetic training images: 4 steps per epoch
EPOCHS = 3  # 12 optimiser steps per schedule, more than any case runs
ENGINE_WARMUP = 3  # the engine's step_time_stats leaves out the first 3 steps of a run
PRECISIONS = ("fp16", "bf16", "tf32", "fp32")  # case -> (engine.precision, engine.tf32)
CASE_ENGINE = {"fp32": ("fp32", False), "tf32": ("fp32", True), "bf16": ("bf16", True), "fp16": ("fp16", True)}
# metrics.json "final" keys compared by the resume check
RESUME_KEYS = {"vae": ("loss", "nelbo_nats", "recon_nats", "kl_nats"),
               STAGE: ("loss", "p_loss", "nelbo_nats", "recon_nats", "cross_entropy_nats")}
# dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a substring of torch.cuda.get_device_name()
# (most specific first); V100 has no bf16: its fp16 peak is used and the entry says so
PEAK_TFLOPS = (("H200", 989.0, "bf16"), ("H100 PCIe", 756.0, "bf16"), ("H100", 989.0, "bf16"),
               ("A100", 312.0, "bf16"), ("V100", 125.0, "fp16"))

# Dry-run sizes (CPU, < 1 minute on 2 cores): every network shrunk, the same code paths. (One DML mixture:
# CPU fp16 convolutions have no fast kernels, and a 10-mixture output layer alone takes 0.7 s per step.)
DRY_VAE = {"vae.num_channels_enc": 4, "vae.num_channels_dec": 4, "vae.num_mix_output": 1,
           "vae.num_preprocess_cells": 1,
           "vae.num_postprocess_cells": 1, "vae.num_cell_per_cond_enc": 1, "vae.num_cell_per_cond_dec": 1,
           "vae.num_groups_per_scale": 2, "vae.num_latent_per_group": 4}
DRY_SCORE = {f"prior.{STAGE}.score_net.nf": 16, f"prior.{STAGE}.score_net.num_scales": 2,
             f"prior.{STAGE}.score_net.num_res_blocks": 1, f"prior.{STAGE}.score_net.channel_mult": [1, 1],
             f"prior.{STAGE}.score_net.attn_resolutions": [], f"prior.{STAGE}.score_net.embedding_dim": 16}


class HardDeadline(BaseException):
    """The hard time limit fired (a BaseException, so that no ``except Exception`` in library code eats it)."""


class NFECapReached(Exception):
    """The untrained-network ODE reached its evaluation or time cap."""


# ------------------------------------------------------------------------------------------ small helpers
def _log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def _tail(text: str, n: int = 2500) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _error_record(exc: BaseException) -> dict:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": _tail(tb)}


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. engine.channels_last=true")
        out[key] = yaml.safe_load(value)
    return out


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise KeyError(f"override {key!r}: {p!r} is not a section of the resolved config")
        node = node[p]
    if parts[-1] not in node:
        raise KeyError(f"override {key!r}: no key {parts[-1]!r} (allowed: {', '.join(node)})")
    node[parts[-1]] = value


def _git() -> dict:
    def git(*a: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _nccl_version() -> str:
    import torch

    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def peak_tflops(device_name: str) -> tuple[Optional[float], Optional[str]]:
    """(dense peak TFLOP/s, its dtype) of a GPU by name; (None, None) if the name is not in the table."""
    for key, tflops, dtype in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops, dtype
    return None, None


def run_child(cmd: list[str], *, timeout: float, log_path: Path, env: Optional[dict] = None) -> tuple[int, float]:
    """Run ``cmd`` in its own session (stdout+stderr to ``log_path``); kill the whole group on timeout/interrupt."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise RuntimeError(f"{' '.join(cmd[:6])} ... timed out after {timeout:.0f} s; log tail:\n"
                                   f"{_tail(log_path.read_text(errors='replace'))}") from None
            raise
    return rc, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ the run's context
@dataclass
class Check:
    """What every section needs: mode, device, folders, the clock and the JSON document."""

    args: argparse.Namespace
    dry: bool
    device: Any  # torch.device
    work: Path
    out: Optional[Path]
    budget_s: float
    hard_limit_s: float
    threads: Optional[int]
    extra: dict[str, Any]
    t0: float = field(default_factory=time.monotonic)
    doc: dict = field(default_factory=dict)
    fp16_ok: Optional[bool] = None
    fp16_reason: str = ""
    hard_stopped: bool = False

    @property
    def data_root(self) -> Path:
        return self.work / "prepared"

    @property
    def timed_steps(self) -> int:
        return self.args.timed_steps if self.args.timed_steps else (2 if self.dry else 7)

    @property
    def is_cuda(self) -> bool:
        return self.device.type != "cpu"

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def time_left_hard(self) -> float:
        return self.hard_limit_s - self.elapsed()

    def over_budget(self) -> Optional[str]:
        """A skip reason if the budget is used up (or the hard limit fired), else None."""
        if self.hard_stopped:
            return "the hard time limit fired during an earlier section"
        if self.elapsed() >= self.budget_s:
            return f"time budget: {self.elapsed():.0f} s of --budget-s {self.budget_s:.0f} s used before it started"
        return None

    # ---- devices
    def sync(self) -> None:
        import torch

        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        import torch

        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> dict:
        import torch

        if self.is_cuda:
            return {"peak_memory_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
                    "peak_reserved_mb": torch.cuda.max_memory_reserved(self.device) / 2**20}
        return {"peak_rss_mb": _peak_rss_mb(), "peak_note": "process-wide peak RSS so far (getrusage)"}

    def free(self) -> None:
        import torch

        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()

    # ---- configs
    def overrides(self, case: str, **extra: Any) -> dict[str, Any]:
        precision, tf32 = CASE_ENGINE[case]
        o: dict[str, Any] = {
            "train_vae.batch_size": BATCH, "train_vae.global_batch_size": None, "train_vae.epochs": EPOCHS,
            f"prior.{STAGE}.train.batch_size": BATCH, f"prior.{STAGE}.train.global_batch_size": None,
            f"prior.{STAGE}.train.epochs": EPOCHS,
            "engine.device": self.device.type, "engine.precision": precision, "engine.tf32": tf32 and self.is_cuda,
            "engine.log_every_steps": 1, "engine.num_threads": self.threads,
        }
        if self.dry:
            o.update(DRY_VAE)
            o.update(DRY_SCORE)
        o.update(extra)
        o.update(self.extra)  # --set wins
        return o

    def config(self, case: str, experiment: str = EXPERIMENT, **extra: Any):
        from lsgm.config import config_from_dict, config_to_dict, load_experiment

        raw = config_to_dict(load_experiment(experiment, root=REPO))
        for key, value in self.overrides(case, **extra).items():
            _set_dotted(raw, key, value)
        return config_from_dict(raw, where=f"{experiment} + gpu_check overrides")

    # ---- output
    def write(self, complete: bool = False) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 2)
        self.doc["complete"] = complete
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.out)


# ------------------------------------------------------------------------------------------ training cases
def _scaler_history(run_dir: Path) -> list[dict]:
    """Grad-scaler state of every checkpoint of a run (``checkpoints/ckpt-*.pt``, loaded lazily with mmap)."""
    import torch

    out = []
    for path in sorted((run_dir / "checkpoints").glob("ckpt-*.pt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not mmap-able: read it
            state = torch.load(path, map_location="cpu", weights_only=True)
        sc = state.get("scaler") or {}
        out.append({"step": int(state["step"]), "scale": sc.get("scale"), "growth_tracker": sc.get("_growth_tracker")})
        del state
    return out


def _dvclive_series(run_dir: Path, name: str) -> Optional[list[float]]:
    path = run_dir / "dvclive" / "plots" / "metrics" / f"{name}.tsv"
    if not path.exists():
        return None
    rows = path.read_text().splitlines()[1:]
    return [float(r.split("\t")[-1]) for r in rows if r.strip()]


def run_stage(chk: Check, cfg, stage: str, root: Path, max_steps: int) -> dict:
    """The real ``train_vae`` / ``train_lsgm`` for ``max_steps`` steps into ``root``; its metrics and checks."""
    from lsgm.train import train_lsgm, train_vae

    chk.free()
    chk.reset_peak()
    t0 = time.perf_counter()
    if stage == "vae":
        train_vae(cfg, run_root=root, data_root=chk.data_root, max_steps=max_steps)
    else:
        train_lsgm(cfg, stage, run_root=root, data_root=chk.data_root, max_steps=max_steps)
    wall = time.perf_counter() - t0
    mem = chk.peak_memory()
    chk.free()
    run_dir = root / cfg.name / stage
    m = json.loads((run_dir / "metrics.json").read_text())
    final = {k: v for k, v in m["final"].items() if not k.startswith("kl_group_")}
    res: dict[str, Any] = {"wall_s": round(wall, 3), "steps": m["steps"], "nan_failures": m["nan_failures"],
                           "per_process_batch": m["per_process_batch"], "processes": m["processes"],
                           "precision": m["precision"], "device": m["device"], "final": final,
                           "step_seconds": m.get("step_seconds"), **mem}
    st = m.get("step_seconds")
    if st:
        res["images_per_s"] = m["per_process_batch"] * m["processes"] / st["median"]
    losses = _dvclive_series(run_dir, "loss")
    if losses is not None:
        res["loss_per_step"] = losses
    needed = ["loss"] + (["p_loss"] if stage != "vae" else [])
    res["checks"] = {
        "ran_all_steps": m["steps"] == max_steps,
        "no_nan_rollback": m["nan_failures"] == 0,
        "final_losses_finite": all(k in final and math.isfinite(final[k]) for k in needed),
    }
    return res


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def resume_check(chk: Check, cfg, stage: str, root_u: Path, root_r: Path, max_steps: int, uninterrupted: dict,
                 tol: float) -> dict:
    """Restart the run from its checkpoint before the last step; compare the last step's losses."""
    k = max_steps - 1
    u_dir, r_dir = root_u / cfg.name / stage, root_r / cfg.name / stage
    ckpt = u_dir / "checkpoints" / f"ckpt-{k:09d}.pt"
    if not ckpt.exists():
        raise RuntimeError(f"no checkpoint of step {k} in {u_dir / 'checkpoints'}: "
                           f"{sorted(p.name for p in (u_dir / 'checkpoints').glob('*'))}")
    for p in (ckpt, ckpt.with_name(ckpt.name + ".sha256")):
        _link_or_copy(p, r_dir / "checkpoints" / p.name)
    shutil.rmtree(u_dir / "checkpoints", ignore_errors=True)  # ~7 GB each at paper size; read already
    if stage != "vae":  # the same stage-1 model file (its hash is part of the run's identity)
        _link_or_copy(root_u / cfg.name / "vae" / "model.pt", root_r / cfg.name / "vae" / "model.pt")
    r = run_stage(chk, cfg, stage, root_r, max_steps)
    resumed = not (r_dir / "checkpoints" / f"ckpt-{0:09d}.pt").exists() and not list(
        r_dir.glob("checkpoints-stale-*"))
    diffs = {}
    for key in RESUME_KEYS[stage]:
        a, b = uninterrupted["final"].get(key), r["final"].get(key)
        if a is None or b is None:
            continue
        diffs[key] = {"uninterrupted": a, "resumed": b, "abs": abs(a - b), "rel": _rel_diff(a, b)}
    max_rel = max((d["rel"] for d in diffs.values()), default=float("nan"))
    out = {"resumed_from_step": k, "compared_step": max_steps, "resumed": resumed, "tolerance_rel": tol,
           "max_rel_diff": max_rel, "within_tolerance": bool(diffs) and max_rel <= tol, "diffs": diffs,
           "wall_s": r["wall_s"], "scaler": _scaler_history(r_dir)}
    out["checks"] = {"resumed_not_restarted": resumed, "within_tolerance": out["within_tolerance"],
                     **{f"resumed_{c}": v for c, v in r["checks"].items() if c != "ran_all_steps"}}
    u_last, r_last = (uninterrupted.get("scaler") or [{}])[-1], (out["scaler"] or [{}])[-1]
    if u_last.get("scale") is not None:  # fp16: the scaler state came back with the checkpoint
        out["checks"]["scaler_matches_uninterrupted"] = (u_last.get("scale"), u_last.get("growth_tracker")) == (
            r_last.get("scale"), r_last.get("growth_tracker"))
    return out


def _scaler_checks(history: list[dict], precision: str) -> dict:
    scales = [h["scale"] for h in history if h["scale"] is not None]
    trackers = [h["growth_tracker"] for h in history if h["growth_tracker"] is not None]
    if precision != "fp16":
        return {"enabled": bool(scales), "note": "loss scaling is only for fp16"}
    evolves = len(set(scales)) > 1 or (len(trackers) > 1 and trackers[-1] > trackers[0])
    # each overflow halves the scale and skips that optimiser step: a lower bound from the checkpoints
    backoffs = sum(round(math.log2(a / b)) for a, b in zip(scales, scales[1:]) if b < a)
    return {"enabled": bool(scales), "evolves": evolves, "scales": scales, "growth_trackers": trackers,
            "overflow_skipped_steps_at_least": backoffs}


def train_section(chk: Check, case: str) -> dict:
    """Stage 1 then the joint stage in one precision case: throughput, finiteness, scaler and (maybe) resume."""
    if case == "tf32" and not chk.is_cuda:
        return {"skipped": "TF32 is a CUDA (Ampere and later) matmul mode; the dry run is on the CPU"}
    if case == "fp16" and chk.fp16_ok is False:
        return {"skipped": f"fp16 autocast with a GradScaler does not work on {chk.device.type}: {chk.fp16_reason}"}
    resume = chk.dry or case in ("fp16", "bf16")
    n = ENGINE_WARMUP + chk.timed_steps
    precision, tf32 = CASE_ENGINE[case]
    # checkpoints at step 0, before the last step (resume point) and at the end; without resume only 0 and end
    ckpt_keys = {"engine.checkpoint_every_steps": n - 1 if resume else 10**6, "engine.keep_checkpoints": 3}
    cfg = chk.config(case, **ckpt_keys)
    if chk.is_cuda:
        tol = 1e-4 if precision == "fp32" else 1e-2
    else:
        tol = 1e-6 if precision == "fp32" else 1e-2
    root_u, root_rv, root_rj = (chk.work / "runs" / f"{case}-{s}" for s in ("u", "rv", "rj"))
    out: dict[str, Any] = {"case": case, "precision": precision, "tf32": cfg.engine.tf32, "steps": n,
                           "warmup_steps": ENGINE_WARMUP, "resume_check": resume,
                           "fused_optimizer": cfg.engine.fused_optimizer,
                           "overrides": chk.overrides(case, **ckpt_keys)}
    checks: dict[str, bool] = {}
    errors: list[str] = []
    try:
        for stage, name, root_r in (("vae", "vae", root_rv), (STAGE, "joint", root_rj)):
            reason = chk.over_budget()
            if stage != "vae" and not (out["vae"] or {}).get("checks"):
                reason = "stage 1 did not run, so there is no VAE to start the joint stage from"
            if reason:
                out[name] = {"skipped": reason}
                continue
            _log(f"{case}: {name} ({n} steps)")
            run_dir = root_u / cfg.name / stage
            try:  # a failing stage is recorded; the section's other results stay
                res = run_stage(chk, cfg, stage, root_u, n)
                res["scaler"] = _scaler_history(run_dir)
            except Exception as exc:  # noqa: BLE001
                out[name] = _error_record(exc)
                checks[f"{name}.ran"] = False
                errors.append(f"{name}: {out[name]['error']}")
                chk.free()
                continue
            res["scaler_checks"] = _scaler_checks(res["scaler"], precision)
            if precision == "fp16":
                res["checks"]["scaler_evolves"] = bool(res["scaler_checks"]["evolves"])
            out[name] = res
            checks.update({f"{name}.{c}": v for c, v in res["checks"].items()})
            if resume:
                reason = chk.over_budget()
                if reason:
                    res["resume"] = {"skipped": reason}
                else:
                    _log(f"{case}: {name} resume check")
                    try:
                        rc = resume_check(chk, cfg, stage, root_u, root_r, n, res, tol)
                        checks.update({f"{name}.resume.{c}": v for c, v in rc["checks"].items()})
                    except Exception as exc:  # noqa: BLE001
                        rc = _error_record(exc)
                        checks[f"{name}.resume.ran"] = False
                        errors.append(f"{name}.resume: {rc['error']}")
                        chk.free()
                    res["resume"] = rc
                shutil.rmtree(root_r, ignore_errors=True)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # GBs at paper size; model.pt stays
    finally:
        for r in (root_u, root_rv, root_rj):
            shutil.rmtree(r, ignore_errors=True)
    if out["vae"].get("skipped"):
        return {"skipped": out["vae"]["skipped"]}
    if errors:
        out["error"] = "; ".join(errors)
    partial = [f"{name}{'.resume' if 'resume' in (out[name] or {}) else ''}" for name in ("vae", "joint")
               if (out.get(name) or {}).get("skipped") or ((out.get(name) or {}).get("resume") or {}).get("skipped")]
    if partial:
        out["partial"] = partial  # skipped for the time budget
    out["checks"] = checks
    out["ok"] = all(checks.values())
    return out


def throughput_section(chk: Check) -> dict:
    table: dict[str, dict[str, Optional[float]]] = {"vae": {}, "joint": {}}
    skipped = {}
    for case in PRECISIONS:
        sec = chk.doc["sections"].get(f"train_{case}", {})
        if sec.get("skipped"):
            skipped[case] = sec["skipped"]
        for name in table:
            ips = (sec.get(name) or {}).get("images_per_s")
            if ips is not None:
                table[name][case] = ips
    speedup = {name: {c: v / t["fp32"] for c, v in t.items()} if t.get("fp32") else {} for name, t in table.items()}
    values = [v for t in table.values() for v in t.values()]
    if not values:  # a summary: the train_* sections themselves record why
        return {"skipped": "no train_* section produced a step time", "skipped_cases": skipped}
    return {"images_per_s": table, "speedup_over_fp32": speedup, "batch": BATCH, "skipped_cases": skipped,
            "checks": {"some_numbers": bool(values), "all_positive": all(v > 0 for v in values)},
            "ok": bool(values) and all(v > 0 for v in values)}


# ------------------------------------------------------------------------------------------ ddp / torchrun
def ddp_section(chk: Check) -> dict:
    out_json = chk.work / "ddp_worker.json"
    log_path = chk.work / "ddp_worker.log"
    out_json.unlink(missing_ok=True)
    chk.free()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(Path(__file__).resolve()), "--ddp-worker", str(out_json), "--work-dir", str(chk.work)]
    cmd += _passthrough_args(chk)
    timeout = min(chk.time_left_hard() - 5, 240.0)
    rc, wall = run_child(cmd, timeout=timeout, log_path=log_path)
    if not out_json.exists():
        raise RuntimeError(f"torchrun worker exited {rc} without a result; log tail:\n"
                           f"{_tail(log_path.read_text(errors='replace'))}")
    res = json.loads(out_json.read_text())
    res["launcher"] = {"returncode": rc, "wall_s": round(wall, 2), "command": " ".join(cmd[:7]) + " ..."}
    if rc != 0:
        res.setdefault("checks", {})["worker_exit_0"] = False
        res["log_tail"] = _tail(log_path.read_text(errors="replace"))
    res["ok"] = all(res.get("checks", {}).values()) and rc == 0
    return res


def _passthrough_args(chk: Check) -> list[str]:
    a = ["--dry-run"] if chk.dry else []
    if chk.args.threads:
        a += ["--threads", str(chk.args.threads)]
    for item in chk.args.set:
        a += ["--set", item]
    return a


def ddp_worker(args: argparse.Namespace) -> int:
    """Runs under torchrun: process group, all-reduce, SyncBatchNorm, and train_vae with WORLD_SIZE from torchrun."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    chk = make_check(args)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    res: dict[str, Any] = {"rank": rank, "world_size": world, "local_rank": local,
                           "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"}
    checks: dict[str, bool] = {}
    device = chk.device
    if chk.is_cuda:
        torch.cuda.set_device(local)
        device = torch.device(chk.device.type, local)
    backend = "nccl" if chk.is_cuda else "gloo"
    try:
        t0 = time.perf_counter()
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=120))
        x = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(x)
        chk.sync()
        res["process_group"] = {"backend": dist.get_backend(), "init_and_all_reduce_s": time.perf_counter() - t0}
        expected = world * (world + 1) / 2
        res["all_reduce"] = {"value": float(x[0]), "expected": expected}
        checks["all_reduce_value"] = bool(torch.all(x == expected))
        if chk.is_cuda:
            res["process_group"]["nccl_version"] = _nccl_version()
        big = torch.ones(16 * 2**20, device=device)  # 64 MiB, timed (one rank: the kernel, not the network)
        dist.all_reduce(big)
        chk.sync()
        t0 = time.perf_counter()
        for _ in range(3):
            dist.all_reduce(big)
        chk.sync()
        res["all_reduce"]["64MiB_s"] = (time.perf_counter() - t0) / 3
        dist.barrier()

        # SyncBatchNorm: the module path (what prepare_batchnorm does on NCCL) ...
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                              nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device).train()
        n_sync = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        inp = torch.randn(8, 3, 16, 16, device=device)
        sbn: dict[str, Any] = {"converted_layers": n_sync}
        checks["syncbn_converted"] = n_sync == 2
        try:
            y = model(inp)
            y.square().mean().backward()
            grads = [p.grad for p in model.parameters()]
            sbn["module_forward_backward"] = "ok"
            checks["syncbn_module_grads_finite"] = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
            if world == 1:
                sbn["module_note"] = "with one rank SyncBatchNorm falls back to local batch norm"
            # ... and the synchronised kernel itself (all-gathered statistics), against plain batch norm
            from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction

            h = torch.randn(8, 8, 16, 16, device=device, requires_grad=True)
            w = torch.rand(8, device=device, requires_grad=True)
            b = torch.randn(8, device=device, requires_grad=True)
            rm1, rv1 = torch.zeros(8, device=device), torch.ones(8, device=device)
            rm2, rv2 = rm1.clone(), rv1.clone()
            r = torch.randn(8, 8, 16, 16, device=device)  # a loss whose input gradient does not cancel
            ys = SyncBNFunction.apply(h, w, b, rm1, rv1, 1e-5, 0.1, dist.group.WORLD, world)
            gs = torch.autograd.grad((ys * r).sum(), (h, w, b))
            yr = F.batch_norm(h, rm2, rv2, w, b, True, 0.1, 1e-5)
            gr = torch.autograd.grad((yr * r).sum(), (h, w, b))
            pairs = {"output": (ys, yr), "grad_input": (gs[0], gr[0]), "grad_weight": (gs[1], gr[1]),
                     "grad_bias": (gs[2], gr[2]), "running_mean": (rm1, rm2), "running_var": (rv1, rv2)}
            sbn["sync_kernel_max_abs_diff_vs_batch_norm"] = {k: float((p - q).detach().abs().max())
                                                             for k, (p, q) in pairs.items()}
            checks["syncbn_kernel_matches_batch_norm"] = all(
                torch.allclose(p.detach(), q.detach(), rtol=1e-4, atol=1e-5) for p, q in pairs.values())
        except ValueError as exc:
            if chk.is_cuda:
                raise
            sbn["skipped"] = (f"SyncBatchNorm is not supported on CPU tensors with the gloo backend "
                              f"(torch: {exc})")
        res["syncbn"] = sbn

        # train_vae under torchrun (the engine reads RANK/WORLD_SIZE/LOCAL_RANK; one process: no gradient sync)
        case = "fp32" if chk.dry else "fp16"
        cfg = chk.config(case, **{"engine.checkpoint_every_steps": 10**6})
        root = chk.work / "runs" / "ddp"
        r = run_stage(chk, cfg, "vae", root, 2)
        r.pop("loss_per_step", None)
        res["train_vae"] = {"case": case, **r}
        checks.update({f"train_vae.{c}": v for c, v in r["checks"].items()})
        checks["train_vae.processes_is_world_size"] = r["processes"] == world
        shutil.rmtree(root, ignore_errors=True)
        dist.barrier()
    except Exception as exc:  # noqa: BLE001 - recorded in the result for the parent
        res.update(_error_record(exc))
        checks["worker_no_exception"] = False
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    res["checks"] = checks
    if rank == 0:
        Path(args.ddp_worker).write_text(json.dumps(res, indent=1, default=str))
    return 0 if all(checks.values()) else 1


# ------------------------------------------------------------------------------------------ FLOPs / compile
def _backbone_and_inputs(chk: Check, experiment: str = EXPERIMENT):
    import torch

    from lsgm.models import build_prior

    cfg = chk.config("bf16", experiment)
    torch.manual_seed(0)
    backbone = build_prior(cfg, STAGE).backbone.to(chk.device).train()
    c, s, _ = cfg.vae.latent_shape(cfg.data)
    gen = torch.Generator(device=chk.device).manual_seed(0)
    x = torch.randn(BATCH, c, s, s, device=chk.device, generator=gen)
    t = torch.rand(BATCH, device=chk.device, generator=gen) * 0.99 + 0.01
    n_params = sum(p.numel() for p in backbone.parameters())
    return backbone, x, t, {"latent_shape": [c, s, s], "batch": BATCH, "params_m": n_params / 1e6}


def _fwd_bwd(module, x, t, device_type: str, dtype) -> None:
    import torch

    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        out = module(x, t)
    (out.float() - x).square().mean().backward()  # an ε-regression-like loss (the zero-init output layer
    # would make out.square() give all-zero gradients)


def _timed(chk: Check, fn: Callable[[], None], warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    chk.sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        chk.sync()
        times.append(time.perf_counter() - t0)
    return times


def flops_section(chk: Check) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    backbone, x, t, info = _backbone_and_inputs(chk)
    dt = torch.bfloat16

    def step() -> None:
        _fwd_bwd(backbone, x, t, chk.device.type, dt)
        backbone.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc_fwd, torch.no_grad(), torch.autocast(chk.device.type, dtype=dt):
        backbone(x, t)
    with FlopCounterMode(display=False) as fc:
        step()
    flops, fwd_flops = fc.get_total_flops(), fc_fwd.get_total_flops()
    chk.reset_peak()
    warmup, reps = (1, 2) if chk.dry else (3, 10)
    times = _timed(chk, step, warmup, reps)
    med = _median(times)
    achieved = flops / med / 1e12
    name = torch.cuda.get_device_name(chk.device) if chk.is_cuda else platform.processor() or "cpu"
    peak, peak_dtype = peak_tflops(name) if chk.is_cuda else (None, None)
    res = {**info, "autocast": "bf16", "flops_fwd_bwd": flops, "flops_fwd": fwd_flops,
           "gflop_per_image_fwd_bwd": flops / BATCH / 1e9, "seconds_median": med, "seconds_min": min(times),
           "reps": reps, "achieved_tflops": achieved, "device_name": name, "peak_dense_tflops": peak,
           "peak_dtype": peak_dtype, "fraction_of_peak": achieved / peak if peak else None, **chk.peak_memory()}
    if chk.is_cuda and peak is None:
        res["peak_note"] = f"{name!r} is not in the peak table (PEAK_TFLOPS)"
    res["checks"] = {"flops_counted": flops > fwd_flops > 0, "timed": med > 0}
    backbone = None  # noqa: F841 - release the network before the next section (step() is not called again)
    chk.free()
    return res


def compile_section(chk: Check) -> dict:
    out_json = chk.work / "compile_worker.json"
    log_path = chk.work / "compile_worker.log"
    out_json.unlink(missing_ok=True)
    chk.free()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-worker", str(out_json),
           "--work-dir", str(chk.work), "--compile-backend", chk.args.compile_backend] + _passthrough_args(chk)
    timeout = min(chk.time_left_hard() - 5, chk.args.compile_timeout_s)
    try:
        rc, wall = run_child(cmd, timeout=timeout, log_path=log_path)
    except RuntimeError as exc:
        if "timed out" not in str(exc):
            raise
        partial = json.loads(out_json.read_text()) if out_json.exists() else {}
        return {**partial, "ok": None, "timed_out": True, "log_tail": _tail(log_path.read_text(errors="replace")),
                "skipped": f"torch.compile did not finish in the {timeout:.0f} s it had (the time left, at most "
                           f"--compile-timeout-s); eager timing above if it got that far"}
    if not out_json.exists():
        raise RuntimeError(f"compile worker exited {rc} without a result; log tail:\n"
                           f"{_tail(log_path.read_text(errors='replace'))}")
    res = json.loads(out_json.read_text())
    res["worker"] = {"returncode": rc, "wall_s": round(wall, 2), "timeout_s": round(timeout, 1)}
    if rc != 0 or not res.get("ok", False):
        res["log_tail"] = _tail(log_path.read_text(errors="replace"), 4000)
    res["ok"] = bool(res.get("ok")) and rc == 0
    return res


def compile_worker(args: argparse.Namespace) -> int:
    import torch

    chk = make_check(args)
    res: dict[str, Any] = {"backend": args.compile_backend, "autocast": "bf16"}
    try:
        backbone, x, t, info = _backbone_and_inputs(chk)
        res.update(info)
        dt = torch.bfloat16
        warmup, reps = (1, 2) if chk.dry else (3, 10)

        def step(m) -> None:
            _fwd_bwd(m, x, t, chk.device.type, dt)
            backbone.zero_grad(set_to_none=True)

        eager = _timed(chk, lambda: step(backbone), warmup, reps)
        res["eager_s_median"] = _median(eager)
        Path(args.compile_worker).write_text(json.dumps(res, indent=1, default=str))  # partial, if killed
        import torch._dynamo

        torch._dynamo.reset()
        compiled = torch.compile(backbone, backend=args.compile_backend)  # as the engine's backbone.compile()
        chk.sync()
        t0 = time.perf_counter()
        step(compiled)
        chk.sync()
        res["compile_first_call_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        step(compiled)
        chk.sync()
        res["second_call_s"] = time.perf_counter() - t0
        times = _timed(chk, lambda: step(compiled), max(warmup - 1, 0), reps)
        res["compiled_s_median"] = _median(times)
        res["speedup"] = res["eager_s_median"] / res["compiled_s_median"]
        from torch._dynamo.utils import counters

        res["graph_breaks"] = int(sum(counters["graph_break"].values()))
        res["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
        res["graph_break_reasons"] = [r.splitlines()[0][:200] for r in sorted(counters["graph_break"])[:5]]
        res.update(chk.peak_memory())
        res["ok"] = True
    except Exception as exc:  # noqa: BLE001
        res.update(_error_record(exc))
    Path(args.compile_worker).write_text(json.dumps(res, indent=1, default=str))
    return 0


# ------------------------------------------------------------------------------------------ sampling
class CappedEps:
    """eps_fn wrapper that counts evaluations and stops the solve after ``max_nfe`` of them or ``max_s`` seconds."""

    def __init__(self, fn: Callable, max_nfe: int, max_s: float):
        self.fn, self.max_nfe, self.max_s = fn, max_nfe, max_s
        self.count, self.t0 = 0, None

    def __call__(self, z, t):
        if self.t0 is None:
            self.t0 = time.perf_counter()
        if self.count >= self.max_nfe or time.perf_counter() - self.t0 > self.max_s:
            raise NFECapReached(f"stopped after {self.count} evaluations")
        self.count += 1
        return self.fn(z, t)


def sample_section(chk: Check, experiment: str, data_space: bool = False) -> dict:
    import torch

    from lsgm.models import build_prior
    from lsgm.sampling import sample_ode

    cfg = chk.config("fp32", experiment)
    sn = cfg.prior[STAGE].score_net
    torch.manual_seed(0)
    if data_space:  # NCSN++ of the same sizes directly on 3x32x32 images (LSGM vs a data-space SGM)
        from lsgm.nets.ncsnpp import NCSNpp
        from lsgm.score import MixedScore
        from lsgm.sde import make_sde

        sde_cfg = cfg.prior[STAGE].sde
        sde = make_sde(sde_cfg.kind, **sde_cfg.sde_params())
        net = NCSNpp(in_channels=3, image_size=32, nf=sn.nf, num_scales=sn.num_scales,
                     num_res_blocks=sn.num_res_blocks, channel_mult=tuple(sn.channel_mult), dropout=sn.dropout,
                     fir=sn.fir, embedding_scale=sn.embedding_scale, embedding_dim=sn.embedding_dim,
                     attn_resolutions=tuple(sn.attn_resolutions))
        prior = MixedScore(net, sde, 3, sn.mixing_logit_init)
        shape = (BATCH, 3, 32, 32)
    else:
        prior = build_prior(cfg, STAGE)
        sde = prior.sde
        c, s, _ = cfg.vae.latent_shape(cfg.data)
        shape = (BATCH, c, s, s)
    prior = prior.to(chk.device).eval()
    if chk.is_cuda:  # the engine's fp32 matmul mode of this config (TF32 unless engine.tf32 is false)
        torch.backends.cuda.matmul.allow_tf32 = cfg.engine.tf32
        torch.backends.cudnn.allow_tf32 = cfg.engine.tf32
    tol = chk.args.ode_tol
    res: dict[str, Any] = {"experiment": experiment, "shape": list(shape), "ode_eps": cfg.sampling.ode_eps,
                           "tol": tol, "method": cfg.sampling.method, "tf32": bool(chk.is_cuda and cfg.engine.tf32),
                           "params_m": sum(p.numel() for p in prior.parameters()) / 1e6,
                           "max_nfe": chk.args.max_nfe, "max_ode_s": chk.args.max_ode_s}
    with torch.no_grad():  # one evaluation outside the clock (CUDA context, kernel selection)
        prior(torch.zeros(shape, device=chk.device), torch.ones(BATCH, device=chk.device))
    chk.sync()
    chk.reset_peak()
    capped = CappedEps(prior, chk.args.max_nfe, chk.args.max_ode_s)
    gen = torch.Generator(device=chk.device).manual_seed(0)
    t0 = time.perf_counter()
    try:
        out = sample_ode(capped, sde, shape, ode_eps=cfg.sampling.ode_eps, tol=tol, method=cfg.sampling.method,
                         generator=gen, device=chk.device)
        res.update(completed=True, nfe=out.nfe, samples_finite=bool(torch.isfinite(out.z).all()))
    except NFECapReached:
        res.update(completed=False, nfe=capped.count,
                   note="stopped at the cap: an untrained network's NFE is not the figure, time per NFE is")
    chk.sync()
    seconds = time.perf_counter() - t0
    res.update(solve_s=seconds, seconds_per_nfe=seconds / max(capped.count, 1), **chk.peak_memory())
    res["checks"] = {"evaluated": capped.count > 0, "finite_samples": res.get("samples_finite", True)}
    del prior, capped
    chk.free()
    return res


def celeba_section(chk: Check) -> dict:
    import torch

    try:
        return sample_section(chk, CELEBA_EXPERIMENT)
    except torch.cuda.OutOfMemoryError as exc:
        chk.free()
        return {"skipped": f"out of GPU memory: {str(exc)[:300]}"}


# ------------------------------------------------------------------------------------------ environment
def environment_section(chk: Check) -> dict:
    import torch

    res: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "cuda_available": torch.cuda.is_available(), "device": str(chk.device),
                           "threads": torch.get_num_threads(), "work_dir": str(chk.work),
                           "work_dir_free_gb": shutil.disk_usage(chk.work).free / 1e9,
                           "compile_backend": chk.args.compile_backend}
    if chk.is_cuda:
        p = torch.cuda.get_device_properties(chk.device)
        name = torch.cuda.get_device_name(chk.device)
        peak, peak_dtype = peak_tflops(name)
        res.update(device_name=name, capability=list(torch.cuda.get_device_capability(chk.device)),
                   total_memory_gb=p.total_memory / 1e9, multiprocessors=p.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   nccl=_nccl_version(), bf16_supported=torch.cuda.is_bf16_supported(),
                   peak_dense_tflops=peak, peak_dtype=peak_dtype, device_count=torch.cuda.device_count())
    # fused Adam (stage 2's optimiser) and fp16 autocast + GradScaler on this device, tiny
    try:
        m = torch.nn.Linear(4, 4).to(chk.device)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3, fused=True)
        m(torch.randn(2, 4, device=chk.device)).square().mean().backward()
        opt.step()
        res["fused_adam_probe"] = {"ok": bool(all(torch.isfinite(q).all() for q in m.parameters()))}
    except Exception as exc:  # noqa: BLE001
        res["fused_adam_probe"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        torch.manual_seed(0)
        m = torch.nn.Conv2d(4, 4, 3, padding=1).to(chk.device)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(chk.device.type, init_scale=1024.0)
        for _ in range(3):
            with torch.autocast(chk.device.type, dtype=torch.float16):
                loss = m(torch.randn(2, 4, 8, 8, device=chk.device)).float().square().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        st = scaler.state_dict()
        chk.fp16_ok = bool(st.get("_growth_tracker", 0) == 3 and all(torch.isfinite(q).all() for q in m.parameters()))
        chk.fp16_reason = "" if chk.fp16_ok else f"scaler state after 3 steps: {st}"
        res["fp16_grad_scaler_probe"] = {"ok": chk.fp16_ok, "state": st}
    except Exception as exc:  # noqa: BLE001 - an unsupported combination is a finding, not a crash
        chk.fp16_ok, chk.fp16_reason = False, f"{type(exc).__name__}: {exc}"
        res["fp16_grad_scaler_probe"] = {"ok": False, "error": chk.fp16_reason}
    res["checks"] = {"fp16_probe": bool(chk.fp16_ok) or not chk.is_cuda,
                     "fused_adam_probe": res["fused_adam_probe"]["ok"] or not chk.is_cuda}
    if chk.is_cuda:
        res["checks"]["bf16_supported"] = bool(res["bf16_supported"])
    return res


# ------------------------------------------------------------------------------------------ driver
SECTIONS: list[tuple[str, Callable[[Check], dict]]] = [
    ("environment", environment_section),
    ("train_fp16", lambda c: train_section(c, "fp16")),
    ("train_bf16", lambda c: train_section(c, "bf16")),
    ("ddp_torchrun", ddp_section),
    ("train_tf32", lambda c: train_section(c, "tf32")),
    ("train_fp32", lambda c: train_section(c, "fp32")),
    ("throughput", throughput_section),
    ("flops", flops_section),
    ("sample_cifar10", lambda c: sample_section(c, EXPERIMENT)),
    ("sample_data_space", lambda c: sample_section(c, EXPERIMENT, data_space=True)),
    ("compile", compile_section),
    ("sample_celeba256", celeba_section),
]
SECTION_NAMES = [n for n, _ in SECTIONS]


def summary(doc: dict) -> dict:
    """The figures that matter, in a few lines (also printed to stderr after the JSON)."""
    s = doc["sections"]
    out: dict[str, Any] = {"status": {n: {True: "ok", False: "FAILED", None: "skipped"}[r.get("ok")]
                                      for n, r in s.items()}}
    out["images_per_s"] = (s.get("throughput") or {}).get("images_per_s")
    resume, scaler = {}, {}
    for case in PRECISIONS:
        for stage in ("vae", "joint"):
            r = (s.get(f"train_{case}") or {}).get(stage) or {}
            if isinstance(r.get("resume"), dict) and "max_rel_diff" in r["resume"]:
                resume[f"{case}/{stage}"] = r["resume"]["max_rel_diff"]
            if case == "fp16" and r.get("scaler_checks"):
                scaler[stage] = r["scaler_checks"].get("scales")
    out["resume_max_rel_diff"], out["fp16_scales"] = resume, scaler
    f = s.get("flops") or {}
    out["ncsnpp_bf16"] = {k: f.get(k) for k in ("achieved_tflops", "fraction_of_peak", "gflop_per_image_fwd_bwd")}
    out["seconds_per_nfe"] = {n: (s.get(n) or {}).get("seconds_per_nfe")
                              for n in ("sample_cifar10", "sample_data_space", "sample_celeba256")}
    c = s.get("compile") or {}
    out["compile"] = {k: c.get(k) for k in ("compile_first_call_s", "eager_s_median", "compiled_s_median", "speedup",
                                            "graph_breaks")}
    d = s.get("ddp_torchrun") or {}
    out["ddp"] = {"backend": (d.get("process_group") or {}).get("backend"), "ok": d.get("ok")}
    out["failures"] = doc["failures"]
    return out


def run_section(chk: Check, name: str, fn: Callable[[Check], dict]) -> None:
    reason = chk.over_budget()
    t0 = time.perf_counter()
    if reason:
        rec: dict[str, Any] = {"ok": None, "skipped": reason}
    else:
        _log(f"section {name} (at {chk.elapsed():.0f} s)")
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the final JSON
                rec = fn(chk)
            if rec.get("skipped"):
                rec["ok"] = None
            elif "ok" not in rec:
                rec["ok"] = all(rec.get("checks", {}).values())
        except HardDeadline as exc:
            chk.hard_stopped = True
            rec = _error_record(exc)
        except Exception as exc:  # noqa: BLE001 - one section's failure must not stop the others
            rec = _error_record(exc)
            with contextlib.suppress(Exception):
                chk.free()
        rec["seconds"] = round(time.perf_counter() - t0, 2)
    chk.doc["sections"][name] = rec
    if rec["ok"] is False:
        chk.doc["failures"].append(name)
    elif rec["ok"] is None:
        chk.doc["skipped"].append(name)
    status = {True: "ok", False: "FAILED", None: "skipped"}[rec["ok"]]
    _log(f"section {name}: {status} ({rec.get('seconds', 0):.1f} s)" + (f": {rec.get('error')}" if rec["ok"] is False
                                                                          else ""))
    chk.write()


def _default_work_dir(dry: bool) -> Path:
    shm = Path("/dev/shm")
    if not dry and shm.is_dir():
        with contextlib.suppress(OSError):
            if shutil.disk_usage(shm).free >= 48 * 2**30:
                return Path(tempfile.mkdtemp(prefix="lsgm-gpu-check-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="lsgm-gpu-check-"))


def make_check(args: argparse.Namespace, out: Optional[Path] = None) -> Check:
    import torch

    device_type = "cpu" if args.dry_run else "cuda"  # the one place the device is chosen
    if device_type != "cpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is available: run on a GPU machine, or use --dry-run for the CPU check")
    # dry run: one thread; OpenMP threads spin-waiting on a shared 2-core machine made steps 10-40x slower
    threads = args.threads or (1 if args.dry_run else None)
    if threads:
        torch.set_num_threads(threads)
    budget = args.budget_s if args.budget_s is not None else (300.0 if args.dry_run else 450.0)
    hard = args.hard_limit_s if args.hard_limit_s is not None else budget + 30.0
    work = Path(args.work_dir) if args.work_dir else _default_work_dir(args.dry_run)
    work.mkdir(parents=True, exist_ok=True)
    return Check(args=args, dry=args.dry_run, device=torch.device(device_type), work=work, out=out,
                 budget_s=budget, hard_limit_s=hard, threads=threads, extra=_parse_set(args.set))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (gloo, no TF32): the CI check")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file, rewritten after every section (default benchmarks/results/gpu_check-<UTC>.json)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no section after this (450 GPU, 300 dry)")
    ap.add_argument("--hard-limit-s", type=float, default=None, help="interrupt at this (default budget + 30)")
    ap.add_argument("--work-dir", default=None, help="work files (default /dev/shm if 48 GiB free, else temp)")
    ap.add_argument("--keep-work", action="store_true", help="keep the work folder")
    ap.add_argument("--timed-steps", type=int, default=None, help="timed steps after the engine's 3 (7 GPU, 2 dry)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (dry run: 1)")
    ap.add_argument("--max-nfe", type=int, default=None, help="ODE evaluation cap per solve (100 GPU, 8 dry)")
    ap.add_argument("--max-ode-s", type=float, default=None, help="ODE time cap per solve (30 GPU, 10 dry)")
    ap.add_argument("--ode-tol", type=float, default=1e-5, help="ODE tolerance (default 1e-5)")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (inductor on a GPU; eager in the dry run: inductor compiles the "
                         "FIR NCSN++ for minutes on 2 CPU cores)")
    ap.add_argument("--compile-timeout-s", type=float, default=240.0, help="limit of the compile subprocess")
    ap.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTION_NAMES)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every case, e.g. engine.channels_last=true (repeatable)")
    ap.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.max_nfe is None:
        args.max_nfe = 8 if args.dry_run else 100
    if args.max_ode_s is None:
        args.max_ode_s = 10.0 if args.dry_run else 30.0
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.dry_run else "inductor"
    if args.timed_steps is not None and args.timed_steps < 1:
        raise SystemExit("--timed-steps: need at least 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(args)
    if args.compile_worker:
        return compile_worker(args)
    wanted = SECTION_NAMES if not args.sections else [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTION_NAMES]
    if bad:
        raise SystemExit(f"--sections: {bad} not known; allowed: {', '.join(SECTION_NAMES)}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "benchmarks" / "results" / f"gpu_check-{'dry-run-' if args.dry_run else ''}{stamp}.json"
    chk = make_check(args, out=out.resolve())

    def on_alarm(signum, frame):  # noqa: ARG001
        raise HardDeadline(f"hard time limit of {chk.hard_limit_s:.0f} s reached")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(chk.hard_limit_s - chk.elapsed(), 1.0))

    import torch

    chk.doc = {
        "check": "lsgm gpu_check (issue 17)", "started_utc": stamp,
        "device": torch.cuda.get_device_name(chk.device) if chk.is_cuda else f"cpu ({platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": chk.dry, "budget_s": chk.budget_s,
        "hard_limit_s": chk.hard_limit_s, "elapsed_s": 0.0, "git": _git(), "experiment": EXPERIMENT,
        "overrides_bf16_case": chk.overrides("bf16"), "sections": {}, "failures": [], "skipped": [], "complete": False,
    }
    chk.write()
    try:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                from benchmarks.bench import write_synthetic_dataset

                write_synthetic_dataset(chk.data_root, "cifar10", (3, 32, 32), train=TRAIN_IMAGES)
        except Exception as exc:  # noqa: BLE001 - recorded; the sections that need the data fail on their own
            chk.doc["setup_error"] = _error_record(exc)
        for name, fn in SECTIONS:
            if name in wanted:
                run_section(chk, name, fn)
            else:
                chk.doc["sections"][name] = {"ok": None, "skipped": "not in --sections"}
                chk.doc["skipped"].append(name)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if not args.keep_work:
            shutil.rmtree(chk.work, ignore_errors=True)
    chk.doc["summary"] = summary(chk.doc)
    chk.write(complete=True)
    print(json.dumps(chk.doc, indent=1, default=str), flush=True)
    print(json.dumps(chk.doc["summary"], default=str), file=sys.stderr, flush=True)
    _log(f"done in {chk.elapsed():.0f} s; failures: {chk.doc['failures'] or 'none'}; JSON: {chk.out}")
    return 1 if chk.doc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
