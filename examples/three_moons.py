"""Three moons: predictive disentanglement in one context memory (section 3 of the Memory Mosaics paper).

Three moons circle a planet with periods p1, p2, p3 (e.g. 1, 2 and 3 time units). We observe each
moon's position (cos, sin) at every step: x_t in R^6. The task is to predict x_{t+1} from x_0..x_t.
Each sequence comes from a random start time of a random triple of periods, so the moons' motion must
be learned *in context*: no weight can store where a moon will be.

The model is a single context memory, nothing else (no leaky average, no normalisation, no persistent
memory), with per head h

    key    k_t = W_k x_t                 (a linear function of the present)
    value  v_t = W_v x_{t+1}             (peek ahead: the value of step t is the *next* observation)
    output xhat_{t+1} = W_o [ sum_{s<t} w_s v_s ]_heads,   w_s ∝ exp(-beta |k_t - k_s|^2)

kernel smoothing over the past (the present is masked out: its value holds the answer) with a fixed,
large beta (a narrow kernel; the scale of W_k can still sharpen or widen it). As in the paper's code
the weights are computed as softmax_s(2 beta k_t . k_s), one fused op: exp(-beta |k_t - k_s|^2) =
exp(-beta |k_t|^2) exp(-beta |k_s|^2) exp(2 beta k_t . k_s), the first factor cancels in the
normalisation and the second is constant when keys have a fixed length, as they do here once a head
follows whole moons (each moon's observation has length 1).

A head predicts the next observation by recalling what followed the moments whose key looked like
now. A moon's position recurs after its own period, three moons together only after the joint period
lcm(p1, p2, p3). So:

  * 1 head of dimension 6 (keys of all three moons at once) can only recall a matching past once the
    context covers the joint period;
  * 3 heads of dimension 2 can each follow ONE moon, and recall it after that moon's period: the model
    is accurate once the context covers the longest single period (half the joint period here).
    Training discovers this split by itself: W_k, W_v and W_o become block structured, one moon per
    head. The paper calls it predictive disentanglement.

Weights are complex-linear, as in the paper's code: a moon's (cos, sin) is one complex number z, its
motion is z -> e^{i omega} z, and a weight block acts as a complex number a + ib (scale and rotate).
The heat maps show |a + ib| for each (moon, head) pair.

Training can get stuck (a head that follows a mix of two moons, a 1-head key dominated by one moon),
so each model is trained from a few seeds (--restarts) and the run with the lowest training loss is
kept; the losses of all runs are printed and saved.

Figures: context_error.png (error vs context length: generating 25 steps, and predicting one step),
weights.png (|W_k|, |W_v|, |W_o|), disentanglement.png (how much of each head's weight sits on one
moon, during training).
"""
import math
from itertools import combinations

import numpy as np

from _common import Stopwatch, figure, fit, parse_args, print_table, run, save_figure, save_json, seed_all
from minimosaic import nn, ops
from minimosaic.memories import causal_mask, merge_heads, softmax_attention, split_heads
from minimosaic.tensor import Tensor, no_grad

N_MOONS = 3
CANDIDATE_PERIODS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5)
HELD_OUT = (1.0, 2.0, 3.0)   # validation moons: single periods 1, 2, 3, joint period 6
MAX_JOINT_PERIOD = 6.0
PHASE = 0.3
CLIP = 0.5


# ---------------------------------------------------------------- data
def joint_period(periods):
    """lcm of half-integer periods, in time units."""
    return math.lcm(*(round(2 * p) for p in periods)) / 2


def period_triples():
    """Training triples: every triple of CANDIDATE_PERIODS whose joint period is at most 6, but HELD_OUT."""
    triples = [t for t in combinations(CANDIDATE_PERIODS, N_MOONS) if joint_period(t) <= MAX_JOINT_PERIOD]
    return [t for t in triples if t != HELD_OUT]


def moons(periods, start, length, resolution):
    """Observations (B, length, 6) of moons with `periods` (B, 3) from times `start` (B,), `resolution`
    steps per time unit; columns (cos, sin) of moon 1, then moon 2, then moon 3."""
    t = start[:, None] + np.arange(length) / resolution                     # (B, length)
    angle = 2 * np.pi * t[:, :, None] / periods[:, None, :] + PHASE          # (B, length, 3)
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1).reshape(len(start), length, 2 * N_MOONS)


