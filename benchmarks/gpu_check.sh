#!/usr/bin/env bash
# Run every @pytest.mark.gpu test on a CUDA machine, then the benchmarks on the GPU (ours beside transformers'
# Idefics2, bfloat16, Idefics2-8B widths: `--preset idefics2`), and print one combined table. About 3-4 minutes on
# one H100/H200; every step runs under a time limit cut from a 290 s budget, so the check ends within 5 minutes even
# if a step hangs (a step cut short is reported as failed, and the table shows what did finish).
# Uses the python that holds a CUDA torch (PYTHON=... to choose), with vlmforge installed in it
# (pip install --no-deps .); installs nothing itself. Extra arguments go to pytest. DTYPE=fp32 benchmarks in
# float32 instead. DEVICE=cpu is a dry run of the plumbing on a machine without a GPU (CPU sizes,
# no time budget; the GPU tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
    DTYPE=${DTYPE:-fp32}
    "$PYTHON" -P -c "import torch, vlmforge; print(torch.__version__, 'CPU dry run')"
else
    DTYPE=${DTYPE:-bf16}
    "$PYTHON" -P -c "import torch, vlmforge; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name())"
fi

RESULTS=$(mktemp -d)
trap 'rm -rf "$RESULTS"' EXIT
status=0
budget=290
if [ "$DEVICE" = cpu ]; then budget=1200; fi
deadline=$((SECONDS + budget))

# step NAME LIMIT COMMAND...: run COMMAND under min(LIMIT, what is left of the budget), its exit status in $last;
# a failure sets status=1
last=0
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    echo
    echo "== $name (limit ${limit} s)"
    if [ "$limit" -lt 10 ]; then
        echo "$name skipped: the time budget is spent"
        status=1
        last=124
        return 0
    fi
    set +e
    timeout "$limit" "$@"
    last=$?
    set -e
    if [ "$last" -ne 0 ]; then
        echo "$name failed (exit status $last; 124 = ran past ${limit} s)"
        status=1
    fi
    return 0
}

# -P: the repo root must not shadow the installed vlmforge (its subpackages live outside vlmforge/)
step "pytest -m gpu" 130 bash -c \
    '"$0" -P -m pytest -q -m gpu -p no:cacheprovider tests "${@:2}" 2>&1 | tee "$1"; exit "${PIPESTATUS[0]}"' \
    "$PYTHON" "$RESULTS/pytest.log" "$@"
touch "$RESULTS/pytest.log"
"$PYTHON" -P benchmarks/_common.py record-tests "$RESULTS/results.jsonl" "$RESULTS/pytest.log" "$last"

# the benchmark scripts put their own folder on sys.path, so -P is safe for them too; each appends its rows
limit=40  # 130 s of tests (flex compiles its kernels) + 4 × 40 s fits the 290 s budget
if [ "$DEVICE" = cpu ]; then limit=240; fi
for bench in bench_vision bench_prefill_decode bench_lora_step bench_tradeoffs; do
    step "$bench --device $DEVICE --dtype $DTYPE" "$limit" \
        "$PYTHON" -P "benchmarks/$bench.py" --device "$DEVICE" --dtype "$DTYPE" --json "$RESULTS/results.jsonl"
done
# the packed vision path's CUDA kernel, where FlashAttention is installed (only if time is left)
if [ "$DEVICE" != cpu ] && "$PYTHON" -P -c "import flash_attn" 2>/dev/null && [ $((deadline - SECONDS)) -ge 40 ]; then
    step "bench_vision --attn flash_attention_2" "$limit" \
        "$PYTHON" -P benchmarks/bench_vision.py --device "$DEVICE" --dtype "$DTYPE" --attn flash_attention_2 \
        --no-memory --json "$RESULTS/results.jsonl"
fi

echo
echo "== combined: GPU tests and benchmarks ($DEVICE, $DTYPE; $SECONDS s)"
touch "$RESULTS/results.jsonl"
"$PYTHON" -P benchmarks/_common.py summarize "$RESULTS/results.jsonl"
exit $status
