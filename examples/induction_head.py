"""Induction heads: one Memory Mosaic layer copies a repeated block; one GPT layer cannot.

Each sequence is 64 random tokens (of 32) in which a random block of 16 to 24 tokens appears twice, at
random places. Once the second copy has started, every next token can be read from the first copy: find the
earlier place where the current token (and the ones before it) occurred, and output what followed.

A transformer needs two layers for this (an "induction head"): one attention layer copies each
token's predecessor into it, the next layer matches on that. A Memory Mosaic does it in one layer:
its keys are leaky averages of the recent tokens (the present and, faded, the ones before it), its
values peek one token ahead, so the context memory directly recalls "what came after a moment like
now". Positions differ from sequence to sequence, so positional attention cannot solve it either.

We train three models of about the same width on the same batches, with the loss counted on the
repeated part only (everything else is unpredictable noise), and report the accuracy of the most
likely next token on the second copy (its first token is unpredictable and left out) on held-out
sequences. Figure: accuracy.png (accuracy vs training step).
"""
import numpy as np

from _common import Stopwatch, figure, fit, parse_args, print_table, run, save_figure, save_json, seed_all
from minimosaic import asnumpy
from minimosaic.models import ModelConfig, build_model


def induction_batch(rng, batch, length, vocab, min_block, max_block):
    """(x, y) int64 (B, length): random tokens with a block repeated in each row; y is the next token
    inside the second copy (from its second token on) and -1 (not counted) everywhere else."""
    seq = rng.integers(0, vocab, (batch, length + 1))
    y = np.full((batch, length), -1, dtype=np.int64)
    for i in range(batch):
        L = int(rng.integers(min_block, max_block + 1))
        first = int(rng.integers(0, length + 1 - 2 * L))
        second = int(rng.integers(first + L, length + 2 - L))
        seq[i, second:second + L] = seq[i, first:first + L]
        # x_t = seq[t] for t in [second, second + L - 2] is inside the copy, and so is its target seq[t + 1]
        y[i, second:second + L - 1] = seq[i, second + 1:second + L]
    return seq[:, :-1].astype(np.int64), y


def accuracy(model, batches):
    """Share of counted positions (y >= 0) where the most likely next token is right."""
    correct = total = 0
    for x, y in batches:
        predicted = asnumpy(model(x).data.argmax(axis=-1))
        counted = y >= 0
        correct += int((predicted == y)[counted].sum())
        total += int(counted.sum())
    return correct / total


def main():
    args = parse_args("induction_head", __doc__.splitlines()[0])
    q = args.quick
    vocab, length, (min_block, max_block) = (16, 32, (6, 10)) if q else (32, 64, (16, 24))
    n_embd, n_head = 64, 4
    steps, batch, lr = (30, 16, 1e-3) if q else (2000, 32, 1e-3)
    eval_every = 10 if q else 200
    models = {"mosaic 1 layer": ("mosaic", 1), "GPT 1 layer": ("gpt", 1), "GPT 2 layers": ("gpt", 2)}

    eval_rng = np.random.default_rng(10_000 + args.seed)
    held_out = [induction_batch(eval_rng, 64, length, vocab, min_block, max_block) for _ in range(2 if q else 8)]
    results = {}
    for label, (kind, n_layer) in models.items():
        rng = seed_all(args.seed)
        config = ModelConfig(model=kind, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                             block_size=length)
        model = build_model(config)
        clock = Stopwatch()
        history, losses = fit(
            model, lambda step, rng=rng: induction_batch(rng, batch, length, vocab, min_block, max_block),
            steps, lr, evaluate=lambda step, model=model: accuracy(model, held_out), eval_every=eval_every,
            log_every=None if q else 250, label=label)
        results[label] = dict(config=config.to_dict(), n_params=int(model.num_parameters()),
                              history=history, final_accuracy=history[-1][1],
                              final_loss=float(np.mean(losses[-20:])), train_seconds=clock())
        print(f"{label}: accuracy {history[-1][1]:.3f} after {steps} steps ({clock():.0f} s)", flush=True)

    print(f"\naccuracy on the repeated block (held-out sequences, vocab {vocab}, length {length}, "
          f"blocks of {min_block}-{max_block} tokens; chance {1 / vocab:.3f})")
    print_table(["model", "parameters", "train loss", "accuracy"],
                [[label, r["n_params"], r["final_loss"], r["final_accuracy"]] for label, r in results.items()])

    fig, axes = figure()
    ax = axes[0, 0]
    for label, r in results.items():
        ax.plot(*zip(*r["history"]), "o-", ms=3, label=f"{label} ({r['n_params'] / 1e3:.0f}k params)")
    ax.axhline(1 / vocab, color="grey", ls=":", lw=0.8, label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("next-token accuracy on the repeated block")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, args.out / "accuracy.png")
    save_json(args.out / "results.json", dict(quick=q, vocab=vocab, length=length, block=[min_block, max_block],
                                              steps=steps, batch=batch, lr=lr, models=results))


if __name__ == "__main__":
    run(main)
