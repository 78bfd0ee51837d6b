"""The course as a static website (scripts/build_course.py).

Fast tests (the default suite) check the builder's pieces without running a lesson: the index taken from
lessons/README.md, the previous / next links, the detection of remote references, a page rendered from a
small notebook made here, and the build of two tiny made-up lessons (one fails) in a real kernel.

Slow tests (`pytest -m slow`) build the real course in quick mode once per session, as a user does
(`python scripts/build_course.py --quick --out DIR`), and check every page. An "error output" in a page
is an output area with data-mime-type "application/vnd.jupyter.stderr": nbconvert renders both an
exception's traceback (an output of type "error") and anything the lesson wrote to stderr (warnings
included) that way, so a lesson page must have none. The browser test opens the pages in headless
Chromium from file:// (skipped, with the reason, when no Chromium is on PATH).
"""
import base64
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
_spec = importlib.util.spec_from_file_location("build_course", ROOT / "scripts" / "build_course.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

STDERR_OUTPUT = re.compile(r"<div\b[^>]*\bdata-mime-type=\"application/vnd\.jupyter\.stderr\"")
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def promised_figures(lesson):
    """The names in the lesson's promise_figures("a", "b", ...) call."""
    found = re.search(r"promise_figures\(([^)]*)\)", lesson.read_text(encoding="utf-8"))
    return re.findall(r"[\"']([^\"']+)[\"']", found.group(1)) if found else []


def png_size(src):
    """(width, height) from the header of a data:image/png;base64 image; None if it is not one."""
    if not src.startswith("data:image/png;base64,"):
        return None
    head = base64.b64decode(src.split(",", 1)[1][:32])[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def fetched_urls(page):
    """Every URL the browser would fetch by itself for this page: src/href/srcset/data/poster of the
    elements that load something (not <a>, whose links are only followed on a click). Parsed with
    BeautifulSoup (an nbconvert dependency), independently of the builder's own check."""
    from bs4 import BeautifulSoup
    soup = BeautifulSoup(page, "html.parser")
    tags = ["script", "link", "img", "iframe", "frame", "source", "video", "audio", "track", "embed", "object"]
    return [tag[attr] for tag in soup.find_all(tags)
            for attr in ("src", "href", "srcset", "data", "poster") if tag.has_attr(attr)]


def assert_offline(page, name):
    remote = [url for url in fetched_urls(page) if re.match(r"\s*(https?:)?//", url, re.IGNORECASE)]
    assert not remote, f"{name} fetches {remote}"
    assert build.remote_references(page) == [], f"{name}: {build.remote_references(page)}"


def nav_hrefs(page):
    """{'prev': href, 'index': href, 'next': href} from the page's (first) navigation bar."""
    from bs4 import BeautifulSoup
    nav = BeautifulSoup(page, "html.parser").find("nav", class_="course-nav")
    assert nav, "no course navigation in the page"
    return {link["rel"][0]: link["href"] for link in nav.find_all("a")}


def png_data_uri(width=60, height=40):
    from matplotlib.image import imsave
    buffer = io.BytesIO()
    imsave(buffer, np.random.default_rng(0).random((height, width, 3)), format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ------------------------------------------------------------------------------------ fast: the pieces


def test_the_readme_table_gives_each_lesson_a_title_and_a_summary():
    text = "# Lessons\n\nIntro.\n\n| # | Lesson | What |\n|---|---|---|\n| 1 | [First](01_a.py) | does `x` |\n"
    assert build.readme_table(text) == {"01_a.py": ("First", "does `x`")}
    assert build.readme_intro(text) == "Intro."
    import nbformat
    notebooks = [nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# Lesson {n}: heading {n}")])
                 for n in (1, 2)]
    entries = build.lesson_entries([Path("01_a.py"), Path("02_b.py")], notebooks, text)
    assert [(e["number"], e["href"], e["title"], e["summary"]) for e in entries] == [
        (1, "01_a.html", "First", "does `x`"), (2, "02_b.html", "heading 2", "")]  # 2: from its heading
    # The real README lists every lesson (else the index falls back to the lesson's heading, no summary).
    table = build.readme_table((ROOT / "lessons" / "README.md").read_text(encoding="utf-8"))
    assert all(lesson.name in table and all(table[lesson.name]) for lesson in LESSONS), sorted(table)


def test_navigation_links_previous_index_and_next():
    pages = [("index.html", "Contents"), ("01_a.html", "1. A"), ("02_b.html", "2. B"),
             ("experiments.html", "Experiments")]
    assert nav_hrefs(build.nav_html(pages, 0)) == {"index": "index.html", "next": "01_a.html"}
    assert nav_hrefs(build.nav_html(pages, 1)) == {"index": "index.html", "next": "02_b.html"}
    assert nav_hrefs(build.nav_html(pages, 2)) == {"prev": "01_a.html", "index": "index.html",
                                                   "next": "experiments.html"}
    assert nav_hrefs(build.nav_html(pages, 3)) == {"prev": "02_b.html", "index": "index.html"}
    assert "2. B &rarr;" in build.nav_html(pages, 1) and "&larr; 1. A" in build.nav_html(pages, 2)


def test_remote_references_are_found_and_plain_links_are_allowed():
    remote = ['<script src="https://cdn.example.org/x.js"></script>', '<link href="http://x.org/a.css">',
              '<img src="//x.org/a.png">', '<iframe src="https://x.org"></iframe>',
              '<style>@import "https://fonts.example.org/f.css";</style>',
              '<div style="background: url(https://x.org/a.png)"></div>',
              '<script>fetch("https://x.org/data.json")</script>']
    for snippet in remote:
        assert build.remote_references(snippet), snippet
    fine = ['<a href="https://github.com/x">a link</a>', '<img src="data:image/png;base64,iVBO">',
            '<img src="figures/a.png">', '<style>a { background: url(data:image/svg+xml;base64,PHN2) }</style>',
            '<svg xmlns="http://www.w3.org/2000/svg"></svg>', "<p>see https://example.org</p>"]
    for snippet in fine:
        assert build.remote_references(snippet) == [], snippet


def test_a_page_is_offline_with_its_navigation_and_embedded_figures(tmp_path):
    pytest.importorskip("nbconvert")
    import nbformat
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "f.png").write_bytes(base64.b64decode(png_data_uri(30, 20).split(",")[1]))
    code = nbformat.v4.new_code_cell("print(1)", outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="1\n"),
        nbformat.v4.new_output("display_data", data={"image/png": png_data_uri().split(",")[1],
                                                     "text/plain": "<Figure>"})])
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Lesson 1: a title\n\nMath $x^2$ and ![a figure](figures/f.png)"), code])
    nav = build.nav_html([("index.html", "Contents"), ("01_a.html", "1. A"), ("02_b.html", "2. B")], 1)
    page = build.render_page(notebook, "1. A", nav, tmp_path)
    assert_offline(page, "the page")
    assert "<script" not in page  # nothing runs: no require.js, MathJax, Mermaid or widgets
    assert "<title>1. A</title>" in page and page.count('<nav class="course-nav">') == 2
    assert [png_size(src) for src in build.image_sources(page)] == [(30, 20), (60, 40)]
    assert not STDERR_OUTPUT.search(page)
    notebook.cells[0].source = "![gone](figures/missing.png)"
    with pytest.raises(ValueError, match="missing.png"):
        build.render_page(notebook, "1. A", nav, tmp_path)


