"""Progress of long loops (training steps, ODE sampling, NLL evaluation): tqdm, in a terminal or as log lines.

* Interactive (stderr is a terminal): a normal tqdm bar.
* Otherwise (a log file, a pipe: Snakemake jobs, Slurm jobs, DVC stages): one complete line about every 10 % of the
  work, ``progress: digits/lsgm:  40% 228/570 step [01:02 elapsed, ETA 01:33, 3.66step/s, loss=20.8]`` (tqdm's
  counters and rate), so a log holds readable lines instead of carriage returns. Snakemake's rules pass the
  lines that start with :data:`PREFIX` on to the terminal (``lsgm.pipeline.SNAKEMAKE_LOG``), the log keeps all.
"""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["PREFIX", "progress"]

PREFIX = "progress: "
_STEPS = 10  # lines per loop when not on a terminal (about every 10 %)
_LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed} elapsed, ETA {remaining}, {rate_fmt}{postfix}]"


class _Lines:
    """A file for tqdm that turns its carriage-return status updates into ``progress: ...`` lines."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._last = ""

    def write(self, s: str) -> None:
        text = s.replace("\r", "").strip()
        counts = text.split(" [", 1)[0]  # "desc: 40% 228/570": closing the bar repeats the last one
        if text and counts != self._last:
            self._last = counts
            self.stream.write(PREFIX + text + "\n")
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


def progress(total: int, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
             stream: TextIO | None = None) -> Any:
    """A tqdm bar over ``total`` units (a context manager; ``update``, ``set_postfix(refresh=False)``, ``close``).

    Args:
        total: units of work (optimiser steps, images).
        desc: what runs, e.g. ``digits/lsgm`` or ``sample digits``.
        unit: unit name shown in the rate.
        initial: units already done (a resumed run).
        disable: no output (e.g. ranks other than 0).
        stream: where to write (default ``sys.stderr``, read at call time).
    """
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=stream,
                    mininterval=1.0, dynamic_ncols=True)
    every = max(1, math.ceil(max(total - initial, 1) / _STEPS))
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=_Lines(stream),
                miniters=every, mininterval=0, maxinterval=math.inf, smoothing=0, bar_format=_LINE_FORMAT)
    # maxinterval=inf: tqdm's monitor thread would otherwise drop miniters to 1 after 10 s without a line