def sample(rng, triples, batch, length, resolution):
    periods = np.asarray([triples[i] for i in rng.integers(0, len(triples), batch)])
    return moons(periods, rng.uniform(0, 100, batch), length, resolution).astype(np.float32)


# ---------------------------------------------------------------- the model
class ComplexLinear(nn.Module):
    """y = x @ W with W (2n, 2m) made of 2x2 blocks [[a, b], [-b, a]]: complex multiplication by
    a + ib from input pair i to output pair j. Parameters: real (n, m) = a, imag (n, m) = b."""

    def __init__(self, n_in, n_out, std=0.17):
        self.real = nn.normal((n_in, n_out), std)
        self.imag = nn.normal((n_in, n_out), std)

    def weight(self):
        n, m = self.real.shape
        xp = self.real.xp
        one = xp.asarray([[1.0, 0.0], [0.0, 1.0]], dtype=self.real.dtype)
        turn = xp.asarray([[0.0, 1.0], [-1.0, 0.0]], dtype=self.real.dtype)
        a, b = self.real.reshape(n, 1, m, 1), self.imag.reshape(n, 1, m, 1)
        return (a * one[None, :, None, :] + b * turn[None, :, None, :]).reshape(2 * n, 2 * m)

    def magnitude(self):
        """|a + ib| per (input pair, output pair): (n, m) NumPy array."""
        return np.hypot(self.real.numpy(), self.imag.numpy())

    def forward(self, x):
        B, T, C = x.shape
        return (x.reshape(B * T, C) @ self.weight()).reshape(B, T, -1)


class MoonMemory(nn.Module):
    """One context memory: xhat_{t+1} = W_o [sum_{s<t} softmax_s(2 beta k_t . k_s) v_s]_heads."""

    def __init__(self, n_head, beta, width=N_MOONS):
        """width: complex features of keys and values (2 width real ones), split among n_head heads."""
        self.n_head, self.beta = n_head, beta
        self.W_k = ComplexLinear(N_MOONS, width)
        self.W_v = ComplexLinear(N_MOONS, width)
        self.W_o = ComplexLinear(width, N_MOONS)

    def keys(self, x):
        return split_heads(self.W_k(x), self.n_head)                            # (B, H, T, hs)

    def recall(self, query, keys, values, mask=None):
        """Kernel smoothing of `values` at `query`, heads merged, through W_o: (B, Tq, 6)."""
        B, H, Tq, hs = query.shape
        y = softmax_attention(query, keys, values, mask, scale=2 * self.beta)  # (B, H, Tq, hs)
        return self.W_o(merge_heads(y).reshape(B, Tq, H * hs))

    def forward(self, x):
        """Predictions of x_{t+1} for every t: (B, T, 6) from x (B, T, 6)."""
        k = self.keys(x)
        v = ops.shift(split_heads(self.W_v(x), self.n_head), -1, axis=2)        # v_t = W_v x_{t+1}
        return self.recall(k, k, v, causal_mask(k.xp, x.shape[1], 0, include_present=False))

    def loss(self, x):
        """Mean squared error of the predictions of x_1..x_{T-1}, each coordinate's error clipped to
        [-0.5, 0.5] (as in the paper's code): where the past holds no match yet, the next position is
        unpredictable, and the clipped loss does not pull the memory towards blurry guesses there.
        Position 0 is left out: it has no past."""
        x = Tensor(x)
        error = ops.clip(self(x[:, :-1]) - x[:, 1:], -CLIP, CLIP)
        return (error * error)[:, 1:].mean()

    def generate(self, context, n):
        """Continue each sequence of `context` (B, c, 6) by n predictions, each fed back as the next
        observation; returns (B, n, 6). The memory holds (k_s, v_s) for s < c - 1 (their next
        observation is known); each prediction completes the pair of the position before it."""
        with no_grad():
            x = Tensor(context)
            keys = self.keys(x)                                                  # (B, H, c, hs)
            values = split_heads(self.W_v(x[:, 1:]), self.n_head)                # (B, H, c - 1, hs)
            out = []
            for _ in range(n):
                y = self.recall(keys[:, :, -1:], keys[:, :, :-1], values)       # (B, 1, 6)
                out.append(y.data)
                values = ops.concatenate([values, split_heads(self.W_v(y), self.n_head)], axis=2)
                keys = ops.concatenate([keys, self.keys(y)], axis=2)
        return np.concatenate(out, axis=1)


