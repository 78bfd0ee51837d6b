# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 14: running on a GPU with CuPy
#
# Everything so far ran on NumPy. **CuPy** is a NumPy look-alike whose arrays live in a CUDA GPU's
# memory: `cupy.exp`, `cupy.matmul`, `a.sum(axis=1)` behave like NumPy's, but run thousands of threads
# at once. minimosaic never imports NumPy for computation: every op asks its input which module it
# belongs to, `xp = a.xp` (Chainer's idea), and uses `xp.exp`, `xp.where`, ... So the same code runs on
# both, and moving to the GPU means moving the **data**, not changing the code.
#
# This lesson needs CuPy and an NVIDIA GPU for its second half (`pip install 'minimosaic[gpu]'`, or
# `cupy-cuda12x` / `cupy-cuda13x` to match your driver). Without them, the GPU checks are skipped with
# the reason printed, and the CPU half still runs.

# %%
import time

import numpy as np

import minimosaic as mm
from minimosaic import fast, memories, nn, ops, optim, registry
from minimosaic.models import ModelConfig, build_model
from _check import QUICK, check, expect

HAVE_GPU = mm.gpu_available()
print("GPU available:", HAVE_GPU)
if not HAVE_GPU:
    print("SKIPPING the GPU checks of this lesson: CuPy with a CUDA GPU is not available "
          "(pip install 'minimosaic[gpu]' on a machine with an NVIDIA GPU to run them)")

# %% [markdown]
# ## One body of code, two array modules
#
# `mm.get_array_module(*arrays)` returns `numpy` or `cupy`, whichever the arrays live in, and every
# Tensor has `.xp` (its module) and `.device` ('cpu' or 'gpu'). `mm.array_module(device)` gives the
# module for a device name.

# %%
a = mm.Tensor(np.arange(6.0).reshape(2, 3))
print("a.xp is numpy:", a.xp is np, "| a.device:", a.device)
expect("get_array_module of a NumPy array is numpy", mm.get_array_module(a.data) is np)
expect("array_module('cpu') is numpy", mm.array_module("cpu") is np)

# %% [markdown]
# Writing an op so that it runs on both means taking `xp` from the input. Here is lesson 3's
# softplus, now backend-agnostic; on the CPU `xp` is NumPy, on the GPU it will be CuPy.

# %%
from minimosaic.tensor import make_result  # noqa: E402  (the op-writing helper from lesson 3)


def softplus(a):
    """z = log(1 + e^a).   dz/da = sigmoid(a)."""
    xp = a.xp
    sig = 1 / (1 + xp.exp(-a.data))
    return make_result(xp.logaddexp(0, a.data), (a,), lambda g: (g * sig,))


z = mm.Tensor(np.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)
check("agnostic softplus on the CPU", softplus(z), np.logaddexp(0, z.data))
expect("gradcheck agnostic softplus on the CPU", mm.gradcheck(softplus, [z]))

# %% [markdown]
# ## Moving data
#
# `mm.to_device(array, device)` copies an array to 'cpu' or 'gpu' (returning it unchanged when it is
# already there), `mm.asnumpy(array)` brings anything back to a NumPy array, `tensor.to(device)` moves a
# Tensor and `module.to(device)` moves every parameter of a model in place. Asking for the GPU without
# CuPy raises a `MinimosaicError` that says what to do.

# %%
same = mm.to_device(a.data, "cpu")
expect("to_device(cpu array, 'cpu') returns it unchanged", same is a.data)
expect("tensor.to('cpu') on the CPU is the same tensor", a.to("cpu") is a)
if not HAVE_GPU:
    try:
        mm.array_module("gpu")
    except mm.MinimosaicError as error:
        print("asking for the GPU without one:", error)

# %% [markdown]
# ## On the GPU (skipped without one)
#
# The same computations, with the data on the GPU. Every check compares with the CPU. In float64 the
# GPU results agree to rounding; float32 sums may be added in a different order on the GPU, so they
# agree to about $10^{-5}$ relative.

