"""Every lesson runs to the end as a plain script (its self-checks are asserts), in quick mode.

Each lesson is run the way a student runs it, `python lessons/NN_name.py` from the repository root, in a
fresh interpreter with MINIMOSAIC_QUICK=1 (smaller sizes). A failing self-check exits non-zero, and the
test shows the end of the lesson's output, where the failing check printed its numbers.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))


def promised_figures(lesson):
    """The names in the lesson's promise_figures("a", "b", ...) call."""
    found = re.search(r"promise_figures\(([^)]*)\)", lesson.read_text(encoding="utf-8"))
    return re.findall(r"[\"']([^\"']+)[\"']", found.group(1)) if found else []


def test_the_course_is_numbered_without_gaps():
    numbers = [int(path.name[:2]) for path in LESSONS]
    assert numbers == list(range(1, len(numbers) + 1)), f"lesson numbers {numbers}"


@pytest.mark.parametrize("lesson", LESSONS, ids=[path.stem for path in LESSONS])
def test_lesson_runs_and_draws_the_figures_it_promises(lesson, tmp_path):
    """The lesson exits 0 (every check held), and each promised figure is a PNG that is not blank.
    Lessons 1-13 promise at least one figure."""
    # One BLAS thread: the lessons' matrices are small, and on a busy CI machine OpenBLAS's thread pool
    # can stall each small product for tens of milliseconds (the results are the same).
    env = {**os.environ, "MINIMOSAIC_QUICK": "1", "MPLBACKEND": "Agg", "OPENBLAS_NUM_THREADS": "1",
           "MINIMOSAIC_FIGURES": str(tmp_path)}
    result = subprocess.run([sys.executable, str(lesson.relative_to(ROOT))], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, (f"{lesson.name} exited with {result.returncode}\n--- stdout (end)\n"
                                    f"{result.stdout[-3000:]}\n--- stderr (end)\n{result.stderr[-3000:]}")
    promised = promised_figures(lesson)
    if int(lesson.name[:2]) <= 13:
        assert promised, f"{lesson.name} promises no figure (promise_figures(...) near its top)"
    from matplotlib.image import imread
    for name in promised:
        path = tmp_path / lesson.stem / f"{name}.png"
        assert path.is_file(), f"{lesson.name} did not save its figure {name}"
        pixels = imread(path)
        assert pixels.shape[0] > 50 and pixels.shape[1] > 50 and np.std(pixels[..., :3]) > 0.01, \
            f"{lesson.name}: figure {name} is blank"


@pytest.mark.parametrize("lesson", LESSONS, ids=[path.stem for path in LESSONS])
def test_lesson_is_a_percent_notebook(lesson):
    """Cells are marked `# %%` (jupytext percent format) and no outputs are stored in the file."""
    text = lesson.read_text(encoding="utf-8")
    assert "format_name: percent" in text and "\n# %% [markdown]\n" in text and "\n# %%\n" in text
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.reads(text, fmt="py:percent")
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert code_cells and all(not c.get("outputs") for c in code_cells)
