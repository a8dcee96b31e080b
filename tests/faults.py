"""Fault injection for the engine's tests: run the real ``lsgm`` CLI in this process with faults installed at the
engine's two seams (:meth:`lsgm.engine.TrainLoop.end_step`, :meth:`lsgm.engine.TrainLoop.micro_batch`).

    python tests/faults.py [--kill-after-step N] [--poison STEP[:TIMES]] -- VERB ARGS...

* ``--kill-after-step N``: the process SIGKILLs itself right after step N is complete (after its logging and any
  checkpoint that step writes), like a node dying.
* ``--poison STEP[:TIMES]``: that step's micro-batches turn into NaN while fewer than TIMES NaN failures have
  happened (so a rollback and retry can succeed; without TIMES it never stops).

Production code has no test hooks; this module monkeypatches the seams before calling :func:`lsgm.cli.main`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def install(kill_after_step: int | None = None, poison: tuple[int, int] | None = None) -> None:
    """Wrap the engine's seams with the requested faults."""
    import torch

    from lsgm import engine

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

        def poisoned_micro_batch(self, split, idx, step, index):
            x = micro_batch(self, split, idx, step, index)
            if step == at and self.nan_failures < times:
                return torch.full_like(x, float("nan"))
            return x

        engine.TrainLoop.micro_batch = poisoned_micro_batch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: faults.py [--kill-after-step N] [--poison STEP[:TIMES]] -- VERB ARGS...")
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="faults.py")
    ap.add_argument("--kill-after-step", type=int, default=None)
    ap.add_argument("--poison", default=None)
    args = ap.parse_args(argv[:split])
    poison = None
    if args.poison:
        at, _, times = args.poison.partition(":")
        poison = (int(at), int(times or "1000000"))
    install(args.kill_after_step, poison)
    from lsgm.cli import main as lsgm_main

    return lsgm_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
