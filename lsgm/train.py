"""Two-stage LSGM training (spec §1.8, §4): `train_vae` (stage 1) and `train_lsgm` (stage 2 and later).

The engine (:class:`TrainLoop`) is shared by both stages and makes long runs safe:

* **Resume**: checkpoints every N steps / M minutes (atomic, checksummed, last K kept) hold the full state:
  models, EMA, optimisers, grad scaler, every RNG, step counters. The data order is a pure function of
  (seed, step), so a restarted command continues bit-identically on CPU.
* **Signals**: SIGTERM/SIGUSR1 (Slurm's warning before a time limit or preemption) -> checkpoint, exit 128+sig.
* **NaN guard**: a non-finite loss (or, without fp16 loss scaling, gradient) never reaches the weights: the run
  rolls back to the newest valid checkpoint, multiplies the learning rates by ``engine.nan_lr_factor`` and goes
  on; after ``engine.max_nan_failures`` it stops with the remedies of spec §11.1.
* **Scale**: autocast bf16/fp16 (grad scaler for fp16), TF32, `torchrun` data parallelism (gloo on CPU, NCCL on
  GPU; gradients averaged by all-reduce), per-process batch + gradient accumulation to the global batch.
* **Schedules** are functions of samples seen (global batch × step), so changing the number of GPUs at the same
  global batch leaves warm-up, cosine decay and KL annealing unchanged (spec §12 item 10).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
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

from lsgm.checkpoint import CheckpointManager, atomic_write_bytes, sha256_file
from lsgm.config import ExperimentConfig, EngineConfig, config_hash, write_resolved_config
from lsgm.data.loader import BatchIterator, PreparedSplit, load_split, preprocess
from lsgm.ema import EMA
from lsgm.models import build_prior, build_vae, read_model_file, save_model
from lsgm.vae.regularization import SpectralRegularizer, bn_loss, kl_balancer, kl_coeff

log = logging.getLogger("lsgm.train")

NAN_REMEDIES = (
    "remedies (spec §11.1): increase the spectral regularisation (train_vae.weight_decay_norm, "
    "prior.<stage>.train.weight_decay_norm_vae / weight_decay_norm_score), lower the learning rate, or freeze the "
    "VAE in stage 2 (prior.<stage>.train_vae: false); resuming alone usually does not help"
)


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN/Inf."""


class TooManyNaNs(RuntimeError):
    """The NaN guard gave up after ``engine.max_nan_failures`` rollbacks."""


# --------------------------------------------------------------------------------------------- schedules
def lr_at(step: int, *, base: float, minimum: float, warmup_epochs: float, epochs: int, iters_per_epoch: int) -> float:
    """Learning rate at optimiser step ``step`` (spec §1.8, §4.6).

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
    """Pick the device from config and, under torchrun, join the process group (NCCL on GPU, gloo on CPU)."""
    if engine.num_threads:
        torch.set_num_threads(engine.num_threads)
    want_cuda = engine.device == "cuda" or (engine.device == "auto" and torch.cuda.is_available())
    if engine.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = engine.tf32
        torch.backends.cudnn.allow_tf32 = engine.tf32
    else:
        device = torch.device("cpu")
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


def _adam(params: list[nn.Parameter], *, lr: float, eps: float, weight_decay: float, fused: bool
          ) -> torch.optim.Adam:
    """Adam with fused kernels where this torch has them for the parameters' device, else foreach kernels."""
    if fused:
        try:  # the device types this torch build has fused optimiser kernels for (torch checks only at step 1)
            from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
            supported = set(_get_fused_kernels_supported_devices())
        except ImportError:
            supported = set()
        if all(p.device.type in supported and p.is_floating_point() for p in params):
            return torch.optim.Adam(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=True)
        log.warning("fused Adam not available for %s; using foreach kernels", sorted({p.device.type for p in params}))
    return torch.optim.Adam(params, lr=lr, eps=eps, weight_decay=weight_decay, foreach=True)


def grad_norm(params: list[nn.Parameter]) -> float:
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