def test_index_kernel_environment_and_failure_message():
    entries = [{"number": 1, "stem": "01_a", "href": "01_a.html", "title": "A", "summary": "x | y"}]
    index = build.index_markdown(entries, "Intro.", quick=True, failed={"01_a"})
    assert "| 1 | [A](01_a.html) | x &#124; y **(failed in this build)** |" in index
    assert f"]({build.EXPERIMENTS})" in index and "quick mode" in index
    env = build.kernel_env("01_a", quick=False, base={"MPLBACKEND": "Agg", "MINIMOSAIC_QUICK": "1"})
    assert "MPLBACKEND" not in env and "MINIMOSAIC_QUICK" not in env and env["MINIMOSAIC_LESSON"] == "01_a"
    assert env["PYTHONPATH"].split(build.os.pathsep)[0] == str(ROOT)
    assert build.kernel_env("01_a", quick=True, base={})["MINIMOSAIC_QUICK"] == "1"
    from nbclient.exceptions import CellExecutionError
    assert build.failure_message("03_x", CellExecutionError("tb", "AssertionError", "x: differs")) == \
        "lesson 03_x failed: x: differs"
    assert build.failure_message("03_x", CellExecutionError("tb", "NameError", "name 'y' is not defined")) == \
        "lesson 03_x failed: NameError: name 'y' is not defined"


