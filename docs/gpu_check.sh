#!/bin/bash
# The next GPU check, in one go, about 9 minutes on one H100 / H200 (a lent GPU here has 15 minutes in all):
#
#   OUT=runs/gpu bash docs/gpu_check.sh          # from the repo root, on a machine with one CUDA GPU
#
# What is still unknown (docs/RESULTS.md, "The fifth lent H200"): the LoRA training call alone (docs/profile_lora_call.py,
# train batch 16, UNet batch 32; about 2 minutes a variant, each compiled afresh), in one process so that every variant
# has its baseline beside it:
#   compiled         as train.py compiles it (201.9 ms on the fifth H200);
#   compiled-flash   attention through FlashAttention-2 only (cuDNN's fused attention is 26% of the call, its backward
#                    2.6x its forward; the fifth H200's try of this variant hit inductor's cache and ran cuDNN again);
#   compiled-nhwc    the UNet's weights in NHWC (197.1 ms on the fifth H200, in a process of its own: no NCHW<->NHWC
#                    copies, but slower norms);
#   compiled-forced  inductor's layout optimisation forced on (train.py under it compiled its training graph for over
#                    173 s, when the limit stopped it).
# The profile writes $OUT/profile.json after each variant, so a variant cut by the deadline loses only itself.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-565}  # seconds for the whole script
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== $(date +%T) profile (limit $((DEADLINE - 10))s)"
PYTHONPATH=. OUT="$OUT" timeout $((DEADLINE - 10)) python3 docs/profile_lora_call.py 16 \
    compiled compiled-flash compiled-nhwc compiled-forced > "$OUT/profile.log" 2>&1
echo "== profile: exit $? after $SECONDS s"
grep -E "^==|by kind|flash|sdpa|fmha" "$OUT/profile.log" | cut -c1-160
cat "$OUT/profile.json"
echo "== done after $SECONDS s"
