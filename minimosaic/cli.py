"""The `minimosaic` command line: a thin Typer layer that turns options into calls of the modules.

    minimosaic train                 a small Memory Mosaic on the embedded stories, on the CPU
    minimosaic sample runs/X         text from a trained run (cached generation)
    minimosaic eval runs/X           validation loss, perplexity, loss by position in the context
    minimosaic explain runs/X -p ..  what each memory retrieved for each position of a prompt
    minimosaic plot runs/X           loss curves from the run's log.jsonl
    minimosaic data                  named datasets and where they are cached

User mistakes raise MinimosaicError (or are usage errors); `main()` prints one line and exits with code 2.
"""
import csv
import dataclasses
import errno
import math
import sys
from enum import Enum
from pathlib import Path

import numpy as np
import typer

try:  # recent Typer carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:
    from click import exceptions as click_exceptions

from . import __version__, backend, data as datasets, plots
from . import train as trainer
from .errors import MinimosaicError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="minimosaic: train, sample and inspect Memory Mosaics (and a GPT baseline) "
                       "built from scratch on NumPy/CuPy.")


class ModelName(str, Enum):
    mosaic = "mosaic"
    gpt = "gpt"


class Level(str, Enum):
    char = "char"
    token = "token"


@app.callback()
def _root():
    """minimosaic: train, sample and inspect Memory Mosaics (and a GPT baseline) on NumPy/CuPy."""


@app.command()
def version():
    """Print the minimosaic version."""
    typer.echo(__version__)


# ----------------------------------------------------------------------------------------------------
# train

def _default(text):
    """' [default: text]' for a help string (the bracket escaped where Typer renders help with rich markup,
    which would otherwise take it for a style tag and drop it)."""
    return f" {chr(92) if typer.core.HAS_RICH else ''}[default: {text}]"


def _opt(help_text, shown=None, key=None):
    """An option whose value None means "not given": the preset (or the built-in default) decides."""
    if shown is None:
        in_a_preset = any(key in preset for preset in trainer.PRESETS.values())
        defaults = {**dataclasses.asdict(trainer.ModelConfig()), **dataclasses.asdict(trainer.TrainConfig())}
        shown = "from --preset" if in_a_preset else str(defaults[key])
    return typer.Option(None, help=help_text + _default(shown), show_default=False)


def _preset_summary():
    rows = []
    for name, p in trainer.PRESETS.items():
        rows.append(f"{name}: {p['n_layer']} layers x {p['n_embd']} wide, {p['n_head']} heads, block "
                    f"{p['block_size']}, batch {p['batch_size']}, {p['steps']} steps at lr {p['lr']:g}")
    return "\n\n".join(rows)


_PLAIN_HELP = ("run the plain core (the maths as written), without the fast layer: slower, same results "
               "to rounding; also MINIMOSAIC_PLAIN=1")


def _use_fast_layer(plain):
    """The fast layer on, unless --plain or MINIMOSAIC_PLAIN=1 asks for the plain core."""
    from . import fast
    if not (plain or fast.plain_requested()):
        fast.enable()


def _v2_summary(m):
    """' | v2: ...' naming the Memory Mosaics v2 options a model config turns on ('' for none)."""
    on = [name for name in ("adaptive_bandwidth", "gated_keys") if m.get(name)]
    if m.get("memory_levels") == 3:
        on.append(f"memory_levels 3 (short_window {m['short_window']}, long_skip {m['long_skip']})")
    return f" | v2: {', '.join(on)}" if on else ""