def test_a_failing_lesson_fails_the_build_and_the_others_are_built(tmp_path):
    """Two made-up lessons in a real kernel (a few seconds): the second one's assert fails."""
    pytest.importorskip("nbclient")
    lessons, out = tmp_path / "lessons", tmp_path / "site"
    lessons.mkdir()
    header = "# %% [markdown]\n# # Lesson {n}: made up\n\n# %%\n"
    (lessons / "01_fine.py").write_text(header.format(n=1) + "import os\nprint(os.environ['MINIMOSAIC_LESSON'])\n")
    (lessons / "02_broken.py").write_text(header.format(n=2) + "assert 1 + 1 == 3, 'arithmetic: 1 + 1 is not 3'\n")
    readme = tmp_path / "README.md"
    readme.write_text("# Experiments\n\nNone yet.\n")
    log = []
    failures = build.build_course(out, quick=True, lessons_dir=lessons, examples_readme=readme, log=log.append)
    assert failures == ["lesson 02_broken failed: arithmetic: 1 + 1 is not 3"], log
    assert sorted(p.name for p in out.iterdir()) == ["01_fine.html", "02_broken.html", "experiments.html",
                                                    "index.html"]
    assert "01_fine\n" in (out / "01_fine.html").read_text()  # ran with its name in the environment
    assert STDERR_OUTPUT.search((out / "02_broken.html").read_text())  # the page shows where it stopped
    assert "failed in this build" in (out / "index.html").read_text()


# --------------------------------------------------------------------------- slow: the real course


@pytest.fixture(scope="session")
def quick_site(tmp_path_factory):
    """The whole course built in quick mode by the command a user runs (once per session)."""
    pytest.importorskip("nbclient")
    out = tmp_path_factory.mktemp("site")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "scripts/build_course.py", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, f"the build failed\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    print(f"\nquick build of the course: {seconds:.0f} s\n{result.stdout}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("lesson", LESSONS, ids=[path.stem for path in LESSONS])
def test_lesson_page(lesson, quick_site):
    """The page shows the lesson (text, code, outputs), no error output, every promised figure as an
    embedded PNG (lessons 1-13 at least one), and links to pages that exist; nothing is fetched."""
    page = (quick_site / f"{lesson.stem}.html").read_text(encoding="utf-8")
    assert_offline(page, lesson.name)
    assert "jp-MarkdownCell" in page and "jp-CodeCell" in page and "jp-OutputArea-output" in page
    errors = STDERR_OUTPUT.findall(page)
    assert not errors, f"{lesson.name}: {len(errors)} error/stderr output(s) in the page"
    sizes = [png_size(src) for src in build.image_sources(page)]
    assert all(size and min(size) > 50 for size in sizes), f"{lesson.name}: images {sizes}"
    promised = promised_figures(lesson)
    at_least = max(len(promised), 1 if int(lesson.name[:2]) <= 13 else 0)
    assert len(sizes) >= at_least, f"{lesson.name} shows {len(sizes)} figure(s), promises {promised}"
    links = nav_hrefs(page)
    i = LESSONS.index(lesson)
    assert links.get("prev") == (LESSONS[i - 1].stem + ".html" if i > 0 else None)
    assert links.get("next") == (LESSONS[i + 1].stem + ".html" if i + 1 < len(LESSONS) else build.EXPERIMENTS)
    assert links["index"] == build.INDEX
    for href in links.values():
        assert (quick_site / href).is_file(), href


