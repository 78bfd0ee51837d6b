"""Data-parallel scaling on this machine: 2 ranks x 1 thread against 1 process x 1 and x 2 threads, ours
(MPI, minimosaic/fast/distributed.py) and, when torch and the official code are given, torch DDP (gloo)
on the official model, all in one run.

    python benchmarks/data_parallel.py                                  # ours: char-small, tok-small
    python benchmarks/data_parallel.py --reference ~/MemoryMosaics/nanoMosaics   # and torch DDP beside it
    python benchmarks/data_parallel.py --json dp.json                   # the numbers, for projection.py

Every measurement runs in fresh processes with the global batch of the preset (each of 2 ranks takes
half of its rows) on random token ids, times `--steps` steps after `--warmup`, and reports the median.

  tokens/s      global batch x block / median step time (rank 0's clock)
  efficiency    tokens/s of N ranks / (N x tokens/s of 1 process on 1 thread): 100% is perfect scaling.
                It is the product of three factors, each measured:
  compute       (step of 1 process on the whole batch) / (N x step of 1 process on one rank's rows):
   scaling      what splitting the rows buys before any communication (under 100 % where a step has
                fixed costs, such as the optimizer's update of every weight; over 100 % where a smaller
                batch runs faster per row, as when it fits a cache the whole batch did not)
  sharing       (step of 1 process on one rank's rows) / (step of N such processes side by side, each
                on its own rows, never communicating): what the ranks cost each other through the
                machine they share (memory bandwidth, caches, the hypervisor)
  communication (step of N processes side by side) / (step of N ranks): what the all-reduce and the
                wait for the slowest rank cost
  vs 1x2        tokens/s of 2 ranks x 1 thread / tokens/s of 1 process x 2 threads: which to choose here
  all-reduce    bytes all-reduced per step (the gradients, float32) and the share of the step spent in
                the all-reduce call (ours; it includes waiting for the slower rank)

The reference directory must hold the official mosaic_model.py and gpt_model.py (never shipped here).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))

from minimosaic import bench  # noqa: E402
from minimosaic.fast import distributed  # noqa: E402


# ---------------------------------------------------------------- the workers (one per rank)
def worker_ours(preset, model_name, steps, warmup, rows_of=1, alone=False):
    from minimosaic import fast
    from minimosaic.train import training_step

    fast.enable()
    world = distributed.world_from_environment()
    s = bench.resolve_settings(preset)
    model, opt = bench.model_and_optimizer(model_name, s)
    batches = bench._random_batches(s, warmup + steps)  # the same global batches on every rank

    def step(i):
        x, y = world.shard(batches[i, 0], batches[i, 1])
        x, y = x[:len(x) // rows_of], y[:len(y) // rows_of]   # one process alone on one rank's rows
        training_step(model, opt, [(x, y)], 1e-4, world=world if world.size > 1 and not alone else None)
        if i == warmup - 1 and world.size > 1:
            world.stats.update(allreduce_bytes=0, allreduce_s=0.0, steps=0)

    times = [wall for wall, _ in bench.time_steps(step, lambda: None, steps, warmup)]
    result = dict(median_s=statistics.median(times), total_s=sum(times))
    if world.size > 1 and not alone:
        stats = world.stats
        result.update(allreduce_bytes=stats["allreduce_bytes"] / stats["steps"],
                      allreduce_share=stats["allreduce_s"] / sum(times))
    return world.rank, result


def worker_torch(preset, model_name, steps, warmup, reference, rows_of=1, alone=False):
    import torch
    import torch.distributed as dist

    rank, size = distributed.launcher_rank_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = bench.resolve_settings(preset)
    module = bench._import_by_path(Path(reference) / f"{'mosaic' if model_name == 'mosaic' else 'gpt'}_model.py")
    sizes = dict(vocab_size=s["vocab_size"], n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                 block_size=s["block_size"], dropout=0.0, bias=False)
    if model_name == "mosaic":
        model = module.MemoryMosaic(module.MemoryMosaicConfig(pmem_size=s["pmem_size"], pmem_count=1, **sizes))
    else:
        model = module.GPT(module.GPTConfig(**sizes))
    if size > 1 and not alone:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("gloo", rank=rank, world_size=size)
        model = torch.nn.parallel.DistributedDataParallel(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    batches = torch.from_numpy(bench._random_batches(s, warmup + steps))
    rows = s["batch_size"] // (size * rows_of)

    def step(i):
        x, y = batches[i, 0, rank * rows:(rank + 1) * rows], batches[i, 1, rank * rows:(rank + 1) * rows]
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = [wall for wall, _ in bench.time_steps(step, lambda: None, steps, warmup)]
    if size > 1 and not alone:
        dist.destroy_process_group()
    return rank, dict(median_s=statistics.median(times), total_s=sum(times))


# ---------------------------------------------------------------- the driver
def run(side, preset, model, ranks, threads, steps, warmup, reference=None, rows_of=1, alone=False):
    """One measurement in fresh processes: ranks x threads, each rank on 1/rows_of of its rows (so 1 rank
    with rows_of=N does what each of N ranks does), and with `alone`, the ranks never communicating.
    Returns rank 0's result dict."""
    command = [sys.executable, str(HERE), "--worker", side, "--presets", preset, "--model", model,
               "--steps", str(steps), "--warmup", str(warmup), "--rows-of", str(rows_of)]
    if alone:
        command.append("--alone")
    if reference:
        command += ["--reference", str(reference)]
    if ranks > 1:
        command = [distributed.find_mpiexec(), "-n", str(ranks), *command]
    env = distributed.launcher_environment(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                                           MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} {preset} {ranks}x{threads} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[0])


