"""The benchmark harness: the FLOP counter against a brute-force count, the table and JSON, a tiny run.

No test looks at a timing: only at what the harness counts, formats and reports.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import GPU_SKIP_REASON, HAVE_GPU, leaky_average_as_matrix

from minimosaic import bench, nn, ops
from minimosaic.errors import MinimosaicError
from minimosaic.tensor import Tensor, no_grad

from minimosaic import memories, models

TINY = dict(vocab_size=11, n_layer=2, n_head=2, n_embd=8, block_size=6, batch_size=3, pmem_size=12,
            pmem_count=1, dropout=0.0, bias=False)
REFERENCE = Path(__file__).resolve().parent.parent / "reference"


def _build(model, sizes):
    nn.manual_seed(1)
    config = models.ModelConfig(model=model, **{k: v for k, v in sizes.items() if k != "batch_size"})
    return models.build_model(config)


def _counted_matmul_flops(monkeypatch, model, ids):
    """Run one forward with every matmul counted: 2 m k n per (m, k) @ (k, n), times the batch axes.

    The plain core's attention multiplies through ops.matmul; its leaky average is a recurrence (no
    product), so it is swapped for the dense (T, T) matrix form that `dense=True` counts.
    """
    monkeypatch.setattr(memories, "leaky_average", leaky_average_as_matrix)
    counted = []
    original = ops.matmul

    def counting(a, b):
        out = original(a, b)
        counted.append(2 * out.size * ops.as_tensor(a).shape[-1])
        return out
    monkeypatch.setattr(ops, "matmul", counting)
    monkeypatch.setattr(Tensor, "__matmul__", counting)
    monkeypatch.setattr(Tensor, "__rmatmul__", lambda self, other: counting(other, self))
    with no_grad():
        model(ids)
    return sum(counted)


@pytest.mark.parametrize("model", ["mosaic", "gpt"])
def test_forward_flops_match_a_count_of_the_executed_matmuls(monkeypatch, model):
    sizes = dict(TINY)
    ids = np.random.default_rng(0).integers(0, sizes["vocab_size"], (sizes["batch_size"], sizes["block_size"]))
    counted = _counted_matmul_flops(monkeypatch, _build(model, sizes), ids)
    assert counted == sum(bench.forward_flops(model, sizes, dense=True).values())


@pytest.mark.parametrize("model, pairs", [("mosaic", lambda T: T * (T - 1) // 2),  # strictly past
                                          ("gpt", lambda T: T * (T + 1) // 2)])   # past and present
def test_causal_count_uses_the_pairs_the_model_actually_weighs(model, pairs):
    """The causal T^2 term counts the (t, j) pairs that get a nonzero weight; check that number."""
    sizes = dict(TINY)
    T = sizes["block_size"]
    ids = np.random.default_rng(2).integers(0, sizes["vocab_size"], (2, T))
    with no_grad():
        layers = _build(model, sizes).inspect(ids)
    for layer in layers:
        weights = np.asarray(layer["context"])  # (B, H, T, T)
        nonzero = (weights != 0).sum(axis=(-1, -2))
        assert (nonzero == pairs(T)).all()
    causal, dense = bench.forward_flops(model, sizes), bench.forward_flops(model, sizes, dense=True)
    term = "context_memory" if model == "mosaic" else "attention"
    assert causal[term] == dense[term] * pairs(T) // (T * T)


def test_train_step_is_three_forwards_and_the_projection_terms_match_gpt_at_pmem_3_5_d():
    sizes = dict(TINY, n_embd=16, pmem_size=56)  # P = 3.5 C
    mosaic, gpt = bench.forward_flops("mosaic", sizes), bench.forward_flops("gpt", sizes)
    assert bench.train_step_flops("mosaic", sizes) == 3 * sum(mosaic.values())
    assert mosaic["projections"] + mosaic["persistent_memory"] == gpt["projections"]


def test_settings_and_overrides():
    settings = bench.resolve_settings("char-small", {"n_layer": 2, "batch_size": 4})
    assert (settings["n_layer"], settings["batch_size"], settings["n_embd"]) == (2, 4, 128)
    assert settings["dropout"] == 0.0 and settings["vocab_size"] == 65 and settings["pmem_size"] == 512
    assert bench.resolve_settings("gpt2-small-like")["n_embd"] == 768
    assert bench.parse_overrides(["n_layer=2", "dropout=0.1", "bias=true"]) == \
        {"n_layer": 2, "dropout": 0.1, "bias": True}
    for bad in (["n_layer"], ["depth=3"], ["n_layer=two"], ["bias=maybe"]):
        with pytest.raises(MinimosaicError):
            bench.parse_overrides(bad)
    with pytest.raises(MinimosaicError):
        bench.resolve_settings("huge")
    with pytest.raises(MinimosaicError):
        bench.resolve_settings("char-small", {"layers": 2})


TINY_OVERRIDES = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, pmem_size=32)


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench.run_bench("char-small", model="both", overrides=TINY_OVERRIDES, steps=2, warmup=1,
                             json_path=str(path), gen_context=12)
    return result, path


def test_run_bench_measures_both_models_in_children(tiny_result):
    result, path = tiny_result
    settings = bench.resolve_settings("char-small", TINY_OVERRIDES)
    assert [r["model"] for r in result["runs"]] == ["mosaic", "gpt"]
    for run in result["runs"]:
        assert run["steps"] == 2 and run["side"] == "ours"
        assert run["flops_per_step"] == bench.train_step_flops(run["model"], settings)
        assert run["ms_min"] <= run["ms_q1"] <= run["ms_median"] <= run["ms_q3"] <= run["ms_max"]
        assert run["tokens_per_s"] == pytest.approx(2 * 16 / (run["ms_median"] / 1000))
        assert run["params"] == _build(run["model"], settings).num_parameters()
        assert run["peak_rss_mb"] >= run["base_rss_mb"] > 0
        assert np.isfinite([run["loss_first"], run["loss_last"]]).all()
        gen = run["generation"]
        assert (gen["prompt"], gen["new_tokens"], gen["context"]) == (6, 6, 12)
        assert gen["cached_tokens_per_s"] > 0 and gen["uncached_tokens_per_s"] > 0
    assert result["ratios"] == [] and result["notes"] == []
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))


def test_each_side_is_measured_against_the_best_matmul_peak_its_processes_saw(tiny_result):
    """One child's peak measured while the machine was disturbed must not inflate its "% of peak": every
    run of a side is compared with the best peak of that side's runs, and keeps its own measurement."""
    result, _ = tiny_result
    for run in result["runs"]:
        assert run["peak_gflops"] == max(r["own_peak_gflops"] for r in result["runs"])
        assert run["peak_fraction"] == pytest.approx(run["gflops"] / run["peak_gflops"])
    runs = [dict(side="ours", gflops=50.0, peak_gflops=100.0), dict(side="ours", gflops=60.0, peak_gflops=200.0),
            dict(side="reference", gflops=40.0, peak_gflops=80.0)]
    bench._use_best_peaks(runs)
    assert [r["peak_fraction"] for r in runs] == [0.25, 0.3, 0.5]
    assert [r["own_peak_gflops"] for r in runs] == [100.0, 200.0, 80.0]
    assert [r["peak_gflops"] for r in runs] == [200.0, 200.0, 80.0]


