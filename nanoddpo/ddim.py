"""
DDIM sampling with exact per-step log-probabilities: all of nanoddpo's diffusion math.

DDPO treats the 50 denoising steps as a policy: each stochastic DDIM step (eta = 1) is a Gaussian
p(x_prev | x_t, c) = Normal(x_prev_mean, sigma_t), c the prompt's text embedding, and training needs its log-density
for the action that was taken.
Follows DDIM (Song et al. 2021, eq. 12 and 16) with Stable Diffusion v1's schedule, as DDPO (Black et al. 2023,
arXiv 2305.13301) uses it.

    ddim = DDIM(num_steps=50)                            # timesteps 981, 961, ..., 1
    x_prev, log_prob = ddim.step(eps, t, x_t)            # sample a step and score it
    _, log_prob = ddim.step(eps, t, x_t, x_prev=stored)  # score a stored step under new eps
    kl = ddim.kl(eps, eps_base, t, x_t)                  # KL to the base model's step, per latent dim
    traj = sample(sd, ["a cat"], seeds=[0])              # the whole trajectory train.py needs

Tests: python -m pytest -q tests/test_2_ddim.py
"""
import contextlib
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class DDIM:
    """The SD v1 DDIM schedule and step (counterpart: diffusers' DDIMScheduler with eta as an argument)."""

    def __init__(self, num_steps=50, num_train_steps=1000, beta_start=0.00085, beta_end=0.012, steps_offset=1):
        if num_steps < 1 or num_steps > num_train_steps:
            raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
        # "scaled_linear" betas: linear in sqrt(beta). alpha_bar_t = prod_{s<=t} (1 - beta_s), computed in float64 and
        # stored in float32 so that step math never runs in bf16 even under autocast.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=torch.float64) ** 2
        self.alpha_bar = torch.cumprod(1 - betas, dim=0).float()  # (1000,), 0.99915 -> 0.0047
        # "leading" spacing with steps_offset 1: for 50 steps, 981, 961, ..., 21, 1; each step jumps step_size back.
        self.step_size = num_train_steps // num_steps
        self.timesteps = torch.arange(num_steps - 1, -1, -1) * self.step_size + steps_offset
        self.num_steps = num_steps

    def to(self, device):
        """Move the tables to `device` once, so that steps there index them without host-device copies."""
        self.alpha_bar = self.alpha_bar.to(device)
        self.timesteps = self.timesteps.to(device)
        return self

    def add_noise(self, x0, noise, t):
        """The forward process q(x_t | x_0) = Normal(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), sampled with `noise`
        at any of the 1000 training timesteps t (B,): what the denoising loss of pretraining and RWR trains on."""
        alpha_bar_t = torch.take(self.alpha_bar.to(x0.device), t).reshape(-1, *[1] * (x0.ndim - 1))
        return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise

    def sigma(self, t, eta=1.0, device=None):
        """Std of the step's Gaussian at timestep(s) t (DDIM eq. 16): 0.454 at t = 981 down to 0.021 at t = 1 for eta = 1."""
        alpha_bar_t, alpha_bar_prev = self._alpha_bars(t, device or self.alpha_bar.device)
        return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()

    def _alpha_bars(self, t, device):
        # A lookup on the device (no .item(), no branch on values) so t may be a number, a 0-d or a (B,) tensor without
        # a host sync; torch.take rather than alpha_bar[t], which turns a 0-d index into a Python int (a sync on CUDA).
        # Past the last step t' = t - step_size < 0 and alpha_bar_prev is alpha_bar[0] (set_alpha_to_one = False):
        # exactly what clamping the index at 0 looks up.
        alpha_bar = self.alpha_bar.to(device)
        t = torch.as_tensor(t, device=device)
        return torch.take(alpha_bar, t), torch.take(alpha_bar, (t - self.step_size).clamp(min=0))

    def step(self, eps, t, x_t, eta=1.0, x_prev=None, noise=None):
        """One reverse step x_t -> x_prev. Returns (x_prev, log_prob).

        eps: the (guided) noise prediction at (x_t, t); gradient flows through it. t: number, 0-d or (B,) tensor.
        x_prev=None samples x_prev = x_prev_mean + sigma_t * noise (noise ~ N(0, I) drawn here when not given);
        a given x_prev is scored instead and returned detached: it is the action taken, not a function of the policy.

        log_prob (B,) is the MEAN over the latent dims (C, h, w) of the per-dimension Gaussian log-density, not the
        sum. The sum over 4 x 64 x 64 = 16,384 dims makes exp(log_prob - old_log_prob) overflow after tiny updates;
        the mean keeps it near 1. The price: a clip range on the per-dimension ratio is loose on the true ratio,
        e.g. 1 +- 1e-4 per dimension is about (0.19, 5.1) on the true ratio over 16,384 dims.

        eta = 0 is deterministic DDIM: sampling returns (x_prev_mean, None); scoring a given x_prev has no density
        and raises ValueError.
        """
        if eta == 0 and x_prev is not None:
            raise ValueError("eta = 0 is deterministic: a step has no log-probability; use eta > 0 to score x_prev")
        x_prev_mean, sigma_t = self.mean_and_sigma(eps, t, x_t, eta)
        if eta == 0:
            return x_prev_mean, None
        if x_prev is None:
            x_prev = x_prev_mean + sigma_t * (torch.randn_like(x_t) if noise is None else noise.float())
        x_prev = x_prev.detach().float()
        log_prob = -((x_prev - x_prev_mean) ** 2) / (2 * sigma_t**2) - sigma_t.log() - LOG_SQRT_2PI
        return x_prev, log_prob.mean(dim=tuple(range(1, x_t.ndim)))

    def mean_and_sigma(self, eps, t, x_t, eta=1.0):
        """The step's Gaussian: x_prev_mean (B, C, h, w) and sigma_t (B, 1, 1, 1), float32 (DDIM eq. 12 and 16)."""
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        shape = (-1,) + (1,) * (x_t.ndim - 1)  # broadcast the per-sample scalars over (C, h, w)
        alpha_bar_t, alpha_bar_prev = (a.reshape(shape) for a in self._alpha_bars(t, x_t.device))
        eps, x_t = eps.float(), x_t.float()  # bf16 eps from an autocast UNet; the step itself is always float32
        x0_pred = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()  # DDIM eq. 12 "predicted x_0"; no clipping
        sigma_t = self.sigma(t, eta, x_t.device).reshape(shape)
        x_prev_mean = alpha_bar_prev.sqrt() * x0_pred + (1 - alpha_bar_prev - sigma_t**2).sqrt() * eps
        return x_prev_mean, sigma_t

    def steepness(self, eta=1.0):
        """(T,) |d x_prev_mean / d eps| / sigma_t: the size of the gradient of a taken step's log-prob w.r.t. eps per
        unit of its noise (its KL for a change of eps grows with the square). About 1 at most of 10 steps but 8.3 at the
        next-to-last, 101 -> 1 (at 50: 3.3 at 21 -> 1, against 0.4), narrow while its mean still follows eps."""
        x = torch.zeros(self.num_steps, 1, device=self.alpha_bar.device)  # the mean is affine in eps: mean(1) - mean(0)
        (mean_1, sigma), (mean_0, _) = (self.mean_and_sigma(eps, self.timesteps, x, eta) for eps in (x + 1, x))
        return ((mean_1 - mean_0).abs() / sigma).flatten()

    def kl(self, eps, eps_base, t, x_t, eta=1.0):
        """KL(p || p_base) (B,) between the step's Gaussian under eps and under eps_base at the same (x_t, t).

        Both have the same sigma_t, so the KL has a closed form, ||mean - mean_base||^2 / (2 sigma_t^2) (DPOK, Fan
        et al. 2023, arXiv 2305.16381). Like the log-prob it is the MEAN over the latent dims (C, h, w), i.e. the KL
        per dimension; multiply by C * h * w for the KL of the whole latent. Gradient flows through both eps.
        """
        mean, sigma_t = self.mean_and_sigma(eps, t, x_t, eta)
        mean_base, _ = self.mean_and_sigma(eps_base, t, x_t, eta)
        return ((mean - mean_base) ** 2 / (2 * sigma_t**2)).mean(dim=tuple(range(1, x_t.ndim)))


