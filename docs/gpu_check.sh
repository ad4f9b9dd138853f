#!/bin/bash
# The next GPU checks, in one go, about 9.5 minutes on one H100 / H200 (a lent GPU here has 15 minutes in all):
#
#   OUT=runs/gpu bash docs/gpu_check.sh          # from the repo root, on a machine with one CUDA GPU
#
# In order of what is still unknown (docs/RESULTS.md, "The third lent H200"):
# 1. train.py with inductor's CUDA graphs (TORCHINDUCTOR_CUDAGRAPHS=1) and torch.compiler.cudagraph_mark_step_begin()
#    before each call of the compiled UNet, patched in from outside: without it, torch 2.11 stopped in the first backward
#    ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run");
# 2. train.py at train batch 16 (sampling batch 16), to its steady state: the last GPU ran out of time in epoch 1.
# Both use the sd14 defaults otherwise (bf16, compiled, 50 steps, every step trained) on one batch of 16 per epoch, so
# --grad-accum 2 (or 1 at train batch 16) replaces the preset's 8; epoch 0 compiles (about 3 minutes), epochs 1-2 are
# the throughput (3,726-3,770 trajectories/hour at train batch 8 before).
# Each stage has its own time limit, so one slow stage cannot eat the other; logs and metrics land in $OUT.
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# The random full-size folder for train.py, written on all CPU threads first.
SD=/tmp/sd-v1-4-random
ls $SD/unet > /dev/null 2>&1 || python3 -c "import sys; sys.path[:0] = ['tests', '.']; import test_1_model_full_size as t; \
print(t.write_folder('$SD'))" > "$OUT/write_folder.log" 2>&1
echo "folder written after $SECONDS s"

ARGS="--preset sd14 --model $SD --reward jpeg --out-dir /tmp/runs --save-every 100 --grid-every 100 --batches-per-epoch 1 \
    --epochs 3"
# train.py with each call of the compiled UNet (sampling, KL metric, training) marked as a new step for CUDA graphs,
# patched in from outside (no change to train.py): torch.compile is wrapped before train.py calls it
MARKED="import sys, torch, train
compile = torch.compile
def marked(module, **kw):
    compiled = compile(module, **kw)
    return lambda *a: (torch.compiler.cudagraph_mark_step_begin(), compiled(*a))[1]
torch.compile = marked
sys.argv[0] = 'train.py'; train.main(*train.parse_settings())"
stage train_sd14_cudagraphs 270 env TORCHINDUCTOR_CUDAGRAPHS=1 python3 -c "$MARKED" $ARGS --grad-accum 2 --name cudagraphs
stage train_sd14_tb16 270 python3 train.py $ARGS --train-batch-size 16 --grad-accum 1 --name tb16
for run in cudagraphs tb16; do
    cp "/tmp/runs/$run/metrics.jsonl" "$OUT/metrics_$run.jsonl" 2> /dev/null && cat "$OUT/metrics_$run.jsonl"
done
echo "== done after $SECONDS s"
