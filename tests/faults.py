"""Fault injection for the engine's tests: run the real ``lsgm`` CLI in this process with faults installed at the
engine's two seams (:meth:`lsgm.engine.TrainLoop.end_step`, :meth:`lsgm.engine.TrainLoop.micro_batch`).

    python tests/faults.py [--kill-after-step N] [--poison STEP[:TIMES]] [--poison-weights STEP[:TIMES]]
                           [--kill-during-checkpoint N] [--kill-before-model] -- VERB ARGS...

* ``--kill-after-step N``: the process SIGKILLs itself right after step N is complete (after its logging and any
  checkpoint that step writes), like a node dying.
* ``--poison STEP[:TIMES]``: that step's micro-batches turn into NaN while fewer than TIMES NaN failures have
  happened (so a rollback and retry can succeed; without TIMES it never stops).
* ``--poison-weights STEP[:TIMES]``: after that step's optimiser updates, one weight becomes NaN (the loss of the
  step stays finite: only the weights are poisoned), while fewer than TIMES NaN failures have happened.
* ``--kill-during-checkpoint N``: SIGKILL in the middle of writing the N-th checkpoint file of this process (half
  its bytes are in the temp file; nothing renamed), like a node dying during a write.
* ``--kill-before-model``: SIGKILL after the last checkpoint, just before ``model.pt`` is written.

Production code has no test hooks; this module monkeypatches the seams before calling :func:`lsgm.cli.main`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def install(kill_after_step: int | None = None, poison: tuple[int, int] | None = None,
            poison_weights: tuple[int, int] | None = None, kill_during_checkpoint: int | None = None,
            kill_before_model: bool = False) -> None:
    """Wrap the engine's seams with the requested faults."""
    import torch

    from lsgm import checkpoint, engine, models

    if kill_after_step is not None:
        end_step = engine.TrainLoop.end_step

        def killing_end_step(self, metrics, end, bar):
            end_step(self, metrics, end, bar)
            if self.step == kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)

        engine.TrainLoop.end_step = killing_end_step
    if poison is not None:
        at, times = poison
        micro_batch = engine.TrainLoop.micro_batch

        def poisoned_micro_batch(self, split, idx, step, index, **kwargs):
            x = micro_batch(self, split, idx, step, index, **kwargs)
            if step == at and self.nan_failures < times:
                return torch.full_like(x, float("nan"))
            return x

        engine.TrainLoop.micro_batch = poisoned_micro_batch
    if poison_weights is not None:
        at_w, times_w = poison_weights
        optimizer_step = engine.TrainLoop.optimizer_step

        def poisoning_optimizer_step(self, name, params, grad_clip=0.0):
            norm = optimizer_step(self, name, params, grad_clip)
            if self.step == at_w and self.nan_failures < times_w:
                with torch.no_grad():
                    params[0].view(-1)[0] = float("nan")
            return norm

        engine.TrainLoop.optimizer_step = poisoning_optimizer_step
    if kill_during_checkpoint is not None:
        write_bytes = checkpoint.atomic_write_bytes
        count = {"ckpt": 0}

        def dying_write(data, path):
            if str(path).endswith(".pt") and "ckpt-" in str(path):
                count["ckpt"] += 1
                if count["ckpt"] == kill_during_checkpoint:
                    from lsgm.atomic import atomic_path
                    with atomic_path(path) as tmp:
                        tmp.write_bytes(data[: len(data) // 2])
                        os.kill(os.getpid(), signal.SIGKILL)
            return write_bytes(data, path)

        checkpoint.atomic_write_bytes = dying_write
    if kill_before_model:
        def dying_save_model(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        models.save_model = dying_save_model  # the engine imports it when it writes model.pt


def _step_times(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    at, _, times = spec.partition(":")
    return int(at), int(times or "1000000")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: faults.py [--kill-after-step N] [--poison STEP[:TIMES]] -- VERB ARGS...")
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="faults.py")
    ap.add_argument("--kill-after-step", type=int, default=None)
    ap.add_argument("--poison", default=None)
    ap.add_argument("--poison-weights", default=None)
    ap.add_argument("--kill-during-checkpoint", type=int, default=None)
    ap.add_argument("--kill-before-model", action="store_true")
    args = ap.parse_args(argv[:split])
    install(args.kill_after_step, _step_times(args.poison), _step_times(args.poison_weights),
            args.kill_during_checkpoint, args.kill_before_model)
    from lsgm.cli import main as lsgm_main

    return lsgm_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
