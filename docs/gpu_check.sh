#!/bin/bash
# The next GPU check: train.py at train batch 16 or 32, as it is and with knobs patched in from outside (train.py is not
# changed). A lent GPU here has 15 minutes in all and one device call at most 10, so best as two calls on the same warm
# machine (the random folder and inductor's caches stay in /tmp):
#
#   OUT=runs/gpu bash docs/gpu_check.sh tb32 tb32+cudnn      # from the repo root, on a machine with one CUDA GPU
#   OUT=runs/gpu bash docs/gpu_check.sh tb32+autotune        # a second call (a stage alone may use the whole call)
#
# A stage is tb16 (sampling batch 16, train batch 16), tb32, tb48 or tb64 (both 32, 48, 64), one batch an epoch, one
# optimizer step an epoch, with any of these knobs joined by +:
#   cudnn   torch.backends.cudnn.benchmark = True: cuDNN times its algorithms for each conv shape once and keeps the
#           fastest, instead of choosing by heuristics; the shapes never change in a run. It changes no compiled graph,
#           so after a stage without it, inductor's caches make the compile about a minute instead of 3.5;
#   nhwc    the UNet's 4-d weights (its convs) in NHWC, in place, before train.py compiles it (LoRA's are 2-d and stay):
#           the training call alone was 1.9% faster on the sixth lent H200; with mm1x1, no gain end to end;
#   mm1x1   torch._inductor.config.conv_1x1_as_mm = True: the 1x1 convs (proj_in / proj_out of every transformer,
#           the skip convs) become matmuls in the forward, without cuDNN's NCHW<->NHWC copies around them (13.6 ms
#           of the 201.8 ms training call on the sixth H200, over all convs);
#   autotune torch.compile(mode="max-autotune-no-cudagraphs"): inductor times Triton templates against cuBLAS and
#           cuDNN for every matmul and conv shape and keeps the fastest (CUDA graphs stay off: pytorch/pytorch#169545).
#           Its compile is far longer (unfinished after 4-5 minutes on the second H100); run it alone in a call.
# Measured (docs/RESULTS.md, "The first lent H100" to "The seventh lent H200"): tb16 3,750 trajectories per H100-hour,
# tb32 3,880-3,917, tb48 3,937 (62.8 GB; 1.5% over tb32 on the same machine); on an H200, tb32 4,068 and tb64 4,185
# per H200-hour (83.2 GB; 2.9% over tb32 on the same machine); cudnn and nhwc+mm1x1 no gain;
# autotune's compile did not finish in the 4-5 minutes a call had left (it times 17 Triton templates for each conv
# shape, 8.5-14 s a shape). The target is 4,500. No knob here is left to try but autotune, which wants a machine held
# longer than a lent GPU's 15 minutes.
# Epoch 0 compiles (about 3.5 minutes cold); epoch 1 is the throughput. Each stage has its own time limit, so one slow
# stage cannot eat the other; logs and metrics land in $OUT.
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
    --epochs 2 --grad-accum 1"
# train.py with the knobs in $KNOBS set before it runs
PATCHED="import os, sys, torch, torch._inductor.config, train
knobs = os.environ['KNOBS'].split()
torch.backends.cudnn.benchmark = 'cudnn' in knobs
torch._inductor.config.conv_1x1_as_mm = 'mm1x1' in knobs
compile = torch.compile
def patched(module, **kw):
    if 'nhwc' in knobs:
        module = module.to(memory_format=torch.channels_last)
    if 'autotune' in knobs:
        kw['mode'] = 'max-autotune-no-cudagraphs'
    print(f'gpu_check.sh: knobs {knobs}, torch.compile({type(module).__name__}, {kw})')
    return compile(module, **kw)
torch.compile = patched
sys.argv[0] = 'train.py'; train.main(*train.parse_settings())"
RUNS=${*:-tb16 tb16+cudnn}
LIMIT=330  # seconds a stage, when there are several; a stage alone may use the whole deadline
(($# == 1)) && LIMIT=$DEADLINE
for run in $RUNS; do
    IFS=+ read -r size knobs <<< "$run"
    case $size in
        # peak about 22, 43, 63 and 83 GB (1.26 GB a trajectory); tb64 fits an H200 only, and is the paper's update
        tb16 | tb32 | tb48 | tb64) batch=${size#tb} ;;
        *) echo "gpu_check.sh: unknown stage $run (tb16, tb32, tb48 or tb64, then +cudnn, +nhwc, +mm1x1, +autotune)"; exit 1 ;;
    esac
    for knob in ${knobs//+/ }; do
        [[ $knob =~ ^(cudnn|nhwc|mm1x1|autotune)$ ]] ||
            { echo "gpu_check.sh: unknown knob $knob in $run (cudnn, nhwc, mm1x1, autotune)"; exit 1; }
    done
    KNOBS="${knobs//+/ }" stage "${run//+/_}" $LIMIT python3 -c "$PATCHED" $ARGS --batch-size $batch --train-batch-size $batch \
        --name "${run//+/_}"
done
for run in $RUNS; do
    cp "/tmp/runs/${run//+/_}/metrics.jsonl" "$OUT/metrics_${run//+/_}.jsonl" 2> /dev/null && cat "$OUT/metrics_${run//+/_}.jsonl"
done
echo "== done after $SECONDS s"
