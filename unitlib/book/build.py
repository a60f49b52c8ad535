"""Build the book: execute every page with papermill into ``build/``, then render it with Jupyter Book (warnings are
errors), offline. The command line is :mod:`unitlib.book.cli` (``python -m unitlib.book build``, what `make book`
runs).

Executed notebooks go to ``build/notebooks``, ``build/book`` and ``build/labs`` (the table of contents points there,
so the parameters a page ran with are the ones it shows); the HTML to ``_build/html``. A lab (``labs/``) is executed
as its reference solution, and its student's copy (solutions removed) is written beside it, in
``build/labs/student``, for the page's download link. The JavaScript the pages need is
fetched from npm at build time into ``build/static/vendor`` and served from there: no page loads anything from a CDN.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import tempfiles
from .labs.catalogue import LABS as _LABS

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"
HTML = ROOT / "_build" / "html"
VENDOR = BUILD / "static" / "vendor"

# The book pages that compute something (executed like the notebooks), and the appendix sections, in book order.
PAGES = ["intro", "method", "reproduce"]
SECTIONS = ["a1_attacks", "a1_baselines", "a2_latest_defenses", "a3_sensitivity", "a4_adaptive", "a5_ablations"]
# The coursework part: the page on teaching with the labs, then the labs (``labs/``).
LAB_PAGES = ["teaching"]
LABS = [lab.name for lab in _LABS]

# npm packages served with the pages (exact versions), and which of their files go where under build/static/vendor:
# (path in the package, or a folder of it, destination, file endings kept).
FONTS = (".woff2", ".woff", ".ttf", ".eot", ".svg")
NPM: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {
    "requirejs@2.3.8": [("require.js", "require.js", ())],
    "@jupyter-widgets/html-manager@1.0.15": [
        ("dist/embed-amd.js", "embed-amd.js", ()),
        # the widgets' icon fonts, fetched from window.__jupyter_widgets_assets_path__ + this path
        ("dist", "@jupyter-widgets/html-manager/dist", FONTS),
        # ...and beside the manager's require.js module path, where it asks for them when it starts before
        # widgets-config.js has set that variable (seen once in CI: 404s for @jupyter-widgets/<hash>.woff2)
        ("dist", "@jupyter-widgets", FONTS),
    ],
    "mathjax@3.2.2": [("es5/tex-chtml.js", "mathjax/tex-chtml.js", ()),
                      ("es5/output/chtml/fonts", "mathjax/output/chtml/fonts", ())],
}
# Loaded between require.js and the widget manager: require.js resolves the manager's modules, and so its icon
# fonts, against its baseUrl (by default the page's own folder); point it at this script's folder instead.
# The manager typesets a widget's label with MathJax 2 (`MathJax.Hub.Queue`) whenever `window.MathJax` exists; the
# book loads MathJax 3, which has no `Hub`, so a page with both equations and widgets threw "Cannot read properties
# of undefined (reading 'Queue')". Every object the page assigns to `window.MathJax` (Sphinx's configuration, then
# MathJax 3 itself) gets a `Hub.Queue` that hands the element to MathJax 3's `typesetPromise` once it is there.
WIDGETS_CONFIG_JS = (
    "(function () {\n"
    "  var here = new URL('.', document.currentScript.src).href;\n"
    "  window.__jupyter_widgets_assets_path__ = here + '@jupyter-widgets/html-manager/dist/';\n"
    "  window.require.config({baseUrl: here});\n"
    "  function queue() {\n"
    "    var mathjax = window.MathJax;\n"
    "    Array.prototype.forEach.call(arguments, function (job) {\n"
    "      if (Array.isArray(job) && job[0] === 'Typeset' && mathjax && mathjax.typesetPromise) {\n"
    "        mathjax.typesetPromise(job[2] ? [job[2]] : undefined).catch(function (err) { console.warn(err); });\n"
    "      }\n"
    "    });\n"
    "  }\n"
    "  function withHub(mathjax) {\n"
    "    if (mathjax && typeof mathjax === 'object' && !mathjax.Hub) { mathjax.Hub = {Queue: queue}; }\n"
    "    return mathjax;\n"
    "  }\n"
    "  var current = withHub(window.MathJax);\n"
    "  Object.defineProperty(window, 'MathJax', {configurable: true, enumerable: true,\n"
    "    get: function () { return current; }, set: function (value) { current = withHub(value); }});\n"
    "})();\n"
)
NPM_TIMEOUT = 600  # seconds for fetching the pages' JavaScript
RENDER_TIMEOUT = 1800  # seconds for jupyter-book's render of the executed notebooks (about 10 s here)
DEFAULT_TIMEOUT = 900  # seconds per cell: generous for the smoke profile on two busy cores, finite so nothing hangs


def _folder(name: str) -> str:
    return "book" if name in PAGES else "labs" if name in LAB_PAGES + LABS else "notebooks"


def source(name: str) -> Path:
    """The jupytext MyST source of a page, section or lab."""
    path = ROOT / _folder(name) / f"{name}.md"
    if not path.exists():
        raise ValueError(f"unknown page or section {name!r}; valid: {', '.join(PAGES + SECTIONS + LAB_PAGES + LABS)}")
    return path


def output(name: str, build: Path = BUILD) -> Path:
    """Where the executed notebook of a page, section or lab goes (the table of contents points there)."""
    return build / _folder(name) / f"{name}.ipynb"


def student_copy(name: str, build: Path = BUILD) -> Path:
    """Where the student's copy of a lab goes, beside the executed lab (its page links to it)."""
    return output(name, build).parent / "student" / f"{name}.ipynb"


