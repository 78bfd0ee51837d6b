"""Did a change to the fast layer make training steps faster? Both versions, step by step in one process.

    python benchmarks/ab_steps.py --before HEAD~1 --preset char-small --model mosaic --steps 20
    python benchmarks/ab_steps.py --before /path/to/an/older/fast/ops.py --preset tok-small

On a shared or virtual machine, two `minimosaic bench` runs minutes apart can differ by 10-30 % (the host
takes the cores for seconds at a time), which hides a change of a few percent. Here one process builds one
model and alternates every step between today's fast/ops.py and an earlier one (`--before`: a git
revision, or the path of a copy), swapping the registered replacements, so that any slow spell falls on
both versions alike. It prints the min and median step of each and their ratios (today / before).

The earlier ops.py is imported beside today's, with today's fast/cpu.py and cuda_kernels.py and today's
core: it compares the replacements (fast/ops.py, where nearly every speed change lives), not the whole
tree. A version that needs a different cpu.py fails to import; compare such versions with two
`minimosaic bench` runs instead. CPU only (`--device gpu` is not supported).
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minimosaic import bench, fast, registry  # noqa: E402
from minimosaic.fast import ops as fast_ops  # noqa: E402


def load_before(before):
    """The REPLACEMENTS of an earlier fast/ops.py: `before` is a file path, or a git revision of this repo."""
    path = Path(before)
    if not path.is_file():
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{before}:minimosaic/fast/ops.py"],
                                capture_output=True, text=True)
        if source.returncode:
            raise SystemExit(f"ab_steps: --before {before!r} is neither a file nor a git revision with "
                             f"minimosaic/fast/ops.py ({source.stderr.strip()})")
        path = Path(tempfile.mkdtemp()) / "ops.py"
        path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("minimosaic.fast.ops_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)   # its relative imports resolve to today's minimosaic.fast
    return module.REPLACEMENTS


def use(replacements):
    """Register exactly these replacements (today's or the earlier ones)."""
    registry.clear()
    for name, replacement in replacements.items():
        registry.register(name, replacement)


def compare(before, preset="char-small", model_name="mosaic", steps=20, warmup=3, overrides=None):
    """{label: [seconds per step]} for 'before' (the REPLACEMENTS that load_before gave) and 'today',
    alternating (which goes first alternates too)."""
    versions = {"before": before, "today": fast_ops.REPLACEMENTS}
    fast.enable()   # (also glibc's allocator settings, for both)
    s = bench.resolve_settings(preset, overrides)
    model, opt = bench.model_and_optimizer(model_name, s)
    batches = bench._random_batches(s, 2)

    def step(i):
        start = time.perf_counter()
        model.loss(batches[i % 2, 0], batches[i % 2, 1]).backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    times = {label: [] for label in versions}
    try:
        for i in range(warmup):
            for label in versions:
                use(versions[label])
                step(i)
        for i in range(steps):
            for label in (("before", "today") if i % 2 else ("today", "before")):
                use(versions[label])
                times[label].append(step(i))
    finally:
        use(fast_ops.REPLACEMENTS)
    return times


def report(times, before, preset, model_name):
    b, t = (1000 * np.array(times[label]) for label in ("before", "today"))
    return (f"{preset} {model_name}, {len(t)} steps each, alternating: before ({before}) / today\n"
            f"  min step    {b.min():9.1f} ms -> {t.min():9.1f} ms   ({t.min() / b.min():.3f}x)\n"
            f"  median step {np.median(b):9.1f} ms -> {np.median(t):9.1f} ms   "
            f"({np.median(t) / np.median(b):.3f}x)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="a git revision, or the path of an earlier fast/ops.py")
    parser.add_argument("--preset", default="char-small")
    parser.add_argument("--model", default="mosaic", choices=["mosaic", "gpt"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each version")
    args = parser.parse_args(argv)
    times = compare(load_before(args.before), args.preset, args.model, args.steps)
    print(report(times, args.before, args.preset, args.model))


if __name__ == "__main__":
    main()
