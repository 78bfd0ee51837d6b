"""Memory Mosaics v2 (Zhang & Bottou, arXiv 2507.03285) as options of the model: the gated leaky average
against the recurrence by hand and against the same maths composed from primitive ops, the adaptive
bandwidth against its formula and against Gaussian kernel smoothing, the short-term / long-term masks
against their definitions, and for every option: float64 gradient checks, causality, cached generation
equal to the full forward pass, the fast layer equal to the plain core, and the command line."""
import numpy as np
import pytest
from conftest import assert_user_error, grads_of, invoke, rand_tensor, stepwise_logits

from minimosaic import nn, ops
from minimosaic import memories as mm
from minimosaic.errors import MinimosaicError
from minimosaic.gradcheck import gradcheck
from minimosaic.models import ModelConfig, build_model
from minimosaic.tensor import Tensor, no_grad

TINY = dict(vocab_size=11, n_layer=2, n_head=2, n_embd=8, block_size=12, pmem_size=6)
OPTIONS = {  # name: the v2 settings of a tiny model (windows small enough to matter in 20 tokens)
    "adaptive bandwidth": dict(adaptive_bandwidth=True),
    "gated keys": dict(gated_keys=True),
    "three levels": dict(memory_levels=3, short_window=4, long_skip=3),
    "all three": dict(adaptive_bandwidth=True, gated_keys=True, memory_levels=3, short_window=3, long_skip=3),
}


def tiny(seed=0, dtype=np.float64, **changes):
    nn.manual_seed(seed)
    model = build_model(ModelConfig(**{**TINY, **changes})).to(dtype=dtype)
    perturb_gates(model, seed)
    return model


def perturb_gates(model, seed):
    """Gate weights start at 0 (the 2024 leaky average); give them values so the gates really vary."""
    rng = np.random.default_rng(seed + 100)
    for name, p in model.named_parameters():
        if name.endswith(("W_gate.weight", "W_decay.weight")):
            p.data = (0.5 * rng.standard_normal(p.shape)).astype(p.dtype)


def random_ids(rng, shape):
    return rng.integers(0, TINY["vocab_size"], shape)


# ---------------------------------------------------------------- the gated leaky average (section 3.2)
def gated_leaky_average_as_matrix(x, gate, decay):
    """kbar = M x with M[t, s] = g_s prod_{r=s+1..t} lambda_r (s <= t), from primitive ops: the products
    are exp of differences of the cumulative sums of log lambda (O(T^2 d), the T x T way)."""
    xp, T = x.xp, x.shape[2]
    upper = xp.triu(xp.ones((T, T), x.dtype))                                    # [r <= t]
    cumulative = ops.log(decay) @ Tensor(upper)                                  # (B, H, T): sum_{r<=t} log lambda_r
    lags = cumulative.reshape(*cumulative.shape, 1) - cumulative.reshape(*cumulative.shape[:2], 1, T)
    lower = xp.tri(T, T, 0, dtype=bool)                                          # s <= t
    weights = ops.exp(ops.where(lower, lags, -np.inf)) * gate.reshape(*gate.shape[:2], 1, T)
    return weights @ x                                                           # (B, H, T, hs)


def gate_inputs(rng, shape, T):
    B, H = shape
    return (rand_tensor((B, H, T, 3), rng=rng), Tensor(rng.uniform(0.3, 2.0, (B, H, T)), requires_grad=True),
            Tensor(rng.uniform(0.05, 0.95, (B, H, T)), requires_grad=True))


