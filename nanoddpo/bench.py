"""
How fast is nanoddpo at SD v1-4 size, against diffusers' UNet on the same weights and inputs?

Builds SD v1-4 at full size from its published configs (nanoddpo/configs/sd-v1-4) with random weights, so nothing is
downloaded (or loads a real model folder with --model), and times what a DDPO run spends its time on, with the very
functions train.py runs (nanoddpo.ddim's guided_eps / log_prob_of_step / sample, nanoddpo.lora, train.py's policy_loss,
AdamW with clip_grad_norm_):

  - the UNet call at the sampling shape (the guidance pair: UNet batch 2B, no grad) and at the training shape (forward
    with grad, and forward + backward of the clipped DDPO loss), full fine-tuning (with and without unet.grad_checkpoint)
    and LoRA;
  - a DDPO epoch in miniature: N trajectories sampled (DDIM steps, guidance, VAE decode) and trained on (every
    timestep), phase by phase, giving trajectories per hour and seconds per 1,000-image epoch (rewards excluded);
  - peak memory of each (CUDA: max_memory_allocated; CPU: the process's peak resident set, whole process) and on a GPU
    the model-FLOPs utilisation (torch's FlopCounterMode against the card's dense bf16 peak).

Each figure is printed as ours, the baseline (diffusers' UNet2DConditionModel with its default attention, sharing our
weight tensors; LoRA through diffusers + peft) and ours / baseline. Variants: precisions (fp32 weights, bf16 / fp16 by
autocast) x compile modes; a variant that fails prints why and the bench goes on. Results: runs/bench/<time>.json,
rewritten after every row, so that a bench cut short (Ctrl-C, a time limit) keeps what it measured.

Sizes: on CUDA 64 x 64 latents (512 px), sampling batch 16 and train batch 8 as train.py's sd14 preset, 50 steps,
every precision, and the compile modes eager, default, reduce-overhead and max-autotune.
On CPU 16 x 16 latents (128 px), batch 1 (UNet batch 2), 2 trajectories of 4 DDIM steps, fp32 eager only: about
5 minutes on 2 idle cores (--precisions fp32,bf16,fp16 and --compile-modes eager,default add variants, slowly).

    python -m nanoddpo.bench                                   # from the repo root
    python -m nanoddpo.bench --threads 2 --latent 24           # the CPU comparison of issue 13 (slower)
    python -m nanoddpo.bench --precisions bf16 --compile-modes eager,default,reduce-overhead,max-autotune  # on a GPU
    python -m nanoddpo.bench --precisions bf16 --compile-modes default --parts lora --profile   # where its time goes
"""
import json
import os
import statistics
import tempfile
import time
import types
from contextlib import nullcontext
from pathlib import Path

import torch

from nanoddpo import cli
from nanoddpo.cli import (Parser, UsageError, check_device, check_output, first_line, is_out_of_memory,
                          keep_freed_memory, need, number)
from nanoddpo.ddim import DDIM, guided_eps, log_prob_of_step, sample
from nanoddpo.lora import add_lora, lora_parameters
from nanoddpo.cpu_layers import torch_layers
from nanoddpo.model import COMPONENTS, StableDiffusion, load_tokenizer
from nanoddpo.world import write_tokenizer

PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10": 125, "RTX 4090": 165}  # dense bf16


def policy_loss(*args):
    """train.py's own RL loss (train.py holds all RL math), imported on use since train.py imports this file."""
    from train import policy_loss
    return policy_loss(*args)


