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
   - --kl-coef c adds c * KL(policy step || base model step) at every trained step (DPOK, Fan et al. 2023): a leash
     against over-optimization, logged as kl_to_base either way. --balance-steps (ours) divides each step's term by its
     steepness (ddim.py): otherwise the next-to-last step's gradient, 8x the others', drowns them.
   - RWR (reward-weighted regression, --algo rwr, rwr-sparse) is the paper's maximum-likelihood baseline: the denoising
     loss of the guided eps on the final latents, weighted by softmax(beta * reward) (or 1 for the top 10%, 0 for the
     rest). It never uses the per-step log-probs, only the variational bound, and the paper shows DDPO beating it.

    python train.py --reward jpeg                            # the bundled tiny model, CPU, a few minutes
    python train.py --preset sd14 --reward aesthetic         # SD v1-4 + LoRA, one GPU
    python train.py --resume runs/<name>                     # continue a run where it stopped
    torchrun --nproc_per_node=8 train.py --preset sd14 --batches-per-epoch 2 --grad-accum 1  # 8 GPUs, 256 samples
"""
import copy
import dataclasses
import itertools
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from nanoddpo import cli
from nanoddpo.bench import image_flops, mfu
from nanoddpo.checkpoint import forget_after, how_to_go_on, resume, save_checkpoint, save_settings, start_run
from nanoddpo.cli import UsageError, keep_freed_memory, settings_parser
from nanoddpo.distributed import Ranks
from nanoddpo.ddim import DDIM, guided_eps, sample
from nanoddpo.images import grid, to_uint8
from nanoddpo.lora import add_lora, lora_off, lora_parameters
from nanoddpo.model import StableDiffusion
from nanoddpo.prompts import draw_prompts
from nanoddpo.rewards import AsyncReward, get_reward, reward_label, write_answers
from nanoddpo.settings import check_settings, derived, model_and_prompts, preset_settings, resume_settings
from nanoddpo.world import checker_for


@dataclass
class Settings:
    preset: str = "tiny"          # tiny (bundled model, CPU) | sd14 (SD v1-4 + LoRA, one GPU); other flags override it
    model: str = ""               # folder or .safetensors file; "" = the preset's in weights/: tiny, stable-diffusion-v1-4
    reward: str = "jpeg"          # jpeg | jpeg-incompressibility | aesthetic | alignment | tinyworld | path/to/file.py:fn
    algo: str = "ppo"             # ppo (DDPO_IS, clipped importance sampling) | reinforce (DDPO_SF) | rwr | rwr-sparse
    prompts: str = ""             # a set in nanoddpo/prompts.py, a .txt/.json; "" = sd14: the task's, else the model's
    epochs: int = 100             # >= 1
    seed: int = 0                 # >= 0; everything random in a run derives from it
    name: str = ""                # run folder <out_dir>/<name>; "" = <reward>-<algo>-<time>
    out_dir: str = "runs"         # where run folders go
    resume: str = ""              # a run folder: continue from its latest checkpoint (or its start, if it has none)
    # sampling
    num_steps: int = 50           # DDIM steps per image, 1..1000
    eta: float = 1.0              # DDIM stochasticity, (0, 1] (rwr: 0 too); 1: every step a Gaussian policy
    guidance_scale: float = 5.0   # classifier-free guidance w >= 0, used when sampling AND inside the loss
    batch_size: int = 8           # >= 1 images per sampling batch (per GPU under torchrun)
    batches_per_epoch: int = 4    # >= 1; samples per epoch = batch_size * batches_per_epoch
    images_per_prompt: int = 1    # >= 1, divides the samples per epoch; each drawn prompt is sampled this many times
    # training
    train_batch_size: int = 4     # >= 1 trajectories per UNet call in training (x2 for guidance)
    grad_accum: int = 1           # >= 1 train batches per optimizer step (averaged with their timesteps)
    num_inner_epochs: int = 1     # >= 1 passes over each epoch's samples (reinforce makes one update)
    timestep_fraction: float = 1.0  # (0, 1]: fraction of each trajectory's steps trained, drawn at random per sample
    clip_range: float = 1e-4      # > 0: PPO clip on the per-dimension ratio (0.19..5.1 on the true ratio at 64x64x4)
    adv_clip_max: float = 5.0     # > 0: advantages are clipped to +-this
    kl_coef: float = 0.0          # >= 0: weight of KL(policy || base model) per trained step; 0 = the paper's DDPO
    balance_steps: bool = False   # ours: each step's policy term / its DDIM steepness, so all pull alike (RESULTS.md)
    rwr_beta: float = 0.2         # >= 0, rwr: weights softmax(beta * reward) * N, as in the authors' code (0 = equal)
    rwr_top_fraction: float = 0.1  # (0, 1], rwr-sparse: the top fraction of the epoch's samples by reward, weight 1
    per_prompt_stats: bool = True  # z-score rewards per prompt (running buffer) rather than over the batch
    stat_buffer: int = 16         # >= 1 rewards kept per prompt
    stat_min_count: int = 16      # 1..stat_buffer; below this many rewards of a prompt, use the batch's statistics
    lr: float = 3e-4              # >= 0 (0 warns: nothing will change)
    adam_beta1: float = 0.9       # [0, 1)
    adam_beta2: float = 0.999     # [0, 1)
    weight_decay: float = 1e-4    # >= 0
    adam_eps: float = 1e-8        # > 0
    max_grad_norm: float = 1.0    # > 0: gradients are clipped to this norm
    lora: bool = True             # train LoRA adapters on the attention projections; no = full fine-tuning
    lora_rank: int = 4            # >= 1
    grad_checkpoint: bool = False  # recompute each UNet block's activations in backward: less memory, more time
    # speed
    device: str = "auto"          # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    precision: str = "auto"       # auto (bf16 on GPUs from Ampere, fp16 before; fp32 on CPU) | fp32 | bf16 | fp16
    compile: str = "auto"         # torch.compile the UNet: auto (on for a GPU Triton builds for) | on | off
    threads: int = 0              # >= 0 CPU threads for torch; 0 = torch's default (one per core)
    # outputs
    save_every: int = 1           # >= 1 epochs between checkpoints (and always after the last)
    keep_checkpoints: int = 3     # >= 1; older ones are deleted
    grid_every: int = 5           # >= 1 epochs between sample grids


PRESETS = {
    # The bundled tiny model on a 2-core CPU, the default: about 3 minutes. 10 DDIM steps, half of them trained.
    # Every epoch samples each of the 80 prompts 4 times (320 samples), so each prompt's rewards are z-scored against
    # its own from the first epoch: JPEG sizes differ far more between prompts (striped vs plain) than within one.
    # Its latents are 8x8x4 = 256 dims, not 16,384, so the clip range that gives SD's trust region on the true ratio
    # is 1e-4 * 16384 / 256 = 6.4e-3. Full fine-tuning: LoRA on 64-wide attention is too small to move it in minutes.
    # Eager even on a GPU: compiling its four graphs takes minutes (2 on this CPU), its whole run eager 2 min 44 s here.
    "tiny": dict(num_steps=10, batch_size=64, batches_per_epoch=5, images_per_prompt=4, train_batch_size=32,
                 grad_accum=2, timestep_fraction=0.5, epochs=10, lr=3e-4, clip_range=6.4e-3, lora=False,
                 stat_buffer=16, stat_min_count=4, save_every=4, grid_every=4, compile="off"),
    # SD v1-4 with LoRA on one GPU: the paper's 256 samples and 4 optimizer steps per epoch, via accumulation. Batches
    # of 16 and 8, not the authors' 8 and 4: the same updates, 1.21x the trajectories per hour on an H200, 12.3 GB peak.
    "sd14": dict(num_steps=50, batch_size=16, batches_per_epoch=16, train_batch_size=8, grad_accum=8, epochs=100,
                 lora=True, lr=3e-4),
}
# With --preset sd14 the paper's settings per task (the authors' configs) unless flags differ; --lora no: lr 1e-5.
PAPER_TASKS = {
    "jpeg": dict(prompts="imagenet_animals"),
    "jpeg-incompressibility": dict(prompts="imagenet_animals"),
    # 2 optimizer steps per epoch: 256 samples / train batch 8 = 32 batches, accumulated 16 at a time
    "aesthetic": dict(prompts="simple_animals", stat_buffer=32, stat_min_count=16, grad_accum=16, epochs=200),
    # 288 samples (the authors' 6 GPUs x 8 x 6: two more held LLaVA), 2 steps: 36 batches of 8, 18 at a time
    "alignment": dict(prompts="animals_activities", stat_buffer=32, stat_min_count=16, batches_per_epoch=18,
                      grad_accum=18, epochs=200),
}


def parse_settings(argv=None):
    """Settings from the command line: preset < (paper task settings with sd14) < flags; a resumed run's saved
    settings < flags. Returns (settings, checkpoint to resume or None)."""
    parser = settings_parser(Settings, PRESETS, "DDPO fine-tuning; every field of Settings in train.py is a flag. "
                             "--preset sd14 also takes the paper's settings for the --reward (train.py's PAPER_TASKS).")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    # a resumed run keeps its saved settings (what is given on the command line still wins)
    s, ckpt = resume_settings(Settings, given) if given.get("resume") else \
        (preset_settings(Settings, PRESETS, PAPER_TASKS, given), None)
    return check_settings(s, given=given), ckpt


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
    if s.algo == "rwr":  # softmax(beta * r) * N: mean weight 1, the best samples weigh most; beta 0 = equal weights
        w = np.exp(s.rwr_beta * (r - r.max()))
        out[ok] = w / w.sum() * len(r)
    elif s.algo == "rwr-sparse":  # weight 1 for the top fraction, 0 for the rest
        out[ok] = r >= np.quantile(r, 1 - s.rwr_top_fraction)
    else:
        z = tracker.advantages([p for p, k in zip(prompts, ok) if k], r) if s.per_prompt_stats else \
            (r - r.mean()) / (r.std() + 1e-8)  # the authors' epsilons: 1e-6 per prompt, 1e-8 here
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
    # KL(p_old || p_theta) per latent dim, to watch: nearly all of it the next-to-last step's (docs/RESULTS.md)
    approx_kl = 0.5 * (log_ratio**2).mean()
    clipfrac = ((ratio - 1).abs() > s.clip_range).float().mean()
    return pg_loss, approx_kl.detach(), clipfrac.detach()


def ddpo_step_loss(s, unet, base_unet, ddim, e, rows, step, gen):
    """DDPO's loss on one stored step of each trajectory in `rows`: score the action x_{t-1} that was taken under the
    current policy (the same guided eps as sampling), then the policy loss, plus the KL to the base model if asked."""
    x_t, x_prev, t = e.latents[rows, step], e.latents[rows, step + 1], ddim.timesteps[step]
    eps = guided_eps(unet, x_t, t, e.context[rows], e.negative_context, s.guidance_scale)
    _, log_prob = ddim.step(eps, t, x_t, eta=s.eta, x_prev=x_prev)
    weight = (steep := ddim.steepness(s.eta)).median() / steep[step] if s.balance_steps else 1  # all steps alike
    loss, approx_kl, clipfrac = policy_loss(s, log_prob, e.old_log_probs[rows, step], e.advantages[rows] * weight)
    if s.kl_coef:  # c * KL(policy || base) at this step; the base's eps is a constant
        with torch.no_grad():
            eps_base = guided_eps(base_unet, x_t, t, e.context[rows], e.negative_context, s.guidance_scale)
        loss = loss + s.kl_coef * ddim.kl(eps, eps_base, t, x_t, s.eta).mean()
    return loss, approx_kl, clipfrac


def rwr_step_loss(s, unet, base_unet, ddim, e, rows, step, gen):
    """RWR: the reward-weighted denoising loss w_i * ||eps_guided(x_t, t, c) - noise||^2 at a random t per sample. The
    generator is shared: t and noise are drawn for every rank and each keeps its own, so no two ranks repeat a draw."""
    x0 = e.latents[rows, -1]
    t = torch.randint(ddim.alpha_bar.numel(), (e.world, len(x0)), generator=gen)[e.rank].to(x0.device)
    noise = torch.randn((e.world, *x0.shape), generator=gen)[e.rank].to(x0.device)
    eps = guided_eps(unet, ddim.add_noise(x0, noise, t), t, e.context[rows], e.negative_context, s.guidance_scale)
    zero = torch.zeros((), device=x0.device)
    return (e.advantages[rows] * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean(), zero, zero


@torch.no_grad()
def kl_to_base(s, unet, base_unet, ddim, e, gen):
    """Mean per-step KL(policy || base) at the states the epoch sampled, one random step per trajectory: an unbiased
    estimate of the mean over all steps at 2 UNet calls per trajectory (about 7.5% of an epoch on the tiny preset)."""
    kls = []  # in sampling-sized batches: under torch.compile the UNet calls reuse the sampling graph
    for rows in torch.arange(len(e.latents), device=e.latents.device).split(s.batch_size):
        step = torch.randint(ddim.num_steps, (len(rows),), generator=gen).to(rows.device)
        x_t, t, context = e.latents[rows, step], ddim.timesteps[step], e.context[rows]
        eps = guided_eps(unet, x_t, t, context, e.negative_context, s.guidance_scale)
        eps_base = guided_eps(base_unet, x_t, t, context, e.negative_context, s.guidance_scale)
        kls.append(ddim.kl(eps, eps_base, t, x_t, s.eta))
    return torch.cat(kls).mean().item()


def load_model(model_dir, device, dtype, lora):
    """SD with its frozen parts in the compute dtype (autocast would cast them on every call anyway). A fully
    fine-tuned UNet is AdamW's fp32 master copy: the published weights exactly, not their bf16 rounding."""
    sd = StableDiffusion.from_pretrained(model_dir, device=device, dtype=dtype if lora else torch.float32)
    sd.vae.to(dtype), sd.text_encoder.to(dtype)
    return sd


