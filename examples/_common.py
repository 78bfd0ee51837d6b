"""What every example shares: its command line, output folder, figures, result files and a small
training loop for the synthetic tasks (the text examples use minimosaic.train instead).

Run an example from the repository root, e.g. `python examples/induction_head.py --quick`.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minimosaic import nn, optim  # noqa: E402
from minimosaic.errors import MinimosaicError  # noqa: E402
from minimosaic.tensor import no_grad  # noqa: E402


def run(main):
    """main(), with a user's mistake (no data and no network, say) as one line and exit code 2, as the
    command line does, instead of a traceback."""
    try:
        main()
    except MinimosaicError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def parse_args(name, description, extra=None):
    """--quick (seconds, for CI), --out DIR (default out/examples/<name>), --seed; `extra(parser)` adds
    the example's own options."""
    parser = argparse.ArgumentParser(prog=f"examples/{name}.py", description=description)
    parser.add_argument("--quick", action="store_true", help="tiny settings that finish in seconds (CI)")
    parser.add_argument("--out", default=f"out/examples/{name}", help="folder for figures and numbers")
    parser.add_argument("--seed", type=int, default=0)
    if extra:
        extra(parser)
    args = parser.parse_args()
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def seeds_option(parser, full=3):
    """--seeds N: run seeds --seed, --seed + 1, ... (default `full`, quick 1); see seed_list."""
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"how many seeds, from --seed on (default {full}; quick 1)")
    parser.set_defaults(full_seeds=full)


def seed_list(args):
    """The seeds to run: --seed, --seed + 1, ..., --seeds of them (quick: 1, else the full default)."""
    n = args.seeds or (1 if args.quick else args.full_seeds)
    return [args.seed + i for i in range(n)]


def summarize(values):
    """Per-seed numbers -> dict(mean, std (ddof 1; 0 for one seed), min, max, values); NaNs are kept out."""
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], dtype=np.float64)
    if not len(v):
        return dict(mean=float("nan"), std=float("nan"), min=float("nan"), max=float("nan"), values=[])
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, min=float(v.min()),
                max=float(v.max()), values=v.tolist())


def pm(summary, digits=3):
    """'mean ± std' of a summarize() dict, for tables ('-' when there is nothing)."""
    if not summary["values"]:
        return "-"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def figure(nrows=1, ncols=1, size=(5.0, 3.8)):
    """A matplotlib Figure (object API, Agg: no display needed) and its axes as a 2-D array."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def finish_axes(ax, xlabel, ylabel, ylim=None, legend_size=8):
    """Axis labels, optional y limits, the legend and a light grid: how every example ends a plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)


def save_figure(fig, path):
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def save_json(path, result):
    Path(path).write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path}")


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-able: {type(x)}")


def print_table(headers, rows):
    """A plain text table, columns as wide as their widest cell."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) if k else c.ljust(w) for c, w in zip(row, widths)))


def _cell(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self):
        return time.perf_counter() - self.start


def fit(model, next_batch, steps, lr, evaluate=None, eval_every=None, warmup=None, weight_decay=0.1,
        grad_clip=1.0, min_lr_ratio=0.1, log_every=None, label=""):
    """Train `model` on `model.loss(*next_batch(step))` with AdamW (betas 0.9, 0.95, decay on matrices
    only), linear warmup then cosine decay, and gradient clipping: the recipe of minimosaic.train, for
    data that is made up on the fly. Calls `evaluate(step)` (no graph) every `eval_every` steps and at
    the end; returns the list of (step, evaluate(step)) and the list of training losses."""
    warmup = warmup if warmup is not None else max(1, steps // 20)
    opt = optim.AdamW(optim.weight_decay_groups(model.named_parameters(), weight_decay), lr=lr,
                      betas=(0.9, 0.95), weight_decay=weight_decay)
    schedule = optim.CosineSchedule(lr, lr * min_lr_ratio, warmup, steps)
    history, losses = [], []

    def check(step):
        model.eval()
        with no_grad():
            history.append((step, evaluate(step)))
        model.train()

    model.train()
    for step in range(steps):
        if evaluate is not None and eval_every and step % eval_every == 0:
            check(step)
        loss = model.loss(*next_batch(step))
        loss.backward()
        optim.clip_grad_norm(model.parameters(), grad_clip)
        opt.step(schedule(step))
        model.zero_grad()
        losses.append(float(loss.data))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{label}: loss became {losses[-1]} at step {step}; lower the learning rate")
        if log_every and (step + 1) % log_every == 0:
            print(f"  {label} step {step + 1:5d}  loss {np.mean(losses[-log_every:]):.4f}", flush=True)
    if evaluate is not None:
        check(steps)
    return history, losses


def seed_all(seed):
    """Seed parameter initialisation (nn.init_rng, xp.random) and return a data generator."""
    nn.manual_seed(seed)
    return np.random.default_rng(seed)
