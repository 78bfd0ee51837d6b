"""How many memory units? 1, 2, 4, 8 and 16 heads at a fixed width, on three moons and on in-context languages.

The paper splits each memory into heads ("memory units") and shows with three moons that a split lets
each unit follow one independent part of the world (predictive disentanglement), so the model is
accurate after a moon's own period instead of the joint period. It does not say how many units to
use. Here the width is fixed and only the number of heads changes (more heads = smaller heads):

  * three moons (three_moons.py's model and data: one context memory, complex-linear weights, fixed
    beta 25), width 16 complex features (32 real), so a head has 16, 8, 4, 2 or 1 complex features.
    There are 3 moons: with 1 or 2 heads a head must follow several moons; from 4 heads on there are
    more heads than moons. Reported: the error of 25 generated steps after contexts shorter than the
    shortest period, between the longest single period (30 steps) and the joint period (60), and
    past the joint period; the weight share of each head's strongest moon (purity, 1/3 = spread);
  * in-context languages (in_context_languages.py's task: next-letter validity on held-out random
    automata), a 2-layer Memory Mosaic of width 64 (head size 64, 32, 16, 8, 4); parameters are the
    same for every head count but a few per-head scalars.

Figures: moons_context_error.png (error vs context, mean over seeds), summary.png (purity, moon error
and language accuracy against the number of heads, mean and min-max over seeds).
"""
import math

import numpy as np

from _common import (Stopwatch, figure, finish_axes, parse_args, pm, print_table, run, save_figure, save_json,
                     seed_list, seeds_option, summarize)
from in_context_languages import VOCAB, dfa_batch, random_dfa, train_language_model
from minimosaic.models import ModelConfig
from three_moons import (HELD_OUT, MAX_JOINT_PERIOD, context_error, error_between, joint_period, one_step_error,
                         period_triples, purity, train_moons)

HEADS = (1, 2, 4, 8, 16)


def moons_experiment(seeds, q):
    resolution, block = 10, (96 if q else 128)
    steps, batch, lr, width = (60, 16, 2e-2, 16) if q else (600, 32, 1e-2, 16)
    n_gen, eval_batch = (8, 16) if q else (25, 64)
    contexts = list(range(2, int(2.2 * MAX_JOINT_PERIOD * resolution), 4 if q else 1))
    triples = period_triples()
    shortest, longest, joint = (resolution * min(HELD_OUT), resolution * max(HELD_OUT),
                                resolution * joint_period(HELD_OUT))
    found = {}
    for n_head in HEADS:
        runs = []
        for seed in seeds:
            clock = Stopwatch()
            model, loss, _ = train_moons(n_head, seed, triples, steps, batch, block, resolution, lr, 25.0, None,
                                         f"moons {n_head} heads", width=width)
            errors = context_error(model, np.random.default_rng(seed + 1), resolution, contexts[-1] + 1, n_gen,
                                   contexts, eval_batch)
            one_step = one_step_error(model, np.random.default_rng(seed + 2), resolution, contexts[-1] + 1,
                                      eval_batch)
            p = purity(model)
            runs.append(dict(seed=seed, final_loss=loss, errors=errors, one_step_errors=one_step, purity=p,
                             mean_purity=float(np.mean(list(p.values()))),
                             error_before_periods=error_between(contexts, errors, 0, shortest),
                             error_longest_to_joint=error_between(contexts, errors, longest + 2, joint),
                             error_after_joint=error_between(contexts, errors, joint + 2, math.inf),
                             seconds=clock()))
            print(f"moons, {n_head} heads, seed {seed}: loss {loss:.4f}, purity {runs[-1]['mean_purity']:.2f}, "
                  f"error 30-60 {runs[-1]['error_longest_to_joint']:.3f} ({clock():.0f} s)", flush=True)
        found[n_head] = dict(head_features=width // n_head, runs=runs,
                             errors_mean=np.mean([r["errors"] for r in runs], axis=0),
                             **{k: summarize([r[k] for r in runs]) for k in
                                ("final_loss", "mean_purity", "error_before_periods", "error_longest_to_joint",
                                 "error_after_joint")})
    return dict(resolution=resolution, block=block, steps=steps, batch=batch, lr=lr, width=width, n_gen=n_gen,
                contexts=contexts, single_periods=[shortest, resolution * 2, longest], joint_period=joint,
                by_heads=found)