def test_gated_leaky_average_is_the_recurrence(rng):
    x, gate, decay = (t.data for t in gate_inputs(rng, (2, 3), 9))
    initial = rng.standard_normal((2, 3, 1, 3))
    running, expected = initial[:, :, 0], np.empty_like(x)
    for t in range(9):  # by hand
        running = gate[:, :, t, None] * x[:, :, t] + decay[:, :, t, None] * running
        expected[:, :, t] = running
    got = mm.gated_leaky_average(Tensor(x), Tensor(gate), Tensor(decay), initial).data
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 7, 30])
def test_gated_leaky_average_equals_the_t_by_t_matrix_values_and_gradients(rng, T):
    inputs = list(gate_inputs(rng, (2, 3), T))
    upstream = rng.standard_normal((2, 3, T, 3))
    ours, our_grads = grads_of(mm.gated_leaky_average, inputs, upstream)
    ref, ref_grads = grads_of(gated_leaky_average_as_matrix, inputs, upstream)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(our_grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_gated_leaky_average_gradcheck(rng):
    gradcheck(mm.gated_leaky_average, list(gate_inputs(rng, (2, 2), 6)), names=["x", "gate", "decay"])
    initial = rng.standard_normal((2, 2, 1, 3))  # continuing a sum: the decay at t = 0 now matters
    gradcheck(lambda x, g, d: mm.gated_leaky_average(x, g, d, initial), list(gate_inputs(rng, (2, 2), 5)))


def test_with_a_gate_of_one_and_a_constant_decay_it_is_the_2024_leaky_average(rng):
    x = rng.standard_normal((2, 3, 8, 4))
    lam = rng.uniform(0.1, 0.9, 3)
    gated = mm.gated_leaky_average(Tensor(x), Tensor(np.ones((2, 3, 8))), Tensor(np.broadcast_to(lam[:, None], (2, 3, 8))))
    np.testing.assert_allclose(gated.data, mm.leaky_average(Tensor(x), Tensor(lam)).data, rtol=1e-13)


def test_gated_key_extractor_starts_as_the_2024_one_then_its_gates_follow_the_input(rng):
    nn.manual_seed(1)
    plain = mm.KeyExtractor(8, 2).to(dtype=np.float64)
    gated = mm.KeyExtractor(8, 2, gated=True).to(dtype=np.float64)
    for name, p in plain.named_parameters():
        dict(gated.named_parameters())[name].data = p.data.copy()
    x = Tensor(rng.standard_normal((2, 6, 8)))
    np.testing.assert_allclose(gated(x).data, plain(x).data, rtol=1e-13)        # zero gate weights
    gated.W_gate.weight.data = rng.standard_normal((8, 2))
    gated.W_decay.weight.data = rng.standard_normal((8, 2))
    g, lam = (a.data for a in gated.gates(x))
    z_g, z_l = x.data @ gated.W_gate.weight.data, x.data @ gated.W_decay.weight.data       # (B, T, H)
    b = mm.EXP_SCALING * gated.leak_rate.data
    np.testing.assert_allclose(g, np.exp(z_g).transpose(0, 2, 1), rtol=1e-12)
    np.testing.assert_allclose(lam, np.exp(-np.abs(z_l + b)).transpose(0, 2, 1), rtol=1e-12)
    assert np.ptp(lam, axis=-1).min() > 1e-3 and np.all((lam > 0) & (lam <= 1))  # time-variant, a decay
    x = rand_tensor((2, 5, 8), rng=rng)
    gradcheck(lambda x: gated(x), [x])
    gradcheck(lambda *ps: gated(x.detach()), gated.parameters(), mode="random", directions=8)


# ---------------------------------------------------------------- the adaptive bandwidth (section 3.1)
def test_adaptive_bandwidth_is_beta1_n_to_the_alpha_plus_beta0(rng):
    bandwidth = mm.AdaptiveBandwidth(3).to(dtype=np.float64)
    bandwidth.log_beta0.data = rng.uniform(-0.2, 0.2, 3)
    bandwidth.log_beta1.data = rng.uniform(-0.2, 0.2, 3)
    bandwidth.alpha_logit.data = rng.standard_normal(3)
    counts = np.array([0, 1, 2, 5, 64])
    beta0, beta1 = np.exp(10 * bandwidth.log_beta0.data), np.exp(10 * bandwidth.log_beta1.data)
    alpha = 1 / (1 + np.exp(-bandwidth.alpha_logit.data))
    expected = beta1[:, None] * np.maximum(counts, 1)[None, :] ** alpha[:, None] + beta0[:, None]
    np.testing.assert_allclose(bandwidth(counts).data[..., 0], expected, rtol=1e-12)
    assert np.all(np.diff(expected[:, 1:], axis=1) > 0)  # more stored pairs: a narrower kernel
    gradcheck(lambda *ps: bandwidth(counts), bandwidth.parameters())


def test_adaptive_context_memory_is_gaussian_kernel_smoothing_with_beta_of_n(rng):
    """y_t = sum_s exp(-beta(n_t) |k_t - k_s|^2) v_s / sum, over the pairs s < t, unit keys (then W_o)."""
    nn.manual_seed(2)
    memory = mm.ContextMemory(8, 2, adaptive_bandwidth=True).to(dtype=np.float64)
    memory.bandwidth.alpha_logit.data = rng.standard_normal(2)
    x = Tensor(rng.standard_normal((2, 6, 8)))
    k, v = memory.key(x).data, memory.value(x).data                              # (B, H, T, hs)
    np.testing.assert_allclose(np.linalg.norm(k, axis=-1), 1, rtol=1e-9)
    beta = memory.bandwidths(6)                                                  # (H, T)
    y = np.zeros_like(v)
    for h in range(2):
        for t in range(1, 6):
            y[:, h, t] = mm.kernel_smoothing(Tensor(k[:, h, t:t + 1]), Tensor(k[:, h, :t]), Tensor(v[:, h, :t]),
                                             beta[h, t]).data[:, 0]
    expected = mm.merge_heads(Tensor(y)).data @ memory.W_o.weight.data
    np.testing.assert_allclose(memory(x).data.reshape(12, 8), expected, rtol=1e-9, atol=1e-12)


def test_adaptive_context_memory_gradcheck(rng):
    nn.manual_seed(3)
    memory = mm.ContextMemory(8, 2, adaptive_bandwidth=True).to(dtype=np.float64)
    x = rand_tensor((2, 5, 8), rng=rng)
    gradcheck(lambda x: memory(x), [x])
    for name, p in memory.named_parameters():  # each on its own, so a failure names it
        gradcheck(lambda *ps: memory(x.detach()), [p], mode="full" if p.size <= 16 else "random",
                  directions=4, names=[name])


# ---------------------------------------------------------------- short-term and long-term memory (section 3.3)
@pytest.mark.parametrize("past", [0, 1, 5])
def test_memory_mask_by_its_definition(past):
    np.testing.assert_array_equal(mm.memory_mask(np, 4, past), mm.causal_mask(np, 4, past, False))
    for skip, window, first in ((2, None, 0), (0, 3, 0), (1, 3, 2), (0, 1, 0)):
        first = min(first, past)
        got = mm.memory_mask(np, 4, past, first, skip, window)
        for i in range(4):
            p = past + i
            for j in range(past + 4 - first):
                s = first + j
                assert got[i, j] == (s < p - skip and (window is None or s >= p - window)), (skip, window, i, j)


def test_three_levels_split_the_past_between_short_and_long_term_memory(rng):
    model = tiny(memory_levels=3, short_window=3, long_skip=3)
    found = model.inspect(random_ids(rng, (1, 9)))[0]
    long_term, short_term = found["long_term"][0], found["short_term"][0]        # (H, T, T)
    t, s = np.arange(9)[:, None], np.arange(9)[None, :]
    assert np.all(long_term[:, ~(s < t - 3)] == 0) and np.all(short_term[:, ~((s < t) & (s >= t - 3))] == 0)
    np.testing.assert_allclose(long_term[:, 4:].sum(-1), 1, rtol=1e-9)         # pairs 0..t-4 exist from t = 4
    np.testing.assert_allclose(short_term[:, 1:].sum(-1), 1, rtol=1e-9)
    assert set(found["levels"]) == {"long_term", "short_term", "persistent"}


def test_short_term_memory_forgets_what_lies_beyond_its_window(rng):
    """Values peek one token ahead and keys leak, so a token at position u reaches pair u - 1 on; the
    short-term memory at t reads pairs >= t - 3, and the keys' leak is turned off to keep it exact."""
    nn.manual_seed(4)
    short = mm.ContextMemory(8, 2, window=3).to(dtype=np.float64)
    short.key.leak_rate.data[:] = 1e3  # lambda = exp(-1e4) = 0: keys of the present token only
    x = rng.standard_normal((1, 10, 8))
    changed = x.copy()
    changed[:, 2] = rng.standard_normal(8)  # touches pairs 1 and 2, seen by t <= 5 only
    a, b = short(Tensor(x)).data, short(Tensor(changed)).data
    np.testing.assert_allclose(a[:, 6:], b[:, 6:], rtol=0, atol=1e-13)
    assert not np.allclose(a[:, 3:6], b[:, 3:6])
    nn.manual_seed(4)
    full = mm.ContextMemory(8, 2).to(dtype=np.float64)
    full.key.leak_rate.data[:] = 1e3
    assert not np.allclose(full(Tensor(x)).data[:, 6:], full(Tensor(changed)).data[:, 6:])


# ---------------------------------------------------------------- every option: the model
@pytest.mark.parametrize("option", list(OPTIONS))
def test_model_loss_gradcheck_every_parameter(rng, option):
    model = tiny(**OPTIONS[option])
    ids, targets = random_ids(rng, (2, 7)), random_ids(rng, (2, 7))
    loss = lambda *ps: model.loss(ids, targets)
    for name, p in model.named_parameters():
        if ".persistent." in name or name.startswith(("token_embedding", "ln_f")):
            continue  # unchanged by v2: tests/test_models.py checks them
        gradcheck(loss, [p], mode="full" if p.size <= 16 else "random", directions=3, names=[name])


@pytest.mark.parametrize("option", list(OPTIONS))
def test_block_gradcheck_wrt_its_input(rng, option):
    block = tiny(**OPTIONS[option]).blocks[0]
    x = Tensor(rng.standard_normal((2, 8, 8)), requires_grad=True)
    gradcheck(lambda x: block(x), [x])


@pytest.mark.parametrize("option", list(OPTIONS))
def test_changing_a_token_changes_no_earlier_logits(rng, option):
    model = tiny(**OPTIONS[option])
    ids = random_ids(rng, (2, 12))
    for t in (0, 4, 9):
        for k in (1, 2):
            if t + k >= 12:
                continue
            changed = ids.copy()
            changed[:, t + k] = (changed[:, t + k] + 1 + rng.integers(0, 9, 2)) % 11
            a, b = model(ids).data, model(changed).data
            np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-12)
            assert not np.allclose(a[:, t + k], b[:, t + k])


