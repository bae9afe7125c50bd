"""Open the built documentation in headless Chromium and check what a reader sees.

The pages are served on the loopback interface, and Chromium resolves no other
host, as for a reader without network access. Every formula must be typeset by
the MathJax that the documentation ships, with its fonts, and no raw LaTeX may
remain.

By default the tests build the documentation themselves, with warnings as errors
and without running the tutorials (``test_tutorials.py`` runs them). With
``CURVLINOPS_DOCS_HTML`` pointing to a complete build (``make docs-check`` does
this for ``docs/_build/html``), they also check the tutorials' rendered output
and their gallery thumbnails.

Without Chromium (Debian's package ``chromium``; ``$CHROMIUM`` names another
binary) or the docs extras, the tests are skipped, except under CI (``CI`` set)
and in ``make docs-check``, where they fail.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from html import unescape
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.util import find_spec
from pathlib import Path
from threading import Thread

import pytest

ROOT = Path(__file__).parents[1]
TUTORIALS = sorted(p.stem for p in (ROOT / "docs" / "examples").glob("example_*.py"))
# offline and quiet: no background requests, no host but the loopback one
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=30000",  # let MathJax finish before the DOM is read
]


def require(condition: bool, reason: str):
    """Skip the test if ``condition`` fails, or fail it under CI or docs-check."""
    if not condition:
        if os.environ.get("CI") or os.environ.get("CURVLINOPS_DOCS_HTML"):
            pytest.fail(f"{reason} (required under CI and by make docs-check)")
        pytest.skip(reason)


def find_chromium() -> str | None:
    """Return the path of Chromium (``$CHROMIUM``, or a usual name), or ``None``."""
    names = [os.environ.get("CHROMIUM"), "chromium", "chromium-browser"]
    paths = [shutil.which(name) for name in names + ["google-chrome"] if name]
    return next((path for path in paths if path), None)


def quick_build(destination: Path) -> Path:
    """Build the documentation from a copy of ``docs`` without running tutorials.

    The copy keeps sphinx-gallery's generated files out of ``docs``, where they
    would pass for those of a complete build.

    Returns:
        The folder of the HTML pages.
    """
    source, html = destination / "docs", destination / "html"
    generated = shutil.ignore_patterns(
        "_build",
        "auto_examples",
        "gen_modules",
        "sg_execution_times.rst",
        "__pycache__",
    )
    shutil.copytree(ROOT / "docs", source, ignore=generated)
    vendor = ROOT / "docs" / "_build" / "_vendor"
    if vendor.is_dir():  # MathJax, fetched already
        shutil.copytree(vendor, source / "_build" / "_vendor")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q"]
    command += ["-b", "html", "-D", "plot_gallery=0", str(source), str(html)]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"The docs build failed:\n{result.stderr[-5000:]}"
    return html


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Return the folder of the built pages."""
    given = os.environ.get("CURVLINOPS_DOCS_HTML")
    if given:
        html = Path(given)
        assert (html / "index.html").is_file(), f"No built documentation in {html}."
        return html
    missing = [m for m in ["sphinx", "sphinx_gallery", "furo"] if not find_spec(m)]
    require(not missing, f"the docs extras are not installed: {missing}")
    vendored = (ROOT / "docs" / "_build" / "_vendor" / "mathjax").is_dir()
    require(vendored or shutil.which("npm"), "npm (to fetch MathJax) is missing")
    return quick_build(tmp_path_factory.mktemp("docs"))


# Loads a page in a frame of a desktop browser window's size and lists the code
# blocks that need a horizontal scroll bar there.
WIDTH_PROBE = """<!DOCTYPE html><html><body>
<iframe id="page" src="/{page}" width="1400" height="900"></iframe>
<script>
document.getElementById("page").addEventListener("load", (event) => {{
  const blocks = [...event.target.contentDocument.querySelectorAll("pre")];
  const wide = blocks.filter((pre) => pre.scrollWidth > pre.clientWidth + 1);
  const starts = wide.map((pre) => pre.textContent.slice(0, 60));
  document.body.dataset.wide = JSON.stringify(starts);
}});
</script></body></html>"""
PROBE_PATH = "/__width_probe__/"


