"""The trainer: exact resume, NaN handling, resume checks, configs, checkpoints (tiny models, CPU)."""
import json
import math

import numpy as np
import pytest

from minimosaic import backend, checkpoint, train as trainer
from minimosaic.fast import cuda_graph
from minimosaic.data import eval_batches, generate_stories
from minimosaic.errors import MinimosaicError

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, pmem_size=16, batch_size=4, warmup=2,
            lr=3e-3, min_lr=3e-4, eval_batches=2, log_interval=1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text(generate_stories(n_chars=30_000, seed=7))
    return path


def configs(text_file, out, **overrides):
    settings = dict(TINY, data=str(text_file), out=str(out))
    settings.update(overrides)
    return trainer.resolve_config(None, settings)


def run(text_file, out, resume=False, logger=None, **overrides):
    model_config, config = configs(text_file, out, **overrides)
    data = trainer.prepare_data(config, data_dir=out.parent / "cache")
    model_config.vocab_size = data.tokenizer.vocab_size
    return trainer.train(model_config, config, data, resume=resume, logger=logger)


def losses(out):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in trainer.read_log(out)]


class InterruptAt(trainer.TrainLogger):
    """Presses Ctrl-C (sends SIGINT to this process) right after the log record of `step`."""

    def __init__(self, step):
        self.step = step

    def log(self, record):
        if record["step"] == self.step:
            import os
            import signal
            os.kill(os.getpid(), signal.SIGINT)


def test_resume_gives_the_same_losses_step_for_step(text_file, tmp_path):
    # dropout and gradient accumulation on, so the dropout RNG and the sampler state must both be restored
    settings = dict(steps=10, eval_interval=4, dropout=0.1, grad_accum=2)
    straight = run(text_file, tmp_path / "straight", **settings)
    stopped = run(text_file, tmp_path / "stopped", logger=InterruptAt(5), **settings)
    assert stopped.interrupted and stopped.step == 5  # stopped between evaluations
    assert checkpoint.load_checkpoint(tmp_path / "stopped", "latest")[1]["step"] == 5
    resumed = run(text_file, tmp_path / "stopped", resume=True, **settings)
    assert resumed.step == 10 and not resumed.interrupted
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")  # exact, including val losses
    assert len(losses(tmp_path / "straight")) == 10
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)


def test_resume_drops_log_records_after_the_checkpoint(text_file, tmp_path):
    run(text_file, tmp_path / "r", steps=6, eval_interval=3)
    log = tmp_path / "r" / "log.jsonl"
    # a crash after step 3's checkpoint would leave records past it: fake one with latest from step 3
    latest = checkpoint.load_checkpoint(tmp_path / "r", "latest")
    assert latest[1]["step"] == 6
    arrays, meta = latest
    meta["step"] = 3  # pretend the last checkpoint was at step 3 (weights do not matter here)
    checkpoint.save_checkpoint(tmp_path / "r", "latest", arrays, meta)
    log.write_text(log.read_text() + '{"step": 7, "lo')  # and a line cut short
    run(text_file, tmp_path / "r", resume=True, steps=6, eval_interval=3)
    steps = [r["step"] for r in trainer.read_log(tmp_path / "r")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path, monkeypatch):
    real_build = trainer.build_model

    def build_with_nan_at_step_5(config):
        model = real_build(config)
        real_loss, calls = model.loss, []

        def loss(x, y):
            value = real_loss(x, y)
            if model.training:
                calls.append(1)
                if len(calls) == 5:
                    return value * float("nan")
            return value
        model.loss = loss
        return model

    monkeypatch.setattr(trainer, "build_model", build_with_nan_at_step_5)
    out = tmp_path / "nan"
    with pytest.raises(MinimosaicError) as error:
        run(text_file, out, steps=10, eval_interval=3)
    message = str(error.value)
    assert "loss became nan at step 5" in message and str(out / "latest.npz") in message
    arrays, meta = checkpoint.load_checkpoint(out, "latest")
    assert meta["step"] == 3
    assert all(np.isfinite(a).all() for a in arrays.values())
    assert all(math.isfinite(r["loss"]) for r in trainer.read_log(out))


@pytest.mark.parametrize("change, named", [
    (dict(n_layer=2), "n_layer"),
    (dict(n_embd=32), "n_embd"),
    (dict(model="gpt"), "model"),
    (dict(level="token", vocab_size=300), "level"),
    (dict(lr=1e-2), "lr"),
])
def test_resume_with_other_settings_names_the_difference(text_file, tmp_path, change, named):
    run(text_file, tmp_path / "r", steps=2, eval_interval=2)
    with pytest.raises(MinimosaicError, match=rf"cannot resume .*{named} "):
        run(text_file, tmp_path / "r", resume=True, steps=2, eval_interval=2, **change)