def measure(preset, model, steps, warmup, reference):
    s = bench.resolve_settings(preset)
    tokens = s["batch_size"] * s["block_size"]
    sides = [("ours", None)] + ([("torch", reference)] if reference else [])
    rows = []
    for side, ref in sides:
        single = run(side, preset, model, 1, 1, steps, warmup, ref)
        double = run(side, preset, model, 1, 2, steps, warmup, ref)
        half = run(side, preset, model, 1, 1, steps, warmup, ref, rows_of=2)
        side_by_side = run(side, preset, model, 2, 1, steps, warmup, ref, alone=True)
        ranks = run(side, preset, model, 2, 1, steps, warmup, ref)
        tps = {name: tokens / r["median_s"] for name, r in (("1x1", single), ("1x2", double), ("2x1", ranks))}
        rows.append(dict(side="minimosaic (MPI)" if side == "ours" else "torch DDP (gloo), official",
                         preset=preset, model=model, tokens_per_s=tps,
                         efficiency=tps["2x1"] / (2 * tps["1x1"]), vs_1x2=tps["2x1"] / tps["1x2"],
                         compute_scaling=single["median_s"] / (2 * half["median_s"]),
                         sharing=half["median_s"] / side_by_side["median_s"],
                         communication=side_by_side["median_s"] / ranks["median_s"],
                         step_s={"1x1": single["median_s"], "1x1, half the rows": half["median_s"],
                                 "2 x (1x1, half the rows), side by side": side_by_side["median_s"],
                                 "2x1": ranks["median_s"]},
                         allreduce_bytes=ranks.get("allreduce_bytes"), allreduce_share=ranks.get("allreduce_share")))
    return rows


def table(rows):
    out = ["| preset | model | side | tok/s 1x1 | tok/s 1x2 | tok/s 2 ranks x 1 | efficiency | = compute scaling "
           "| x sharing | x communication | 2x1 vs 1x2 | all-reduced per step | all-reduce share |",
           "|" + "---|" * 13]
    for r in rows:
        t = r["tokens_per_s"]
        mib = f"{r['allreduce_bytes'] / 2**20:.2f} MiB" if r["allreduce_bytes"] else "-"
        share = f"{100 * r['allreduce_share']:.1f} %" if r["allreduce_share"] is not None else "-"
        out.append(f"| {r['preset']} | {r['model']} | {r['side']} | {t['1x1']:,.0f} | {t['1x2']:,.0f} | "
                   f"{t['2x1']:,.0f} | {100 * r['efficiency']:.0f} % | {100 * r['compute_scaling']:.0f} % | "
                   f"{100 * r['sharing']:.0f} % | {100 * r['communication']:.0f} % | {r['vs_1x2']:.2f}x | "
                   f"{mib} | {share} |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["char-small", "tok-small"])
    parser.add_argument("--model", default="mosaic", choices=["mosaic", "gpt"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reference", type=Path, help="folder with the official mosaic_model.py, gpt_model.py")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--rows-of", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--alone", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work = worker_ours if args.worker == "ours" else worker_torch
        extra = (args.reference,) if args.worker == "torch" else ()
        rank, result = work(args.presets[0], args.model, args.steps, args.warmup, *extra, rows_of=args.rows_of,
                            alone=args.alone)
        if rank == 0:
            print(json.dumps(result), flush=True)
        return
    if distributed.find_mpiexec() is None:
        raise SystemExit(f"no mpiexec: {distributed.DIST_EXTRA}")
    machine = bench._machine("cpu", 2)
    print(f"{machine['cpu']} ({machine['cores']} cores, load {machine['load_average']:.1f}) | "
          f"{time.strftime('%Y-%m-%d')} | {args.steps} steps after {args.warmup} warm-up")
    rows = [row for preset in args.presets for row in measure(preset, args.model, args.steps, args.warmup,
                                                              args.reference)]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, date=time.strftime("%Y-%m-%d"), rows=rows),
                                        indent=1))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