CONFIGS = Path(__file__).resolve().parent / "configs" / "sd-v1-4"
PARTS = ("sample", "full", "lora", "epoch")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("eager", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
LOSS = types.SimpleNamespace(algo="ppo", clip_range=1e-4)  # what policy_loss reads: train.py's defaults


def parse_args(argv=None):
    p, whole = Parser(description="Speed of nanoddpo's UNet and a miniature DDPO epoch vs diffusers."), number(int)
    p.add_argument("--model", default="", help="a model folder; default: SD v1-4 at full size, random weights")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--latent", type=whole, default=0, help="latent side; 0 = 64 on CUDA (512 px), 16 on CPU (128 px)")
    p.add_argument("--batch", type=whole, default=0, help="trajectories per sampling batch B (UNet batch 2B); 0 = 16 CUDA "
                   "(train.py's sd14), 1 CPU")
    p.add_argument("--train-batch", type=whole, default=0, help="trajectories per train step (UNet batch x2); 0 = 8 CUDA "
                   "(train.py's sd14), 1 CPU")
    p.add_argument("--trajectories", type=whole, default=0, help="N of the miniature epoch; 0 = 2 x --batch")
    p.add_argument("--num-steps", type=whole, default=0, help="DDIM steps of the miniature epoch; 0 = 50 on CUDA, 4 on CPU")
    p.add_argument("--precisions", default="", help="comma list of fp32,bf16,fp16; default all on CUDA, fp32 on CPU")
    p.add_argument("--compile-modes", default="", help=f"comma list of {','.join(COMPILE_MODES)}; "
                   "default eager,default,reduce-overhead,max-autotune on CUDA, eager on CPU (compiling SD's UNet "
                   "takes many minutes there)")
    p.add_argument("--epoch", default="first", choices=["first", "all", "none"],
                   help="run the miniature epoch for the first variant only, every variant, or not at all")
    p.add_argument("--repeats", type=whole, default=3, help="timed calls per figure (after one warm-up); the median is kept")
    p.add_argument("--threads", type=whole, default=0, help="CPU threads for torch; 0 = torch's default")
    p.add_argument("--parts", default="sample,full,lora,epoch",
                   help="comma list of what to time: sample, full (fine-tuning), lora, epoch (miniature, LoRA)")
    p.add_argument("--lora-rank", type=whole, default=4)
    p.add_argument("--no-baseline", action="store_true", help="skip diffusers' UNet")
    p.add_argument("--channels-last", action="store_true", help="both UNets' weights (and so their activations) in "
                   "NHWC memory order, as cuDNN's convolutions run")
    p.add_argument("--profile", action="store_true", help="after each of our timed calls, one more under torch's "
                   "profiler: its time by kind of work (GPU kernels; CPU operators)")
    p.add_argument("--out-dir", default="runs/bench")
    a = p.parse_args(argv)
    # bad input in one line before anything is built; the lists of names are checked by fill_defaults
    check_device(a.device)
    for flag in ("latent", "batch", "train_batch", "trajectories", "num_steps"):
        need(getattr(a, flag) >= 0, flag, getattr(a, flag), "must be 0 (the device's default) or more")
    need(a.num_steps <= 1000, "num_steps", a.num_steps, "must be at most 1000 (the schedule's training steps)")
    need(a.repeats >= 1, "repeats", a.repeats, "must be at least 1")
    need(a.lora_rank >= 1, "lora_rank", a.lora_rank, "must be at least 1")
    need(0 <= a.threads <= 1024, "threads", a.threads, "must be 0 (torch's default) to 1024")
    bad = [m for m in a.compile_modes.split(",") if m not in COMPILE_MODES] if a.compile_modes else []
    need(not bad, "compile_modes", a.compile_modes, f"choose from {', '.join(COMPILE_MODES)}")
    check_output(a.out_dir, "out_dir")  # a file there would end the bench after all its minutes
    return a


def fill_defaults(a, cuda):
    """Device-dependent defaults, resolved once the device is known."""
    a.latent = a.latent or (64 if cuda else 16)
    a.batch = a.batch or (16 if cuda else 1)
    a.train_batch = a.train_batch or (8 if cuda else 1)
    a.trajectories = a.trajectories or 2 * a.batch
    a.num_steps = a.num_steps or (50 if cuda else 4)
    a.precisions = (a.precisions or ("fp32,bf16,fp16" if cuda else "fp32")).split(",")
    a.compile_modes = (a.compile_modes or ("eager,default,reduce-overhead,max-autotune" if cuda else "eager")).split(",")
    a.parts = a.parts.split(",")
    bad = [p for p in a.precisions if p not in PRECISIONS]
    if bad:
        raise UsageError(f"--precisions {bad[0]}: choose from {', '.join(PRECISIONS)}")
    bad = [p for p in a.parts if p not in PARTS]
    if bad:
        raise UsageError(f"--parts {bad[0]}: choose from {', '.join(PARTS)}")
    if a.trajectories % a.batch or a.trajectories % a.train_batch:
        raise UsageError(f"--trajectories {a.trajectories} must be a multiple of --batch and --train-batch")
    return a


# -----------------------------------------------------------------------------
# The two models, one set of weights


def build_models(a, device):
    """Ours (nanoddpo.model) and the baseline (diffusers' UNet, or None and why). The baseline's parameters are our
    tensors (load_state_dict(assign=True)): the same weights, held once."""
    if a.model:
        sd = StableDiffusion.from_pretrained(a.model, device=device)
    else:
        cfgs = [json.loads((CONFIGS / f"{name}_config.json").read_text()) for name, *_ in COMPONENTS]
        with tempfile.TemporaryDirectory() as tmp:  # a small CLIP-format tokenizer; the text encoder keeps 49408 rows
            write_tokenizer(Path(tmp), words=("a", "red", "cat"))
            tokenizer = load_tokenizer(Path(tmp))
        torch.manual_seed(0)
        sd = StableDiffusion(*cfgs, tokenizer).to(device).eval().requires_grad_(False)
    levels = len(sd.unet.cfg["block_out_channels"])  # each level but the last halves the latent; the up path must match
    need(a.latent % 2 ** (levels - 1) == 0, "latent", a.latent, f"must be a multiple of {2 ** (levels - 1)} for this "
         f"UNet's {levels} levels")
    f = sd.image_size // sd.latent_shape[1]
    sd.latent_shape, sd.image_size = (sd.latent_shape[0], a.latent, a.latent), a.latent * f  # what sample() draws

    if a.no_baseline:
        return sd, None, "skipped (--no-baseline)"
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return sd, None, "skipped: diffusers is not installed (pip install -r tests/requirements.txt)"
    try:
        with torch.device("meta"):
            base = UNet2DConditionModel(**{k: v for k, v in sd.unet.cfg.items() if not k.startswith("_")})
        base.load_state_dict(sd.unet.state_dict(), assign=True)
    except Exception as e:  # a config diffusers cannot build: no baseline, the bench goes on
        return sd, None, f"skipped: diffusers cannot build this UNet ({first_line(e)})"
    return sd, base.eval().requires_grad_(False), "diffusers UNet2DConditionModel (default attention), same weights"


def baseline_callable(base):
    return lambda x, t, context: base(x, t, context).sample


# -----------------------------------------------------------------------------
# Measuring


def why_failed(e, a, unet_batch):
    if is_out_of_memory(e):
        return f"out of memory at {a.latent} x {a.latent} latents, UNet batch {unet_batch}"
    return first_line(e)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: writing 5 resets this process's peak resident set (VmHWM) to the current one
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmHWM"].split()[0]) / 2**20
    except (OSError, KeyError):
        return None


def timed(fn, repeats, device):
    """(median seconds of `repeats` calls after one warm-up, peak memory in GB over all of them)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reset_peak(device)
    fn()
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), peak_gb(device)


class Inputs:
    """One batch of stored steps, as train.py's ddpo_step_loss scores them: latents, timesteps, prompts, old log-probs."""

    def __init__(self, sd, ddim, batch, device):
        gen = torch.Generator().manual_seed(1)
        shape = (batch, *sd.latent_shape)
        self.x_t = torch.randn(shape, generator=gen).to(device)
        self.x_prev = (self.x_t + 0.1 * torch.randn(shape, generator=gen).to(device))
        self.t = ddim.timesteps[torch.randint(ddim.num_steps, (batch,), generator=gen).to(device)]
        with torch.no_grad():
            self.context = sd.encode_prompts(["a red cat"] * batch).float()
            self.negative_context = sd.encode_prompts([""]).float()
        self.old_log_prob = torch.zeros(batch, device=device)  # filled by the first scoring
        self.advantages = torch.randn(batch, generator=gen).to(device)


def sampling_call(unet, ddim, x, autocast):
    """One step of sample(): guided eps for B latents (UNet batch 2B), no grad."""
    def call():
        with torch.no_grad(), autocast:
            guided_eps(unet, x.x_t, x.t, x.context, x.negative_context, 5.0)
    return call


def training_call(unet, ddim, x, params, autocast, backward=True):
    """One micro-step of train.py's training loop: the log-prob of stored steps, the clipped DDPO loss, backward."""
    def call():
        with autocast:
            log_prob = log_prob_of_step(unet, ddim, x.x_t, x.x_prev, x.t, x.context, x.negative_context, 5.0, 1.0)
            loss, _, _ = policy_loss(LOSS, log_prob, x.old_log_prob, x.advantages)
        if backward:
            loss.backward()
        for p in params:
            p.grad = None
    return call


def miniature_epoch(sd, unet, params, a, autocast, device):
    """Sample a.trajectories trajectories in batches of a.batch, then train on every one of their steps in batches of
    a.train_batch, one AdamW step per train batch: train.py's epoch, without the reward. Returns phase seconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ddim = DDIM(a.num_steps).to(device)
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)
    sync()
    start = time.perf_counter()
    trajs = [sample(sd, ["a red cat"] * a.batch, list(range(b, b + a.batch)), a.num_steps, unet=unet, autocast=autocast)
             for b in range(0, a.trajectories, a.batch)]
    sync()
    t_sample = time.perf_counter() - start
    with torch.no_grad(), autocast:  # the decode's share of sampling, timed again on its own
        sync()
        start = time.perf_counter()
        for traj in trajs:
            sd.decode_latents(traj.latents[:, -1].to(sd.dtype))
        sync()
        t_decode = time.perf_counter() - start
    latents = torch.cat([t.latents for t in trajs])
    old_log_probs, context = torch.cat([t.log_probs for t in trajs]), torch.cat([t.context for t in trajs])
    advantages = torch.randn(a.trajectories, generator=torch.Generator().manual_seed(2)).to(device)
    start = time.perf_counter()
    for i in range(0, a.trajectories, a.train_batch):
        rows = slice(i, i + a.train_batch)
        for j in range(a.num_steps):
            with autocast:
                log_prob = log_prob_of_step(unet, ddim, latents[rows, j], latents[rows, j + 1], ddim.timesteps[j],
                                            context[rows], trajs[0].negative_context)
                loss, _, _ = policy_loss(LOSS, log_prob, old_log_probs[rows, j], advantages[rows])
            (loss / a.num_steps).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    t_train = time.perf_counter() - start
    return dict(sample=t_sample, decode=t_decode, train=t_train)


def image_flops(sd, train=False):
    """FLOPs of one UNet call for one image at the model's latent size, from torch's FlopCounterMode: the forward, or
    with train=True the forward plus the backward to the UNet's trainable weights. Full fine-tuning's backward is about
    2x the forward; LoRA's about 1.1x (at SD v1-4 size the total is 2.13x), as no frozen weight gets a gradient.
    Counted once per kind and set of weights, kept on sd. Under autocast as in training: half-precision weights meet
    fp32 LoRA weights in one matmul. Model FLOPs: a checkpointed forward's recomputation is not counted."""
    trainable = [p for p in sd.unet.parameters() if p.requires_grad]
    key = (train, sum(p.numel() for p in sd.unet.parameters()), sum(p.numel() for p in trainable))
    if not hasattr(sd, "unet_flops"):
        sd.unet_flops = {}
    if key not in sd.unet_flops:
        from torch.utils.flop_counter import FlopCounterMode

        if train and not trainable:
            raise ValueError("image_flops(train=True): the UNet has no trainable weights")
        x = torch.zeros(1, *sd.latent_shape, device=sd.device, dtype=sd.dtype)
        ctx = torch.zeros(1, sd.max_length, sd.unet.cfg["cross_attention_dim"], device=sd.device, dtype=sd.dtype)
        autocast = torch.autocast(sd.device.type, sd.dtype) if sd.dtype != torch.float32 else nullcontext()
        checkpointing, sd.unet.grad_checkpoint = sd.unet.grad_checkpoint, False
        try:
            with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train), autocast, torch_layers():
                eps = sd.unet(x, torch.tensor([1], device=sd.device), ctx)
                if train:  # autograd.grad, not backward(): nothing lands in the weights' .grad
                    torch.autograd.grad(eps.float().sum(), trainable)
        finally:
            sd.unet.grad_checkpoint = checkpointing
        sd.unet_flops[key] = counter.get_total_flops()
    return sd.unet_flops[key]


