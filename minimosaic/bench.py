"""`minimosaic bench`: how fast is a training step, how much memory does it take, and how does it compare
with the official PyTorch code?

For a preset (plus overrides) and each model asked for, a child process builds the model, times the
training step (forward + cross entropy + backward + AdamW) on random token ids, and reports

  ms/step        median over `steps` timed steps after `warmup` untimed ones, with the IQR and min/max;
                 beside it the median process CPU time per step (steadier on a busy machine)
  tokens/s       batch_size * block_size / median step time
  GFLOP/s        model FLOPs per step (`train_step_flops`, counted analytically) / median step time,
                 and its fraction of a float32 matmul peak: the best its side's children measured
  memory         peak RSS of the child (CPU), or the GPU memory high-water (GPU)
  generation     tokens/s of model.generate with and without the incremental cache

Each model runs in its own child so memory peaks do not mix and every side starts from a cold process.
`reference_file` / `reference_gpt_file` name copies of the official nanoMosaics mosaic_model.py /
gpt_model.py (downloaded by the user, never shipped here); they are imported by path with importlib in a
child that runs them with torch (fp32, eager, torch.optim.AdamW) under the same protocol.

Fairness: both sides use the same number of CPU threads. By default that is what NumPy's BLAS would use
(OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS if set, else the usable cores); the children
get it through those variables and torch through torch.set_num_threads as well.

On a GPU the clocks are read only after synchronising the device, and the memory reported is the
allocator's high-water: CuPy's default memory pool total_bytes() (the pool keeps what it once held, so
its size at the end is the most it ever reserved) against torch.cuda.max_memory_reserved() (and
max_memory_allocated() beside it). Nothing here imports cupy or torch at module import time.
"""
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import backend
from .errors import MinimosaicError

# A benchmark fixes what training takes from the data: the vocabulary. Character presets get tiny
# Shakespeare's 65 characters; gpt2-small-like (for GPUs) has no training preset.
CHAR_VOCAB = 65
EXTRA_PRESETS = {
    "gpt2-small-like": dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, block_size=512,
                            batch_size=8, pmem_size=2688),
}
# What an override may set: the model sizes and the batch.
SETTINGS = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "pmem_size",
            "pmem_count", "dropout", "bias")
MODELS = ("mosaic", "gpt")


# ---------------------------------------------------------------- settings
def bench_presets():
    """{name: sizes}: the training presets (train.PRESETS) with a fixed vocabulary, and gpt2-small-like."""
    from .train import PRESETS as TRAIN_PRESETS

    presets = {}
    for name, preset in TRAIN_PRESETS.items():
        presets[name] = {key: preset.get(key) for key in
                         ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "pmem_size")}
        presets[name]["vocab_size"] = preset.get("vocab_size", CHAR_VOCAB)
    return {**presets, **EXTRA_PRESETS}


def resolve_settings(preset="char-small", overrides=None):
    """The preset's sizes with `overrides` applied; dropout 0 and bias False unless overridden."""
    presets = bench_presets()
    if preset not in presets:
        raise MinimosaicError(f"unknown bench preset {preset!r}: use one of {', '.join(presets)}")
    settings = dict(presets[preset], pmem_count=1, dropout=0.0, bias=False)
    for key, value in (overrides or {}).items():
        if key not in SETTINGS:
            raise MinimosaicError(f"unknown bench setting {key!r}: use one of {', '.join(SETTINGS)}")
        settings[key] = value
    if settings.get("pmem_size") is None:
        from .models import default_pmem_size
        settings["pmem_size"] = default_pmem_size(settings["n_embd"])
    return settings


def model_config(model_name, s):
    """The models.ModelConfig of `model_name` ('mosaic' or 'gpt') with the sizes of settings `s`."""
    from .models import ModelConfig
    return ModelConfig(model=model_name, **{k: s[k] for k in SETTINGS if k != "batch_size"})


def parse_overrides(items):
    """['n_layer=2', 'dropout=0.1', 'bias=true'] -> {'n_layer': 2, 'dropout': 0.1, 'bias': True}."""
    overrides = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SETTINGS:
            raise MinimosaicError(f"bad bench override {item!r}: write KEY=VALUE with KEY one of "
                                  f"{', '.join(SETTINGS)}")
        text = text.strip()
        if key == "bias":
            if text.lower() not in ("true", "false", "1", "0"):
                raise MinimosaicError(f"bad bench override {item!r}: bias is true or false")
            overrides[key] = text.lower() in ("true", "1")
            continue
        try:
            overrides[key] = float(text) if key == "dropout" else int(text)
        except ValueError:
            kind = "a number" if key == "dropout" else "an integer"
            raise MinimosaicError(f"bad bench override {item!r}: {key} must be {kind}") from None
    return overrides