def parameters(name: str) -> list[str]:
    """The names the ``parameters`` cell of a page or section assigns: the parameters it can be executed with."""
    import jupytext

    names: list[str] = []
    for cell in jupytext.read(source(name)).cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            for node in ast.parse(cell.source).body:
                targets = node.targets if isinstance(node, ast.Assign) else (
                    [node.target] if isinstance(node, ast.AnnAssign) else [])
                names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def check_parameters(name: str, params: dict[str, Any]) -> None:
    """Refuse a parameter the page or section does not have, listing those it has. (papermill would only log a
    warning and run with the defaults, and it writes each name into the notebook as code.)"""
    valid = parameters(name)
    unknown = [k for k in params if k not in valid]
    if unknown and not valid:
        raise ValueError(f"{name} takes no parameters (it has no parameters cell), got {', '.join(map(repr, unknown))}")
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for {name}; its parameters: "
                         f"{', '.join(valid)}")


def execute(name: str, parameters: dict[str, Any] | None = None, *, out: Path | None = None,
            timeout: int = DEFAULT_TIMEOUT) -> Path:
    """Execute one page, section or lab with papermill (``parameters`` override its ``parameters`` cell). The
    notebook is executed into a temporary file and moved to ``out`` only when every cell ran: a failed run leaves the
    notebook of the last good run in place, and its own as ``<name>.failed.ipynb`` beside it. A lab is executed as
    its reference solution, and its student's copy is written beside ``out``, in ``student/``."""
    import jupytext
    import papermill

    from .labs import notebooks as lab_notebooks

    src = source(name)
    check_parameters(name, parameters or {})
    notebook = lab_notebooks.reference(src) if name in LABS else jupytext.read(src)
    out = out or output(name)
    if name in LABS:
        lab_notebooks.strip(src, out.parent / "student" / f"{name}.ipynb")
    out.parent.mkdir(parents=True, exist_ok=True)
    tempfiles.remove_stale(out.parent)  # a run killed before it finished
    tmp = tempfiles.temp_name(out, ".tmp.ipynb")
    failed = out.with_name(f"{out.stem}.failed.ipynb")
    try:
        papermill.execute_notebook(
            notebook, str(tmp), parameters=parameters or {}, kernel_name="python3",
            execution_timeout=timeout, cwd=str(src.parent), progress_bar=False, report_mode=False,
        )
    except BaseException as err:
        if tmp.exists():
            os.replace(tmp, failed)
            err.add_note(f"{name}: the failed run's notebook is {failed}; {out} is unchanged")
        raise
    os.replace(tmp, out)
    failed.unlink(missing_ok=True)
    return out


