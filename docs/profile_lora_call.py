"""
Where the LoRA training call's time goes on one CUDA GPU, and what the UNet's memory layout does to it.

SD v1-4 at full size (random weights, built as the bench builds them), the frozen UNet in bf16 as train.py holds it with
LoRA, bf16 autocast; train batch B (UNet batch 2B, the guidance pair); the call is the bench's training_call (guided
eps with grad, the exact log-prob, the clipped DDPO loss, backward). For each variant: the median of 5 calls after a
warm-up (which compiles), then one call under torch's profiler, split by kind of work (nanoddpo.bench.KINDS) and its 15
longest kernels. Writes $OUT/profile.json (or ./profile.json): milliseconds per variant.

    PYTHONPATH=. python docs/profile_lora_call.py 16 compiled compiled-flash compiled-forced   # about 2 min a variant

A variant is `eager` or `compiled` (torch.compile's default mode) with any of these suffixes, as in compiled-forced-flash:
  -nhwc    the UNet's weights, and so its activations, in NHWC memory order;
  -forced  inductor's layout optimisation forced on (compiled only: its heuristic leaves it off for a training graph
           with a conv whose input has at least twice its output's channels, as SD's up blocks have);
  -flash   attention through FlashAttention-2 only (torch picks cuDNN's fused attention on an H100 / H200 otherwise:
           27% of the compiled call's kernel time at train batch 16, its backward 2.6x its forward);
  -mm1x1   inductor's 1x1 convs as matmuls (compiled only; torch._inductor.config.conv_1x1_as_mm);
  -autotune  torch.compile's max-autotune-no-cudagraphs (compiled only): inductor times Triton templates against
           cuBLAS and cuDNN for each matmul and conv shape and keeps the fastest (its compile takes far longer).
On the sixth lent H200 (docs/RESULTS.md), against compiled's 201.8 ms: -nhwc 198.0, -forced 203.5, -flash 241.6.
On the second lent H100: compiled 218.4 ms; -autotune had not finished compiling after 4-5 minutes.
"""
import json
import os
import sys
import types

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanoddpo import bench
from nanoddpo.ddim import DDIM, log_prob_of_step
from nanoddpo.lora import add_lora, lora_parameters

B, variants = int(sys.argv[1]), sys.argv[2:] or ["eager", "eager-nhwc", "compiled"]
for v in variants:
    base, *options = v.split("-")
    compiled_only = {"forced", "mm1x1", "autotune"}
    if base not in ("eager", "compiled") or not set(options) <= {"nhwc", "flash", *compiled_only} or \
            (base == "eager" and set(options) & compiled_only):
        sys.exit(f"profile_lora_call.py: a variant is eager or compiled with suffixes -nhwc, -flash, and for compiled "
                 f"-forced, -mm1x1, -autotune, as in compiled-forced-flash; got {v}")
device = torch.device("cuda")
# Every variant compiles afresh. With inductor's caches on, a second compile in this process (after _dynamo.reset) of the
# same UNet is a cache hit and keeps the first variant's attention kernels: on the fifth lent H200, "compiled-flash"
# ran cuDNN's attention like "compiled" (the same on a CPU: sdpa_kernel(FLASH_ATTENTION) ran MATH's bmm after MATH).
torch._inductor.config.force_disable_caches = True
sd, _, _ = bench.build_models(types.SimpleNamespace(model="", latent=64, no_baseline=True), device)
sd.unet.to(torch.bfloat16)
torch.manual_seed(0)
params = lora_parameters(add_lora(sd.unet, 4))
ddim = DDIM(50).to(device)
x = bench.Inputs(sd, ddim, B, device)
autocast = torch.autocast("cuda", torch.bfloat16)
with torch.no_grad(), autocast:
    x.old_log_prob = log_prob_of_step(sd.unet, ddim, x.x_t, x.x_prev, x.t, x.context, x.negative_context).float()
flops = bench.image_flops(sd, train=True) * 2 * B
peak = next((v for k, v in bench.PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; LoRA training call at UNet batch {2 * B}")


def flash_only(call):
    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return call()
    return run


results = {}
for variant in variants:
    torch._dynamo.reset()
    options = variant.split("-")[1:]
    torch._inductor.config.force_layout_optimization = "forced" in options
    torch._inductor.config.conv_1x1_as_mm = "mm1x1" in options
    sd.unet.to(memory_format=torch.channels_last if "nhwc" in options else torch.contiguous_format)
    mode = "max-autotune-no-cudagraphs" if "autotune" in options else None  # None: torch.compile's default
    unet = sd.unet if variant.startswith("eager") else torch.compile(sd.unet, mode=mode, dynamic=False)
    call = bench.training_call(unet, ddim, x, params, autocast)
    if "flash" in options:  # the backend is chosen when the call is traced, so the first call must see it too
        call = flash_only(call)
    seconds, peak_gb = bench.timed(call, 5, device)
    results[variant] = round(1000 * seconds, 2)
    mfu = f"{flops / seconds / (peak * 1e12):.1%}" if peak else "-"
    print(f"== {variant}: {1000 * seconds:.1f} ms  MFU {mfu}  peak {peak_gb:.1f} GB", flush=True)
    ms, kernels = bench.time_by_kind(call, device)
    print(f"   by kind: {bench.kinds_line(ms)}")
    print(kernels.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=90), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "profile.json"), "w") as f:  # after each variant: kept if cut
        json.dump(results, f, indent=1)
