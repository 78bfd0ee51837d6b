"""Beyond language: Memory Mosaic vs GPT on multichannel time series, continuous inputs, MSE loss.

Each sequence has four channels, each with its own parameters drawn afresh per sequence, so what
comes next must be inferred from the context (no weight can store a sequence's periods):

  0  a sine wave, period 6 to 40 steps, random phase and amplitude 0.5 to 1
  1  a sum of two sines (periods 6 to 40 and 1.5 to 3 times that)
  2  a sawtooth, period 6 to 30 steps
  3  regime switching: two regimes (two sines of different periods and amplitudes); at each step the
     regime switches with probability 1/40, so a sequence of 128 steps switches about 3 times

plus Gaussian noise of std 0.05 on every channel. The task: predict x_{t+1} (4 numbers) from
x_0 .. x_t, loss = mean squared error.

The library's models take token ids, so the two models are built here from the library's own blocks
(MosaicBlock, GPTBlock) with a linear input projection R^4 -> R^d instead of the token embedding and
a linear output head R^d -> R^4 instead of the tied vocabulary head:

    Memory Mosaic  h = x W_in;            h = MosaicBlock(h) x L;  y = LN(h) W_out
    GPT            h = x W_in + P[t];     h = GPTBlock(h) x L;     y = LN(h) W_out

Same width, depth and heads; the mosaic's persistent memory is sized so that both have the same number
of parameters to within 1% (counted and printed: the GPT's position table is paid for by extra slots).

Reported: the error at each position of the sequence (error against context length: a periodic
channel becomes predictable once one period is in the context), per channel; and what each head is
for: the increase of each channel's error when one head's output is removed (its rows of W_o set to
zero) (heads.png).
"""
import numpy as np

from _common import (Stopwatch, figure, fit, parse_args, pm, print_table, run, save_figure, save_json, seed_all,
                     seed_list, seeds_option, summarize)
from minimosaic import nn
from minimosaic.memories import project
from minimosaic.models import GPTBlock, ModelConfig, MosaicBlock
from minimosaic.tensor import Tensor, no_grad

CHANNELS = ("sine", "two sines", "sawtooth", "regime switching")
NOISE = 0.05


# ---------------------------------------------------------------- data
def series_batch(rng, batch, length):
    """x (B, length + 1, 4) float32: the four channels described in the module docstring."""
    t = np.arange(length + 1)[None, :]                                             # (1, L)
    u = lambda low, high: rng.uniform(low, high, (batch, 1))  # noqa: E731
    phase = lambda: u(0, 2 * np.pi)  # noqa: E731
    sine = u(0.5, 1.0) * np.sin(2 * np.pi * t / u(6, 40) + phase())
    p = u(6, 40)
    two = 0.5 * np.sin(2 * np.pi * t / p + phase()) + 0.5 * np.sin(2 * np.pi * t / (p * u(1.5, 3.0)) + phase())
    saw = 2 * ((t / u(6, 30) + u(0, 1)) % 1.0) - 1
    regimes = [u(0.4, 1.0) * np.sin(2 * np.pi * t / u(4, 12) + phase()),   # a fast and a slow regime
               u(0.4, 1.0) * np.sin(2 * np.pi * t / u(16, 40) + phase())]
    switches = np.cumsum(rng.random((batch, length + 1)) < 1 / 40, axis=1) % 2
    switching = np.where(switches == 0, regimes[0], regimes[1])
    x = np.stack([sine, two, saw, switching], axis=-1)
    return (x + NOISE * rng.standard_normal(x.shape)).astype(np.float32)