def mfu(forward_flops, train_flops, num_steps, samples, steps_trained, seconds, device_name=None):
    """Model-FLOPs utilisation of one GPU for train.py's metrics: UNet FLOPs over the card's dense bf16 peak. Per
    sample, sampling is num_steps forwards and training steps_trained forward + backward calls (image_flops), each of
    the guidance pair (x2); the VAE and the text encoder are left out. None on a card not in PEAK_TFLOPS."""
    name = device_name or torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    flops = 2 * samples * (forward_flops * num_steps + train_flops * steps_trained)
    return round(flops / seconds / (peak * 1e12), 4) if peak else None


# -----------------------------------------------------------------------------
# The table


class Table:
    COLUMNS = f"{'what':<42} {'variant':<22} {'ours':>11} {'baseline':>11} {'ratio':>6} {'peak GB':>15} {'MFU':>11}"

    def __init__(self, peak_tflops, save=lambda rows: None):
        self.rows, self.peak_tflops, self.save = [], peak_tflops, save
        print(self.COLUMNS)
        print("-" * len(self.COLUMNS))

    def add(self, what, variant, unit, ours, baseline, peaks=(None, None), flops=None, error=None):
        """ours / baseline are numbers (seconds or rates) or None; flops per call gives MFU for seconds on a GPU."""
        ratio = ours / baseline if ours is not None and baseline else None
        mfu = [flops / s / (self.peak_tflops * 1e12) if flops and s and self.peak_tflops else None for s in (ours, baseline)]
        row = dict(what=what, variant=variant, unit=unit, ours=ours, baseline=baseline, ratio=ratio,
                   ours_peak_gb=peaks[0], baseline_peak_gb=peaks[1], mfu_ours=mfu[0], mfu_baseline=mfu[1], error=error)
        self.rows.append(row)
        self.save(self.rows)  # after every row: a bench cut short (Ctrl-C, a time limit) keeps what it measured
        num = lambda v: "-" if v is None else f"{v:.3f} s" if unit == "s" else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
        gb = lambda v: "-" if v is None else f"{v:.1f}"
        pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"
        ratio_text = "-" if ratio is None else f"{ratio:.2f}"
        print(f"{what:<42} {variant:<22} {num(ours):>11} {num(baseline):>11} {ratio_text:>6} "
              f"{gb(peaks[0]) + ' / ' + gb(peaks[1]):>15} {pct(mfu[0]) + '/' + pct(mfu[1]):>11}"
              + (f"  FAILED: {error}" if error else ""), flush=True)
        return row


