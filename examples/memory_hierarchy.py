"""A richer memory hierarchy (the paper's open question 3): the 2024 mosaic against each Memory Mosaics v2 option.

The paper asks whether a richer hierarchy of memories would help. Memory Mosaics v2 (Zhang & Bottou,
arXiv 2507.03285) proposes three changes, which minimosaic has as ModelConfig options (our reading of
the paper's equations, not checked against its text: docs/memory-mosaics.md). Five models, all 2
layers, 4 heads, width 64, context 128:

  * v1: the 2024 Memory Mosaic;
  * adaptive bandwidth: beta = beta1 n^alpha + beta0, n the number of pairs a query can read;
  * gated keys: input-dependent gate g_t and decay lambda_t in the leaky key average;
  * 3 levels: a short-term memory of the last W = 32 pairs and a long-term memory of the pairs before
    the last M = 32, plus the persistent memory;
  * v2: all three together.

Equal parameters: an option's extra weights are taken back from the persistent memory (fewer slots,
`pmem_size`, each slot is 2 d weights per block), so every model is within a fraction of a percent of
v1's count (printed). Equal steps and, per seed, the same batches. Two tasks:

  * tiny Shakespeare (characters), trained by minimosaic.train: validation loss on the whole
    validation split and the loss at each position of the 128-character window;
  * in-context languages (in_context_languages.py's task: is the most likely next token a letter the
    held-out automaton allows?), with the in-context unigram and bigram rules computed on the same
    held-out sequences.

Why W = M = 32 at a context of 128: W = M splits the past exactly (no pair in neither memory); a
short-term memory of 32 characters is about a line of verse (six words), or about five strings of the
automaton, enough for the local statistics, while the long-term memory still has 96 positions of the
window in which it reads something (it is empty for the first 33).

Figures: shakespeare_by_position.png (validation loss vs position, one curve per model, mean over
seeds), languages.png (held-out accuracy vs step, and by position in the sequence, with the rules).
`--bigger LABEL ...` runs the models named on the languages task only, with a bigger budget (4x the
steps and a pool of 20,000 training automata, each seen about twice), reported separately.
"""
import shutil
import time

import numpy as np

from _common import (figure, finish_axes, parse_args, pm, print_table, run, save_figure, save_json, seed_list,
                     seeds_option, summarize)
from in_context_languages import (VOCAB, accuracy, dfa_batch, model_predictions, ngram_predictions, random_dfa,
                                  train_language_model)
from minimosaic import fast
from minimosaic.models import ModelConfig, build_model
from minimosaic.train import TrainConfig, loss_by_position, prepare_data, train

CONFIGS = {  # label: the v2 options it turns on
    "v1 (2024)": {},
    "adaptive bandwidth": dict(adaptive_bandwidth=True),
    "gated keys": dict(gated_keys=True),
    "3 levels": dict(memory_levels=3),
    "v2 (all three)": dict(adaptive_bandwidth=True, gated_keys=True, memory_levels=3),
}


def options(parser):
    parser.add_argument("--data-dir", default=None, help="folder holding tinyshakespeare.txt")
    parser.add_argument("--bigger", default=None, nargs="+", choices=list(CONFIGS), metavar="LABEL",
                        help="run only these models (labels as in the table), languages task, bigger budget")
    seeds_option(parser)


def settings(q):
    """Shapes and budgets: quick (seconds, CI) or full."""
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=32) if q else \
        dict(n_layer=2, n_head=4, n_embd=64, block_size=128)
    T = shape["block_size"]
    return dict(shape=shape, short_window=T // 4, long_skip=T // 4,
                text=dict(steps=15 if q else 800, batch_size=8 if q else 16, lr=3e-3, min_lr=3e-4,
                          warmup=2 if q else 80, eval_batches=2 if q else 10),
                languages=dict(n_train_dfas=16 if q else 1000, n_eval_dfas=32 if q else 256,
                               steps=15 if q else 600, batch=8 if q else 16, lr=3e-3, eval_every=5 if q else 100))


def count_parameters(config):
    return int(build_model(config).num_parameters())


def matched_config(vocab_size, s, options, target=None):
    """ModelConfig with `options`; with a target count, persistent slots are removed (2 d n_layer weights
    each) until the count is as close to the target as whole slots allow."""
    config = ModelConfig(model="mosaic", vocab_size=vocab_size, **s["shape"], **options,
                         **(dict(short_window=s["short_window"], long_skip=s["long_skip"])
                            if options.get("memory_levels") else {}))
    if target is not None:
        per_slot = 2 * config.n_embd * config.n_layer * config.pmem_count
        config.pmem_size -= round((count_parameters(config) - target) / per_slot)
        config.validate()
    return config


