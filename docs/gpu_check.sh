#!/bin/bash
# The next GPU checks, in one go, about 9.5 minutes on one H100 / H200 (a lent GPU here has 15 minutes in all):
#
#   OUT=runs/gpu bash docs/gpu_check.sh          # from the repo root, on a machine with one CUDA GPU
#
# In order of what is still unknown (docs/RESULTS.md, "The fourth lent H200"): the UNet's memory layout in training,
# then its attention kernels. Compiled, the LoRA training call at UNet batch 32 spent 7% of its kernel time in cuDNN's
# copies between NCHW and NHWC around its convolutions: inductor's layout heuristic leaves a training graph NCHW when a
# conv has twice as many input channels as output channels (SD's up blocks, on their concatenated skips).
# 1. train.py at train batch 16 (the fastest so far: 3,962 trajectories/hour on an H200, epoch 1 of
#    `--train-batch-size 16 --grad-accum 1`) with inductor's layout optimisation forced on from outside
#    (TORCHINDUCTOR_FORCE_LAYOUT_OPT=1; no change to train.py): epoch 0 compiles (about 3.5 min), epoch 1 is the figure;
# 2. the LoRA training call alone (docs/profile_lora_call.py, about 2 minutes a variant, as many as time allows), in
#    the same process: compiled as train.py does (the baseline), with attention through FlashAttention-2 only (cuDNN's
#    fused attention was 27% of the call, its backward 2.6x its forward), with the UNet's weights in NHWC.
# Each stage has its own time limit, so one slow stage cannot eat the other; logs and metrics land in $OUT.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-565}  # seconds for the whole script
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
    --epochs 2 --train-batch-size 16 --grad-accum 1"
stage train_sd14_tb16_forced 265 env TORCHINDUCTOR_FORCE_LAYOUT_OPT=1 python3 train.py $ARGS --name forced
cp /tmp/runs/forced/metrics.jsonl "$OUT/metrics_forced.jsonl" 2> /dev/null && cat "$OUT/metrics_forced.jsonl"
stage profile 300 env PYTHONPATH=. OUT="$OUT" python3 docs/profile_lora_call.py 16 compiled compiled-flash compiled-nhwc
echo "== done after $SECONDS s"
