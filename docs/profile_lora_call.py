"""
Where the LoRA training call's time goes on one CUDA GPU, and what the UNet's memory layout does to it.

SD v1-4 at full size (random weights, built as the bench builds them), the frozen UNet in bf16 as train.py holds it with
LoRA, bf16 autocast; train batch B (UNet batch 2B, the guidance pair); the call is the bench's training_call (guided
eps with grad, the exact log-prob, the clipped DDPO loss, backward). For each variant: the median of 5 calls after a
warm-up (which compiles), then one call under torch's profiler, split by kind of work (nanoddpo.bench.KINDS) and its 15
longest kernels. Writes $OUT/profile.json (or ./profile.json): milliseconds per variant.

    PYTHONPATH=. python docs/profile_lora_call.py 16 compiled compiled-nhwc compiled-forced   # about 2 min a variant

Variants: eager, eager-nhwc, compiled (torch.compile's default mode), compiled-nhwc (the UNet's weights, and so its
activations, in NHWC memory order), compiled-forced (inductor's layout optimisation forced on: its heuristic leaves it
off for a training graph with a conv whose input has at least twice its output's channels, as SD's up blocks have).
"""
import json
import os
import sys
import types

import torch

from nanoddpo import bench
from nanoddpo.ddim import DDIM, log_prob_of_step
from nanoddpo.lora import add_lora, lora_parameters

VARIANTS = ("eager", "eager-nhwc", "compiled", "compiled-nhwc", "compiled-forced")
B, variants = int(sys.argv[1]), sys.argv[2:] or ["eager", "eager-nhwc", "compiled"]
if any(v not in VARIANTS for v in variants):
    sys.exit(f"profile_lora_call.py: variants are {', '.join(VARIANTS)}; got {' '.join(variants)}")
device = torch.device("cuda")
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

results = {}
for variant in variants:
    torch._dynamo.reset()
    torch._inductor.config.force_layout_optimization = variant == "compiled-forced"
    sd.unet.to(memory_format=torch.channels_last if variant.endswith("nhwc") else torch.contiguous_format)
    unet = sd.unet if variant.startswith("eager") else torch.compile(sd.unet, dynamic=False)
    call = bench.training_call(unet, ddim, x, params, autocast)
    seconds, peak_gb = bench.timed(call, 5, device)
    results[variant] = round(1000 * seconds, 2)
    mfu = f"{flops / seconds / (peak * 1e12):.1%}" if peak else "-"
    print(f"== {variant}: {1000 * seconds:.1f} ms  MFU {mfu}  peak {peak_gb:.1f} GB", flush=True)
    ms, kernels = bench.time_by_kind(call, device)
    total = sum(ms.values())
    print("   by kind: " + ", ".join(f"{k} {v:.1f} ms ({v / total:.0%})" for k, v in ms.items()))
    print(kernels.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=90), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "profile.json"), "w") as f:  # after each variant: kept if cut
        json.dump(results, f, indent=1)
