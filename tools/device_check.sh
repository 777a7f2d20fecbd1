#!/usr/bin/env bash
# One device call for compiled decoding on a GPU (docs/benchmarks.md, "Compiled decoding"):
#   1. the compiled-vs-eager checks of tests/test_accelerator.py (inductor + CUDA graphs);
#   2. pangu-1b and openpangu-embedded-1b (random weights) in bf16 / int8 / int4, batch 1 and 16,
#      compiled vs eager in turns, with compile seconds and the share of the HBM roofline;
#   3. pangu-1b bf16 batch 1 again in a new process: compile seconds with torch's caches warm.
# Usage: tools/device_check.sh OUT_DIR [PEAK_GB_S]   (H100 SXM about 3350, H200 about 4800)
# Writes OUT_DIR/tests.txt, OUT_DIR/compiled-*.json and OUT_DIR/compiled-*.log.
set -u
out=${1:?usage: tools/device_check.sh OUT_DIR [PEAK_GB_S]}
peak=${2:-3350}
mkdir -p "$out"
py=${PYTHON:-python}
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1

timeout 120 "$py" -m pytest -q -p no:cacheprovider tests/test_accelerator.py -k "compiled" -x \
    > "$out/tests.txt" 2>&1
echo "tests: exit $?" >> "$out/tests.txt"

# cold: every shape compiles; the JSON is rewritten after each row, so a timeout keeps the rows done
timeout 330 "$py" -m pangu_tools.compiled_bench --model pangu-1b --model openpangu-embedded-1b \
    --scheme bf16,int8,int4 --batch 1,16 --new-tokens 64 --repeats 3 --peak-gbs "$peak" \
    --json "$out/compiled-cold.json" > "$out/compiled-cold.log" 2>&1
echo "bench cold: exit $?" >> "$out/compiled-cold.log"
# warm: a new process, torch's FX graph and AOT autograd caches filled by the run above
timeout 90 "$py" -m pangu_tools.compiled_bench --model pangu-1b --scheme bf16 --batch 1 --new-tokens 64 \
    --repeats 3 --peak-gbs "$peak" --json "$out/compiled-warm.json" > "$out/compiled-warm.log" 2>&1
echo "bench warm: exit $?" >> "$out/compiled-warm.log"
tail -n 3 "$out"/*.txt "$out"/*.log