def test_resume_with_other_text_or_tokenizer_is_refused(text_file, tmp_path):
    run(text_file, tmp_path / "r", steps=2, eval_interval=2)
    other = tmp_path / "other.txt"
    other.write_text(generate_stories(n_chars=30_000, seed=8))
    with pytest.raises(MinimosaicError, match="training text"):
        run(other, tmp_path / "r", resume=True, steps=2, eval_interval=2)
    meta = trainer.read_run_meta(tmp_path / "r")
    model_config, config = configs(text_file, tmp_path / "r", steps=2, eval_interval=2)
    data = trainer.prepare_data(config, data_dir=tmp_path / "cache")
    data.tokenizer = type(data.tokenizer)(data.tokenizer.chars + "\u00e9")  # one more character
    with pytest.raises(MinimosaicError, match="tokenizer"):
        trainer.check_resume(meta, model_config, config, data)


def test_more_steps_may_be_asked_on_resume(text_file, tmp_path):
    run(text_file, tmp_path / "r", steps=3, eval_interval=3)
    result = run(text_file, tmp_path / "r", resume=True, steps=5, eval_interval=3)
    assert result.step == 5 and [r["step"] for r in trainer.read_log(tmp_path / "r")] == [1, 2, 3, 4, 5]


def test_new_run_refuses_a_folder_that_holds_one_and_resume_needs_one(text_file, tmp_path):
    run(text_file, tmp_path / "r", steps=2, eval_interval=2)
    with pytest.raises(MinimosaicError, match="already holds a run"):
        run(text_file, tmp_path / "r", steps=2, eval_interval=2)
    with pytest.raises(MinimosaicError, match="nothing to resume"):
        run(text_file, tmp_path / "empty", resume=True, steps=2)


def test_seeded_runs_are_identical_and_seeds_matter(text_file, tmp_path):
    run(text_file, tmp_path / "a", steps=3, eval_interval=3, dropout=0.1)
    run(text_file, tmp_path / "b", steps=3, eval_interval=3, dropout=0.1)
    run(text_file, tmp_path / "c", steps=3, eval_interval=3, dropout=0.1, seed=1)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def test_training_lowers_the_loss_and_writes_checkpoints(text_file, tmp_path):
    result = run(text_file, tmp_path / "r", steps=40, eval_interval=20, log_interval=5, lr=1e-2)
    records = trainer.read_log(tmp_path / "r")
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40]
    assert records[-1]["tokens"] == 40 * TINY["batch_size"] * TINY["block_size"]
    assert math.isclose(result.best_val_loss, min(r["val_loss"] for r in records if "val_loss" in r))
    # best.npz holds weights only; both load on the CPU into a model that gives the same logits
    best_arrays, best_meta = checkpoint.load_checkpoint(tmp_path / "r", "best")
    assert not any(k.startswith("optim.") for k in best_arrays)
    model, tokenizer, meta = trainer.load_run(tmp_path / "r", "latest")
    ids = np.asarray([tokenizer.encode("Once upon a time")], dtype=np.int64)
    result.model.eval()
    np.testing.assert_array_equal(model(ids).data, result.model(ids).data)
    assert meta["train_config"]["steps"] == 40 and meta["tokenizer"] == tokenizer.spec()


def test_evaluation_is_deterministic_and_restores_train_mode(text_file, tmp_path):
    result = run(text_file, tmp_path / "r", steps=1, eval_interval=1, dropout=0.5)
    model_config, config = configs(text_file, tmp_path / "r")
    data = trainer.prepare_data(config, data_dir=tmp_path / "cache")
    batches = eval_batches(data.val_ids, 16, 4, 2)
    model = result.model.train()
    assert trainer.evaluate(model, batches, "cpu") == trainer.evaluate(model, batches, "cpu")
    assert model.training


def test_gradient_accumulation_matches_one_big_batch(text_file, tmp_path):
    # 2 micro-batches of 4 draw the same windows as one batch of 8 (same sampler stream), and the
    # mean of two means of 4 is the mean of 8: the updates agree up to float32 rounding
    accum = run(text_file, tmp_path / "accum", steps=3, eval_interval=3, batch_size=4, grad_accum=2)
    big = run(text_file, tmp_path / "big", steps=3, eval_interval=3, batch_size=8, grad_accum=1)
    a = [r["loss"] for r in trainer.read_log(tmp_path / "accum")]
    b = [r["loss"] for r in trainer.read_log(tmp_path / "big")]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for (name, p), (_, q) in zip(accum.model.named_parameters(), big.model.named_parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-4, atol=1e-6, err_msg=name)


