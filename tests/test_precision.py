"""Mixed precision on the CPU (NumPy has float16): the policy's dtypes, float32 master weights, dynamic
loss scaling (skip and halve on overflow, grow after good steps), a float16 run tracking the float32
run, and an exact resume with the scaler's state in the checkpoint."""
import math

import numpy as np
import pytest

from minimosaic import nn, ops, optim, precision
from minimosaic import train as trainer
from minimosaic.data import generate_stories
from minimosaic.errors import MinimosaicError
from minimosaic.models import ModelConfig, build_model
from minimosaic.tensor import Tensor

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, pmem_size=16, batch_size=4, warmup=2,
            lr=3e-3, min_lr=3e-4, eval_batches=2, log_interval=1)


def test_the_policy_puts_products_in_float16_and_keeps_softmax_layer_norm_and_loss_in_float32(rng):
    a = Tensor(rng.standard_normal((3, 4)).astype(np.float32), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 5)).astype(np.float32), requires_grad=True)
    with precision.autocast("fp16"):
        z = a @ w
        assert z.dtype == np.float16
        assert ops.softmax(z).dtype == np.float32 and ops.layer_norm(z).dtype == np.float32
        loss = ops.cross_entropy(z, np.array([0, 1, 4]))
        assert loss.dtype == np.float32
    loss.backward()
    assert a.grad.dtype == np.float32 and w.grad.dtype == np.float32  # master weights get float32 gradients
    assert (a @ w).dtype == np.float32  # outside autocast nothing changes


def test_a_model_under_autocast_keeps_float32_parameters_and_a_float32_loss(rng):
    nn.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, block_size=6, pmem_size=5))
    ids = rng.integers(0, 11, (2, 7))
    with precision.autocast("fp16"):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert loss.dtype == np.float32
    assert all(p.dtype == np.float32 and p.grad.dtype == np.float32 for p in model.parameters())


def test_the_scaler_skips_an_overflow_halves_the_scale_and_grows_after_good_steps():
    p = nn.Parameter(np.ones(3, np.float32))
    scaler = precision.LossScaler(scale=1024.0, growth_interval=3)
    p.grad = np.array([1024.0, 2048.0, np.inf], np.float32)
    finite = scaler.unscale([p])
    scaler.update(finite)
    assert not finite and scaler.scale == 512.0 and scaler.skipped_steps == 1
    for _ in range(3):
        p.grad = np.array([512.0, 0.0, -512.0], np.float32)
        finite = scaler.unscale([p])
        scaler.update(finite)
        assert finite
    np.testing.assert_array_equal(p.grad, [1.0, 0.0, -1.0])
    assert scaler.scale == 1024.0 and scaler.good_steps == 0


def test_an_overflow_injected_at_a_known_step_is_skipped_and_the_scale_halves(rng):
    """The step's update is skipped: the parameters and AdamW's step count stay as they were."""
    nn.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, block_size=6, pmem_size=5))
    opt = optim.AdamW(optim.weight_decay_groups(model.named_parameters(), 0.1), lr=1e-2)
    scaler = precision.LossScaler(scale=2.0 ** 10)
    ids = rng.integers(0, 11, (2, 7))
    for step in range(4):
        if step == 2:  # a poisoned weight: its gradient (and the loss's) become inf at this step only
            saved = model.ln_f.weight.data.copy()
            model.ln_f.weight.data[0] = np.float32(3e38)
        before = [p.data.copy() for p in model.parameters()]
        loss, norm = trainer.training_step(model, opt, [(ids[:, :-1], ids[:, 1:])], 1e-2, grad_clip=1.0,
                                           precision="fp16", scaler=scaler)
        if step == 2:
            assert norm is None and scaler.scale == 2.0 ** 9 and scaler.skipped_steps == 1 and opt.steps == 2
            assert all(np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))
            model.ln_f.weight.data[:] = saved
        else:
            assert norm is not None and math.isfinite(float(norm))
    assert opt.steps == 3


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text(generate_stories(n_chars=30_000, seed=7))
    return path


def run(text_file, out, resume=False, logger=None, **overrides):
    model_config, config = trainer.resolve_config(None, dict(TINY, data=str(text_file), out=str(out), **overrides))
    data = trainer.prepare_data(config)
    model_config.vocab_size = data.tokenizer.vocab_size
    return trainer.train(model_config, config, data, resume=resume, logger=logger)


def test_a_float16_run_tracks_the_float32_run(text_file, tmp_path):
    """Same seed, same batches: the float16 losses stay within 0.05 of the float32 ones, step by step."""
    losses = {}
    for p in ("fp32", "fp16"):
        run(text_file, tmp_path / p, steps=40, eval_interval=40, precision=p)
        losses[p] = np.array([r["loss"] for r in trainer.read_log(tmp_path / p) if "loss" in r])
    assert losses["fp32"][-5:].mean() < losses["fp32"][0] - 0.3  # it learned something
    np.testing.assert_allclose(losses["fp16"], losses["fp32"], atol=0.05)


def test_a_float16_run_resumes_exactly_with_its_loss_scale(text_file, tmp_path):
    class InterruptAt(trainer.TrainLogger):
        def log(self, record):
            if record["step"] == 3:
                import os
                import signal
                os.kill(os.getpid(), signal.SIGINT)

    settings = dict(steps=8, eval_interval=4, precision="fp16")
    straight = run(text_file, tmp_path / "straight", **settings)
    run(text_file, tmp_path / "stopped", logger=InterruptAt(), **settings)
    resumed = run(text_file, tmp_path / "stopped", resume=True, **settings)
    records = [r for r in trainer.read_log(tmp_path / "stopped") if "loss_scale" in r]
    assert records and all(r["loss_scale"] > 0 for r in records)
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)


def test_bf16_and_unknown_precisions_are_refused_with_one_line(text_file, tmp_path):
    with pytest.raises(MinimosaicError, match="bf16 is not written yet"):
        trainer.resolve_config(None, dict(TINY, precision="bf16"))
    with pytest.raises(MinimosaicError, match="unknown precision 'fp8'"):
        trainer.resolve_config(None, dict(TINY, precision="fp8"))
