"""Open the built book in headless Chromium, as a reader would: math typeset by the book's own
MathJax, wide equations scrolling inside their box, every figure loaded, nothing fetched from
another host.

Run after the book is built (`make test` does both). Skipped, with the reason, only where no
Chromium is installed (`make chromium` installs Debian's package when run as root).

How a page is checked: the test's own HTTP server serves ``_build/html`` and appends a small probe
script to every HTML page it serves (the built files are not changed). Once MathJax has typeset the
page, the probe writes what it measured (display-math boxes whose content overflows without a
scrollbar, or that stick out of the text column; images that did not load; MathJax elements; raw
``$$`` left in the text) into the DOM, which Chromium dumps. Every request Chromium makes is read
from its network log, and any host other than the test server fails the page; other hosts are also
made unresolvable, so a page that tried would show missing content in its screenshot. (Chromium's
own background requests, to Google's update and time services, are not the page's and are ignored.)
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=20000",  # scrollbars shown: a wide equation scrolls visibly in screenshots
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
WIDTH = 1280  # a laptop window; the text column is then narrower than the widest equations

PROBE = """
<script>
(function () {
  function textOutsideCode() {
    var main = (document.querySelector("main") || document.body).cloneNode(true);
    main.querySelectorAll("pre, code, .highlight, script, style, mjx-container").forEach(function (e) { e.remove(); });
    return main.textContent || "";
  }
  function report() {
    var out = {overflow: [], broken: [], scrolling: []};
    var boxes = document.querySelectorAll("div.math, mjx-container[display='true']");
    out.display_math = boxes.length;
    boxes.forEach(function (el) {
      var name = el.id || (el.closest("div.math") || {}).id || el.tagName;
      var ox = getComputedStyle(el).overflowX;
      if (el.scrollWidth > el.clientWidth + 1) {
        if (ox !== "auto" && ox !== "scroll") {
          out.overflow.push(name + ": content " + el.scrollWidth + "px in a " + el.clientWidth + "px box, overflow-x " + ox);
        } else {
          out.scrolling.push(name);
        }
      }
      var column = el.closest("article") || el.closest("main");
      if (column && el.getBoundingClientRect().right > column.getBoundingClientRect().right + 1) {
        out.overflow.push(name + ": box ends past the text column");
      }
    });
    out.mjx = document.querySelectorAll("mjx-container").length;
    out.raw_dollars = (textOutsideCode().match(/\\$\\$/g) || []).length;
    var imgs = Array.prototype.slice.call(document.images);
    out.images = imgs.length;
    imgs.forEach(function (i) { if (!(i.complete && i.naturalWidth > 0)) out.broken.push(i.getAttribute("src")); });
    var pre = document.createElement("pre");
    pre.id = "rlbook-probe";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener("load", function () {
    var ready = (window.MathJax && MathJax.startup && MathJax.startup.promise) || Promise.resolve();
    ready.then(function () { setTimeout(report, 200); });
  });
})();
</script>
"""


class _ProbingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the built book; HTML pages get the probe appended before ``</body>``."""

    def log_message(self, *args):  # quiet
        pass

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        if path.suffix != ".html" or not path.exists():
            return super().send_head()
        body = path.read_bytes().replace(b"</body>", PROBE.encode() + b"</body>", 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        import io

        return io.BytesIO(body)


@pytest.fixture(scope="module")
def server():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (make chromium installs Debian's package as root)")
    if not (HTML / "index.html").exists():
        pytest.fail("the book is not built: run `make book-html` (or `make book`) first")
    handler = functools.partial(_ProbingHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def _requested_hosts(netlog: Path) -> set[str]:
    """Hosts of every request the *page* made, from Chromium's network log. A request belongs to
    the page when its network isolation key is the page's site (http://127.0.0.1); Chromium's own
    background requests (time, updates, accounts: keyed "null null" or by Google's site) are not
    the book's and are left out."""
    log = json.loads(netlog.read_text(errors="replace"))
    hosts = set()
    for event in log.get("events", []):
        params = event.get("params") or {}
        if "url" in params and str(params.get("network_isolation_key", "")).startswith("http://127.0.0.1"):
            m = re.match(r"^[a-z]+://([^/:]+)", params["url"])
            if m:
                hosts.add(m.group(1))
    return hosts


def _probe(server: str, page: str, tmp_path: Path, screenshot: bool = False) -> dict:
    url = f"{server}/{page}"
    if screenshot:
        SHOTS.mkdir(parents=True, exist_ok=True)
        shot = SHOTS / (page.replace("/", "_").removesuffix(".html") + ".png")
        _chromium(tmp_path, f"--window-size={WIDTH},1600", f"--screenshot={shot}", url)
        assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot of {page}"
    netlog = tmp_path / f"{page.replace('/', '_')}.netlog.json"
    dom = _chromium(tmp_path, f"--window-size={WIDTH},1600", f"--log-net-log={netlog}", "--dump-dom", url).stdout
    m = re.search(r'<pre id="rlbook-probe"[^>]*>(.*?)</pre>', dom, re.S)  # the theme adds a tabindex
    assert m, f"{page}: the probe never reported (did the page finish loading?)"
    import html as html_mod

    result = json.loads(html_mod.unescape(m.group(1)))
    result["hosts"] = sorted(_requested_hosts(netlog) - {"127.0.0.1"})
    result["dom"] = dom
    return result


def _toc_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]] + [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    return [f"{p}.html" for p in pages]


def _first_page_of_each_part() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [f"{part['chapters'][0]['file']}.html" for part in toc["parts"]]


def _has_math(page: str) -> bool:
    text = (HTML / page).read_text()
    return 'class="math' in text


@pytest.mark.parametrize("page", _toc_pages())
def test_page_math_fits_and_nothing_comes_from_another_host(server, tmp_path, page):
    """Every page: display math scrolls rather than being cut, images load, no other host."""
    r = _probe(server, page, tmp_path, screenshot=page in _first_page_of_each_part())
    assert r["hosts"] == [], f"{page} requested other hosts: {r['hosts']}"
    assert r["overflow"] == [], f"{page}: display math cut at the edge: {r['overflow']}"
    assert r["broken"] == [], f"{page}: images that did not load: {r['broken']}"
    if _has_math(page):
        assert r["mjx"] > 0, f"{page}: MathJax did not typeset the page"
        assert r["raw_dollars"] == 0, f"{page}: raw $$ left in the text"


def test_intro_page_typesets_math_with_the_books_own_mathjax(server, tmp_path):
    r = _probe(server, "book/intro.html", tmp_path)
    assert r["mjx"] > 0, "MathJax did not typeset the intro page"
    assert "mathjax/es5/tex-chtml.js" in r["dom"], "MathJax must come from the book's own static files"


def test_chapter_pages_show_numbered_math_and_figures(server, tmp_path):
    pages = [p for p in _toc_pages() if p.startswith("notebooks/") and "_images/" in (HTML / p).read_text()]
    assert pages, "no chapter page with figures in the built book"
    r = _probe(server, pages[0], tmp_path)
    assert r["mjx"] >= 3 and r["images"] > 0 and r["broken"] == []
    # equations are numbered per chapter: notebooks/NN_x shows (N.1), (N.2), ...
    chapter = int(Path(pages[0]).name.split("_")[0])
    numbers = re.findall(r'<span class="eqno">\((\d+)\.(\d+)\)', (HTML / pages[0]).read_text())
    if numbers:
        assert {int(c) for c, _ in numbers} == {chapter}
        assert [int(n) for _, n in numbers] == list(range(1, len(numbers) + 1))


def test_wide_equation_of_chapter_08_scrolls_in_its_box(server, tmp_path):
    """The clipped-surrogate equation of chapter 08 is wider than the column at this width:
    its box must scroll (the overflow check of every page would catch it being cut)."""
    page = "notebooks/08_grpo.html"
    if not (HTML / page).exists():
        pytest.skip("chapter 08 is not in the build")
    r = _probe(server, page, tmp_path)
    assert r["display_math"] > 0 and r["overflow"] == []
    assert r["scrolling"], f"no equation of {page} is wider than its box at {WIDTH} px: the check checks nothing"