class ConsoleLogger(trainer.TrainLogger):
    """Training progress on the terminal: a rich progress bar on a TTY, plain lines otherwise."""

    def __init__(self):
        from rich.console import Console
        self.console = Console(highlight=False)
        self.bar = self.console.is_terminal
        self.progress = None

    def begin(self, info):
        m, t = info["model_config"], info["train_config"]
        pmem = f" pmem_size {trainer.ModelConfig(**m).pmem_size}" if m["model"] == "mosaic" else ""
        lines = [
            f"model    {m['model']}: n_layer {m['n_layer']} n_head {m['n_head']} n_embd {m['n_embd']} "
            f"block_size {m['block_size']}{pmem}"
            f"{' no position embedding' if m['model'] == 'gpt' and not m.get('position_embedding', True) else ''}"
            f" dropout {m['dropout']} vocab {m['vocab_size']}"
            f"{_v2_summary(m)} | {info['n_params']:,} parameters",
            f"data     {info['dataset']} ({t['level']} level) | train {info['train_tokens']:,} tokens, "
            f"validation {info['val_tokens']:,}",
            f"train    steps {t['steps']} | batch {t['batch_size']} x accum {t['grad_accum']} x block "
            f"{m['block_size']} = {info['tokens_per_step']:,} tokens/step | lr {t['lr']:g} -> "
            f"{t['min_lr']:g}, warmup {t['warmup']} | weight_decay {t['weight_decay']:g} grad_clip "
            f"{t['grad_clip']:g} | seed {t['seed']} | device {t['device']} ({info['core']})"
            + (f", step {info['step_mode']}" if t["device"] == "gpu" else ""),
            *([f"parallel {info['world']}: each takes {t['batch_size'] // info['ranks']} of the batch's "
               f"{t['batch_size']} rows; gradients averaged by all-reduce"] if info.get("ranks", 1) > 1 else []),
            f"out      {t['out']}"
            + (f" (resuming at step {info['start_step']})" if info["start_step"] else ""),
        ]
        if t["steps"] < t["warmup"]:
            lines.append(f"warning  --steps {t['steps']} is below --warmup {t['warmup']}: the learning rate "
                         f"never reaches its peak {t['lr']:g}")
        if info.get("stale_files"):
            lines.append(f"cleaned  {info['stale_files']} temporary file(s) of an interrupted save "
                         f"({info['stale_bytes'] / 2**20:.1f} MiB freed)")
        for line in lines:
            typer.echo(line)
        self.total = t["steps"]
        if self.bar:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                     TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=info["start_step"],
                                               stats="")

    def log(self, r):
        stats = f"loss {r['loss']:.4f} | {r['tokens_per_s']:,.0f} tok/s"
        line = (f"step {r['step']:>6}/{self.total} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
                f"grad_norm {'skipped' if r['grad_norm'] is None else format(r['grad_norm'], '.3f')} | "
                f"{r['tokens_per_s']:,.0f} tok/s | {r['elapsed_s']:.1f}s")
        if "loss_scale" in r:
            line += f" | loss scale {r['loss_scale']:g} ({r['skipped_steps']} skipped)"
        if "val_loss" in r:
            line += f" | val_loss {r['val_loss']:.4f}"
        if self.progress is None:
            typer.echo(line)
            return
        self.progress.update(self.task, completed=r["step"], stats=stats)
        if "val_loss" in r:
            self.progress.console.print(line)

    def close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def end(self, result):
        self.close()


@app.command(short_help="Train a Memory Mosaic (or GPT) language model; checkpoints, log.jsonl and "
                        "loss.png go to --out.",
             help="Train a Memory Mosaic (or GPT) language model; checkpoints, log.jsonl and loss.png "
                  "go to --out. Options left out come from the preset:\n\n" + _preset_summary())
