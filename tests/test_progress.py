"""Progress of long loops: one line about every 10 % (with ETA) when not on a terminal, a tqdm bar on one."""

from __future__ import annotations

import io
import re

from lsgm.progress import PREFIX, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_about_every_ten_percent_with_eta():
    out = io.StringIO()
    with progress(570, "digits/vae", unit="step", stream=out) as bar:
        for step in range(570):
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix({"loss": f"{1.0 / (step + 1):.3g}"}, refresh=False)
    lines = out.getvalue().splitlines()
    assert all(line.startswith(PREFIX) for line in lines) and "\r" not in out.getvalue()
    done = [int(m.group(1)) for m in (re.search(r" (\d+)/570 step", line) for line in lines)]
    assert done == [0, 57, 114, 171, 228, 285, 342, 399, 456, 513, 570]
    assert re.fullmatch(r"progress: digits/vae: +40% 228/570 step \[\d\d:\d\d elapsed, ETA \d\d:\d\d, .*step/s, "
                        r"loss=.*\]", lines[4]), lines[4]


def test_resumed_runs_and_coarse_updates():
    out = io.StringIO()
    with progress(100, "x", initial=60, stream=out) as bar:
        bar.update(40)
    assert [re.search(r"(\d+)/100", line).group(1) for line in out.getvalue().splitlines()] == ["60", "100"]
    bar = progress(10, "x", stream=io.StringIO())
    assert bar.maxinterval == float("inf"), "tqdm's monitor would switch to a line per step after 10 s"
    bar.close()


def test_a_terminal_gets_a_normal_bar():
    out = _Tty()
    with progress(50, "digits/vae", stream=out) as bar:
        bar.update(50)
    assert PREFIX not in out.getvalue() and "\r" in out.getvalue()
