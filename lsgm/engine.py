"""The training engine: how a stage runs, not what it computes (the stages are in :mod:`lsgm.train`).

* **Processes and devices**: :func:`setup_distributed` picks the device by the one device rule
  (:mod:`lsgm.device`) and, under ``torchrun``, joins the process group (NCCL on GPU, gloo on CPU);
  gradients are averaged by one flat all-reduce.
* **Batches**: :class:`BatchPlan` splits each optimiser step's global batch over processes and gradient-accumulation
  micro-steps; a single process with accumulation W sees exactly what W processes see.
* **The loop**: :class:`TrainLoop` runs a stage's ``step_fn(step)`` with checkpoints every N steps / M minutes
  (atomic, checksummed, last K kept) holding the full state (models, EMA, optimisers, grad scaler, every RNG,
  counters), automatic resume, SIGTERM/SIGUSR1 → checkpoint and exit 128+sig, and the NaN guard: a non-finite loss
  (or, without fp16 loss scaling, gradient) never reaches the weights; the run rolls back to the newest valid
  checkpoint, multiplies the learning rates by ``engine.nan_lr_factor`` and goes on, and after
  ``engine.max_nan_failures`` stops with the remedies of docs/algorithm.md §11 item 1.
* **Optimisers and schedules**: Adam/AdamW with fused or foreach kernels, learning-rate warm-up + cosine decay
  counted in global batches (so the schedule in samples seen does not depend on the number of GPUs,
  docs/algorithm.md §12 item 10), and the glibc heap setting of ``engine.keep_cpu_heap``.

Fault-injection seams (the tests wrap them; nothing here reads the environment for tests):
:meth:`TrainLoop.micro_batch` (every micro-batch's input) and :meth:`TrainLoop.end_step` (after each step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from lsgm.atomic import atomic_write_json, atomic_write_text
from lsgm.checkpoint import CheckpointManager, nonfinite_entries
from lsgm.choices import WEIGHT_DECAY_MODES, check_choice
from lsgm.config import EngineConfig, ExperimentConfig, config_hash, experiment_hash, write_resolved_config
from lsgm.data.loader import BatchIterator, PreparedSplit, load_split, to_model_input
from lsgm.device import resolve_device
from lsgm.ema import EMA
from lsgm.errors import LsgmError
from lsgm.provenance import peak_rss_mb
from lsgm.runs import RunLayout

log = logging.getLogger("lsgm.engine")

__all__ = [
    "BatchPlan", "DistContext", "adam_with_schedule", "NAN_REMEDIES", "NonFiniteError", "TooManyNaNs", "TrainLoop", "allreduce_grads",
    "cosine_lr", "grad_norm", "host_floats", "keep_cpu_heap", "lr_at", "make_adam", "prepare_batchnorm",
    "StageStart", "add_reg", "already_finished", "finish_stage", "prepare_rerun", "setup_distributed", "skip_finished",
    "write_train_headline",
    "setup_logging", "start_stage", "step_time_stats",
]

NAN_REMEDIES = (
    "remedies (docs/algorithm.md §11 item 1): increase the spectral regularisation (train_vae.weight_decay_norm, "
    "prior.<stage>.train.weight_decay_norm_vae / weight_decay_norm_score), lower the learning rate, or freeze the "
    "VAE in stage 2 (prior.<stage>.train_vae: false); resuming alone usually does not help"
)


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN/Inf."""


class TooManyNaNs(LsgmError, RuntimeError):
    """The NaN guard gave up after ``engine.max_nan_failures`` rollbacks."""