def train(
    model: ModelName = _opt("which model", shown="mosaic"),
    level: Level = _opt("characters or subword tokens", shown="char"),
    tokenizer: str = _opt("level token: 'bpe' (learned on the data, offline) or a tiktoken encoding "
                          "such as 'gpt2'", shown="bpe"),
    vocab_size: int = _opt("BPE vocabulary size to learn (level token, tokenizer bpe)", key="vocab_size"),
    data: str = _opt("a UTF-8 text file or a named dataset (see `minimosaic data`)",
                     shown="the embedded stories"),
    data_dir: Path = _opt("where named datasets are cached (encoded ids: ~/.cache/minimosaic/encoded)",
                          shown="$MINIMOSAIC_DATA_DIR or ~/.cache/minimosaic"),
    preset: str = _opt(f"model size and training settings: {', '.join(trainer.PRESETS)}",
                       shown="char-tiny for char, tok-small for token"),
    n_layer: int = _opt("blocks", key="n_layer"),
    n_head: int = _opt("heads per memory (must divide n_embd)", key="n_head"),
    n_embd: int = _opt("embedding width", key="n_embd"),
    block_size: int = _opt("context length in tokens", key="block_size"),
    batch_size: int = _opt("sequences per micro-batch", key="batch_size"),
    pmem_size: int = _opt("persistent memory slots (mosaic)", key="pmem_size"),
    no_position_embedding: bool = typer.Option(False, "--no-position-embedding",
                                               help="GPT: no position embedding (NoPE; order from the causal "
                                                    "mask alone), so it can read contexts past --block-size"),
    dropout: float = _opt("dropout probability", key="dropout"),
    lr: float = _opt("peak learning rate", key="lr"),
    min_lr: float = _opt("learning rate at the end of the cosine decay", key="min_lr"),
    warmup: int = _opt("linear warmup steps", key="warmup"),
    steps: int = _opt("optimizer steps in all (a resumed run may raise it)", key="steps"),
    weight_decay: float = _opt("AdamW weight decay (matrices only)", key="weight_decay"),
    grad_clip: float = _opt("clip the global gradient norm to this (0: off)", key="grad_clip"),
    grad_accum: int = _opt("micro-batches per optimizer step", key="grad_accum"),
    eval_interval: int = _opt("evaluate and checkpoint every this many steps", key="eval_interval"),
    eval_batches: int = _opt("validation batches per evaluation", key="eval_batches"),
    log_interval: int = _opt("steps per log line", key="log_interval"),
    seed: int = _opt("random seed (weights, batches, dropout)", key="seed"),
    device: str = _opt("cpu or gpu (needs CuPy)", shown="cpu"),
    precision: str = _opt("fp32; fp16: float16 products with float32 master weights, float32 softmax, "
                          "layer-norm and loss, and dynamic loss scaling; fp64: everything in float64 "
                          "(slow; for exact comparisons)", key="precision"),
    tf32: bool = typer.Option(False, "--tf32", help="GPU: let float32 matmuls use TF32 tensor cores "
                                                     "(faster, ~1e-3 relative error in products)"),
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph",
                                       help="GPU: run each step eagerly; by default a run without dropout "
                                            "or grad-accum records its step once as a CUDA graph and "
                                            "replays it"),
    time_limit: float = _opt("stop after this many seconds of training in this invocation, with a last "
                             "evaluation and checkpoint (0: no limit; a resumed run gets a fresh budget)",
                             key="time_limit"),
    out: Path = _opt("run folder for checkpoints, log.jsonl and plots", shown="runs/<model>-<level>-<data>"),
    adaptive_bandwidth: bool = typer.Option(False, "--adaptive-bandwidth",
                                            help="Memory Mosaics v2 (mosaic): the context memories' kernel "
                                                 "bandwidth scheduled on the number of stored pairs, beta = "
                                                 "beta1 n^alpha + beta0, learned per head"),
    gated_keys: bool = typer.Option(False, "--gated-keys",
                                    help="Memory Mosaics v2 (mosaic): keys from a leaky average whose gate and "
                                         "decay depend on the input"),
    memory_levels: int = _opt("Memory Mosaics v2 (mosaic): 3 splits the context memory into a short-term and a "
                              "long-term memory beside the persistent one",
                              shown="off, the 2024 model's context and persistent memory"),
    short_window: int = _opt("with --memory-levels 3: pairs the short-term memory holds", key="short_window"),
    long_skip: int = _opt("with --memory-levels 3: most recent pairs the long-term memory skips",
                          key="long_skip"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its latest.npz"),
    plain: bool = typer.Option(False, "--plain", help=_PLAIN_HELP),
    nproc: int = typer.Option(None, min=1, show_default=False,
                              help="data parallel: start this many ranks with mpiexec (needs "
                                   "`pip install -e '.[dist]'`); --batch-size is then the whole step's batch, "
                                   "split among them. Same as `mpiexec -n N minimosaic train ...`"),
):
    if nproc is not None:
        _start_ranks(nproc)
    if memory_levels is not None and memory_levels != 3:
        raise MinimosaicError(f"--memory-levels {memory_levels}: use 3 (short-term, long-term and persistent "
                              f"memory), or leave it out for the 2024 model")
    for flag, value in (("--short-window", short_window), ("--long-skip", long_skip)):
        if value is not None and memory_levels is None and not resume:
            raise MinimosaicError(f"{flag} applies to --memory-levels 3 only: add --memory-levels 3, or drop it")
    overrides = dict(model=model and model.value, level=level and level.value, tokenizer=tokenizer,
                     vocab_size=vocab_size, data=data, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     block_size=block_size, batch_size=batch_size, pmem_size=pmem_size, dropout=dropout,
                     lr=lr, min_lr=min_lr, warmup=warmup, steps=steps, weight_decay=weight_decay,
                     grad_clip=grad_clip, grad_accum=grad_accum, eval_interval=eval_interval,
                     eval_batches=eval_batches, log_interval=log_interval, seed=seed, device=device,
                     tf32=tf32 or None, cuda_graph=False if no_cuda_graph else None, precision=precision,
                     time_limit=time_limit, adaptive_bandwidth=adaptive_bandwidth or None,
                     gated_keys=gated_keys or None, memory_levels=memory_levels, short_window=short_window,
                     long_skip=long_skip, position_embedding=False if no_position_embedding else None)
    overrides.update(out=out and str(out), plain=plain or None)
    from .fast import distributed
    world = distributed.world_from_environment()  # one process, or a rank of `mpiexec -n N`
    with world.collective_errors():  # a user error on any rank: every rank stops, one message
        model_config, config, resume_meta = trainer.resolve_run(preset, overrides, resume, writes=world.is_root)
        world.check_batch(config.batch_size)
        world.use_device(config.device)
        with world.root_first():  # rank 0 fills the tokenizer and encoding caches; the others read them
            corpus = trainer.prepare_data(config, data_dir, resume_meta=resume_meta)
    for note in corpus.notes if world.is_root else ():
        typer.echo(f"note: {note}", err=True)
    model_config.vocab_size = corpus.tokenizer.vocab_size
    logger = ConsoleLogger() if world.is_root else None
    try:
        result = trainer.train(model_config, config, corpus, resume=resume, logger=logger, world=world)
    finally:
        if logger is not None:
            logger.close()
    if not world.is_root:
        if result.interrupted:
            raise typer.Exit(130)
        return
    if result.start_step >= config.steps:
        typer.echo(f"nothing to do: run finished at step {result.step}; raise --steps to continue")
        return
    records = trainer.read_log(result.out)
    if records:
        png = plots.plot_losses(records, result.out / "loss.png",
                                title=f"{model_config.model} on {corpus.name}")
        typer.echo(f"loss curves: {png}")
    if result.interrupted:
        typer.echo(f"interrupted at step {result.step}: saved {result.out / 'latest.npz'}; continue with "
                   f"`minimosaic train --out {result.out} --resume`")
        raise typer.Exit(130)
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    if result.time_limited:
        typer.echo(f"stopped at the time limit ({config.time_limit:g} s of training) at step {result.step} of "
                   f"{config.steps}: val_loss {val} (best {best}); continue with "
                   f"`minimosaic train --out {result.out} --resume` (a fresh --time-limit each time)")
        return
    typer.echo(f"done: step {result.step}, val_loss {val} (best {best}), {result.elapsed_s:.0f}s; "
               f"try `minimosaic sample {result.out}`")


