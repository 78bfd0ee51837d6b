"""Build the course as a static website that opens from the file system, offline.

    python scripts/build_course.py [--quick] [--out site]

Every lesson (lessons/NN_name.py, a jupytext "percent" script) is read as a notebook by jupytext,
executed in a Jupyter kernel by nbclient (cwd lessons/, so `from _check import check` works;
MINIMOSAIC_LESSON=<stem>; MINIMOSAIC_QUICK=1 with --quick; MPLBACKEND removed, so figures display
inline as PNG outputs), and rendered to HTML by nbconvert's HTMLExporter. The output folder gets:

    index.html          the table of lessons (number, title, one-line summary, from lessons/README.md)
    NN_name.html        one page per lesson: text, code, outputs and figures, with links to the
                        previous and next page and back to the index
    experiments.html    examples/README.md (its tables and its figures)

Offline: the pages are rendered with nbconvert's "lab" template, less the blocks that load require.js,
MathJax, Mermaid and widgets from a CDN; its CSS is inlined in each page, and every image is a data:
URI (nbconvert embeds PNG outputs so; markdown images are embedded with embed_images). Each page is
checked for remote references (remote_references) before it is written. Formulas ($...$, $$...$$) are
turned into MathML by latex2mathml before rendering (browsers draw MathML themselves, no script
needed); one it cannot convert stays as its TeX source.

A lesson whose check fails does not stop the build: every lesson is run, and at the end the build
prints "lesson NN_name failed: <the AssertionError's message>" for each failed one and exits 1 (the
failed lesson's page is still written, showing the traceback where the lesson stopped).

Needs the `course` extra: pip install -e '.[course]' (jupytext, nbconvert, nbclient, ipykernel,
latex2mathml).
"""
import argparse
import html
import os
import re
import sys
import tempfile
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LESSONS_DIR = ROOT / "lessons"
EXAMPLES_README = ROOT / "examples" / "README.md"
INDEX, EXPERIMENTS = "index.html", "experiments.html"
CELL_TIMEOUT_S = 900

# The "lab" template without anything fetched at view time, and with the course navigation.
TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}<style type="text/css">{{ resources.course_css }}</style>{%- endblock extra_css -%}
{%- block body_header -%}{{ super() }}{{ resources.course_nav }}{%- endblock body_header -%}
{%- block body_footer -%}{{ resources.course_nav }}{{ super() }}{%- endblock body_footer -%}
"""
CSS = """
main { max-width: 1100px; margin: 0 auto; }
nav.course-nav { display: flex; justify-content: space-between; gap: 1em; padding: 0.8em 1em;
  margin: 0.5em 0; border-top: 1px solid #ddd; border-bottom: 1px solid #ddd;
  font-family: var(--jp-ui-font-family); font-size: 14px; }