@pytest.mark.parametrize("option", list(OPTIONS))
def test_cached_logits_equal_full_recomputation(rng, option):
    model = tiny(**OPTIONS[option])
    ids = random_ids(rng, 20)  # past block_size and far past the windows
    full = model(ids[None]).data[0]
    for split in (1, 6):
        stepwise, cache = stepwise_logits(model, ids, split)
        np.testing.assert_allclose(stepwise, full, rtol=1e-10, atol=1e-12)
    if OPTIONS[option].get("memory_levels") == 3:  # the short-term cache keeps its window only
        block = cache["blocks"][0]
        window = OPTIONS[option]["short_window"]
        assert block["short_term"]["keys"].shape[2] == window and block["short_term"]["first"] == 20 - window
        assert block["long_term"]["keys"].shape[2] == 20 and "first" not in block["long_term"]


@pytest.mark.parametrize("option", list(OPTIONS))
def test_generate_with_and_without_cache_agree(rng, option):
    model = tiny(**OPTIONS[option])
    prompt = random_ids(rng, 4)
    cached = model.generate(prompt, 14, temperature=1.0, seed=3)
    np.testing.assert_array_equal(cached, model.generate(prompt, 14, temperature=1.0, seed=3, use_cache=False))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_fast_layer_gives_the_plain_core_result_for_v2_models(rng, option, monkeypatch, used):
    """fast.enable() with tiles small enough that the tiled attention runs on the v2 masks: same loss and
    gradients as the plain core (the gated scan and the bandwidth are not replaced: plain in both)."""
    from minimosaic import fast
    from minimosaic.fast import ops as fast_ops
    monkeypatch.setattr(fast_ops, "SMALL_ATTENTION", 0)
    monkeypatch.setattr(fast_ops, "TILE_SCORES", 24)
    model = tiny(**OPTIONS[option])
    ids, targets = random_ids(rng, (2, 10)), random_ids(rng, (2, 10))
    results = []
    for fast_on in (False, True):
        with fast.enabled(fast_on):
            model.zero_grad()
            loss = model.loss(ids, targets)
            loss.backward()
            results.append((loss.item(), [p.grad.copy() for p in model.parameters()]))
    assert used.get("memories.softmax_attention")  # the tiled attention ran on the v2 masks
    (plain, plain_grads), (quick, quick_grads) = results
    np.testing.assert_allclose(quick, plain, rtol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), quick_grads, plain_grads):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=name)


