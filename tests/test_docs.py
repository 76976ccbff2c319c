"""The documentation: the site builds with warnings as errors, and every Python block runs.

One ``sphinx-build -W`` of ``docs/`` (a module fixture, about half a minute on 2 cores) checks
that every zojax reference resolves, the API tables are filled, math is served from the build
(no CDN) and the executed page ran. Every ```` ```python ```` block of the README and of the
pages runs here, each page's blocks in order in one namespace; a block followed by "prints
`...`" must print exactly that. What does not run here, and why:

- ``docs/getting_started.md``: its ``{code-cell}`` blocks are executed by the site build itself;
- ``docs/guides/natural.md``: ``tests/zojax/test_natural.py::test_the_docs_example_trains``
  runs its example and checks the printed accuracy within ±0.02;
- blocks of another language (:data:`NOT_RUN`): shell commands (installs, and the experiment
  and benchmark commands, minutes to hours each), the results.json schema, the citations;
- the analysis notebooks under ``notebooks/`` are rendered on the site without being executed
  (they read a finished experiment's workdir).
"""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # scheduled first (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_SKIPPED_DIRS = {"_build", "generated", "jupyter_execute", "notebooks", "_templates"}
PAGES = sorted(p for p in DOCS.rglob("*.md")
               if not _SKIPPED_DIRS & set(p.relative_to(DOCS).parts))
EXECUTED_BY_THE_BUILD = {"docs/getting_started.md"}
RUN_ELSEWHERE = {
    "docs/guides/natural.md": "tests/zojax/test_natural.py::test_the_docs_example_trains"}
# Fenced blocks of these languages are not run, and why.
NOT_RUN = {
    "bash": "shell: installs, experiment and benchmark commands (minutes to hours each)",
    "text": "the results.json schema",
    "bibtex": "the README's citations",
}
_DIRECTIVES = ("{toctree}", "{include}", "{code-cell}")
_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*\n(?:\s*prints `([^`\n]*)`)?", re.M | re.S)


def _blocks(path):
    """(language, code, claimed output or None) of each fenced block, in order."""
    return [(m.group(1).strip(), m.group(2), m.group(3)) for m in _FENCE.finditer(path.read_text())]


def _name(path):
    return str(path.relative_to(ROOT))


def test_every_block_is_run_or_listed():
    for path in [ROOT / "README.md", *PAGES]:
        for language, code, _ in _blocks(path):
            assert (language == "python" or language in NOT_RUN
                    or language.startswith(_DIRECTIVES)), (_name(path), language, code[:80])
    for name, test in RUN_ELSEWHERE.items():
        file, function = test.split("::")
        assert f"def {function}(" in (ROOT / file).read_text(), test
        assert (ROOT / name).exists(), name


@pytest.mark.parametrize(
    "path", [p for p in [ROOT / "README.md", *PAGES]
             if _name(p) not in EXECUTED_BY_THE_BUILD | set(RUN_ELSEWHERE)
             and any(language == "python" for language, _, _ in _blocks(p))],
    ids=_name)
def test_every_python_block_runs(path):
    namespace = {"__name__": "__docs__"}
    for language, code, claimed in _blocks(path):
        if language != "python":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(path), "exec"), namespace)
        if claimed is not None:
            assert out.getvalue().strip() == claimed, (_name(path), out.getvalue())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One build of the site: the sphinx-build process and the html folder."""
    out = tmp_path_factory.mktemp("docs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    process = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return process, out / "html"


def test_the_site_builds_without_a_warning(site):
    process, html = site
    assert process.returncode == 0, process.stderr[-6000:]
    for page in ["index", "getting_started", "api/index", "guides/architecture",
                 "experiments/index", "experiments/figure1", "benchmarks",
                 "notebooks/flatness_analysis"]:
        assert (html / f"{page}.html").exists(), page


def test_the_api_tables_are_filled(site):
    process, html = site
    assert process.returncode == 0, process.stderr[-6000:]
    table = (html / "api" / "transforms.html").read_text()
    assert table.count('class="reference internal"') >= 20
    page = (html / "api" / "generated" / "zojax.two_point.html").read_text()
    assert "smoothing" in page and "Example" in page


def test_math_is_served_by_the_site(site):
    process, html = site
    assert process.returncode == 0, process.stderr[-6000:]
    assert (html / "_static" / "mathjax" / "tex-chtml.js").exists()
    page = (html / "getting_started.html").read_text()
    assert "_static/mathjax/tex-chtml.js" in page and 'class="math' in page
    for path in html.rglob("*.html"):
        assert "cdn.jsdelivr" not in path.read_text(), path


def test_the_getting_started_page_ran(site):
    process, html = site
    assert process.returncode == 0, process.stderr[-6000:]
    page = (html / "getting_started.html").read_text()
    assert re.search(r"loss 29\.995 -&gt; [0-9.e-]+ in 6,000 evaluations of h", page)
    assert "closed form" in page


def test_a_broken_zojax_reference_fails_the_build(tmp_path):
    """The resolver of short names in docs/conf.py still turns an unknown name into an error."""
    (tmp_path / "conf.py").write_text(
        "import runpy\n"
        f"globals().update(runpy.run_path({str(DOCS / 'conf.py')!r}))\n"
        "exclude_patterns = []\n")
    (tmp_path / "index.rst").write_text(
        "Page\n====\n\n:func:`zojax.two_point` :func:`two_point` :func:`zojax.no_such_name`\n")
    process = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(tmp_path),
         str(tmp_path / "html")], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.returncode != 0
    assert "zojax.no_such_name" in process.stderr
    assert "two_point" not in process.stderr.replace("zojax.no_such_name", "")