nav.course-nav a { text-decoration: none; }
nav.course-nav .empty { visibility: hidden; }
"""

# The HTML attributes a browser fetches by itself (plain <a href> links are only followed on a click).
FETCHED_ATTRIBUTES = {"script": ("src",), "link": ("href",), "img": ("src", "srcset"), "iframe": ("src",),
                      "frame": ("src",), "source": ("src", "srcset"), "video": ("src", "poster"),
                      "audio": ("src",), "track": ("src",), "embed": ("src",), "object": ("data",),
                      "input": ("src",), "image": ("href", "xlink:href"), "use": ("href", "xlink:href")}
REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)  # http://, https:// and protocol-relative //
CSS_REMOTE = re.compile(r"(url\(\s*['\"]?|@import\s+['\"])\s*(https?:)?//", re.IGNORECASE)


class _RemoteReferences(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found, self._tag = [], None

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        for name, value in attrs:
            if name in FETCHED_ATTRIBUTES.get(tag, ()) and REMOTE.search(value or ""):
                self.found.append(f"<{tag} {name}={value!r}>")
            elif name == "style" and CSS_REMOTE.search(value or ""):
                self.found.append(f"<{tag} style={value!r}>")

    def handle_endtag(self, tag):
        self._tag = None

    def handle_data(self, data):
        if self._tag == "style" and CSS_REMOTE.search(data):
            self.found.append(f"<style> {CSS_REMOTE.search(data).group(0)}...")
        elif self._tag == "script" and re.search(r"(https?:)?//[\w.-]+\.\w", data):
            self.found.append("<script> text with a URL (it may fetch it)")


def remote_references(page):
    """What in this page a browser would fetch from the network: script/link/img/iframe/... sources,
    CSS url()/@import of http(s) or protocol-relative URLs, and inline scripts that mention a URL.
    Plain <a href="https://..."> links are fine (nothing is fetched until they are clicked)."""
    parser = _RemoteReferences()
    parser.feed(page)
    parser.close()
    return parser.found


def image_sources(page):
    """The src attribute of every <img> in the page, in order."""
    return re.findall(r"<img\b[^>]*?\ssrc=[\"']([^\"']*)[\"']", page, flags=re.IGNORECASE)


# ----------------------------------------------------------------------------------------------- the index


def lesson_files(lessons_dir=LESSONS_DIR):
    return sorted(Path(lessons_dir).glob("[0-9][0-9]_*.py"))


def readme_table(readme_text):
    """{file name: (title, summary)} from the lessons table of lessons/README.md:
    | 1 | [Derivatives and the chain rule](01_derivatives.py) | finite differences vs ... |"""
    row = re.compile(r"^\|\s*\d+\s*\|\s*\[([^\]]+)\]\(([^)]+)\)\s*\|(.*)\|\s*$")
    table = {}
    for line in readme_text.splitlines():
        found = row.match(line.strip())
        if found:
            table[Path(found.group(2)).name] = (found.group(1).strip(), found.group(3).strip())
    return table


def readme_intro(readme_text):
    """The paragraphs of lessons/README.md between its title and its table of lessons."""
    lines = readme_text.splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("| #")), len(lines))
    return "\n".join(line for line in lines[:end] if not line.startswith("# ")).strip()


def first_heading(notebook):
    """The first markdown heading of the notebook, without its "#" and any "Lesson N:" prefix."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return re.sub(r"^Lesson\s+\d+\s*[:.-]\s*", "", line.lstrip("#").strip(), flags=re.I)
    return ""


def lesson_entries(paths, notebooks, readme_text):
    """One dict per lesson: number, stem, href, title, summary (README's table, else the heading)."""
    table = readme_table(readme_text)
    entries = []
    for path, notebook in zip(paths, notebooks):
        title, summary = table.get(path.name, (first_heading(notebook) or path.stem, ""))
        entries.append({"number": int(path.name[:2]), "stem": path.stem, "href": f"{path.stem}.html",
                        "title": title, "summary": summary})
    return entries


def index_markdown(entries, intro, quick, failed=()):
    """The index page's markdown: the README's introduction and the table of lessons."""
    mode = ("quick mode (MINIMOSAIC_QUICK=1: smaller sizes, so the numbers differ from a full run)"
            if quick else "full mode")
    rows = [f"| {e['number']} | [{e['title']}]({e['href']}) | {e['summary'].replace('|', '&#124;')}"
            f"{' **(failed in this build)**' if e['stem'] in failed else ''} |" for e in entries]
    return "\n".join([
        "# minimosaic: the course", "", intro, "",
        "| # | Lesson | What you build and check |", "|---|---|---|", *rows, "",
        f"After the lessons: [the experiments]({EXPERIMENTS}), the paper's results reproduced at laptop "
        "scale (examples/README.md).", "",
        f"Each lesson page shows the lesson run from top to bottom, with its outputs, in {mode}."])


def nav_html(pages, i):
    """The links of page i to the previous page, the index and the next page; pages: [(href, label), ...]
    in reading order, the index first (the index is not repeated as the first lesson's previous page)."""
    def link(j, rel, text):
        if j < 1 or j >= len(pages):
            return f'<span class="{rel} empty"></span>'
        return f'<a rel="{rel}" href="{html.escape(pages[j][0])}">{text.format(html.escape(pages[j][1]))}</a>'
    return (f'<nav class="course-nav">{link(i - 1, "prev", "&larr; {}")}'
            f'<a rel="index" href="{INDEX}">Contents</a>{link(i + 1, "next", "{} &rarr;")}</nav>')


# ------------------------------------------------------------------------------------------ the rendering


