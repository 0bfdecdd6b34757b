"""Open the built book in headless Chromium: math is typeset by the book's own MathJax, figures show.

Run after the book is built (`make test` does both). Skipped, with the reason, only where no
Chromium is installed (`make chromium` installs Debian's package when run as root).
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=20000",
]


@pytest.fixture(scope="module")
def server():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (make chromium installs Debian's package as root)")
    if not (HTML / "index.html").exists():
        pytest.fail("the book is not built: run `make book-html` (or `make book`) first")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(HTML))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / "profile"
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _render(server: str, page: str, tmp_path: Path) -> str:
    SHOTS.mkdir(parents=True, exist_ok=True)
    url = f"{server}/{page}"
    shot = SHOTS / (page.replace("/", "_").removesuffix(".html") + ".png")
    _chromium(tmp_path, "--window-size=1280,1600", f"--screenshot={shot}", url)
    assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot of {page}"
    return _chromium(tmp_path, "--dump-dom", url)


def _external_sources(dom: str) -> list[str]:
    srcs = re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", dom) + re.findall(
        r"<link[^>]*rel=\"stylesheet\"[^>]*href=\"([^\"]+)\"", dom)
    return [s for s in srcs if re.match(r"^(https?:)?//", s) and "127.0.0.1" not in s]


def _chapter_with_figures() -> str:
    for page in sorted((HTML / "notebooks").glob("*.html")):
        text = page.read_text()
        if "_images/" in text and ("math" in text):
            return f"notebooks/{page.name}"
    pytest.fail("no chapter page with figures and math in the built book")


def test_intro_page_typesets_math_offline(server, tmp_path):
    dom = _render(server, "book/intro.html", tmp_path)
    assert "<mjx-container" in dom, "MathJax did not typeset the intro page"
    assert "mathjax/es5/tex-chtml.js" in dom, "MathJax must come from the book's own _static"
    assert _external_sources(dom) == []


def test_chapter_page_shows_math_and_figures(server, tmp_path):
    page = _chapter_with_figures()
    dom = _render(server, page, tmp_path)
    assert dom.count("<mjx-container") >= 3, f"math not typeset on {page}"
    images = re.findall(r"<img[^>]*src=\"([^\"]*_images/[^\"]+\.png)\"", dom)
    assert images, f"no figures on {page}"
    for src in images:
        assert (HTML / "notebooks" / src).resolve().exists(), f"figure {src} missing from the build"
    assert _external_sources(dom) == []
