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
   - RWR (--algo rwr, rwr-sparse) is the paper's maximum-likelihood baseline: the ordinary denoising loss on the final
     latents, weighted by softmax(reward / beta) (or 1 for the top 10%, 0 for the rest). It never uses the per-step
     log-probs, only the variational bound, and the paper shows DDPO beating it.

    python train.py --reward jpeg                            # the bundled tiny model, CPU, a few minutes
    python train.py --preset sd14 --reward aesthetic         # SD v1-4 + LoRA, one GPU
    python train.py --resume runs/<name>                     # continue a run where it stopped
    torchrun --nproc_per_node=8 train.py --preset sd14       # data-parallel on 8 GPUs
"""
import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanoddpo.checkpoint import checkpoints_of, resume, save_checkpoint
from nanoddpo.ddim import DDIM, guided_eps, log_prob_of_step, sample
from nanoddpo.images import grid, to_uint8
from nanoddpo.lora import add_lora, lora_parameters
from nanoddpo.model import LoadError, StableDiffusion, resolve_model
from nanoddpo.prompts import PROMPTS, draw_prompts
from nanoddpo.rewards import REWARDS, AsyncReward, get_reward


@dataclass
class Settings:
    preset: str = "tiny"          # tiny (bundled model, CPU) | sd14 (SD v1-4 + LoRA, one GPU); fields below override it
    model: str = ""               # model folder; "" = weights/stable-diffusion-v1-4 if downloaded, else weights/tiny
    reward: str = "jpeg"          # a name in nanoddpo/rewards.py REWARDS
    algo: str = "ppo"             # ppo (DDPO_IS, clipped importance sampling) | reinforce (DDPO_SF) | rwr | rwr-sparse
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
    batch_size: int = 8           # images per sampling batch (per GPU under torchrun)
    batches_per_epoch: int = 4    # samples per epoch = batch_size * batches_per_epoch
    images_per_prompt: int = 1    # each epoch draws samples/this prompts and samples each this many times
    # training
    train_batch_size: int = 4     # trajectories per UNet call in training (x2 for guidance)
    grad_accum: int = 1           # train batches per optimizer step; one step averages over them and their timesteps
    num_inner_epochs: int = 1     # passes over each epoch's samples (ppo only; reinforce makes one update per batch)
    timestep_fraction: float = 1.0  # fraction of each trajectory's steps trained, drawn at random per sample
    clip_range: float = 1e-4      # PPO clip on the per-dimension ratio (about 0.19..5.1 on the true ratio at 64x64x4)
    adv_clip_max: float = 5.0     # advantages are clipped to +-this
    rwr_beta: float = 0.2         # rwr: weights softmax(reward / beta) * N (the authors' JAX code uses 0.2)
    rwr_top_fraction: float = 0.1  # rwr-sparse: the top fraction of the epoch's samples by reward, weight 1
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
    threads: int = 0              # CPU threads for torch; 0 = torch's default (one per core)
    # outputs
    save_every: int = 1           # epochs between checkpoints
    keep_checkpoints: int = 3     # older ones are deleted
    grid_every: int = 5           # epochs between sample grids


PRESETS = {
    # The bundled tiny model on a 2-core CPU, the default: about 7.5 minutes. 10 DDIM steps, half of them trained.
    # Every epoch samples each of the 80 prompts 4 times (320 samples), so each prompt's rewards are z-scored against
    # its own from the first epoch: JPEG sizes differ far more between prompts (striped vs plain) than within one.
    # Its latents are 8x8x4 = 256 dims, not 16,384, so the clip range that gives SD's trust region on the true ratio
    # is 1e-4 * 16384 / 256 = 6.4e-3. Full fine-tuning: LoRA on 64-wide attention is too small to move this model in
    # minutes. One thread: two contend badly with anything else on a 2-core machine.
    "tiny": dict(num_steps=10, batch_size=64, batches_per_epoch=5, images_per_prompt=4, train_batch_size=32,
                 grad_accum=2, timestep_fraction=0.5, epochs=10, lr=3e-4, clip_range=6.4e-3, lora=False,
                 stat_buffer=16, stat_min_count=4, save_every=4, grid_every=4, threads=1),
    # SD v1-4 with LoRA on one GPU: the paper's 256 samples per epoch and 4 optimizer steps per epoch via accumulation.
    "sd14": dict(num_steps=50, batch_size=8, batches_per_epoch=32, train_batch_size=4, grad_accum=16, epochs=100,
                 lora=True, lr=3e-4),
}


ALGOS = ("ppo", "reinforce", "rwr", "rwr-sparse")


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
        ckpts = checkpoints_of(given["resume"])
        if not ckpts:
            raise SettingsError(f"--resume {given['resume']}: it holds no checkpoint (no checkpoints/step_*), nothing to resume")
        ckpt = ckpts[-1]
        return Settings(**{**json.loads((ckpt / "state.json").read_text())["settings"], **given}), ckpt
    preset = given.get("preset", Settings.preset)
    if preset not in PRESETS:
        raise SettingsError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return Settings(**{**PRESETS[preset], **given}), None


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
    """(N,) advantages for DDPO, or (N,) loss weights for RWR. A sample whose reward is NaN or inf gets 0 (it drops out
    of the update) and stays out of every statistic; keeping it in place keeps all ranks' batches the same size."""
    ok = np.isfinite(rewards)
    r, out = rewards[ok], np.zeros_like(rewards)
    if s.algo == "rwr":  # softmax(r / beta) * N: mean weight 1, the best samples weigh most
        w = np.exp((r - r.max()) / s.rwr_beta)
        out[ok] = w / w.sum() * len(r)
    elif s.algo == "rwr-sparse":  # weight 1 for the top fraction, 0 for the rest
        out[ok] = r >= np.quantile(r, 1 - s.rwr_top_fraction)
    else:
        z = tracker.advantages([p for p, k in zip(prompts, ok) if k], r) if s.per_prompt_stats else \
            (r - r.mean()) / (r.std() + 1e-6)
        out[ok] = np.clip(z, -s.adv_clip_max, s.adv_clip_max)
    return out