def _start_ranks(nproc):
    """Replace this process by `mpiexec -n nproc minimosaic <the same arguments, less --nproc>`."""
    import os
    from .fast import distributed
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command, env = distributed.mpiexec_command(nproc, args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, env)


# ----------------------------------------------------------------------------------------------------
# sample, eval, explain, plot

_RUN = typer.Argument(..., help="run folder written by `minimosaic train`", show_default=False)
_CHECKPOINT = typer.Option(None, "--checkpoint", help="best or latest",
                           show_default="best if there, else latest")
_DEVICE = typer.Option("cpu", help="cpu or gpu (needs CuPy)")


def _encode_prompt(tokenizer, text, block_size=None):
    ids = tokenizer.encode(text) if text else []
    if not ids:  # an empty prompt: start from a newline (or id 0 when the vocabulary has none)
        try:
            ids = tokenizer.encode("\n")
        except MinimosaicError:
            ids = []
        ids = ids or [0]
    return np.asarray(ids if block_size is None else ids[-block_size:], dtype=np.int64)


@app.command()
def sample(
    directory: Path = _RUN,
    prompt: str = typer.Option("", "--prompt", "-p", help="text to continue", show_default="a newline"),
    prompt_file: Path = typer.Option(None, help="read the prompt from this UTF-8 file"),
    max_new_tokens: int = typer.Option(500, min=0, help="tokens to generate per sample"),
    temperature: float = typer.Option(0.8, min=0.0, help="softmax temperature: lower is more conservative, 0 always "
                                      "picks the most likely token"),
    top_k: int = typer.Option(None, min=1, help="sample among the k most likely tokens only", show_default="all"),
    num_samples: int = typer.Option(1, min=1, help="independent samples"),
    seed: int = typer.Option(1337, help="random seed (sample i uses seed + i)"),
    device: str = _DEVICE,
    plain: bool = typer.Option(False, "--plain", help=_PLAIN_HELP),
    checkpoint: str = _CHECKPOINT,
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute the whole context at each token "
                                  "(slow; the reference the cache is checked against)"),
):
    """Generate text from a trained run (with the incremental cache)."""
    if prompt_file is not None:
        prompt = datasets.read_text_file(prompt_file, role="prompt file", advice="check the --prompt-file path")
    if not temperature >= 0:
        raise MinimosaicError(f"--temperature {temperature}: use a value >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise MinimosaicError(f"--top-k {top_k}: use a value >= 1, or leave it out to sample from all tokens")
    if max_new_tokens < 0 or num_samples < 1:
        raise MinimosaicError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    _use_fast_layer(plain)
    model, tokenizer, meta = trainer.load_run(directory, checkpoint, backend.normalize_device(device))
    ids = _encode_prompt(tokenizer, prompt)
    for i in range(num_samples):
        if i:
            typer.echo("-" * 60)
        out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed + i,
                             use_cache=not no_cache)
        typer.echo(tokenizer.decode(out))