def blas_threads():
    """How many threads NumPy's BLAS uses: the usual environment variables, else the usable cores."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- FLOPs
def forward_flops(model, s, dense=False):
    """FLOPs of one forward pass, term by term: {term: flops}.

    `s` holds the sizes (vocab_size V, n_layer L, n_head H, n_embd C, block_size T, batch_size B,
    pmem_size P, pmem_count); N = B T tokens. A matmul of an (m, k) by a (k, n) matrix costs 2 m k n.
    Only matmul-like work is counted: layer norms, softmaxes, exps, the GELU, embedding lookups and the
    optimizer are O(N C) or O(params) and left out (the usual convention, as in nanoGPT's MFU).

    mosaic, per layer (the structure of the paper's nanoMosaics code):
      projections    ContextMemory W_k, W_v, c_proj; PersistentMemory W_k, c_proj:  5 * 2 N C^2
      leaky_average  keys kbar_t = sum_{j<=t} exp(-beta (t - j)) k_j, in both memories; the model needs
                     only the recurrence kbar_t = exp(-beta) kbar_{t-1} + k_t: 2 * 2 N C
      context        kernel smoothing over the strictly past pairs j < t: the scores k_t.k_j and the
                     weighted sum of values, 2 * 2 B C T(T-1)/2
      persistent     scores against the P persistent keys and the weighted sum of P values,
                     2 * 2 N P C (times pmem_count)
    gpt, per layer:
      projections    qkv 2 N C 3C, c_proj 2 N C^2, MLP 2 * 2 N C 4C:  24 N C^2
      attention      scores q_t.k_j and weighted values over j <= t: 2 * 2 B C T(T+1)/2
    both: lm_head 2 N C V.   With P = 3.5 C a mosaic layer costs 24 N C^2 outside its T^2 terms, as GPT.

    So by default the T^2 terms count only the pairs a causal model uses (about half of T^2): the
    model's useful work, the same for any implementation. dense=True counts what a masked dense
    implementation executes instead: each T^2 product in full (2 B C T^2) and the leaky average as the
    dense (T, T) matmul the official code uses (2 B C T^2 per memory): what a matmul counter sees.
    """
    B, T, C, L = s["batch_size"], s["block_size"], s["n_embd"], s["n_layer"]
    N = B * T
    past = T * T if dense else T * (T - 1) // 2       # pairs j < t
    upto = T * T if dense else T * (T + 1) // 2       # pairs j <= t
    terms = {}
    if model == "mosaic":
        terms["projections"] = L * 5 * 2 * N * C * C
        terms["leaky_average"] = L * 2 * (2 * B * C * T * T if dense else 2 * N * C)
        terms["context_memory"] = L * 2 * 2 * B * C * past
        terms["persistent_memory"] = L * 2 * 2 * N * s["pmem_size"] * C * s.get("pmem_count", 1)
    elif model == "gpt":
        terms["projections"] = L * 24 * N * C * C
        terms["attention"] = L * 2 * 2 * B * C * upto
    else:
        raise MinimosaicError(f"unknown model {model!r}: use 'mosaic' or 'gpt'")
    terms["lm_head"] = 2 * N * C * s["vocab_size"]
    return terms


def train_step_flops(model, s, dense=False):
    """FLOPs of one training step: forward + backward, backward = 2 x forward (each matmul's gradient
    needs two matmuls of the same size, one for each operand), so 3 x forward_flops."""
    return 3 * sum(forward_flops(model, s, dense).values())


# ---------------------------------------------------------------- measuring (runs inside a child)
def _sync(xp):
    if xp is not np:
        xp.cuda.Device().synchronize()


def _proc_status_mb(field):
    """A memory field of /proc/self/status ('VmHWM', 'VmRSS') in MiB, or None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb():
    """Peak resident set size of this process in MiB (VmHWM; ru_maxrss where /proc is missing)."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _rss_now_mb():
    return _proc_status_mb("VmRSS")


def _summary(times, tokens_per_step, flops):
    """Median, quartiles and extremes of the step times, and the rates they give.

    times: (wall seconds, process CPU seconds) per step. CPU time counts every thread of this process
    and not the time others' processes took the cores, so on a busy machine it is the steadier number
    (with one thread it is close to the wall time of a quiet machine; spinning BLAS threads inflate it).
    """
    ms = sorted(1000 * wall for wall, _ in times)
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    median = statistics.median(ms)
    return dict(ms_median=median, ms_q1=q1, ms_q3=q3, ms_min=ms[0], ms_max=ms[-1], steps=len(ms),
                cpu_ms_median=statistics.median(1000 * cpu for _, cpu in times),
                tokens_per_s=tokens_per_step / (median / 1000),
                gflops=flops / (median / 1000) / 1e9)


def best_seconds(fn, repeats=5, sync=lambda: None):
    """The shortest wall time of `repeats` calls of fn(), after one untimed call; sync() waits for the
    device after each call."""
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_gflops(matmul, make, sync, n, repeats=5):
    """Best-of-`repeats` GFLOP/s of an (n, n) @ (n, n) float32 matmul (2 n^3 FLOPs)."""
    a, b = make(n), make(n)
    return 2 * n**3 / best_seconds(lambda: matmul(a, b), repeats, sync) / 1e9


_wait_for_turn = None   # in a lockstep child (run_bench(lockstep=True)): waits for its turn to step


def time_steps(step, sync, steps, warmup):
    """Run step(i) warmup + steps times; (wall, process CPU) seconds of the last `steps`, synchronised."""
    times = []
    for i in range(warmup + steps):
        if _wait_for_turn is not None:
            _wait_for_turn()
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        step(i)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def _random_batches(s, count, seed=0):
    """`count` random (x, y) id batches of shape (B, T) (host int64)."""
    rng = np.random.default_rng(seed)
    shape = (count, 2, s["batch_size"], s["block_size"])
    return rng.integers(0, s["vocab_size"], size=shape, dtype=np.int64)


def _random_matrix(n):
    return np.random.default_rng(n).standard_normal((n, n), np.float32)


def _generation_lengths(s, gen_context):
    context = min(gen_context, s["block_size"])
    prompt = max(1, context // 2)
    return prompt, context - prompt


def model_and_optimizer(model_name, s, device="cpu"):
    """The model every timing of ours uses (nn seed 0, training mode, on `device`) and its AdamW (weight
    decay 0.1 where weight_decay_groups puts it, lr 1e-4): bench, op_profile, ab_steps, data_parallel."""
    from . import models, nn, optim

    nn.manual_seed(0)
    model = models.build_model(model_config(model_name, s)).to(device)
    model.train()
    return model, optim.AdamW(optim.weight_decay_groups(model.named_parameters(), 0.1), lr=1e-4)


def measure_ours(model_name, s, device="cpu", steps=15, warmup=3, generation=True, gen_context=512,
                 tf32=False, cuda_graph=True, plain=False):
    """Time our model (built with models.build_model) under the bench protocol; a result dict.

    The step is train.training_step without clipping (as the official code's step). With the fast layer
    on (not plain) and on a GPU with cuda_graph, it is replayed from a CUDA graph (fast/cuda_graph.py)
    after one eager step and the capture, both in the warm-up (which then has at least 2 steps), unless
    why_not_captured gives a reason (then it runs eagerly). plain: the plain core, no fast layer."""
    from . import fast
    from .fast.cuda_graph import GraphedTrainingStep, why_not_captured
    from .tensor import no_grad
    from .train import training_step

    if not plain:
        fast.enable()
    xp = backend.array_module(device)
    if xp is not np:
        backend.set_tf32(tf32)
    sync = lambda: _sync(xp)  # noqa: E731
    rss_base = _rss_now_mb()
    model, opt = model_and_optimizer(model_name, s, device)
    graphed = cuda_graph and why_not_captured(backend.normalize_device(device), 0.0, 1) is None
    warmup = max(warmup, 2) if graphed else warmup
    batches = backend.to_device(_random_batches(s, warmup + steps), device)
    run_step = GraphedTrainingStep(model, opt) if graphed else None
    losses = []

    def step(i):  # forward, backward, AdamW: the official code's step (no clipping)
        if run_step is not None:
            loss, _ = run_step(batches[i, 0], batches[i, 1], 1e-4)
        else:
            loss, _ = training_step(model, opt, [(batches[i, 0], batches[i, 1])], 1e-4)
        if i in (0, warmup + steps - 1):
            losses.append(float(loss.item()))

    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()
    times = time_steps(step, sync, steps, warmup)
    flops = train_step_flops(model_name, s)
    label = f"{model_name} (minimosaic{', plain' if plain else ''}{', CUDA graph' if graphed else ''})"
    result = dict(side="ours", model=model_name, label=label, cuda_graph=graphed, plain=plain,
                  params=int(model.num_parameters()), flops_per_step=flops,
                  loss_first=losses[0], loss_last=losses[-1],
                  **_summary(times, s["batch_size"] * s["block_size"], flops))
    if xp is np:
        result.update(peak_rss_mb=_peak_rss_mb(), base_rss_mb=rss_base)
    else:
        held = xp.get_default_memory_pool().total_bytes() + (run_step.memory_bytes() if run_step else 0)
        result.update(gpu_mem_mb=held / 2**20)
    n = 4096 if xp is not np else 2048
    result["peak_gflops"] = matmul_peak_gflops(
        xp.matmul, lambda k: xp.asarray(_random_matrix(k)), sync, n)
    result["peak_fraction"] = result["gflops"] / result["peak_gflops"]
    if generation:
        model.eval()
        prompt, new = _generation_lengths(s, gen_context)
        ids = _random_batches(s, 1)[0, 0, 0, :prompt]
        gen = dict(context=prompt + new, prompt=prompt, new_tokens=new)
        with no_grad():
            for use_cache in (True, False):
                model.generate(ids, 2, use_cache=use_cache, seed=0)  # warm-up
                sync()
                start = time.perf_counter()
                model.generate(ids, new, use_cache=use_cache, seed=0)
                sync()
                key = "cached_tokens_per_s" if use_cache else "uncached_tokens_per_s"
                gen[key] = new / (time.perf_counter() - start)
        result["generation"] = gen
    return result


def _import_by_path(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"reference_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAME_ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}  # fast.cpu.keep_freed_memory's


def measure_reference(model_name, path, s, device="cpu", steps=15, warmup=3, threads=None,
                      generation=True, gen_context=512, tf32=False, same_allocator=False):
    """Time the official PyTorch model in `path` (mosaic_model.py or gpt_model.py) the same way.
    same_allocator: its process was started with our allocator setting (SAME_ALLOCATOR) instead of
    glibc's defaults, as its users run it."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = "cuda" if backend.normalize_device(device) == "gpu" else "cpu"
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)  # torch's default is off, as ours
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rss_base = _rss_now_mb()
    module = _import_by_path(path)
    sizes = dict(vocab_size=s["vocab_size"], n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                 block_size=s["block_size"], dropout=s["dropout"], bias=s["bias"])
    wanted = ("MemoryMosaicConfig", "MemoryMosaic") if model_name == "mosaic" else ("GPTConfig", "GPT")
    if not all(hasattr(module, name) for name in wanted):
        raise MinimosaicError(f"{path} has no {' / '.join(wanted)}: is it the official "
                              f"{'mosaic' if model_name == 'mosaic' else 'gpt'}_model.py?")
    if model_name == "mosaic":
        config = module.MemoryMosaicConfig(pmem_size=s["pmem_size"], pmem_count=s["pmem_count"], **sizes)
        model_class = module.MemoryMosaic
    else:
        config, model_class = module.GPTConfig(**sizes), module.GPT
    torch.manual_seed(0)
    model = model_class(config).to(dev)
    model.train()
    # the same weight-decay rule as ours: decay parameters with at least two axes of size > 1
    params = list(model.parameters())
    matrix = [p for p in params if sum(n > 1 for n in p.shape) >= 2]
    other = [p for p in params if sum(n > 1 for n in p.shape) < 2]
    opt = torch.optim.AdamW([{"params": matrix, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4)
    batches = torch.from_numpy(_random_batches(s, warmup + steps)).to(dev)
    losses = []

    def step(i):
        _, loss = model(batches[i, 0], batches[i, 1])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i in (0, warmup + steps - 1):
            losses.append(float(loss.item()))

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, sync, steps, warmup)
    flops = train_step_flops(model_name, s)
    label = f"{model_name} (official torch{', same allocator' if same_allocator else ''})"
    result = dict(side="reference", model=model_name, label=label, same_allocator=same_allocator,
                  params=sum(p.numel() for p in params), flops_per_step=flops,
                  loss_first=losses[0], loss_last=losses[-1], torch_threads=torch.get_num_threads(),
                  torch_version=torch.__version__,
                  **_summary(times, s["batch_size"] * s["block_size"], flops))
    if dev == "cpu":
        result.update(peak_rss_mb=_peak_rss_mb(), base_rss_mb=rss_base)
    else:
        result.update(gpu_mem_mb=torch.cuda.max_memory_reserved() / 2**20,
                      gpu_mem_allocated_mb=torch.cuda.max_memory_allocated() / 2**20)
    n = 4096 if dev == "cuda" else 2048
    result["peak_gflops"] = matmul_peak_gflops(
        torch.matmul, lambda k: torch.from_numpy(_random_matrix(k)).to(dev), sync, n)
    result["peak_fraction"] = result["gflops"] / result["peak_gflops"]
    if generation:  # the official generate() has no cache: every new token re-runs the whole context
        model.eval()
        prompt, new = _generation_lengths(s, gen_context)
        ids = torch.from_numpy(_random_batches(s, 1)[0, 0, :1, :prompt]).to(dev)
        with torch.no_grad():
            model.generate(ids, 2)
            sync()
            start = time.perf_counter()
            model.generate(ids, new)
            sync()
        result["generation"] = dict(context=prompt + new, prompt=prompt, new_tokens=new,
                                    uncached_tokens_per_s=new / (time.perf_counter() - start))
    return result


# ---------------------------------------------------------------- the children
TURN = "minimosaic-bench: my turn is over"   # a lockstep child's line to the parent
SETTLE_SECONDS = 0.2   # lockstep: pause before each turn, so that the last side's spinning threads sleep
_turn_times = ([], [])   # a lockstep child's: when each turn began, when each ended (time.time())


def _child_main(spec_path):
    """Entry point of a child: read the job, measure, write the result next to the job."""
    global _wait_for_turn
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("lockstep"):
        _wait_for_turn = _hand_over_turn
    measure = measure_ours if spec["side"] == "ours" else measure_reference
    result = measure(**spec["job"])
    if spec.get("lockstep"):  # (its set-up's turn and its last one, which ran to the end, left out)
        result["turns"] = list(zip(_turn_times[0], _turn_times[1][1:]))
    Path(spec["out"]).write_text(json.dumps(result))


def _hand_over_turn():
    """A lockstep child: tell the parent that this turn is over, and wait until it gives the next one."""
    _turn_times[1].append(time.time())
    print(TURN, flush=True)
    if not sys.stdin.readline():
        raise SystemExit("minimosaic bench: the parent process is gone")
    _turn_times[0].append(time.time())


def _child(side, job, threads, workdir, index, lockstep=False):
    """(command, environment, result path) of a child measuring `job` with `threads` BLAS/OpenMP threads."""
    spec_path, out_path = Path(workdir) / f"job{index}.json", Path(workdir) / f"result{index}.json"
    spec_path.write_text(json.dumps(dict(side=side, job=job, out=str(out_path), lockstep=lockstep)))
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    if job.get("same_allocator"):
        env.update(SAME_ALLOCATOR)
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", "minimosaic.bench", str(spec_path)], env, out_path


def _child_result(side, job, returncode, stderr, out_path):
    """(result, None), or (None, one line saying why not) with the child's traceback on our stderr."""
    if returncode != 0 or not out_path.exists():
        sys.stderr.write(stderr[-4000:])  # the child's traceback, for whoever reads the log
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        return None, f"{side} {job['model_name']} failed (exit {returncode}): {tail[0]}"
    return json.loads(out_path.read_text()), None


def _run_child(side, job, threads, workdir, index):
    """Run one measurement in a fresh Python process."""
    command, env, out_path = _child(side, job, threads, workdir, index)
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    return _child_result(side, job, proc.returncode, proc.stderr or proc.stdout, out_path)


def _run_children_in_lockstep(jobs, threads, workdir, first_index):
    """Run all the jobs' children at once, but one of them at a time: each sets itself up alone, then they
    take turns, one training step each (the order reversed every other step), and each measures the rest
    (peak matmul, generation) alone after its last step. A slow spell of a shared machine then falls on
    every side alike, which separate runs minutes apart cannot promise. [(result, error)] in job order."""
    children = []
    for index, (side, job) in enumerate(jobs, first_index):
        command, env, out_path = _child(side, job, threads, workdir, index, lockstep=True)
        stderr = open(Path(workdir) / f"stderr{index}.txt", "w+")
        proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
        children.append(dict(side=side, job=job, proc=proc, stderr=stderr, out=out_path))
        children[-1]["waiting"] = _turn_over(proc)   # its set-up, alone
    turn = 0
    while any(child["waiting"] for child in children):
        for child in children if turn % 2 == 0 else children[::-1]:
            if child["waiting"]:
                time.sleep(SETTLE_SECONDS)
                child["proc"].stdin.write("go\n")
                child["proc"].stdin.flush()
                child["waiting"] = _turn_over(child["proc"])   # False once it has finished
        turn += 1
    results = []
    for child in children:
        child["proc"].stdin.close()
        returncode = child["proc"].wait()
        child["stderr"].seek(0)
        results.append(_child_result(child["side"], child["job"], returncode, child["stderr"].read(),
                                     child["out"]))
        child["stderr"].close()
    return results


def _turn_over(proc):
    """Wait until a lockstep child hands its turn back (True) or exits (False)."""
    for line in proc.stdout:
        if line.rstrip("\n") == TURN:
            return True
    return False


def _torch_available():
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def cpu_model():
    """The CPU's model name as lscpu prints it (from /proc/cpuinfo), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(device, threads):
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # others' work skews timings
    return dict(device=backend.normalize_device(device), cpu=cpu_model(), cores=os.cpu_count(), threads=threads,
                load_average=load, python=platform.python_version(), numpy=np.__version__)


def run_bench(preset="char-small", model="mosaic", overrides=None, device="cpu", steps=15, warmup=3,
              reference_file=None, reference_gpt_file=None, generation=True, json_path=None,
              threads=None, gen_context=512, tf32=False, cuda_graph=True, plain=False, also_plain=False,
              same_allocator=False, rounds=1, lockstep=False, progress=None):
    """Benchmark `model` ('mosaic', 'gpt' or 'both') at `preset` + `overrides`; returns a JSON-able dict.

    Each model is measured in its own child process: ours, then the official code in each reference
    file given (`reference_file`: mosaic_model.py, `reference_gpt_file`: gpt_model.py). `threads`
    (default: what NumPy's BLAS uses, `blas_threads`) is given to both sides. Generation runs at
    batch 1 with a prompt of half of min(gen_context, block_size) tokens and as many new ones.
    On a GPU, `cuda_graph` replays our step from a CUDA graph (the official code runs eagerly).
    `plain` times our plain core, without the fast layer (minimosaic.fast), instead of the fast layer;
    `also_plain` times both, side by side in the same run (the table then shows what the layer buys).
    `same_allocator` also times the official code with our allocator setting (a second official column).
    `rounds` > 1 times every side that many times, round after round (each round runs every side once),
    and reports each ratio's value in every round and its median (`ratio_medians`); `runs` and `ratios`
    are then the last round's. A shared machine drifts over minutes, and interleaved rounds let the
    drift hit both sides alike. `lockstep` goes further: all sides' children run at once and take turns,
    one training step each, so that even a slow spell of seconds falls on every side alike (their peak
    memory is still each child's own). That is fair to processes whose memory stays put between steps, not
    to the official code as shipped, whose per-step page faults cost more when other processes run in
    between. `progress(line)` is called before children start. With `json_path`
    the result is also written there. A missing torch skips the reference with a note; a reference that
    fails to run is reported in `notes` too, so our own numbers still come back.
    """
    device = backend.normalize_device(device)
    if steps < 1 or warmup < 0 or rounds < 1:
        raise MinimosaicError(f"steps {steps} / warmup {warmup} / rounds {rounds}: use steps >= 1, warmup >= 0 "
                              f"and rounds >= 1")
    names = MODELS if model == "both" else (model,)
    if any(name not in MODELS for name in names):
        raise MinimosaicError(f"unknown model {model!r}: use 'mosaic', 'gpt' or 'both'")
    settings = resolve_settings(preset, overrides)
    for name in names:  # validate the sizes here, so a bad override fails before any child starts
        model_config(name, settings).validate()
    if device == "gpu":
        backend.array_module("gpu")  # a clear error now if there is no GPU
    threads = threads or blas_threads()
    common = dict(s=settings, device=device, steps=steps, warmup=warmup, generation=generation,
                  gen_context=gen_context, tf32=bool(tf32 and device == "gpu"))
    cores = (False, True) if also_plain else (plain,)
    jobs = [("ours", dict(model_name=name, cuda_graph=cuda_graph, plain=core, **common))
            for name in names for core in cores]
    notes = []
    references = [(name, path) for name, path in (("mosaic", reference_file), ("gpt", reference_gpt_file))
                  if path]
    for name, path in references:
        if not Path(path).is_file():
            raise MinimosaicError(f"reference file {path} not found: download the official "
                                  f"{'mosaic' if name == 'mosaic' else 'gpt'}_model.py (see benchmarks/README.md)")
    if references and not _torch_available():
        notes.append("torch is not installed: reference skipped (pip install torch)")
    elif references:
        jobs += [("reference", dict(model_name=name, path=str(Path(path).resolve()), threads=threads,
                                    same_allocator=same, **common))
                 for name, path in references for same in ((False, True) if same_allocator else (False,))]
    every_round = []
    with tempfile.TemporaryDirectory(prefix="minimosaic-bench-") as workdir:
        for round_index in range(rounds):
            runs = []
            which = f"round {round_index + 1}/{rounds}: " if rounds > 1 else ""
            if lockstep:
                if progress:
                    progress(f"{which}timing {len(jobs)} sides in lockstep, a step of each in turn...")
                outcomes = _run_children_in_lockstep(jobs, threads, workdir, round_index * len(jobs))
            else:
                outcomes = []
                for index, (side, job) in enumerate(jobs):
                    if progress:
                        progress(f"{which}timing {job['model_name']} "
                                 f"({'minimosaic' if side == 'ours' else 'official torch'})...")
                    outcomes.append(_run_child(side, job, threads, workdir, round_index * len(jobs) + index))
            for result, error in outcomes:
                if error:  # reported, and the other sides still run
                    notes.append(error)
                else:
                    runs.append(result)
            every_round.append(runs)
    notes = list(dict.fromkeys(notes))  # a side failing every round is said once
    if not any(every_round):
        raise MinimosaicError(f"every benchmark failed: {'; '.join(notes)}")
    _use_best_peaks([run for runs in every_round for run in runs])
    runs = every_round[-1]
    result = dict(preset=preset, settings=settings, steps=steps, warmup=warmup, tf32=common["tf32"],
                  lockstep=lockstep, machine=_machine(device, threads), runs=runs, ratios=_ratios(runs),
                  notes=notes)
    if rounds > 1:
        result.update(rounds=rounds, ratio_medians=_ratio_medians([_ratios(r) for r in every_round]))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _use_best_peaks(runs):
    """Each run's "% of matmul peak" against the best peak that any run of its side measured in this
    bench (ours: NumPy or CuPy; the reference: torch). Each child measures its own peak once, in about
    half a second after its steps, so one disturbed measurement on a shared machine would read as a low
    peak and a high fraction. The child's own measurement stays in `own_peak_gflops`."""
    for side in {r["side"] for r in runs}:
        same = [r for r in runs if r["side"] == side]
        best = max(r["peak_gflops"] for r in same)
        for r in same:
            r.update(own_peak_gflops=r["peak_gflops"], peak_gflops=best, peak_fraction=r["gflops"] / best)


def _ratios(runs):
    """ours / official for each model measured on both sides (and fast layer / plain core, when both
    of ours were timed)."""
    ratios = []
    for ours in (r for r in runs if r["side"] == "ours"):
        against = [r for r in runs if r["model"] == ours["model"] and (
            r["side"] == "reference" or (r["side"] == "ours" and r.get("plain") and not ours.get("plain")))]
        for theirs in against:
            memory = "peak_rss_mb" if "peak_rss_mb" in ours else "gpu_mem_mb"
            ratios.append(dict(model=ours["model"], tokens_per_s=ours["tokens_per_s"] / theirs["tokens_per_s"],
                               memory=ours[memory] / theirs[memory], memory_kind=memory,
                               ours=ours["label"], theirs=theirs["label"]))
    return ratios


def _ratio_medians(per_round):
    """[{model, ours, theirs, tokens_per_s: [one value per round it was measured in], median}] from the
    ratios of each round."""
    found = {}
    for ratios in per_round:
        for r in ratios:
            key = (r["model"], r["ours"], r["theirs"])
            found.setdefault(key, dict(model=r["model"], ours=r["ours"], theirs=r["theirs"], tokens_per_s=[]))
            found[key]["tokens_per_s"].append(r["tokens_per_s"])
    return [dict(entry, median=statistics.median(entry["tokens_per_s"])) for entry in found.values()]


# ---------------------------------------------------------------- the table
def _rows(run):
    """{label: text} describing one run, in display order."""
    rows = {
        "parameters": f"{run['params'] / 1e6:.2f} M",
        "tokens/s": f"{run['tokens_per_s']:,.0f}",
        "ms/step median": f"{run['ms_median']:.1f}",
        "  IQR": f"{run['ms_q1']:.1f} - {run['ms_q3']:.1f}",
        "  min - max": f"{run['ms_min']:.1f} - {run['ms_max']:.1f}",
        "CPU ms/step (all threads)": f"{run['cpu_ms_median']:.1f}",
    }
    if "peak_rss_mb" in run:
        rows["peak RSS MiB"] = f"{run['peak_rss_mb']:.0f}"
        rows["  RSS after imports"] = f"{run['base_rss_mb']:.0f}"
    else:
        rows["GPU memory peak MiB"] = f"{run['gpu_mem_mb']:.0f}"
    rows.update({
        "model GFLOP/step": f"{run['flops_per_step'] / 1e9:.2f}",
        "GFLOP/s": f"{run['gflops']:.1f}",
        "matmul peak GFLOP/s (its side's best)": f"{run['peak_gflops']:.1f}",
        "% of matmul peak": f"{100 * run['peak_fraction']:.1f} %",
        "loss first / last step": f"{run['loss_first']:.3f} / {run['loss_last']:.3f}",
    })
    gen = run.get("generation")
    if gen:
        cached = gen.get("cached_tokens_per_s")
        rows["generate tok/s, cache"] = f"{cached:,.1f}" if cached else "-"
        rows["generate tok/s, no cache"] = f"{gen['uncached_tokens_per_s']:,.1f}"
    return rows


def format_table(result):
    """The result of run_bench as a plain-text table: one column per run, then the ratios."""
    s, m = result["settings"], result["machine"]
    lines = [
        f"minimosaic bench  {result['preset']}: vocab {s['vocab_size']}, {s['n_layer']} layers, "
        f"{s['n_head']} heads, d {s['n_embd']}, block {s['block_size']}, batch {s['batch_size']}, "
        f"pmem {s['pmem_size']}, dropout {s['dropout']}, bias {s['bias']}",
        f"{m['device']} ({m['cpu']}, {m['threads']} threads, load average {m['load_average'] or 0:.1f} "
        f"at start); {result['steps']} timed steps after "
        f"{result['warmup']} warm-up{', the sides in lockstep' if result.get('lockstep') else ''}; "
        f"train step = forward + cross entropy + backward + AdamW, fp32",
    ]
    runs = result["runs"]
    if runs:
        columns = [_rows(r) for r in runs]
        labels = list(dict.fromkeys(label for col in columns for label in col))
        table = [[""] + [r["label"] for r in runs]] + [[label] + [col.get(label, "-") for col in columns]
                                                       for label in labels]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines.append("")
        lines += ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])
                  for row in table]
        gen = next((r["generation"] for r in runs if "generation" in r), None)
        if gen:
            lines.append(f"generation: batch 1, {gen['prompt']}-token prompt + {gen['new_tokens']} new tokens "
                         f"(context {gen['context']}); the official generate() has no cache")
    for r in result["ratios"]:
        memory = "peak RSS" if r["memory_kind"] == "peak_rss_mb" else "GPU memory"
        lines.append(f"{r['model']}: {_ratio_name(r)}  tokens/s {r['tokens_per_s']:.2f}x,  {memory} {r['memory']:.2f}x")
    if result.get("ratio_medians"):
        lines.append(f"over {result['rounds']} rounds (the columns above are the last round's):")
        for r in result["ratio_medians"]:
            values = ", ".join(f"{v:.2f}x" for v in r["tokens_per_s"])
            lines.append(f"{r['model']}: {_ratio_name(r)}  tokens/s {values};  median {r['median']:.2f}x")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def _ratio_name(ratio):
    """'ours / official', 'fast layer / plain core', 'plain core / official', with ' (same allocator)'."""
    which = "ours / official" if "official" in ratio.get("theirs", "official") else "fast layer / plain core"
    if "plain" in ratio.get("ours", ""):
        which = "plain core / official"
    if "same allocator" in ratio.get("theirs", ""):
        which += " (same allocator)"
    return which


if __name__ == "__main__":  # a child started by run_bench
    _child_main(sys.argv[1])