# ---------------------------------------------------------------- the models
class SeriesModel(nn.Module):
    """Continuous-input model: input projection, the library's blocks, final LayerNorm, output head."""

    def __init__(self, config, n_channels):
        d = config.n_embd
        self.kind = config.model
        self.W_in = nn.Linear(n_channels, d, bias=True)
        if self.kind == "gpt":
            self.position_embedding = nn.Embedding(config.block_size, d, std=0.02)
        self.blocks = [(MosaicBlock if self.kind == "mosaic" else GPTBlock)(config) for _ in range(config.n_layer)]
        self.ln_f = nn.LayerNorm(d)
        self.W_out = nn.Linear(d, n_channels, bias=True, std=0.02)

    def forward(self, x):
        """x (B, T, channels) -> predictions of the next step (B, T, channels)."""
        h = project(self.W_in, x)                                                  # (B, T, d)
        if self.kind == "gpt":
            h = h + self.position_embedding(h.xp.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h)
        return project(self.W_out, self.ln_f(h))

    def loss(self, x):
        x = Tensor(x)
        error = self(x[:, :-1]) - x[:, 1:]
        return (error * error).mean()

    def head_outputs(self):
        """Per layer: (the W_o whose input rows are the heads, number of heads) of the context
        memory (mosaic) or the attention (GPT)."""
        return [((b.context if self.kind == "mosaic" else b.attention).W_o.weight, b.context.n_head
                 if self.kind == "mosaic" else b.attention.n_head) for b in self.blocks]


def squared_errors(model, x):
    """(pred - true)^2 for every sequence, position and channel: (B, T, channels) NumPy."""
    with no_grad():
        return (model(Tensor(x[:, :-1])).data - x[:, 1:]) ** 2


def head_ablation(model, x):
    """(layers * heads, channels): increase of each channel's mean squared error (positions >= 8)
    when one head's rows of W_o are zeroed, relative to the full model's error on that channel."""
    base = squared_errors(model, x)[:, 8:].mean(axis=(0, 1))
    rows = []
    for weight, n_head in model.head_outputs():
        hs = weight.shape[0] // n_head
        for h in range(n_head):
            kept = weight.data[h * hs:(h + 1) * hs].copy()
            weight.data[h * hs:(h + 1) * hs] = 0
            rows.append(squared_errors(model, x)[:, 8:].mean(axis=(0, 1)) / base - 1)
            weight.data[h * hs:(h + 1) * hs] = kept
    return np.asarray(rows)