@app.command("eval")
def evaluate(
    directory: Path = _RUN,
    data: str = typer.Option(None, help="evaluate on another text file or dataset",
                             show_default="the run's data"),
    data_dir: Path = typer.Option(None, help="where named datasets are cached",
                                  show_default="$MINIMOSAIC_DATA_DIR or ~/.cache/minimosaic"),
    batch_size: int = typer.Option(None, min=1, help="windows per forward pass", show_default="the run's"),
    max_batches: int = typer.Option(None, min=1, help="stop after this many batches",
                                    show_default="the whole split"),
    per_position: bool = typer.Option(False, "--per-position", help="write the loss at each position of the "
                                      "context window to per_position.png and .csv in the run folder"),
    context: int = typer.Option(None, "--context", min=1, help="window length in tokens, also longer than the "
                                "run was trained on where the model allows it (mosaic, GPT without position "
                                "embeddings)", show_default="the run's block size"),
    device: str = _DEVICE,
    plain: bool = typer.Option(False, "--plain", help=_PLAIN_HELP),
    checkpoint: str = _CHECKPOINT,
):
    """Validation loss and perplexity over the whole validation split (bits per character at char level)."""
    _use_fast_layer(plain)
    model, tokenizer, meta = trainer.load_run(directory, checkpoint, backend.normalize_device(device))
    if context is not None and model.max_context is not None and context > model.max_context:
        raise MinimosaicError(f"--context {context}: this GPT reads at most {model.max_context} tokens (it learned "
                              f"position embeddings for positions 0-{model.max_context - 1} only); use "
                              f"--context {model.max_context} or less, or a model without positions (mosaic, "
                              f"or GPT trained with --no-position-embedding)")
    config = trainer.TrainConfig(**meta["train_config"])
    if data is not None:
        config.data = data
    corpus = trainer.prepare_data(config, data_dir, tokenizer=tokenizer)
    for note in corpus.notes:
        typer.echo(f"note: {note}", err=True)
    block = context or model.config.block_size
    if context is not None and len(corpus.val_ids) < context + 1:
        raise MinimosaicError(f"--context {context}: the validation split has only {len(corpus.val_ids):,} tokens; "
                              f"use --context {len(corpus.val_ids) - 1} or less")
    loss, by_position = trainer.loss_by_position(model, corpus.val_ids, block,
                                                 batch_size or config.batch_size,
                                                 backend.normalize_device(device), max_batches)
    unit = "bits per character" if config.level == "char" else "bits per token"
    window = "" if context is None else f", windows of {block} tokens (trained on {model.config.block_size})"
    typer.echo(f"{corpus.name} validation ({len(corpus.val_ids):,} tokens, step {meta['step']}{window}): "
               f"loss {loss:.4f} nats | perplexity {math.exp(loss):.3f} | {loss / math.log(2):.4f} {unit}")
    if per_position:
        n = max(1, block // 8)
        typer.echo(f"loss at positions 0-{n - 1}: {by_position[:n].mean():.4f}; at the last {n}: "
                   f"{by_position[-n:].mean():.4f}")
        csv_path = Path(directory) / "per_position.csv"
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["position", "loss"])
            writer.writerows([t, f"{v:.6f}"] for t, v in enumerate(by_position))
        png = plots.plot_per_position(by_position, Path(directory) / "per_position.png",
                                      title=f"loss by position ({corpus.name}, step {meta['step']})")
        typer.echo(f"wrote {png} and {csv_path}")