def test_format_table_shows_every_run_and_ratio(tiny_result):
    result = dict(tiny_result[0])
    ours = result["runs"][0]
    theirs = dict(ours, side="reference", label="mosaic (official torch)", tokens_per_s=ours["tokens_per_s"] / 2,
                  peak_rss_mb=ours["peak_rss_mb"] * 4)
    result["runs"] = [ours, theirs]
    result["ratios"] = bench._ratios(result["runs"])
    result["notes"] = ["something was skipped"]
    text = bench.format_table(result)
    assert "mosaic (minimosaic)" in text and "mosaic (official torch)" in text
    assert f"{ours['tokens_per_s']:,.0f}" in text and "% of matmul peak" in text
    assert "tokens/s 2.00x" in text and "peak RSS 0.25x" in text
    assert "note: something was skipped" in text


def test_reference_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(MinimosaicError, match="not found"):
        bench.run_bench("char-small", overrides=TINY_OVERRIDES, steps=1, warmup=0,
                        reference_file=str(tmp_path / "missing.py"))
    fake = tmp_path / "mosaic_model.py"
    fake.write_text("# not the official file\n")
    monkeypatch.setattr(bench, "_torch_available", lambda: False)
    result = bench.run_bench("char-small", overrides=TINY_OVERRIDES, steps=1, warmup=0, generation=False,
                             reference_file=str(fake))
    assert len(result["runs"]) == 1 and "torch is not installed" in result["notes"][0]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None or not (REFERENCE / "mosaic_model.py").exists(),
                    reason="needs torch and the official reference/mosaic_model.py (see benchmarks/README.md)")
