"""In-context language learning (RegBench-style): infer a regular language from examples in context.

Every sequence is made by ONE random deterministic finite automaton (DFA): a few states, a few
letters, each state with 2 or 3 outgoing letters. Strings are random walks from the start state,
separated by '|'. The model has to work out from the strings it has seen so far which letters may
follow in the current string, for an automaton it has never seen: training uses a small pool of
automata, evaluation only new ones (Akyurek et al. 2024, "In-context language learning"; the Memory
Mosaics paper reports memory mosaics ahead of transformers on this benchmark).

Score: at every position whose next token is a letter, the model's most likely next token must be a
letter the automaton allows from the current state (the state reached by the current string so far).
For reference, two in-context n-gram rules computed exactly on the same sequences: "unigram" (the
letter seen most often so far) and "bigram" (the letter seen most often after the current token).

Memory Mosaic vs GPT with (nearly) the same parameters, same batches, same steps.
Figures: accuracy.png (held-out accuracy vs step), by_position.png (accuracy vs position: in-context
learning as more strings of the language are seen).
"""
import numpy as np

from _common import Stopwatch, figure, fit, parse_args, print_table, run, save_figure, save_json, seed_all
from minimosaic import asnumpy
from minimosaic.models import ModelConfig, build_model

N_LETTERS = 16
DELIMITER = N_LETTERS        # token id of '|'
VOCAB = N_LETTERS + 1


def random_dfa(rng):
    """Transition table (states, N_LETTERS): next state, or -1 where the letter is not allowed.
    4-8 states over a random alphabet of 5-10 letters; each state allows 2 to 4 of them."""
    n_states = int(rng.integers(4, 9))
    alphabet = rng.choice(N_LETTERS, size=int(rng.integers(5, 11)), replace=False)
    table = np.full((n_states, N_LETTERS), -1, dtype=np.int64)
    for s in range(n_states):
        allowed = rng.choice(alphabet, size=int(rng.integers(2, 5)), replace=False)
        table[s, allowed] = rng.integers(0, n_states, size=len(allowed))
    return table


def dfa_sequence(rng, table, length, min_len=2, max_len=8):
    """(tokens (length + 1,), valid (length, VOCAB)): strings of the DFA joined by '|', and for each
    position t the letters the DFA allows after tokens[:t + 1] (the state of the current string)."""
    tokens, states = [], []            # states[t]: DFA state after tokens[:t + 1]
    while len(tokens) < length + 1:
        state = 0
        for _ in range(int(rng.integers(min_len, max_len + 1))):
            letter = rng.choice(np.flatnonzero(table[state] >= 0))
            state = table[state, letter]
            tokens.append(int(letter))
            states.append(state)
        tokens.append(DELIMITER)
        states.append(0)               # after '|' a new string starts
    tokens, states = np.asarray(tokens[:length + 1]), np.asarray(states[:length])
    valid = np.zeros((length, VOCAB), dtype=bool)
    valid[:, :N_LETTERS] = table[states] >= 0
    return tokens, valid


def dfa_batch(rng, tables, batch, length):
    """x, y (B, length) and valid (B, length, VOCAB) for sequences of DFAs drawn from `tables`."""
    seqs, valids = zip(*(dfa_sequence(rng, tables[i], length) for i in rng.integers(0, len(tables), batch)))
    seqs = np.stack(seqs)
    return seqs[:, :-1], seqs[:, 1:], np.stack(valids)


def scored(y):
    """Positions whose next token is a letter (the end of a string is not scored)."""
    return y != DELIMITER


def model_predictions(model, x):
    return asnumpy(model(x).data.argmax(axis=-1))


def ngram_predictions(x, order):
    """In-context n-gram rules on x (B, T). Order 1: the letter seen most often so far in this sequence.
    Order 2: the letter seen most often right after the current token so far (a token never seen
    followed by a letter: order 1's answer)."""
    B, T = x.shape
    out = np.zeros((B, T), dtype=np.int64)
    for b in range(B):
        unigram = np.zeros(N_LETTERS)
        after = np.zeros((VOCAB, N_LETTERS))
        for t in range(T):
            tok = x[b, t]
            if tok < N_LETTERS:
                unigram[tok] += 1
            if t > 0 and tok < N_LETTERS:
                after[x[b, t - 1], tok] += 1
            counts = after[tok] if order == 2 and after[tok].any() else unigram
            out[b, t] = counts.argmax()
    return out