# Profiled names (GPU kernels or CPU operators, lower case) by kind of work; the first kind that matches wins, so
# inductor's fused pointwise kernels (triton_poi_fused_convolution_...: a conv's bias add) count as pointwise.
KINDS = (("NCHW<->NHWC copies", ("nchwtonhwc", "nhwctonchw")),
         ("norm & pointwise", ("triton_poi", "triton_red", "triton_per", "norm", "elementwise", "reduce", "silu",
                               "gelu")),
         ("attention", ("attention", "flash", "fmha", "sdpa")),
         ("conv", ("conv", "implicit_gemm", "dgrad", "wgrad")),
         ("matmul", ("gemm", "nvjet", "cutlass", "triton_tem", "matmul", "aten::mm", "addmm", "bmm", "linear")))


def kind_of(name):
    return next((kind for kind, names in KINDS if any(n in name.lower() for n in names)), "other")


def time_by_kind(fn, device):
    """Where one call's time goes: (milliseconds by kind of work (KINDS, else "other"), largest first; the profile's
    rows, one per kernel or operator). On a GPU the kernels' time; on a CPU each operator's own time, under the
    profiler's overhead."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    ms, rows = {}, prof.key_averages()
    for e in rows:
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            ms[kind_of(e.key)] = ms.get(kind_of(e.key), 0.0) + us / 1000
    return dict(sorted(ms.items(), key=lambda kv: -kv[1])), rows


def kinds_line(ms):
    """time_by_kind's milliseconds as one line: "conv 55.0 ms (29%), attention 52.0 ms (27%), ..."."""
    total = sum(ms.values())
    return ", ".join(f"{k} {v:.1f} ms ({v / total:.0%})" for k, v in ms.items())