def setup_logging() -> None:
    """INFO-level logging to stderr, unless the application configured logging already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)


# --------------------------------------------------------------------------------------------- schedules
def lr_at(step: int, *, base: float, minimum: float, warmup_epochs: float, epochs: int, iters_per_epoch: int) -> float:
    """Learning rate at optimiser step ``step`` (docs/algorithm.md §1.8, §4.6).

    Linear warm-up from 0 over ``warmup_epochs`` epochs (per step), then cosine decay to ``minimum`` over
    ``epochs − warmup − 1`` epochs, stepped once per epoch. Epochs count global batches, so the schedule in
    samples seen does not depend on the number of GPUs.
    """
    warmup_steps = warmup_epochs * iters_per_epoch
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    epoch = step // iters_per_epoch
    span = max(epochs - warmup_epochs - 1, 1)
    e = min(max(epoch - math.ceil(warmup_epochs), 0), span)
    return minimum + 0.5 * (base - minimum) * (1.0 + math.cos(math.pi * e / span))


def cosine_lr(*, base: float, minimum: float, warmup_epochs: float, epochs: int,
              iters_per_epoch: int) -> Callable[[int], float]:
    """``step -> lr_at(step, ...)`` with the schedule's constants bound (one per optimiser)."""
    return lambda step: lr_at(step, base=base, minimum=minimum, warmup_epochs=warmup_epochs, epochs=epochs,
                              iters_per_epoch=iters_per_epoch)


# --------------------------------------------------------------------------------------------- devices
@dataclass
class DistContext:
    """Where this process runs and how it talks to the others (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Wait for every process, then leave the process group (a lingering gloo group hangs at exit)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def setup_distributed(engine: EngineConfig) -> DistContext:
    """Pick the device by the device rule and, under torchrun, join the process group (NCCL on GPU, gloo on CPU)."""
    if engine.num_threads:
        torch.set_num_threads(engine.num_threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(engine.device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = engine.tf32
        torch.backends.cudnn.allow_tf32 = engine.tf32
    backend = None
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def prepare_batchnorm(module: nn.Module, ctx: DistContext) -> nn.Module:
    """Synchronised BatchNorm where the backend supports it (NCCL), plain BN otherwise; stated in the log."""
    if ctx.world_size > 1 and ctx.backend == "nccl":
        log.info("BatchNorm: synchronised across %d GPUs (SyncBatchNorm)", ctx.world_size)
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if ctx.world_size > 1:
        log.info("BatchNorm: per-process statistics (backend %s has no SyncBatchNorm)", ctx.backend)
    return module


def allreduce_grads(params: list[nn.Parameter], ctx: DistContext) -> None:
    """Average gradients across processes (one flat all-reduce)."""
    if ctx.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems
_TRIM_THRESHOLD = 1 << 30


def keep_cpu_heap() -> bool:
    """Stop glibc's malloc from handing activation memory back to the OS after every step (CPU fast path).

    By default glibc serves blocks above a (dynamic, ≥128 KiB) threshold with ``mmap`` and trims the heap top
    above another: every training step then unmaps its activations and faults the pages in again, zero-filled, on
    the next step. Raising both thresholds (``mallopt``: mmap threshold 32 MiB, glibc's maximum; trim threshold
    1 GiB) keeps the memory in the process; the heap still shrinks when more than 1 GiB is free at its top.
    Same arithmetic, only allocation changes. Returns False (and does nothing) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.warning("mallopt refused the heap thresholds; allocation stays glibc's default")
    return ok


