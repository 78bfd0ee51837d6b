"""Memory Mosaic vs GPT on tiny Shakespeare (characters), same parameter count, same steps and batches.

Both models are trained by minimosaic.train with the same settings (AdamW, warmup + cosine, clipping,
the same seed, so the same batches). With the default pmem_size = 3.5 n_embd a mosaic block has 12 d^2
weights, like a GPT block (attention 4 d^2 + MLP 8 d^2); the GPT also has its position embeddings.
The paper finds the mosaic's validation loss on par with the transformer's.

Reported: the validation loss curve of both (curves.png) and the loss at each position of the context
window on the whole validation split (per_position.png): both fall with the position, the in-context
learning curve; the mosaic has no position embeddings, so it also reads windows longer than it was
trained on.

The text: `load_text('shakespeare', data_dir)` with data_dir from --data-dir, else $MINIMOSAIC_DATA_DIR,
else minimosaic's cache (downloaded once, 1.1 MB).
"""
import shutil

from _common import Stopwatch, figure, parse_args, print_table, run, save_figure, save_json
from minimosaic.models import ModelConfig
from minimosaic.train import TrainConfig, loss_by_position, prepare_data, read_log, train


def options(parser):
    parser.add_argument("--data-dir", default=None, help="folder holding tinyshakespeare.txt")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1500, quick 20)")


def main():
    args = parse_args("shakespeare_char", __doc__.splitlines()[0], options)
    q = args.quick
    steps = args.steps or (20 if q else 1500)
    common = dict(n_layer=2, n_head=4, n_embd=64, block_size=64) if not q else \
        dict(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = TrainConfig(data="shakespeare", level="char", steps=steps, batch_size=16 if not q else 8,
                         lr=3e-3, min_lr=3e-4, warmup=min(100, steps // 10), eval_interval=max(1, steps // 10),
                         eval_batches=10 if not q else 2, log_interval=max(1, steps // 30), seed=args.seed)
    data = prepare_data(config, data_dir=args.data_dir)
    print(f"tiny Shakespeare: {len(data.train_ids):,} training / {len(data.val_ids):,} validation characters, "
          f"vocabulary {data.tokenizer.vocab_size}")

    results = {}
    for kind, label in (("mosaic", "Memory Mosaic"), ("gpt", "GPT")):
        model_config = ModelConfig(model=kind, vocab_size=data.tokenizer.vocab_size, **common)
        run_dir = args.out / "runs" / kind
        shutil.rmtree(run_dir, ignore_errors=True)   # a fresh run each time (train refuses to overwrite)
        config.out = str(run_dir)
        clock = Stopwatch()
        result = train(model_config, config, data)
        seconds = clock()
        records = read_log(run_dir)
        mean, per_position = loss_by_position(result.model, data.val_ids, model_config.block_size, 64, "cpu",
                                              max_batches=2 if q else None)
        results[label] = dict(config=model_config.to_dict(), n_params=int(result.model.num_parameters()),
                              val_loss=result.val_loss, full_val_loss=mean, per_position=per_position,
                              curve=[(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
                              train_curve=[(r["step"], r["loss"]) for r in records], seconds=seconds,
                              ms_per_step=1000 * seconds / steps)
        print(f"{label}: validation loss {mean:.4f} ({result.model.num_parameters():,} parameters, "
              f"{seconds:.0f} s)", flush=True)

    mosaic, gpt = results["Memory Mosaic"], results["GPT"]
    gap = mosaic["full_val_loss"] - gpt["full_val_loss"]
    print(f"\n{steps} steps of {config.batch_size} x {common['block_size']} characters; validation loss on "
          f"the whole validation split (nats/char)")
    print_table(["model", "parameters", "val loss", "loss at t=0", "loss at t=T-1", "ms/step"],
                [[label, r["n_params"], r["full_val_loss"], float(r["per_position"][0]),
                  float(r["per_position"][-1]), f"{r['ms_per_step']:.0f}"] for label, r in results.items()])
    print(f"mosaic - GPT = {gap:+.4f} nats/char")

    fig, axes = figure()
    ax = axes[0, 0]
    for label, r in results.items():
        line, = ax.plot(*zip(*r["train_curve"]), lw=0.8, alpha=0.5)
        ax.plot(*zip(*r["curve"]), "o-", ms=3, color=line.get_color(),
                label=f"{label} ({r['n_params'] / 1e3:.0f}k params): val {r['full_val_loss']:.3f}")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats/char); thin: training, dots: validation")
    low = min(min(v for _, v in r["curve"] + r["train_curve"]) for r in results.values())
    high = max(max(v for _, v in r["curve"]) for r in results.values())
    ax.set_ylim(low - 0.05, high + 0.3)   # the first steps' losses would squash the curves
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, args.out / "curves.png")

    fig, axes = figure()
    ax = axes[0, 0]
    for label, r in results.items():
        ax.plot(r["per_position"], label=label, lw=1.2)
    ax.set_xlabel("position in the context window")
    ax.set_ylabel("validation loss (nats/char)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, args.out / "per_position.png")
    save_json(args.out / "results.json", dict(quick=q, steps=steps, train_config=vars(config).copy(),
                                              mosaic_minus_gpt=gap, models=results))


if __name__ == "__main__":
    run(main)
