#!/usr/bin/env python
"""LSGM performance benchmark (issue 7): step times, ODE sampling and ODE NLL at configurations A and B.

Run from the repository root::

    .venv/bin/python benchmarks/bench.py                  # A and B, full measurement (several minutes)
    .venv/bin/python benchmarks/bench.py --quick          # smoke run: 2 timed steps, ODE tol 1e-3
    .venv/bin/python benchmarks/bench.py --configs b --out bench_b.json
    .venv/bin/python benchmarks/bench.py --configs b --set prior.lsgm.train.single_pass_joint=false  # 2B path
    .venv/bin/python benchmarks/bench.py --configs b --set prior.lsgm.train.single_backward_joint=false

What it does, per configuration (``benchmarks/configs/config_{a,b}.yaml``):

1. writes a synthetic dataset in the real prepared format (``<root>/<dataset>/{train,valid,test}.npy`` +
   ``manifest.json``, as :func:`lsgm.data.prepare.prepare_dataset` writes them) into a temporary folder;
2. ``vae`` phase: the real :func:`lsgm.train.train_vae` for ``warmup + steps`` optimiser steps; the engine's
   per-step wall times (``metrics.json`` → ``step_seconds``: median/min/max after 3 warm-up steps);
3. ``lsgm`` phase: the real :func:`lsgm.train.train_lsgm` (joint VAE + SGM step) from that VAE, same timing;
4. ``sample`` phase: :func:`lsgm.sampling.sample_ode` of 16 latents from an untrained (freshly initialised) prior;
5. ``nll_fixed`` / ``nll_fresh``: :func:`lsgm.likelihood.ode_nll` of a batch of 16 encoder latents under the
   untrained prior with a fixed Hutchinson probe per solve and with a fresh probe per evaluation.

Every phase runs in its own subprocess (``torch.set_num_threads(threads)``) so that its peak RSS
(``resource.getrusage``) is its own. Around each phase the script measures the CPU time other processes used
(``/proc/stat`` busy time minus this benchmark's children) and warns when the machine was not idle: a busy
neighbour on a 2-core machine makes the numbers meaningless. One JSON document goes to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"a": REPO / "benchmarks" / "configs" / "config_a.yaml", "b": REPO / "benchmarks" / "configs" / "config_b.yaml"}
PHASES = ("vae", "lsgm", "sample", "nll_fixed", "nll_fresh")
WARMUP = 3  # the engine's step_time_stats skips the first 3 steps
BUSY_CORES_WARN = 0.2  # other processes using more than this many cores on average -> warning


# ------------------------------------------------------------------------------------------ machine load
def _cpu_busy_seconds() -> Optional[float]:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat; None if unavailable."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    vals = [int(v) for v in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    busy = sum(vals[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def idle_other_cores(seconds: float = 1.0) -> Optional[float]:
    """Average number of cores other processes kept busy over ``seconds`` while this script sleeps."""
    b0 = _cpu_busy_seconds()
    time.sleep(seconds)
    b1 = _cpu_busy_seconds()
    return None if b0 is None or b1 is None else max(b1 - b0, 0.0) / seconds


# ------------------------------------------------------------------------------------------ synthetic data
def write_synthetic_dataset(root: Path, name: str, shape: tuple[int, int, int], train: int, seed: int = 0) -> Path:
    """A prepared dataset ``root/name`` in the format of :func:`lsgm.data.prepare.prepare_dataset`.

    Images are smooth random fields (8x8 noise upsampled to the image size), uint8 levels 0..255, so that the
    VAE sees structure; their content does not matter for timing.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lsgm.data.prepare import BINARISED_DATASETS, FORMAT_VERSION, file_digest

    c, h, w = shape
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    counts = {"train": train, "valid": 16, "test": 16}
    splits_meta = {}
    for split, n in counts.items():
        low = torch.rand(n, c, 8, 8, generator=gen)
        img = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        arr = (img * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        path = folder / f"{split}.npy"
        np.save(path, np.ascontiguousarray(arr))
        splits_meta[split] = {"file": path.name, "count": n, "shape": list(arr.shape), "sha256": file_digest(path)}
    manifest = {
        "format_version": FORMAT_VERSION, "dataset": name, "dtype": "uint8", "layout": "NCHW", "max_value": 255,
        "dynamic_binarisation": name in BINARISED_DATASETS, "splits": splits_meta,
        "split_description": "synthetic benchmark data (benchmarks/bench.py)", "seed": seed,
        "raw_inputs": {}, "checksums_verified": False,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


# ------------------------------------------------------------------------------------------ config
def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def derived_config(base: Path, overrides: list[str], out_dir: Path, name: str) -> Path:
    """A params file ``extends:``-ing ``base`` with ``--set a.b.c=value`` overrides (same experiment name)."""
    import yaml

    raw: dict = {"extends": [str(base.resolve())]}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. engine.channels_last=true")
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(value)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ phases (child)
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _encoder_latents(cfg, work: Path, batch: int):
    """z0 of a batch of validation images through the stage-1 VAE of this benchmark (eval mode)."""
    import torch

    from lsgm.data.loader import load_split, preprocess
    from lsgm.models import load_model

    m = load_model(work / "runs" / cfg.name / "vae" / "model.pt")
    split = load_split(work / "prepared", cfg.data.dataset, "valid")
    gen = torch.Generator().manual_seed(0)
    x01 = preprocess(split.batch(torch.arange(batch)), max_value=split.max_value, binarize=cfg.data.binarize,
                     num_x_bits=cfg.data.num_x_bits, flip=False, generator=gen)
    with torch.no_grad():
        return m.vae(2.0 * x01 - 1.0, generator=gen).z0_top.float()


def _untrained_prior(cfg):
    import torch

    from lsgm.models import build_prior

    torch.manual_seed(0)
    prior = build_prior(cfg, "lsgm").eval()
    return prior, prior.sde


def run_phase(phase: str, config: Path, work: Path, steps: int, tol: Optional[float], batch: int) -> dict:
    import torch

    from lsgm.config import load_config

    cfg = load_config(config)
    threads = cfg.engine.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"phase": phase}
    if phase in ("vae", "lsgm"):
        from lsgm.train import train_lsgm, train_vae

        runs, data = work / "runs", work / "prepared"
        if phase == "vae":
            train_vae(cfg, run_root=runs, data_root=data, max_steps=WARMUP + steps)
            metrics = json.loads((runs / cfg.name / "vae" / "metrics.json").read_text())
            out["batch"] = cfg.train_vae.batch_size
        else:
            train_lsgm(cfg, "lsgm", run_root=runs, data_root=data, max_steps=WARMUP + steps)
            metrics = json.loads((runs / cfg.name / "lsgm" / "metrics.json").read_text())
            out["batch"] = cfg.prior["lsgm"].train.batch_size
        st = metrics.get("step_seconds")
        if st is None:
            raise RuntimeError("metrics.json has no step_seconds: this commit's TrainLoop records no step times")
        out["step_seconds"] = st
        out["images_per_s"] = out["batch"] / st["median"]
    elif phase == "sample":
        from lsgm.sampling import sample_ode

        prior, sde = _untrained_prior(cfg)
        c, s, _ = cfg.vae.latent_shape(cfg.data)
        sc = cfg.sampling
        tol_used = tol or sc.ode_tol
        res = sample_ode(prior, sde, (batch, c, s, s), ode_eps=sc.ode_eps, tol=tol_used, method=sc.method,
                         generator=torch.Generator().manual_seed(0))
        out.update(seconds=res.seconds, nfe=res.nfe, samples=batch, ode_eps=sc.ode_eps, tol=tol_used,
                   method=sc.method)
    elif phase.startswith("nll_"):
        from lsgm.likelihood import ode_nll

        ec = cfg.eval_nll
        z0 = _encoder_latents(cfg, work, batch)
        prior, sde = _untrained_prior(cfg)
        tol_used = tol or ec.ode_tol
        mode = phase[len("nll_"):]
        start = time.perf_counter()
        res = ode_nll(prior, sde, z0, ode_eps=ec.ode_eps, tol=tol_used, trace=ec.trace, probe=ec.probe,
                      num_probes=ec.num_probes, probe_mode=mode, method=ec.method,
                      generator=torch.Generator().manual_seed(1))
        out.update(seconds=time.perf_counter() - start, nfe=res.nfe, batch=batch, probe_mode=mode,
                   ode_eps=ec.ode_eps, tol=tol_used, method=ec.method,
                   nll_nats_mean=float(res.nll_nats.mean()))
    else:
        raise ValueError(f"phase={phase!r} is not allowed; allowed: {', '.join(PHASES)}")
    out["peak_rss_mb"] = _peak_rss_mb()
    out["threads"] = torch.get_num_threads()
    return out


# ------------------------------------------------------------------------------------------ driver (parent)
def _spawn(phase: str, config: Path, work: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--config", str(config),
           "--work", str(work), "--steps", str(args.steps), "--batch", str(args.batch)]
    if args.tol:
        cmd += ["--tol", str(args.tol)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    log_path = work / f"{config.stem}-{phase}.log"
    b0, c0, t0 = _cpu_busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    wall = time.perf_counter() - t0
    b1, c1 = _cpu_busy_seconds(), _children_cpu_seconds()
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"phase {phase} of {config} failed (exit {proc.returncode}); log tail:\n{tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["phase_wall_s"] = wall
    if b0 is not None and b1 is not None:
        # CPU the rest of the machine used while this phase ran (our child's own CPU time subtracted)
        result["other_load_cores"] = max((b1 - b0) - (c1 - c0), 0.0) / wall
    return result


def _git_commit() -> dict:
    def git(*a: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def bench_config(key: str, config: Path, work: Path, args, warnings: list[str]) -> dict:
    from lsgm.config import load_config

    if args.set:
        config = derived_config(config, args.set, work / "configs", config.stem)
    cfg = load_config(config)
    c, h, w = cfg.data.shape
    write_synthetic_dataset(work / "prepared", cfg.data.dataset, (c, h, w), train=args.batch * 24)
    phases: dict[str, dict] = {}
    for phase in args.phase_list:
        before = idle_other_cores(0.5)
        if before is not None and before > BUSY_CORES_WARN:
            warnings.append(f"{key}/{phase}: other processes used {before:.2f} cores just before the phase "
                            f"(load average {os.getloadavg()[0]:.2f})")
        print(f"[bench] {key}: {phase} ...", file=sys.stderr, flush=True)
        phases[phase] = _spawn(phase, config, work, args)
        phases[phase]["other_load_cores_before"] = before
        during = phases[phase].get("other_load_cores")
        if during is not None and during > BUSY_CORES_WARN:
            warnings.append(f"{key}/{phase}: other processes used {during:.2f} cores on average during the phase: "
                            f"its times are contaminated")
    res: dict[str, Any] = {
        "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
        "overrides": list(args.set or []),
        "batch": args.batch,
    }
    if "vae" in phases:
        res["vae_step_s"] = phases["vae"]["step_seconds"]
    if "lsgm" in phases:
        res["joint_step_s"] = phases["lsgm"]["step_seconds"]
    res["images_per_s"] = {name: phases[p]["images_per_s"] for name, p in (("vae", "vae"), ("joint", "lsgm"))
                           if p in phases}
    if "sample" in phases:
        res["sample"] = {k: phases["sample"][k] for k in ("seconds", "nfe", "samples", "ode_eps", "tol", "method")}
    res["nll"] = {m: {k: phases[f"nll_{m}"][k] for k in ("seconds", "nfe", "batch", "ode_eps", "tol", "method",
                                                          "nll_nats_mean")}
                  for m in ("fixed", "fresh") if f"nll_{m}" in phases}
    res["peak_rss_mb"] = {p: v["peak_rss_mb"] for p, v in phases.items()}
    res["other_load_cores"] = {p: v.get("other_load_cores") for p, v in phases.items()}
    res["phase_wall_s"] = {p: v["phase_wall_s"] for p, v in phases.items()}
    return res


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="a,b", help="comma-separated: a, b or paths to params files (default a,b)")
    ap.add_argument("--quick", action="store_true", help="smoke mode: 2 timed steps, ODE tol 1e-3")
    ap.add_argument("--steps", type=int, default=20, help="timed steps after 3 warm-up steps (default 20)")
    ap.add_argument("--batch", type=int, default=16, help="samples / NLL batch (training batch is the config's)")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads of each phase (configs set num_threads 2)")
    ap.add_argument("--tol", type=float, default=None, help="override the ODE tolerance (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. engine.channels_last=true (repeatable)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"subset of {','.join(PHASES)} (vae is needed by "
                    "lsgm and the NLL phases)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder (printed to stderr)")
    # internal: one phase in a child process
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps={args.steps}: need at least 1 timed step")
    if args.quick:
        args.steps = min(args.steps, 2)
        args.tol = args.tol or 1e-3
    args.phase_list = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = [p for p in args.phase_list if p not in PHASES]
    if bad:
        raise SystemExit(f"--phases: {bad} not allowed; allowed: {', '.join(PHASES)}")
    needs_vae = {"lsgm", "nll_fixed", "nll_fresh"} & set(args.phase_list)
    if needs_vae and "vae" not in args.phase_list:
        raise SystemExit(f"--phases: {sorted(needs_vae)} need the vae phase (its model.pt); add vae")
    if args.phase:
        result = run_phase(args.phase, args.config, args.work, args.steps, args.tol, args.batch)
        print(json.dumps(result))
        return 0

    import torch

    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    configs = {}
    for k in keys:
        path = CONFIGS.get(k.lower(), Path(k))
        if not path.is_file():
            raise SystemExit(f"--configs: {k!r} is neither a or b nor an existing params file")
        configs[k.upper() if k.lower() in CONFIGS else k] = path
    warnings: list[str] = []
    load_start = os.getloadavg()
    other_start = idle_other_cores(1.0)
    if other_start is not None and other_start > BUSY_CORES_WARN:
        warnings.append(f"the machine is not idle: other processes use {other_start:.2f} cores "
                        f"(load average {load_start[0]:.2f}); step times will be inflated")
    work = Path(tempfile.mkdtemp(prefix="lsgm-bench-"))
    doc: dict[str, Any] = {
        "benchmark": "lsgm issue 7", **_git_commit(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads, "batch": args.batch,
        "timed_steps": args.steps, "warmup_steps": WARMUP, "quick": args.quick,
        "loadavg_start": list(load_start), "other_load_cores_start": other_start,
    }
    doc["results"] = {}
    try:
        for k, p in configs.items():
            doc["results"][k] = bench_config(k, p, work, args, warnings)
            if args.out:  # partial document after each configuration (a long run may be interrupted)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({**doc, "warnings": warnings, "partial": True}, indent=2) + "\n")
    finally:
        if args.keep:
            print(f"[bench] work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    doc["loadavg_end"] = list(os.getloadavg())
    doc["warnings"] = warnings
    for w in warnings:
        print(f"[bench] WARNING: {w}", file=sys.stderr)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