@pytest.mark.slow
def test_index_and_experiments_pages(quick_site):
    index = (quick_site / build.INDEX).read_text(encoding="utf-8")
    assert_offline(index, "index.html")
    table = build.readme_table((ROOT / "lessons" / "README.md").read_text(encoding="utf-8"))
    for lesson in LESSONS:
        assert f'href="{lesson.stem}.html"' in index, lesson.name
        if lesson.name in table:
            assert f">{table[lesson.name][0]}</a>" in index, lesson.name
    hrefs = re.findall(r"<a\b[^>]*\bhref=\"([^\"#:]+)\"", index)  # local links (no scheme, no anchor)
    assert build.EXPERIMENTS in hrefs and all((quick_site / href).is_file() for href in hrefs), hrefs

    experiments = (quick_site / build.EXPERIMENTS).read_text(encoding="utf-8")
    assert_offline(experiments, "experiments.html")
    readme = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    assert "<table" in experiments and experiments.count("<table") == readme.count("\n|---")
    sizes = [png_size(src) for src in build.image_sources(experiments)]
    assert len(sizes) == len(re.findall(r"!\[[^\]]*\]\([^)]+\.png\)", readme)) > 0
    assert all(size and min(size) > 50 for size in sizes), sizes
    assert nav_hrefs(experiments) == {"prev": LESSONS[-1].stem + ".html", "index": build.INDEX}


def chromium(*args, timeout=120):
    """Run headless Chromium with no network services, a throw-away profile, and `args`."""
    import tempfile
    with tempfile.TemporaryDirectory() as profile:
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run",
                   f"--user-data-dir={profile}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


HARNESS = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="page" src="{url}" width="1200" height="2000"></iframe>
<script>
document.getElementById("page").addEventListener("load", function () {{
  var out = document.getElementById("result");
  try {{
    var images = Array.from(this.contentDocument.images);
    Promise.all(images.map(function (img) {{ return img.decode().catch(function () {{}}); }})).then(function () {{
      out.textContent = JSON.stringify(images.map(function (img) {{ return [img.naturalWidth, img.naturalHeight]; }}));
    }});
  }} catch (error) {{ out.textContent = "error: " + error; }}
}});
</script></body></html>
"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium, chromium-browser or google-chrome on PATH")
def test_the_pages_render_in_a_browser_from_the_file_system(quick_site, tmp_path):
    """Screenshots of the index and of the first lesson page with figures are not blank, and Chromium
    decodes each of that page's figures (naturalWidth > 0). The page itself runs no script, so a small
    harness page in tmp_path loads it in an iframe and reads the images' natural sizes (this needs
    --allow-file-access-from-files: file:// pages are otherwise separate origins), then --dump-dom
    prints the harness with the sizes in it."""
    from matplotlib.image import imread
    lesson = next(path for path in LESSONS if build.image_sources((quick_site / f"{path.stem}.html").read_text()))
    for name in (build.INDEX, f"{lesson.stem}.html"):
        shot = tmp_path / f"{Path(name).stem}.png"
        result = chromium(f"--screenshot={shot}", "--window-size=1200,2000", (quick_site / name).as_uri())
        assert shot.is_file(), f"no screenshot of {name}: {result.stderr[-2000:]}"
        pixels = imread(shot)[..., :3]
        assert pixels.shape[:2] == (2000, 1200) and np.std(pixels) > 0.05, f"{name}: blank screenshot"

    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS.format(url=(quick_site / f"{lesson.stem}.html").as_uri()), encoding="utf-8")
    result = chromium("--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom",
                      harness.as_uri())
    found = re.search(r"<pre id=\"result\">([^<]*)</pre>", result.stdout)
    assert found and found.group(1).startswith("["), f"harness: {found and found.group(1)}\n{result.stderr[-2000:]}"
    sizes = json.loads(found.group(1))
    expected = len(build.image_sources((quick_site / f"{lesson.stem}.html").read_text(encoding="utf-8")))
    assert len(sizes) == expected and all(w > 50 and h > 50 for w, h in sizes), sizes