def guided_eps(unet, x_t, t, context, negative_context, guidance_scale):
    """Classifier-free guidance with ONE batched UNet call: eps_uncond + w * (eps_cond - eps_uncond).

    x_t (B, C, h, w); t a number, 0-d or (B,) tensor; context (B, 77, D); negative_context (1 or B, 77, D).
    """
    batch = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device)
    t_in = t.expand(batch).repeat(2)  # always (2B,): one call signature, so torch.compile builds one graph for all
    context_in = torch.cat([negative_context.expand(batch, -1, -1), context])  # (2B, 77, D): [uncond, cond]
    # The inputs take the context's dtype, so a half-precision model also runs without autocast (latents are stored
    # in float32); the guidance arithmetic is float32, as the difference eps_cond - eps_uncond cancels digits.
    eps_uncond, eps_cond = unet(torch.cat([x_t, x_t]).to(context_in.dtype), t_in, context_in).float().chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def log_prob_of_step(unet, ddim, x_t, x_prev, t, context, negative_context, guidance_scale=5.0, eta=1.0):
    """log p_theta(x_prev | x_t, c) (B,) of a stored step under the current UNet, differentiable w.r.t. its weights.
    train.py's ddpo_step_loss makes the same two calls itself, to reuse eps for the KL penalty."""
    eps = guided_eps(unet, x_t, t, context, negative_context, guidance_scale)
    return ddim.step(eps, t, x_t, eta=eta, x_prev=x_prev)[1]