def configs_for(vocab_size, s):
    """{label: ModelConfig} with every count matched to v1's."""
    target = count_parameters(matched_config(vocab_size, s, {}))
    return {label: matched_config(vocab_size, s, opts, target) for label, opts in CONFIGS.items()}


class Clock:
    """Process CPU time (what the README reports: the machine is shared) and wall time."""

    def __init__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def __call__(self):
        return dict(cpu_seconds=time.process_time() - self.cpu, wall_seconds=time.perf_counter() - self.wall)


def shakespeare_setup(args, s):
    """The text, the training settings and the five matched models."""
    t = s["text"]
    base = dict(data="shakespeare", level="char", steps=t["steps"], batch_size=t["batch_size"], lr=t["lr"],
                min_lr=t["min_lr"], warmup=t["warmup"], eval_interval=t["steps"], eval_batches=t["eval_batches"],
                log_interval=max(1, t["steps"] // 4))
    data = prepare_data(TrainConfig(**base), data_dir=args.data_dir)
    return dict(data=data, base=base, configs=configs_for(data.tokenizer.vocab_size, s))


def shakespeare_seed(args, setup, seed, runs):
    """Train and evaluate every model with one seed (same batches for all), appending to runs[label]."""
    data, base = setup["data"], setup["base"]
    for i, (label, model_config) in enumerate(setup["configs"].items()):
        config = TrainConfig(**base, seed=seed, out=str(args.out / "runs" / f"shakespeare-{i}-{seed}"))
        shutil.rmtree(config.out, ignore_errors=True)   # a fresh run each time (train refuses to overwrite)
        clock = Clock()
        result = train(model_config, config, data)
        times = clock()
        mean, per_position = loss_by_position(result.model, data.val_ids, model_config.block_size, 32, "cpu",
                                              max_batches=2 if args.quick else None)
        runs.setdefault(label, []).append(dict(seed=seed, n_params=int(result.model.num_parameters()),
                                               val_loss=mean, per_position=per_position, **times))
        print(f"shakespeare seed {seed} {label}: val loss {mean:.4f} ({times['cpu_seconds']:.0f} s CPU)", flush=True)
        shutil.rmtree(config.out, ignore_errors=True)   # checkpoints are not needed afterwards


def summarize_shakespeare(setup, runs):
    results = {}
    for label, per_seed in runs.items():
        curves = np.asarray([r["per_position"] for r in per_seed])
        results[label] = dict(config=setup["configs"][label].to_dict(), n_params=per_seed[0]["n_params"],
                              runs=per_seed, val_loss=summarize([r["val_loss"] for r in per_seed]),
                              per_position_mean=curves.mean(axis=0), per_position_min=curves.min(axis=0),
                              per_position_max=curves.max(axis=0),
                              cpu_seconds=summarize([r["cpu_seconds"] for r in per_seed]))
    return dict(vocab_size=setup["data"].tokenizer.vocab_size, train_config=setup["base"], models=results)


def language_data(s, seed=0, n_train=None):
    """Training automata, held-out batches (fixed over seeds: only the models' seeds vary), rules."""
    g = s["languages"]
    T = s["shape"]["block_size"]
    rng = np.random.default_rng(seed)
    train_tables = [random_dfa(rng) for _ in range(n_train or g["n_train_dfas"])]
    eval_rng = np.random.default_rng(10_000 + seed)
    eval_tables = [random_dfa(eval_rng) for _ in range(g["n_eval_dfas"])]
    held_out = [dfa_batch(eval_rng, eval_tables, 32, T) for _ in range(g["n_eval_dfas"] // 32)]
    rules = {}
    for name, order in (("in-context unigram rule", 1), ("in-context bigram rule", 2)):
        acc, by_pos = accuracy([ngram_predictions(x, order) for x, _, _ in held_out], held_out)
        rules[name] = dict(accuracy=float(acc), by_position=by_pos)
    return train_tables, held_out, rules


def train_languages(config, seed, train_tables, held_out, steps, g, label):
    clock = Clock()
    model, history, losses = train_language_model(config, seed, train_tables, held_out, steps, g["batch"], g["lr"],
                                                  g["eval_every"], None, label)
    model.eval()
    acc, by_pos = accuracy([model_predictions(model, x) for x, _, _ in held_out], held_out)
    return dict(seed=seed, n_params=int(model.num_parameters()), history=history, final_accuracy=float(acc),
                best_accuracy=max(a for _, a in history), by_position=by_pos,
                final_loss=float(np.mean(losses[-20:])), **clock())


def summarize_languages(runs, configs):
    out = {}
    for label, per_seed in runs.items():
        out[label] = dict(config=configs[label].to_dict(), n_params=per_seed[0]["n_params"], runs=per_seed,
                          history_mean=[(step, float(np.mean([r["history"][k][1] for r in per_seed])))
                                        for k, (step, _) in enumerate(per_seed[0]["history"])],
                          by_position_mean=np.mean([r["by_position"] for r in per_seed], axis=0),
                          **{k: summarize([r[k] for r in per_seed])
                             for k in ("final_accuracy", "best_accuracy", "final_loss", "cpu_seconds")})
    return out


def languages_setup(s, labels=None, steps=None, n_train=None):
    train_tables, held_out, rules = language_data(s, n_train=n_train)
    configs = {label: c for label, c in configs_for(VOCAB, s).items() if labels is None or label in labels}
    return dict(train_tables=train_tables, held_out=held_out, rules=rules, configs=configs,
                steps=steps or s["languages"]["steps"])


def languages_seed(s, setup, seed, runs):
    for label, config in setup["configs"].items():
        r = train_languages(config, seed, setup["train_tables"], setup["held_out"], setup["steps"], s["languages"],
                            label)
        runs.setdefault(label, []).append(r)
        print(f"languages seed {seed} {label}: held-out accuracy {r['final_accuracy']:.3f} "
              f"(best {r['best_accuracy']:.3f}; {r['cpu_seconds']:.0f} s CPU)", flush=True)


def summarize_languages_experiment(s, setup, runs):
    g = s["languages"]
    return dict(length=s["shape"]["block_size"], n_train_dfas=len(setup["train_tables"]),
                v1_n_params=count_parameters(matched_config(VOCAB, s, {})),
                n_eval_dfas=g["n_eval_dfas"], steps=setup["steps"], batch=g["batch"], lr=g["lr"],
                rules=setup["rules"], models=summarize_languages(runs, setup["configs"]))


def print_tables(text, languages, seeds):
    v1 = next(iter(text["models"].values())) if text else None
    if text:
        T = len(v1["per_position_mean"])
        print(f"\ntiny Shakespeare, {text['train_config']['steps']} steps of {text['train_config']['batch_size']} x "
              f"{T} characters; validation loss (nats/char, whole split); mean ± std over seeds {seeds}")
        print_table(["model", "parameters", "vs v1", "pmem", "val loss", "loss t<8", "loss t>=T/2", "CPU s"],
                    [[label, r["n_params"], f"{r['n_params'] - v1['n_params']:+d}", r["config"]["pmem_size"],
                      pm(r["val_loss"]), f"{np.mean(r['per_position_mean'][:8]):.3f}",
                      f"{np.mean(r['per_position_mean'][T // 2:]):.3f}", f"{r['cpu_seconds']['mean']:.0f}"]
                     for label, r in text["models"].items()])
    v1 = dict(n_params=languages["v1_n_params"])
    print(f"\nin-context languages, {languages['steps']} steps of {languages['batch']} x {languages['length']} "
          f"tokens, {languages['n_train_dfas']} training automata; held-out valid next-letter accuracy on "
          f"{languages['n_eval_dfas']} new automata; mean ± std over seeds {seeds}")
    rows = [[label, "-", "-", "-", f"{r['accuracy']:.3f}", "-", "-", "-"] for label, r in languages["rules"].items()]
    rows += [[label, r["n_params"], f"{r['n_params'] - v1['n_params']:+d}", r["config"]["pmem_size"],
              pm(r["final_accuracy"]), pm(r["best_accuracy"]), pm(r["final_loss"]), f"{r['cpu_seconds']['mean']:.0f}"]
             for label, r in languages["models"].items()]
    print_table(["predictor", "parameters", "vs v1", "pmem", "final accuracy", "best accuracy", "train loss",
                 "CPU s"], rows)


def smooth(curve, window):
    """Mean of `window` consecutive positions, and the positions it stands for."""
    curve = np.convolve(np.asarray(curve, dtype=np.float64), np.ones(window) / window, mode="valid")
    return np.arange(len(curve)) + (window - 1) / 2, curve


def plot_shakespeare(text, s, seeds, path, window):
    """Left: the loss by position, one curve per model. Right: each model minus v1, seed by seed (the
    same batches), mean of `window` positions: the differences are too small to see on the left."""
    fig, axes = figure(1, 2, size=(5.5, 4.0))
    ax, ax2 = axes[0]
    v1 = np.asarray([r["per_position"] for r in text["models"]["v1 (2024)"]["runs"]])
    for label, r in text["models"].items():
        x = np.arange(len(r["per_position_mean"]))
        line, = ax.plot(x, r["per_position_mean"], lw=1.0, label=f"{label}: {r['val_loss']['mean']:.3f}")
        ax.fill_between(x, r["per_position_min"], r["per_position_max"], color=line.get_color(), alpha=0.15, lw=0)
        diffs = np.asarray([run["per_position"] for run in r["runs"]]) - v1
        xs, mean = smooth(diffs.mean(axis=0), window)
        ax2.plot(xs, mean, lw=1.2, color=line.get_color(), label=label)
        if label != "v1 (2024)":
            ax2.fill_between(xs, smooth(diffs.min(axis=0), window)[1], smooth(diffs.max(axis=0), window)[1],
                             color=line.get_color(), alpha=0.12, lw=0)
    for a in (ax, ax2):
        a.axvline(s["long_skip"] + 1, color="grey", ls="--", lw=0.9,
                  label=f"3 levels: long-term memory reads from t = {s['long_skip'] + 1}" if a is ax else None)
    low = min(float(np.min(r["per_position_mean"][2:])) for r in text["models"].values())
    ax.set_title(f"tiny Shakespeare, mean over {len(seeds)} seed(s), min-max shaded; legend: val loss", fontsize=9)
    finish_axes(ax, "position in the context window", "validation loss (nats/char)", (low - 0.05, low + 0.8))
    ax2.set_title(f"minus v1, same seed; mean of {window} positions; min-max over seeds shaded", fontsize=9)
    finish_axes(ax2, "position in the context window", "loss - v1's loss (nats/char)")
    save_figure(fig, path)


def plot_languages(languages, seeds, path, window):
    fig, axes = figure(1, 2, size=(5.5, 4.0))
    ax, ax2 = axes[0]
    for label, r in languages["models"].items():
        ax.plot(*zip(*r["history_mean"]), "o-", ms=3, label=label)
        ax2.plot(*smooth(r["by_position_mean"], window), lw=1.2, label=label)
    for (label, r), style in zip(languages["rules"].items(), (":", "--")):
        ax.axhline(r["accuracy"], color="black", ls=style, lw=1, label=f"{label} ({r['accuracy']:.3f})")
        ax2.plot(*smooth(r["by_position"], window), color="black", ls=style, lw=1, label=label)
    ax.set_title(f"held-out automata, mean over {len(seeds)} seed(s)", fontsize=9)
    finish_axes(ax, "training step", "valid next-letter accuracy", (0, 1.02))
    ax2.set_title(f"after training, mean of {window} positions", fontsize=9)
    finish_axes(ax2, "position in the sequence", "valid next-letter accuracy", (0, 1.02))
    save_figure(fig, path)


def main():
    args = parse_args("memory_hierarchy", __doc__.splitlines()[0], options)
    q = args.quick
    s = settings(q)
    seeds = seed_list(args)
    fast.enable()   # both tasks on the fast layer (minimosaic.train turns it on anyway)
    print(f"context {s['shape']['block_size']}, short_window {s['short_window']}, long_skip {s['long_skip']}; "
          f"seeds {seeds}")
    text_runs, language_runs = {}, {}
    if args.bigger:
        steps, n_train = 4 * s["languages"]["steps"], 20 * s["languages"]["n_train_dfas"]
        languages = languages_setup(s, args.bigger, steps, n_train)
        for seed in seeds:
            languages_seed(s, languages, seed, language_runs)
            save_json(args.out / "partial.json", dict(seeds_done=seed, languages=language_runs))
        languages = summarize_languages_experiment(s, languages, language_runs)
        print_tables(None, languages, seeds)
        plot_languages(languages, seeds, args.out / "languages.png", 1 if q else 8)
        save_json(args.out / "results.json", dict(quick=q, seeds=seeds, bigger=args.bigger, settings=s,
                                                  languages=languages))
        return
    text, languages = shakespeare_setup(args, s), languages_setup(s)
    for seed in seeds:   # seed by seed, both tasks, so that a stopped run leaves whole seeds in partial.json
        shakespeare_seed(args, text, seed, text_runs)
        languages_seed(s, languages, seed, language_runs)
        save_json(args.out / "partial.json", dict(seeds_done=seed, shakespeare=text_runs, languages=language_runs))
    text = summarize_shakespeare(text, text_runs)
    languages = summarize_languages_experiment(s, languages, language_runs)
    print_tables(text, languages, seeds)
    plot_shakespeare(text, s, seeds, args.out / "shakespeare_by_position.png", 1 if q else 8)
    plot_languages(languages, seeds, args.out / "languages.png", 1 if q else 8)
    save_json(args.out / "results.json", dict(quick=q, seeds=seeds, settings=s, shakespeare=text,
                                              languages=languages))

if __name__ == "__main__":
    run(main)
