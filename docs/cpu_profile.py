"""
How close the full training call comes to this CPU's peak, and which matmuls and convs hold it back:

    python docs/cpu_profile.py              # from the repo root: about 2 minutes on 2 cores at 16 x 16 latents
    python docs/cpu_profile.py --latent 24 --threads 4

1. the fp32 matmul peak of this machine, at square and at SD-shaped sizes, torch's (MKL) and oneDNN's;
2. the bench's full fine-tuning call (nanoddpo.bench.training_call on SD v1-4 at full size, random weights): its
   FLOPs from torch's FlopCounterMode, its median time, so GFLOP/s and the share of that peak;
3. one profiled call, ops grouped by input shape, with each row's GFLOP/s (torch.profiler's FLOP count).
Freed memory is kept for reuse as in train.py (nanoddpo/cli.py); docs/RESULTS.md has what it found.
"""
import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoddpo import bench  # noqa: E402
from nanoddpo.cli import keep_freed_memory  # noqa: E402
from nanoddpo.cpu_layers import _mm  # noqa: E402
from nanoddpo.ddim import DDIM  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--latent", type=int, default=16)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--rows", type=int, default=25, help="profile rows shown")
args = p.parse_args()
print(keep_freed_memory("cpu"))
torch.set_num_threads(args.threads)


def median_time(f, repeats=5):
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


for m, k, n in [(2048, 2048, 2048), (1280, 11520, 128), (1280, 128, 11520), (320, 2880, 512), (8, 11520, 1280),
                (32, 1280, 10240)]:
    a, b = torch.randn(m, k), torch.randn(k, n)
    t, t_onednn = median_time(lambda: a @ b), median_time(lambda: _mm(a, b.t()))
    print(f"matmul {m} x {k} x {n}: {t * 1e3:.2f} ms, {2 * m * k * n / t / 1e9:.0f} GFLOP/s; "
          f"oneDNN's (cpu_layers.py): {t_onednn * 1e3:.2f} ms, {2 * m * k * n / t_onednn / 1e9:.0f} GFLOP/s")

a = bench.parse_args(["--no-baseline", "--latent", str(args.latent)])
bench.fill_defaults(a, False)
sd, _, _ = bench.build_models(a, torch.device("cpu"))
ddim = DDIM(a.num_steps)
unet = sd.unet.requires_grad_(True)
flops = 2 * a.train_batch * bench.image_flops(sd, train=True)  # the guidance pair: UNet batch 2 x train batch
call = bench.training_call(unet, ddim, bench.Inputs(sd, ddim, a.train_batch, sd.device), list(unet.parameters()),
                           nullcontext())
t = median_time(call, 3)
print(f"full training call, {args.latent} x {args.latent} latents, UNet batch {2 * a.train_batch}: {flops / 1e9:.1f} "
      f"GFLOP in {t:.3f} s = {flops / t / 1e9:.0f} GFLOP/s")

with profile(with_flops=True, record_shapes=True) as prof:
    call()
rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:args.rows]
for e in rows:
    rate = f"{(e.flops or 0) / e.self_cpu_time_total / 1e3:6.1f} GFLOP/s" if e.flops else " " * 13
    print(f"{e.key[:26]:26s} {e.self_cpu_time_total / 1e3:7.1f} ms  x{e.count:<3d} {rate}  {str(e.input_shapes)[:70]}")
