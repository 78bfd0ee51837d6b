#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, CuPy and torch (it installs nothing).
#
#   bash scripts/gpu_check.sh [quick|full] [OUT_DIR]
#
# quick: the GPU tests and the benchmarks of the Memory Mosaic against the official code.
# full:  the GPU tests, a 3-minute char-medium training run on tinyshakespeare, and the benchmarks.
# Logs go to a scratch folder and come back as OUT_DIR/gpu_check.tgz; the summary table is printed last.
# Needs (git-ignored, never committed): reference/mosaic_model.py and reference/gpt_model.py (the official
# code), and tinyshakespeare.txt in $MINIMOSAIC_DATA_DIR (default .devdata/) for the training run.
# Set GPU_CHECK_TF32=1 to run both sides with TF32 matmuls; GPU_CHECK_TESTS="tests/test_x.py ..." runs only
# those test files in quick mode; GPU_CHECK_EXTRA=1 adds tok-small without our CUDA kernels and
# gpt2-small-like with TF32 on both sides.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-full}"
out="${2:-${OUT:-/tmp/gpu_check_out}}"
logs=/tmp/gpu_check_logs
rm -rf "$logs" && mkdir -p "$logs" "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3
tf32=()
[ "${GPU_CHECK_TF32:-0}" = 1 ] && tf32=(--tf32)

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $logs/NAME.txt, show its end
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name"
  timeout -k 5 "$limit" "$@" > "$logs/$name.txt" 2>&1
  echo "   (exit $? after $((SECONDS - start)) s)" | tee -a "$logs/$name.txt"
  tail -n "${TAIL:-6}" "$logs/$name.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import cupy, numpy, torch; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$logs/machine.txt"

workers=()
$py -c "import xdist" 2>/dev/null && workers=(-n 16)
if [ "$mode" = quick ]; then
  # about 5 minutes: find what breaks, then the benchmarks (GPU_CHECK_PROFILE=1 adds per-op profiles)
  TAIL=14 stage gpu_tests 120 $py -m pytest -q -m gpu -p no:cacheprovider "${workers[@]}" -rfE --durations=5 \
    ${GPU_CHECK_TESTS:-}
  if [ "${GPU_CHECK_PROFILE:-0}" = 1 ]; then
    for preset in tok-small gpt2-small-like; do
      stage "profile-$preset" 40 $py benchmarks/op_profile.py --device gpu --preset "$preset" --steps 3 \
        --warmup 2 --json "$logs/profile-$preset.json"
    done
  fi
  bench_opts=(--steps "${GPU_CHECK_BENCH_STEPS:-10}" --warmup 3)
  bench_limit=75
else
  TAIL=14 stage gpu_tests 120 $py -m pytest -q -m gpu -p no:cacheprovider "${workers[@]}" -rfE --durations=5
  data_dir="${MINIMOSAIC_DATA_DIR:-.devdata}"
  if [ -f "$data_dir/tinyshakespeare.txt" ]; then
    # A 3-minute budget: --time-limit stops the loop (with a last evaluation); --steps sets the cosine
    # schedule's length to about what fits in it (GPU_CHECK_STEPS, from a quick run's step time).
    TAIL=4 stage train-char-medium 215 $py -m minimosaic.cli train --device gpu \
      --data "$data_dir/tinyshakespeare.txt" --data-dir /tmp/minimosaic-data --preset char-medium \
      --batch-size 64 --steps "${GPU_CHECK_STEPS:-2000}" --time-limit 180 --eval-interval 100 \
      --eval-batches 10 --log-interval 50 "${tf32[@]}" --out "$logs/shk"
  else
    echo "no $data_dir/tinyshakespeare.txt: no training run"
  fi
  bench_opts=(--steps 10 --warmup 3)
  bench_limit=90
fi

