#!/bin/bash
# The next GPU check: train.py twice, about 4.5 minutes each on one H100 / H200 (a lent GPU here has 15 minutes in all,
# and one device call at most 10), so best as two calls on the same warm machine (the random folder is kept in /tmp):
#
#   OUT=runs/gpu bash docs/gpu_check.sh tb16        # from the repo root, on a machine with one CUDA GPU
#   OUT=runs/gpu bash docs/gpu_check.sh tb16_nhwc   # (no argument: both, in one go, if 10 minutes allow)
#
# What is still unknown (docs/RESULTS.md, "The sixth lent H200"): the training call alone is 1.9% faster with the UNet's
# weights in NHWC, but sampling under NHWC was never timed, and no figure so far comes from an H100 (the target is
# 4,500 trajectories per H100-hour). So train.py runs at train batch 16 (sampling batch 16, one batch an epoch):
#   tb16        as it is;
#   tb16_nhwc   the same, with the UNet's weights put in NHWC just before torch.compile, patched in from outside
#               (no change to train.py).
# Epoch 0 compiles (about 3.5 minutes); epoch 1 is the throughput (3,962-3,964 per H200-hour for tb16 before).
# Each stage has its own time limit, so one slow stage cannot eat the other; logs and metrics land in $OUT.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-565}  # seconds for the whole script (a device call may run 600)
stage() {  # stage NAME SECONDS COMMAND...: run with a limit that also respects the overall deadline
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - SECONDS - 5))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then echo "== $name: skipped, out of time"; return; fi
    echo "== $(date +%T) $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $SECONDS s"; tr '\r' '\n' < "$OUT/$name.log" | grep -E "^epoch [0-9]+:|^run:|Error|error" | tail -n 12
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
# The UNet's 4-d weights (its convs) in NHWC, in place, before train.py compiles it: LoRA's weights are 2-d and stay
NHWC="import sys, torch, train
compile = torch.compile
def nhwc(module, **kw):
    return compile(module.to(memory_format=torch.channels_last), **kw)
torch.compile = nhwc
sys.argv[0] = 'train.py'; train.main(*train.parse_settings())"
RUNS=${*:-tb16 tb16_nhwc}
for run in $RUNS; do
    case $run in
        tb16) stage tb16 330 python3 train.py $ARGS --name tb16 ;;
        tb16_nhwc) stage tb16_nhwc 330 python3 -c "$NHWC" $ARGS --name tb16_nhwc ;;
        *) echo "gpu_check.sh: unknown stage $run (tb16, tb16_nhwc)"; exit 1 ;;
    esac
done
for run in $RUNS; do
    cp "/tmp/runs/$run/metrics.jsonl" "$OUT/metrics_$run.jsonl" 2> /dev/null && cat "$OUT/metrics_$run.jsonl"
done
echo "== done after $SECONDS s"