def test_failed_save_leaves_the_previous_checkpoint(text_file, tmp_path, monkeypatch):
    import os
    real_replace, saves = os.replace, []

    def flaky_replace(src, dst):
        if str(dst).endswith("latest.npz"):
            saves.append(dst)
            if len(saves) == 2:
                raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", flaky_replace)
    with pytest.raises(MinimosaicError, match="cannot write checkpoint"):
        run(text_file, tmp_path / "r", steps=6, eval_interval=3)
    assert checkpoint.load_checkpoint(tmp_path / "r", "latest")[1]["step"] == 3
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]


def test_split_shorter_than_a_block_is_a_user_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 10)  # 100 chars: the validation split has 10
    with pytest.raises(MinimosaicError, match="validation split has 10 tokens"):
        run(short, tmp_path / "r", steps=1)


def test_unwritable_out_is_a_user_error(text_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(MinimosaicError, match="cannot write to output folder"):
        run(text_file, blocker / "run", steps=1)


def test_resolve_config_layers_preset_and_overrides():
    model_config, config = trainer.resolve_config("char-small", dict(n_layer=2, lr=None, steps=7))
    assert (model_config.n_layer, model_config.n_embd, model_config.pmem_size) == (2, 128, 512)
    assert (config.steps, config.lr, config.batch_size) == (7, trainer.PRESETS["char-small"]["lr"], 32)
    model_config, config = trainer.resolve_config("tok-small", {})
    assert (config.level, config.tokenizer, config.vocab_size) == ("token", "bpe", 8192)
    assert model_config.n_embd == 256
    for preset in trainer.PRESETS:
        trainer.resolve_config(preset, {})[0].validate()
    with pytest.raises(MinimosaicError, match="unknown preset 'huge'"):
        trainer.resolve_config("huge", {})
    with pytest.raises(MinimosaicError, match="grad-accum is 0"):
        trainer.resolve_config(None, dict(grad_accum=0))
    with pytest.raises(MinimosaicError, match="device"):
        trainer.resolve_config(None, dict(device="tpu"))


def test_log_records_are_json_lines(text_file, tmp_path):
    run(text_file, tmp_path / "r", steps=2, eval_interval=2)
    for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line)["loss"], float)


@pytest.mark.slow
def test_default_preset_learns_more_than_character_frequencies(tmp_path):
    """End to end on the embedded stories (a few minutes): the default preset, shortened, must beat
    the best model that ignores context (the unigram entropy of the training characters)."""
    model_config, config = trainer.resolve_config("char-tiny", dict(steps=400, eval_interval=200,
                                                                    out=str(tmp_path / "r")))
    data = trainer.prepare_data(config, data_dir=tmp_path / "cache")
    model_config.vocab_size = data.tokenizer.vocab_size
    result = trainer.train(model_config, config, data)
    counts = np.bincount(np.asarray(data.train_ids), minlength=data.tokenizer.vocab_size)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    assert result.val_loss < unigram_entropy - 0.5, (result.val_loss, unigram_entropy)
    text = data.tokenizer.decode(result.model.generate(np.asarray(data.tokenizer.encode("Once upon")), 200,
                                                       temperature=0.8, seed=0))
    assert " the " in text


def test_time_limit_stops_the_run_with_a_last_evaluation_and_checkpoint(text_file, tmp_path):
    result = run(text_file, tmp_path / "timed", steps=10_000, eval_interval=1000, time_limit=1e-9)
    assert result.step == 1 and result.time_limited and not result.interrupted and result.val_loss is not None
    assert checkpoint.load_checkpoint(tmp_path / "timed", "latest")[1]["step"] == 1
    with pytest.raises(MinimosaicError, match="time-limit"):
        configs(text_file, tmp_path / "bad", time_limit=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason="CuPy with a CUDA GPU not available")