def test_v2_model_under_fp16_autocast_keeps_float32_sums_parameters_and_loss(rng):
    from minimosaic import precision
    x16 = Tensor(rng.standard_normal((1, 2, 5, 3)).astype(np.float16))
    gate, decay = (Tensor(rng.uniform(0.2, 0.9, (1, 2, 5)).astype(np.float16)) for _ in range(2))
    assert mm.gated_leaky_average(x16, gate, decay).dtype == np.float32  # the leaky sums stay float32
    model = tiny(dtype=np.float32, **OPTIONS["all three"])
    ids = random_ids(rng, (2, 9))
    with no_grad():
        reference = model.loss(ids[:, :-1], ids[:, 1:]).item()
    with precision.autocast("fp16"):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert loss.dtype == np.float32 and abs(loss.item() - reference) < 0.05
    assert all(p.dtype == np.float32 and p.grad.dtype == np.float32 and np.all(np.isfinite(p.grad))
               for p in model.parameters())


# ---------------------------------------------------------------- the default stays the 2024 model
def test_options_are_off_by_default_and_an_old_config_loads_as_v1():
    config = ModelConfig()
    assert not (config.adaptive_bandwidth or config.gated_keys or config.memory_levels)
    old = {k: v for k, v in ModelConfig(**TINY).to_dict().items()
           if k not in ("adaptive_bandwidth", "gated_keys", "memory_levels", "short_window", "long_skip")}
    assert ModelConfig.from_dict(old) == ModelConfig(**TINY)
    names = [name for name, _ in build_model(ModelConfig(**TINY)).named_parameters()]
    assert not [n for n in names if any(w in n for w in ("W_gate", "W_decay", "bandwidth", "_term"))]
    assert len(names) == 1 + 2 * 16 + 1  # as in tests/test_models.py