# -----------------------------------------------------------------------------
# The losses: all of the RL math is these few lines


def policy_loss(s, log_prob, old_log_prob, advantages):
    """DDPO. Returns (pg_loss, approx_kl, clipfrac) for one batch of steps; log-probs and advantages are (B,)."""
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


def rwr_loss(unet, ddim, s, x0, context, negative_context, weights, gen):
    """RWR: the reward-weighted denoising loss w_i * ||eps_guided(x_t, t, c) - eps||^2 at a random t per sample."""
    t = torch.randint(ddim.alpha_bar.numel(), (len(x0),), generator=gen).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    eps = guided_eps(unet, ddim.add_noise(x0, noise, t), t, context, negative_context, s.guidance_scale)
    return (weights * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()


# -----------------------------------------------------------------------------


def main(s, resume_ckpt=None):
    # Under torchrun every process runs this same function on its own GPU; alone, rank 0 of a world of 1.
    distributed = "RANK" in os.environ
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    auto = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if s.device == "auto" else s.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    precision = ("bf16" if cuda else "fp32") if s.precision == "auto" else s.precision
    use_compile = cuda if s.compile == "auto" else s.compile == "on"
    compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = torch.autocast(device.type, compute_dtype) if precision != "fp32" else nullcontext()
    log = print if rank == 0 else (lambda *a, **k: None)
    if s.threads:
        torch.set_num_threads(s.threads)

    # --- derived quantities, checked before anything heavy -----------------------------------------------------
    if s.algo not in ALGOS:
        raise SettingsError(f"unknown algorithm {s.algo!r}; choose one of: {', '.join(ALGOS)}")
    if s.reward not in REWARDS:
        raise SettingsError(f"unknown reward {s.reward!r}; choose one of: {', '.join(REWARDS)}")
    local_samples = s.batch_size * s.batches_per_epoch
    samples_per_epoch = local_samples * world
    train_batches = local_samples // s.train_batch_size
    if local_samples % s.train_batch_size:
        raise SettingsError(f"samples per epoch per process ({s.batch_size} x {s.batches_per_epoch} = {local_samples}) "
                            f"is not divisible by --train-batch-size {s.train_batch_size}")
    if s.algo == "reinforce":  # one update per fresh batch: all of the epoch's samples go into one optimizer step
        s.grad_accum, s.num_inner_epochs = train_batches, 1
    if train_batches % s.grad_accum:
        raise SettingsError(f"{train_batches} train batches per epoch are not divisible by --grad-accum {s.grad_accum}")
    if s.images_per_prompt < 1 or samples_per_epoch % s.images_per_prompt:
        raise SettingsError(f"--images-per-prompt {s.images_per_prompt} must be at least 1 and divide the samples "
                            f"per epoch ({samples_per_epoch})")
    timesteps_trained = max(1, int(s.num_steps * s.timestep_fraction))
    steps_per_epoch = train_batches // s.grad_accum * s.num_inner_epochs

    model_dir = resolve_model(s.model)
    log(f"model: {model_dir}" + ("" if s.model else " (the default: pass --model to choose another)"))
    prompts = load_prompts(s, model_dir)
    if not s.name:  # every rank must agree on the folder: rank 0 names it
        names = [f"{s.reward}-{s.algo}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if distributed:
            dist.broadcast_object_list(names, src=0)
        s.name = names[0]
    run_dir = resume_ckpt.parent.parent if resume_ckpt else Path(s.out_dir) / s.name
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / f".write_test{rank}").write_text("ok")
        (run_dir / f".write_test{rank}").unlink()
    except OSError as e:
        raise SettingsError(f"cannot write to {run_dir} ({e.strerror}); choose another folder with --out-dir") from None
    log(f"run: {run_dir}  device: {device} x {world}  precision: {precision}  compile: {use_compile}  algo: {s.algo}  "
        f"reward: {s.reward}  prompts: {len(prompts)}")
    log(f"samples/epoch: {samples_per_epoch}  optimizer steps/epoch: {steps_per_epoch}  timesteps trained/sample: "
        f"{timesteps_trained} of {s.num_steps}  samples/optimizer step: {s.train_batch_size * s.grad_accum * world}")

    # --- model, trainable weights, optimizer ------------------------------------------------------------------------
    torch.manual_seed(s.seed)  # the same LoRA init on every rank
    sd = StableDiffusion.from_pretrained(model_dir, device=device, dtype=compute_dtype if cuda else torch.float32)
    if s.lora:
        params = lora_parameters(add_lora(sd.unet, s.lora_rank))  # new LoRA weights are fp32
    else:
        params = list(sd.unet.float().requires_grad_(True).parameters())  # fp32 master weights
    log(f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.3f} M ({'LoRA' if s.lora else 'full UNet'})")
    optimizer = torch.optim.AdamW(params, lr=s.lr, betas=(s.adam_beta1, s.adam_beta2), weight_decay=s.weight_decay,
                                  eps=s.adam_eps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    unet = torch.compile(sd.unet) if use_compile else sd.unet  # the compiled callable runs; sd.unet is what we save
    tracker = PerPromptStatTracker(s.stat_buffer, s.stat_min_count)
    start_epoch, global_step = 0, 0
    if resume_ckpt:
        state = resume(resume_ckpt, sd, optimizer)
        start_epoch, global_step, tracker.buffers = state["epoch"], state["global_step"], state["stat_buffers"]
        log(f"resumed from {resume_ckpt}: epoch {start_epoch}, optimizer step {global_step}")
    reward_fn = get_reward(s.reward)
    scorer = AsyncReward(reward_fn)  # rewards run on a background thread while the next batch samples
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0 and resume_ckpt and metrics_path.exists():  # forget epochs logged after the checkpoint: they rerun
        lines = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["epoch"] < start_epoch]
        metrics_path.write_text("".join(l + "\n" for l in lines))
    ddim = DDIM(s.num_steps).to(device)
    if rank == 0 and cuda:
        torch.cuda.reset_peak_memory_stats()

    for epoch in range(start_epoch, s.epochs):
        # Everything random in an epoch derives from (seed, epoch) and is drawn identically on every rank for the
        # whole epoch; each rank then takes its slice. So prompts never need gathering, a resumed run draws what the
        # original would have, and N processes see exactly the samples one process would.
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
        n_global = s.batch_size * world
        drawn = draw_prompts(prompts, samples_per_epoch, s.images_per_prompt, gen)
        all_prompts = [drawn[b * n_global : (b + 1) * n_global] for b in range(s.batches_per_epoch)]
        all_seeds = [torch.randint(2**31, (n_global,), generator=gen).tolist() for _ in range(s.batches_per_epoch)]
        mine = slice(rank * s.batch_size, (rank + 1) * s.batch_size)

        # --- 1. sample trajectories with the current policy ---------------------------------------------------------
        t0 = time.time()
        trajs, futures = [], []
        for b in tqdm(range(s.batches_per_epoch), desc=f"epoch {epoch} sampling", leave=False, disable=rank > 0):
            traj = sample(sd, all_prompts[b][mine], all_seeds[b][mine], s.num_steps, s.guidance_scale, s.eta,
                          unet=unet, autocast=autocast)
            futures.append(scorer.submit(to_uint8(traj.images), all_prompts[b][mine]))
            trajs.append(traj)
        t_sample = time.time() - t0
        local_rewards = np.concatenate([f.result() for f in futures]).astype(np.float64)  # waits for the last batch
        t_reward = time.time() - t0 - t_sample
        shown = (list(to_uint8(trajs[0].images[:8])), all_prompts[0][mine][:8], local_rewards[:8])  # for the grid

        # --- 2. rewards of the whole epoch -> advantages of this rank's samples -------------------------------------
        rewards = torch.from_numpy(local_rewards).to(device).view(s.batches_per_epoch, 1, s.batch_size)
        if distributed:  # (batches, ranks, batch): the same order as all_prompts
            gathered = [torch.empty_like(rewards) for _ in range(world)]
            dist.all_gather(gathered, rewards)
            rewards = torch.cat(gathered, dim=1)
        rewards = rewards.flatten().cpu().numpy()
        flat_prompts = [p for batch in all_prompts for p in batch]
        if not np.isfinite(rewards).all():
            warnings.warn(f"epoch {epoch}: {int((~np.isfinite(rewards)).sum())} image(s) got a NaN/inf reward and are "
                          f"left out of the update")
        advantages = compute_advantages(s, tracker, flat_prompts, rewards).reshape(s.batches_per_epoch, world, -1)
        advantages = torch.tensor(advantages[:, rank].reshape(-1), dtype=torch.float32, device=device)
        latents = torch.cat([t.latents for t in trajs])            # (N, T+1, C, h, w), this rank's samples
        old_log_probs = torch.cat([t.log_probs for t in trajs])    # (N, T)
        context = torch.cat([t.context for t in trajs])            # (N, 77, D)
        negative_context = trajs[0].negative_context

        # --- 3. train on the stored steps ----------------------------------------------------------------------------
        t0 = time.time()
        stats = torch.zeros(3, device=device)  # running sums of loss, approx_kl, clipfrac: read once per epoch
        micro = 0
        bar = tqdm(total=train_batches * s.num_inner_epochs, desc=f"epoch {epoch} training", leave=False, disable=rank > 0)
        for _ in range(s.num_inner_epochs):
            order = torch.randperm(local_samples, generator=gen).to(device)
            # Each sample trains its own random subset and order of steps, so a micro-batch mixes timesteps.
            perms = torch.stack([torch.randperm(s.num_steps, generator=gen) for _ in range(samples_per_epoch)])
            perms = perms.view(s.batches_per_epoch, world, s.batch_size, -1)[:, rank].reshape(local_samples, -1).to(device)
            for i in range(0, local_samples, s.train_batch_size):
                rows = order[i : i + s.train_batch_size]
                for j in range(timesteps_trained):
                    step = perms[rows, j]
                    with autocast:
                        if s.algo.startswith("rwr"):
                            loss = rwr_loss(unet, ddim, s, latents[rows, -1], context[rows], negative_context,
                                            advantages[rows], gen)
                            approx_kl = clipfrac = torch.zeros((), device=device)
                        else:
                            log_prob = log_prob_of_step(unet, ddim, latents[rows, step], latents[rows, step + 1],
                                                        ddim.timesteps[step], context[rows], negative_context,
                                                        s.guidance_scale, s.eta)
                            loss, approx_kl, clipfrac = policy_loss(s, log_prob, old_log_probs[rows, step], advantages[rows])
                    # one optimizer step averages over its grad_accum batches and their trained timesteps
                    scaler.scale(loss / (s.grad_accum * timesteps_trained)).backward()
                    stats += torch.stack([loss.detach(), approx_kl, clipfrac])
                micro += 1
                bar.update()
                if micro % s.grad_accum == 0:
                    if distributed:  # average exactly the trained parameters' gradients over the ranks
                        for p in params:
                            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
        bar.close()
        t_train = time.time() - t0

        # --- log, show, save (rank 0 only, and nothing in here waits for the other ranks) -------------------------
        if rank == 0:
            loss, approx_kl, clipfrac = (stats / (micro * timesteps_trained)).tolist()
            ok = rewards[np.isfinite(rewards)]
            m = dict(epoch=epoch, global_step=global_step, reward_mean=float(ok.mean()), reward_std=float(ok.std()),
                     loss=loss, approx_kl=approx_kl, clipfrac=clipfrac, samples=len(ok), sample_s=round(t_sample, 2),
                     reward_s=round(t_reward, 2), train_s=round(t_train, 2),
                     images_per_s=round(samples_per_epoch / t_sample, 2))
            if cuda:
                m["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                m["mfu"] = mfu(sd, s, samples_per_epoch / world, timesteps_trained, t_sample + t_train)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            log(f"epoch {epoch}: reward {m['reward_mean']:.4f} +- {m['reward_std']:.4f}  loss {loss:.4g}  "
                f"kl {approx_kl:.2e}  clipfrac {clipfrac:.3f}  sample {t_sample:.1f}s  train {t_train:.1f}s")
            last = epoch == s.epochs - 1
            if (epoch + 1) % s.grid_every == 0 or last:
                images, labels, scores = shown
                grid([images], [f"epoch {epoch}"], labels, [scores]).save(run_dir / f"samples_epoch{epoch:04d}.png")
            if (epoch + 1) % s.save_every == 0 or last:
                state = dict(epoch=epoch + 1, global_step=global_step, settings=dataclasses.asdict(s),
                             stat_buffers=tracker.buffers)
                save_checkpoint(run_dir, sd, s.lora, optimizer, state, s.keep_checkpoints)
    scorer.close()
    log(f"done: {run_dir}")
    return sd


PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10": 125, "RTX 4090": 165}  # dense bf16


def mfu(sd, s, samples, timesteps_trained, seconds):
    """Model-FLOPs utilisation of one GPU: UNet FLOPs (counted once) over the GPU's dense bf16 peak. Sampling is a
    forward of 2 (the guidance pair) per step; training forward + backward, counted as 3 forwards by convention.
    The VAE and the text encoder are left out."""
    if not hasattr(sd, "unet_flops"):
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, *sd.latent_shape, device=sd.device, dtype=sd.dtype)
        ctx = torch.zeros(1, sd.max_length, sd.unet.cfg["cross_attention_dim"], device=sd.device, dtype=sd.dtype)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            sd.unet(x, torch.tensor([1], device=sd.device), ctx)
        sd.unet_flops = counter.get_total_flops()  # one image, one step
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
    flops = sd.unet_flops * 2 * samples * (s.num_steps + 3 * timesteps_trained * s.num_inner_epochs)
    return round(flops / seconds / (peak * 1e12), 4) if peak else None


if __name__ == "__main__":
    try:
        settings, ckpt = parse_settings()
        main(settings, ckpt)
    except (SettingsError, LoadError, FileNotFoundError) as e:  # FileNotFoundError: a reward model not downloaded
        sys.exit(f"train.py: error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
