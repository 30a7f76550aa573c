#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in about 8 minutes, run the GPU tests (bf16 training step
# against fp32, compiled against eager, CUDA-graph / compiled / Jacobi sampling against cached),
# measure the training step's MFU and the sampler's throughput at the paper's flow size
# (`simflow bench --preset imagenet256`, config/config.yaml's flow), and write docs/gpu_report.md.
#
#   bash scripts/gpu_check.sh                       # writes docs/gpu_report.md
#   bash scripts/gpu_check.sh --out FILE --work DIR --batch 32 --sample-batch 32
#
# Without a CUDA device it stops at once with "no CUDA device" (exit 2). Each step has its own
# time limit; a step that fails or runs out of time is reported as such, the others still run.
# Exit status: 0 when every GPU test passed, 1 otherwise (the report is written either way).
# docs/performance.md ("The GPU check") says what to do with the report.
set -uo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
out=docs/gpu_report.md
work=results/gpu_check
batch=64
sample_batch=64
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=${2:?--out needs a file}; shift 2 ;;
        --work) work=${2:?--work needs a folder}; shift 2 ;;
        --batch) batch=${2:?--batch needs a number}; shift 2 ;;
        --sample-batch) sample_batch=${2:?--sample-batch needs a number}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (use --out, --work, --batch, --sample-batch)" >&2; exit 2 ;;
    esac
done
for n in "$batch" "$sample_batch"; do
    case "$n" in ''|*[!0-9]*|0) echo "gpu_check: batch sizes must be positive integers, got '$n'" >&2; exit 2 ;; esac
done

python=${PYTHON:-python3}
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine" >&2
    exit 2
fi

mkdir -p "$work"
log="$work/gpu_check.log"
: > "$log"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log it, never stop the script
    local limit=$1 name=$2; shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "   $name: timed out after ${limit}s" | tee -a "$log"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "   $name: failed (exit $rc)" | tee -a "$log"
    return $rc
}

tests_rc=0
step 240 "GPU tests" "$python" -m pytest -q -p no:cacheprovider --junitxml="$work/tests.xml" \
    tests/test_gpu.py "tests/test_sampling_fast_paths.py::test_cuda_graph_step_equals_eager_on_gpu" \
    || tests_rc=1
rm -f "$work/train.json" "$work/sample.json"
step 150 "training step, MFU (imagenet256)" "$python" -m simflow.bench --preset imagenet256 \
    --parts train --batch "$batch" --steps 5 --warmup 2 --out "$work/train.json"
step 150 "sampler throughput (imagenet256)" "$python" -m simflow.bench --preset imagenet256 \
    --parts sample --sample-batch "$sample_batch" --sample-warmup 1 --sample-repeats 1 \
    --modes cached,cuda_graph,cached+cfg,cuda_graph+cfg,jacobi+cfg --jacobi-block-size 16 \
    --out "$work/sample.json"

"$python" -m simflow.gpu_report --junit "$work/tests.xml" --train "$work/train.json" \
    --sample "$work/sample.json" --out "$out" \
    --meta "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --meta "date=$(date -u +%Y-%m-%dT%H:%MZ)" --meta "log=$log" || exit 1
exit $tests_rc
