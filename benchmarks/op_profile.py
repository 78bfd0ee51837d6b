"""Where does a training step's time go? Per-op forward and backward times, device-synchronised.

    python benchmarks/op_profile.py --preset tok-small --device gpu [--model mosaic] [--steps 5] [--plain]

The fast layer (minimosaic.fast) is on, as in `minimosaic train` and `minimosaic bench`; --plain (or
MINIMOSAIC_PLAIN=1) profiles the plain core instead. Every op in minimosaic.ops and the ops of
minimosaic.memories is wrapped so that the device is synchronised before and after it (and around its
backward), and the time is added to that op's row. A replaceable op is timed through its dispatcher, so
its row holds whichever code ran: the fast layer's replacement or the plain function. Functions that
only compose other ops are not rows of their own: their ops are (the plain core's softmax_attention is
softmax and matmuls); an op that runs inside another timed op (a replacement that declined and fell back
to a composition) is counted in the outer one. On a GPU each row therefore counts the op's kernels *and*
the Python/launch time spent issuing them; the synchronised step is slower than a free-running one
(printed beside it), but the ranking shows what to fuse. `engine` is what backward() spends outside the
ops (summing broadcast gradients, adding gradients of shared inputs); `adamw` is the optimizer step.

--cpu-rates (CPU) adds what this CPU does with the step's building blocks, so that two CPU kinds can be
compared op by op: its model and L2 size (and the tile and block sizes the fast layer took from it), the
float32 matmul peak on one thread, the rate of one attention tile's product (inner dimension head_dim)
on one thread, nanoseconds per number of the passes over an in-cache tile of scores, and the minor
page faults per step (each a fresh 4 KiB page of memory: the allocator's cost).
"""
import argparse
import collections
import functools
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimosaic import backend, bench, fast, memories, models, ops, tensor  # noqa: E402

COMPOSITES = {"as_tensor", "shift", "masked_fill"}      # built from other ops: timed through those
MEMORY_OPS = ("leaky_average", "peek_ahead", "normalize", "head_decay", "head_scale", "softmax_attention")
PLAIN_COMPOSITES = {"softmax_attention"}                # composed from ops in the plain core