# --------------------------------------------------------------------------------------------- engine
def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainLoop:
    """Checkpointing, resume, signals, NaN guard, progress and logging around a stage's ``step_fn``.

    Args:
        cfg: experiment config.
        stage: "vae" or a prior stage name (names the run directory).
        run_dir: ``data/runs/EXP/STAGE``.
        ctx: distributed context.
        modules: name -> module whose state is checkpointed (and whose parameters are all-reduced).
        optimizers: name -> optimiser; ``lr_fns[name](step)`` gives its learning rate.
        total_steps: optimiser steps of the whole schedule.
        hash_sections: config sections that define this run; a change starts a fresh run (old checkpoints kept).
    """

    def __init__(self, *, cfg: ExperimentConfig, stage: str, run_dir: Path, ctx: DistContext,
                 modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                 lr_fns: dict[str, Callable[[int], float]], total_steps: int, hash_sections: Any,
                 seed: int = 0, ema: Optional[EMA] = None, extra_state: Optional[dict[str, Any]] = None):
        self.cfg, self.stage, self.run_dir, self.ctx = cfg, stage, Path(run_dir), ctx
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
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep=self.engine.keep_checkpoints)
        self.config_hash = config_hash(hash_sections)
        self._stop_signal: Optional[int] = None
        self._last_ckpt_time = time.monotonic()
        self.live = None
        self.step_seconds: list[float] = []  # wall time of each successful step_fn call (benchmarks)

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

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            path = self.ckpt.save(self.state_dict(), self.step)
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
                stale = self.ckpt.directory.with_name(f"checkpoints-stale-{found[1].get('config_hash')}")
                log.warning("the config of %s changed since its checkpoints were written; moving them to %s and "
                            "starting afresh", self.run_dir, stale)
                if stale.exists():
                    import shutil
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

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor, inputs: Optional[list[nn.Parameter]] = None, retain_graph: bool = False):
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
        log.error("NaN guard: %s at step %d; rolled back to step %d, learning rates x%g (now x%g), failure %d/%d",
                  exc, bad_step, self.step, self.engine.nan_lr_factor, factor, failures,
                  self.engine.max_nan_failures)
        self.log_metrics({"nan_rollback_to_step": float(self.step), "lr_factor": factor})

    def open_live(self, resumed: bool) -> None:
        if not self.ctx.is_main:
            return
        from dvclive import Live

        self.live = Live(dir=str(self.run_dir / "dvclive"), resume=resumed, save_dvc_exp=False, dvcyaml=None,
                         report=None)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if self.live is None:
            return
        for k, v in metrics.items():
            if v is not None and math.isfinite(v):
                self.live.log_metric(k, v)

    def run(self, step_fn: Callable[[int], dict[str, float]], *, max_steps: Optional[int] = None,
            on_start: Optional[Callable[[], None]] = None) -> dict[str, float]:
        """Run ``step_fn(step)`` from the resumed step to the end of the schedule (or ``max_steps``)."""
        from tqdm import tqdm

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
        bar = tqdm(total=end, initial=self.step, disable=not self.ctx.is_main, desc=f"{self.cfg.name}/{self.stage}",
                   mininterval=1.0 if sys.stderr.isatty() else 15.0, dynamic_ncols=True, file=sys.stderr)
        last: dict[str, float] = {}
        t0 = time.monotonic()
        while self.step < end:
            lrs = self.set_learning_rates()
            t_step = time.perf_counter()
            try:
                metrics = step_fn(self.step)
            except NonFiniteError as exc:
                self._rollback(exc)
                bar.n = self.step
                bar.refresh()
                continue
            self.scaler.update()
            self.step_seconds.append(time.perf_counter() - t_step)
            self.step += 1
            bar.update(1)
            metrics.update({f"lr_{k}": v for k, v in lrs.items()})
            last = metrics
            if self.step % self.engine.log_every_steps == 0 or self.step == end:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "nelbo_nats", "p_loss")})
                self.log_metrics(metrics)
                if self.live is not None:
                    self.live.next_step()
            due_time = time.monotonic() - self._last_ckpt_time > 60 * self.engine.checkpoint_every_minutes
            if self.step % self.engine.checkpoint_every_steps == 0 or due_time or self.step == end:
                self.save_checkpoint()
            if self._stop_signal is not None:
                self.save_checkpoint()
                bar.close()
                log.warning("stopped by signal %d at step %d; rerun the same command to resume", self._stop_signal,
                            self.step)
                raise SystemExit(128 + self._stop_signal)
            _maybe_self_kill(self.step)
        bar.close()
        if self.live is not None:
            self.live.end()
        last["seconds_this_run"] = time.monotonic() - t0
        return last


