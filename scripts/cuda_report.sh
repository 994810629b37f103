#!/usr/bin/env bash
# The CUDA checks and GPU benchmark tables in one command: bash scripts/cuda_report.sh [OUTPUT_DIR]
# Steps (STEPS="tests operators default large" by default; e.g. STEPS=compiled bash scripts/cuda_report.sh OUT):
# - tests: tests/test_cuda.py and tests/test_triton.py, the fused operators, Triton kernels, state tape and cached
#   decoding on the GPU against the float64 reference (34 s on an H100 in session 6);
# - operators: the rewrite and the token convolution alone, per implementation, against the bytes they must move
#   (scripts/benchmark_operators.py at 16 x 1024 tokens of width 768, bfloat16 and float32);
# - default: the `small` size in bfloat16 at the benchmark's default shape (4 x 256 tokens per step), with rows for
#   the Triton kernels (`NAME@triton`);
# - large: 16 x 1024 tokens per step, float32 weights under bf16 autocast (Trainer's --bf16: float32 states, so the
#   state tape is on);
# - compiled (not in the default; it needs a call of its own, as its warm-up round compiles every graph: in session 6
#   it had not finished that round when a 540 s budget ran out; it now compiles 9 graphs, not 16): the default shape
#   with --compile, batch-1 decoding over a static cache with CUDA graphs, no TC (Inductor leaves its convolution to
#   cuDNN).
# Each step prints the seconds elapsed when it starts.
# Each step has its own time limit, so one slow step leaves the others their results; BUDGET=SECONDS caps the steps'
# time together (a step gets what is left, and none starts with under 30 s), e.g. to fit every step in one call.
set -uo pipefail
PY=${PYTHON:-python3}
[[ ${BUDGET:-86400} =~ ^[0-9]+$ ]] || { echo "BUDGET must be whole seconds, e.g. BUDGET=540" >&2; exit 2; }
steps=" ${STEPS:-tests operators default large} "
for step in $steps; do
    [[ " tests operators default large compiled " == *" $step "* ]] \
        || { echo "unknown step '$step' in STEPS; the steps are: tests operators default large compiled" >&2; exit 2; }
done
out=${1:-outputs/cuda}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute, before moving to the repository root
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv

budget_end=$((SECONDS + ${BUDGET:-86400}))
limit() {  # limit SECONDS: the step's own limit, or the budget's time left if that is shorter; fails under 30 s
    local left=$((budget_end - SECONDS))
    ((left >= 30)) || { echo "== skipped: ${left}s of the budget left" | tee -a "$out/tables.md" >&2; return 1; }
    echo $(($1 < left ? $1 : left))
}

bench() {  # bench NAME SECONDS ARGS...: one benchmark run; JSON under $out, log appended, table printed and kept
    local name=$1 seconds
    seconds=$(limit "$2") || return 0
    shift 2
    echo "== benchmark $name (${SECONDS}s in, ${seconds}s limit): $*" | tee -a "$out/tables.md"
    timeout "$seconds" "$PY" scripts/benchmark.py --device cuda --size small --output "$out/bench_$name.json" \
        --markdown "$out/table.tmp" "$@" >>"$out/benchmark.log" 2>&1 \
        || echo "== stopped (exit $?); timings so far in benchmark.log" | tee -a "$out/tables.md"
    if [ -f "$out/table.tmp" ]; then
        tee -a "$out/tables.md" <"$out/table.tmp" && rm "$out/table.tmp"
    fi
}

operators() {  # operators DTYPE: the operators alone at the large shape, against the bytes they must move
    local dtype=$1 seconds
    seconds=$(limit 120) || return 0
    echo "== operators, $dtype (${SECONDS}s in, ${seconds}s limit)" | tee -a "$out/tables.md"
    timeout "$seconds" "$PY" scripts/benchmark_operators.py --device cuda --dtype "$dtype" --batch_size 16 \
        --seq_len 1024 --hidden_size 768 --output "$out/operators_$dtype.json" >"$out/table.tmp" \
        2>>"$out/benchmark.log" || echo "== stopped (exit $?); the error is in benchmark.log" | tee -a "$out/tables.md"
    tee -a "$out/tables.md" <"$out/table.tmp" && rm "$out/table.tmp"
}

if [[ $steps == *" tests "* ]] && seconds=$(limit 120); then
    echo "== tests/test_cuda.py tests/test_triton.py (${SECONDS}s in, ${seconds}s limit)"
    timeout "$seconds" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton.py >"$out/cuda_tests.log" 2>&1
    echo "== exit $?"; tail -n 25 "$out/cuda_tests.log"
fi
if [[ $steps == *" operators "* ]]; then
    operators bfloat16
    operators float32
fi
[[ $steps == *" default "* ]] && bench default 200 --dtype bfloat16 --repeats 5 \
    --presets baseline ddl-scalar ddl-cc ddl-tc ddl-scalar@triton ddl-cc@triton ddl-tc@triton
[[ $steps == *" large "* ]] && bench large 250 --dtype bfloat16 --autocast --repeats 3 --seq_len 1024 --batch_size 16 \
    --presets baseline ddl-scalar ddl-cc ddl-tc ddl-cc@triton ddl-tc@triton
[[ $steps == *" compiled "* ]] && bench compiled 420 --dtype bfloat16 --compile --repeats 5 --memory false \
    --decode_batch_sizes 1 --presets baseline ddl-scalar ddl-cc
echo "== done (${SECONDS}s)"
exit 0