# %%
if HAVE_GPU:
    cp = mm.array_module("gpu")
    rng = np.random.default_rng(1)
    x_cpu = mm.Tensor(rng.standard_normal((4, 5)), requires_grad=True)
    w_cpu = mm.Tensor(rng.standard_normal((5, 3)), requires_grad=True)
    x_gpu = mm.Tensor(mm.to_device(x_cpu.data, "gpu"), requires_grad=True)
    w_gpu = mm.Tensor(mm.to_device(w_cpu.data, "gpu"), requires_grad=True)
    expect("the GPU tensors use CuPy", x_gpu.xp is cp and x_gpu.device == "gpu", f"device {x_gpu.device}")
    for x, w in ((x_cpu, w_cpu), (x_gpu, w_gpu)):
        ops.cross_entropy(softplus(x @ w), np.array([0, 2, 1, 2])
                          if x.device == "cpu" else cp.asarray([0, 2, 1, 2])).backward()
    check("GPU == CPU: d/dx of a small network (float64)", mm.asnumpy(x_gpu.grad), x_cpu.grad, atol=1e-12)
    check("GPU == CPU: d/dw", mm.asnumpy(w_gpu.grad), w_cpu.grad, atol=1e-12)
    expect("gradcheck agnostic softplus on the GPU",
           mm.gradcheck(softplus, [mm.Tensor(cp.asarray(rng.standard_normal((3, 4))), requires_grad=True)]))

    k = rng.standard_normal((2, 3, 40, 8))
    decay = np.array([0.2, 0.6, 0.9])
    on_cpu = memories.leaky_average(mm.Tensor(k), mm.Tensor(decay))
    on_gpu = memories.leaky_average(mm.Tensor(k, device="gpu"), mm.Tensor(decay, device="gpu"))
    check("GPU == CPU: leaky_average", on_gpu.numpy(), on_cpu, atol=1e-12)
    mask = memories.causal_mask(np, 40, 0, include_present=False)
    att_cpu = memories.softmax_attention(mm.Tensor(k), mm.Tensor(k), mm.Tensor(k), mask=mask)
    att_gpu = memories.softmax_attention(*(mm.Tensor(k, device="gpu"),) * 3,
                                         mask=memories.causal_mask(cp, 40, 0, include_present=False))
    check("GPU == CPU: softmax_attention", att_gpu.numpy(), att_cpu, atol=1e-12)

# %% [markdown]
# ## A whole model on the GPU
#
# Parameters are created on the CPU from the seeded `nn.init_rng` and then moved, so the same seed
# gives the same model on both devices. Create the optimiser **after** moving the model: its moment
# buffers are allocated next to the parameters. Batches can stay NumPy arrays: the model moves the ids
# to its own device.