def purity(model):
    """Per head: the share of the squared weight of W_k, W_v and W_o that belongs to its strongest moon
    (1 = the head sees one moon only, 1/3 = spread evenly). One number per matrix (mean over heads)."""
    H = model.n_head
    found = {}
    for name in ("W_k", "W_v", "W_o"):
        m2 = getattr(model, name).magnitude() ** 2                               # (moons, features)
        if name == "W_o":
            m2 = m2.T                                                            # features in, moons out
        per_head = m2.reshape(N_MOONS, H, -1).sum(axis=2)                        # (moons, H)
        found[name] = float((per_head.max(axis=0) / per_head.sum(axis=0)).mean())
    return found


# ---------------------------------------------------------------- the experiment
def context_error(model, rng, resolution, length, n_gen, contexts, batch):
    """Mean |generated - true| over the n_gen steps after each context length, on the held-out moons."""
    periods = np.tile(np.asarray(HELD_OUT), (batch, 1))
    x = moons(periods, rng.uniform(0, 100, batch), length + n_gen, resolution).astype(np.float32)
    return [float(np.abs(model.generate(x[:, :c], n_gen) - x[:, c:c + n_gen]).mean()) for c in contexts]


def one_step_error(model, rng, resolution, length, batch):
    """Mean |prediction - true| of x_{t+1} at each position t (teacher forcing) on the held-out moons."""
    periods = np.tile(np.asarray(HELD_OUT), (batch, 1))
    x = moons(periods, rng.uniform(0, 100, batch), length + 1, resolution).astype(np.float32)
    with no_grad():
        predicted = model(Tensor(x[:, :-1])).data
    return np.abs(predicted - x[:, 1:]).mean(axis=(0, 2))


def error_between(contexts, errors, low, high):
    """Mean error over the context lengths in [low, high)."""
    inside = [e for c, e in zip(contexts, errors) if low <= c < high]
    return float(np.mean(inside)) if inside else float("nan")


