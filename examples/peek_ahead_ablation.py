"""Peek-ahead ablation: does one Memory Mosaic layer still become an induction head without it?

The task and the training are induction_head.py's (random tokens with a block repeated; accuracy of
the most likely next token on the second copy, held-out sequences). There, ONE mosaic layer solves it
because its context memory stores, for each past moment s, a key describing "x_s and the tokens just
before it" (leaky average) with a value that peeks at the next token x_{s+1}. Here we take those two
ingredients away one at a time, in the context memory of the same one-layer model:

  * no peek-ahead: the value is the present token only, v_s = W_v x_s (the peek coefficient c fixed at
    1 instead of learned). A matching past moment then returns the token we already have; the next
    token can only come from the key of s+1, which holds x_s at weight lambda (the leaky average);
  * no leaky average (lambda = 0): the key is the present token only; a token that occurred twice
    before is ambiguous;
  * a longer leaky average, lambda = 0.9 for every head (about 10 tokens): keys describe more of the
    past, so they match only once the second copy has gone on for a while;
  * no peek-ahead with that longer leaky average: does a strong lambda make up for the missing peek?

The default model learns c and lambda per head (lambda starts at exp(-0.5) .. exp(-5)). The variants
are built inside this example, by construction: the learned per-head scalar is replaced by a fixed
tensor that is not a parameter (so the optimizer never sees it); the model's code is unchanged. Only
the context memory is changed; the persistent memory keeps its own learned leaky keys.

Figures: accuracy.png (held-out accuracy vs step, mean over seeds, min-max shaded) and by_offset.png
(final accuracy vs position in the second copy: how far into the copy a variant needs to be).
"""
import numpy as np

from _common import (Stopwatch, figure, finish_axes, fit, parse_args, pm, print_table, run, save_figure, save_json, seed_all,
                     seed_list, seeds_option, summarize)
from induction_head import accuracy, induction_batch
from minimosaic import asnumpy
from minimosaic.memories import EXP_SCALING
from minimosaic.models import ModelConfig, build_model
from minimosaic.tensor import Tensor

VARIANTS = {  # label: (peek c fixed or None = learned, lambda fixed or None = learned)
    "as in the paper (learned c, lambda)": (None, None),
    "no peek-ahead (c = 1)": (1.0, None),
    "no leaky average (lambda = 0)": (None, 0.0),
    "long leaky average (lambda = 0.9)": (None, 0.9),
    "no peek-ahead, lambda = 0.9": (1.0, 0.9),
}


def ablate(model, peek=None, decay=None):
    """Fix the context memories' peek coefficient c and/or leaky-average decay lambda (all heads) to
    constants that are not parameters. lambda = exp(-|EXP_SCALING r|) for the stored rate r."""
    for block in model.blocks:
        memory = block.context
        H = memory.n_head
        if peek is not None:
            memory.value.peek = Tensor(np.full(H, peek, dtype=np.float32))
        if decay is not None:
            rate = -np.log(max(decay, 1e-30)) / EXP_SCALING     # lambda 0: exp(-69), 0 in float32
            memory.key.leak_rate = Tensor(np.full(H, rate, dtype=np.float32))
    return model


def accuracy_by_offset(model, batches, max_block):
    """Accuracy at each offset into the counted part of the second copy (offset 0 = its second token)."""
    hits, counts = np.zeros(max_block), np.zeros(max_block)
    for x, y in batches:
        predicted = asnumpy(model(x).data.argmax(axis=-1))
        counted = y >= 0
        offset = np.cumsum(counted, axis=1) - 1                                  # within the copy
        np.add.at(hits, offset[counted], (predicted == y)[counted])
        np.add.at(counts, offset[counted], 1)
    return hits / np.maximum(counts, 1), counts


