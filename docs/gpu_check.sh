#!/bin/bash
# The next GPU checks, in one go, about 9.5 minutes on one H100 / H200 (a lent GPU here has 15 minutes in all):
#
#   OUT=runs/gpu bash docs/gpu_check.sh          # from the repo root, on a machine with one CUDA GPU
#
# In order of what is still unknown (docs/RESULTS.md, "On a GPU"; the eager bench against diffusers is measured there,
# `--parts epoch` re-takes it):
# 1. the bench's sampling call under torch.compile's reduce-overhead mode (CUDA graphs) against the default mode,
#    while the CPUs write random SD v1-4 weights in the published layout to /tmp/sd-v1-4-random;
# 2. train.py at that size: bf16 eager at train batch 1 (peak memory after the chunked VAE decode; the target is 8 GB),
#    then bf16 + torch.compile at train batch 4 (the default CUDA path; epoch 1 is the compiled throughput).
# Each stage has its own time limit, so one slow stage cannot eat the others; logs and JSON land in $OUT.
# diffusers is optional: wheels in .whl/ are installed to /tmp/site first (the lent machines have no network).
# RESULTS.md names the commit of this script that produced each figure.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-570}  # seconds for the whole script
stage() {  # stage NAME SECONDS COMMAND...: run with a limit that also respects the overall deadline
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - SECONDS - 5))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then echo "== $name: skipped, out of time"; return; fi
    echo "== $(date +%T) $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $SECONDS s"; tail -n 40 "$OUT/$name.log"
}
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# The random full-size folder for train.py, written on 4 CPU threads while the bench uses the GPU.
SD=/tmp/sd-v1-4-random
OMP_NUM_THREADS=4 python3 -c "import sys; sys.path[:0] = ['tests', '.']; import test_1_model_full_size as t; \
print(t.write_folder('$SD'))" > "$OUT/write_folder.log" 2>&1 &
WRITER=$!

stage bench_compile_sample 170 python3 -m nanoddpo.bench --precisions bf16 --compile-modes default,reduce-overhead \
    --parts sample --repeats 5 --no-baseline --out-dir "$OUT"
wait $WRITER; echo "folder written: $(tail -n 1 "$OUT/write_folder.log")"

TRAIN="python3 train.py --preset sd14 --model $SD --reward jpeg --out-dir /tmp/runs --save-every 100 --grid-every 100"
stage train_bf16_tb1 90 $TRAIN --name tb1 --compile off --batch-size 8 --batches-per-epoch 1 --train-batch-size 1 \
    --grad-accum 8 --epochs 1
stage train_bf16_compile_tb4 400 $TRAIN --name compile --compile on --batch-size 8 --batches-per-epoch 2 \
    --train-batch-size 4 --grad-accum 4 --epochs 2
for run in tb1 compile; do
    cp "/tmp/runs/$run/metrics.jsonl" "$OUT/metrics_$run.jsonl" 2> /dev/null && cat "$OUT/metrics_$run.jsonl"
done
echo "== done after $SECONDS s"