# the Memory Mosaic against the official code (training steps only: the targets are about training);
# ours replayed from a CUDA graph (the default), then ours eager, in the same call
ref=()
[ -f reference/mosaic_model.py ] && ref+=(--reference-file reference/mosaic_model.py)
for preset in tok-small gpt2-small-like; do
  TAIL=24 stage "bench-$preset" "$bench_limit" $py -m minimosaic.cli bench --device gpu --preset "$preset" \
    --model mosaic --no-generation "${bench_opts[@]}" "${tf32[@]}" "${ref[@]}" --json "$logs/bench-$preset.json"
  TAIL=3 stage "bench-eager-$preset" 45 $py -m minimosaic.cli bench --device gpu --preset "$preset" \
    --model mosaic --no-generation --no-cuda-graph "${bench_opts[@]}" "${tf32[@]}" --json "$logs/bench-eager-$preset.json"
done
# the plain core on the GPU (no fast layer: no kernels, no graph), so the table shows what the layer buys
TAIL=3 stage "bench-plain-core-tok-small" 60 $py -m minimosaic.cli bench --device gpu --preset tok-small \
  --model mosaic --no-generation --plain "${bench_opts[@]}" --json "$logs/bench-plain-core-tok-small.json"
if [ "${GPU_CHECK_EXTRA:-0}" = 1 ]; then
  # what the CUDA kernels bring (the fast layer without its kernels, eager), and both sides with TF32
  MINIMOSAIC_CUDA_KERNELS=0 TAIL=3 stage "bench-nokernels-tok-small" 60 $py -m minimosaic.cli bench --device gpu \
    --preset tok-small --model mosaic --no-generation --no-cuda-graph "${bench_opts[@]}" --json "$logs/bench-nokernels-tok-small.json"
  TAIL=3 stage bench-tf32-gpt2-small-like 90 $py -m minimosaic.cli bench --device gpu --preset gpt2-small-like \
    --model mosaic --no-generation "${bench_opts[@]}" --tf32 "${ref[@]}" --json "$logs/bench-tf32-gpt2-small-like.json"
fi

echo "== summary"
$py - "$logs" <<'PY' | tee "$logs/summary.txt"
import json, sys, pathlib
logs = pathlib.Path(sys.argv[1])
print(f"{'config':16} {'run':28} {'tokens/s':>10} {'ms/step':>9} {'GPU MiB':>9} {'TFLOP/s':>8} {'peak%':>6}")
for f in sorted(logs.glob("bench-*.json")):
    result = json.loads(f.read_text())
    variant = " [CUDA kernels off]" if "nokernels" in f.name else " [TF32]" if result.get("tf32") else ""
    for r in result["runs"]:
        label = (r["label"].replace("minimosaic", "ours").replace("official torch", "official") + variant)[:28]
        print(f"{result['preset']:16} {label:28} {r.get('tokens_per_s', 0):10.0f} "
              f"{r.get('ms_median', 0):9.1f} {r.get('gpu_mem_mb', 0):9.0f} "
              f"{r.get('gflops', 0) / 1000:8.2f} {100 * r.get('peak_fraction', 0):6.1f}")
    for ratio in result.get("ratios", []):
        print("   ratio:", ratio)
for f in sorted(logs.glob("profile-*.json")):
    p = json.loads(f.read_text())
    top = sorted(p["rows"].items(), key=lambda kv: -kv[1]["ms_per_step"])[:6]
    print(f"profile {p['preset']}: step {p['free_step_ms']:.1f} ms free, {p['synced_step_ms']:.1f} synced; top:",
          ", ".join(f"{k} {v['ms_per_step']:.1f}" for k, v in top))
log = logs / "shk" / "log.jsonl"
if log.exists():
    rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    vals = [(r["step"], round(r["elapsed_s"]), round(r["val_loss"], 3)) for r in rows if r.get("val_loss") is not None]
    print("char-medium (batch 64) val loss by (step, seconds, loss):", vals)
PY
tar czf "$out/gpu_check.tgz" --exclude "*.npz" -C /tmp gpu_check_logs
cp "$logs/summary.txt" "$out/summary.txt"