def main():
    args = parse_args("time_series", __doc__.splitlines()[0], seeds_option)
    q = args.quick
    length = 48 if q else 128
    n_layer, n_head, d = 2, 4, 32
    steps, batch, lr = (40, 8, 3e-3) if q else (1000, 16, 3e-3)
    seeds = seed_list(args)
    # the GPT's position table (length x d) paid for by persistent slots: each slot costs 2 d per layer
    pmem = int(3.5 * d) + round(length * d / (2 * d * n_layer))
    configs = {"Memory Mosaic": ModelConfig(model="mosaic", n_layer=n_layer, n_head=n_head, n_embd=d,
                                            block_size=length, pmem_size=pmem, vocab_size=1),
               "GPT": ModelConfig(model="gpt", n_layer=n_layer, n_head=n_head, n_embd=d, block_size=length,
                                  vocab_size=1)}
    held_out = series_batch(np.random.default_rng(10_000), 64 if q else 256, length)

    runs = {label: [] for label in configs}
    for seed in seeds:
        for label, config in configs.items():
            rng = seed_all(seed)
            model = SeriesModel(config, len(CHANNELS))
            clock = Stopwatch()
            _, losses = fit(model, lambda step, rng=rng: (series_batch(rng, batch, length),), steps, lr,
                            label=label)
            model.eval()
            errors = squared_errors(model, held_out)                              # (B, T, channels)
            by_position = errors.mean(axis=0)                                      # (T, channels)
            runs[label].append(dict(seed=seed, n_params=int(model.num_parameters()),
                                    final_loss=float(np.mean(losses[-20:])), mse=float(errors.mean()),
                                    mse_first_8=float(by_position[:8].mean()),
                                    mse_late=float(by_position[length // 2:].mean()),
                                    mse_late_by_channel=by_position[length // 2:].mean(axis=0),
                                    by_position=by_position, heads=head_ablation(model, held_out),
                                    train_seconds=clock()))
            print(f"seed {seed} {label}: held-out MSE {errors.mean():.4f} ({clock():.0f} s)", flush=True)

    late = slice(length // 2, None)
    baselines = {"predict 0": held_out[:, 1:] ** 2, "repeat the last value": (held_out[:, 1:] - held_out[:, :-1]) ** 2}
    results = {label: dict(mse=float(e.mean()), mse_late=float(e[:, late].mean()),
                           mse_late_by_channel=e[:, late].mean(axis=(0, 1))) for label, e in baselines.items()}
    for label, per_seed in runs.items():
        results[label] = dict(
            config=configs[label].to_dict(), n_params=per_seed[0]["n_params"], runs=per_seed,
            by_position_mean=np.mean([r["by_position"] for r in per_seed], axis=0),
            heads_mean=np.mean([r["heads"] for r in per_seed], axis=0),
            **{k: summarize([r[k] for r in per_seed]) for k in ("final_loss", "mse", "mse_first_8", "mse_late")},
            **{f"mse_late_{name}": summarize([r["mse_late_by_channel"][c] for r in per_seed])
               for c, name in enumerate(CHANNELS)})

    print(f"\nheld-out MSE of the next step (noise floor {NOISE ** 2:.4f}), {steps} steps of {batch} x {length}; "
          f"mean ± std over seeds {seeds}")
    print_table(["model", "parameters", "all positions", "positions < 8", f"positions >= {length // 2}",
                 *[f"{name} (late)" for name in CHANNELS]],
                [[label, r["n_params"], pm(r["mse"], 4), pm(r["mse_first_8"], 4), pm(r["mse_late"], 4),
                  *[pm(r[f"mse_late_{name}"], 4) for name in CHANNELS]] for label, r in results.items()
                 if label in configs] +
                [[label, "-", f"{r['mse']:.4f}", "-", f"{r['mse_late']:.4f}", *[f"{v:.4f}" for v in r["mse_late_by_channel"]]]
                 for label, r in results.items() if label not in configs])

    fig, axes = figure(1, len(CHANNELS) + 1, size=(3.4, 3.2))
    window = 1 if q else 4
    smooth = lambda c: np.convolve(c, np.ones(window) / window, mode="valid")  # noqa: E731
    for label, r in ((label, results[label]) for label in configs):
        curves = [r["by_position_mean"].mean(axis=1)] + [r["by_position_mean"][:, c] for c in range(len(CHANNELS))]
        for ax, curve, title in zip(axes[0], curves, ("all channels", *CHANNELS)):
            ax.plot(np.arange(len(smooth(curve))) + (window - 1) / 2, smooth(curve),
                    label=f"{label} ({r['n_params'] / 1e3:.1f}k)", lw=1.2)
            ax.set_title(title, fontsize=9)
    for ax in axes[0]:
        ax.axhline(NOISE ** 2, color="grey", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("context length (steps)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("held-out MSE of the next step")
    axes[0, 0].legend(fontsize=7)
    save_figure(fig, args.out / "context_error.png")

    fig, axes = figure(1, 2, size=(4.2, 4.0))
    for ax, label in zip(axes[0], configs):
        m = results[label]["heads_mean"]
        image = ax.imshow(m, cmap="magma", vmin=0, aspect="auto")
        fig.colorbar(image, ax=ax, shrink=0.8, label="relative MSE increase")
        ax.set_xticks(range(len(CHANNELS)), CHANNELS, fontsize=7, rotation=20)
        ax.set_yticks(range(len(m)), [f"layer {i // n_head} head {i % n_head}" for i in range(len(m))], fontsize=7)
        ax.set_title(f"{label}: one head removed\n({'context memory' if 'Mosaic' in label else 'attention'}; "
                     f"mean over {len(seeds)} seed(s))", fontsize=8)
    save_figure(fig, args.out / "heads.png")
    save_json(args.out / "results.json", dict(quick=q, seeds=seeds, length=length, steps=steps, batch=batch, lr=lr,
                                              channels=CHANNELS, noise=NOISE, models=results))


if __name__ == "__main__":
    run(main)