def test_v2_parameters_are_the_documented_ones():
    model = tiny(**OPTIONS["all three"])
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for level in ("long_term", "short_term"):
        assert shapes[f"blocks.1.{level}.key.W_gate.weight"] == (8, 2)
        assert shapes[f"blocks.1.{level}.key.W_decay.weight"] == (8, 2)
        assert shapes[f"blocks.1.{level}.bandwidth.log_beta0"] == (2,)
        assert shapes[f"blocks.1.{level}.bandwidth.alpha_logit"] == (2,)
        assert f"blocks.1.{level}.key.log_scale" not in shapes  # the bandwidth replaces the key scale
    assert "blocks.1.persistent.key.log_scale" in shapes and "blocks.1.context.key.W_k.weight" not in shapes


@pytest.mark.parametrize("changes, words", [
    (dict(memory_levels=2), "memory_levels must be 3"),
    (dict(memory_levels=3, short_window=0), "short_window must be an integer >= 1"),
    (dict(memory_levels=3, long_skip=-1), "long_skip must be an integer >= 0"),
    (dict(memory_levels=3, short_window=8, long_skip=16), "short_window 8 is below long_skip 16"),
    (dict(gated_keys="yes"), "gated_keys must be true or false"),
    (dict(model="gpt", adaptive_bandwidth=True), "Memory Mosaic options"),
])
def test_config_refuses_bad_v2_settings_with_one_line(changes, words):
    with pytest.raises(MinimosaicError) as info:
        ModelConfig(**{**TINY, **changes}).validate()
    assert words in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- the command line