def instrument(sync, stats, plain=False):
    """Wrap the ops in place; stats[name] = [seconds, calls]. plain: the fast layer is off, so the
    functions in PLAIN_COMPOSITES are compositions and are timed through their ops."""
    depth = [0]  # > 0 while a timed op runs: ops it calls are part of its time, not rows of their own

    def record(name, start):
        sync()
        row = stats[name]
        row[0] += time.perf_counter() - start
        row[1] += 1

    def wrap(name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            sync()
            start = time.perf_counter()
            depth[0] += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                depth[0] -= 1
            record(name + " fwd", start)
            fresh = all(out is not a for a in args)  # an op may hand back its input (dropout off)
            if fresh and isinstance(out, tensor.Tensor) and out._backward is not None:
                backward = out._backward

                def timed_backward(g):
                    sync()
                    start = time.perf_counter()
                    grads = backward(g)
                    record(name + " bwd", start)
                    return grads
                out._backward = timed_backward
            return out
        return timed

    for name in dir(ops):
        fn = getattr(ops, name)
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == ops.__name__ \
                and name not in COMPOSITES and not isinstance(fn, type):
            setattr(ops, name, wrap(name, fn))
    for name in MEMORY_OPS:
        if plain and name in PLAIN_COMPOSITES:
            continue
        wrapped = wrap(name, getattr(memories, name))
        setattr(memories, name, wrapped)
        if hasattr(models, name):
            setattr(models, name, wrapped)
    ops._install_methods()  # the Tensor operators pick up the wrapped functions


def profile(preset, device, model_name, steps, warmup, overrides=None, plain=False):
    """Time `steps` training steps of a fresh model after `warmup` ones; the fast layer on unless plain."""
    if plain:
        fast.disable()
    else:
        fast.enable()
    xp = backend.array_module(device)
    sync = lambda: bench._sync(xp)  # noqa: E731
    s = bench.resolve_settings(preset, overrides)
    model, opt = bench.model_and_optimizer(model_name, s, device)
    batches = backend.to_device(bench._random_batches(s, warmup + steps), device)

    def step(i, parts=None):
        start = time.perf_counter()
        loss = model.loss(batches[i, 0], batches[i, 1])
        sync()
        mid = time.perf_counter()
        loss.backward()
        sync()
        after_backward = time.perf_counter()
        opt.step()
        opt.zero_grad()
        sync()
        if parts is not None:
            parts["forward"] += mid - start
            parts["backward"] += after_backward - mid
            parts["adamw"][0] += time.perf_counter() - after_backward
            parts["adamw"][1] += 1

    free_times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step(i)
        sync()
        if i >= warmup:
            free_times.append(time.perf_counter() - start)

    stats = collections.defaultdict(lambda: [0.0, 0])
    instrument(sync, stats, plain)
    parts = {"forward": 0.0, "backward": 0.0, "adamw": stats["adamw"]}
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(steps):
        step(warmup + i, parts)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    op_backward = sum(t for name, (t, _) in stats.items() if name.endswith(" bwd"))
    stats["engine"] = [parts["backward"] - op_backward, steps]
    free_ms = 1000 * sorted(free_times)[len(free_times) // 2]
    return dict(preset=preset, device=device, model=model_name, plain=plain, steps=steps,
                free_step_ms=free_ms, page_faults_per_step=faults,
                synced_step_ms=1000 * (parts["forward"] + parts["backward"] + parts["adamw"][0]) / steps,
                rows={name: dict(ms_per_step=1000 * t / steps, calls_per_step=n / steps)
                      for name, (t, n) in stats.items()})


def cpu_rates(preset, overrides=None):
    """What this CPU does with the step's building blocks, on one thread (as each of the pool's threads
    works): {name: value}. The tile is the persistent memory's: TILE_SCORES scores, rows x pmem_size."""
    import numpy as np
    from minimosaic.fast import cpu, ops as fast_ops
    s = bench.resolve_settings(preset, overrides)
    hs, keys = s["n_embd"] // s["n_head"], s["pmem_size"]
    rows = max(1, fast_ops.TILE_SCORES // keys)
    best_seconds = functools.partial(bench.best_seconds, repeats=20)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((rows, hs), np.float32), rng.standard_normal((keys, hs), np.float32)
    scores, out = q @ k.T, np.empty((rows, keys), np.float32)
    with cpu.blas_threads(1):
        peak = bench.matmul_peak_gflops(np.matmul, bench._random_matrix, lambda: None, 2048, repeats=3)
        tile = 2 * rows * hs * keys / best_seconds(lambda: np.matmul(q, k.T, out=out)) / 1e9
    per_number = 1e9 / scores.size
    return {"cpu": bench.cpu_model(), "L2 bytes (sysfs)": cpu.l2_cache_bytes(),
            "tile scores / block numbers": f"{fast_ops.TILE_SCORES} / {cpu.BLOCK_ELEMENTS}",
            "matmul peak, 1 thread (GFLOP/s)": round(peak, 1),
            f"tile product ({rows} x {hs}) @ ({hs} x {keys}), 1 thread (GFLOP/s)": round(tile, 1),
            "tile product / peak": f"{tile / peak:.0%}",
            "row max (ns/number)": round(per_number * best_seconds(lambda: scores.max(axis=-1, keepdims=True)), 3),
            "subtract (ns/number)": round(per_number * best_seconds(lambda: np.subtract(scores, 1, out=out)), 3),
            "exp2 (ns/number)": round(per_number * best_seconds(lambda: np.exp2(scores, out=out)), 3),
            "multiply (ns/number)": round(per_number * best_seconds(lambda: np.multiply(scores, out, out=out)), 3),
            "row sum as a product (ns/number)": round(per_number * best_seconds(lambda: cpu.row_sum(scores)), 3)}


def format_profile(result, top=25):
    rows = sorted(result["rows"].items(), key=lambda kv: -kv[1]["ms_per_step"])
    total = sum(r["ms_per_step"] for _, r in rows)
    core = "plain core" if result.get("plain") else "fast layer"
    lines = [f"{result['model']} {result['preset']} on {result['device']} ({core}): free-running step "
             f"{result['free_step_ms']:.1f} ms, synchronised step {result['synced_step_ms']:.1f} ms",
             f"{'op':28} {'ms/step':>8} {'share':>6} {'calls':>6}"]
    for name, r in rows[:top]:
        lines.append(f"{name:28} {r['ms_per_step']:8.2f} {r['ms_per_step'] / total:6.1%} "
                     f"{r['calls_per_step']:6.0f}")
    calls = sum(r["calls_per_step"] for _, r in rows)
    lines.append(f"{'(all ops)':28} {total:8.2f} {'':6} {calls:6.0f}")
    lines.append(f"minor page faults per step: {result['page_faults_per_step']:,.0f}")
    for name, value in result.get("cpu_rates", {}).items():
        lines.append(f"{name}: {value}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="char-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="mosaic", choices=bench.MODELS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--plain", action="store_true",
                        help="profile the plain core, without the fast layer (also MINIMOSAIC_PLAIN=1)")
    parser.add_argument("--cpu-rates", action="store_true",
                        help="also measure this CPU's rates for the step's building blocks (see above)")
    args = parser.parse_args(argv)
    overrides = bench.parse_overrides(args.set)
    result = profile(args.preset, args.device, args.model, args.steps, args.warmup,
                     overrides, plain=args.plain or fast.plain_requested())
    if args.cpu_rates:
        result["cpu_rates"] = cpu_rates(args.preset, overrides)
    print(format_profile(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