def base_model(sd, unet, lora, dtype):
    """The base model's UNet, for the KL to it: with LoRA the same UNet with its adapters off (no copy); with full
    fine-tuning a frozen copy of the published weights (1.7 GB in bf16 at SD size), compiled if the UNet is. Its convs
    and linears take the compute dtype, its norms fp32, as autocast does the policy's: at first the two agree."""
    if lora:
        def base_unet(*args):
            with lora_off(sd.unet):
                return unet(*args)
        return base_unet
    frozen = copy.deepcopy(sd.unet).requires_grad_(False)
    frozen.apply(lambda m: m.to(dtype) if isinstance(m, (nn.Conv2d, nn.Linear)) else None)
    return frozen if unet is sd.unet else torch.compile(frozen, dynamic=False)


def main(s, resume_ckpt=None):
    ranks = Ranks()
    device = ranks.use_device(s.device)
    cuda = device.type == "cuda"
    precision = cli.auto_precision(device) if s.precision == "auto" else s.precision
    use_compile = cli.auto_compile(device) if s.compile == "auto" else s.compile == "on"
    compute_dtype = cli.torch_dtype(precision)
    autocast = cli.autocast_to(device, precision)
    torch.set_num_threads(s.threads or torch.get_num_threads())  # 0: torch's default, one per core
    keep_freed_memory(device)  # on a CPU, large tensors reuse freed pages: SD size 1.2-1.3x faster (nanoddpo/cli.py)
    # checked again now that torchrun's world size is known (parse_settings warned); d: what follows (settings.py)
    d = derived(check_settings(s, ranks.world, warn=False), ranks.world)
    model_dir, prompts, why = model_and_prompts(s)
    ranks.log(f"model: {model_dir}" + ("" if s.model else " (the default: pass --model to choose another)"))
    s.name = s.name or ranks.agree(f"{reward_label(s.reward)}-{s.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(s.resume) if s.resume else Path(s.out_dir) / s.name
    start_run(run_dir, s, ranks.rank)
    ranks.log(f"run: {run_dir}  device: {device} x {ranks.world}  precision: {precision}  compile: "
              f"{'on (epoch 0 compiles, for minutes)' if use_compile else 'off'}  algo: {s.algo}  reward: {s.reward}  "
              f"prompts: {len(prompts)} from {why}")
    ranks.log(f"samples/epoch: {d.samples_per_epoch}  optimizer steps/epoch: {d.steps_per_epoch}  timesteps trained/"
              f"sample: {d.timesteps_trained} of {s.num_steps}  samples/optimizer step: "
              f"{s.train_batch_size * d.grad_accum * ranks.world}")

    # --- model, trainable weights, optimizer ------------------------------------------------------------------------
    torch.manual_seed(s.seed)  # the same LoRA init on every rank
    sd = load_model(model_dir, device, compute_dtype, s.lora)
    sd.unet.grad_checkpoint = s.grad_checkpoint
    if s.lora:
        params = lora_parameters(add_lora(sd.unet, s.lora_rank))  # new LoRA weights are fp32
    else:
        params = list(sd.unet.requires_grad_(True).parameters())  # fp32 master weights
    ranks.log(f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.3f} M ({'LoRA' if s.lora else 'full UNet'})")
    optimizer = torch.optim.AdamW(params, lr=s.lr, betas=(s.adam_beta1, s.adam_beta2), weight_decay=s.weight_decay,
                                  eps=s.adam_eps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    # The compiled callable runs; sd.unet is what we save. A static graph per batch size (sampling and the KL metric,
    # training): 20% faster than torch's dynamic-batch recompile, in epoch and compile time (docs/RESULTS.md).
    unet = torch.compile(sd.unet, dynamic=False) if use_compile else sd.unet
    base_unet = base_model(sd, unet, s.lora, compute_dtype)  # before resuming: the base is the published weights
    tracker = PerPromptStatTracker(s.stat_buffer, s.stat_min_count)
    start_epoch, global_step = 0, 0
    if resume_ckpt:
        state = resume(resume_ckpt, sd, optimizer)
        start_epoch, global_step, tracker.buffers = state["epoch"], state["global_step"], state["stat_buffers"]
        ranks.log(f"resumed from {resume_ckpt}: epoch {start_epoch}, optimizer step {global_step}")
    reward_fn = get_reward(s.reward)
    save_settings(run_dir, s, ranks.rank)  # now that the model and the reward have loaded
    scorer = AsyncReward(reward_fn)  # rewards run on a background thread while the next batch samples
    checker = checker_for(prompts) and AsyncReward(checker_for(prompts))  # the tiny world's faithfulness, logged
    step_loss = rwr_step_loss if s.algo.startswith("rwr") else ddpo_step_loss
    ddim = DDIM(s.num_steps).to(device)
    if ranks.rank == 0:
        forget_after(run_dir / "metrics.jsonl", start_epoch)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    for epoch in range(start_epoch, s.epochs):
        # Everything random in an epoch derives from (seed, epoch) and is drawn identically on every rank for the
        # whole epoch; each rank then takes its slice. So prompts never need gathering, a resumed run draws what the
        # original would have, and N processes sample, and train DDPO on, exactly the (sample, step) pairs one would.
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
        drawn = np.array(draw_prompts(prompts, d.samples_per_epoch, s.images_per_prompt, gen), dtype=object)
        all_prompts = drawn.reshape(s.batches_per_epoch, ranks.world, s.batch_size)
        all_seeds = torch.stack([torch.randint(2**31, (ranks.world * s.batch_size,), generator=gen)
                                 for _ in range(s.batches_per_epoch)]).view(s.batches_per_epoch, ranks.world, -1)

        # --- 1. sample trajectories with the current policy ---------------------------------------------------------
        t0, trajs, futures, checks = time.time(), [], [], []
        for b in tqdm(range(s.batches_per_epoch), desc=f"epoch {epoch} sampling", leave=False, disable=ranks.rank > 0):
            my_prompts = list(all_prompts[b, ranks.rank])
            traj = sample(sd, my_prompts, all_seeds[b, ranks.rank].tolist(), s.num_steps, s.guidance_scale, s.eta,
                          unet=unet, autocast=autocast)
            futures.append(scorer.submit(to_uint8(traj.images), my_prompts))
            checks += [checker.submit(to_uint8(traj.images), my_prompts)] if checker else []
            trajs.append(traj)
        t_sample = time.time() - t0
        local_rewards = np.concatenate([f.result() for f in futures]).astype(np.float64)  # waits for the last batch
        t_reward = time.time() - t0 - t_sample

        # --- 2. rewards of the whole epoch -> advantages of this rank's samples -------------------------------------
        rewards = ranks.gather(local_rewards, s.batches_per_epoch)
        ok = rewards[np.isfinite(rewards)]  # the rewards that count
        cli.need(len(ok), "reward", s.reward, f"NaN or inf for every image of epoch {epoch}")
        if len(ok) < len(rewards):
            warnings.warn(f"epoch {epoch}: {len(rewards) - len(ok)} image(s) with a NaN/inf reward are not trained on")
        advantages = compute_advantages(s, tracker, list(all_prompts.flat), rewards).reshape(all_prompts.shape)
        if np.ptp(ok) == 0 or not advantages.any():  # equal rewards z-score to 0
            warnings.warn(f"epoch {epoch}: the images scored alike (all, or those of each prompt), so this epoch has "
                          f"nothing to learn from: check that --reward {s.reward} tells images apart")
        e = SimpleNamespace(  # this rank's samples
            latents=torch.cat([t.latents for t in trajs]),  # (N, T+1, C, h, w)
            old_log_probs=torch.cat([t.log_probs for t in trajs]) if s.eta else None,  # (N, T); eta 0 (RWR): none
            context=torch.cat([t.context for t in trajs]),  # (N, 77, D)
            negative_context=trajs[0].negative_context,  # (1, 77, D)
            advantages=torch.tensor(ranks.mine(advantages), dtype=torch.float32, device=device),  # (N,)
            rank=ranks.rank, world=ranks.world)  # whose samples (RWR keeps this rank's share of its draws)
        t0 = time.time()
        with autocast:  # before training, so epoch 0's is exactly 0: the policy that sampled it is the base
            kl = kl_to_base(s, unet, base_unet, ddim, e, torch.Generator().manual_seed(s.seed + 7919 * epoch)) \
                if s.eta else None
        t_kl = time.time() - t0

        # --- 3. train on the stored steps ----------------------------------------------------------------------------
        t0 = time.time()
        stats = torch.zeros(3, device=device)  # running sums of loss, approx_kl, clipfrac: read once per epoch
        micro = d.grad_accum * d.timesteps_trained  # (batch, timestep) pairs averaged into one optimizer step
        bar = tqdm(total=d.train_batches * d.inner_epochs, desc=f"epoch {epoch} training", leave=False,
                   disable=ranks.rank > 0)
        for _ in range(d.inner_epochs):
            order = torch.randperm(d.samples_per_epoch, generator=gen)  # as one process draws it: gen moves on alike
            order = order[order < d.local_samples].to(device)  # a shuffle of this rank's samples
            # Each sample trains its own random subset and order of steps, so a micro-batch mixes timesteps.
            perms = torch.stack([torch.randperm(s.num_steps, generator=gen) for _ in range(d.samples_per_epoch)])
            perms = ranks.mine(perms.view(s.batches_per_epoch, ranks.world, s.batch_size, -1)).to(device)
            pairs = itertools.product(range(0, d.local_samples, s.train_batch_size), range(d.timesteps_trained))
            for n, (i, j) in enumerate(pairs, start=1):
                rows = order[i : i + s.train_batch_size]
                with autocast:
                    loss, approx_kl, clipfrac = step_loss(s, unet, base_unet, ddim, e, rows, perms[rows, j], gen)
                scaler.scale(loss / micro).backward()  # one optimizer step averages over its batches and timesteps
                stats += torch.stack([loss.detach(), approx_kl, clipfrac])
                bar.update(j == d.timesteps_trained - 1)
                if n % micro == 0:
                    ranks.average_gradients(params)
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
        bar.close()
        if not torch.stack([p.isfinite().all() for p in params]).all():  # the same weights on every rank: all stop
            raise UsageError(f"epoch {epoch}: the weights became NaN or inf and were not saved: lower --lr (or "
                             f"--max-grad-norm), or --resume {run_dir} from its last checkpoint with a lower --lr")
        t_train = time.time() - t0  # after the check, which waits for the GPU: all queued training kernels count

        # --- log, show, save (rank 0 only, and nothing in here waits for the other ranks) -------------------------
        if ranks.rank == 0:
            loss, approx_kl, clipfrac = (stats / (d.train_batches * d.inner_epochs * d.timesteps_trained)).tolist()
            m = dict(epoch=epoch, global_step=global_step, reward_mean=float(ok.mean()), reward_std=float(ok.std()),
                     loss=loss, approx_kl=approx_kl, clipfrac=clipfrac, kl_to_base=kl, samples=len(ok),
                     sample_s=round(t_sample, 2), reward_s=round(t_reward, 2), train_s=round(t_train, 2), kl_s=round(t_kl, 2),
                     images_per_s=round(d.samples_per_epoch / t_sample, 2))
            if checker:
                m["faithfulness"] = float(np.concatenate([c.result() for c in checks]).mean())
            if cuda:
                m["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                m["mfu"] = mfu(image_flops(sd), image_flops(sd, train=True), s.num_steps, d.local_samples,
                               d.timesteps_trained * d.inner_epochs, t_sample + t_train)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            write_answers(reward_fn, run_dir / "answers.jsonl", epoch)  # what LLaVA said, for the alignment reward
            ranks.log(f"epoch {epoch}: reward {m['reward_mean']:.4f} +- {m['reward_std']:.4f}  loss {loss:.4g}  "
                      f"kl {approx_kl:.2e}  clipfrac {clipfrac:.3f}  kl_to_base {kl or 0:.2e}  sample {t_sample:.1f}s  "
                      f"train {t_train:.1f}s")
            last = epoch == s.epochs - 1
            if (epoch + 1) % s.grid_every == 0 or last:
                grid([list(to_uint8(trajs[0].images[:8]))], [f"epoch {epoch}"], list(all_prompts[0, 0, :8]),
                     [local_rewards[:8]]).save(run_dir / f"samples_epoch{epoch:04d}.png")
            if (epoch + 1) % s.save_every == 0 or last:
                state = dict(epoch=epoch + 1, global_step=global_step, settings=dataclasses.asdict(s),
                             stat_buffers=tracker.buffers)
                save_checkpoint(run_dir, sd, s.lora, optimizer, state, s.keep_checkpoints)
    for worker in filter(None, (scorer, checker, ranks)):  # the reward threads, torchrun's process group
        worker.close()
    ranks.log(f"done: {run_dir}")
    return sd


if __name__ == "__main__":
    s, resume_ckpt = cli.run("train.py", parse_settings)  # main() names the run in s: the folder to resume
    cli.run("train.py", lambda: main(s, resume_ckpt), interrupted=lambda: how_to_go_on(s), out_of_memory=lambda:
            "halve --train-batch-size and double --grad-accum, or halve --batch-size and double --batches-per-epoch "
            f"(the same updates either way; README: SD v1-4 in 4.3 GB); {how_to_go_on(s)}")