class RecordingHandler(SimpleHTTPRequestHandler):
    """Serve files and the width probe; record ``(path, status)`` of requests."""

    def do_GET(self):
        """Serve the width probe of a page, or a file."""
        if not self.path.startswith(PROBE_PATH):
            return super().do_GET()
        body = WIDTH_PROBE.format(page=self.path[len(PROBE_PATH) :]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        """Record the request instead of printing it."""
        self.server.requests.append((self.path, int(code)))

    def log_message(self, format, *args):
        """Print nothing."""


@pytest.fixture(scope="module")
def server(site):
    """Serve the built pages on the loopback interface; yield the server."""
    handler = partial(RecordingHandler, directory=str(site))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        httpd.requests = []
        Thread(target=httpd.serve_forever, daemon=True).start()
        yield httpd
        httpd.shutdown()


def render(url: str, profile: Path) -> str:
    """Return the DOM of a page after Chromium has run its scripts."""
    command = [
        find_chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--dump-dom",
    ]
    result = subprocess.run(
        [*command, url], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, f"Chromium failed on {url}:\n{result.stderr}"
    return result.stdout


def render_all(urls: list[str], profiles: Path) -> list[str]:
    """Render pages with a few Chromium processes at a time; return their DOMs."""
    jobs = [(url, profiles / str(i)) for i, url in enumerate(urls)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda job: render(*job), jobs))


def pages_with_math(html: Path) -> list[str]:
    """Return the pages (relative paths) whose source contains formulas."""
    return sorted(
        str(page.relative_to(html))
        for page in html.rglob("*.html")
        if 'class="math notranslate' in page.read_text()
    )


@pytest.fixture(scope="module")
def rendered(site, server, tmp_path_factory) -> dict[str, str]:
    """Render every page with formulas in Chromium; return their DOMs by page."""
    require(find_chromium() is not None, "Chromium is not installed")
    pages = pages_with_math(site)
    port = server.server_address[1]
    urls = [f"http://127.0.0.1:{port}/{page}" for page in pages]
    doms = render_all(urls, tmp_path_factory.mktemp("chromium"))
    return dict(zip(pages, doms))


class MathReport(HTMLParser):
    """Collect formulas, typeset formulas, MathJax errors and raw LaTeX."""

    RAW_LATEX = re.compile(r"\\\(|\\\)|\\\[|\\\]")

    def __init__(self):
        """Start with empty counts."""
        super().__init__()
        self.stack: list[tuple[str, bool]] = []  # (tag, opens a formula)
        self.formulas = self.typeset = self.errors = 0
        self.raw: list[str] = []

    def handle_starttag(self, tag, attrs):
        """Count formulas, MathJax output and MathJax error boxes."""
        classes = (dict(attrs).get("class") or "").split()
        is_formula = tag in ("span", "div") and {"math", "notranslate"} <= set(classes)
        self.formulas += is_formula
        if tag == "mjx-container" and self.stack and self.stack[-1][1]:
            self.typeset += 1
        self.errors += tag == "mjx-merror"
        self.stack.append((tag, is_formula))

    def handle_endtag(self, tag):
        """Close the innermost open element of this tag."""
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        """Record text that still holds LaTeX delimiters."""
        if not any(tag in ("script", "style") for tag, _ in self.stack):
            self.raw += [data.strip()[:80]] if self.RAW_LATEX.search(data) else []


def math_report(dom: str) -> MathReport:
    """Parse a rendered page into a :class:`MathReport`."""
    report = MathReport()
    report.feed(dom)
    return report


def typesetting_problems(rendered: dict[str, str]) -> list[str]:
    """Return what is wrong with the formulas of the rendered pages."""
    problems = []
    if len(rendered) < 5:
        problems.append(f"too few pages with formulas: {sorted(rendered)}")
    for page, dom in rendered.items():
        report = math_report(dom)
        if report.formulas == 0 or report.typeset < report.formulas:
            problems.append(f"{page}: {report.typeset} of {report.formulas} typeset")
        if report.errors:
            problems.append(f"{page}: {report.errors} MathJax error(s)")
        if report.raw:
            problems.append(f"{page}: raw LaTeX {report.raw[:3]}")
    return problems


def serving_problems(html: Path, requests: list[tuple[str, int]]) -> list[str]:
    """Return failed requests, and pages that load anything from elsewhere."""
    problems = [
        f"{path}: HTTP {code}"
        for path, code in requests
        if code >= 400 and path != "/favicon.ico"  # asked for by Chromium itself
    ]
    fetched = [path for path, _ in requests]
    for wanted in ["_static/mathjax/tex-chtml.js", "_static/mathjax/output/chtml/"]:
        if not any(wanted in path for path in fetched):  # paths end in ?v=hash
            problems.append(f"nothing fetched from {wanted}")
    external = re.compile(r"<(?:script|link)[^>]+(?:src|href)=\"(?:https?:)?//")
    for page in html.rglob("*.html"):
        if external.search(page.read_text()):
            problems.append(f"{page.relative_to(html)} loads a file from a URL")
    return problems


def width_problems(server, profiles: Path) -> list[str]:
    """Return the code blocks that need a horizontal scroll bar at 1400px."""
    pages = ["index.html", "coming_from_3x.html", "internals.html"]
    pages += [f"auto_examples/{tutorial}.html" for tutorial in TUTORIALS]
    port = server.server_address[1]
    urls = [f"http://127.0.0.1:{port}{PROBE_PATH}{page}" for page in pages]
    problems = []
    for page, dom in zip(pages, render_all(urls, profiles)):
        match = re.search(r'data-wide="([^"]*)"', dom)
        wide = json.loads(unescape(match.group(1))) if match else ["(no probe)"]
        problems += [f"{page}: code block {block!r} is too wide" for block in wide]
    return problems


def test_docs_in_a_browser(site, server, rendered, tmp_path):
    """Formulas typeset offline, everything served, code blocks fit the window.

    One test, so that the pages are built and rendered once per test run, even
    when pytest-xdist spreads tests over processes.
    """
    problems = typesetting_problems(rendered)
    problems += serving_problems(site, server.requests)
    problems += width_problems(server, tmp_path)
    assert not problems, "\n".join(problems)


def test_math_report_sees_raw_and_typeset_formulas():
    """The parser tells raw LaTeX (MathJax missing) from typeset formulas."""
    raw = math_report(
        '<p><span class="math notranslate nohighlight">\\(x\\)</span></p>'
    )
    assert (raw.formulas, raw.typeset, len(raw.raw)) == (1, 0, 1)
    typeset = math_report(
        '<span class="math notranslate nohighlight"><mjx-container>'
        "<mjx-math><mjx-merror></mjx-merror></mjx-math></mjx-container></span>"
    )
    assert (typeset.formulas, typeset.typeset, typeset.errors) == (1, 1, 1)
    assert not typeset.raw


def complete_build() -> Path:
    """Return the folder of a build whose tutorials ran, or skip."""
    if not os.environ.get("CURVLINOPS_DOCS_HTML"):
        pytest.skip(
            "needs a complete build (the quick one does not run the tutorials): "
            "set CURVLINOPS_DOCS_HTML, as make docs-check does"
        )
    return Path(os.environ["CURVLINOPS_DOCS_HTML"])


def test_tutorial_outputs_show_no_default_reprs():
    html, shown = complete_build(), {}
    for tutorial in TUTORIALS:
        page = (html / "auto_examples" / f"{tutorial}.html").read_text()
        outputs = re.findall(r'class="sphx-glr-script-out.*?</pre>', page, flags=re.S)
        reprs = [m for out in outputs for m in re.findall(r".{0,50}object at 0x", out)]
        shown.update({tutorial: reprs} if reprs else {})
    assert not shown, f"Default reprs in the rendered output: {shown}"


def test_thumbnails_are_first_figures():
    images = complete_build() / "_images"
    for tutorial in TUTORIALS:
        assert (images / f"sphx_glr_{tutorial}_001.png").is_file(), tutorial
        assert (images / f"sphx_glr_{tutorial}_thumb.png").is_file(), tutorial
