"""Every example runs to the end in --quick mode, as a user runs it, and writes its figures and numbers.

Each example is started as `python examples/<name>.py --quick --out <tmp>` from the repository root, in
a fresh interpreter, with MINIMOSAIC_DATA_DIR as the README says: the environment's if set (CI sets it
to the shared data folder), else the shared data folder next to the checkout. BLAS runs single-threaded: the matrices are small, and threads
that spin for a busy core only slow a shared machine down.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MINIMOSAIC_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
HAVE_SHAKESPEARE = (DATA_DIR / "tinyshakespeare.txt").is_file()

EXAMPLES = {  # name: the figures it must write
    "three_moons": ["context_error.png", "weights.png", "disentanglement.png"],
    "induction_head": ["accuracy.png"],
    "in_context_languages": ["accuracy.png", "by_position.png"],
    "shakespeare_char": ["curves.png", "per_position.png"],
    "tokens": ["curves.png", "per_position.png"],
}
NEEDS_SHAKESPEARE = pytest.mark.skipif(not HAVE_SHAKESPEARE,
                                       reason=f"tinyshakespeare.txt not found in {DATA_DIR}")


def test_every_example_is_tested():
    scripts = {p.stem for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXAMPLES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=NEEDS_SHAKESPEARE) if n == "shakespeare_char" else n
                                  for n in EXAMPLES])
def test_example_runs_quick(name, tmp_path):
    out = tmp_path / name
    env = {**os.environ, "MINIMOSAIC_DATA_DIR": str(DATA_DIR), "MPLBACKEND": "Agg",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, f"examples/{name}.py", "--quick", "--out", str(out)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (f"{name} exited with {result.returncode}\n--- stdout (end)\n"
                                    f"{result.stdout[-3000:]}\n--- stderr (end)\n{result.stderr[-3000:]}")
    for figure in EXAMPLES[name]:
        path = out / figure
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} did not write {figure}"
    numbers = json.loads((out / "results.json").read_text())
    assert numbers["quick"] is True


def test_an_example_without_its_data_says_so_in_one_line(tmp_path):
    """No tinyshakespeare and no network: one line and exit code 2, not a traceback."""
    env = {**os.environ, "MINIMOSAIC_DATA_DIR": str(tmp_path / "empty"), "MPLBACKEND": "Agg",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # (no network either way)
    result = subprocess.run([sys.executable, "examples/shakespeare_char.py", "--quick", "--out", str(tmp_path / "o")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download 'shakespeare'"), result.stderr