def exporter():
    """nbconvert's HTMLExporter with the offline template above (lab styles, inlined)."""
    import jinja2
    from nbconvert import HTMLExporter
    return HTMLExporter(template_name="lab", extra_loaders=[jinja2.DictLoader({"course.html.j2": TEMPLATE})],
                        template_file="course.html.j2", embed_images=True, mathjax_url="",
                        require_js_url="", mermaid_js_url="", jupyter_widgets_base_url="")


DISPLAY_MATH = re.compile(r"\$\$(.+?)\$\$", re.S)
INLINE_MATH = re.compile(r"(?<![\\$])\$(?![\s$])([^$\n]+?)(?<![\s\\])\$(?![$\w])")
MARKDOWN_CELL = re.compile(r'(<div class="[^"]*jp-RenderedMarkdown[^"]*"[^>]*>)(.*?)(</div>)', re.S)


def math_to_mathml(page):
    """The page with the $$...$$ and $...$ of its markdown cells as MathML (nbconvert leaves them as text
    for MathJax; browsers draw MathML themselves). Text inside <code> and <pre> keeps its dollars; TeX
    that latex2mathml cannot convert stays as it is."""
    try:
        from latex2mathml.converter import convert
    except ImportError:  # the course extra brings it; without it the TeX shows as written
        return page

    def mathml(display):
        def replace(found):
            try:
                return convert(html.unescape(found.group(1)).strip(), display="block" if display else "inline")
            except Exception:  # noqa: BLE001  (any TeX it does not know: keep the source)
                return found.group(0)
        return replace

    def cell(found):
        pieces = re.split(r"(<code>.*?</code>|<pre>.*?</pre>|<[^>]+>)", found.group(2), flags=re.S)
        text = [INLINE_MATH.sub(mathml(False), DISPLAY_MATH.sub(mathml(True), piece))
                if not piece.startswith("<") else piece for piece in pieces]
        return found.group(1) + "".join(text) + found.group(3)
    return MARKDOWN_CELL.sub(cell, page)


def render_page(notebook, title, nav, path="."):
    """The notebook as one HTML page; markdown images are read from `path` and embedded. Raises
    ValueError if anything in it would be fetched from the network or an image is not embedded."""
    notebook.metadata["title"] = title
    resources = {"metadata": {"name": title, "path": str(path)}, "course_css": CSS, "course_nav": nav}
    page, _ = exporter().from_notebook_node(notebook, resources=resources)
    page = math_to_mathml(page)
    remote = remote_references(page)
    if remote:
        raise ValueError(f"{title}: the page would fetch {', '.join(remote)}")
    missing = [src for src in image_sources(page) if not src.startswith("data:")]
    if missing:
        raise ValueError(f"{title}: images not found to embed: {', '.join(missing)}")
    return page


def markdown_notebook(markdown):
    import nbformat
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(markdown)])


# ------------------------------------------------------------------------------------------ the execution

# Run after a lesson's last cell (then removed from the page): in a notebook, _check does not verify
# at exit that every promised figure was shown, as it does for a script, so the build checks it here.
FIGURES_SHOWN = """import sys as _sys
_check = _sys.modules.get("_check")
_missing = sorted(set(getattr(_check, "_promised", {})) - set(getattr(_check, "_shown", ())))
assert not _missing, f"figures promised but never shown: {', '.join(_missing)}"
"""