# %%
if HAVE_GPU:
    config = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_embd=64, block_size=64)
    nn.manual_seed(0)
    cpu_model = build_model(config)
    nn.manual_seed(0)
    gpu_model = build_model(config).to("gpu")
    expect("every parameter is on the GPU", all(p.device == "gpu" for p in gpu_model.parameters()))
    ids = np.random.default_rng(2).integers(0, 64, (8, 65))
    x, y = ids[:, :-1], ids[:, 1:]
    loss_cpu, loss_gpu = cpu_model.loss(x, y), gpu_model.loss(x, y)
    check("GPU == CPU: the model's loss (float32)", loss_gpu.item(), loss_cpu.item(), rtol=1e-4)
    loss_cpu.backward()
    loss_gpu.backward()
    for (name, p_cpu), p_gpu in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        if name in ("token_embedding.weight", "blocks.0.context.key.W_k.weight"):
            check(f"GPU == CPU: grad of {name}", mm.asnumpy(p_gpu.grad), p_cpu.grad, atol=1e-5, rtol=1e-3)

    optimizer = optim.AdamW(optim.weight_decay_groups(gpu_model.named_parameters(), 0.1), lr=3e-3)
    optimizer.zero_grad()
    losses = []
    for step in range(30 if QUICK else 100):
        loss = gpu_model.loss(x, y)  # the same batch again and again: it should be memorised
        loss.backward()
        optim.clip_grad_norm(gpu_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    expect("training on the GPU lowers the loss", losses[-1] < losses[0] - 0.5, f"{losses[0]:.3f} -> {losses[-1]:.3f}")
    text = gpu_model.generate(np.array([1, 2, 3]), 20, temperature=0.8, seed=0)
    expect("generate on the GPU returns NumPy ids", isinstance(text, np.ndarray) and len(text) == 23, str(text))

# %% [markdown]
# ## Is it faster?
#
# Only when there is enough work per operation. A GPU launch costs a few microseconds whatever its size,
# and Python runs one op at a time, so tiny models are often *slower* on a GPU; larger widths and
# batches win big. We time one training step of the same model on both devices (printed, not checked:
# it depends on your machine), on the plain core; the fast layer below speeds up both. CuPy runs
# asynchronously, so we synchronise before reading the clock.

# %%
def step_time(model, x, y, repeats, sync=lambda: None):
    model.loss(x, y).backward()  # warm up (CuPy compiles its kernels on first use)
    model.zero_grad()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        model.loss(x, y).backward()
        model.zero_grad()
    sync()
    return 1e3 * (time.perf_counter() - start) / repeats


if HAVE_GPU:
    config = ModelConfig(vocab_size=256, n_layer=4, n_head=8, n_embd=256 if QUICK else 512, block_size=256)
    nn.manual_seed(0)
    big_cpu = build_model(config)
    nn.manual_seed(0)
    big_gpu = build_model(config).to("gpu")
    ids = np.random.default_rng(3).integers(0, 256, (8, 257))
    sync = cp.cuda.Device().synchronize
    ms_cpu = step_time(big_cpu, ids[:, :-1], ids[:, 1:], repeats=1)
    ms_gpu = step_time(big_gpu, ids[:, :-1], ids[:, 1:], repeats=5, sync=sync)
    print(f"one forward + backward, {big_cpu.num_parameters():,} parameters, batch 8 x 256: "
          f"CPU {ms_cpu:.0f} ms, GPU {ms_gpu:.1f} ms ({ms_cpu / ms_gpu:.0f}x)")

# %% [markdown]
# ## The fast layer and how it is checked
#
# Everything so far, on either device, ran minimosaic's **core**: each op written as its maths, its
# backward beside it. That is the code you read and the code the gradient checks test, but it is not
# the fastest: the leaky average steps through time one position at a time, attention stores its whole
# weight matrix, NumPy's elementwise passes use one CPU core, and on a GPU every small op is a launch.
# Speed lives in one optional layer, the package `minimosaic/fast/`, which the core never imports:
#
# - a few core functions are marked `@replaceable` (`minimosaic/registry.py`). A call to one first tries
#   the replacements registered under its name (`'memories.softmax_attention'`, ...), then runs the code
#   as written, which stays reachable as `.plain`;
# - `minimosaic.fast.enable()` registers the replacements that `fast/ops.py` lists in `REPLACEMENTS`;
#   `fast.disable()` removes them, and `with fast.enabled():` turns the layer on for a block only (or off:
#   `fast.enabled(False)`). The CLI and `train.train()` enable it unless asked for the plain core
#   (`--plain`, `MINIMOSAIC_PLAIN=1`); `import minimosaic` does not;
# - a replacement takes the same arguments and gives the same result. For inputs it does not handle
#   (dropout, another device, a kernel switched off) it returns `NotImplemented`, and the plain function
#   runs;
# - `tests/test_fast.py` checks every replacement against its plain function on random inputs: the same
#   values and the same gradients, in float64 (to about 1e-9 relative) and float32, on the CPU and on a
#   GPU, and a test fails if an entry of `REPLACEMENTS` is not covered.

# %%
import importlib  # noqa: E402

from minimosaic.fast import ops as fast_ops  # noqa: E402

expect("import minimosaic registered nothing", not fast.is_enabled() and not registry.registered())
for name, replacement in fast_ops.REPLACEMENTS.items():
    module, function = name.split(".")
    core = getattr(importlib.import_module(f"minimosaic.{module}"), function)
    expect(f"{name} is @replaceable", getattr(core, "replaceable_name", None) == name and callable(core.plain),
           f"replaced by fast.ops.{replacement.__name__}; .plain is the core's code")
with fast.enabled():
    expect("inside fast.enabled(): every replacement registered", fast.is_enabled(),
           f"{len(registry.registered())} names")
expect("after the block: the plain core again", not registry.registered())

# %% [markdown]
# On the CPU (this runs without a GPU) we do what the tests do, on one replacement: the context
# memory's causal attention with the layer off and on, values and the three gradients in float64, then
# a timing in float32. On the CPU the replacement works through tiles of query rows on all cores and
# never stores the $(T, T)$ weights (lesson 6).

# %%
def attention_and_grads(q, k, v, g, mask):
    for t in (q, k, v):
        t.grad = None
    out = memories.softmax_attention(q, k, v, mask=mask)
    (out * g).sum().backward()
    return [mm.asnumpy(a) for a in (out.data, q.grad, k.grad, v.grad)]


rng = np.random.default_rng(7)
shape = (2, 4, 64, 16) if QUICK else (8, 8, 256, 32)               # (B, H, T, hs)
causal = memories.causal_mask(np, shape[2], 0, include_present=False)
qkv = [mm.Tensor(rng.standard_normal(shape), requires_grad=True) for _ in range(3)]
g = rng.standard_normal(shape)
results = {}
for on in (False, True):
    with fast.enabled(on):
        results[on] = attention_and_grads(*qkv, g, causal)
for name, plain, swapped in zip(("values", "dq", "dk", "dv"), results[False], results[True]):
    check(f"fast == plain softmax_attention (CPU): {name}", swapped, plain, atol=1e-10)

qkv32 = [mm.Tensor(t.data.astype(np.float32), requires_grad=True) for t in qkv]
ms = {}
for on in (False, True):
    with fast.enabled(on):
        attention_and_grads(*qkv32, g.astype(np.float32), causal)  # warm up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            attention_and_grads(*qkv32, g.astype(np.float32), causal)
            times.append(1e3 * (time.perf_counter() - start))
        ms[on] = min(times)
print(f"causal attention {shape} float32 on the CPU, forward + backward: plain {ms[False]:.1f} ms, "
      f"fast layer {ms[True]:.1f} ms ({ms[False] / ms[True]:.1f}x)")

# %% [markdown]
# The same holds for a whole model: its loss and every parameter's gradient, with the layer off and on
# (in float64, so that only rounding separates them).

# %%
config = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_embd=64, block_size=64)
ids = np.random.default_rng(8).integers(0, 64, (4, 65))
losses, gradients = {}, {}
for on in (False, True):
    nn.manual_seed(0)
    model = build_model(config).to(dtype=np.float64)
    with fast.enabled(on):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
    losses[on], gradients[on] = loss.item(), {name: p.grad for name, p in model.named_parameters()}
