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
# # Lesson 16: data parallelism from scratch
#
# One process trains on one batch per step. To train faster, or on a model that wants bigger batches
# than one machine can hold, give each of $N$ workers a copy of the model and $1/N$ of the batch. They
# each compute a gradient on their slice, then *all-reduce*: every worker ends up with the sum of all
# gradients, divides it by $N$, and takes the same optimizer step. This lesson shows why that gives the
# big batch's gradient exactly, writes the ring all-reduce that clusters use (NCCL, MPI) in NumPy over
# simulated workers, shows where the equality breaks, and then runs two real processes: mpi4py's
# `Allreduce`, and `minimosaic train` on 2 ranks against 1 process.

# %%
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from minimosaic import nn
from minimosaic.fast.distributed import find_mpiexec, launcher_environment, mpi_missing
from minimosaic.models import ModelConfig, build_model
from _check import QUICK, check, expect, figure, promise_figures, show

promise_figures("allreduce_traffic")

# %% [markdown]
# ## The averaged gradient is the big batch's gradient
#
# The loss of a batch of $B$ rows is a mean of per-row losses. Cut the rows into $N$ equal slices of
# $B/N$; each slice's loss $L_r$ is the mean over its rows, and
#
# $$L = \frac{1}{B}\sum_{b=1}^{B} \ell_b = \frac{1}{N}\sum_{r=1}^{N} \underbrace{\frac{N}{B}\sum_{b \in r} \ell_b}_{L_r}
# \qquad\Rightarrow\qquad \nabla L = \frac{1}{N}\sum_{r=1}^{N} \nabla L_r .$$
#
# The gradient is linear, so the mean of the slices' gradients *is* the batch's gradient. We check it on
# a Memory Mosaic in float64: one backward pass over 8 rows against 4 passes over 2 rows each.

# %%
config = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=16, pmem_size=16)
nn.manual_seed(0)
model = build_model(config).to(dtype=np.float64)
rng = np.random.default_rng(0)
x = rng.integers(0, 50, size=(8, 16))
y = rng.integers(0, 50, size=(8, 16))


def gradients(rows):
    model.zero_grad()
    model.loss(x[rows], y[rows]).backward()
    return [p.grad.copy() for p in model.parameters()]


whole = gradients(slice(0, 8))
shards = [gradients(slice(2 * r, 2 * r + 2)) for r in range(4)]
averaged = [sum(g) / 4 for g in zip(*shards)]
check("mean of 4 slices' gradients == the batch's", np.concatenate([g.ravel() for g in averaged]),
      np.concatenate([g.ravel() for g in whole]), atol=1e-13, rtol=1e-12)

# %% [markdown]
# ## The ring all-reduce
#
# The simplest all-reduce sends every worker's gradient to worker 0, which adds them and sends the sum
# back: worker 0 receives $(N-1)$ whole gradients per step, so it gets slower as $N$ grows. The **ring**
# all-reduce keeps every link equally busy. Each worker cuts its vector into $N$ chunks; the workers
# stand in a ring, each sending to its right neighbour.
#
# 1. **Reduce-scatter**, $N-1$ steps: at step $s$, worker $r$ sends chunk $(r - s) \bmod N$ to worker
#    $r+1$, which adds it to its own copy. After $N-1$ steps worker $r$ holds the complete sum of chunk
#    $(r+1) \bmod N$.
# 2. **All-gather**, $N-1$ steps: the completed chunks travel once around the ring, each worker
#    overwriting its copy, until everyone has every summed chunk.
#
# Each worker sends $2(N-1)$ chunks of $n/N$ numbers: $2\frac{N-1}{N} n$, under twice the vector,
# whatever $N$ is.