def measure(table, a, device, what, variant, ours_fn, base_fn, unet_batch, flops=None):
    """Time ours and the baseline; a side that fails is reported on the row and the bench goes on. With --profile,
    our call's time by kind of work is printed under the row and kept in it (ms_by_kind)."""
    results, errors = [], []
    for fn in (ours_fn, base_fn):
        if fn is None:
            results.append((None, None))
            continue
        try:
            results.append(timed(fn(), a.repeats, device))
        except Exception as e:  # one failing variant (out of memory, a compile error) must not end the bench
            results.append((None, None))
            errors.append(why_failed(e, a, unet_batch))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    (t_ours, m_ours), (t_base, m_base) = results
    row = table.add(what, variant, "s", t_ours, t_base, (m_ours, m_base), flops, "; ".join(errors) or None)
    if a.profile and t_ours is not None:
        row["ms_by_kind"] = ms = time_by_kind(ours_fn(), device)[0]
        print(f"    {'':<38} ours, by kind: {kinds_line(ms)}")
    return row


def run(a, device, heap, save=lambda rows: None):
    cuda = device.type == "cuda"
    sd, base, base_note = build_models(a, device)
    nhwc = "/NHWC" if a.channels_last else ""  # in each variant's name
    if a.channels_last:  # new conv weights: the two UNets stop sharing them (SD v1-4's are 2.2 GB in fp32)
        for unet in (sd.unet, base):
            if unet is not None:
                unet.to(memory_format=torch.channels_last)
    print(f"device: {torch.cuda.get_device_name(device) if cuda else 'CPU'} ({torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}: other processes slow a CPU bench)  "
          f"torch {torch.__version__}  model: {a.model or 'SD v1-4 at full size, random weights'}"
          f"{'' if cuda else f'  allocator: {heap}'}")
    print(f"size: {a.latent} x {a.latent} latents ({sd.image_size} px), sampling batch {a.batch} (UNet batch "
          f"{2 * a.batch}), train batch {a.train_batch} (UNet batch {2 * a.train_batch}); miniature epoch: "
          f"{a.trajectories} trajectories x {a.num_steps} DDIM steps{'' if a.num_steps == 50 else ' (not 50, to keep the bench short)'}")
    print(f"baseline: {base_note}.  weights fp32; bf16/fp16 by autocast.  median of {a.repeats}.  "
          f"peak GB: {'max_memory_allocated' if cuda else 'peak resident set of the whole process'}, ours / baseline")
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None) if cuda else None
    ddim = DDIM(a.num_steps).to(device)
    x_sample, x_train = Inputs(sd, ddim, a.batch, device), Inputs(sd, ddim, a.train_batch, device)
    with torch.no_grad():
        for x in (x_sample, x_train):  # the stored log-probs, so the ratio starts at 1 as on fresh samples
            x.old_log_prob = log_prob_of_step(sd.unet, ddim, x.x_t, x.x_prev, x.t, x.context, x.negative_context)
    # FLOPs per UNet call at the sampling and training batches (FLOPs are linear in the batch)
    flops = (image_flops(sd) * 2 * a.batch, image_flops(sd) * 2 * a.train_batch) if cuda else (None, None)
    table = Table(peak_tflops, save)
    variants = [(p, m) for p in a.precisions for m in a.compile_modes]

    def callables(precision, mode):
        autocast = cli.autocast_to(device, precision)
        compiled = (lambda m: m) if mode == "eager" else (lambda m: torch.compile(m, mode=mode, dynamic=False))
        ours = compiled(sd.unet)
        baseline = None if base is None else baseline_callable(compiled(base))
        return autocast, ours, baseline

    # 1. No LoRA: sampling, and full fine-tuning of every UNet weight, without and with activation checkpointing.
    for precision, mode in variants if {"sample", "full"} & set(a.parts) else []:
        v = f"{precision}/{mode}{nhwc}"
        try:
            autocast, ours, baseline = callables(precision, mode)
        except Exception as e:  # e.g. an unknown compile mode: say why, go on with the next variant
            table.add("variant", v, "s", None, None, error=first_line(e))
            continue
        b2, t2 = 2 * a.batch, 2 * a.train_batch
        on_base = (lambda make: None) if base is None else (lambda make: make)
        if "sample" in a.parts:
            measure(table, a, device, f"sample: guided eps, UNet batch {b2}", v,
                    lambda: sampling_call(ours, ddim, x_sample, autocast),
                    on_base(lambda: sampling_call(baseline, ddim, x_sample, autocast)), b2, flops[0])
        if "full" not in a.parts:
            continue
        full = [list(m.parameters()) for m in (sd.unet, base) if m is not None]
        for m in (sd.unet, base):
            if m is not None:
                m.requires_grad_(True)
        full_flops = image_flops(sd, train=True) * t2 if cuda else None
        measure(table, a, device, f"train full: forward, UNet batch {t2}", v,
                lambda: training_call(ours, ddim, x_train, full[0], autocast, backward=False),
                on_base(lambda: training_call(baseline, ddim, x_train, full[1], autocast, backward=False)), t2, flops[1])
        measure(table, a, device, f"train full: fwd+bwd, UNet batch {t2}", v,
                lambda: training_call(ours, ddim, x_train, full[0], autocast),
                on_base(lambda: training_call(baseline, ddim, x_train, full[1], autocast)), t2,
                full_flops)
        sd.unet.grad_checkpoint = True
        if base is not None:
            base.enable_gradient_checkpointing()
        measure(table, a, device, f"train full +grad ckpt: fwd+bwd, batch {t2}", v,
                lambda: training_call(ours, ddim, x_train, full[0], autocast),
                on_base(lambda: training_call(baseline, ddim, x_train, full[1], autocast)), t2,
                full_flops)
        sd.unet.grad_checkpoint = False
        for m in (sd.unet, base):
            if m is not None:
                m.requires_grad_(False)
        if base is not None:
            base.disable_gradient_checkpointing()

    # 2. LoRA (train.py's default on SD v1-4): the training call, then the miniature epoch.
    if not {"lora", "epoch"} & set(a.parts):
        return table.rows, sd
    torch.manual_seed(0)
    lora = [lora_parameters(add_lora(sd.unet, a.lora_rank))]
    lora_flops = (None, None) if not cuda else (image_flops(sd) * 2 * a.batch,
                                                image_flops(sd, train=True) * 2 * a.train_batch)
    if base is not None:
        try:
            from peft import LoraConfig

            base.add_adapter(LoraConfig(r=a.lora_rank, lora_alpha=a.lora_rank, init_lora_weights=True,
                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            lora.append([p for p in base.parameters() if p.requires_grad])
        except ImportError:
            print("baseline LoRA: skipped, peft is not installed")
            base = None
    for k, (precision, mode) in enumerate(variants):
        v = f"{precision}/{mode}{nhwc}"
        try:
            autocast, ours, baseline = callables(precision, mode)
        except Exception as e:
            table.add("variant", v, "s", None, None, error=first_line(e))
            continue
        t2 = 2 * a.train_batch
        if "lora" in a.parts:
            measure(table, a, device, f"train LoRA r{a.lora_rank}: fwd+bwd, UNet batch {t2}", v,
                    lambda: training_call(ours, ddim, x_train, lora[0], autocast),
                    None if base is None else (lambda: training_call(baseline, ddim, x_train, lora[1], autocast)), t2,
                    lora_flops[1])
        if "epoch" not in a.parts or a.epoch == "none" or (a.epoch == "first" and k > 0):
            continue
        phases, peaks, errors = [], [], []
        for unet, params in ((ours, lora[0]), (baseline, lora[1] if base is not None else None)):
            phase, peak = None, None
            if unet is not None and params is not None:
                try:
                    reset_peak(device)
                    phase, peak = miniature_epoch(sd, unet, params, a, autocast, device), peak_gb(device)
                except Exception as e:
                    errors.append(why_failed(e, a, 2 * max(a.batch, a.train_batch)))
            phases.append(phase)
            peaks.append(peak)
        error = "; ".join(errors) or None
        get = lambda i, key: phases[i][key] if phases[i] else None
        n, steps = a.trajectories, a.num_steps
        epoch_flops = cuda and (lora_flops[0] * steps * n / a.batch + lora_flops[1] * steps * n / a.train_batch)
        table.add(f"epoch LoRA: sample {n} traj x {steps} steps", v, "s", get(0, "sample"), get(1, "sample"),
                  peaks, error=error)
        table.add("epoch LoRA:   of which VAE decode", v, "s", get(0, "decode"), get(1, "decode"))
        table.add(f"epoch LoRA: train {n} traj x {steps} steps", v, "s", get(0, "train"), get(1, "train"))
        total = [phases[i]["sample"] + phases[i]["train"] if phases[i] else None for i in (0, 1)]
        table.add("epoch LoRA: sample + train", v, "s", *total, peaks, epoch_flops or None)
        table.add("trajectories per hour (no reward)", v, "/h", *[3600 * n / s if s else None for s in total])
        table.add("seconds per 1,000-image epoch", v, "s", *[1000 * s / n if s else None for s in total])
    return table.rows, sd


def main(argv=None):
    """The bench from the command line; returns the JSON's path. Bad input, running out of memory while building the
    model and Ctrl-C end in one line (nanoddpo/cli.py's run); a variant that runs out of memory is a row of the table."""
    path = []  # the results file, once there is one

    def bench():
        a = parse_args(argv)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
        fill_defaults(a, device.type == "cuda")
        if a.threads:
            torch.set_num_threads(a.threads)
        heap = keep_freed_memory(device)  # as train.py and sample.py run; on a CPU it moves figures up to 2x
        path.append(Path(a.out_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}.json")
        record = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      threads=torch.get_num_threads(), torch=torch.__version__, load_average=os.getloadavg(),
                      allocator=heap, settings=vars(a))

        def save(rows):
            path[0].parent.mkdir(parents=True, exist_ok=True)
            path[0].write_text(json.dumps(dict(record, rows=rows), indent=2, default=str))
        save(run(a, device, heap, save)[0])
        print(f"wrote {path[0]}")
        return path[0]
    return cli.run("bench", bench, out_of_memory="lower --latent (the bench builds SD v1-4 at full size)",
                   interrupted=lambda: f"the figures measured so far are in {path[0]}" if path and path[0].exists()
                   else "nothing was measured yet")


if __name__ == "__main__":
    main()
