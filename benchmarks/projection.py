"""Data parallelism past this machine, on paper: step time and efficiency of N GPUs, from a measured
one-GPU step time and the bytes each step all-reduces.

    python benchmarks/projection.py                 # prints the table, writes benchmarks/figures/projection.png

The model (a ring all-reduce, as NCCL runs on one node and, across nodes, along the slowest links):

    t_allreduce(N) = 2 (N - 1) / N * bytes / bus_bandwidth  +  2 (N - 1) * latency
    t_step(N)      = t_compute(rows per GPU) + t_allreduce(N)            (ours: no overlap)
                     max(t_compute, t_allreduce)                          (perfect overlap, DDP's best case)
    efficiency     = t_compute / t_step

t_compute is the H100 step time of README's GPU table (2026-11-26, CUDA graph, batch 8 per GPU), taken
as proportional to the rows per GPU (optimistic for few rows: a GPU does not get faster below some size).
bytes = 4 x parameters (float32 gradients; the count comes from building the model here).

Assumed links, from the vendors' published figures, de-rated to 80 % for what NCCL reaches:
  NVLink 4 (one 8-GPU H100 node): 450 GB/s each way per GPU (NVIDIA: 900 GB/s bidirectional) -> 360 GB/s,
                                  latency 3 us per ring step
  InfiniBand NDR (64 GPUs, 8 nodes, one 400 Gb/s ConnectX-7 port per GPU): 50 GB/s -> 40 GB/s,
                                  latency 5 us per ring step (the ring crosses the IB links: they bound it)
Weak scaling keeps 8 rows per GPU (the global batch grows with N); strong scaling keeps the global
batch at 64 rows, so each GPU's share shrinks while the all-reduce does not.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))

MEASURED_H100_MS = {"tok-small": 6.8, "gpt2-small-like": 121.8}   # README's GPU table, 8 rows per step
MEASURED_ROWS = 8
LINKS = {  # name: (GPUs, bus bandwidth bytes/s, latency s per ring step)
    "NVLink, 1 node": (8, 0.8 * 450e9, 3e-6),
    "InfiniBand, 8 nodes": (64, 0.8 * 50e9, 5e-6),
}


def parameters(preset):
    from minimosaic import bench, models

    s = bench.resolve_settings(preset)
    config = bench.model_config("mosaic", s)
    return models.build_model(config).num_parameters()


def allreduce_s(n, nbytes, bandwidth, latency):
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def project(preset, nbytes, counts, bandwidth, latency, rows_per_gpu=None, global_rows=None):
    """[(N, rows per GPU, compute s, all-reduce s, efficiency without overlap, with perfect overlap)]."""
    out = []
    for n in counts:
        rows = rows_per_gpu if rows_per_gpu is not None else global_rows / n
        compute = MEASURED_H100_MS[preset] / 1e3 * rows / MEASURED_ROWS
        comm = allreduce_s(n, nbytes, bandwidth, latency)
        out.append((n, rows, compute, comm, compute / (compute + comm), compute / max(compute, comm)))
    return out


def main():
    rows = []
    for preset in MEASURED_H100_MS:
        nbytes = 4 * parameters(preset)
        for link, (gpus, bandwidth, latency) in LINKS.items():
            counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= gpus]
            for scaling, kwargs in (("weak", dict(rows_per_gpu=8)), ("strong", dict(global_rows=64))):
                for n, r, c, a, e, eo in project(preset, nbytes, counts, bandwidth, latency, **kwargs):
                    rows.append(dict(preset=preset, mib=nbytes / 2**20, link=link, scaling=scaling, n=n,
                                     rows=r, compute_ms=1e3 * c, allreduce_ms=1e3 * a, eff=e, eff_overlap=eo))
    print("| preset (all-reduced/step) | link | scaling | GPUs | rows/GPU | compute ms | all-reduce ms | "
          "efficiency | with overlap |")
    print("|" + "---|" * 9)
    for r in rows:
        if (r["n"] == 64) or (r["n"] == 8 and r["link"].startswith("NV")):  # a full node; 8 full nodes
            print(f"| {r['preset']} ({r['mib']:.0f} MiB) | {r['link']} | {r['scaling']} | {r['n']} | "
                  f"{r['rows']:g} | {r['compute_ms']:.2f} | {r['allreduce_ms']:.2f} | {100 * r['eff']:.0f} % | "
                  f"{100 * r['eff_overlap']:.0f} % |")
    figure(rows, HERE.parent / "figures" / "projection.png")


def figure(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, scaling in zip(axes, ("weak", "strong")):
        for preset, color in zip(MEASURED_H100_MS, ("tab:blue", "tab:red")):
            pts = sorted({r["n"]: r for r in rows if r["preset"] == preset and r["scaling"] == scaling
                          and (r["link"].startswith("NV") or r["n"] > 8)}.values(), key=lambda r: r["n"])
            ax.plot([r["n"] for r in pts], [100 * r["eff"] for r in pts], "o-", color=color,
                    label=f"{preset}, no overlap")
            ax.plot([r["n"] for r in pts], [100 * r["eff_overlap"] for r in pts], "o--", color=color, alpha=0.5,
                    label=f"{preset}, perfect overlap")
        ax.axvline(8, color="gray", lw=0.8)
        ax.text(8.3, 5, "NVLink | InfiniBand", fontsize=8, color="gray")
        ax.set(xscale="log", xlabel="GPUs", title=f"{scaling} scaling "
               f"({'8 rows per GPU' if scaling == 'weak' else 'global batch 64 rows'})", ylim=(0, 105))
        ax.set_xticks([1, 2, 4, 8, 16, 32, 64], ["1", "2", "4", "8", "16", "32", "64"])
    axes[0].set_ylabel("efficiency (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Projected data-parallel efficiency on H100s (a ring all-reduce model)")
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