check("fast == plain: the model's loss", losses[True], losses[False], atol=1e-10)
worst = max(float(np.abs(gradients[True][n] - gradients[False][n]).max()) for n in gradients[False])
expect("fast == plain: every gradient of the model", worst < 1e-9, f"largest difference {worst:.2e}")

# %% [markdown]
# ## Fewer, bigger launches: CUDA kernels of our own
#
# Profiling a training step on a GPU (`benchmarks/op_profile.py --device gpu`, with `--plain` for the
# core) shows where plain CuPy code loses: every CuPy call is a kernel launch plus some microseconds of
# Python, and every pass reads and writes the whole array. The core's leaky average issues a few
# launches per position; even lesson 7's chunked scan issues a few per chunk of 16 positions, and on a
# gpt2-small-sized model it took 116 ms of a 339 ms step. `minimosaic/fast/cuda_kernels.py` writes such
# hot spots as CUDA C++ that CuPy compiles at run time (`cupy.RawModule`), and the fast layer's GPU
# replacements call them: here the scan is one thread per (batch, head, channel) walking the time
# axis, one launch for the whole array.

# %%
from minimosaic.fast import cuda_kernels  # noqa: E402

source = cuda_kernels._SOURCE
start = source.index("// kbar_t = x_t")
print(source[start:source.index("// Backward of the scan")])
expect("the scan kernel is there", "__global__ void leaky_scan" in source)

