#!/usr/bin/env bash
# The CPU check, for a CPU kind whose numbers the README does not have yet (it installs nothing).
#
#   bash scripts/cpu_check.sh [quick|full] [OUT_DIR]
#
# full (about 25 minutes on 2 cores): what this CPU does with the step's building blocks
#   (op_profile --cpu-rates), the tile and block sizes swept (tile_sweep), `minimosaic bench` on
#   char-small (3 rounds, both models, the official code as shipped and with the same allocator, the plain
#   core beside the fast layer), tok-small and char-medium, and, where mpiexec is found, data_parallel.py.
# quick (about 3 minutes): the same stages on a few steps, to see that they run.
# Needs (git-ignored, never committed): mosaic_model.py and gpt_model.py, the official code, in reference/
# (or in the folder CPU_CHECK_REFERENCE names) for the official columns; without them, our side alone.
# Run it on an otherwise idle machine: the load average is printed with every table. Logs and JSON are
# kept in OUT_DIR (default /tmp/cpu_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-full}"
out="${2:-/tmp/cpu_check_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3

stage() {  # stage NAME COMMAND...: log to $out/NAME.txt and show its end
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@" > "$out/$name.txt" 2>&1
  echo "   (exit $? after $((SECONDS - start)) s)" | tee -a "$out/$name.txt"
  tail -n "${TAIL:-8}" "$out/$name.txt"
}

{ date -u '+%Y-%m-%d %H:%M UTC'
  lscpu | grep -E '^(Model name|Vendor ID|CPU\(s\)|L2 cache|L3 cache|Flags)' | cut -c1-160
  $py -c "import numpy; print('numpy', numpy.__version__); numpy.show_config()" 2>&1 |
    grep -iE "^numpy|name:|openblas|mkl" | head -6
  $py -c "import torch; print('torch', torch.__version__)" 2>/dev/null
} 2>&1 | tee "$out/machine.txt"

ref="${CPU_CHECK_REFERENCE:-reference}"
mosaic_reference=() gpt_reference=()
[ -f "$ref/mosaic_model.py" ] && mosaic_reference=(--reference-file "$ref/mosaic_model.py")
[ -f "$ref/gpt_model.py" ] && gpt_reference=(--reference-gpt-file "$ref/gpt_model.py")

if [ "$mode" = quick ]; then
  steps=(--steps 2 --warmup 1) big_steps=(--steps 2 --warmup 1) rounds=1 repeats=1
  dp=(--steps 2 --warmup 1 --presets char-tiny)
else
  steps=(--steps 15 --warmup 3) big_steps=(--steps 6 --warmup 2) rounds=3 repeats=7 dp=()
fi

for preset in char-small tok-small; do
  TAIL=14 stage "rates-$preset" $py benchmarks/op_profile.py --preset "$preset" --cpu-rates "${big_steps[@]}"
  TAIL=9 stage "sweep-$preset" $py benchmarks/tile_sweep.py --preset "$preset" --repeats "$repeats"
done
TAIL=30 stage bench-char-small $py -m minimosaic.cli bench --preset char-small --model both --rounds "$rounds" \
  --also-plain --no-generation --same-allocator ${mosaic_reference[@]+"${mosaic_reference[@]}"} \
  ${gpt_reference[@]+"${gpt_reference[@]}"} "${steps[@]}" --json "$out/bench-char-small.json"
for preset in tok-small char-medium; do
  TAIL=20 stage "bench-$preset" $py -m minimosaic.cli bench --preset "$preset" --model mosaic --also-plain \
    --no-generation --same-allocator ${mosaic_reference[@]+"${mosaic_reference[@]}"} "${big_steps[@]}" \
    --json "$out/bench-$preset.json"
done
if $py -c "from minimosaic.fast import distributed; raise SystemExit(distributed.mpi_missing() is not None)"; then
  dp_reference=()
  [ -f "$ref/mosaic_model.py" ] && dp_reference=(--reference "$ref")
  TAIL=8 stage data-parallel $py benchmarks/data_parallel.py ${dp_reference[@]+"${dp_reference[@]}"} \
    ${dp[@]+"${dp[@]}"} --json "$out/data-parallel.json"
else
  echo "== data-parallel: skipped (no mpi4py or mpiexec: pip install -e '.[dist]')"
fi
echo "== done: logs and JSON in $out; add the tables to README.md and benchmarks/NOTES.md with the CPU model"
