#!/usr/bin/env python
"""Per-op CPU profile of the stage-1 (VAE) and joint LSGM training steps at benchmark configurations A and B.

Run from the repository root on an idle machine (same set-up as ``benchmarks/bench.py``)::

    .venv/bin/python benchmarks/profile_steps.py                      # A and B, both steps, 10 profiled steps
    .venv/bin/python benchmarks/profile_steps.py --configs b --phases vae --rows 40
    .venv/bin/python benchmarks/profile_steps.py --set engine.precision=bf16

For each configuration it writes bench.py's synthetic prepared dataset into a temporary folder, trains the real
:func:`lsgm.train.train_vae` (and, for the joint step, :func:`lsgm.train.train_lsgm` from that VAE) for
``warmup`` steps unprofiled, then resumes the same stage for ``steps`` more steps under :mod:`torch.profiler`.
The trace opens when the first resumed step starts and closes when the last one returns, so it holds the steps and
the engine's per-step work between them (metrics, progress, periodic checkpoints), not the resume (model build,
checkpoint load) or the final save: an op count divided by ``steps`` is that op's calls per step. It prints
``torch.profiler``'s ``key_averages()`` table sorted by self CPU time, and the share of the profiled wall time
each op family takes (convolutions, batch norm, elementwise, optimiser, ...), as plain text.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench  # noqa: E402  (the synthetic dataset and --set configs of the benchmark)

FAMILIES = (  # first match wins; op names as torch.profiler reports them
    ("convolution", ("conv", "mkldnn_convolution", "slow_conv")),
    ("batch norm", ("batch_norm",)),
    ("group norm", ("group_norm",)),
    ("matmul / linear", ("addmm", "mm", "bmm", "linear", "matmul", "baddbmm")),
    ("optimiser", ("adam", "_foreach", "fused_adam", "lerp")),
    ("reductions", ("sum", "mean", "norm", "max", "amax", "logsumexp", "var")),
    ("copies / layout", ("copy_", "contiguous", "clone", "to", "cat", "stack", "empty", "zeros", "fill_", "pad")),
    ("elementwise", ("mul", "add", "sub", "div", "exp", "log", "sigmoid", "silu", "tanh", "sqrt", "pow", "neg",
                     "softplus", "where", "clamp", "rsqrt", "elu", "relu", "bernoulli", "dropout", "abs")),
)


def family(name: str) -> str:
    n = name.lower()
    return next((fam for fam, keys in FAMILIES if any(k in n for k in keys)), "other")


@contextmanager
def steps_only(prof, steps: int):
    """Profile only the training steps of the stage run inside this block: ``prof`` is entered when the first
    step starts and exited when the ``steps``-th returns (the engine's ``TrainLoop.run`` is wrapped for the block).
    Yields a dict that gets ``wall``, the seconds between the two."""
    from lsgm.engine import TrainLoop

    original, clock, done = TrainLoop.run, {"wall": float("nan")}, [0]

    def run(loop, step_fn, **kwargs):
        def profiled_step(step):
            if done[0] == 0:
                prof.__enter__()
                clock["t0"] = time.perf_counter()
            try:
                return step_fn(step)
            finally:
                done[0] += 1
                if done[0] == steps:
                    clock["wall"] = time.perf_counter() - clock["t0"]
                    prof.__exit__(None, None, None)
        return original(loop, profiled_step, **kwargs)

    TrainLoop.run = run
    try:
        yield clock
    finally:
        TrainLoop.run = original
        if 0 < done[0] < steps:
            prof.__exit__(None, None, None)
            raise RuntimeError(f"the stage ran {done[0]} of the {steps} steps to profile")


def profile_phase(cfg, phase: str, work: Path, warmup: int, steps: int, rows: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lsgm.train import train_lsgm, train_vae

    torch.set_num_threads(cfg.engine.num_threads or torch.get_num_threads())
    runs, data = work / "runs", work / "prepared"
    stage = "vae" if phase == "vae" else "lsgm"
    if phase == "vae":
        run = lambda n: train_vae(cfg, run_root=runs, data_root=data, max_steps=n)  # noqa: E731
    else:
        train_vae(cfg, run_root=runs, data_root=data, max_steps=warmup)
        run = lambda n: train_lsgm(cfg, "lsgm", run_root=runs, data_root=data, max_steps=n)  # noqa: E731
    run(warmup)  # unprofiled: first-call allocations, oneDNN primitive caches
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
    with steps_only(prof, steps) as clock:
        run(warmup + steps)
    wall = clock["wall"]
    avgs = prof.key_averages()
    print(f"\n=== {cfg.name} {stage} step: {steps} profiled steps, {wall:.2f} s wall "
          f"({torch.get_num_threads()} threads, torch {torch.__version__}, precision {cfg.engine.precision})")
    print(avgs.table(sort_by="self_cpu_time_total", row_limit=rows))
    fams: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    total = 0.0
    for e in avgs:
        fams[family(e.key)] += e.self_cpu_time_total
        calls[family(e.key)] += e.count
        total += e.self_cpu_time_total
    print(f"self CPU time by op family (of all ops' self time; {sum(calls.values()) / steps:.0f} op calls per step, "
          "nested calls included):")
    for fam, us in sorted(fams.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:18s} {us / 1e6 / steps * 1e3:8.1f} ms/step  {100 * us / max(total, 1e-9):5.1f} %"
              f"  {calls[fam] / steps:7.0f} calls/step")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="a,b", help="subset of a,b")
    ap.add_argument("--phases", default="vae,lsgm", help="subset of vae,lsgm")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as bench.py")
    args = ap.parse_args(argv)
    from lsgm.config import load_config

    for key in [c for c in args.configs.split(",") if c]:
        if key not in bench.CONFIGS:
            raise SystemExit(f"--configs: unknown {key!r}; allowed: {', '.join(bench.CONFIGS)}")
        for phase in [p for p in args.phases.split(",") if p]:
            if phase not in ("vae", "lsgm"):
                raise SystemExit(f"--phases: unknown {phase!r}; allowed: vae, lsgm")
            with tempfile.TemporaryDirectory(prefix="lsgm-profile-") as tmp:
                work = Path(tmp)
                config = bench.CONFIGS[key]
                if args.set:
                    config = bench.derived_config(config, args.set, work / "configs", config.stem)
                cfg = load_config(config)
                bench.write_synthetic_dataset(work / "prepared", cfg.data.dataset, tuple(cfg.data.shape),
                                              train=cfg.train_vae.batch_size * 24)
                profile_phase(cfg, phase, work, args.warmup, args.steps, args.rows)


if __name__ == "__main__":
    main()
