"""Every example runs to the end in --quick mode, as a user runs it, and writes its figures and numbers.

Each example is started as `python examples/<name>.py --quick --out <tmp>` from the repository root, in
a fresh interpreter, with MINIMOSAIC_DATA_DIR as the README says: the environment's if set (CI sets it
to the shared data folder), else the shared data folder next to the checkout. BLAS runs single-threaded: the matrices are small, and threads
that spin for a busy core only slow a shared machine down.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    "length_extrapolation": ["by_position.png"],
    "peek_ahead_ablation": ["accuracy.png", "by_offset.png"],
    "memory_units": ["moons_context_error.png", "summary.png"],
    "time_series": ["context_error.png", "heads.png"],
    "memory_hierarchy": ["shakespeare_by_position.png", "languages.png"],
}
NEEDS_DATA = {"shakespeare_char", "length_extrapolation", "memory_hierarchy"}


def check_length_extrapolation(r):
    """The mosaic and the NoPE GPT read 4T, the GPT with learned positions stops at T; past T the
    mosaic's loss stays below chance (ln vocab) after its 20 steps."""
    T, models = r["block_size"], r["models"]
    assert models["GPT (learned positions)"]["window"] == T
    assert models["GPT (learned positions)"]["first_extra"]["values"] == []
    for label in ("Memory Mosaic", "GPT (NoPE)"):
        curve = np.asarray(models[label]["per_position_mean"])
        assert models[label]["window"] == 4 * T and curve.shape == (4 * T,) and np.isfinite(curve).all()
    assert np.mean(models["Memory Mosaic"]["per_position_mean"][T:]) < math.log(r["vocab_size"])
    d = r["shape"]["n_embd"]
    assert models["GPT (learned positions)"]["n_params"] - models["GPT (NoPE)"]["n_params"] == T * d


def check_peek_ahead_ablation(r):
    """Fixed scalars stay fixed; without peek-ahead one layer is far behind the paper's layer."""
    v = r["variants"]
    paper, no_peek = v["as in the paper (learned c, lambda)"], v["no peek-ahead (c = 1)"]
    assert paper["final_accuracy"]["mean"] > no_peek["final_accuracy"]["mean"] + 0.3
    assert np.all(np.asarray(no_peek["runs"][0]["peek"]) == 1.0)
    assert np.allclose(v["long leaky average (lambda = 0.9)"]["runs"][0]["decay"], 0.9, atol=1e-5)
    assert np.allclose(v["no leaky average (lambda = 0)"]["runs"][0]["decay"], 0.0, atol=1e-12)
    assert not np.allclose(paper["runs"][0]["peek"], 1.0)


def check_memory_units(r):
    """Every head count ran on both tasks; one head is less pure than sixteen, and its one-step error
    between the longest single period and the joint period is above four heads'; the parameter count
    hardly depends on the heads."""
    moons, languages = r["moons"]["by_heads"], r["languages"]["by_heads"]
    assert sorted(map(int, moons)) == sorted(map(int, languages)) == [1, 2, 4, 8, 16]
    assert moons["16"]["mean_purity"]["mean"] > moons["1"]["mean_purity"]["mean"] + 0.1
    assert moons["4"]["one_step_longest_to_joint"]["mean"] < moons["1"]["one_step_longest_to_joint"]["mean"]
    assert all(0 <= x["final_accuracy"]["mean"] <= 1 for x in languages.values())
    counts = [x["n_params"] for x in languages.values()]
    assert max(counts) / min(counts) < 1.01


def check_time_series(r):
    """Equal parameters to 1%; both models beat predicting 0; one ablation row per head and layer."""
    models = r["models"]
    mosaic, gpt = models["Memory Mosaic"], models["GPT"]
    assert abs(mosaic["n_params"] / gpt["n_params"] - 1) < 0.01
    for m in (mosaic, gpt):
        assert m["mse"]["mean"] < models["predict 0"]["mse"]
        heads = np.asarray(m["runs"][0]["heads"])
        assert heads.shape == (2 * 4, len(r["channels"]))
        if m["heads_that_matter"]["mean"] > 0:
            assert 1 / len(r["channels"]) <= m["specialisation"]["mean"] <= 1


def check_memory_hierarchy(r):
    """Every configuration ran every seed on both tasks, with counts within 1% of v1's (persistent slots
    trade for the options' weights) and the v2 options really on; every Shakespeare loss is finite and
    below chance (ln vocab) after its 15 steps, every loss curve covers the window, accuracies are
    shares, and the bigram rule is ahead of the unigram rule."""
    labels = ["v1 (2024)", "adaptive bandwidth", "gated keys", "3 levels", "v2 (all three)"]
    text, languages = r["shakespeare"]["models"], r["languages"]["models"]
    assert list(text) == list(languages) == labels
    T = r["settings"]["shape"]["block_size"]
    for task in (text, languages):
        v1 = task["v1 (2024)"]["n_params"]
        for m in task.values():
            assert [run["seed"] for run in m["runs"]] == r["seeds"]
            assert abs(m["n_params"] / v1 - 1) < 0.01
        assert task["v2 (all three)"]["config"]["memory_levels"] == 3
        assert task["v2 (all three)"]["config"]["pmem_size"] < task["v1 (2024)"]["config"]["pmem_size"]
        assert task["gated keys"]["config"]["gated_keys"] and task["adaptive bandwidth"]["config"]["adaptive_bandwidth"]
    for m in text.values():
        losses = [run["val_loss"] for run in m["runs"]]
        assert np.isfinite(losses).all() and max(losses) < math.log(r["shakespeare"]["vocab_size"])
        assert np.asarray(m["per_position_mean"]).shape == (T,) and np.isfinite(m["per_position_mean"]).all()
    for m in languages.values():
        assert all(0 <= run["final_accuracy"] <= 1 and np.isfinite(run["final_loss"]) for run in m["runs"])
    rules = r["languages"]["rules"]
    assert rules["in-context bigram rule"]["accuracy"] > rules["in-context unigram rule"]["accuracy"]


CHECKS = {"length_extrapolation": check_length_extrapolation, "peek_ahead_ablation": check_peek_ahead_ablation,
          "memory_units": check_memory_units, "time_series": check_time_series,
          "memory_hierarchy": check_memory_hierarchy}
NEEDS_SHAKESPEARE = pytest.mark.skipif(not HAVE_SHAKESPEARE,
                                       reason=f"tinyshakespeare.txt not found in {DATA_DIR}")


def test_every_example_is_tested():
    scripts = {p.stem for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXAMPLES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=NEEDS_SHAKESPEARE) if n in NEEDS_DATA else n
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
    if name in CHECKS:  # the numbers behind the figures
        CHECKS[name](numbers)


def test_an_example_without_its_data_says_so_in_one_line(tmp_path):
    """No tinyshakespeare and no network: one line and exit code 2, not a traceback."""
    env = {**os.environ, "MINIMOSAIC_DATA_DIR": str(tmp_path / "empty"), "MPLBACKEND": "Agg",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # (no network either way)
    result = subprocess.run([sys.executable, "examples/shakespeare_char.py", "--quick", "--out", str(tmp_path / "o")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download 'shakespeare'"), result.stderr
