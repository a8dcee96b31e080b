"""Headless Chromium (the Debian package) for tests: open a Snakemake report, show one result, screenshot it.

The Snakemake report is a single HTML page (React) with every result embedded as a data URI in the global
``results`` and its ``app`` object switching views (what a click does). :func:`show_result` loads a copy of the page
with a small script that, after load, calls ``app.setView`` exactly as the result's "eye" button does, then records
what the page shows (the displayed ``<img>``'s natural size, or the ``<iframe>`` holding an HTML result) in a
``<pre id="lsgm-check">`` element; Chromium then writes a screenshot and the DOM.

Chromium missing: the caller skips, except in CI (``CI`` set), where that is a failure (``.ci/run`` installs it).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

_PROBE = """<script>
window.addEventListener('load', function () {
  setTimeout(function () {
    var path = decodeURIComponent(location.hash.slice(1));
    var r = results[path];
    var out = {path: path, found: !!r};
    if (r) {
      var kind = r.mime_type === 'text/html' ? 'html' : 'img';
      app.setView({navbarMode: 'resultinfo', resultPath: path, content: kind, contentPath: r.data_uri});
    }
    setTimeout(function () {
      if (r) {
        var img = Array.from(document.querySelectorAll('img')).find(function (i) { return i.src === r.data_uri; });
        var frame = Array.from(document.querySelectorAll('iframe')).find(function (f) { return f.src === r.data_uri; });
        out.img = img ? [img.naturalWidth, img.naturalHeight] : null;
        out.iframe = !!frame;
        out.caption = document.body.innerText.indexOf(r.caption.replace(/<[^>]+>/g, '').slice(0, 40)) >= 0;
      }
      var m = document.createElement('pre');
      m.id = 'lsgm-check';
      m.textContent = JSON.stringify(out);
      document.body.appendChild(m);
    }, 800);
  }, 300);
});
</script>"""


def chromium() -> Optional[str]:
    """The Chromium binary, or None. Without it a test skips outside CI and fails in CI."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is not installed; in CI `.ci/run` installs the Debian package chromium")
    pytest.skip("headless Chromium is not installed (apt-get install -y chromium); required in CI")
    return None


def report_data(report_html: Path) -> tuple[dict, dict]:
    """The report's embedded ``results`` (path -> entry with ``data_uri``, ``mime_type``, ``caption``) and
    ``categories`` (category -> subcategory -> paths)."""
    text = report_html.read_text()
    results = re.search(r'<script id="results">\s*var results = (.*?);\s*</script>', text, re.S)
    categories = re.search(r'<script id="categories">\s*var categories = (.*?);\s*</script>', text, re.S)
    assert results and categories, f"{report_html}: no embedded results/categories (not a Snakemake report?)"
    return json.loads(results.group(1)), json.loads(categories.group(1))


def data_uri_bytes(uri: str) -> bytes:
    head, _, payload = uri.partition(",")
    return base64.b64decode(payload) if ";base64" in head else payload.encode()


@dataclass
class Shown:
    """What the page showed for one result."""

    check: dict
    screenshot: Path


def _run(browser: str, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def show_result(browser: str, report_html: Path, result: str, out_dir: Path, size: str = "1600,1000") -> Shown:
    """Open ``report_html`` in headless Chromium showing ``result`` (a key of ``results``); screenshot + checks."""
    text = report_html.read_text()
    end = text.rfind("</body>")  # the last one: the page's scripts contain the string too
    page = out_dir / "report_view.html"
    page.write_text(text[:end] + _PROBE + text[end:])
    url = page.resolve().as_uri() + "#" + result
    shot = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", result) + ".png")
    proc = _run(browser, [f"--window-size={size}", f"--screenshot={shot}", url])
    assert shot.is_file(), f"no screenshot of {result}: {proc.stderr[-2000:]}"
    dom = _run(browser, ["--dump-dom", url]).stdout
    m = re.search(r'<pre id="lsgm-check">([^<]*)</pre>', dom)
    assert m, f"the report page did not run its script for {result}: {dom[-2000:]}"
    import html

    return Shown(json.loads(html.unescape(m.group(1))), shot)


def ink_fraction(png: Path, box: tuple[int, int, int, int]) -> float:
    """Fraction of pixels in ``box`` (left, top, right, bottom) that are not near-white: 0 for a blank area."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("L").crop(box), dtype=np.float64)
    return float((img < 235).mean())