def test_reference_runs_under_the_same_protocol():
    result = bench.run_bench("char-small", model="mosaic", overrides=TINY_OVERRIDES, steps=2, warmup=1,
                             generation=False, reference_file=str(REFERENCE / "mosaic_model.py"),
                             reference_gpt_file=str(REFERENCE / "mosaic_model.py"))  # wrong file for gpt
    ours, theirs = result["runs"]
    assert theirs["side"] == "reference" and theirs["torch_threads"] == result["machine"]["threads"]
    assert theirs["flops_per_step"] == ours["flops_per_step"]
    assert abs(theirs["loss_first"] - np.log(65)) < 1.0
    assert result["ratios"][0]["tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert any("has no GPTConfig / GPT" in note for note in result["notes"])


@pytest.mark.skipif(HAVE_GPU, reason="checks the message a machine without a GPU gives")
def test_gpu_without_a_gpu_is_a_user_error():
    with pytest.raises(MinimosaicError):
        bench.run_bench("char-small", overrides=TINY_OVERRIDES, device="gpu", steps=1, warmup=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason=GPU_SKIP_REASON)
def test_run_bench_on_the_gpu_reports_gpu_memory():
    result = bench.run_bench("char-small", model="both", overrides=TINY_OVERRIDES, device="gpu", steps=2,
                             warmup=1, gen_context=12)
    for run in result["runs"]:
        assert run["gpu_mem_mb"] > 0 and "peak_rss_mb" not in run
        assert run["flops_per_step"] == bench.train_step_flops(run["model"], result["settings"])
    assert "GPU memory peak MiB" in bench.format_table(result)


def test_a_failed_side_is_a_note_and_nothing_measured_is_an_error(monkeypatch):
    def fail(side, job, threads, workdir, index):
        return None, f"{side} {job['model_name']} failed (exit 1): boom"
    monkeypatch.setattr(bench, "_run_child", fail)
    with pytest.raises(MinimosaicError, match="every benchmark failed: ours mosaic failed"):
        bench.run_bench("char-small", model="mosaic", overrides=TINY_OVERRIDES, steps=1, warmup=0,
                        generation=False)


def test_also_plain_times_the_plain_core_beside_the_fast_layer_and_compares_them(tiny_result):
    """The plain core and the fast layer in one run: the fast-layer / plain-core ratio is in the table.
    (The runs are synthesised from the tiny run's numbers: the children are tested above.)"""
    result = dict(tiny_result[0])
    fast_run = result["runs"][0]
    plain_run = dict(fast_run, label="mosaic (minimosaic, plain)", plain=True,
                     tokens_per_s=fast_run["tokens_per_s"] / 4)
    result["runs"] = [fast_run, plain_run]
    result["ratios"] = bench._ratios(result["runs"])
    assert [r["tokens_per_s"] for r in result["ratios"]] == [pytest.approx(4.0)]
    assert "mosaic: fast layer / plain core  tokens/s 4.00x" in bench.format_table(result)


def test_also_plain_runs_both_cores_in_children():
    result = bench.run_bench("char-small", model="mosaic", overrides=TINY_OVERRIDES, steps=1, warmup=0,
                             generation=False, also_plain=True)
    assert [r.get("plain") for r in result["runs"]] == [False, True]
    assert result["runs"][1]["label"] == "mosaic (minimosaic, plain)"
    assert result["runs"][0]["loss_first"] == pytest.approx(result["runs"][1]["loss_first"], rel=1e-5)


def test_lockstep_runs_the_sides_at_once_one_step_at_a_time(monkeypatch):
    """--lockstep: every side's child runs at the same time, yet their training steps never overlap: the
    turns (one step each) of all children lie one after another, and every side still gets its numbers."""
    monkeypatch.setattr(bench, "SETTLE_SECONDS", 0.01)
    result = bench.run_bench("char-small", model="both", overrides=TINY_OVERRIDES, steps=3, warmup=1,
                             generation=False, also_plain=True, lockstep=True)
    runs = result["runs"]
    assert len(runs) == 4 and result["lockstep"] and not result["notes"]
    assert all(len(run["turns"]) == 3 for run in runs)   # warm-up + steps, less the last (run to the end)
    spans = sorted(span for run in runs for span in run["turns"])
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert len({tuple(run["turns"][0]) for run in runs}) == 4
    assert "the sides in lockstep" in bench.format_table(result)


def test_a_side_that_fails_in_lockstep_is_a_note_and_the_others_run_on(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(bench, "SETTLE_SECONDS", 0.01)
    broken = tmp_path / "mosaic_model.py"
    broken.write_text("raise RuntimeError('boom in the official code')\n")
    result = bench.run_bench("char-small", model="mosaic", overrides=TINY_OVERRIDES, steps=2, warmup=0,
                             generation=False, reference_file=str(broken), lockstep=True)
    assert [run["label"] for run in result["runs"]] == ["mosaic (minimosaic)"]
    assert result["notes"] == ["reference mosaic failed (exit 1): RuntimeError: boom in the official code"]


def test_same_allocator_gives_the_official_process_our_malloc_setting(tmp_path, monkeypatch):
    """--same-allocator: the official code's child gets MALLOC_MMAP_MAX_=0 and a 1 GiB trim threshold
    (what fast.cpu.keep_freed_memory sets with mallopt); as shipped, it gets glibc's defaults."""
    seen = {}

    def fake_run(command, env, **kwargs):
        seen[json.loads(Path(command[-1]).read_text())["job"].get("same_allocator")] = env
        return subprocess_result()
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    for same in (False, True):
        bench._run_child("reference", dict(model_name="mosaic", same_allocator=same), 2, tmp_path, int(same))
    assert seen[True]["MALLOC_MMAP_MAX_"] == "0" and seen[True]["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)
    assert "MALLOC_MMAP_MAX_" not in seen[False]
    from minimosaic.fast import cpu
    assert int(bench.SAME_ALLOCATOR["MALLOC_TRIM_THRESHOLD_"]) == cpu.TRIM_THRESHOLD


def subprocess_result():
    class Done:
        returncode, stdout, stderr = 1, "", "not run"
    return Done()


def test_the_table_names_the_same_allocator_ratio(tiny_result):
    result = dict(tiny_result[0])
    ours = result["runs"][0]
    shipped = dict(ours, side="reference", label="mosaic (official torch)", tokens_per_s=ours["tokens_per_s"] / 2)
    same = dict(ours, side="reference", label="mosaic (official torch, same allocator)", same_allocator=True,
                tokens_per_s=ours["tokens_per_s"])
    result["runs"] = [ours, shipped, same]
    result["ratios"] = bench._ratios(result["runs"])
    text = bench.format_table(result)
    assert "mosaic: ours / official  tokens/s 2.00x" in text
    assert "mosaic: ours / official (same allocator)  tokens/s 1.00x" in text


def load_benchmark(name):
    """The script benchmarks/<name>.py as a module."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_op_profile_rows_page_faults_and_cpu_rates():
    """benchmarks/op_profile.py on a tiny mosaic: every memory op has a row, the rows add up to no more
    than the synchronised step, and --cpu-rates reports positive rates for this CPU."""
    op_profile = load_benchmark("op_profile")
    overrides = {k: v for k, v in TINY.items() if k not in ("pmem_count", "dropout", "bias")}
    result = op_profile.profile("char-small", "cpu", "mosaic", steps=1, warmup=1, overrides=overrides)
    rows = result["rows"]
    for name in ("softmax_attention fwd", "softmax_attention bwd", "leaky_average fwd", "normalize bwd", "adamw"):
        assert rows[name]["calls_per_step"] >= 1, name
    assert sum(r["ms_per_step"] for r in rows.values()) <= result["synced_step_ms"] * 1.01
    assert result["page_faults_per_step"] >= 0
    rates = op_profile.cpu_rates("char-small", overrides)
    numbers = [v for v in rates.values() if isinstance(v, (int, float))]
    assert len(numbers) >= 7 and all(v > 0 for v in numbers)
    assert "(sysfs)" in " ".join(rates) and rates["cpu"]


def test_rounds_interleave_the_sides_and_report_each_ratios_median(tiny_result, monkeypatch, tmp_path):
    """--rounds 3: every side is timed once per round, in the same order each round; each ratio is
    reported for every round with its median, and the columns are the last round's."""
    ours = tiny_result[0]["runs"][0]
    speeds = iter([100, 50, 120, 100, 90, 30])  # per call: ours, official, ours, official, ...
    calls = []

    def fake_child(side, job, threads, workdir, index):
        calls.append((side, index))
        label = "mosaic (minimosaic)" if side == "ours" else "mosaic (official torch)"
        return dict(ours, side=side, label=label, tokens_per_s=next(speeds)), None
    monkeypatch.setattr(bench, "_run_child", fake_child)
    reference = tmp_path / "mosaic_model.py"
    reference.write_text("")
    monkeypatch.setattr(bench, "_torch_available", lambda: True)
    result = bench.run_bench("char-small", model="mosaic", overrides=TINY_OVERRIDES, steps=1, warmup=0,
                             generation=False, reference_file=str(reference), rounds=3)
    assert calls == [("ours", 0), ("reference", 1), ("ours", 2), ("reference", 3), ("ours", 4), ("reference", 5)]
    (medians,) = result["ratio_medians"]
    assert medians["tokens_per_s"] == [2.0, 1.2, 3.0] and medians["median"] == 2.0
    assert result["ratios"][0]["tokens_per_s"] == 3.0 and result["runs"][0]["tokens_per_s"] == 90
    text = bench.format_table(result)
    assert "over 3 rounds" in text and "tokens/s 2.00x, 1.20x, 3.00x;  median 2.00x" in text
    with pytest.raises(MinimosaicError, match="rounds >= 1"):
        bench.run_bench("char-small", model="mosaic", overrides=TINY_OVERRIDES, rounds=0)


def test_tile_sweep_times_every_size_and_each_gives_the_rules_results(monkeypatch):
    """benchmarks/tile_sweep.py with sizes small enough that a tiny model's attention and elementwise
    passes are cut into many tiles and blocks on 2 workers: every case is timed at every multiple of the
    rule's size, the rule's size is restored afterwards, and cutting the work differently changes the
    results by float32 rounding only."""
    from minimosaic import fast
    from minimosaic.fast import cpu, ops as fast_ops
    tile_sweep = load_benchmark("tile_sweep")
    for module, name, value in ((fast_ops, "TILE_SCORES", 64), (fast_ops, "SMALL_ATTENTION", 0),
                                (cpu, "BLOCK_ELEMENTS", 64), (cpu, "ELEMENTWISE_MIN", 1)):
        monkeypatch.setattr(module, name, value)
    overrides = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=3, pmem_size=24)
    cpu.set_cpu_workers(2)
    try:
        with fast.enabled():
            results = tile_sweep.sweep("char-small", repeats=1, overrides=overrides)
    finally:
        cpu.set_cpu_workers(None)
    assert [r["name"].split(" (")[0] for r in results] == ["persistent memory attention",
                                                         "context memory attention", "layer norm", "GELU"]
    for r in results:
        assert r["rule"] == 64 and r["rule"] in r["sizes"] and len(r["sizes"]) == len(tile_sweep.FACTORS)
        assert all(0 < s < float("inf") for s in r["seconds"])
        assert r["max_difference"] < 1e-5, r["name"]
    assert fast_ops.TILE_SCORES == 64 and cpu.BLOCK_ELEMENTS == 64
    assert "best / rule's" in tile_sweep.table(results)


def test_ab_steps_alternates_an_earlier_fast_layer_with_todays_and_restores_todays(tmp_path):
    """benchmarks/ab_steps.py on a tiny model: an 'earlier' fast/ops.py (today's, its matmul counting its
    calls) and today's each time every step, the earlier one's replacements really run, and afterwards
    today's fast layer is registered again."""
    from minimosaic import fast, registry
    from minimosaic.fast import ops as fast_ops
    ab_steps = load_benchmark("ab_steps")
    earlier = tmp_path / "ops.py"
    earlier.write_text(Path(fast_ops.__file__).read_text() + (
        "\nCALLS = []\n_today_matmul = REPLACEMENTS['ops.matmul']\n\n\n"
        "def counting_matmul(*args, **kwargs):\n    CALLS.append(1)\n    return _today_matmul(*args, **kwargs)\n\n\n"
        "REPLACEMENTS['ops.matmul'] = counting_matmul\n"))
    overrides = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, pmem_size=24)
    try:
        before = ab_steps.load_before(str(earlier))
        times = ab_steps.compare(before, "char-small", "mosaic", steps=2, warmup=1, overrides=overrides)
        calls = registry.registered()["ops.matmul"]
        assert fast.is_enabled() and len(calls) == 1 and calls[0] is fast_ops.REPLACEMENTS["ops.matmul"]
    finally:
        fast.disable()
    assert sorted(times) == ["before", "today"] and all(len(t) == 2 and min(t) > 0 for t in times.values())
    assert len(before["ops.matmul"].__globals__["CALLS"]) >= 3 * 2   # its steps (warm-up and timed) ran it
    assert "median step" in ab_steps.report(times, str(earlier), "char-small", "mosaic")
    with pytest.raises(SystemExit, match="neither a file nor a git revision"):
        ab_steps.load_before("no-such-revision-anywhere")