# --------------------------------------------------------------------------------------------- optimisers
def make_adam(params: list[nn.Parameter], *, lr: float, eps: float, weight_decay: float,
              weight_decay_mode: str = "decoupled", fused: bool = False) -> torch.optim.Optimizer:
    """Adam for the stage-2 networks (docs/algorithm.md §4.6, §12 item 4).

    ``weight_decay_mode``: ``decoupled`` → AdamW (``θ ← θ − lr·(update + wd·θ)``, what the reference gets from
    apex's FusedAdam, its recommended install); ``l2`` → Adam with ``wd·θ`` added to the gradient (the reference
    without apex). Fused kernels where this torch has them for the parameters' device, else foreach kernels.
    """
    check_choice("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)
    cls = torch.optim.AdamW if weight_decay_mode == "decoupled" else torch.optim.Adam
    kwargs = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
    if fused:
        try:  # the device types this torch build has fused optimiser kernels for (torch checks only at step 1)
            from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
            supported = set(_get_fused_kernels_supported_devices())
        except ImportError:
            supported = set()
        if all(p.device.type in supported and p.is_floating_point() for p in params):
            return cls(params, fused=True, **kwargs)
        log.warning("fused Adam not available for %s; using foreach kernels", sorted({p.device.type for p in params}))
    return cls(params, foreach=True, **kwargs)


def adam_with_schedule(params: list[nn.Parameter], tc: Any, *, lr: float, lr_min: float, eps: float, ipe: int, fused: bool
               ) -> tuple[torch.optim.Optimizer, Callable[[int], float]]:
    """Adam (weight decay as ``tc.weight_decay_mode``) and its warm-up + cosine schedule."""
    opt = make_adam(params, lr=lr, eps=eps, weight_decay=tc.weight_decay, weight_decay_mode=tc.weight_decay_mode,
                    fused=fused)
    return opt, cosine_lr(base=lr, minimum=lr_min, warmup_epochs=tc.warmup_epochs, epochs=tc.epochs,
                          iters_per_epoch=ipe)


def grad_norm(params: list[nn.Parameter]) -> float:
    """Global L2 norm of the gradients (one foreach pass; NaN/inf anywhere makes it non-finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


# --------------------------------------------------------------------------------------------- data
@dataclass
class BatchPlan:
    """How one optimiser step's global batch is split over processes and accumulation micro-steps.

    The global batch of step k is positions [k·G, (k+1)·G) of epoch e's permutation (e = k // iters_per_epoch);
    process r's accumulation step a takes micro-batch ``a·W + r`` of it. A single process with accumulation W
    therefore sees exactly the micro-batches that W processes see.
    """

    global_batch: int
    micro_batch: int
    world_size: int
    accumulation: int
    iters_per_epoch: int

    @classmethod
    def make(cls, *, batch_size: int, global_batch_size: Optional[int], world_size: int, num_items: int,
             where: str) -> "BatchPlan":
        g = global_batch_size or batch_size * world_size
        if g % (batch_size * world_size):
            raise ValueError(f"{where}: global_batch_size={g} is not a multiple of batch_size x processes = "
                             f"{batch_size} x {world_size}; allowed: a multiple (accumulation steps = ratio)")
        if num_items < g:
            raise ValueError(f"{where}: the training split has {num_items} images, fewer than one global batch ({g})")
        return cls(g, batch_size, world_size, g // (batch_size * world_size), num_items // g)

    def micro_batches(self, order: BatchIterator, step: int, rank: int) -> list[tuple[int, torch.Tensor]]:
        """(global micro-batch index, item indices) for this process's accumulation steps of ``step``."""
        epoch, pos = divmod(step, self.iters_per_epoch)
        idx = order.epoch_indices(epoch)[pos * self.global_batch:(pos + 1) * self.global_batch]
        chunks = idx.split(self.micro_batch)
        return [(a * self.world_size + rank, chunks[a * self.world_size + rank]) for a in range(self.accumulation)]


@dataclass
class StageStart:
    """What every training stage starts from: processes, run layout, training images, batch plan, schedule length."""

    ctx: DistContext
    layout: RunLayout
    split: PreparedSplit
    plan: BatchPlan
    total: int


def start_stage(cfg: ExperimentConfig, stage: str, tc: Any, run_root: Any, data_root: Any, where: str,
                detail: str = "") -> StageStart:
    """Logging, processes (device rule), the run directory and its resolved config, the training split, the batch
    plan, and the log line that states the global batch ("global batch 256 = 16 per process x 4 processes x 4
    accumulation")."""
    setup_logging()
    ctx = setup_distributed(cfg.engine)
    if cfg.engine.keep_cpu_heap and ctx.device.type == "cpu":
        keep_cpu_heap()
    layout = RunLayout(run_root, cfg.name)
    if ctx.is_main:
        write_resolved_config(cfg, layout.resolved_config(stage))
    split = load_split(data_root, cfg.data.dataset, "train")
    if cfg.data.max_train_images is not None and cfg.data.max_train_images < len(split):
        split = dataclasses.replace(split, images=split.images[: cfg.data.max_train_images])
    plan = BatchPlan.make(batch_size=tc.batch_size, global_batch_size=tc.global_batch_size,
                          world_size=ctx.world_size, num_items=len(split), where=f"{cfg.name}: {where}")
    total = plan.iters_per_epoch * tc.epochs
    log.info("%s/%s%s: %d images, global batch %d = %d per process x %d processes x %d accumulation; %d steps",
             cfg.name, stage, detail, len(split), plan.global_batch, plan.micro_batch, ctx.world_size,
             plan.accumulation, total)
    return StageStart(ctx, layout, split, plan, total)


def step_time_stats(seconds: list[float], warmup: int = 3) -> Optional[dict[str, float]]:
    """Median/min/max wall time of the steps of this run after the first ``warmup`` (None if there are none)."""
    timed = sorted(seconds[warmup:])
    if not timed:
        return None
    n = len(timed)
    median = timed[n // 2] if n % 2 else 0.5 * (timed[n // 2 - 1] + timed[n // 2])
    return {"median": median, "min": timed[0], "max": timed[-1], "steps": n, "warmup_steps": warmup}


def host_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """A step's metrics as Python floats, with ONE device-to-host copy for all tensor values (not one sync each)."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist() if keys else []
    tensor_values = dict(zip(keys, values))
    return {k: tensor_values[k] if k in tensor_values else float(v) for k, v in metrics.items()}


def _mix_seed(*parts: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> 2)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------- the loop
class TrainLoop:
    """Checkpointing, resume, signals, NaN guard, progress and logging around a stage's ``step_fn``.

    Args:
        cfg: experiment config.
        stage: "vae" or a prior stage name (names the run directory).
        layout: the experiment's run layout (checkpoints and DVCLive logs of ``stage`` live there).
        ctx: distributed context.
        modules: name -> module whose state is checkpointed.
        optimizers: name -> optimiser; ``lr_fns[name](step)`` gives its learning rate.
        total_steps: optimiser steps of the whole schedule.
        hash_sections: config sections that define this run; a change starts a fresh run (old checkpoints kept).
        seed: the stage's seed (every micro-batch's RNGs derive from (seed, step, micro-batch)).
        ema: EMA of the prior (checkpointed).
        extra_state: further stateful objects (e.g. spectral regularisers' power-iteration vectors).
    """

    def __init__(self, *, cfg: ExperimentConfig, stage: str, layout: RunLayout, ctx: DistContext,
                 modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                 lr_fns: dict[str, Callable[[int], float]], total_steps: int, hash_sections: Any,
                 seed: int = 0, ema: Optional[EMA] = None, extra_state: Optional[dict[str, Any]] = None):
        self.cfg, self.stage, self.layout, self.ctx = cfg, stage, layout, ctx
        self.run_dir = layout.stage_dir(stage)
        self.engine = cfg.engine
        self.modules, self.optimizers, self.lr_fns = modules, optimizers, lr_fns
        self.ema, self.extra_state = ema, extra_state or {}
        self.total_steps = total_steps
        self.seed = int(seed)
        self.step = 0
        self.lr_factor = 1.0
        self.nan_failures = 0
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.engine.precision]
        self.autocast_dtype = dtype
        self.scaler = torch.amp.GradScaler(ctx.device.type, init_scale=self.engine.grad_scaler_init,
                                           enabled=dtype is torch.float16)
        self.generators = {"data": torch.Generator(device="cpu"), "noise": torch.Generator(device=ctx.device)}
        self.ckpt = CheckpointManager(layout.checkpoints(stage), keep=self.engine.keep_checkpoints)
        self.config_hash = config_hash(hash_sections)
        self._stop_signal: Optional[int] = None
        self._last_ckpt_time = time.monotonic()
        self.live = None
        self.step_seconds: list[float] = []  # wall time of each successful step_fn call, across resumes
        self.last_metrics: dict[str, float] = {}  # the last completed step's metrics (checkpointed: a resume at the
        self.seconds_total = 0.0  # end of the schedule still reports them); training seconds across resumes
        self._run_start = self._process_start = time.monotonic()

    # ---- state
    def state_dict(self) -> dict:
        return {
            "step": self.step, "lr_factor": self.lr_factor, "nan_failures": self.nan_failures,
            "config_hash": self.config_hash,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict(),
            "extra": {k: v.state_dict() for k, v in self.extra_state.items()},
            "rng": _rng_state(self.ctx.device),
            "generators": {k: g.get_state() for k, g in self.generators.items()},
            "last_metrics": dict(self.last_metrics),
            "step_seconds": torch.tensor(self.step_seconds, dtype=torch.float64),
            "seconds_total": self.seconds_total + (time.monotonic() - self._run_start),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.lr_factor = int(state["step"]), float(state["lr_factor"])
        self.nan_failures = int(state["nan_failures"])
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        if self.ema and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        for k, v in self.extra_state.items():
            v.load_state_dict(state["extra"][k])
        _set_rng_state(state["rng"], self.ctx.device)
        for k, g in self.generators.items():
            g.set_state(state["generators"][k])
        self.last_metrics = dict(state.get("last_metrics", {}))
        self.step_seconds = [float(v) for v in state.get("step_seconds", torch.zeros(0)).tolist()]
        self.seconds_total = float(state.get("seconds_total", 0.0))
        self._run_start = time.monotonic()

    def save_checkpoint(self) -> None:
        """Checkpoint the full state (rank 0 writes). A state with non-finite weights, buffers or optimiser moments is
        never written: every rank raises :class:`NonFiniteError` and the NaN guard rolls back."""
        state = self.state_dict()
        bad = nonfinite_entries(state)
        if bad:
            raise NonFiniteError(f"non-finite state after step {self.step} ({len(bad)} tensor(s), e.g. "
                                 f"{', '.join(bad[:3])})")
        if self.ctx.is_main:
            path = self.ckpt.save(state, self.step)
            log.info("checkpoint %s (step %d)", path, self.step)
        self._last_ckpt_time = time.monotonic()
        self.ctx.barrier()

    def resume_or_start(self) -> bool:
        """Load the newest valid checkpoint of this config; True if resumed. Stale runs are moved aside.

        Every rank reads the directory between two barriers, so all ranks take the same decision (rank 0's step-0
        checkpoint of a fresh start must not be seen by a slower rank as something to resume from)."""
        self.ctx.barrier()
        found = self.ckpt.load_latest(map_location=self.ctx.device)
        self.ctx.barrier()
        if found is not None and found[1].get("config_hash") != self.config_hash:
            if self.ctx.is_main:
                stale = self.layout.stale_checkpoints(self.stage, str(found[1].get("config_hash")))
                log.warning("the config of %s changed since its checkpoints were written; moving them to %s and "
                            "starting afresh", self.run_dir, stale)
                if stale.exists():
                    shutil.rmtree(stale)
                self.ckpt.directory.rename(stale)
            self.ctx.barrier()
            found = None
        if found is None:
            return False
        self.load_state_dict(found[1])
        log.info("resumed %s from step %d", self.run_dir, self.step)
        return True

    # ---- signals
    def _handle_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum
        log.warning("received signal %d: will checkpoint and exit after this step", signum)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handle_signal)
            except ValueError:  # not in the main thread (e.g. some test runners)
                pass

    # ---- helpers for step functions
    def seed_micro_batch(self, step: int, index: int, phase: int = 0) -> None:
        """Seed every RNG a micro-batch uses (binarisation, posterior/diffusion noise, dropout) from
        (seed, step, global micro-batch index, phase). Random numbers then depend on which samples are processed,
        not on how they are spread over processes or accumulation steps, nor on restarts."""
        s = _mix_seed(self.seed, step, index, phase)
        torch.manual_seed(s)
        self.generators["data"].manual_seed(s + 1)
        self.generators["noise"].manual_seed(s + 2)

    def micro_batch(self, split: PreparedSplit, idx: torch.Tensor, step: int, index: int, *,
                    dequantize: bool = False) -> torch.Tensor:
        """Seed the micro-batch's RNGs, then load, preprocess and move its images (model input in [−1, 1];
        ``dequantize``: uniformly dequantised levels, for the data-space score model)."""
        self.seed_micro_batch(step, index)
        return to_model_input(split, idx, self.cfg.data, self.generators["data"], self.ctx.device,
                              channels_last=self.cfg.engine.channels_last and not dequantize, dequantize=dequantize)

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor, inputs: Optional[list[nn.Parameter]] = None, retain_graph: bool = False):
        """Back-propagate ``loss`` (scaled under fp16) into ``inputs`` (None: every leaf); NonFiniteError first
        if the loss is not finite."""
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteError(f"non-finite loss {float(loss.detach().float().mean())}")
        self.scaler.scale(loss).backward(inputs=inputs, retain_graph=retain_graph)

    def optimizer_step(self, name: str, params: list[nn.Parameter], grad_clip: float = 0.0) -> float:
        """All-reduce, unscale, check, clip and step optimiser ``name``; returns the gradient norm."""
        opt = self.optimizers[name]
        allreduce_grads(params, self.ctx)
        self.scaler.unscale_(opt)
        norm = grad_norm(params)  # one pass over the gradients: a NaN/inf anywhere makes the norm non-finite
        finite = math.isfinite(norm)
        if not finite and not self.scaler.is_enabled():
            raise NonFiniteError(f"non-finite gradient in {name}")
        if grad_clip > 0 and finite:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        self.scaler.step(opt)  # skipped by the scaler itself if fp16 overflowed
        return norm

    def set_learning_rates(self) -> dict[str, float]:
        lrs = {}
        for name, opt in self.optimizers.items():
            lr = self.lr_fns[name](self.step) * self.lr_factor
            for group in opt.param_groups:
                group["lr"] = lr
            lrs[name] = lr
        return lrs

    # ---- main loop
    def _rollback(self, exc: Exception) -> None:
        self.nan_failures += 1
        failures, factor = self.nan_failures, self.lr_factor * self.engine.nan_lr_factor
        bad_step = self.step
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if failures >= self.engine.max_nan_failures:
            raise TooManyNaNs(f"{self.stage}: {failures} non-finite losses/gradients (last at step {bad_step}: {exc}); "
                              f"giving up. {NAN_REMEDIES}")
        found = self.ckpt.load_latest(map_location=self.ctx.device)
        if found is None:
            raise TooManyNaNs(f"{self.stage}: non-finite loss at step {bad_step} and no checkpoint to roll back to. "
                              f"{NAN_REMEDIES}")
        self.load_state_dict(found[1])
        self.nan_failures, self.lr_factor = failures, factor  # the remedy survives the rollback
        self.rewind_live()  # the steps after the checkpoint are replayed
        log.error("NaN guard: %s at step %d; rolled back to step %d, learning rates x%g (now x%g), failure %d/%d",
                  exc, bad_step, self.step, self.engine.nan_lr_factor, factor, failures,
                  self.engine.max_nan_failures)
        self.log_metrics({"nan_rollback_to_step": float(self.step), "lr_factor": factor})

    def open_live(self, resumed: bool) -> None:
        """DVCLive logs of this stage (rank 0). A resumed run first drops the rows logged after its checkpoint, so the
        history holds each optimiser step once."""
        if not self.ctx.is_main:
            return
        from dvclive import Live

        if resumed:
            self.rewind_live()
        self.live = Live(dir=str(self.layout.dvclive(self.stage)), resume=resumed, save_dvc_exp=False, dvcyaml=None,
                         report=None)

    def rewind_live(self) -> None:
        """Drop DVCLive history rows with ``step`` > the current step (logged after the checkpoint resumed from)."""
        if not self.ctx.is_main:
            return
        for tsv in sorted((self.layout.dvclive(self.stage) / "plots" / "metrics").rglob("*.tsv")):
            lines = tsv.read_text().splitlines(keepends=True)
            if not lines:
                continue
            col = lines[0].rstrip("\n").split("\t").index("step") if "step" in lines[0].split("\t") else None
            if col is None:
                continue
            keep = [ln for ln in lines[1:] if ln.strip() and int(float(ln.split("\t")[col])) <= self.step]
            if len(keep) != len(lines) - 1:
                atomic_write_text(tsv, "".join(lines[:1] + keep))

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Log one row per metric at x = the optimiser step (steps completed), then write DVCLive's summary."""
        if self.live is None:
            return
        self.live.step = self.step
        for k, v in metrics.items():
            if v is not None and math.isfinite(v):
                self.live.log_metric(k, v)
        self.live.sync()

    def end_step(self, metrics: dict[str, float], end: int, bar: Any) -> None:
        """After a successful step: log, checkpoint when due, and on a pending signal checkpoint and exit."""
        if self.step % self.engine.log_every_steps == 0 or self.step == end:
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "nelbo_nats", "p_loss")},
                            refresh=False)
            self.log_metrics(metrics)
        due_time = time.monotonic() - self._last_ckpt_time > 60 * self.engine.checkpoint_every_minutes
        if self.step % self.engine.checkpoint_every_steps == 0 or due_time or self.step == end:
            self.save_checkpoint()
        if self._stop_signal is not None:
            self.save_checkpoint()
            bar.close()
            log.warning("stopped by signal %d at step %d; rerun the same command to resume", self._stop_signal,
                        self.step)
            raise SystemExit(128 + self._stop_signal)

    def run(self, step_fn: Callable[[int], dict[str, float]], *, max_steps: Optional[int] = None,
            on_start: Optional[Callable[[], None]] = None) -> dict[str, float]:
        """Run ``step_fn(step)`` from the resumed step to the end of the schedule (or ``max_steps``)."""
        from lsgm.progress import progress

        self.install_signal_handlers()
        resumed = self.resume_or_start()
        if not resumed:
            torch.manual_seed(self.seed)
            self.generators["data"].manual_seed(self.seed + 1)
            self.generators["noise"].manual_seed(self.seed + 2)
            if on_start is not None:
                on_start()
            self.save_checkpoint()  # step 0: the NaN guard always has something to roll back to
        self.open_live(resumed)
        end = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        bar = progress(end, f"{self.cfg.name}/{self.stage}", unit="step", initial=self.step,
                       disable=not self.ctx.is_main)
        try:
            while self.step < end:
                lrs = self.set_learning_rates()
                t_step = time.perf_counter()
                try:
                    metrics = step_fn(self.step)
                    self.scaler.update()
                    self.step_seconds.append(time.perf_counter() - t_step)
                    self.step += 1
                    bar.update(1)
                    metrics.update({f"lr_{k}": v for k, v in lrs.items()})
                    # a step the fp16 GradScaler skipped has an inf gradient norm by design: the checkpointed
                    # metrics keep finite values only, so such a state is not mistaken for a diverged one
                    self.last_metrics = {k: v for k, v in metrics.items()
                                         if not isinstance(v, float) or math.isfinite(v)}
                    self.end_step(metrics, end, bar)  # a checkpoint of a non-finite state raises here: roll back
                except NonFiniteError as exc:
                    self._rollback(exc)
                    bar.n = self.step
                    bar.refresh()
        finally:
            bar.close()  # the progress line ends before any error message
        if self.live is not None:
            self.live.end()
        return dict(self.last_metrics)

    def seconds(self) -> dict[str, float]:
        """Training wall time of this process and across every resumed run of this stage."""
        now = time.monotonic()
        return {"seconds_this_run": now - self._process_start,
                "seconds_total": self.seconds_total + (now - self._run_start)}


