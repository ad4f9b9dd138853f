"""
The CPU calls of an older nanoddpo beside today's and diffusers', interleaved in one process on one set of weights
(SD v1-4 at full size, random): the sampling call, the full training call and the LoRA training call, 7 rounds each
after a warm-up, median. Machine load moves between bench runs; interleaving lets a change be seen under the same load.

    python docs/cpu_ab.py e2abf28                # from the repo root; any commit whose model.py stands alone
    python docs/cpu_ab.py e2abf28 --parts full   # sample, full, lora (about 1.5 minutes each on 2 cores)
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nanoddpo import bench  # noqa: E402
from nanoddpo.cli import keep_freed_memory  # noqa: E402
from nanoddpo.ddim import DDIM  # noqa: E402
from nanoddpo.lora import TARGETS, add_lora, lora_parameters  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("commit", help="a commit from before nanoddpo/cpu_layers.py (its model.py imports nothing of ours)")
p.add_argument("--parts", default="sample,full,lora")
p.add_argument("--rounds", type=int, default=7)
args = p.parse_args()
print(keep_freed_memory("cpu"))
torch.set_num_threads(2)
old_src = subprocess.run(["git", "show", f"{args.commit}:nanoddpo/model.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
sys.path.insert(0, tempfile.mkdtemp())
(Path(sys.path[0]) / "old_model.py").write_text(old_src)
import old_model  # noqa: E402

a = bench.parse_args([])
bench.fill_defaults(a, False)
sd, base, why = bench.build_models(a, torch.device("cpu"))
old = old_model.UNet(sd.unet.cfg).eval().requires_grad_(False)
old.load_state_dict(sd.unet.state_dict(), assign=True)  # the same weight tensors, held once
ddim, theirs = DDIM(a.num_steps), bench.baseline_callable(base)
unets = {args.commit: old, "now": sd.unet, "diffusers": theirs}


def rounds(name, calls):
    times = {k: [] for k in calls}
    for r in range(args.rounds + 1):  # round 0 warms up
        for k, call in calls.items():
            start = time.perf_counter()
            call()
            if r:
                times[k].append(time.perf_counter() - start)
    for k, v in times.items():
        print(f"{name:7s} {k:10s} median {statistics.median(v):.3f} s  min {min(v):.3f}  max {max(v):.3f}", flush=True)


train_inputs = bench.Inputs(sd, ddim, a.train_batch, sd.device)
if "sample" in args.parts:
    x = bench.Inputs(sd, ddim, a.batch, sd.device)
    rounds("sample", {k: bench.sampling_call(u, ddim, x, nullcontext()) for k, u in unets.items()})
if "full" in args.parts:
    modules = {args.commit: old, "now": sd.unet, "diffusers": base}
    for m in modules.values():
        m.requires_grad_(True)
    rounds("full", {k: bench.training_call(u, ddim, train_inputs, list(modules[k].parameters()), nullcontext())
                    for k, u in unets.items()})
    for m in modules.values():
        m.requires_grad_(False).zero_grad(set_to_none=True)
if "lora" in args.parts:
    from peft import LoraConfig
    torch.manual_seed(0)
    ours = lora_parameters(add_lora(sd.unet, 4))
    for name, module in old.named_modules():  # the old layers run the same LoRA tensors as ours
        if any(name.endswith("." + t) for t in TARGETS) and ".attn" in name:
            new = sd.unet.get_submodule(name)
            module.forward = (lambda m, n: lambda x: type(m).forward(m, x) + F.linear(
                n.lora_A(x), n.lora_scale * n.lora_B.weight))(module, new)
    base.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=True, target_modules=list(TARGETS)))
    params = {args.commit: ours, "now": ours, "diffusers": [q for q in base.parameters() if q.requires_grad]}
    rounds("lora", {k: bench.training_call(u, ddim, train_inputs, params[k], nullcontext()) for k, u in unets.items()})
