# Where the LoRA training call's time goes on one CUDA GPU: SD v1-4 at full size (random weights, the bench's), UNet
# weights in bf16 as train.py holds them with LoRA, train batch B (UNet batch 2B), bf16 autocast; eager, eager in
# channels_last, then compiled; each the median of 5 after 2 warm-ups, then one call under torch's profiler.
#   PYTHONPATH=. python docs/profile_lora_call.py 16     # from the repo root; about 2.5 minutes on an H200
# Kept as it ran on the fourth lent H200 (docs/RESULTS.md); `python -m nanoddpo.bench --profile` now splits any of
# the bench's calls the same way (with its own kinds of work).
import sys, time, types, torch
from nanoddpo import bench
from nanoddpo.ddim import DDIM, log_prob_of_step
from nanoddpo.lora import add_lora, lora_parameters
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda")
a = types.SimpleNamespace(model="", latent=64, no_baseline=True)
sd, _, _ = bench.build_models(a, dev)
sd.unet.to(torch.bfloat16)
torch.manual_seed(0)
params = lora_parameters(add_lora(sd.unet, 4))
ddim = DDIM(50).to(dev)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 16
x = bench.Inputs(sd, ddim, B, dev)
ac = torch.autocast("cuda", torch.bfloat16)
with torch.no_grad(), ac:
    x.old_log_prob = log_prob_of_step(sd.unet, ddim, x.x_t, x.x_prev, x.t, x.context, x.negative_context).float()
flops = bench.image_flops(sd, train=True) * 2 * B
def cat(name):
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n or "efficient" in n: return "attention"
    if "conv" in n or "implicit" in n or "cudnn" in n or "xmma_fprop" in n or "dgrad" in n or "wgrad" in n: return "conv"
    if "gemm" in n or "nvjet" in n or "cutlass" in n or "sm90" in n or "ampere" in n or "cublas" in n: return "matmul"
    if "triton" in n: return "triton (fused pointwise/norm)"
    if "norm" in n: return "norm"
    return "other"
def study(label, fn):
    for _ in range(2): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(5):
        t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
    t = sorted(ts)[2]
    print(f"== {label}: {t*1e3:.1f} ms  MFU {flops / t / 989e12:.1%}  peak {torch.cuda.max_memory_allocated()/2**30:.1f} GB", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn(); torch.cuda.synchronize()
    sums, tot = {}, 0.0
    ka = p.key_averages()
    for e in ka:
        us = getattr(e, "self_device_time_total", None)
        if us is None: us = getattr(e, "self_cuda_time_total", 0)
        if not us: continue
        sums[cat(e.key)] = sums.get(cat(e.key), 0) + us; tot += us
    print("   kernel time by kind: " + ", ".join(f"{k} {v/1e3:.1f} ms ({v/tot:.0%})" for k, v in sorted(sums.items(), key=lambda kv: -kv[1])), flush=True)
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try: print(ka.table(sort_by=key, row_limit=25, max_name_column_width=90), flush=True); break
        except Exception as err: print("table:", err)
study("eager", bench.training_call(sd.unet, ddim, x, params, ac))
sd.unet.to(memory_format=torch.channels_last)
study("eager channels_last", bench.training_call(sd.unet, ddim, x, params, ac))
sd.unet.to(memory_format=torch.contiguous_format)
study("compiled default", bench.training_call(torch.compile(sd.unet, dynamic=False), ddim, x, params, ac))
