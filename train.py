"""
DDPO: fine-tune Stable Diffusion on a reward with reinforcement learning (Black et al. 2023, arXiv 2305.13301).

Denoising is a 50-step decision process. The state is (x_t, t, prompt), the action is the next latent x_{t-1}, and the
policy is one stochastic DDIM step: a Gaussian whose mean comes from the UNet's guided noise prediction
(nanoddpo/ddim.py). A reward r(x_0, prompt) arrives only at the end. Each epoch:

1. sample images with the current model, recording every latent and the log-probability of every step;
2. score the images; turn rewards into advantages A by z-scoring them per prompt (a running buffer of that
   prompt's recent rewards) or over the batch, then clipping to +-adv_clip_max;
3. re-run the UNet on the stored steps and update it to make good trajectories likelier:
   - DDPO_SF (--algo reinforce) is REINFORCE: loss = -A * log p(x_{t-1} | x_t, c), one update per fresh batch;
   - DDPO_IS (--algo ppo, the default) reuses samples for several optimizer steps with importance sampling,
     ratio = p_theta / p_old, and PPO's clipped objective max(-A * ratio, -A * clip(ratio, 1 +- clip_range)) keeps
     the policy near the one that sampled. At ratio 1 (the first update on fresh samples) its gradient is
     REINFORCE's: -A * grad(ratio) = -A * grad(log p) there. The log-prob is a mean over latent dims (see ddim.py),
     which is why clip_range is as small as 1e-4.

    python train.py --reward jpeg                            # the bundled tiny model, CPU, a few minutes
    python train.py --preset sd14 --reward aesthetic         # SD v1-4 + LoRA, one GPU
    python train.py --resume runs/<name>                     # continue a run where it stopped
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from nanoddpo.ddim import DDIM, log_prob_of_step, sample
from nanoddpo.images import grid, to_uint8
from nanoddpo.lora import add_lora, apply_lora_file, lora_parameters, lora_state_dict
from nanoddpo.model import LoadError, StableDiffusion, resolve_model, save_json, save_safetensors
from nanoddpo.prompts import PROMPTS
from nanoddpo.rewards import REWARDS, get_reward


@dataclass
class Settings:
    preset: str = "tiny"          # tiny (bundled model, CPU) | sd14 (SD v1-4 + LoRA, one GPU); fields below override it
    model: str = ""               # model folder; "" = weights/stable-diffusion-v1-4 if downloaded, else weights/tiny
    reward: str = "jpeg"          # a name in nanoddpo/rewards.py REWARDS
    algo: str = "ppo"             # ppo (DDPO_IS, clipped importance sampling) | reinforce (DDPO_SF)
    prompts: str = ""             # a set in nanoddpo/prompts.py, a .txt/.json file; "" = the model's prompts.json, else simple_animals
    epochs: int = 100
    seed: int = 0
    name: str = ""                # run folder runs/<name>; "" = <reward>-<algo>-<time>
    out_dir: str = "runs"
    resume: str = ""              # a run folder: continue from its latest checkpoint
    # sampling
    num_steps: int = 50           # DDIM steps per image
    eta: float = 1.0              # DDIM stochasticity; 1 makes every step a proper Gaussian policy
    guidance_scale: float = 5.0   # classifier-free guidance w, used when sampling AND inside the loss
    batch_size: int = 8           # images per sampling batch
    batches_per_epoch: int = 4    # samples per epoch = batch_size * batches_per_epoch
    # training
    train_batch_size: int = 4     # trajectories per UNet call in training (x2 for guidance)
    grad_accum: int = 1           # train batches per optimizer step; one step averages over them and their timesteps
    num_inner_epochs: int = 1     # passes over each epoch's samples (ppo only; reinforce makes one update per batch)
    timestep_fraction: float = 1.0  # fraction of each trajectory's steps trained, drawn at random per sample
    clip_range: float = 1e-4      # PPO clip on the per-dimension ratio (about 0.19..5.1 on the true ratio at 64x64x4)
    adv_clip_max: float = 5.0     # advantages are clipped to +-this
    per_prompt_stats: bool = True  # z-score rewards per prompt (running buffer) rather than over the batch
    stat_buffer: int = 16         # rewards kept per prompt
    stat_min_count: int = 16      # below this many, use the batch's statistics
    lr: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    lora: bool = True             # train LoRA adapters on the attention projections; False = full fine-tuning
    lora_rank: int = 4
    # speed
    device: str = "auto"          # auto = cuda if available, else cpu
    precision: str = "auto"       # auto = bf16 on CUDA, fp32 on CPU | fp32 | bf16 | fp16 (with a GradScaler)
    compile: str = "auto"         # torch.compile the UNet: auto = on for CUDA | on | off
    # outputs
    save_every: int = 1           # epochs between checkpoints
    keep_checkpoints: int = 3     # older ones are deleted
    grid_every: int = 5           # epochs between sample grids


PRESETS = {
    # The bundled tiny model on 2 CPU cores: the default, about 5 minutes, reward visibly rises.
    "tiny": dict(num_steps=20, batch_size=32, batches_per_epoch=2, train_batch_size=16, epochs=12, lr=3e-4,
                 lora=False, stat_buffer=32, stat_min_count=8, save_every=4, grid_every=4),
    # SD v1-4 with LoRA on one GPU: the paper's 256 samples per epoch and 4 optimizer steps per epoch via accumulation.
    "sd14": dict(num_steps=50, batch_size=8, batches_per_epoch=32, train_batch_size=4, grad_accum=16, epochs=100,
                 lora=True, lr=3e-4),
}


class SettingsError(ValueError):
    pass


def parse_settings(argv=None):
    parser = argparse.ArgumentParser(description="DDPO fine-tuning; every field of Settings in train.py is a flag.")
    yes_no = lambda text: text.lower() in ("1", "true", "yes", "on")
    for f in dataclasses.fields(Settings):
        parser.add_argument("--" + f.name.replace("_", "-"), type=yes_no if f.type is bool else f.type, default=None,
                            metavar=f.type.__name__, help=f"default {f.default!r} (or the preset's)")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if given.get("resume"):  # a resumed run keeps its settings; what is given on the command line still wins
        ckpt = latest_checkpoint(Path(given["resume"]))
        return Settings(**{**json.loads((ckpt / "state.json").read_text())["settings"], **given}), ckpt
    preset = given.get("preset", Settings.preset)
    if preset not in PRESETS:
        raise SettingsError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return Settings(**{**PRESETS[preset], **given}), None


def latest_checkpoint(run):
    ckpts = sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not ckpts:
        raise SettingsError(f"--resume {run}: no checkpoint in {run / 'checkpoints'} (nothing to resume from)")
    return ckpts[-1]


def load_prompts(s, model_dir):
    if s.prompts in PROMPTS:
        return PROMPTS[s.prompts]()
    path = Path(s.prompts) if s.prompts else model_dir / "prompts.json"
    if path.is_file():
        return json.loads(path.read_text()) if path.suffix == ".json" else path.read_text().split("\n")
    if s.prompts:
        raise SettingsError(f"--prompts {s.prompts!r} is neither a file nor a prompt set ({', '.join(PROMPTS)})")
    return PROMPTS["simple_animals"]()


# -----------------------------------------------------------------------------
# Advantages: how much better than usual was this image for its prompt?


class PerPromptStatTracker:
    """Keeps the last `buffer_size` rewards of each prompt and z-scores new rewards against them, so a prompt that is
    easy (high reward whatever the model does) does not dominate the update. Below `min_count` rewards for a prompt,
    the batch's statistics are used instead."""

    def __init__(self, buffer_size, min_count, buffers=None):
        self.buffer_size, self.min_count, self.buffers = buffer_size, min_count, buffers or {}

    def advantages(self, prompts, rewards):
        prompts, advantages = np.array(prompts), np.empty_like(rewards)
        for prompt in np.unique(prompts):
            mine = prompts == prompt
            buffer = self.buffers.setdefault(str(prompt), [])
            buffer.extend(rewards[mine].tolist())
            del buffer[: -self.buffer_size]
            stats = np.array(buffer) if len(buffer) >= self.min_count else rewards
            advantages[mine] = (rewards[mine] - stats.mean()) / (stats.std() + 1e-6)
        return advantages