V2_FLAGS = ["--adaptive-bandwidth", "--gated-keys", "--memory-levels", "3", "--short-window", "4", "--long-skip", "2"]
TINY_RUN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--pmem-size", "16",
            "--batch-size", "4", "--eval-batches", "1", "--warmup", "2", "--log-interval", "2"]


def test_cli_trains_samples_evaluates_explains_and_resumes_a_v2_run(tmp_path, monkeypatch, capsys):
    from minimosaic import train as trainer
    from minimosaic.data import generate_stories
    text = tmp_path / "stories.txt"
    text.write_text(generate_stories(n_chars=20_000, seed=3))
    monkeypatch.setenv("MINIMOSAIC_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "run"
    code, stdout, err = invoke(capsys, "train", "--data", text, *TINY_RUN, *V2_FLAGS, "--steps", "2",
                               "--eval-interval", "2", "--out", out)
    assert code == 0, err
    assert "v2: adaptive_bandwidth, gated_keys, memory_levels 3 (short_window 4, long_skip 2)" in stdout
    model, _, meta = trainer.load_run(out)
    saved = meta["model_config"]
    assert (saved["adaptive_bandwidth"], saved["gated_keys"], saved["memory_levels"], saved["short_window"],
            saved["long_skip"]) == (True, True, 3, 4, 2)
    assert model.blocks[0].short_term.window == 4 and model.blocks[0].long_term.skip == 2
    code, stdout, err = invoke(capsys, "sample", out, "--max-new-tokens", "20")
    assert code == 0, err
    code, stdout, err = invoke(capsys, "eval", out)
    assert code == 0 and "validation" in stdout, err
    code, stdout, err = invoke(capsys, "explain", out, "-p", "Mira and Tom", "--top", "1", "--heatmap",
                               tmp_path / "heat.png")
    assert code == 0, err
    assert "answered by" in stdout and "short-term" in stdout and "long-term" in stdout and "beta" in stdout
    assert "gate" in stdout and (tmp_path / "heat.png").stat().st_size > 1000
    code, stdout, err = invoke(capsys, "train", "--out", out, "--resume", "--steps", "4")
    assert code == 0 and "done: step 4" in stdout, err


@pytest.mark.parametrize("flags, words", [
    (["--memory-levels", "2"], "--memory-levels 2"),
    (["--memory-levels", "3", "--short-window", "-4"], "short_window must be an integer >= 1"),
    (["--memory-levels", "3", "--long-skip", "-1"], "long_skip must be an integer >= 0"),
    (["--short-window", "8"], "--short-window applies to --memory-levels 3 only"),
    (["--model", "gpt", "--gated-keys"], "Memory Mosaic options"),
])
def test_cli_refuses_bad_v2_flags_with_one_line_and_exit_code_2(tmp_path, capsys, flags, words):
    assert_user_error(invoke(capsys, "train", "--steps", "1", "--out", tmp_path / "r", *flags), words)
    assert not (tmp_path / "r").exists()