def _token_label(tokenizer, token_id):
    return repr(tokenizer.decode([int(token_id)]))[1:-1].replace(" ", "␣") or "∅"


@app.command()
def explain(
    directory: Path = _RUN,
    prompt: str = typer.Option(..., "--prompt", "-p", help="text to explain (short: a row per token)"),
    top: int = typer.Option(3, min=1, help="retrievals shown per head"),
    layer: list[int] = typer.Option(None, help="layers to show (repeat the option)", show_default="all"),
    heatmap: Path = typer.Option(None, help="also write the retrieval weights as a PNG heat map"),
    device: str = _DEVICE,
    plain: bool = typer.Option(False, "--plain", help=_PLAIN_HELP),
    checkpoint: str = _CHECKPOINT,
):
    """For each position of a prompt: which past positions each context memory retrieved (per layer and
    head, with their tokens and weights) and which persistent-memory slots answered most."""
    from rich.console import Console
    from rich.table import Table

    _use_fast_layer(plain)
    model, tokenizer, meta = trainer.load_run(directory, checkpoint, backend.normalize_device(device))
    ids = _encode_prompt(tokenizer, prompt, model.config.block_size)
    inspection = model.inspect(ids[None])  # per layer: context (1, H, T, T), persistent (1, H, T, P)
    layers = layer or list(range(len(inspection)))
    bad = [i for i in layers if not 0 <= i < len(inspection)]
    if bad:
        raise MinimosaicError(f"--layer {bad[0]}: this model has layers 0..{len(inspection) - 1}")
    labels = [_token_label(tokenizer, i) for i in ids]
    console = Console(highlight=False)
    mosaic = meta["model_config"]["model"] == "mosaic"
    for i in layers:
        found = inspection[i]
        memories = [name for name in _CONTEXT_LEVELS if name in found]
        persistent = found.get("persistent")
        title = ", ".join(_CONTEXT_LEVELS[name] for name in memories) if mosaic else "attention"
        table = Table(title=f"layer {i}: top {title} retrievals (token@position weight)"
                      + (" and persistent slots" if persistent is not None else ""), show_lines=True)
        table.add_column("pos", justify="right")
        table.add_column("token")
        if "levels" in found:
            table.add_column("answered by\n(share of |output|)")
        n_head = found[memories[0]].shape[1]
        for h in range(n_head):
            table.add_column(f"head {h}")
        for t in range(len(ids)):
            cells = [_level_shares(found["levels"], t)] if "levels" in found else []
            for h in range(n_head):
                lines = []
                for name in memories:
                    prefix = "" if len(memories) == 1 else f"{name.split('_')[0]}: "
                    weights = found[name][0, h, t]
                    best = [s for s in np.argsort(-weights, kind="stable")[:top] if weights[s] > 0]
                    lines += [f"{prefix}{labels[s]}@{s} {weights[s]:.2f}" for s in best]
                    if "bandwidth" in found:
                        lines.append(f"{prefix}beta {found['bandwidth'][name][h, t]:.2f}")
                    if "gates" in found:
                        gate, decay = found["gates"][name]
                        lines.append(f"{prefix}gate {gate[0, h, t]:.2f} decay {decay[0, h, t]:.2f}")
                if persistent is not None:
                    slots = np.argsort(-persistent[0, h, t], kind="stable")[:top]
                    lines.append("slots " + ", ".join(f"{s} {persistent[0, h, t, s]:.2f}" for s in slots))
                cells.append("\n".join(lines) or "-")
            table.add_row(str(t), labels[t], *cells)
        console.print(table)
    if heatmap is not None:
        maps = [(i, name) for i in layers for name in _CONTEXT_LEVELS if name in inspection[i]]
        png = plots.plot_retrieval([inspection[i][name][0] for i, name in maps], labels, heatmap,
                                   title="retrieval weights, " + ", ".join(
                                       f"layer {i}" + ("" if name == "context" else f" {name}") for i, name in maps))
        typer.echo(f"wrote {png}")