def assets(vendor: Path = VENDOR) -> Path:
    """Fetch the pages' JavaScript from npm (``npm pack``: the packages' own tarballs, integrity-checked by npm) and
    keep only the files served (skipped when already there for these versions); write the book's own
    ``widgets-config.js`` beside them."""
    stamp = vendor / ".versions.json"
    if stamp.exists() and json.loads(stamp.read_text()) == sorted(NPM):
        (vendor / "widgets-config.js").write_text(WIDGETS_CONFIG_JS)
        return vendor
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to fetch the book's JavaScript (Debian: apt-get install npm)")
    shutil.rmtree(vendor, ignore_errors=True)
    vendor.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Finite: npm's own retries are bounded by its fetch settings, and the whole fetch by NPM_TIMEOUT, so a
        # registry that stops answering fails the build with a message instead of hanging it.
        env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false",
               "npm_config_audit": "false", "npm_config_fetch_timeout": "60000", "npm_config_fetch_retries": "3"}
        try:
            out = subprocess.run([npm, "pack", "--silent", "--json", "--pack-destination", tmp, *NPM], check=True,
                                 capture_output=True, text=True, env=env, timeout=NPM_TIMEOUT).stdout
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"npm pack {' '.join(NPM)} did not finish within {NPM_TIMEOUT} s: is the npm "
                               f"registry reachable? (npm config get registry)") from err
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"npm pack {' '.join(NPM)} failed (exit {err.returncode}): {err.stderr.strip()}") from err
        tarballs = [Path(tmp) / entry["filename"].replace("@", "").replace("/", "-") for entry in json.loads(out)]
        for spec, tarball in zip(NPM, tarballs, strict=True):
            if not tarball.exists():
                tarball = next(Path(tmp).glob(f"*{spec.rsplit('@', 1)[0].split('/')[-1]}-*.tgz"))
            with tarfile.open(tarball) as tar:
                for member in tar.getmembers():
                    rel = member.name.removeprefix("package/")
                    for src, dst, endings in NPM[spec]:
                        inside = rel == src or rel.startswith(src + "/")
                        if inside and member.isfile() and (not endings or rel.endswith(endings)):
                            target = vendor / (dst + rel[len(src):])
                            target.parent.mkdir(parents=True, exist_ok=True)
                            with tar.extractfile(member) as f:  # type: ignore[union-attr]
                                target.write_bytes(f.read())
    (vendor / "widgets-config.js").write_text(WIDGETS_CONFIG_JS)
    stamp.write_text(json.dumps(sorted(NPM)))
    return vendor


def html(*, strict: bool = True) -> Path:
    """Render the executed notebooks and pages with Jupyter Book (``-W``: any warning fails the build)."""
    assets()
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(ROOT), "--builder", "html"]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    try:
        subprocess.run(cmd, check=True, cwd=ROOT, timeout=RENDER_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"jupyter-book build did not finish within {RENDER_TIMEOUT} s") from err
    return HTML


def _execute_timed(name: str, parameters: dict[str, Any] | None, timeout: int) -> float:
    """Execute one notebook in a worker process; its kernel gets one intra-op thread (set before it starts)."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    start = time.perf_counter()
    execute(name, parameters, timeout=timeout)
    return time.perf_counter() - start


def _warm_data(log=print) -> None:
    """Decode ``cifar10-jpeg`` into the data cache once, before the pages run side by side, so that no two kernels
    decode it at the same time and no page shows the decoding progress. Skipped when the data is not here."""
    from .. import data

    start = time.perf_counter()
    try:
        data.load("cifar10-jpeg", size=1)
    except FileNotFoundError as err:
        log(f"cifar10-jpeg not found ({err}); pages that need it will say so")
        return
    log(f"data cache ready in {time.perf_counter() - start:.1f}s")


def build(parameters: dict[str, Any] | None = None, *, timeout: int = DEFAULT_TIMEOUT, jobs: int | None = None,
          log=print) -> dict[str, float]:
    """Execute every page, section and lab (``parameters`` go to the sections; the labs run with their own defaults,
    the ``smoke`` profile), then render the book. Returns the seconds of each step.

    The notebooks run ``jobs`` at a time (default: one per CPU core), each kernel with one intra-op thread: the
    smoke-profile models are tiny, and two of them side by side, one thread each, finish sooner than one after the
    other with two threads each. A failed notebook stops the build once the running ones finish, with its error."""
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    for name in SECTIONS:
        check_parameters(name, parameters or {})
    jobs = jobs or os.cpu_count() or 1
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs!r}")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    assets()
    seconds["assets"] = time.perf_counter() - start
    t = time.perf_counter()
    _warm_data(log)
    seconds["data"] = time.perf_counter() - t
    names = PAGES + SECTIONS + LAB_PAGES + LABS
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        running = {pool.submit(_execute_timed, name, parameters if name in SECTIONS else None, timeout): name
                   for name in names}
        pending = set(running)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                name = running[future]
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
                seconds[name] = future.result()
                log(f"executed {name} in {seconds[name]:.1f}s")
    seconds["notebooks"] = time.perf_counter() - t
    log(f"executed {len(names)} notebooks, {jobs} at a time, in {seconds['notebooks']:.1f}s")
    t = time.perf_counter()
    html()
    seconds["html"] = time.perf_counter() - t
    log(f"rendered the book in {seconds['html']:.1f}s: {HTML / 'index.html'}")
    return seconds