# %%
def ring_allreduce(vectors):
    """Every worker's vector <- the sum over workers, by reduce-scatter then all-gather around a ring.
    Returns (the workers' results, numbers each worker sent)."""
    n_workers = len(vectors)
    chunks = [np.array_split(v.astype(np.float64).copy(), n_workers) for v in vectors]  # chunks[r][c]
    sent = 0
    for s in range(n_workers - 1):          # reduce-scatter
        outgoing = [(r, (r - s) % n_workers, chunks[r][(r - s) % n_workers].copy()) for r in range(n_workers)]
        for r, c, data in outgoing:         # all sends of a step happen at once: copy first, then add
            chunks[(r + 1) % n_workers][c] += data
        sent += len(outgoing[0][2])
    for s in range(n_workers - 1):          # all-gather: worker r owns the sum of chunk (r + 1) % N
        outgoing = [(r, (r + 1 - s) % n_workers, chunks[r][(r + 1 - s) % n_workers].copy())
                    for r in range(n_workers)]
        for r, c, data in outgoing:
            chunks[(r + 1) % n_workers][c] = data
        sent += len(outgoing[0][2])
    return [np.concatenate(c) for c in chunks], sent


size = 1000 if QUICK else 100_000
for n_workers in (2, 3, 5, 8):
    vectors = [np.random.default_rng(r).standard_normal(size) for r in range(n_workers)]
    results, sent = ring_allreduce(vectors)
    total = np.sum(vectors, axis=0)
    check(f"ring all-reduce over {n_workers} workers == the sum", np.stack(results), np.stack([total] * n_workers),
          atol=1e-12, rtol=1e-12)
    expect(f"{n_workers} workers: each sent 2(N-1)/N of the vector", abs(sent - 2 * (n_workers - 1) / n_workers
                                                                         * size) <= 2 * n_workers,
           f"{sent} numbers sent, 2(N-1)/N n = {2 * (n_workers - 1) / n_workers * size:.0f}")

# %% [markdown]
# The picture: what the busiest worker receives per step, for a 1 MB gradient. Through worker 0 it grows
# with $N$; around the ring it stays under 2 MB, which is why the ring (or a tree, for latency) is what
# NCCL and MPI libraries use. The time is then bandwidth-bound: $2\frac{N-1}{N}\cdot\text{bytes} /
# \text{bandwidth}$, plus a latency per step ($2(N-1)$ of them).

# %%
workers = np.arange(2, 65)
through_root = (workers - 1) * 1.0          # MB received by worker 0
ring = 2 * (workers - 1) / workers * 1.0     # MB received by each worker
fig, axes = figure()
ax = axes[0, 0]
ax.plot(workers, through_root, label="all through worker 0")
ax.plot(workers, ring, label="ring all-reduce")
ax.set(xlabel="workers N", ylabel="MB received by the busiest worker", yscale="log",
       title="All-reducing a 1 MB gradient")
ax.legend()
show(fig, "allreduce_traffic")
expect("the ring's traffic stays under twice the gradient", bool(np.all(ring < 2)), f"max {ring.max():.3f} MB")

# %% [markdown]
# ## Where the equality breaks
#
# The argument needs the loss to be a *mean of per-row terms*, computed the same way on every slice.
#
# **Statistics over the batch.** A loss that uses the batch's own mean (batch normalisation does) sees a
# different mean on each slice. Here $\ell_b = (x_b - \bar{x})^2$ with $\bar x$ the mean of the rows
# present: the slices' average is not the batch's value. (Neither minimosaic model normalises over the
# batch: layer norm works within a row.)

# %%
values = np.array([0.0, 1.0, 2.0, 10.0])
batch = np.mean((values - values.mean()) ** 2)
sliced = np.mean([np.mean((s - s.mean()) ** 2) for s in np.split(values, 2)])
print(f"batch variance {batch:.3f}, mean of the slices' variances {sliced:.3f}")
expect("a batch statistic breaks the equality", not np.isclose(batch, sliced))

# %% [markdown]
# **Slices of unequal size.** With rows 3 and 5, the mean of the two means weights a row of the small
# slice more. Weight each slice by its share of rows, $n_r/B$, and it is exact again; minimosaic instead
# refuses a batch that does not divide among the ranks.

# %%
losses = np.random.default_rng(1).random(8)
a, b = losses[:3], losses[3:]
print(f"mean {losses.mean():.4f}, mean of means {np.mean([a.mean(), b.mean()]):.4f}, "
      f"weighted {(3 * a.mean() + 5 * b.mean()) / 8:.4f}")
expect("uneven slices: the plain mean of means is off", not np.isclose(losses.mean(), np.mean([a.mean(), b.mean()])))
check("weighted by rows, it is the mean again", (3 * a.mean() + 5 * b.mean()) / 8, losses.mean(), atol=1e-15)