def main():
    args = parse_args("peek_ahead_ablation", __doc__.splitlines()[0], seeds_option)
    q = args.quick
    vocab, length, (min_block, max_block) = (16, 32, (6, 10)) if q else (32, 64, (16, 24))
    n_embd, n_head = 64, 4
    steps, batch, lr = (40, 16, 3e-3) if q else (600, 32, 1e-3)
    eval_every = 10 if q else 50
    seeds = seed_list(args)
    eval_rng = np.random.default_rng(10_000)
    held_out = [induction_batch(eval_rng, 64, length, vocab, min_block, max_block) for _ in range(2 if q else 8)]

    runs = {label: [] for label in VARIANTS}
    for seed in seeds:
        for label, (peek, decay) in VARIANTS.items():
            rng = seed_all(seed)
            config = ModelConfig(model="mosaic", vocab_size=vocab, n_layer=1, n_head=n_head, n_embd=n_embd,
                                 block_size=length)
            model = ablate(build_model(config), peek, decay)
            clock = Stopwatch()
            history, losses = fit(
                model, lambda step, rng=rng: induction_batch(rng, batch, length, vocab, min_block, max_block),
                steps, lr, evaluate=lambda step, model=model: accuracy(model, held_out), eval_every=eval_every,
                label=label)
            model.eval()
            by_offset, _ = accuracy_by_offset(model, held_out, max_block)
            context = model.blocks[0].context
            runs[label].append(dict(seed=seed, n_params=int(model.num_parameters()), history=history,
                                    final_accuracy=history[-1][1], best_accuracy=max(a for _, a in history),
                                    final_loss=float(np.mean(losses[-20:])), by_offset=by_offset,
                                    peek=asnumpy(context.value.peek.data),
                                    decay=asnumpy(context.key.decay().data), train_seconds=clock()))
            print(f"seed {seed} {label}: accuracy {history[-1][1]:.3f} ({clock():.0f} s)", flush=True)

    results = {}
    for label, per_seed in runs.items():
        results[label] = dict(
            fixed_peek=VARIANTS[label][0], fixed_decay=VARIANTS[label][1], n_params=per_seed[0]["n_params"],
            runs=per_seed, final_accuracy=summarize([r["final_accuracy"] for r in per_seed]),
            best_accuracy=summarize([r["best_accuracy"] for r in per_seed]),
            final_loss=summarize([r["final_loss"] for r in per_seed]),
            by_offset_mean=np.mean([r["by_offset"] for r in per_seed], axis=0),
            train_seconds=summarize([r["train_seconds"] for r in per_seed]))

    print(f"\none mosaic layer, induction task (vocab {vocab}, length {length}, blocks of {min_block}-{max_block}; "
          f"chance {1 / vocab:.3f}); {steps} steps; mean ± std over seeds {seeds}")
    print_table(["context memory", "parameters", "final accuracy", "best accuracy", "train loss"],
                [[label, r["n_params"], pm(r["final_accuracy"]), pm(r["best_accuracy"]), pm(r["final_loss"])]
                 for label, r in results.items()])

    fig, axes = figure(size=(6.5, 4.2))
    ax = axes[0, 0]
    for label, r in results.items():
        curves = np.asarray([[a for _, a in run["history"]] for run in r["runs"]])
        x = [s for s, _ in r["runs"][0]["history"]]
        line, = ax.plot(x, curves.mean(axis=0), "o-", ms=3, label=label)
        ax.fill_between(x, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(1 / vocab, color="grey", ls=":", lw=0.8, label="chance")
    ax.set_title(f"one mosaic layer; mean over {len(seeds)} seed(s), min-max shaded", fontsize=9)
    finish_axes(ax, "training step", "next-token accuracy on the repeated block", (0, 1.02), 7)
    save_figure(fig, args.out / "accuracy.png")

    fig, axes = figure(size=(6.5, 4.2))
    ax = axes[0, 0]
    for label, r in results.items():
        ax.plot(np.arange(1, max_block), r["by_offset_mean"][:max_block - 1], "o-", ms=3, label=label)
    ax.axhline(1 / vocab, color="grey", ls=":", lw=0.8)
    finish_axes(ax, "tokens of the second copy already seen", "accuracy at the end of training", (0, 1.02), 7)
    save_figure(fig, args.out / "by_offset.png")
    save_json(args.out / "results.json", dict(quick=q, vocab=vocab, length=length, block=[min_block, max_block],
                                              steps=steps, batch=batch, lr=lr, seeds=seeds, variants=results))


if __name__ == "__main__":
    run(main)