def _mix_seed(*parts: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> 2)


def _maybe_self_kill(step: int) -> None:
    """Test hook: ``LSGM_TEST_KILL_AT_STEP=N`` makes the process SIGKILL itself right after step N."""
    target = os.environ.get("LSGM_TEST_KILL_AT_STEP")
    if target and int(target) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _poison(x: torch.Tensor, step: int, failures: int) -> torch.Tensor:
    """Test hook: ``LSGM_TEST_POISON=STEP[:TIMES]`` turns that step's batch into NaN while fewer than TIMES
    NaN failures have happened (so a rollback and retry can succeed)."""
    spec = os.environ.get("LSGM_TEST_POISON")
    if not spec:
        return x
    at, _, times = spec.partition(":")
    if step == int(at) and failures < int(times or "1000000"):
        return torch.full_like(x, float("nan"))
    return x


# --------------------------------------------------------------------------------------------- stages
def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)


def _load_train_split(cfg: ExperimentConfig, data_root: Path) -> PreparedSplit:
    split = load_split(data_root, cfg.data.dataset, "train")
    if cfg.data.max_train_images is not None and cfg.data.max_train_images < len(split):
        split = dataclasses.replace(split, images=split.images[: cfg.data.max_train_images])
    return split


def _to_model_input(split: PreparedSplit, idx: torch.Tensor, cfg: ExperimentConfig, gen: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    x = preprocess(split.batch(idx), max_value=split.max_value, binarize=cfg.data.binarize,
                   num_x_bits=cfg.data.num_x_bits, flip=cfg.data.flip, generator=gen)
    x = (2.0 * x - 1.0).to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if cfg.engine.channels_last else x


def _micro_batch_input(loop: TrainLoop, split: PreparedSplit, idx: torch.Tensor, cfg: ExperimentConfig,
                       step: int, gidx: int) -> torch.Tensor:
    """Seed the micro-batch's RNGs, then load, preprocess and move its images (with the NaN test hook)."""
    loop.seed_micro_batch(step, gidx)
    x = _to_model_input(split, idx, cfg, loop.generators["data"], loop.ctx.device)
    return _poison(x, step, loop.nan_failures)


def _write_json(path: Path, obj: dict) -> None:
    import json

    atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), path)


def _groups_per_scale(vae: nn.Module) -> list[int]:
    return list(vae.groups_per_scale)


def _start_stage(cfg: ExperimentConfig, stage: str, tc: Any, run_root: Path, data_root: Path, where: str,
                 detail: str) -> tuple[DistContext, Path, PreparedSplit, BatchPlan, int]:
    """Common start of a training stage: logging, processes, run directory + resolved config, data, batch plan."""
    _setup_logging()
    ctx = setup_distributed(cfg.engine)
    if cfg.engine.keep_cpu_heap and ctx.device.type == "cpu":
        keep_cpu_heap()
    run_dir = Path(run_root) / cfg.name / stage
    if ctx.is_main:
        write_resolved_config(cfg, run_dir)
    split = _load_train_split(cfg, Path(data_root))
    plan = BatchPlan.make(batch_size=tc.batch_size, global_batch_size=tc.global_batch_size,
                          world_size=ctx.world_size, num_items=len(split), where=f"{cfg.name}: {where}")
    total = plan.iters_per_epoch * tc.epochs
    log.info("%s/%s%s: %d images, global batch %d = %d per process x %d processes x %d accumulation; %d steps",
             cfg.name, stage, detail, len(split), plan.global_batch, plan.micro_batch, ctx.world_size,
             plan.accumulation, total)
    return ctx, run_dir, split, plan, total


