"""Length extrapolation: train at context T on tiny Shakespeare, read windows of up to 4T.

The paper notes that the Memory Mosaic's attention looks flat past the training context, but never
tests whether it can *read* a longer context. Here three models of the same size are trained by
minimosaic.train on windows of T characters, the same settings and batches:

  * the Memory Mosaic (no position embeddings: order enters through leaky keys and peek-ahead values);
  * the GPT with learned position embeddings, the usual baseline: it has no embedding for position T
    or later, so it cannot read a longer window at all (its curve stops at T);
  * the GPT without position embeddings (NoPE: `ModelConfig(position_embedding=False)`), which sees
    order only through its causal mask: the fair comparison, a transformer that can be asked.

Each is then evaluated on the whole validation split cut into windows of 4T characters: the loss at
each position of the window. Up to T the models are where they were trained; past T each position
has more context than any training window had. If a model extrapolates, its loss past T stays at (or
below) its loss just before T; if it does not, the loss rises past T.

Figure: by_position.png (validation loss vs position in the window, mean over seeds, min-max shaded;
the dashed line is the training context T). `minimosaic eval RUN --context 4T` gives the same numbers
for a saved run.
"""
import shutil

import numpy as np

from _common import (Stopwatch, figure, finish_axes, parse_args, pm, print_table, run, save_figure, save_json, seed_list,
                     seeds_option, summarize)
from minimosaic.models import ModelConfig
from minimosaic.train import TrainConfig, loss_by_position, prepare_data, train

MODELS = {  # label: (model, position_embedding)
    "Memory Mosaic": ("mosaic", True),
    "GPT (learned positions)": ("gpt", True),
    "GPT (NoPE)": ("gpt", False),
}
FACTOR = 4   # evaluate windows of FACTOR * T


def options(parser):
    parser.add_argument("--data-dir", default=None, help="folder holding tinyshakespeare.txt")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1500, quick 20)")
    seeds_option(parser)


def bands(per_position, T):
    """Mean loss over positions [T/2, T) (the end of the trained window), [T, 2T) and [2T, 4T);
    None where the curve does not reach."""
    def mean(lo, hi):
        return float(np.mean(per_position[lo:hi])) if len(per_position) >= hi else None
    return dict(late_in_window=mean(T // 2, T), first_extra=mean(T, 2 * T), far=mean(2 * T, FACTOR * T))


def main():
    args = parse_args("length_extrapolation", __doc__.splitlines()[0], options)
    q = args.quick
    steps = args.steps or (20 if q else 1500)
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=32) if q else \
        dict(n_layer=2, n_head=4, n_embd=64, block_size=64)
    T = shape["block_size"]
    seeds = seed_list(args)
    base = dict(data="shakespeare", level="char", steps=steps, batch_size=8 if q else 16, lr=3e-3, min_lr=3e-4,
                warmup=min(100, steps // 10), eval_interval=steps, eval_batches=2 if q else 10,
                log_interval=max(1, steps // 10))
    data = prepare_data(TrainConfig(**base), data_dir=args.data_dir)
    print(f"tiny Shakespeare: {len(data.train_ids):,} training / {len(data.val_ids):,} validation characters; "
          f"train at T = {T}, evaluate windows of {FACTOR * T}; seeds {seeds}")

    runs = {label: [] for label in MODELS}
    for seed in seeds:
        for label, (kind, positions) in MODELS.items():
            model_config = ModelConfig(model=kind, vocab_size=data.tokenizer.vocab_size, position_embedding=positions,
                                       **shape)
            config = TrainConfig(**base, seed=seed, out=str(args.out / "runs" / f"{kind}-{positions}-{seed}"))
            shutil.rmtree(config.out, ignore_errors=True)   # a fresh run each time (train refuses to overwrite)
            clock = Stopwatch()
            result = train(model_config, config, data)
            train_seconds = clock()
            window = FACTOR * T if result.model.max_context is None else result.model.max_context
            mean, per_position = loss_by_position(result.model, data.val_ids, window, 16, "cpu",
                                                  max_batches=2 if q else None)
            runs[label].append(dict(seed=seed, n_params=int(result.model.num_parameters()), window=window,
                                    mean_loss=mean, per_position=per_position, bands=bands(per_position, T),
                                    train_seconds=train_seconds, eval_seconds=clock() - train_seconds))
            b = runs[label][-1]["bands"]
            print(f"seed {seed} {label}: loss [T/2, T) {b['late_in_window']:.4f}, [T, 2T) "
                  f"{b['first_extra'] if b['first_extra'] is None else round(b['first_extra'], 4)} "
                  f"({train_seconds:.0f} s training)", flush=True)

    results = {}
    for label, per_seed in runs.items():
        curves = [r["per_position"] for r in per_seed]
        results[label] = dict(
            n_params=per_seed[0]["n_params"], window=per_seed[0]["window"], runs=per_seed,
            per_position_mean=np.mean(curves, axis=0), per_position_min=np.min(curves, axis=0),
            per_position_max=np.max(curves, axis=0),
            **{name: summarize([r["bands"][name] for r in per_seed]) for name in per_seed[0]["bands"]},
            train_seconds=summarize([r["train_seconds"] for r in per_seed]))

    print(f"\nvalidation loss (nats/char) by position in windows of {FACTOR * T}, trained at T = {T}; "
          f"mean ± std over seeds {seeds}")
    print_table(["model", "parameters", "reads up to", "[T/2, T)", "[T, 2T)", "[2T, 4T)"],
                [[label, r["n_params"], r["window"], pm(r["late_in_window"]), pm(r["first_extra"]), pm(r["far"])]
                 for label, r in results.items()])

    fig, axes = figure(size=(7.0, 4.2))
    ax = axes[0, 0]
    window = 1 if q else 4
    for label, r in results.items():
        smooth = lambda c: np.convolve(c, np.ones(window) / window, mode="valid")  # noqa: E731
        x = np.arange(len(smooth(r["per_position_mean"]))) + (window - 1) / 2
        line, = ax.plot(x, smooth(r["per_position_mean"]), lw=1.3, label=f"{label} ({r['n_params'] / 1e3:.0f}k)")
        ax.fill_between(x, smooth(r["per_position_min"]), smooth(r["per_position_max"]), color=line.get_color(),
                        alpha=0.2, lw=0)
        if r["window"] < FACTOR * T:
            ax.plot(x[-1], smooth(r["per_position_mean"])[-1], "x", ms=9, mew=2, color=line.get_color())
            ax.annotate(f"no learned position\npast {r['window'] - 1}: stops here", (x[-1], smooth(r["per_position_mean"])[-1]),
                        xytext=(8, 18), textcoords="offset points", fontsize=8, color=line.get_color())
    ax.axvline(T, color="grey", ls="--", lw=0.9, label=f"training context T = {T}")
    ax.set_title(f"mean over {len(seeds)} seed(s), min-max shaded", fontsize=9)
    low = min(float(np.min(r["per_position_mean"][4:])) for r in results.values())
    finish_axes(ax, f"position in the evaluation window (trained on windows of {T})",   # positions 0-3 (no
                f"validation loss (nats/char){', mean of 4 positions' if window > 1 else ''}",  # context yet)
                (low - 0.1, low + 1.0))                                              # would squash the rest
    save_figure(fig, args.out / "by_position.png")
    save_json(args.out / "results.json", dict(quick=q, steps=steps, seeds=seeds, block_size=T,
                                              vocab_size=data.tokenizer.vocab_size, factor=FACTOR,
                                              shape=shape, train_config=base, models=results))


if __name__ == "__main__":
    run(main)