# --------------------------------------------------------------------------------------------- stage lifecycle
def write_train_headline(cfg: ExperimentConfig, layout: RunLayout, stage: str, metrics_root: Optional[Path]) -> None:
    """``metrics/<exp>/train_<stage>.json`` from the stage's ``metrics.json`` (lsgm.headline)."""
    from lsgm.headline import headline_layout, training_headline, write_headline

    summary = json.loads(layout.metrics(stage).read_text())
    write_headline(headline_layout(cfg.name, layout.root, metrics_root).train(stage), training_headline(summary))


def finish_stage(cfg: ExperimentConfig, stage: str, start: StageStart, loop: TrainLoop, last: dict[str, float],
                 metrics_root: Optional[Path] = None, **modules: Any) -> Path:
    """Rank 0 writes ``model.pt`` (with the run's config hash) and ``metrics.json``; every rank leaves the group.

    ``last`` and the step times come from the loop's state, which checkpoints carry: a rerun after a kill between
    the last checkpoint and ``model.pt`` writes the same summary as the uninterrupted run."""
    from lsgm.models import save_model

    path = start.layout.model(stage)
    if start.ctx.is_main:
        save_model(path, cfg=cfg, stage=stage, step=loop.step, epoch=loop.step // start.plan.iters_per_epoch,
                   run_hash=loop.config_hash, **modules)
        summary = {
            "experiment": cfg.name, "stage": stage, "steps": loop.step, "total_steps": loop.total_steps,
            "global_batch": start.plan.global_batch, "per_process_batch": start.plan.micro_batch,
            "processes": start.ctx.world_size, "accumulation": start.plan.accumulation,
            "nan_failures": loop.nan_failures, "lr_factor": loop.lr_factor, "precision": cfg.engine.precision,
            "device": start.ctx.device.type, "run_hash": loop.config_hash, "experiment_hash": experiment_hash(cfg),
            "final": {k: v for k, v in last.items() if isinstance(v, float) and math.isfinite(v)},
            "step_seconds": step_time_stats(loop.step_seconds), **loop.seconds(), "peak_rss_mb": peak_rss_mb(),
        }
        atomic_write_json(start.layout.metrics(stage), summary, sort_keys=True)
        write_train_headline(cfg, start.layout, stage, metrics_root)
    start.ctx.close()
    return path


