"""Are the fast layer's tile and block sizes right for this CPU? Times its CPU paths at several sizes.

    python benchmarks/tile_sweep.py --preset char-small            # or tok-small, char-medium; --repeats 9

The fast layer sizes its work to the first core's L2 cache (read from sysfs; minimosaic/fast/cpu.py):
  fast.ops.TILE_SCORES     scores in one attention tile (forward and backward, on the pool)
  fast.cpu.BLOCK_ELEMENTS  numbers in one block of an elementwise pass (layer norm, GELU, normalize)
both L2 bytes / 4, chosen on an AMD EPYC with 1 MiB of L2 (benchmarks/NOTES.md, entries 11 and 13). On
another CPU that rule may not be the best one. This script times, on the preset's shapes and with the
default threads, forward + backward of the persistent memory's and the context memory's attention,
layer norm and GELU at 1/8 to 4 times the size the rule gives, each size once per round over `--repeats`
rounds (so that drift falls on every size alike), and prints the best time of each against the rule's.
It checks that every size gives the rule's results (to float32 rounding), since the sizes change only
how the work is cut. If another size wins by more than the noise on your CPU, the rule (where the two
constants are set) is the place to change; please report the table with your `lscpu` model.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimosaic import bench, fast, memories, ops, tensor  # noqa: E402
from minimosaic.fast import cpu, ops as fast_ops  # noqa: E402

FACTORS = (0.125, 0.25, 0.5, 1, 2, 4)


def cases(preset, overrides=None):
    """{name: (size's module, its attribute, a function running forward + backward and returning the
    output and gradients)} on the preset's shapes, float32, random inputs."""
    s = bench.resolve_settings(preset, overrides)
    B, T, C, H, P = s["batch_size"], s["block_size"], s["n_embd"], s["n_head"], s["pmem_size"]
    rng = np.random.default_rng(0)

    def leaf(*shape):
        return tensor.Tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True)

    def run(forward, leaves, out_shape):
        g = rng.standard_normal(out_shape).astype(np.float32)

        def once():
            for x in leaves:
                x.grad = None
            y = forward()
            y.backward(g)
            return [y.data] + [x.grad for x in leaves]
        return once

    hs = C // H
    q, k, v = leaf(B, H, T, hs), leaf(B, H, T, hs), leaf(B, H, T, hs)
    pq, pk, pv = leaf(H, B * T, hs), leaf(1, H, P, hs), leaf(1, H, P, hs)   # as PersistentMemory: rows B*T
    strict = memories.causal_mask(np, T, 0, include_present=False)        # the context memory's: s < t
    x, w, b = leaf(B, T, C), leaf(C), leaf(C)
    wide = leaf(B, T, 4 * C)
    scale = 1 / np.sqrt(hs)
    return {
        f"persistent memory attention ({H}, {B * T} x {P}, d {hs})":
            (fast_ops, "TILE_SCORES", run(lambda: memories.softmax_attention(pq, pk, pv, scale=scale),
                                          (pq, pk, pv), (1, H, B * T, hs))),
        f"context memory attention ({B}x{H}, {T} x {T} causal, d {hs})":
            (fast_ops, "TILE_SCORES", run(lambda: memories.softmax_attention(q, k, v, strict, scale),
                                          (q, k, v), (B, H, T, hs))),
        f"layer norm ({B}, {T}, {C})":
            (cpu, "BLOCK_ELEMENTS", run(lambda: ops.layer_norm(x, w, b), (x, w, b), (B, T, C))),
        f"GELU ({B}, {T}, {4 * C})":
            (cpu, "BLOCK_ELEMENTS", run(lambda: ops.gelu(wide), (wide,), (B, T, 4 * C))),
    }


def sweep(preset, repeats=7, factors=FACTORS, overrides=None):
    """[{name, rule (the size the rule gives), sizes [one per factor], seconds [the best time of each],
    max_difference}]: every case at every size (the fast layer on); max_difference is the largest
    |result - rule's result| / max |rule's result| over the output and the gradients."""
    results = []
    for name, (module, attribute, once) in cases(preset, overrides).items():
        rule = getattr(module, attribute)
        sizes = [max(1, int(rule * f)) for f in factors]
        best = [float("inf")] * len(sizes)
        reference = once()
        difference = 0.0
        try:
            for _ in range(repeats):
                for i, size in enumerate(sizes):
                    setattr(module, attribute, size)
                    start = time.perf_counter()
                    outputs = once()
                    best[i] = min(best[i], time.perf_counter() - start)
                    difference = max(difference, *(float(np.abs(o - r).max() / (np.abs(r).max() or 1))
                                                   for o, r in zip(outputs, reference)))
        finally:
            setattr(module, attribute, rule)
        results.append(dict(name=name, rule=rule, sizes=sizes, seconds=best, max_difference=difference))
    return results


def table(results, factors=FACTORS):
    """A markdown table: one row per case, its best time at each multiple of the rule's size."""
    lines = ["| case | size by the rule | " + " | ".join(f"x{f:g}" for f in factors) + " | best / rule's |",
             "|---|---|" + "---|" * (len(factors) + 1)]
    for r in results:
        rule_seconds = r["seconds"][r["sizes"].index(r["rule"])]
        cells = [f"**{1e3 * s:.2f}**" if size == r["rule"] else f"{1e3 * s:.2f}"
                 for size, s in zip(r["sizes"], r["seconds"])]
        lines.append(f"| {r['name']} | {r['rule']:,} | " + " | ".join(cells) +
                     f" | {min(r['seconds']) / rule_seconds:.2f} |")
    return "\n".join(lines) + "\n(ms, forward + backward; the rule's size in bold)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="char-small")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    fast.enable()
    results = sweep(args.preset, args.repeats, overrides=bench.parse_overrides(args.set))
    print(f"{bench.cpu_model()} | L2 {cpu.l2_cache_bytes() // 1024} KiB (sysfs) | {cpu.cpu_workers()} threads | "
          f"{time.strftime('%Y-%m-%d %H:%M')} | {args.preset}, best of {args.repeats}, forward + backward")
    print(table(results))
    worst = max(r["max_difference"] for r in results)
    print(f"largest difference from the rule's results, relative to their largest value: {worst:.1e}")


if __name__ == "__main__":
    main()
