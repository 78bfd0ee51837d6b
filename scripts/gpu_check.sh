#!/usr/bin/env bash
# GPU check for a machine with CuPy, torch and an NVIDIA GPU (installs nothing from the network).
# Runs the GPU tests, a short GPU training run, and the benchmarks against the official PyTorch code;
# prints a compact table last. Usage: bash scripts/gpu_check.sh [OUT_DIR]
# The official files must be in reference/ (git-ignored): reference/mosaic_model.py, reference/gpt_model.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/gpu_check}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

echo "== GPU tests"
$py -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$out/gpu_tests.txt"

echo "== 3-minute char-medium run on tinyshakespeare (batch 64)"
data_dir="${MINIMOSAIC_DATA_DIR:-shared/data}"
if [ -f "$data_dir/tinyshakespeare.txt" ]; then
  rm -rf "$out/shk"
  timeout -s INT 190 $py -m minimosaic.cli train --device gpu --data shakespeare --data-dir "$data_dir" \
    --preset char-medium --batch-size 64 --steps 100000 --eval-interval 100 --out "$out/shk" \
    > "$out/train.txt" 2>&1
  tail -3 "$out/train.txt"
else
  echo "no $data_dir/tinyshakespeare.txt: skipping the training run"
fi

echo "== benchmarks"
ref=()
[ -f reference/mosaic_model.py ] && ref+=(--reference-file reference/mosaic_model.py)
[ -f reference/gpt_model.py ] && ref+=(--reference-gpt-file reference/gpt_model.py)
for preset in tok-small gpt2-small-like; do
  $py -m minimosaic.cli bench --device gpu --preset "$preset" --model both --steps 10 --warmup 3 \
    "${ref[@]}" --json "$out/bench-$preset.json" > "$out/bench-$preset.txt" 2>&1
done

echo "== summary"
$py - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'config':16} {'run':28} {'tokens/s':>10} {'ms/step':>9} {'GPU MiB':>9} {'TFLOP/s':>8}")
for f in sorted(out.glob("bench-*.json")):
    result = json.loads(f.read_text())
    for r in result["runs"]:
        print(f"{result['preset']:16} {r['label']:28} {r.get('tokens_per_s', 0):10.0f} "
              f"{r.get('ms_median', 0):9.1f} {r.get('gpu_mem_mb', r.get('peak_rss_mb', 0)):9.0f} "
              f"{r.get('gflops', 0) / 1000:8.2f}")
    for ratio in result["ratios"]:
        print("   ratio:", ratio)
log = out / "shk" / "log.jsonl"
if log.exists():
    vals = [json.loads(l) for l in log.read_text().splitlines()]
    vals = [(r["step"], r["elapsed_s"], r["val_loss"]) for r in vals if r.get("val_loss") is not None]
    print("char-medium val loss by (step, seconds):", [(s, round(t), round(v, 3)) for s, t, v in vals])
PY
for f in "$out"/bench-*.txt; do echo "--- $f"; cat "$f"; done