def skip_finished(cfg: ExperimentConfig, stage: str, start: StageStart, run_hash: str, retrain: bool, end: int,
                  metrics_root: Optional[Path] = None) -> bool:
    """:func:`prepare_rerun`; for a stage that is already finished also (re)write its headline file and leave the
    process group: the caller returns ``start.layout.model(stage)``."""
    if not prepare_rerun(start.layout, stage, run_hash, retrain, end):
        return False
    if start.ctx.is_main:
        write_train_headline(cfg, start.layout, stage, metrics_root)
    start.ctx.close()
    return True


def already_finished(layout: RunLayout, stage: str, run_hash: str, end: int) -> bool:
    """True if ``stage`` already wrote its outputs for this very config (same run hash) up to step ``end``: a
    finished stage is idempotent, a rerun keeps its ``model.pt`` and ``metrics.json`` (``retrain`` trains again)."""
    from lsgm.models import read_model_file

    try:
        payload = read_model_file(layout.model(stage))
        metrics = json.loads(layout.metrics(stage).read_text())
    except (OSError, ValueError, LsgmError):
        return False
    done = payload.get("run_hash") == run_hash and int(payload.get("step", -1)) >= end and bool(metrics.get("final"))
    if done:
        log.info("%s is complete (step %d, same config): nothing to do; pass --retrain to train this stage again",
                 layout.model(stage), payload["step"])
    return done


def prepare_rerun(layout: RunLayout, stage: str, run_hash: str, retrain: bool, end: int) -> bool:
    """Before a stage starts: True if it is already finished (and not ``retrain``). With ``retrain`` the old
    checkpoints are moved aside and the old outputs removed, so an interrupted retrain resumes without the flag."""
    if not retrain:
        return already_finished(layout, stage, run_hash, end)
    if int(os.environ.get("RANK", "0")) == 0:
        ckpts = layout.checkpoints(stage)
        if ckpts.is_dir():
            stale = layout.stale_checkpoints(stage, "retrain")
            shutil.rmtree(stale, ignore_errors=True)
            ckpts.rename(stale)
            log.warning("--retrain: moved %s to %s", ckpts, stale)
        for path in (layout.model(stage), layout.metrics(stage)):
            path.unlink(missing_ok=True)
    return False


def add_reg(loop: TrainLoop, reg: Optional[torch.Tensor], params: list[nn.Parameter], m: dict, name: str) -> None:
    """Back-propagate a regulariser once per optimiser step (not per micro-batch), into ``params`` only."""
    if reg is None:
        return
    loop.backward(reg, inputs=params)
    m[name] = reg.detach()
