"""Token-level training: a byte-level BPE learned offline on the embedded stories, a Memory Mosaic on top.

minimosaic writes its own corpus (short stories whose names, things and places come back later, so
remembering the context pays off), learns a BPE vocabulary on it (minimosaic.data.build_tokenizer,
no download), trains a small Memory Mosaic with minimosaic.train and prints a sample.

Loss per token depends on the tokenizer; the table also gives it per character (loss x tokens / chars)
so it can be compared with a character model. Figures: curves.png (training and validation loss),
per_position.png (validation loss at each position of the context window).
"""
import shutil

import numpy as np

from _common import Stopwatch, figure, parse_args, print_table, run, save_figure, save_json
from minimosaic.models import ModelConfig
from minimosaic.train import TrainConfig, loss_by_position, prepare_data, read_log, train

PROMPT = "There once lived a brave fox called"


def options(parser):
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1500, quick 20)")
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default 1024, quick 300)")


def main():
    args = parse_args("tokens", __doc__.splitlines()[0], options)
    q = args.quick
    steps = args.steps or (20 if q else 1500)
    config = TrainConfig(data=None, level="token", tokenizer="bpe", vocab_size=args.vocab_size or (300 if q else 1024),
                         steps=steps, batch_size=8 if q else 16, lr=3e-3, min_lr=3e-4,
                         warmup=min(100, steps // 10), eval_interval=max(1, steps // 10),
                         eval_batches=2 if q else 10, log_interval=max(1, steps // 30), seed=args.seed,
                         out=str(args.out / "run"))
    clock = Stopwatch()
    data = prepare_data(config)
    tokenizer = data.tokenizer
    n_chars = len(tokenizer.decode(data.val_ids.tolist()))
    chars_per_token = n_chars / len(data.val_ids)
    print(f"BPE with {tokenizer.vocab_size} tokens learned in {clock():.1f} s; the stories are "
          f"{len(data.train_ids):,} + {len(data.val_ids):,} tokens, {chars_per_token:.2f} characters per token")
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(PROMPT)]
    print(f"{PROMPT!r} -> {len(pieces)} tokens {pieces}")

    model_config = ModelConfig(model="mosaic", vocab_size=tokenizer.vocab_size,
                               **(dict(n_layer=1, n_head=2, n_embd=32, block_size=32) if q else
                                  dict(n_layer=2, n_head=4, n_embd=96, block_size=64)))
    shutil.rmtree(config.out, ignore_errors=True)   # a fresh run each time (train refuses to overwrite)
    clock = Stopwatch()
    result = train(model_config, config, data)
    seconds = clock()
    model = result.model
    mean, per_position = loss_by_position(model, data.val_ids, model_config.block_size, 64, "cpu",
                                          max_batches=2 if q else None)
    sample = tokenizer.decode(model.generate(np.asarray(tokenizer.encode(PROMPT)), 40 if q else 120,
                                             temperature=0.8, top_k=40, seed=args.seed).tolist())
    print(f"\n{steps} steps of {config.batch_size} x {model_config.block_size} tokens in {seconds:.0f} s")
    print_table(["model", "parameters", "val loss/token", "val loss/char", "loss at t=0", "loss at t=T-1"],
                [["Memory Mosaic", model.num_parameters(), mean, mean / chars_per_token,
                  float(per_position[0]), float(per_position[-1])]])
    print(f"\nsample (temperature 0.8, top-k 40):\n{sample}\n")

    records = read_log(config.out)
    fig, axes = figure()
    ax = axes[0, 0]
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, label="training")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    ax.plot(*zip(*val), "o-", ms=3, label="validation")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"loss (nats/token, {tokenizer.vocab_size} BPE tokens)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, args.out / "curves.png")

    fig, axes = figure()
    ax = axes[0, 0]
    ax.plot(per_position, lw=1.2)
    ax.set_xlabel("position in the context window (tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    save_figure(fig, args.out / "per_position.png")
    save_json(args.out / "results.json", dict(quick=q, steps=steps, vocab_size=tokenizer.vocab_size,
                                              chars_per_token=chars_per_token, model=model_config.to_dict(),
                                              n_params=int(model.num_parameters()), val_loss=mean,
                                              val_loss_per_char=mean / chars_per_token,
                                              per_position=per_position, seconds=seconds, sample=sample))


if __name__ == "__main__":
    run(main)