# %% [markdown]
# The core stays the reference. A kernel is checked through the replacement that calls it: the fast
# layer on against the plain core, values and gradients (tests/test_fast.py and
# tests/test_cuda_kernels.py, float32 and float64). `cuda_kernels.use_kernels([])` switches every kernel
# off (so does the environment variable `MINIMOSAIC_CUDA_KERNELS=0`): the replacements then decline and
# the plain core runs. On a GPU we can check the scan here:

# %%
if HAVE_GPU:
    rng = np.random.default_rng(4)
    k, decay = rng.standard_normal((2, 3, 37, 8)), rng.uniform(0.1, 0.9, 3)
    results = []
    for on in (False, True):  # the plain CuPy recurrence, then the fast layer's kernel
        with fast.enabled(on):
            k_gpu = mm.Tensor(k, device="gpu", requires_grad=True)
            decay_gpu = mm.Tensor(decay, device="gpu", requires_grad=True)
            kbar = memories.leaky_average(k_gpu, decay_gpu)
            kbar.sum().backward()
            results.append([mm.asnumpy(t) for t in (kbar.data, k_gpu.grad, decay_gpu.grad)])
    for name, plain, by_kernel in zip(("values", "d/dk", "d/dlambda"), *results):
        check(f"kernel == plain CuPy recurrence: {name}", by_kernel, plain, atol=1e-10)

# %% [markdown]
# ## No launches at all: replaying a CUDA graph
#
# Even with those kernels, a small model's step is ~1,500 launches issued one by one from Python, each
# a few microseconds of host time for a few microseconds of GPU work: the GPU waits for Python. CUDA
# can **record** the launches of one step (stream capture: nothing runs, every launch becomes a node
# of a graph) and **replay** the graph with one call. `minimosaic/fast/cuda_graph.py` does this for a
# whole training step, `train.training_step`, the one the trainer runs eagerly. A replay repeats the
# recorded launches exactly, with the same arguments and the same memory addresses, so:
#
# - each step copies its batch into the same input arrays, and parameters and AdamW moments are
#   updated in place;
# - whatever changes between steps must be read from device memory. AdamW's learning rate and bias
#   corrections are numbers passed to its kernel, which a graph would keep forever. So while recording,
#   the fast layer's `fast.ops.adamw_update` hands each parameter's update a row of a small device array
#   to read them from; before each replay `optimizer.step(lr)` runs once more with a recorder in place
#   that only collects each parameter's numbers (no kernel runs; the optimizer counts its step), and
#   they are copied into that array. That is why recording needs the fast layer on
#   (`cuda_graph.why_not_captured` gives the reason a run trains eagerly);
# - nothing may wait for the GPU inside the step (`float(loss)` would), since nothing runs while recording.
#
# One surprise on the way: CuPy refuses to call cuBLAS while a stream is being recorded. So while
# recording, each matrix product goes to a cuBLAS handle of our own, called through `ctypes`. cuBLAS
# thinks in column-major matrices: a row-major (R, C) array is the column-major (C, R) matrix of
# its transpose, so C = A B is computed as C^T = B^T A^T. `gemm_operand` works out, for any
# NumPy/CuPy layout, how cuBLAS must read it (op N or T, leading dimension, batch stride), or copies
# it when no single strided batch can describe it. Here is a transposed view of a batch of matrices:

# %%
from minimosaic.fast import cuda_graph  # noqa: E402
from minimosaic.train import training_step  # noqa: E402

keys = np.random.default_rng(5).standard_normal((2, 3, 5, 4))
kt = keys.swapaxes(-1, -2)                                 # (2, 3, 4, 5): a view, columns contiguous
array, op, ld, step = cuda_graph.gemm_operand(kt, (2, 3))
print(f"op {'N' if op == cuda_graph.OP_N else 'T'}, leading dimension {ld}, batch stride {step}, "
      f"copied: {array.base is None}")
