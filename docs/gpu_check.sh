#!/bin/bash
# The next GPU checks, in one go, about 9.5 minutes on one H100 / H200 (a lent GPU here has 15 minutes in all):
#
#   OUT=runs/gpu bash docs/gpu_check.sh          # from the repo root, on a machine with one CUDA GPU
#
# In order of what is still unknown (docs/RESULTS.md, "On a GPU" and "Compiled train.py and CUDA graphs"):
# 1. the bench's LoRA training call compiled, default mode against reduce-overhead (CUDA graphs), while the CPUs write
#    random SD v1-4 weights in the published layout to /tmp/sd-v1-4-random;
# 2. train.py at that size with the sd14 defaults (bf16, compiled, sampling batch 16, train batch 8): epoch 0 should
#    now compile two UNet graphs, not three; epoch 1 is the throughput (3,726 trajectories/hour before);
# 3. the same with inductor's CUDA graphs (TORCHINDUCTOR_CUDAGRAPHS=1), then with train batch 16.
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

stage bench_compile_lora 150 python3 -m nanoddpo.bench --precisions bf16 --compile-modes default,reduce-overhead \
    --parts lora --repeats 5 --no-baseline --out-dir "$OUT"
wait $WRITER; echo "folder written: $(tail -n 1 "$OUT/write_folder.log")"

TRAIN="python3 train.py --preset sd14 --model $SD --reward jpeg --out-dir /tmp/runs --save-every 100 --grid-every 100 \
    --batches-per-epoch 1 --epochs 2"
stage train_sd14 200 $TRAIN --name sd14
stage train_sd14_cudagraphs 200 env TORCHINDUCTOR_CUDAGRAPHS=1 $TRAIN --name cudagraphs
stage train_sd14_tb16 200 $TRAIN --name tb16 --train-batch-size 16 --grad-accum 1
for run in sd14 cudagraphs tb16; do
    cp "/tmp/runs/$run/metrics.jsonl" "$OUT/metrics_$run.jsonl" 2> /dev/null && cat "$OUT/metrics_$run.jsonl"
done
echo "== done after $SECONDS s"