@dataclass
class Trajectory:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1]
    latents: torch.Tensor  # (B, T+1, C, h, w): x_T (the initial noise), then the latent after each step
    log_probs: torch.Tensor | None  # (B, T) log-prob of each step's sample when it was drawn; None for eta = 0
    timesteps: torch.Tensor  # (T,) e.g. 981, 961, ..., 1; step j goes latents[:, j] -> latents[:, j+1] at timesteps[j]
    context: torch.Tensor  # (B, 77, D) prompt embeddings
    negative_context: torch.Tensor  # (1, 77, D) embedding of the negative prompt


def initial_noise(seeds, num_steps, latent_shape):
    """(B, T+1, C, h, w) standard normal noise; row b is drawn from its own CPU generator seeded by seeds[b].

    Slice 0 is x_T and slice j+1 the noise of step j. Because each sample owns its generator, an image depends
    only on its seed, never on batch size or position, and drawing everything before the loop keeps the loop
    free of host-device transfers.
    """
    return torch.stack([
        torch.randn((num_steps + 1, *latent_shape), generator=torch.Generator().manual_seed(int(seed)))
        for seed in seeds
    ])


@torch.no_grad()  # not inference_mode: the stored latents are later inputs to a UNet forward that is differentiated
def sample(sd, prompts, seeds, num_steps=50, guidance_scale=5.0, eta=1.0, negative_prompt="", unet=None,
           autocast=None, progress=False):
    """Run the denoising loop for prompts[b] with seeds[b]; returns a Trajectory.

    unet: callable used for every step (default sd.unet), e.g. a torch.compile'd one. autocast: a context manager
    wrapped around the UNet and VAE calls, e.g. torch.autocast("cuda", torch.bfloat16); latents stay float32.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    unet = sd.unet if unet is None else unet
    autocast = contextlib.nullcontext() if autocast is None else autocast
    ddim = DDIM(num_steps).to(sd.device)
    noise = initial_noise(seeds, num_steps, sd.latent_shape).to(sd.device)
    with autocast:
        context = sd.encode_prompts(list(prompts))
        negative_context = sd.encode_prompts([negative_prompt])
        x_t = noise[:, 0]
        latents, log_probs = [x_t], []
        for j in tqdm(range(num_steps), disable=not progress, desc="sampling"):
            t = ddim.timesteps[j]  # 0-d tensor on the device: no sync
            eps = guided_eps(unet, x_t, t, context, negative_context, guidance_scale)
            x_t, log_prob = ddim.step(eps, t, x_t, eta=eta, noise=noise[:, j + 1])
            latents.append(x_t)
            log_probs.append(log_prob)
        images = sd.decode_latents(x_t.to(sd.dtype)).float()
    return Trajectory(images=images, latents=torch.stack(latents, dim=1), timesteps=ddim.timesteps,
                      log_probs=None if eta == 0 else torch.stack(log_probs, dim=1), context=context.float(),
                      negative_context=negative_context.float())