# read memory the way cuBLAS will: column-major (rows, cols) with stride ld, one matrix every `step`
stored = np.lib.stride_tricks.as_strided(array, (6, 4, 5), (step * 8, 8, ld * 8))   # op T: stored is X
check("cuBLAS's reading of the view is the view", stored.reshape(2, 3, 4, 5), kt)

# %% [markdown]
# `cuda_graph.why_not_captured` says when a run must train eagerly. On a GPU with the fast layer on, the
# recorded step, `GraphedTrainingStep(model, opt, grad_clip)(x, y, lr)`, and the eager one,
# `training_step(model, opt, [(x, y)], lr, grad_clip)`, train the same model (tests/test_cuda_graph.py
# does this in float64, to 1e-9); the replay just takes less time:

# %%
expect("a CPU run trains eagerly", cuda_graph.why_not_captured("cpu", 0.0, 1) is not None,
       cuda_graph.why_not_captured("cpu", 0.0, 1))
expect("so does the plain core on a GPU", cuda_graph.why_not_captured("gpu", 0.0, 1) is not None,
       cuda_graph.why_not_captured("gpu", 0.0, 1))
if HAVE_GPU:
    cp = mm.backend.array_module("gpu")
    config = ModelConfig(model="mosaic", vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=32,
                         pmem_size=64)
    batch = cp.asarray(np.random.default_rng(6).integers(0, 64, (8, 33)))
    x, y = batch[:, :-1], batch[:, 1:]
    timings = {}
    with fast.enabled():
        reason = cuda_graph.why_not_captured("gpu", 0.0, 1)
        expect("with the fast layer on, this run can be recorded", reason is None, str(reason))
        for graphed in (False, True):
            nn.manual_seed(0)
            model = build_model(config).to("gpu")
            opt = optim.AdamW(optim.weight_decay_groups(model.named_parameters(), 0.1), lr=1e-3)
            replay = cuda_graph.GraphedTrainingStep(model, opt, grad_clip=1.0)  # eager, records, replays
            times = []
            for i in range(6):
                cp.cuda.Device().synchronize()
                start = time.perf_counter()
                if graphed:
                    loss, _ = replay(x, y, 1e-3)
                else:
                    loss, _ = training_step(model, opt, [(x, y)], 1e-3, grad_clip=1.0)
                cp.cuda.Device().synchronize()
                times.append(time.perf_counter() - start)
            timings[graphed] = (1000 * min(times[2:]), float(loss))
    print(f"eager {timings[False][0]:.2f} ms/step, replayed {timings[True][0]:.2f} ms/step")
    check("the same loss after 6 steps", timings[True][1], timings[False][1], rtol=1e-3)

# %% [markdown]
# ## Exercises
#
# 1. Find the break-even width: time `step_time` for `n_embd` = 32, 64, 128, 256 on both devices.
# 2. Train lesson 11's model on the GPU: build it, `.to("gpu")`, then the same loop. Which lines change?
# 3. `ops.cross_entropy` keeps its count of counted rows as an array instead of calling `int(...)`. Why
#    does that matter on a GPU? (Hint: what does converting a GPU value to a Python number force?)
# 4. From the command line: `minimosaic train --device gpu --preset char-small`.
# 5. Read `softmax_rows` in `minimosaic/fast/cuda_kernels.py`: one block of 256 threads per row of scores.
#    Which two reductions does it do, and why does `block_sum` need `__syncthreads()` twice?
# 6. Why does a model with dropout train eagerly (`cuda_graph.why_not_captured`)? What would a replay
#    do to the dropout masks, and what would you have to change to record dropout too?
# 7. On the CPU, run `python benchmarks/op_profile.py --plain` and `python benchmarks/op_profile.py`
#    (the fast layer). Which rows shrink most? Which replacement in `fast/ops.py` is responsible?
# 8. Write a replacement of your own for `ops.gelu` (say, the tanh approximation), register it with
#    `registry.register('ops.gelu', ...)`, and compare it with `ops.gelu.plain` as the tests do. How close
#    is it, and which check in `tests/test_fast.py` would catch it?