_CONTEXT_LEVELS = {"context": "context memory", "long_term": "long-term memory", "short_term": "short-term memory"}


def _level_shares(levels, t):
    """Each memory's share of what the block added at position t, the largest marked *: which level answered."""
    size = {name: float(norms[0, t]) for name, norms in levels.items()}
    total = sum(size.values()) or 1.0
    top = max(size, key=size.get)
    return "\n".join(f"{name.replace('_', '-')} {value / total:.2f}{' *' if name == top else ''}"
                     for name, value in size.items())


@app.command()
def plot(
    directory: Path = _RUN,
    out: Path = typer.Option(None, help="PNG to write", show_default="<run folder>/loss.png"),
):
    """Plot the training and validation loss of a run (from its log.jsonl) against steps and tokens."""
    records = trainer.read_log(directory)
    if not any("loss" in r for r in records):
        raise MinimosaicError(f"{directory}/log.jsonl has no records yet: train for at least one log "
                              f"interval")
    png = plots.plot_losses(records, out or Path(directory) / "loss.png", title=str(directory))
    typer.echo(f"wrote {png}")


# ----------------------------------------------------------------------------------------------------
# data

data_app = typer.Typer(help="List the named datasets and where they are cached; download one.")
app.add_typer(data_app, name="data")
_DATA_DIR = typer.Option(None, help="the data directory",
                         show_default="$MINIMOSAIC_DATA_DIR or ~/.cache/minimosaic")


@data_app.callback(invoke_without_command=True)
def data_main(ctx: typer.Context, data_dir: Path = _DATA_DIR):
    """List the named datasets (same as `minimosaic data list`)."""
    if ctx.invoked_subcommand is None:
        data_list(data_dir)


@data_app.command("list")
def data_list(data_dir: Path = _DATA_DIR):
    """List the named datasets, whether each is cached, and where."""
    typer.echo(f"data directory: {data_dir or datasets.default_data_dir()}")
    for row in datasets.list_datasets(data_dir):
        where = "generated on the fly" if row["path"] is None else (
            row["path"] if row["cached"]
            else f"not downloaded yet (`minimosaic data download {row['name']}`)")
        typer.echo(f"  {row['name']:<12} {row['description']}\n  {'':<12} {where}")


@data_app.command("download")
def data_download(name: str = typer.Argument(..., help="dataset name"), data_dir: Path = _DATA_DIR):
    """Download a named dataset into the data directory (checked against its sha256)."""
    typer.echo(f"{name}: {datasets.download_dataset(name, data_dir)}")


# ----------------------------------------------------------------------------------------------------
# bench

@app.command(help="Time training steps (forward + backward + AdamW) and generation on random tokens; "
                  "optionally the official PyTorch code side by side (--reference-file).")