def train_vae(cfg: ExperimentConfig, run_root: Path = Path("data/runs"), data_root: Path = Path("data/prepared"),
              max_steps: Optional[int] = None) -> Path:
    """Stage 1: the VAE with a standard-Normal prior (spec §1.8). Returns the path of ``model.pt``.

    Loss per image: ``recon + β_KL Σ_l κ_l KL_l`` (KL balancing while β_KL < 1), plus
    ``λ (Σ σ_max(W) + Σ max|γ|)``; Adamax, linear warm-up then cosine decay; resumes automatically.
    """
    tc = cfg.train_vae
    ctx, run_dir, split, plan, total = _start_stage(cfg, "vae", tc, run_root, data_root, "train_vae", "")
    torch.manual_seed(tc.seed)
    vae = prepare_batchnorm(build_vae(cfg), ctx).to(ctx.device)
    if cfg.engine.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    reg = SpectralRegularizer(vae, generator=torch.Generator().manual_seed(tc.seed)).to(ctx.device)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.Adamax(params, lr=tc.learning_rate, eps=tc.adamax_eps, weight_decay=tc.weight_decay,
                             foreach=True)  # multi-tensor kernels also on CPU (same result, fewer ops)
    lr_fn = lambda s: lr_at(s, base=tc.learning_rate, minimum=tc.learning_rate_min,  # noqa: E731
                            warmup_epochs=tc.warmup_epochs, epochs=tc.epochs, iters_per_epoch=plan.iters_per_epoch)
    loop = TrainLoop(cfg=cfg, stage="vae", run_dir=run_dir, ctx=ctx, modules={"vae": vae}, optimizers={"vae": opt},
                     lr_fns={"vae": lr_fn}, total_steps=total, hash_sections=(cfg.data, cfg.vae, tc),
                     seed=tc.seed, extra_state={"spectral": reg})
    order = BatchIterator(len(split), plan.global_batch, shuffle=True, drop_last=True, seed=tc.seed)
    gps = _groups_per_scale(vae)

    def step_fn(step: int) -> dict[str, float]:
        vae.train()
        beta = kl_coeff(step, total, tc.kl_anneal_portion, tc.kl_const_portion, tc.kl_const_coeff, tc.kl_max_coeff)
        sums = {"recon_nats": 0.0, "kl_nats": 0.0, "nelbo_nats": 0.0, "loss": 0.0}
        kl_groups = torch.zeros(sum(gps), device=ctx.device)
        for gidx, idx in plan.micro_batches(order, step, ctx.rank):
            x = _micro_batch_input(loop, split, idx, cfg, step, gidx)
            with loop.autocast():
                out = vae(x, generator=loop.generators["noise"])
                recon = -vae.decoder_log_prob(out.decoder_params.float(), x)
            kl_all = [k.float() for k in out.kl_per_group]
            balanced, _, kl_vals = kl_balancer(kl_all, beta, gps, balance=True)
            loss = (recon + balanced).mean() / plan.accumulation
            loop.backward(loss)
            kl = torch.stack(kl_all, 1).detach().sum(1)
            recon = recon.detach()
            sums["recon_nats"] += recon.mean() / plan.accumulation
            sums["kl_nats"] += kl.mean() / plan.accumulation
            sums["nelbo_nats"] += (recon + kl).mean() / plan.accumulation
            sums["loss"] += loss.detach()
            kl_groups += kl_vals.detach().float() / plan.accumulation
        if tc.weight_decay_norm > 0:  # regulariser once per optimiser step; skipped entirely at λ = 0
            with loop.autocast():
                reg_loss = tc.weight_decay_norm * (reg.loss() + bn_loss(vae))
            loop.backward(reg_loss)
            sums["reg"] = reg_loss.detach()
        sums.update({f"kl_group_{i}": v for i, v in enumerate(kl_groups.unbind())})
        sums = _host_floats(sums)  # one device-to-host copy per step, before the optimiser's own sync
        sums["grad_norm"] = loop.optimizer_step("vae", params)
        opt.zero_grad(set_to_none=True)
        sums["kl_coeff"] = beta
        return sums

    last = loop.run(step_fn, max_steps=max_steps)
    model_path = run_dir / "model.pt"
    if ctx.is_main:
        save_model(model_path, cfg=cfg, stage="vae", vae=_unwrap(vae), prior=None, prior_ema=None,
                   step=loop.step, epoch=loop.step // plan.iters_per_epoch)
        _write_json(run_dir / "metrics.json", _summary(cfg, "vae", loop, plan, ctx, last))
    ctx.close()
    return model_path


def _unwrap(m: nn.Module) -> nn.Module:
    return getattr(m, "module", m)


def _summary(cfg: ExperimentConfig, stage: str, loop: TrainLoop, plan: BatchPlan, ctx: DistContext,
             last: dict[str, float]) -> dict:
    return {
        "experiment": cfg.name, "stage": stage, "steps": loop.step, "total_steps": loop.total_steps,
        "global_batch": plan.global_batch, "per_process_batch": plan.micro_batch, "processes": ctx.world_size,
        "accumulation": plan.accumulation, "nan_failures": loop.nan_failures, "lr_factor": loop.lr_factor,
        "precision": cfg.engine.precision, "device": ctx.device.type,
        "final": {k: v for k, v in last.items() if isinstance(v, float) and math.isfinite(v)},
        "step_seconds": step_time_stats(loop.step_seconds),
    }


def step_time_stats(seconds: list[float], warmup: int = 3) -> Optional[dict[str, float]]:
    """Median/min/max wall time of the steps of this run after the first ``warmup`` (None if there are none)."""
    timed = sorted(seconds[warmup:])
    if not timed:
        return None
    n = len(timed)
    median = timed[n // 2] if n % 2 else 0.5 * (timed[n // 2 - 1] + timed[n // 2])
    return {"median": median, "min": timed[0], "max": timed[-1], "steps": n, "warmup_steps": warmup}


def _inactive_channels(vae: nn.Module, split: PreparedSplit, cfg: ExperimentConfig, stage_cfg, ctx: DistContext,
                       gen: torch.Generator) -> torch.Tensor:
    """Per-channel KL of the top scale averaged over training batches; True where ≤ threshold (spec §3.3)."""
    tc = stage_cfg.train
    vae.eval()
    order = BatchIterator(len(split), tc.batch_size, shuffle=True, drop_last=False, seed=tc.seed,
                          rank=ctx.rank, world_size=ctx.world_size)
    total, count = None, 0
    with torch.no_grad():
        for i, idx in enumerate(order):
            if i >= tc.inactive_max_batches:
                break
            x = _to_model_input(split, idx, cfg, gen, ctx.device)
            out = vae(x, generator=gen)
            n_top = out.top_group_count
            kl = torch.cat([q - p for q, p in zip(out.log_q[:n_top], out.log_p_normal[:n_top])], dim=1)
            kl = kl.sum(dim=(2, 3)).sum(dim=0)
            total = kl if total is None else total + kl
            count += x.shape[0]
    stats = torch.cat([total.double(), torch.tensor([float(count)], dtype=torch.float64, device=total.device)])
    if ctx.world_size > 1:
        dist.all_reduce(stats)
    per_channel = stats[:-1] / stats[-1]
    inactive = per_channel <= tc.inactive_kl_threshold
    log.info("drop_inactive_var: %d of %d latent channels inactive (KL <= %g nats): %s",
             int(inactive.sum()), inactive.numel(), tc.inactive_kl_threshold,
             [round(float(v), 3) for v in per_channel])
    return inactive


def train_lsgm(cfg: ExperimentConfig, stage: str, run_root: Path = Path("data/runs"),
               data_root: Path = Path("data/prepared"), max_steps: Optional[int] = None) -> Path:
    """Stage 2 (and later prior stages): VAE + SGM prior end to end, or a fresh SGM on a frozen VAE (spec §4.5).

    Starts from ``data/runs/EXP/<init_from>/model.pt``; writes ``data/runs/EXP/<stage>/model.pt``.
    """
    from lsgm.objectives import LSGMObjective

    if stage not in cfg.prior:
        raise ValueError(f"{cfg.name}: unknown prior stage {stage!r}; allowed: {list(cfg.prior)}")
    sc = cfg.prior[stage]
    tc = sc.train
    mode = "disjoint" if tc.disjoint else ("joint" if sc.train_vae else "frozen VAE")
    ctx, run_dir, split, plan, total = _start_stage(cfg, stage, tc, run_root, data_root, f"prior.{stage}.train",
                                                    f" ({mode}, p={tc.iw_sample_p}, q={tc.iw_sample_q})")
    init_path = Path(run_root) / cfg.name / sc.init_from / "model.pt"

    torch.manual_seed(tc.seed)
    init = read_model_file(init_path)
    vae = build_vae(cfg)
    vae.load_state_dict(init["vae"])
    vae = prepare_batchnorm(vae, ctx).to(ctx.device)
    prior = build_prior(cfg, stage)
    if sc.load_prior:
        prior.load_state_dict(init["prior_ema"] or init["prior"])
    prior = prior.to(ctx.device)
    if cfg.engine.compile:  # in place: parameter names (and so checkpoints) are unchanged
        prior.backbone.compile()
    eps_fn: Callable = prior
    if cfg.engine.channels_last:  # NHWC kernels for the VAE only (measured: they slow NCSN++ down on CPU)
        vae = vae.to(memory_format=torch.channels_last)
        eps_fn = lambda z, t: prior(z.contiguous(), t)  # noqa: E731
    sde = prior.sde
    objective = LSGMObjective(sde, tc.iw_sample_p, tc.iw_sample_q, sc.sde.time_eps, compat=tc.compat)
    vae_params = [p for p in vae.parameters() if p.requires_grad]
    prior_params = [p for p in prior.parameters() if p.requires_grad]
    optimizers: dict[str, torch.optim.Optimizer] = {
        "prior": _adam(prior_params, lr=tc.learning_rate_score, eps=tc.score_adam_eps, weight_decay=tc.weight_decay,
                       fused=cfg.engine.fused_optimizer)}
    lr_fns = {"prior": lambda s: lr_at(s, base=tc.learning_rate_score, minimum=tc.learning_rate_score_min,
                                       warmup_epochs=tc.warmup_epochs, epochs=tc.epochs,
                                       iters_per_epoch=plan.iters_per_epoch)}
    if sc.train_vae:
        optimizers["vae"] = _adam(vae_params, lr=tc.learning_rate_vae, eps=tc.vae_adam_eps,
                                  weight_decay=tc.weight_decay, fused=cfg.engine.fused_optimizer)
        lr_fns["vae"] = lambda s: lr_at(s, base=tc.learning_rate_vae, minimum=tc.learning_rate_vae_min,
                                        warmup_epochs=tc.warmup_epochs, epochs=tc.epochs,
                                        iters_per_epoch=plan.iters_per_epoch)
    else:
        vae.requires_grad_(False)
    gen_init = torch.Generator().manual_seed(tc.seed)
    extra: dict[str, Any] = {}
    reg_vae = reg_prior = None
    if sc.train_vae and tc.weight_decay_norm_vae > 0:
        reg_vae = extra["spectral_vae"] = SpectralRegularizer(vae, generator=gen_init).to(ctx.device)
    if tc.weight_decay_norm_score > 0:
        reg_prior = extra["spectral_prior"] = SpectralRegularizer(
            prior, include_plain_conv2d=tc.spectral_reg_score_convs, generator=gen_init).to(ctx.device)
    ema = EMA(tc.ema_decay)
    # fast path (issue 7): one B-sized SGM pass for reweight_p_samples; exact given the restricted backward below
    single_pass = tc.iw_sample_q == "reweight_p_samples" and tc.single_pass_joint
    # ... and one backward per micro-batch instead of two (q's CE gradient rides on p's graph, rescaled at z_t)
    single_backward = single_pass and tc.single_backward_joint
    modules = {"vae": vae, "prior": prior}
    loop = TrainLoop(cfg=cfg, stage=stage, run_dir=run_dir, ctx=ctx, modules=modules, optimizers=optimizers,
                     lr_fns=lr_fns, total_steps=total, ema=ema, extra_state=extra, seed=tc.seed,
                     hash_sections=(cfg.data, cfg.vae, sc, sha256_file(init_path)))
    order = BatchIterator(len(split), plan.global_batch, shuffle=True, drop_last=True, seed=tc.seed)

    def on_start() -> None:
        if tc.drop_inactive_var:
            prior.set_inactive_channels(_inactive_channels(vae, split, cfg, sc, ctx, loop.generators["data"]))

    def beta_at(step: int) -> float:
        if not tc.cont_kl_anneal:
            return 1.0
        return kl_coeff(step, total, tc.kl_anneal_portion, 0.0, tc.kl_const_coeff, tc.kl_max_coeff)

    def reg_terms(which: str) -> torch.Tensor:
        if which == "vae":
            return tc.weight_decay_norm_vae * (reg_vae.loss() + bn_loss(vae)) if reg_vae is not None else None
        return tc.weight_decay_norm_score * (reg_prior.loss() + bn_loss(prior)) if reg_prior is not None else None

    def vae_terms(x: torch.Tensor):
        out = vae(x, generator=loop.generators["noise"])
        recon = -vae.decoder_log_prob(out.decoder_params.float(), x)
        n_top = out.top_group_count
        log_q_top = sum(q.float().flatten(1).sum(1) for q in out.log_q[:n_top])
        kl_rest = sum((k.float() for k in out.kl_per_group[n_top:]), torch.zeros_like(recon))
        return out, recon, log_q_top, kl_rest

    def step_fn(step: int) -> dict[str, float]:
        beta = beta_at(step)
        m = {"loss": 0.0, "p_loss": 0.0, "nelbo_nats": 0.0, "recon_nats": 0.0, "cross_entropy_nats": 0.0}
        if not sc.train_vae:  # frozen VAE: only the SGM objective is computed (no NELBO to report)
            m = {"p_loss": 0.0}
        micro = plan.micro_batches(order, step, ctx.rank)
        acc = plan.accumulation
        prior.train()
        if sc.train_vae and not tc.disjoint:  # ---- joint (spec §4.5 joint)
            vae.train()
            for gidx, idx in micro:
                x = _micro_batch_input(loop, split, idx, cfg, step, gidx)
                with loop.autocast():
                    out, recon, log_q_top, kl_rest = vae_terms(x)
                    jl = objective.joint(eps_fn, out.z0_top, loop.generators["noise"], single_pass=single_pass,
                                         ce_coeff=beta if single_backward else None)
                ce = jl.ce_elem.float().flatten(1).sum(1)
                nelbo_q = recon + beta * (log_q_top + ce + kl_rest)
                q_loss = nelbo_q.mean() / acc
                p_loss = jl.p_obj.float().mean() / acc
                if jl.same_objective:
                    loop.backward(q_loss)
                elif jl.ce_grad_in_p:  # ce is a detached value here; its encoder gradient comes through p_obj
                    loop.backward(q_loss + p_loss)
                else:
                    loop.backward(q_loss, inputs=vae_params, retain_graph=True)
                    loop.backward(p_loss, inputs=prior_params)
                m["loss"] += q_loss.detach()
                m["p_loss"] += p_loss.detach()
                m["nelbo_nats"] += (recon + log_q_top + ce + kl_rest).detach().mean() / acc
                m["recon_nats"] += recon.detach().mean() / acc
                m["cross_entropy_nats"] += ce.detach().mean() / acc
            _add_reg(loop, reg_terms("vae"), vae_params, m, "reg_vae")
            _add_reg(loop, reg_terms("prior"), prior_params, m, "reg_prior")
            m["grad_norm_vae"] = loop.optimizer_step("vae", vae_params, tc.grad_clip)
            m["grad_norm_prior"] = loop.optimizer_step("prior", prior_params, tc.grad_clip)
        else:
            latents = []
            if sc.train_vae:  # ---- disjoint, VAE step (spec §4.5 disjoint 1-2)
                vae.train()
                swap = ema.swapped(prior) if tc.update_q_ema else nullcontext()
                with swap:
                    for gidx, idx in micro:
                        x = _micro_batch_input(loop, split, idx, cfg, step, gidx)
                        with loop.autocast():
                            out, recon, log_q_top, kl_rest = vae_terms(x)
                            ce = objective.q_only(eps_fn, out.z0_top, loop.generators["noise"]).float().flatten(1).sum(1)
                        nelbo_q = recon + beta * (log_q_top + ce + kl_rest)
                        q_loss = nelbo_q.mean() / acc
                        loop.backward(q_loss, inputs=vae_params)
                        latents.append(out.z0_top.detach())
                        m["loss"] += q_loss.detach()
                        m["nelbo_nats"] += (recon + log_q_top + ce + kl_rest).detach().mean() / acc
                        m["recon_nats"] += recon.detach().mean() / acc
                        m["cross_entropy_nats"] += ce.detach().mean() / acc
                _add_reg(loop, reg_terms("vae"), vae_params, m, "reg_vae")
                m["grad_norm_vae"] = loop.optimizer_step("vae", vae_params, tc.grad_clip)
            else:  # ---- frozen VAE: latents without gradients (eval-mode BN: no running-stat drift, spec §11.7)
                vae.eval()
                with torch.no_grad():
                    for gidx, idx in micro:
                        x = _micro_batch_input(loop, split, idx, cfg, step, gidx)
                        with loop.autocast():
                            latents.append(vae(x, generator=loop.generators["noise"]).z0_top.detach())
            for (gidx, _), z0 in zip(micro, latents):  # ---- SGM step from detached latents (spec §4.5 disjoint 3)
                loop.seed_micro_batch(step, gidx, phase=1)
                with loop.autocast():
                    p_loss = objective.p_only(eps_fn, z0.float(), loop.generators["noise"]).float().mean() / acc
                loop.backward(p_loss, inputs=prior_params)
                m["p_loss"] += p_loss.detach()
            _add_reg(loop, reg_terms("prior"), prior_params, m, "reg_prior")
            m["grad_norm_prior"] = loop.optimizer_step("prior", prior_params, tc.grad_clip)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        ema.update(prior)
        alpha = torch.sigmoid(prior.mixing_logit.detach().float())
        m.update({"kl_coeff": beta, "mixing_alpha_mean": alpha.mean(), "mixing_alpha_min": alpha.min(),
                  "mixing_alpha_max": alpha.max()})
        return _host_floats(m)  # one device-to-host copy for the step's metrics

    last = loop.run(step_fn, max_steps=max_steps, on_start=on_start)
    model_path = run_dir / "model.pt"
    if ctx.is_main:
        save_model(model_path, cfg=cfg, stage=stage, vae=_unwrap(vae), prior=prior,
                   prior_ema=ema.averaged_state(prior), step=loop.step, epoch=loop.step // plan.iters_per_epoch)
        _write_json(run_dir / "metrics.json", _summary(cfg, stage, loop, plan, ctx, last))
    ctx.close()
    return model_path


def _host_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """A step's metrics as Python floats, with ONE device-to-host copy for all tensor values (not one sync each)."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist() if keys else []
    tensor_values = dict(zip(keys, values))
    return {k: tensor_values[k] if k in tensor_values else float(v) for k, v in metrics.items()}


def _add_reg(loop: TrainLoop, reg: Optional[torch.Tensor], params: list[nn.Parameter], m: dict, name: str) -> None:
    """Back-propagate a regulariser once per optimiser step (not per micro-batch), into ``params`` only."""
    if reg is None:
        return
    loop.backward(reg, inputs=params)
    m[name] = reg.detach()