@pytest.mark.parametrize("train_on,load_on", [("gpu", "cpu"), ("cpu", "gpu")])
def test_a_run_trained_on_one_device_samples_on_the_other(text_file, tmp_path, train_on, load_on):
    """Checkpoints hold host arrays: a GPU run samples on the CPU and the other way round, with the same
    logits; resuming on the training device continues the run."""
    out = tmp_path / "run"
    result = run(text_file, out, steps=6, eval_interval=3, device=train_on)
    assert result.step == 6 and math.isfinite(result.val_loss)
    model, tokenizer, _ = trainer.load_run(out, device=load_on)
    ids = np.asarray([tokenizer.encode("Once upon a time")])
    trained = result.model
    np.testing.assert_allclose(backend.asnumpy(model(ids).data), backend.asnumpy(trained(ids).data),
                               rtol=1e-4, atol=1e-5)
    sample = model.generate(ids[0], 20, seed=0)
    assert sample.shape == (ids.shape[1] + 20,) and tokenizer.decode(sample.tolist())
    resumed = run(text_file, out, resume=True, steps=8, eval_interval=3, device=train_on)
    assert resumed.step == 8 and math.isfinite(resumed.val_loss)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason="CuPy with a CUDA GPU not available")
def test_a_gpu_run_with_the_graph_logs_what_the_eager_run_logs(text_file, tmp_path):
    """train() on the GPU with and without the graph: the same losses (to float32 rounding) step for step,
    through evaluations and checkpoints between replays; then a resume records a new graph and goes on."""
    settings = dict(steps=7, eval_interval=3, device="gpu")
    graphed = run(text_file, tmp_path / "graph", **settings)
    eager = run(text_file, tmp_path / "eager", cuda_graph=False, **settings)
    logged = list(zip(losses(tmp_path / "graph"), losses(tmp_path / "eager")))
    assert len(logged) == 7 and graphed.step == eager.step == 7
    for (s1, l1, v1), (s2, l2, v2) in logged:
        assert s1 == s2
        np.testing.assert_allclose(l1, l2, rtol=1e-4)
        assert (v1 is None) == (v2 is None) and (v1 is None or abs(v1 - v2) < 1e-3)
    resumed = run(text_file, tmp_path / "graph", resume=True, steps=9, eval_interval=3, device="gpu")
    assert resumed.step == 9 and np.isfinite(resumed.val_loss)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason="CuPy with a CUDA GPU not available")
def test_dropout_runs_eagerly_and_says_so(text_file, tmp_path):
    class Recorder(trainer.TrainLogger):
        def begin(self, info):
            self.mode = info["step_mode"]

    recorder = Recorder()
    run(text_file, tmp_path / "drop", logger=recorder, steps=2, eval_interval=2, device="gpu", dropout=0.1)
    assert recorder.mode.startswith("eager") and "dropout" in recorder.mode
    model_config, config = configs(text_file, tmp_path / "x", device="gpu")
    assert config.cuda_graph and cuda_graph.why_not_captured(config.device, model_config.dropout, config.grad_accum) is None


def test_train_runs_on_the_fast_layer_unless_plain_and_restores_it(text_file, tmp_path):
    """train() turns the fast layer on for the run (config.plain: the plain core), and leaves it as it
    found it. Both give the same losses, to float32 rounding."""
    from minimosaic import fast

    class Recorder(trainer.TrainLogger):
        def begin(self, info):
            self.core, self.fast_on = info["core"], fast.is_enabled()

    results = {}
    for plain in (False, True):
        recorder = Recorder()
        run(text_file, tmp_path / f"plain{plain}", logger=recorder, steps=6, eval_interval=3, plain=plain)
        assert recorder.core == ("plain core" if plain else "fast layer") and recorder.fast_on == (not plain)
        assert not fast.is_enabled()
        results[plain] = [loss for _, loss, _ in losses(tmp_path / f"plain{plain}")]
    np.testing.assert_allclose(results[False], results[True], rtol=2e-3)


def test_resume_on_two_threads_is_bitwise_the_uninterrupted_run_on_one_through_the_fast_layer(text_file, tmp_path,
                                                                                    monkeypatch):
    """CPU training is reproducible whatever the threads do: with the tiled attention cut into many tiles,
    a run interrupted and resumed on 2 threads ends with the weights of an uninterrupted run on 1 thread,
    bit for bit."""
    from minimosaic.fast import cpu
    from minimosaic.fast import ops as fast_ops
    monkeypatch.setattr(fast_ops, "TILE_SCORES", 64)
    monkeypatch.setattr(fast_ops, "SMALL_ATTENTION", 0)
    settings = dict(steps=8, eval_interval=4)
    try:
        cpu.set_cpu_workers(1)
        straight = run(text_file, tmp_path / "straight", **settings)  # one thread, uninterrupted
        cpu.set_cpu_workers(2)
        run(text_file, tmp_path / "stopped", logger=InterruptAt(3), **settings)
        resumed = run(text_file, tmp_path / "stopped", resume=True, **settings)  # two, interrupted
    finally:
        cpu.set_cpu_workers(None)
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