def bench(
    preset: str = typer.Option("char-small", help="size preset: char-small, char-medium, tok-small, "
                                                  "gpt2-small-like (GPU)"),
    model: str = typer.Option("both", help="mosaic, gpt or both"),
    override: list[str] = typer.Option([], "--set", help="override a size, e.g. --set n_layer=2 "
                                                          "(repeatable)"),
    device: str = typer.Option("cpu", help="cpu or gpu"),
    steps: int = typer.Option(15, min=1, help="timed training steps (after the warm-up)"),
    warmup: int = typer.Option(3, min=0, help="untimed warm-up steps"),
    reference_file: Path = typer.Option(None, help="a copy of the official nanoMosaics/mosaic_model.py "
                                                   "(needs torch); never commit it"),
    reference_gpt_file: Path = typer.Option(None, help="a copy of the official nanoMosaics/gpt_model.py"),
    generation: bool = typer.Option(True, help="also time generation with and without the cache"),
    gen_context: int = typer.Option(512, min=2, help="context length reached by the generation benchmark"),
    threads: int = typer.Option(None, min=1, help="BLAS/torch threads for both sides" + _default("NumPy's")),
    tf32: bool = typer.Option(False, "--tf32", help="GPU: TF32 tensor-core matmuls on both sides"),
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph",
                                       help="GPU: time our step eagerly, not replayed from a CUDA graph "
                                            "(the official code always runs eagerly)"),
    json_out: Path = typer.Option(None, "--json", help="also write the results as JSON here"),
    plain: bool = typer.Option(False, "--plain", help="time our plain core, without the fast layer "
                                                      "(also MINIMOSAIC_PLAIN=1)"),
    also_plain: bool = typer.Option(False, "--also-plain", help="time our plain core too, in the same run"),
    same_allocator: bool = typer.Option(False, "--same-allocator",
                                        help="also time the official code with our allocator setting (glibc "
                                             "keeps freed memory), beside it as its users run it"),
    rounds: int = typer.Option(1, min=1, help="time every side this many times, round after round, and "
                                              "report each ratio's median (a shared machine drifts)"),
    lockstep: bool = typer.Option(False, "--lockstep",
                                  help="run all sides at once, taking turns one training step each, so that "
                                       "a slow spell of the machine falls on every side alike (not fair to "
                                       "the official code as shipped, whose page faults then cost more)"),
):
    from . import bench as benchmarks, fast

    result = benchmarks.run_bench(
        preset=preset, model=model, overrides=benchmarks.parse_overrides(override), device=device,
        steps=steps, warmup=warmup, reference_file=reference_file, reference_gpt_file=reference_gpt_file,
        generation=generation, json_path=json_out, threads=threads, gen_context=gen_context,
        tf32=tf32, cuda_graph=not no_cuda_graph, progress=lambda line: typer.echo(line, err=True),
        plain=plain or fast.plain_requested(), also_plain=also_plain, same_allocator=same_allocator,
        rounds=rounds, lockstep=lockstep)
    typer.echo(benchmarks.format_table(result))


def _report(error):
    """Print a MinimosaicError as one line; returns the exit code (2). Under mpiexec, an error that every
    rank raised alike is printed by rank 0 only, and any other brings the whole job down."""
    from .fast import distributed
    world = distributed.current_world()
    if world is None or isinstance(error, distributed.CollectiveError):
        if distributed.launcher_rank_size()[0] == 0:
            typer.echo(f"error: {error}", err=True)
    else:
        distributed.abort_on_error(world, error)
    return 2


def main(argv=None):
    """Entry point. Usage errors and MinimosaicErrors become one line on stderr and exit code 2.
    In a data-parallel job, a rank that fails in any other way brings every rank down with it."""
    from .fast import distributed
    if distributed.launcher_rank_size()[1] <= 1:
        return _main(argv)
    try:
        _main(argv)
    except SystemExit:
        raise
    except BaseException as error:  # a bug, or a second Ctrl-C: no rank may wait forever for this one
        world = distributed.current_world()
        if world is None:
            raise
        import traceback
        traceback.print_exc()
        distributed.abort_on_error(world, f"{type(error).__name__}: {error}")


def _main(argv=None):
    try:
        code = app(args=argv, prog_name="minimosaic", standalone_mode=False)
    except getattr(click_exceptions, "NoArgsIsHelpError", ()):  # click >= 8.2: the help is printed already
        code = 0
    except click_exceptions.UsageError as error:
        where = error.ctx.command_path if error.ctx else "minimosaic"
        typer.echo(f"error: {error.format_message()} (see `{where} --help`)", err=True)
        code = 2
    except typer.Abort:
        typer.echo("aborted", err=True)
        code = 1
    except MinimosaicError as error:
        code = _report(error)
    except OSError as error:  # a write the commands make (a plot, a CSV) failed: full disk, permissions
        where = f" {error.filename}" if error.filename else ""
        advice = ("free some space on that disk, or write elsewhere" if error.errno == errno.ENOSPC
                  else "check the path and its permissions")
        typer.echo(f"error: cannot write{where} ({error.strerror or error}): {advice}", err=True)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
