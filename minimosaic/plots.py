"""Figures written to PNG files: loss curves, loss by position in the context, retrieval heat maps.

Only matplotlib's object API is used (`Figure`, never pyplot), so nothing needs a display or changes the
backend of a notebook that imports minimosaic: a Figure saves itself with the Agg renderer.
"""
from pathlib import Path

import numpy as np


def _figure(ncols=1, nrows=1, size=(6.0, 4.0)):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_losses(records, path, title=None):
    """Training and validation loss against steps (left) and tokens seen (right), from log records."""
    train = [r for r in records if "loss" in r]
    val = [r for r in records if r.get("val_loss") is not None]
    fig, axes = _figure(ncols=2)
    for ax, x in zip(axes[0], ("step", "tokens")):
        ax.plot([r[x] for r in train], [r["loss"] for r in train], label="train", lw=1.2)
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3)
        ax.set_xlabel("step" if x == "step" else "tokens seen")
        ax.set_ylabel("cross-entropy loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_per_position(losses, path, ylabel="loss (nats)", title=None):
    """Average loss at each position t of the context window: it falls with t when the model uses its
    context (the in-context-learning curve of the Memory Mosaics paper)."""
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.plot(np.arange(len(losses)), losses, lw=1.2)
    ax.set_xlabel("position in the context window")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_retrieval(layers, tokens, path, title=None):
    """Heat maps of retrieval weights, one row per layer and one column per head.

    layers: per layer an array (H, T, T): row t holds the weights over the positions t looks back at.
    tokens: the T token strings, used as tick labels when there are few enough of them.
    """
    n_layer, n_head = len(layers), layers[0].shape[0]
    fig, axes = _figure(ncols=n_head, nrows=n_layer, size=(3.0, 3.0))
    T = layers[0].shape[-1]
    labels = [repr(t)[1:-1] for t in tokens] if T <= 48 else None
    for i, weights in enumerate(layers):
        for h in range(n_head):
            ax = axes[i, h]
            ax.imshow(weights[h], cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
            ax.set_title(f"layer {i} head {h}", fontsize=8)
            if labels:
                ax.set_xticks(range(T), labels, fontsize=5, rotation=90)
                ax.set_yticks(range(T), labels, fontsize=5)
            else:
                ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