def train_moons(n_head, seed, triples, steps, batch, block, resolution, lr, beta, log_every, label, width=N_MOONS):
    rng = seed_all(seed)
    model = MoonMemory(n_head, beta, width)
    track = []
    _, losses = fit(model, lambda step: (sample(rng, triples, batch, block + 1, resolution),), steps, lr,
                    evaluate=lambda step: track.append((step, purity(model))), eval_every=max(1, steps // 20),
                    weight_decay=0.0, grad_clip=0.0, min_lr_ratio=0.01, log_every=log_every, label=label)
    return model, float(np.mean(losses[-20:])), track


def options(parser):
    parser.add_argument("--restarts", type=int, default=None, help="seeds per model (default 3, quick 1)")


def main():
    args = parse_args("three_moons", __doc__.splitlines()[0], options)
    q = args.quick
    resolution = 10                       # steps per time unit: single periods 10, 20, 30, joint period 60
    block = 96 if q else 128              # training sequence length (> 2 joint periods in full mode)
    steps, batch, lr = (60, 16, 2e-2) if q else (600, 32, 1e-2)
    restarts = args.restarts or (1 if q else 3)
    beta, n_gen, eval_batch = 25.0, (8 if q else 25), (16 if q else 64)
    contexts = list(range(2, int(2.2 * MAX_JOINT_PERIOD * resolution), 4 if q else 1))
    triples = period_triples()
    print(f"{len(triples)} training triples of periods, held out {HELD_OUT} "
          f"(single periods {[p * resolution for p in HELD_OUT]} steps, joint period "
          f"{joint_period(HELD_OUT) * resolution:.0f} steps)")

    results, models = {}, {}
    for n_head in (1, 3):
        label = f"{n_head} head{'s' if n_head > 1 else ''} x dim {2 * N_MOONS // n_head}"
        clock = Stopwatch()
        runs = [train_moons(n_head, args.seed + i, triples, steps, batch, block, resolution, lr, beta,
                            None if q else steps // 3, f"{label} seed {args.seed + i}") for i in range(restarts)]
        model, final_loss, track = min(runs, key=lambda run: run[1])
        errors = context_error(model, np.random.default_rng(args.seed + 1), resolution,
                               contexts[-1] + 1, n_gen, contexts, eval_batch)
        one_step = one_step_error(model, np.random.default_rng(args.seed + 2), resolution, contexts[-1] + 1,
                                  eval_batch)
        shortest, longest, joint = (resolution * min(HELD_OUT), resolution * max(HELD_OUT),
                                    resolution * joint_period(HELD_OUT))
        results[label] = dict(n_head=n_head, final_loss=final_loss, restart_losses=[r[1] for r in runs],
                              purity=purity(model), purity_history=track, errors=errors,
                              one_step_errors=one_step,
                              error_before_periods=error_between(contexts, errors, 0, shortest),
                              error_longest_to_joint=error_between(contexts, errors, longest + 2, joint),
                              error_after_joint=error_between(contexts, errors, joint + 2, math.inf),
                              train_seconds=clock())
        models[label] = model

    singles = [p * resolution for p in HELD_OUT]
    joint = joint_period(HELD_OUT) * resolution
    rows = [[label, r["final_loss"], " ".join(f"{x:.4f}" for x in r["restart_losses"]),
             r["error_before_periods"], r["error_longest_to_joint"], r["error_after_joint"],
             r["purity"]["W_k"], r["purity"]["W_v"], r["purity"]["W_o"]] for label, r in results.items()]
    print(f"\nheld-out moons: single periods {singles} steps, joint period {joint:.0f} steps; "
          f"generation error over {n_gen} steps for contexts < {min(singles):.0f}, "
          f"in ({max(singles):.0f}, {joint:.0f}), > {joint:.0f}")
    print_table(["model", "train loss", "all restarts", f"err ctx<{min(singles):.0f}",
                 f"err {max(singles):.0f}<ctx<{joint:.0f}", f"err ctx>{joint:.0f}", "purity W_k", "purity W_v",
                 "purity W_o"], rows)

    # (a) error vs context length: generating n_gen steps (left), predicting one step (right)
    fig, axes = figure(1, 2)
    for ax, key, xs, ylabel in ((axes[0, 0], "errors", contexts, f"mean |generated - true| over {n_gen} steps"),
                                (axes[0, 1], "one_step_errors", None, "mean |predicted - true|, one step")):
        for label, r in results.items():
            ax.plot(xs if xs is not None else np.arange(1, len(r[key]) + 1), r[key], label=label, lw=1.3)
        for p in singles:
            ax.axvline(p, color="grey", lw=0.8, ls=":")
        ax.axvline(joint, color="red", lw=0.8, ls="--", label="joint period")
        ax.set_xlabel("context length (steps)")
        ax.set_ylabel(ylabel)
        ax.set_title("held-out moons, periods 1, 2, 3 (grey: single periods)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save_figure(fig, args.out / "context_error.png")

    # (b) weight maps
    fig, axes = figure(2, 3, size=(3.0, 2.8))
    for row, (label, model) in enumerate(models.items()):
        for col, name in enumerate(("W_k", "W_v", "W_o")):
            ax = axes[row, col]
            m = getattr(model, name).magnitude()
            m = m if name != "W_o" else m.T       # rows: moons; columns: feature pairs (= heads when 3)
            image = ax.imshow(m, cmap="viridis", vmin=0)
            fig.colorbar(image, ax=ax, shrink=0.8)
            ax.set_xticks(range(N_MOONS), [f"f{j}" if model.n_head == 1 else f"head {j}" for j in range(3)],
                          fontsize=7)
            ax.set_yticks(range(N_MOONS), [f"moon {i}" for i in range(N_MOONS)], fontsize=7)
            ax.set_title(f"{label}: |{name}|{'^T' if name == 'W_o' else ''}", fontsize=8)
    save_figure(fig, args.out / "weights.png")

    # purity during training
    fig, axes = figure()
    ax = axes[0, 0]
    for label, r in results.items():
        steps_seen = [s for s, _ in r["purity_history"]]
        ax.plot(steps_seen, [np.mean(list(p.values())) for _, p in r["purity_history"]], "o-", ms=3,
                label=label)
    ax.axhline(1 / 3, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("weight share of the strongest moon per head")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, args.out / "disentanglement.png")

    save_json(args.out / "results.json", dict(quick=q, resolution=resolution, block=block, steps=steps,
                                              batch=batch, lr=lr, restarts=restarts, beta=beta, n_gen=n_gen,
                                              contexts=contexts, single_periods=singles, joint_period=joint,
                                              models=results))


if __name__ == "__main__":
    run(main)