def languages_experiment(seeds, q):
    length = 48 if q else 96
    n_train_dfas, n_eval_dfas = (16, 32) if q else (1000, 256)
    steps, batch, lr, width = (30, 8, 3e-3, 64) if q else (500, 16, 3e-3, 64)
    eval_every = 15 if q else 100
    rng = np.random.default_rng(0)
    train_tables = [random_dfa(rng) for _ in range(n_train_dfas)]
    eval_rng = np.random.default_rng(10_000)
    eval_tables = [random_dfa(eval_rng) for _ in range(n_eval_dfas)]
    held_out = [dfa_batch(eval_rng, eval_tables, 32, length) for _ in range(n_eval_dfas // 32)]
    found = {}
    for n_head in HEADS:
        runs = []
        for seed in seeds:
            config = ModelConfig(model="mosaic", vocab_size=VOCAB, n_layer=2, n_head=n_head, n_embd=width,
                                 block_size=length)
            clock = Stopwatch()
            model, history, losses = train_language_model(config, seed, train_tables, held_out, steps, batch, lr,
                                                          eval_every, None, f"languages {n_head} heads")
            runs.append(dict(seed=seed, n_params=int(model.num_parameters()), history=history,
                             final_accuracy=history[-1][1], best_accuracy=max(a for _, a in history),
                             final_loss=float(np.mean(losses[-20:])), seconds=clock()))
            print(f"languages, {n_head} heads, seed {seed}: accuracy {history[-1][1]:.3f} ({clock():.0f} s)",
                  flush=True)
        found[n_head] = dict(head_size=width // n_head, n_params=runs[0]["n_params"], runs=runs,
                             **{k: summarize([r[k] for r in runs]) for k in
                                ("final_accuracy", "best_accuracy", "final_loss")})
    return dict(length=length, n_train_dfas=n_train_dfas, n_eval_dfas=n_eval_dfas, steps=steps, batch=batch,
                lr=lr, width=width, by_heads=found)


def main():
    args = parse_args("memory_units", __doc__.splitlines()[0], seeds_option)
    q = args.quick
    seeds = seed_list(args)
    moons = moons_experiment(seeds, q)
    languages = languages_experiment(seeds, q)

    print(f"\nthree moons, width {moons['width']} complex features, one context memory; held-out periods "
          f"{moons['single_periods']} steps, joint {moons['joint_period']:.0f}; mean ± std over seeds {seeds}")
    print_table(["heads", "features/head", "train loss", "err ctx<10", "err 30<ctx<60", "err ctx>60", "purity"],
                [[h, r["head_features"], pm(r["final_loss"], 4), pm(r["error_before_periods"]),
                  pm(r["error_longest_to_joint"]), pm(r["error_after_joint"]), pm(r["mean_purity"], 2)]
                 for h, r in moons["by_heads"].items()])
    print(f"\nin-context languages, 2-layer Memory Mosaic of width {languages['width']}, {languages['steps']} steps; "
          f"held-out valid next-letter accuracy; mean ± std over seeds {seeds}")
    print_table(["heads", "head size", "parameters", "final accuracy", "best accuracy", "train loss"],
                [[h, r["head_size"], r["n_params"], pm(r["final_accuracy"]), pm(r["best_accuracy"]),
                  pm(r["final_loss"])] for h, r in languages["by_heads"].items()])

    fig, axes = figure(size=(6.5, 4.2))
    ax = axes[0, 0]
    for h, r in moons["by_heads"].items():
        ax.plot(moons["contexts"], r["errors_mean"], lw=1.2, label=f"{h} head{'s' if h > 1 else ''}")
    for p in moons["single_periods"]:
        ax.axvline(p, color="grey", lw=0.8, ls=":")
    ax.axvline(moons["joint_period"], color="red", lw=0.8, ls="--", label="joint period")
    ax.set_title(f"three moons, width {moons['width']} complex; mean over {len(seeds)} seed(s)", fontsize=9)
    finish_axes(ax, "context length (steps)", f"mean |generated - true| over {moons['n_gen']} steps")
    save_figure(fig, args.out / "moons_context_error.png")

    fig, axes = figure(1, 3, size=(4.0, 3.4))
    panels = ((moons, "mean_purity", "moons: weight share of strongest moon"),
              (moons, "error_longest_to_joint", "moons: error, 30 < context < 60"),
              (languages, "final_accuracy", "languages: held-out accuracy"))
    for ax, (experiment, key, title) in zip(axes[0], panels):
        mean = [r[key]["mean"] for r in experiment["by_heads"].values()]
        low = [r[key]["mean"] - r[key]["min"] for r in experiment["by_heads"].values()]
        high = [r[key]["max"] - r[key]["mean"] for r in experiment["by_heads"].values()]
        ax.errorbar(HEADS, mean, yerr=[low, high], fmt="o-", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(HEADS, [str(h) for h in HEADS])
        ax.set_xlabel("heads (fixed width)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].axhline(1 / 3, color="grey", ls=":", lw=0.8)
    save_figure(fig, args.out / "summary.png")
    save_json(args.out / "results.json", dict(quick=q, seeds=seeds, heads=HEADS, moons=moons, languages=languages))


if __name__ == "__main__":
    run(main)