def accuracy(predictions, batches):
    """Share of scored positions where the predicted token is a letter the DFA allows: overall, and per
    position (T,). predictions: one (B, T) array per batch."""
    hits, counts = 0, 0
    T = batches[0][0].shape[1]
    by_pos, n_pos = np.zeros(T), np.zeros(T)
    for (x, y, valid), pred in zip(batches, predictions):
        ok = np.take_along_axis(valid, pred[..., None], axis=-1)[..., 0] & scored(y)
        mask = scored(y)
        hits, counts = hits + ok.sum(), counts + mask.sum()
        by_pos += ok.sum(axis=0)
        n_pos += mask.sum(axis=0)
    return hits / counts, by_pos / np.maximum(n_pos, 1)


def train_language_model(config, seed, train_tables, held_out, steps, batch, lr, eval_every, log_every, label):
    """Train a model of `config` on batches of sequences of `train_tables` (windows of block_size),
    scoring it on `held_out` every eval_every steps: (model, [(step, accuracy)], training losses)."""
    data_rng = seed_all(seed)
    model = build_model(config)
    xs = [x for x, _, _ in held_out]

    def evaluate(step):
        return float(accuracy([model_predictions(model, x) for x in xs], held_out)[0])

    history, losses = fit(model, lambda step: dfa_batch(data_rng, train_tables, batch, config.block_size)[:2],
                          steps, lr, evaluate=evaluate, eval_every=eval_every, log_every=log_every, label=label)
    return model, history, losses


def main():
    args = parse_args("in_context_languages", __doc__.splitlines()[0])
    q = args.quick
    length = 48 if q else 128
    n_train_dfas, n_eval_dfas = (16, 32) if q else (200, 256)
    steps, batch, lr = (30, 8, 3e-3) if q else (1500, 16, 2e-3)
    eval_every = 15 if q else 150
    layers, heads, width = 2, 4, 64

    rng = np.random.default_rng(args.seed)
    train_tables = [random_dfa(rng) for _ in range(n_train_dfas)]
    eval_rng = np.random.default_rng(10_000 + args.seed)
    eval_tables = [random_dfa(eval_rng) for _ in range(n_eval_dfas)]
    held_out = [dfa_batch(eval_rng, eval_tables, 32, length) for _ in range(n_eval_dfas // 32)]
    xs = [x for x, _, _ in held_out]

    results = {}
    for name, order in (("in-context unigram", 1), ("in-context bigram", 2)):
        acc, by_pos = accuracy([ngram_predictions(x, order) for x in xs], held_out)
        results[name] = dict(final_accuracy=float(acc), by_position=by_pos)

    for kind, label in (("mosaic", "Memory Mosaic"), ("gpt", "GPT")):
        config = ModelConfig(model=kind, vocab_size=VOCAB, n_layer=layers, n_head=heads, n_embd=width,
                             block_size=length)
        clock = Stopwatch()
        model, history, losses = train_language_model(config, args.seed, train_tables, held_out, steps, batch, lr,
                                                      eval_every, None if q else 250, label)
        model.eval()
        acc, by_pos = accuracy([model_predictions(model, x) for x in xs], held_out)
        results[label] = dict(config=config.to_dict(), n_params=int(model.num_parameters()),
                              history=history, final_accuracy=float(acc), by_position=by_pos,
                              final_loss=float(np.mean(losses[-20:])), train_seconds=clock())
        print(f"{label}: held-out accuracy {acc:.3f} ({clock():.0f} s)", flush=True)

    print(f"\nvalid-next-letter accuracy on {n_eval_dfas} held-out automata "
          f"(trained on {n_train_dfas} automata, {steps} steps of {batch} x {length} tokens)")
    print_table(["predictor", "parameters", "accuracy"],
                [[label, r.get("n_params", "-"), r["final_accuracy"]] for label, r in results.items()])

    fig, axes = figure()
    ax = axes[0, 0]
    for label, r in results.items():
        if "history" in r:
            ax.plot(*zip(*r["history"]), "o-", ms=3, label=f"{label} ({r['n_params'] / 1e3:.0f}k params)")
        else:
            ax.axhline(r["final_accuracy"], ls="--", lw=1, color="grey" if "uni" in label else "black",
                       label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out valid next-letter accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, args.out / "accuracy.png")

    fig, axes = figure()
    ax = axes[0, 0]
    window = 1 if q else 8
    for label, r in results.items():
        curve = np.convolve(r["by_position"], np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(curve)) + window // 2, curve, label=label, lw=1.2)
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("valid next-letter accuracy (held-out automata)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, args.out / "by_position.png")
    save_json(args.out / "results.json", dict(quick=q, length=length, n_train_dfas=n_train_dfas,
                                              n_eval_dfas=n_eval_dfas, steps=steps, batch=batch, lr=lr,
                                              results=results))


if __name__ == "__main__":
    run(main)