def compute_advantages(s, tracker, prompts, rewards):
    if s.per_prompt_stats:
        advantages = tracker.advantages(prompts, rewards)
    else:
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    return np.clip(advantages, -s.adv_clip_max, s.adv_clip_max)


# -----------------------------------------------------------------------------
# The policy-gradient losses: all of DDPO's RL math is these few lines


def policy_loss(s, log_prob, old_log_prob, advantages):
    """Returns (pg_loss, approx_kl, clipfrac) for one batch of steps; log-probs and advantages are (B,)."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    if s.algo == "reinforce":
        pg_loss = -(advantages * log_prob).mean()
    else:
        pg_loss1 = -advantages * ratio
        pg_loss2 = -advantages * torch.clamp(ratio, 1 - s.clip_range, 1 + s.clip_range)
        pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    approx_kl = 0.5 * (log_ratio**2).mean()  # an estimate of KL(p_old || p_theta), for monitoring
    clipfrac = ((ratio - 1).abs() > s.clip_range).float().mean()
    return pg_loss, approx_kl.detach(), clipfrac.detach()


# -----------------------------------------------------------------------------
# Checkpoints: weights as safetensors under published names, everything else JSON; each one appears atomically


def optimizer_tensors(optimizer):
    return {f"{i}.{k}": v for i, state in optimizer.state_dict()["state"].items() for k, v in state.items()}


def save_checkpoint(run_dir, s, sd, optimizer, tracker, epoch, global_step):
    final = run_dir / "checkpoints" / f"step_{global_step}"
    tmp = run_dir / "checkpoints" / f".tmp_step_{global_step}"  # not matched by step_*: a killed save is ignored
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = lora_state_dict(sd.unet) if s.lora else sd.unet.state_dict()
    save_safetensors(weights, tmp / ("lora.safetensors" if s.lora else "unet.safetensors"))
    save_safetensors(optimizer_tensors(optimizer), tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    save_safetensors(rng, tmp / "rng.safetensors")
    save_json(dict(epoch=epoch, global_step=global_step, base_model=sd.path, base_fingerprint=sd.fingerprint,
                   settings=dataclasses.asdict(s), stat_buffers=tracker.buffers,
                   optimizer_groups=optimizer.state_dict()["param_groups"]), tmp / "state.json")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in sorted(final.parent.glob("step_*"), key=lambda p: int(p.name.split("_")[-1]))[: -s.keep_checkpoints]:
        shutil.rmtree(old)


def load_checkpoint(ckpt, sd, optimizer, tracker):
    state = json.loads((ckpt / "state.json").read_text())
    if state["base_fingerprint"] != sd.fingerprint:
        raise SettingsError(f"{ckpt} was trained on another base model ({state['base_model']}); pass --model for it")
    weights = load_file(ckpt / ("lora.safetensors" if (ckpt / "lora.safetensors").is_file() else "unet.safetensors"))
    sd.unet.load_state_dict({**sd.unet.state_dict(), **weights})
    tensors = load_file(ckpt / "optimizer.safetensors")
    opt_state = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_groups"]})
    tracker.buffers = state["stat_buffers"]
    rng = load_file(ckpt / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["epoch"], state["global_step"]


# -----------------------------------------------------------------------------


def main(s, resume_ckpt):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    precision = ("bf16" if device == "cuda" else "fp32") if s.precision == "auto" else s.precision
    use_compile = (device == "cuda") if s.compile == "auto" else s.compile == "on"
    compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = torch.autocast(device, compute_dtype) if precision != "fp32" else nullcontext()

    # --- derived quantities, checked before anything heavy -----------------------------------------------------
    if s.algo not in ("ppo", "reinforce"):
        raise SettingsError(f"unknown algorithm {s.algo!r}; choose one of: ppo, reinforce")
    if s.reward not in REWARDS:
        raise SettingsError(f"unknown reward {s.reward!r}; choose one of: {', '.join(REWARDS)}")
    samples_per_epoch = s.batch_size * s.batches_per_epoch
    train_batches = samples_per_epoch // s.train_batch_size
    if samples_per_epoch % s.train_batch_size:
        raise SettingsError(f"samples per epoch ({s.batch_size} x {s.batches_per_epoch} = {samples_per_epoch}) is not "
                            f"divisible by --train-batch-size {s.train_batch_size}")
    if s.algo == "reinforce":  # one update per fresh batch: all of the epoch's samples go into one optimizer step
        s.grad_accum, s.num_inner_epochs = train_batches, 1
    if train_batches % s.grad_accum:
        raise SettingsError(f"{train_batches} train batches per epoch are not divisible by --grad-accum {s.grad_accum}")
    timesteps_trained = max(1, int(s.num_steps * s.timestep_fraction))
    steps_per_epoch = train_batches // s.grad_accum * s.num_inner_epochs

    model_dir = resolve_model(s.model)
    print(f"model: {model_dir}" + ("" if s.model else " (the default: pass --model to choose another)"))
    prompts = load_prompts(s, model_dir)
    name = s.name or f"{s.reward}-{s.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = resume_ckpt.parent.parent if resume_ckpt else Path(s.out_dir) / name
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / ".write_test").write_text("ok")
        (run_dir / ".write_test").unlink()
    except OSError as e:
        raise SettingsError(f"cannot write to {run_dir} ({e.strerror}); choose another folder with --out-dir") from None
    print(f"run: {run_dir}  device: {device}  precision: {precision}  compile: {use_compile}  algo: {s.algo}  "
          f"reward: {s.reward}  prompts: {len(prompts)}")
    print(f"samples/epoch: {samples_per_epoch}  optimizer steps/epoch: {steps_per_epoch}  timesteps trained/sample: "
          f"{timesteps_trained} of {s.num_steps}  samples/optimizer step: {s.train_batch_size * s.grad_accum}")

    # --- model, trainable weights, optimizer ------------------------------------------------------------------------
    torch.manual_seed(s.seed)
    frozen_dtype = compute_dtype if device == "cuda" else torch.float32
    sd = StableDiffusion.from_pretrained(model_dir, device=device, dtype=frozen_dtype)
    if s.lora:
        params = lora_parameters(add_lora(sd.unet, s.lora_rank))  # new LoRA weights are fp32
    else:
        params = list(sd.unet.float().requires_grad_(True).parameters())  # fp32 master weights
    print(f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.3f} M ({'LoRA' if s.lora else 'full UNet'})")
    optimizer = torch.optim.AdamW(params, lr=s.lr, betas=(s.adam_beta1, s.adam_beta2), weight_decay=s.weight_decay,
                                  eps=s.adam_eps)
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    unet = torch.compile(sd.unet) if use_compile else sd.unet  # the compiled callable runs; sd.unet is what we save
    tracker = PerPromptStatTracker(s.stat_buffer, s.stat_min_count)
    reward_fn = get_reward(s.reward)
    scorer = ThreadPoolExecutor(1)  # rewards run in the background while the next batch samples
    start_epoch, global_step = load_checkpoint(resume_ckpt, sd, optimizer, tracker) if resume_ckpt else (0, 0)
    metrics_path = run_dir / "metrics.jsonl"
    if resume_ckpt and metrics_path.exists():  # forget epochs logged after the checkpoint: they are run again
        lines = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["epoch"] < start_epoch]
        metrics_path.write_text("".join(l + "\n" for l in lines))
    ddim = DDIM(s.num_steps).to(device)

    for epoch in range(start_epoch, s.epochs):
        # Everything random in an epoch derives from (seed, epoch), so a resumed run draws what the original would have.
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        # --- 1. sample trajectories with the current policy ---------------------------------------------------------
        t0 = time.time()
        trajs, futures, epoch_prompts = [], [], []
        for b in tqdm(range(s.batches_per_epoch), desc=f"epoch {epoch} sampling", leave=False):
            batch_prompts = [prompts[i] for i in torch.randint(len(prompts), (s.batch_size,), generator=gen)]
            seeds = torch.randint(2**31, (s.batch_size,), generator=gen).tolist()
            traj = sample(sd, batch_prompts, seeds, s.num_steps, s.guidance_scale, s.eta, unet=unet, autocast=autocast)
            futures.append(scorer.submit(reward_fn, to_uint8(traj.images), batch_prompts))
            trajs.append(traj)
            epoch_prompts += batch_prompts
        t_sample = time.time() - t0
        rewards = np.concatenate([f.result() for f in futures]).astype(np.float64)  # waits for the last batch only
        t_reward = time.time() - t0 - t_sample
        shown = (list(to_uint8(trajs[0].images[:8])), epoch_prompts[:8], rewards[:8])  # for the grid below

        # --- 2. rewards -> advantages; drop samples whose reward is not a number ------------------------------------
        latents = torch.cat([t.latents for t in trajs])            # (N, T+1, C, h, w)
        old_log_probs = torch.cat([t.log_probs for t in trajs])    # (N, T)
        context = torch.cat([t.context for t in trajs])            # (N, 77, D)
        keep = np.isfinite(rewards)
        if not keep.all():
            warnings.warn(f"epoch {epoch}: {int((~keep).sum())} image(s) got a NaN/inf reward and are left out")
            idx = torch.from_numpy(np.flatnonzero(keep)).to(device)
            latents, old_log_probs, context = latents[idx], old_log_probs[idx], context[idx]
            rewards, epoch_prompts = rewards[keep], [p for p, k in zip(epoch_prompts, keep) if k]
        n = len(rewards) // s.train_batch_size * s.train_batch_size  # whole train batches only
        advantages = torch.tensor(compute_advantages(s, tracker, epoch_prompts, rewards), dtype=torch.float32, device=device)

        # --- 3. train on the stored steps ----------------------------------------------------------------------------
        t0 = time.time()
        stats = torch.zeros(3, device=device)  # running sums of loss, approx_kl, clipfrac: read once per epoch
        micro = 0
        bar = tqdm(total=(n // s.train_batch_size) * s.num_inner_epochs, desc=f"epoch {epoch} training", leave=False)
        for _ in range(s.num_inner_epochs):
            order = torch.randperm(len(rewards), generator=gen)[:n].to(device)
            # Each sample trains its own random subset and order of steps, so a micro-batch mixes timesteps.
            perms = torch.stack([torch.randperm(s.num_steps, generator=gen) for _ in range(len(rewards))]).to(device)
            for i in range(0, n, s.train_batch_size):
                rows = order[i : i + s.train_batch_size]
                for j in range(timesteps_trained):
                    step = perms[rows, j]
                    with autocast:
                        log_prob = log_prob_of_step(unet, ddim, latents[rows, step], latents[rows, step + 1],
                                                    ddim.timesteps[step], context[rows], trajs[0].negative_context,
                                                    s.guidance_scale, s.eta)
                    loss, approx_kl, clipfrac = policy_loss(s, log_prob, old_log_probs[rows, step], advantages[rows])
                    # one optimizer step averages over its grad_accum batches and their trained timesteps
                    scaler.scale(loss / (s.grad_accum * timesteps_trained)).backward()
                    stats += torch.stack([loss.detach(), approx_kl, clipfrac])
                micro += 1
                bar.update()
                if micro % s.grad_accum == 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
        optimizer.zero_grad(set_to_none=True)  # a partial window (only when NaN rewards dropped samples) is discarded
        bar.close()
        t_train = time.time() - t0

        # --- log, show, save -----------------------------------------------------------------------------------------
        loss, approx_kl, clipfrac = (stats / max(1, micro * timesteps_trained)).tolist()
        m = dict(epoch=epoch, global_step=global_step, reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                 loss=loss, approx_kl=approx_kl, clipfrac=clipfrac, samples=int(len(rewards)), sample_s=round(t_sample, 2),
                 reward_s=round(t_reward, 2), train_s=round(t_train, 2), images_per_s=round(samples_per_epoch / t_sample, 2))
        if device == "cuda":
            m["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            m["mfu"] = mfu(sd, s, samples_per_epoch, timesteps_trained, t_sample + t_train)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        print(f"epoch {epoch}: reward {m['reward_mean']:.4f} +- {m['reward_std']:.4f}  loss {loss:.4g}  kl {approx_kl:.2e}  "
              f"clipfrac {clipfrac:.3f}  sample {t_sample:.1f}s  train {t_train:.1f}s")
        last = epoch == s.epochs - 1
        if (epoch + 1) % s.grid_every == 0 or last:
            images, labels, scores = shown
            grid([images], [f"epoch {epoch}"], labels, [scores]).save(run_dir / f"samples_epoch{epoch:04d}.png")
        if (epoch + 1) % s.save_every == 0 or last:
            save_checkpoint(run_dir, s, sd, optimizer, tracker, epoch + 1, global_step)
    scorer.shutdown()
    print(f"done: {run_dir}")


PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10": 125, "RTX 4090": 165}  # dense bf16


def mfu(sd, s, samples, timesteps_trained, seconds):
    """Model-FLOPs utilisation: UNet FLOPs (counted once, 2B batch for guidance) over the GPU's dense bf16 peak.
    Training counts forward + backward as 3 forwards, the usual convention; VAE and text encoder are left out."""
    if not hasattr(sd, "_unet_flops"):
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(2, *sd.latent_shape, device=sd.device, dtype=sd.dtype)
        ctx = torch.zeros(2, sd.max_length, sd.unet.cfg["cross_attention_dim"], device=sd.device, dtype=sd.dtype)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            sd.unet(x, torch.tensor([1, 1], device=sd.device), ctx)
        sd._unet_flops = counter.get_total_flops() / 2  # per sample, guidance pair included in the 2
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    flops = sd._unet_flops * 2 * samples * (s.num_steps + 3 * timesteps_trained * s.num_inner_epochs)
    return round(flops / seconds / (peak * 1e12), 4) if peak else None


if __name__ == "__main__":
    try:
        settings, ckpt = parse_settings()
        main(settings, ckpt)
    except (SettingsError, LoadError) as e:
        sys.exit(f"train.py: error: {e}")