# %% [markdown]
# **Dropout.** Each worker draws its own dropout masks. Seeded alike, every slice would get the *same*
# masks (correlated noise, not what one process does); seeded differently, the run is as random as one
# process's but not equal to it. So the equality tests run with dropout off.

# %%
masks = [np.random.default_rng(1337).random((2, 4)) > 0.5 for _ in range(2)]  # two ranks, the same seed
expect("same seed on every rank: identical masks on different rows", bool(np.array_equal(*masks)))

# %% [markdown]
# ## Two real processes: mpi4py's Allreduce
#
# MPI starts $N$ copies of a program (`mpiexec -n N`); each learns its *rank* and the *size*, and
# `Allreduce` sums a buffer across them. `pip install -e '.[dist]'` brings mpi4py and MPICH.

# %%
SCRIPT = """
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
mine = np.full(3, comm.rank + 1.0)          # rank 0 holds [1 1 1], rank 1 holds [2 2 2]
total = np.empty_like(mine)
comm.Allreduce(mine, total, op=MPI.SUM)
print(f"rank {comm.rank} of {comm.size}: mine {mine}, sum {total}")
"""
reason = mpi_missing()
if reason:
    print(f"skipped: {reason}")
else:
    env = launcher_environment()  # os.environ, and as root Open MPI's permission to run
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "allreduce.py"
        script.write_text(SCRIPT)
        run = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, str(script)], env=env,
                             capture_output=True, text=True, timeout=120)
    print(run.stdout.strip())
    expect("both ranks got [3 3 3]", run.stdout.count("sum [3. 3. 3.]") == 2, run.stderr[-300:])

# %% [markdown]
# ## The library: 2 ranks == 1 process
#
# `minimosaic train` on 2 ranks (`mpiexec -n 2 minimosaic train ...`, or `--nproc 2`) gives each rank
# half of every batch (`--batch-size` is the whole step's), sums the gradients with an all-reduce on flat
# buffers (`minimosaic/fast/distributed.py`), and takes the same AdamW step everywhere; rank 0 alone
# writes the log and checkpoints. In float64 (`--precision fp64`) three steps end with the weights of
# one process on the whole batch, to rounding.

# %%
if reason:
    print(f"skipped: {reason}")
else:
    from minimosaic import checkpoint
    with tempfile.TemporaryDirectory() as folder:
        args = ["train", "--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                "--pmem-size", "16", "--batch-size", "8", "--steps", "3", "--eval-interval", "3",
                "--eval-batches", "2", "--precision", "fp64"]
        env = launcher_environment(OMP_NUM_THREADS="1")
        one = subprocess.run([sys.executable, "-m", "minimosaic", *args, "--out", f"{folder}/one"], env=env,
                             capture_output=True, text=True, timeout=300)
        two = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, "-m", "minimosaic", *args, "--out",
                              f"{folder}/two"], env=env, capture_output=True, text=True, timeout=300)
        expect("both runs finished", one.returncode == 0 and two.returncode == 0, one.stderr[-300:] + two.stderr[-300:])
        print("\n".join(line for line in two.stdout.splitlines() if line.startswith(("parallel", "done"))))
        w1, _ = checkpoint.load_checkpoint(f"{folder}/one", "latest")
        w2, _ = checkpoint.load_checkpoint(f"{folder}/two", "latest")
        names = sorted(k for k in w1 if k.startswith("model."))
        check("weights after 3 steps: 2 ranks == 1 process", np.concatenate([w2[k].ravel() for k in names]),
              np.concatenate([w1[k].ravel() for k in names]), atol=1e-12, rtol=0)

# %% [markdown]
# ## What to take away
#
# - Data parallelism is exact for losses that are means of per-row terms: the all-reduce averages the
#   gradients, and every worker applies the same update to the same weights.
# - The ring all-reduce moves $2\frac{N-1}{N}$ gradients per worker per step, whatever $N$: its time is
#   the gradient's bytes over the link's bandwidth, plus a latency per step.
# - It stops scaling when that time is no longer small next to the compute of a step: more workers on
#   a fixed batch shrink each one's compute but not the all-reduce (`benchmarks/projection.py` draws
#   it for H100s on NVLink and InfiniBand).
