"""The training loop: AdamW, warmup + cosine decay, clipping, accumulation, evaluation, checkpoints.

One optimizer step (`training_step`, nanoGPT's loop written out; the bench and the CUDA graph run it too):

    for each of grad_accum micro-steps:  loss = model.loss(x, y) on a fresh batch;  (loss / accum).backward()
    grad_norm = clip_grad_norm(params, grad_clip)        # global L2 norm, then scaled down to grad_clip
    optimizer.step(lr=schedule(step))                     # AdamW, betas (0.9, 0.95), decay on matrices only

Every `eval_interval` steps (and at the end) the model is scored on the same fixed validation batches,
`latest.npz` is written (and `best.npz` when the validation loss improved). A checkpoint holds
everything a run depends on: weights, AdamW moments, the batch sampler's and dropout's random states,
the configs and the tokenizer, so `resume` continues exactly where the run stopped: on the CPU a
resumed run logs the same losses, step for step, as one that never stopped.

Nothing here prints: progress goes to a `logger` object (`TrainLogger` is the silent default; the CLI
passes one that draws a progress bar), and one JSON line per log interval goes to `<out>/log.jsonl`.
On a GPU the loss and grad norm stay device scalars between log intervals: reading one as a Python
float waits for the GPU, so that happens once per interval, not once per step.

`train` runs with the fast layer (minimosaic.fast) on, unless config.plain: the same maths, faster. On a
GPU, a run without dropout or accumulation then records its step once as a CUDA graph and replays it
(fast/cuda_graph.py): the same arithmetic, without Python issuing each of the step's kernels again.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

import numpy as np

from . import backend, checkpoint, nn, optim
from .data import (DATASETS, EMBEDDED, BatchSampler, build_tokenizer, check_split_lengths, encode_dataset,
                   eval_batches, load_text, sequential_batches, tokenizer_from_spec)
from .checkpoint import checkpoint_path
from .errors import MinimosaicError
from .models import ModelConfig, build_model
from .precision import PRECISIONS, LossScaler, autocast
from .tensor import no_grad

LATEST, BEST = "latest", "best"
LOG_FILE = "log.jsonl"


@dataclass
class TrainConfig:
    """Everything about a run that is not the model: data, optimisation, evaluation, where it goes."""
    # data
    data: str | None = None          # a file path, a dataset name, or None for the embedded stories
    level: str = "char"              # 'char' or 'token'
    tokenizer: str = "bpe"           # level 'token': 'bpe' (trained on the text) or a tiktoken name
    vocab_size: int = 1024           # BPE vocabulary to learn (the model's comes from the tokenizer)
    # optimisation
    steps: int = 2000
    batch_size: int = 32
    grad_accum: int = 1              # micro-batches per step: effective batch = batch_size * grad_accum
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0           # 0 turns clipping off
    seed: int = 1337
    # evaluation and logging
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    device: str = "cpu"
    tf32: bool = False               # GPU: float32 matmuls on TF32 tensor cores (backend.set_tf32)
    cuda_graph: bool = True          # GPU: replay the step from a CUDA graph when it can (fast/cuda_graph.py)
    plain: bool = False              # run the plain core, without the fast layer (minimosaic.fast)
    precision: str = "fp32"          # 'fp32'; 'fp16': float16 products, float32 master weights, loss scaling;
                                     # 'fp64': weights and every op in float64 (exact comparisons)
    time_limit: float = 0.0          # seconds of training in this invocation after which it stops (0: none)
    out: str = "runs/run"

    def validate(self):
        at_least = dict(steps=1, batch_size=1, grad_accum=1, eval_interval=1, eval_batches=1,
                        log_interval=1, warmup=0, vocab_size=257)
        for name, low in at_least.items():
            if int(getattr(self, name)) < low:
                raise MinimosaicError(f"{name.replace('_', '-')} is {getattr(self, name)}: it must be "
                                      f"at least {low}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "time_limit"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise MinimosaicError(f"{name.replace('_', '-')} is {value}: it must be a number >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise MinimosaicError(f"seed is {self.seed}: it must be an integer >= 0")
        if self.lr == 0:
            raise MinimosaicError("lr is 0: nothing would be learned; use e.g. --lr 1e-3")
        if self.precision not in PRECISIONS:
            raise MinimosaicError(f"unknown precision {self.precision!r}: use fp32, fp16 or fp64")
        if self.precision == "bf16":
            raise MinimosaicError("--precision bf16 is not written yet (NumPy and CuPy have no bfloat16 type): "
                                  "use fp16, which has loss scaling, or fp32")
        if self.level not in ("char", "token"):
            raise MinimosaicError(f"unknown level {self.level!r}: use 'char' or 'token'")
        self.device = backend.normalize_device(self.device)
        backend.array_module(self.device)  # a clear error now if the GPU is asked for and missing
        return self


# Presets: a model size with the training settings that suit it. 'char-tiny' is the default: it trains
# on two CPU cores in a few minutes; the others want a GPU (or patience).
PRESETS = {
    "char-tiny": dict(level="char", n_layer=3, n_head=4, n_embd=96, block_size=64, pmem_size=336,
                      batch_size=16, steps=2000, lr=3e-3, min_lr=3e-4, warmup=100, eval_interval=250,
                      eval_batches=10, log_interval=25),
    "char-small": dict(level="char", n_layer=4, n_head=4, n_embd=128, block_size=128, pmem_size=512,
                       batch_size=32, steps=5000, lr=1e-3, min_lr=1e-4, warmup=200, eval_interval=500),
    "char-medium": dict(level="char", n_layer=6, n_head=6, n_embd=384, block_size=256, pmem_size=1536,
                        batch_size=16, steps=5000, lr=1e-3, min_lr=1e-4, warmup=200, dropout=0.2,
                        eval_interval=500),
    "tok-small": dict(level="token", tokenizer="bpe", vocab_size=8192, n_layer=4, n_head=4, n_embd=256,
                      block_size=256, pmem_size=1024, batch_size=8, steps=5000, lr=6e-4, min_lr=6e-5,
                      warmup=200, eval_interval=500),
}
DEFAULT_PRESET = {"char": "char-tiny", "token": "tok-small"}

_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}  # vocab: from the tokenizer
_TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def resolve_config(preset=None, overrides=None, base=None):
    """(ModelConfig, TrainConfig) from, in increasing priority: the defaults, `base` (a dict such as a
    checkpoint's configs merged), the preset, then `overrides` (None values are ignored).

    The model's vocab_size is left for the tokenizer to decide (see `prepare_data`).
    """
    values = dict(base or {})
    if preset is not None:
        if preset not in PRESETS:
            raise MinimosaicError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - _MODEL_KEYS - _TRAIN_KEYS - {"vocab_size"})
    if unknown:
        raise MinimosaicError(f"unknown setting(s) {', '.join(unknown)}: known are "
                              f"{', '.join(sorted(_MODEL_KEYS | _TRAIN_KEYS))}")
    model_config = ModelConfig(**{k: v for k, v in values.items() if k in _MODEL_KEYS})
    train_config = TrainConfig(**{k: v for k, v in values.items() if k in _TRAIN_KEYS})
    return model_config, train_config.validate()


@dataclass
class Data:
    """A tokenized corpus: the tokenizer, both splits of ids, and where the text came from."""
    tokenizer: object
    train_ids: np.ndarray
    val_ids: np.ndarray
    name: str            # 'stories', 'shakespeare', or a file's stem
    source: str | None   # what was asked for (a path or a name; None for the embedded stories)
    text_sha256: str     # so a resumed run can tell that it is given the same text
    notes: list = dataclasses.field(default_factory=list)  # what the user should know (a rebuilt cache)


def default_out(model, level, data):
    """runs/<model>-<level>-<data name>: where a run goes when --out is not given."""
    name = EMBEDDED if data is None else (data if data in DATASETS else Path(data).stem)
    return str(Path("runs") / f"{model}-{level}-{name}")


def resolve_run(preset=None, overrides=None, resume=False, writes=True):
    """(ModelConfig, TrainConfig, checkpoint meta or None) for the run a user asks for, checked before
    any data is loaded (hand the meta to `prepare_data`).

    A new run: the preset (by default the level's) and the overrides; its `out` must not hold a run.
    resume: the run saved in overrides['out'] (or the default folder), with the overrides it allows
    (RESUME_MAY_CHANGE; anything else that differs from the checkpoint is an error); the meta returned
    holds its tokenizer and the fingerprint of its training text.
    The model's vocab_size comes from the tokenizer (`prepare_data`).
    writes False (the ranks of a data-parallel job other than 0): the run folder is neither locked nor
    created here; rank 0 does that.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    out = given.get("out") or default_out(given.get("model", "mosaic"), given.get("level", "char"),
                                          given.get("data"))
    if writes and Path(out).expanduser().is_dir():
        with run_folder_lock(Path(out).expanduser()):  # a run training there now: say so first
            pass
    if resume:
        meta = read_run_meta(out)
        saved_model = {k: v for k, v in meta["model_config"].items() if k != "vocab_size"}
        model_config, config = resolve_config(preset, dict(given, out=out),
                                              base={**meta["train_config"], **saved_model})
        model_config.vocab_size = meta["model_config"]["vocab_size"]
        check_resume(meta, model_config, config, directory=out)
        return model_config, config, meta
    model_config, config = resolve_config(preset or DEFAULT_PRESET[given.get("level", "char")], given)
    if config.level == "char" and ("vocab_size" in given or "tokenizer" in given):
        raise MinimosaicError("--vocab-size and --tokenizer apply to --level token only: "
                              "drop them, or add --level token")
    config.out = given.get("out") or default_out(model_config.model, config.level, config.data)
    model_config.validate()
    if writes:
        prepare_out(config.out, resume=False)
    return model_config, config, None


def prepare_data(config, data_dir=None, tokenizer=None, resume_meta=None):
    """Load the text of `config.data`, build (or reuse) the tokenizer and encode both splits.
    resume_meta: the meta of the checkpoint a run resumes; its tokenizer is reused, and a different
    training text is refused before anything is encoded."""
    text, name = load_text(config.data, data_dir)
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if resume_meta is not None:
        saved = resume_meta["dataset"]
        if sha != saved["text_sha256"]:
            raise MinimosaicError(f"cannot resume {config.out}: the training text changed ({saved['name']!r} in "
                                  f"the checkpoint, {name!r} now, and their contents differ). Pass the --data of "
                                  f"the run you resume, or train from scratch into a new --out")
        tokenizer = tokenizer_from_spec(resume_meta["tokenizer"])
    if tokenizer is None:
        tokenizer = build_tokenizer(config.level, text, config.tokenizer, config.vocab_size)
    notes = []
    train_ids, val_ids = encode_dataset(text, tokenizer, notes=notes)  # cached in the user's cache folder
    return Data(tokenizer, train_ids, val_ids, name, config.data, sha, notes)


class TrainLogger:
    """What `train` reports to. Subclass it to show progress; every method may be left out."""

    def begin(self, info):
        """Once before the first step. info: model_config, train_config (dicts), n_params, start_step,
        dataset, train_tokens, val_tokens, tokens_per_step, ranks and world (the data-parallel job, in
        words), step_mode ('CUDA graph' or 'eager (why)'),
        core ('fast layer' or 'plain core'), stale_files and stale_bytes (temporaries of an interrupted
        save that were removed)."""

    def log(self, record):
        """One record per log interval: step, loss, lr, grad_norm, tokens, tokens_per_s, elapsed_s,
        and val_loss at evaluation steps (the same dict that goes to log.jsonl)."""

    def checkpoint(self, path, step):
        """A checkpoint was written."""

    def end(self, result):
        """After the last step (or an interruption), with the TrainResult."""


@dataclass
class TrainResult:
    model: object
    step: int
    val_loss: float | None
    best_val_loss: float | None
    out: Path
    interrupted: bool = False
    elapsed_s: float = 0.0
    start_step: int = 0              # the step this invocation started at (a resumed run: its checkpoint's)
    time_limited: bool = False       # stopped by config.time_limit before config.steps


def evaluate(model, batches, device):
    """Mean loss over fixed batches, with dropout off and no graph; the model goes back to train mode."""
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            total = sum(model.loss(backend.to_device(x, device), backend.to_device(y, device)).data
                        for x, y in batches)
    finally:
        model.train(was_training)
    return float(total) / len(batches)


def loss_by_position(model, ids, block_size, batch_size, device, max_batches=None):
    """(mean loss, loss at each position of the context window (T,)) over non-overlapping windows of `ids`.

    The per-position curve is the paper's in-context-learning plot: a model that uses its context
    predicts later positions better than early ones.
    """
    model.eval()
    sums, count = np.zeros(block_size), 0
    with no_grad():
        for i, (x, y) in enumerate(sequential_batches(ids, block_size, batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            logits = model(backend.to_device(x, device)).data  # (B, T, V)
            xp = backend.get_array_module(logits)
            logits = logits.astype(xp.float32)
            m = logits.max(axis=-1, keepdims=True)
            logsumexp = (m + xp.log(xp.exp(logits - m).sum(axis=-1, keepdims=True)))[..., 0]  # (B, T)
            target = xp.take_along_axis(logits, backend.to_device(y, device)[..., None], axis=-1)[..., 0]
            losses = backend.asnumpy(logsumexp - target).astype(np.float64)  # (B, T)
            sums += losses.sum(axis=0)
            count += len(losses)
    per_position = sums / max(count, 1)
    return float(per_position.mean()), per_position


def training_step(model, optimizer, batches, lr, grad_clip=None, precision="fp32", scaler=None, world=None):
    """One optimizer step: forward, loss, backward (summed over the micro-batches, each weighted
    1 / len(batches)), [average the gradients over the ranks], clip the global gradient norm to
    grad_clip, AdamW at rate lr.

    batches: [(x, y), ...] id arrays. grad_clip None skips the norm (it is then None); 0 measures it but
    does not clip. precision: the mixed-precision policy of the forward and backward (precision.py);
    with a LossScaler the loss is scaled before backward and the gradients unscaled after, and a step
    whose gradients overflowed is skipped (no update; its norm comes back as None).
    world: a data-parallel job's World (fast/distributed.py): batches are this rank's rows, and the
    gradients and the loss are averaged over the ranks before anything reads them.
    Returns (mean loss, gradient norm before clipping) as device scalars (no host sync without a scaler).
    The gradients stay in the parameters until the next step clears them.
    """
    model.zero_grad()
    loss_sum = 0.0
    weight = (1.0 / len(batches)) * (scaler.scale if scaler is not None else 1.0)
    def overflow_expected():  # an overflow is what the scaler looks for: no warning about it
        return np.errstate(over="ignore", invalid="ignore") if scaler else contextlib.nullcontext()
    with autocast(precision), overflow_expected():
        for x, y in batches:
            loss = model.loss(x, y)
            (loss * weight if weight != 1.0 else loss).backward()
            loss_sum = loss_sum + loss.data
    mean_loss = loss_sum / len(batches) if len(batches) > 1 else loss_sum
    if world is not None:
        mean_loss = world.average_gradients(model.parameters(), mean_loss)
    if scaler is not None:
        with overflow_expected():
            finite = scaler.unscale(model.parameters())
        scaler.update(finite)
        if not finite:  # an overflow: skip this update (the scale is halved for the next step)
            model.zero_grad()
            return mean_loss, None
    norm = None if grad_clip is None else optim.clip_grad_norm(model.parameters(), grad_clip)
    optimizer.step(lr)
    return mean_loss, norm


# ----------------------------------------------------------------------------------------------------
# checkpoints


def _rng_state():
    """NumPy's global generator (dropout masks on the CPU) as JSON."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_rng_state(state):
    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _arrays(model, optimizer=None):
    """Host copies of the weights (and AdamW moments), so a checkpoint loads on any device."""
    arrays = {f"model.{k}": backend.asnumpy(v) for k, v in model.state_dict().items()}
    if optimizer is not None:
        for i, (m, v) in enumerate(zip(optimizer.m, optimizer.v)):
            arrays[f"optim.m.{i}"], arrays[f"optim.v.{i}"] = backend.asnumpy(m), backend.asnumpy(v)
    return arrays


def _model_state(arrays):
    return {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}


def load_run(directory, name=None, device="cpu"):
    """(model, tokenizer, meta) from `<directory>/<name>.npz`; name None: best if there, else latest."""
    directory = Path(directory)
    if name is None:
        name = BEST if checkpoint_path(directory, BEST).exists() else LATEST
    if name not in (BEST, LATEST):
        raise MinimosaicError(f"unknown checkpoint {name!r}: use --checkpoint {BEST} or --checkpoint {LATEST}")
    if not checkpoint_path(directory, name).exists():
        raise MinimosaicError(f"no checkpoint {checkpoint_path(directory, name)}: train one first with "
                              f"`minimosaic train --out {directory}`")
    arrays, meta = checkpoint.load_checkpoint(directory, name)
    model_config = ModelConfig.from_dict(meta["model_config"])
    model = build_model(model_config)
    model.load_state_dict(_model_state(arrays))
    model.to(device).eval()
    return model, tokenizer_from_spec(meta["tokenizer"]), meta


def read_run_meta(directory):
    """The meta of `<directory>/latest.npz` (configs, tokenizer, step...)."""
    return checkpoint.load_checkpoint(directory, LATEST)[1]


# Settings a resumed run may change; anything else would make it a different run.
RESUME_MAY_CHANGE = {"steps", "eval_interval", "eval_batches", "log_interval", "device", "out", "data",
                     "tf32", "cuda_graph", "time_limit", "plain"}


def _json_equal(a, b):
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_resume(meta, model_config, config, data=None, directory=None):
    """MinimosaicError naming every setting in which this run differs from the checkpoint it resumes."""
    differences = []
    for label, saved, asked in (("model", meta["model_config"], model_config.to_dict()),
                                ("train", meta["train_config"], dataclasses.asdict(config))):
        for key in asked:
            if key in RESUME_MAY_CHANGE or key not in saved or _json_equal(saved[key], asked[key]):
                continue
            name = "the vocabulary size" if (label, key) == ("model", "vocab_size") else key
            differences.append(f"{name} {saved[key]!r} in the checkpoint, {asked[key]!r} asked")
    if data is not None:
        if not _json_equal(meta["tokenizer"], data.tokenizer.spec()):
            differences.append(f"the tokenizer ({meta['tokenizer'].get('kind')} with "
                               f"{meta['model_config'].get('vocab_size')} tokens in the checkpoint, "
                               f"{data.tokenizer.spec().get('kind')} with {data.tokenizer.vocab_size} asked)")
        if meta["dataset"]["text_sha256"] != data.text_sha256:
            differences.append(f"the training text ({meta['dataset']['name']!r} in the checkpoint, "
                               f"{data.name!r} asked, and their contents differ)")
    if differences:
        where = directory or config.out
        raise MinimosaicError(f"cannot resume {where}: {'; '.join(differences)}. Pass the settings of the "
                              f"run you resume, or train from scratch into a new --out")


def prepare_out(out, resume=False):
    """Create the run folder and check it can be written; refuse to start a new run over an old one."""
    out = Path(out).expanduser()
    latest = checkpoint_path(out, LATEST)
    if resume and not latest.exists():
        raise MinimosaicError(f"nothing to resume in {out}: there is no {latest.name}; "
                              f"train without --resume first")
    if not resume and latest.exists():
        raise MinimosaicError(f"{out} already holds a run ({latest.name}): add --resume to continue it, "
                              f"or pick a new --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / LOG_FILE, "a"):
            pass
    except OSError as e:
        raise MinimosaicError(f"cannot write to output folder {out} ({e.strerror or e}): "
                              f"pick another --out") from None
    return out


LOCK_FILE = "run.lock"


@contextlib.contextmanager
def run_folder_lock(out):
    """Hold an OS lock on <out>/run.lock while a run trains: a second run on the same folder is refused
    (MinimosaicError naming the holder's PID). The OS drops the lock when the holder dies, even by
    kill -9, so no stale lock ever blocks a resume. (No lock where there is no fcntl, i.e. Windows.)"""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_FILE, "a+")
    except OSError as e:
        raise MinimosaicError(f"cannot write to output folder {out} ({e.strerror or e}): "
                              f"pick another --out") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise MinimosaicError(f"{out} is in use by another training run (PID {holder}): wait for it "
                                      f"to finish or stop it, or pick another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing drops the lock


def remove_stale_temporaries(out):
    """Delete what a killed run left behind: half-written checkpoints (.latest.npz.*.tmp, .best.npz.*.tmp)
    and the log's rewrite (log.tmp). Only call it while holding the folder's lock. Returns (files, bytes)."""
    out = Path(out)
    stale = [p for name in (LATEST, BEST) for p in out.glob(f".{name}.npz.*.tmp")]
    stale += [p for p in [out / "log.tmp"] if p.exists()]
    freed = 0
    for path in stale:
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            path.unlink()
            freed += size
    return len(stale), freed


def _keep_log_until(path, step):
    """Drop log records after `step` (written after the checkpoint a run resumes from)."""
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    if kept == lines:
        return  # nothing to drop: no write
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MinimosaicError(f"cannot rewrite {path} ({e.strerror or e}): free some space on that disk, "
                              f"then resume again") from None


@contextlib.contextmanager
def _deferred_interrupt():
    """Ctrl-C sets a flag that the loop reads between steps, so the checkpoint it then writes never
    holds half an optimizer update. A second Ctrl-C stops at once."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------------
# the loop


def train(model_config, config, data, resume=False, logger=None, world=None):
    """Train a model on `data` (see `prepare_data`) and return a TrainResult.

    resume: continue the run saved in `config.out` (latest.npz), which must have the same settings
    except those in RESUME_MAY_CHANGE. Without resume, `config.out` must not hold a run already.
    The fast layer is on during the run unless config.plain; afterwards it is as it was.
    world: the data-parallel job this process is one rank of (fast/distributed.py; None: one process).
    Every rank calls train with the same arguments; rank 0 alone writes the run folder and reports to
    the logger. config.batch_size is the whole step's batch, cut into equal row slices among the ranks.
    """
    from . import fast
    from .fast.distributed import World

    world = world or World()
    with contextlib.ExitStack() as stack:
        with world.collective_errors():  # an error on any rank stops every rank, with its message
            config.validate()
            world.check_batch(config.batch_size)
            if world.is_root:
                stack.enter_context(run_folder_lock(Path(config.out).expanduser()))
        stack.enter_context(fast.enabled(not (config.plain or fast.plain_requested())))
        return _train(model_config, config, data, resume, (logger or TrainLogger()) if world.is_root
                      else TrainLogger(), world)


def _train(model_config, config, data, resume, logger, world):
    from . import fast
    from .fast.cuda_graph import GraphedTrainingStep, why_not_captured

    with world.collective_errors():
        model_config.validate()
        if model_config.vocab_size != data.tokenizer.vocab_size:
            raise MinimosaicError(f"the model's vocab_size {model_config.vocab_size} differs from the "
                                  f"tokenizer's {data.tokenizer.vocab_size}: set it from the tokenizer")
        device = config.device
        if device == "gpu":
            backend.set_tf32(config.tf32)
        check_split_lengths(data.train_ids, data.val_ids, model_config.block_size)
        if world.is_root:  # only rank 0 writes the run folder
            out = prepare_out(config.out, resume)
            stale_files, stale_bytes = remove_stale_temporaries(out)
        else:
            out, stale_files, stale_bytes = Path(config.out).expanduser(), 0, 0
            if resume and not checkpoint_path(out, LATEST).exists():
                raise MinimosaicError(f"rank {world.rank} cannot read {checkpoint_path(out, LATEST)}: every rank "
                                      f"reads the checkpoint it resumes (on several machines, a shared folder)")
        nn.manual_seed(config.seed)
        model = build_model(model_config).to(device, dtype=np.float64 if config.precision == "fp64" else None)
        params = model.named_parameters()
        optimizer = optim.AdamW(optim.weight_decay_groups(params, config.weight_decay), lr=config.lr,
                                betas=(0.9, 0.95), weight_decay=config.weight_decay)
        schedule = optim.CosineSchedule(config.lr, config.min_lr, config.warmup, config.steps)
        sampler = BatchSampler(data.train_ids, model_config.block_size, config.batch_size, seed=config.seed)
        val_batches = [world.shard(x, y) for x, y in eval_batches(data.val_ids, model_config.block_size,
                                                                 config.batch_size, config.eval_batches)]
        step, best_val, val_loss, elapsed = 0, math.inf, None, 0.0
        scaler = LossScaler() if config.precision == "fp16" else None

        if resume:
            arrays, meta = checkpoint.load_checkpoint(out, LATEST)
            check_resume(meta, model_config, config, data, out)
            model.load_state_dict(_model_state(arrays))
            optimizer.load_state_dict({"steps": meta["optimizer_steps"],
                                       "m": [arrays[f"optim.m.{i}"] for i in range(len(optimizer.m))],
                                       "v": [arrays[f"optim.v.{i}"] for i in range(len(optimizer.v))]})
            sampler.load_state(meta["sampler_state"])
            if scaler is not None and meta.get("loss_scaler"):
                scaler.load_state(meta["loss_scaler"])
            _set_rng_state(meta["rng_state"])
            if device == "gpu":  # CuPy's generator state is not saved: a fresh, reproducible stream
                backend.array_module(device).random.seed(config.seed + meta["step"])
            step, elapsed = meta["step"], meta["elapsed_s"]
            best_val = meta["best_val_loss"] if meta["best_val_loss"] is not None else math.inf
            val_loss = meta.get("val_loss")
            if world.is_root:
                _keep_log_until(out / LOG_FILE, step)
        elif world.is_root:
            (out / LOG_FILE).write_text("")  # a log without a checkpoint is from a run that died young

    world.broadcast_parameters(model.parameters())  # one start everywhere, checked to be one
    world.check_same(dict(model=model_config.to_dict(), train=dataclasses.asdict(config), step=step,
                          tokenizer=data.tokenizer.spec(), text=data.text_sha256),
                     [p.data for p in model.parameters()] + list(optimizer.m) + list(optimizer.v))
    latest = checkpoint_path(out, LATEST)

    tokens_per_step = config.batch_size * config.grad_accum * model_config.block_size
    meta_common = dict(model_config=model_config.to_dict(), train_config=dataclasses.asdict(config),
                       tokenizer=data.tokenizer.spec(), n_params=int(model.num_parameters()),
                       dataset=dict(name=data.name, source=data.source, text_sha256=data.text_sha256))
    graphed = None  # the step as a CUDA graph, where it can be one
    why_eager = "--no-cuda-graph" if not config.cuda_graph else why_not_captured(
        device, model_config.dropout, config.grad_accum, config.precision, world.size)
    if why_eager is None:
        graphed = GraphedTrainingStep(model, optimizer, config.grad_clip)
    logger.begin(dict(step_mode="CUDA graph" if graphed else f"eager ({why_eager})",
                      core="fast layer" if fast.is_enabled() else "plain core",
                      stale_files=stale_files, stale_bytes=stale_bytes,
                      model_config=meta_common["model_config"], train_config=meta_common["train_config"],
                      n_params=meta_common["n_params"], start_step=step, dataset=data.name,
                      train_tokens=len(data.train_ids), val_tokens=len(data.val_ids),
                      tokens_per_step=tokens_per_step, ranks=world.size, world=world.describe()))

    def save(name, with_optimizer=True):
        if not world.is_root:
            return
        meta = dict(meta_common, step=step, val_loss=val_loss,
                    elapsed_s=elapsed + time.perf_counter() - loop_start,
                    best_val_loss=None if best_val == math.inf else best_val,
                    optimizer_steps=optimizer.steps, rng_state=_rng_state(), sampler_state=sampler.state(),
                    loss_scaler=None if scaler is None else scaler.state())
        path = checkpoint.save_checkpoint(out, name, _arrays(model, optimizer if with_optimizer else None),
                                          meta)
        logger.checkpoint(path, step)

    pending = []  # (step, loss, grad_norm, lr) since the last record; loss and norm are device scalars

    def summarize():
        """One log record for the pending steps (one host sync); stop if a loss or norm is not finite."""
        nonlocal pending
        xp = backend.get_array_module(pending[0][1])
        skipped = [norm is None for _, _, norm, _ in pending]  # steps the loss scaler skipped (overflow)
        values = backend.asnumpy(xp.stack([xp.asarray(math.nan if v is None else v, dtype=xp.float32)
                                           for _, loss, norm, _ in pending for v in (loss, norm)]))
        values = values.astype(np.float64).reshape(-1, 2)
        for (s, *_), (loss, norm), was_skipped in zip(pending, values, skipped):
            if not (math.isfinite(loss) and (was_skipped or math.isfinite(norm))):
                what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {norm}"
                raise MinimosaicError(f"{what} at step {s}: lower --lr or raise --warmup; {last_good()}")
        now = time.perf_counter()
        norms = values[~np.asarray(skipped), 1]
        record = dict(step=step, loss=float(values[:, 0].mean()), lr=pending[-1][3],
                      grad_norm=float(norms.mean()) if len(norms) else None, tokens=step * tokens_per_step,
                      tokens_per_s=len(pending) * tokens_per_step / max(now - interval_start, 1e-9),
                      elapsed_s=elapsed + now - loop_start)
        if scaler is not None:
            record.update(loss_scale=scaler.scale, skipped_steps=scaler.skipped_steps)
        pending = []
        return record

    def last_good():
        return f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint was saved yet"

    def write(record):
        if not world.is_root:
            return
        try:
            with open(out / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: keep the step just trained if a checkpoint still fits
            try:
                save(LATEST)
                kept = f"saved step {step} in {latest}"
            except MinimosaicError:
                kept = f"no checkpoint fits either; {last_good()}"
            raise MinimosaicError(f"cannot append to {out / LOG_FILE} ({e.strerror or e}): {kept}. Free some "
                                  f"space, then continue with --resume") from None
        logger.log(record)

    model.train()
    interrupted, time_limited, start_step = False, False, step
    with _deferred_interrupt() as interrupt:
        loop_start = interval_start = time.perf_counter()
        while step < config.steps:
            lr = schedule(step)
            if graphed is not None:
                loss, grad_norm = graphed(*sampler.next_batch(), lr)
                loss_mean, grad_norm = loss.copy(), grad_norm.copy()  # the next replay overwrites both
            else:  # host batches: the ids are checked there, then copied over
                batches = [world.shard(*sampler.next_batch()) for _ in range(config.grad_accum)]
                loss_mean, grad_norm = training_step(model, optimizer, batches, lr, config.grad_clip,
                                                     config.precision, scaler, world)
            step += 1
            pending.append((step, loss_mean, grad_norm, lr))
            out_of_time = bool(config.time_limit) and step < config.steps and (
                time.perf_counter() - loop_start >= config.time_limit)  # a fresh budget per invocation
            if config.time_limit:
                out_of_time, = world.any(out_of_time)  # every rank stops at the same step
            evaluating = step % config.eval_interval == 0 or step == config.steps or out_of_time
            if evaluating or step % config.log_interval == 0:
                record = summarize()  # before anything is saved: a non-finite loss never reaches a checkpoint
                if evaluating:
                    val_loss = world.average(evaluate(model, val_batches, device))  # this rank's rows
                    if not math.isfinite(val_loss):
                        raise MinimosaicError(f"validation loss became {val_loss} at step {step}: lower "
                                              f"--lr or raise --warmup; {last_good()}")
                    improved, best_val = val_loss < best_val, min(best_val, val_loss)
                    record.update(val_loss=val_loss, best_val_loss=best_val)
                write(record)
                if evaluating:
                    save(LATEST)
                    if improved:
                        save(BEST, with_optimizer=False)
                interval_start = time.perf_counter()  # evaluation and saving do not count as throughput
            interrupted, = world.any(interrupt["set"])
            if interrupted:  # Ctrl-C (on any rank): finish the step, log and save it, stop
                if pending:
                    write(summarize())
                if not evaluating:
                    save(LATEST)
                break
            if out_of_time:  # --time-limit: this step was evaluated and saved above
                time_limited = True
                break
    elapsed += time.perf_counter() - loop_start
    result = TrainResult(model, step, val_loss, None if best_val == math.inf else best_val, out,
                         interrupted, elapsed, start_step, time_limited)
    logger.end(result)
    return result


def read_log(directory):
    """The records of `<directory>/log.jsonl` (lines cut short by a crash are skipped)."""
    path = Path(directory) / LOG_FILE
    if not path.exists():
        raise MinimosaicError(f"no {LOG_FILE} in {directory}: is it a run folder written by "
                              f"`minimosaic train`?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