def kernel_env(stem, quick, base=None):
    """The lesson kernel's environment: figures inline (no MPLBACKEND), the lesson's name, quick mode,
    this checkout first on PYTHONPATH, and one BLAS thread unless set (small matrices; see README)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k != "MPLBACKEND"}
    env["MINIMOSAIC_LESSON"] = stem
    env.pop("MINIMOSAIC_QUICK", None)
    if quick:
        env["MINIMOSAIC_QUICK"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def kernel_manager_class():
    """nbclient's kernel manager, running ipykernel in this interpreter (the "python3" kernel spec that
    pip installs runs whatever `python` comes first on PATH, maybe one without minimosaic), talking to
    it over local sockets (ipc) where the system has them rather than unencrypted localhost TCP."""
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.localinterfaces import localhost
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            fields = {k: v for k, v in get_kernel_dict().items() if k in KernelSpec.class_traits()}
            return KernelSpec(resource_dir=RESOURCES, **fields)

    class ThisPythonKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _this_python(self):
            return ThisPython(data_dir=self.data_dir)

        @default("transport")
        def _local_sockets(self):
            return "ipc" if os.name == "posix" else "tcp"

        @default("ip")
        def _socket_paths(self):  # absolute: the kernel runs in another folder (removed at shutdown)
            if self.transport == "ipc":
                return os.path.join(tempfile.gettempdir(), f"minimosaic-kernel-{uuid.uuid4().hex}")
            return localhost()

    return ThisPythonKernelManager


def failure_message(stem, error):
    """'lesson NN_name failed: <message>' from nbclient's CellExecutionError (an assert's message alone,
    other exceptions with their name)."""
    ename, evalue = getattr(error, "ename", type(error).__name__), getattr(error, "evalue", str(error))
    return f"lesson {stem} failed: {evalue if ename == 'AssertionError' and evalue else f'{ename}: {evalue}'}"


def execute_lesson(notebook, stem, cwd, quick):
    """Run the notebook in place (outputs stored in its cells); returns None, or the failure message."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    notebook.cells.append(nbformat.v4.new_code_cell(FIGURES_SHOWN))
    client = NotebookClient(notebook, kernel_manager_class=kernel_manager_class(), timeout=CELL_TIMEOUT_S,
                            kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(env=kernel_env(stem, quick))
        return None
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:  # a failed check, a hang, a crash
        return failure_message(stem, error)
    finally:
        if notebook.cells[-1].source == FIGURES_SHOWN and not notebook.cells[-1].get("outputs"):
            notebook.cells.pop()


def build_course(out, quick=False, lessons_dir=LESSONS_DIR, examples_readme=EXAMPLES_README, log=print):
    """Write the site into `out`; returns the failure messages of the lessons that failed (if any)."""
    import jupytext
    out, lessons_dir = Path(out), Path(lessons_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = lesson_files(lessons_dir)
    notebooks = [jupytext.read(path) for path in paths]
    readme = lessons_dir / "README.md"
    readme_text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    entries = lesson_entries(paths, notebooks, readme_text)
    pages = [(INDEX, "Contents")] + [(e["href"], f"{e['number']}. {e['title']}") for e in entries]
    pages.append((EXPERIMENTS, "Experiments"))

    failures, failed, started = [], set(), time.perf_counter()
    for i, (path, notebook, entry) in enumerate(zip(paths, notebooks, entries), start=1):
        t0 = time.perf_counter()
        failure = execute_lesson(notebook, path.stem, lessons_dir, quick)
        figures = sum("image/png" in output.get("data", {}) for cell in notebook.cells
                      for output in cell.get("outputs", []))
        page = render_page(notebook, pages[i][1], nav_html(pages, i), lessons_dir)
        (out / entry["href"]).write_text(page, encoding="utf-8")
        log(f"{path.stem:<32s} {'FAILED' if failure else 'ok':6s} {time.perf_counter() - t0:6.1f} s "
            f"{figures} figure(s)")
        if failure:
            failures.append(failure)
            failed.add(path.stem)
            log(failure)

    index = index_markdown(entries, readme_intro(readme_text), quick, failed)
    (out / INDEX).write_text(render_page(markdown_notebook(index), "minimosaic: the course",
                                         nav_html(pages, 0), lessons_dir), encoding="utf-8")
    experiments = markdown_notebook(Path(examples_readme).read_text(encoding="utf-8"))
    (out / EXPERIMENTS).write_text(render_page(experiments, "Experiments", nav_html(pages, len(pages) - 1),
                                               Path(examples_readme).parent), encoding="utf-8")
    log(f"wrote {len(pages)} pages to {out}/ in {time.perf_counter() - started:.0f} s; "
        f"open file://{(out / INDEX).resolve()}")
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="run the lessons with MINIMOSAIC_QUICK=1 (smaller sizes)")
    parser.add_argument("--out", type=Path, default=ROOT / "site", help="where to write the site (default: site/)")
    args = parser.parse_args(argv)
    failures = build_course(args.out, quick=args.quick)
    if failures:
        print(f"\n{len(failures)} lesson(s) failed:", *failures, sep="\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
