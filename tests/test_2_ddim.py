"""
Tests of nanoddpo/ddim.py: the SD v1 schedule, the DDIM step and its log-prob against torch.distributions.Normal and
diffusers' DDIMScheduler (test-time oracle only), gradients, eta = 0, per-sample reproducibility, end-to-end parity.

    python -m pytest -x -q tests/test_2_ddim.py
"""
import copy

import pytest
import torch

from nanoddpo.ddim import DDIM, guided_eps, initial_noise, log_prob_of_step, sample


def diffusers_ddim(num_steps):
    """diffusers' DDIMScheduler configured as SD v1-4's scheduler_config.json (which names PNDM; same schedule)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


def test_schedule_timesteps_and_sigmas():
    ddim = DDIM(50)
    assert ddim.timesteps.dtype == torch.long
    assert ddim.timesteps.tolist() == list(range(981, 0, -20))
    sigmas = ddim.sigma(ddim.timesteps)
    assert sigmas[0].item() == pytest.approx(0.454, abs=1e-3)
    assert sigmas[-1].item() == pytest.approx(0.021, abs=1e-3)
    assert (sigmas[1:] < sigmas[:-1]).all()  # the noise shrinks monotonically towards the image
    assert DDIM(10).timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


@pytest.mark.parametrize("num_steps", [10, 50])
def test_timesteps_match_diffusers(num_steps):
    assert DDIM(num_steps).timesteps.tolist() == diffusers_ddim(num_steps).timesteps.tolist()


def test_step_log_prob_is_mean_of_normal_log_density():
    torch.manual_seed(0)
    ddim = DDIM(50)
    x_t, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for t in [981, 501, 1]:  # the last step has the smallest sigma, where precision is most at risk
        x_prev, log_prob = ddim.step(eps, t, x_t)
        # the eta = 1 mean and sigma written out from DDPO.md's formulas, in float64
        alpha_bar_t, alpha_bar_prev = ddim.alpha_bar[t].double(), ddim.alpha_bar[max(t - 20, 0)].double()
        sigma_t = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()
        x0_pred = (x_t.double() - (1 - alpha_bar_t).sqrt() * eps.double()) / alpha_bar_t.sqrt()
        x_prev_mean = alpha_bar_prev.sqrt() * x0_pred + (1 - alpha_bar_prev - sigma_t**2).sqrt() * eps.double()
        expected = torch.distributions.Normal(x_prev_mean, sigma_t).log_prob(x_prev.double()).mean(dim=(1, 2, 3))
        torch.testing.assert_close(ddim.sigma(t), sigma_t.float())
        assert log_prob.shape == (3,)
        torch.testing.assert_close(log_prob, expected.float(), rtol=1e-5, atol=1e-5)
        # scoring the sample just drawn gives the same number
        torch.testing.assert_close(ddim.step(eps, t, x_t, x_prev=x_prev)[1], log_prob)
        # a sample is about sigma_t away from the mean in every dimension
        assert ((x_prev - x_prev_mean).std() / sigma_t).item() == pytest.approx(1.0, abs=0.2)


def test_step_matches_diffusers():
    scheduler = diffusers_ddim(50)
    ddim = DDIM(50)
    torch.manual_seed(0)
    x_t, eps, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in [981, 761, 21, 1]:
        for eta in (1.0, 0.5):  # sigma is linear in eta (DDIM eq. 16): eta 0.5 tells eta from eta**2
            ours, _ = ddim.step(eps, t, x_t, eta=eta, noise=noise)
            theirs = scheduler.step(eps, t, x_t, eta=eta, variance_noise=noise).prev_sample
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        ours_deterministic, _ = ddim.step(eps, t, x_t, eta=0.0)
        theirs_deterministic = scheduler.step(eps, t, x_t, eta=0.0).prev_sample
        torch.testing.assert_close(ours_deterministic, theirs_deterministic, rtol=1e-5, atol=1e-6)


def test_add_noise_matches_diffusers():
    """The forward process RWR trains on: sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, per-sample t."""
    torch.manual_seed(0)
    x0, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([999, 500, 20, 0])
    torch.testing.assert_close(DDIM(50).add_noise(x0, noise, t), diffusers_ddim(50).add_noise(x0, noise, t))


@pytest.mark.parametrize("t", [981, 501, 21])
def test_kl_closed_form_equals_monte_carlo(t):
    # KL(p || q) = E_{x ~ p}[log p(x) - log q(x)], estimated from 40,000 steps sampled under eps_p and scored under
    # both eps, in the log-prob's own per-dimension convention: the closed form must land within 4 standard errors.
    ddim = DDIM(50)
    torch.manual_seed(0)
    x_t, eps_p = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    eps_q = eps_p + 0.3 * torch.randn(1, 4, 4, 4)
    n = 40_000
    x_prev, log_p = ddim.step(eps_p.expand(n, -1, -1, -1), t, x_t.expand(n, -1, -1, -1))
    _, log_q = ddim.step(eps_q.expand(n, -1, -1, -1), t, x_t.expand(n, -1, -1, -1), x_prev=x_prev)
    estimate, se = (log_p - log_q).double().mean(), (log_p - log_q).double().std() / n**0.5
    kl = ddim.kl(eps_p, eps_q, t, x_t)
    assert kl.shape == (1,) and kl.item() > 10 * se
    assert abs(kl.item() - estimate.item()) < 4 * se, (kl.item(), estimate.item(), se.item())
    assert ddim.kl(eps_p, eps_p, t, x_t).item() == 0.0  # the same eps: the same Gaussian


@pytest.mark.parametrize("num_steps,eta", [(10, 1.0), (50, 1.0), (10, 0.5)])
def test_steepness_is_how_far_a_step_moves_per_unit_of_eps_in_sigmas(num_steps, eta):
    # Oracle: diffusers' DDIM step, its mean moved by a unit change of eps, over its std (its sample at unit noise less
    # its sample at zero noise). What it is for: the gradient of a taken step's log-prob w.r.t. eps is steepness x the
    # step's noise / D (the log-prob is a mean over D dims), so the next-to-last step's dominates an update.
    scheduler, ddim = diffusers_ddim(num_steps), DDIM(num_steps)
    torch.manual_seed(0)
    x, eps, zero = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    steepness = ddim.steepness(eta)
    assert steepness.shape == (num_steps,) and steepness.argmax() == num_steps - 2
    if eta == 1.0:
        assert steepness[-2].item() == pytest.approx({10: 8.32, 50: 3.27}[num_steps], abs=0.005)  # docs/RESULTS.md
    for j, t in enumerate(scheduler.timesteps):
        def prev(e, z):
            return scheduler.step(e, t, x, eta=eta, variance_noise=z).prev_sample
        slope, std = prev(eps + 1, zero) - prev(eps, zero), prev(eps, zero + 1) - prev(eps, zero)
        torch.testing.assert_close(steepness[j], (slope.abs() / std).mean(), rtol=1e-3, atol=0)
        z, e = torch.randn_like(x), eps.clone().requires_grad_(True)
        x_prev, _ = ddim.step(eps, t, x, eta=eta, noise=z)
        ddim.step(e, t, x, eta=eta, x_prev=x_prev)[1].sum().backward()
        torch.testing.assert_close(e.grad.abs(), steepness[j] * z.abs() / x.numel(), rtol=1e-4, atol=1e-7)


def test_gradient_flows_through_eps_not_x_prev():
    ddim = DDIM(50)
    torch.manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    x_prev = torch.randn(2, 4, 8, 8, requires_grad=True)
    returned, log_prob = ddim.step(eps, 501, x_t, x_prev=x_prev)
    assert not returned.requires_grad
    log_prob.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert x_prev.grad is None


def test_per_sample_timesteps_match_one_at_a_time():
    ddim = DDIM(50)
    torch.manual_seed(0)
    x_t, eps, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([981, 401, 1])
    x_prev, log_prob = ddim.step(eps, t, x_t, noise=noise)
    for b in range(3):
        x_prev_b, log_prob_b = ddim.step(eps[b:b + 1], int(t[b]), x_t[b:b + 1], noise=noise[b:b + 1])
        torch.testing.assert_close(x_prev[b:b + 1], x_prev_b)
        torch.testing.assert_close(log_prob[b:b + 1], log_prob_b)


def test_eta_zero_is_deterministic_and_has_no_log_prob():
    ddim = DDIM(50)
    x_t, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_prev_a, log_prob = ddim.step(eps, 501, x_t, eta=0.0)
    x_prev_b, _ = ddim.step(eps, 501, x_t, eta=0.0, noise=torch.randn(2, 4, 8, 8))
    assert log_prob is None
    assert torch.equal(x_prev_a, x_prev_b)
    with pytest.raises(ValueError, match="deterministic"):
        ddim.step(eps, 501, x_t, eta=0.0, x_prev=x_prev_a)
    with pytest.raises(ValueError, match="eta"):
        ddim.step(eps, 501, x_t, eta=1.5)


def test_bf16_autocast_eps_gives_float32_step():
    ddim = DDIM(50)
    torch.manual_seed(0)
    x_t, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_prev, log_prob = ddim.step(eps.bfloat16(), 981, x_t)
        rescored = ddim.step(eps, 981, x_t, x_prev=x_prev)[1]
    assert x_prev.dtype == log_prob.dtype == torch.float32
    # only eps was rounded to bf16: its 8-bit mantissa shifts the mean by ~1e-2 relative, far less than sigma
    torch.testing.assert_close(rescored, log_prob, rtol=0, atol=0.05)


def test_initial_noise_depends_only_on_the_seed():
    batch = initial_noise([7, 8, 9], 5, (4, 8, 8))
    assert batch.shape == (3, 6, 4, 8, 8)
    assert torch.equal(batch[1], initial_noise([8], 5, (4, 8, 8))[0])
    assert not torch.equal(batch[0], batch[1])


class ToyUNet(torch.nn.Module):
    """A tiny eps-predictor with the UNet's call signature, so guidance and the helper can be tested without a model."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(16, 4)

    def forward(self, x, t, context):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return self.conv(x) * (t / 1000) + self.proj(context.mean(1))[:, :, None, None]


def test_guided_eps_is_one_batched_call_and_cfg_formula():
    torch.manual_seed(0)
    unet = ToyUNet()
    calls = []
    unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x_t, context, negative_context = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 16), torch.randn(1, 77, 16)
    t = torch.tensor([981, 501, 1])
    eps = guided_eps(unet, x_t, t, context, negative_context, 5.0)
    assert calls == [6]  # uncond and cond branches in one batch of 2B
    eps_uncond = unet(x_t, t, negative_context.expand(3, -1, -1))
    eps_cond = unet(x_t, t, context)
    torch.testing.assert_close(eps, eps_uncond + 5.0 * (eps_cond - eps_uncond))


def test_log_prob_of_step_differentiates_the_unet():
    torch.manual_seed(0)
    unet, ddim = ToyUNet(), DDIM(50)
    x_t, context, negative_context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16), torch.randn(1, 77, 16)
    t = torch.tensor([981, 21])
    with torch.no_grad():
        x_prev, old_log_prob = ddim.step(guided_eps(unet, x_t, t, context, negative_context, 5.0), t, x_t)
    log_prob = log_prob_of_step(unet, ddim, x_t, x_prev, t, context, negative_context, 5.0)
    torch.testing.assert_close(log_prob, old_log_prob)  # same weights, same action: ratio exactly 1
    log_prob.sum().backward()
    assert unet.conv.weight.grad.abs().sum() > 0


class ToySD:
    """Just the parts of StableDiffusion that sample() touches, so the loop is tested before and apart from model.py."""

    device, dtype, latent_shape = torch.device("cpu"), torch.float32, (4, 8, 8)

    def __init__(self):
        torch.manual_seed(0)
        self.unet = ToyUNet()

    def encode_prompts(self, prompts):
        return torch.stack([torch.randn(77, 16, generator=torch.Generator().manual_seed(sum(map(ord, p)))) for p in prompts])

    def decode_latents(self, z):
        return (z[:, :3] / 2 + 0.5).clamp(0, 1)


def test_sample_returns_the_trajectory_training_needs():
    sd, ddim = ToySD(), DDIM(4)
    batch_sizes = []
    hook = sd.unet.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    traj = sample(sd, ["a cat", "a dog"], seeds=[0, 1], num_steps=4)
    hook.remove()
    assert batch_sizes == [4] * 4  # one UNet call per step, uncond and cond together
    assert traj.images.shape == (2, 3, 8, 8) and 0 <= traj.images.min() and traj.images.max() <= 1
    assert traj.latents.shape == (2, 5, 4, 8, 8)
    assert traj.log_probs.shape == (2, 4)
    assert traj.timesteps.tolist() == [751, 501, 251, 1]
    assert traj.context.shape == (2, 77, 16) and traj.negative_context.shape == (1, 77, 16)
    assert torch.equal(traj.latents[:, 0], initial_noise([0, 1], 4, (4, 8, 8))[:, 0])
    # re-scoring every stored step under the same model gives back the stored log-probs (ratio 1)
    for j, t in enumerate(traj.timesteps):
        log_prob = log_prob_of_step(sd.unet, ddim, traj.latents[:, j], traj.latents[:, j + 1], t, traj.context,
                                    traj.negative_context, guidance_scale=5.0)
        torch.testing.assert_close(log_prob, traj.log_probs[:, j])
    # eta = 0 samples deterministically and has no log-probs
    assert sample(sd, ["a cat"], seeds=[0], num_steps=4, eta=0.0).log_probs is None


def test_same_seed_same_image_whatever_the_batch():
    sd = ToySD()
    batch = sample(sd, ["a cat", "a dog", "a fox"], seeds=[10, 11, 12], num_steps=3)
    single = sample(sd, ["a dog"], seeds=[11], num_steps=3)
    assert torch.equal(batch.latents[1], single.latents[0])
    assert torch.equal(batch.images[1], single.images[0])
    assert not torch.equal(batch.images[0], batch.images[2])


@pytest.fixture(scope="module")
def tiny_sd(tiny_model_dir):
    from nanoddpo.model import StableDiffusion

    return StableDiffusion.from_pretrained(tiny_model_dir)


def diffusers_pipeline(sd):
    """diffusers' StableDiffusionPipeline + DDIMScheduler holding exactly our tiny model's weights (oracle only)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    unet = diffusers.UNet2DConditionModel.from_config(sd.unet.cfg)
    unet.load_state_dict(sd.unet.state_dict(), strict=True)
    vae = diffusers.AutoencoderKL.from_config(sd.vae.cfg)
    vae.load_state_dict(sd.vae.state_dict(), strict=True)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**sd.text_encoder.cfg))
    state = sd.text_encoder.state_dict()
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):  # transformers 5 drops the prefix
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    text_encoder.load_state_dict(state, strict=True)
    tokenizer = copy.deepcopy(sd.tokenizer)
    tokenizer.model_max_length = sd.max_length  # a tokenizer built from vocab.json alone does not know SD's 77
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=diffusers_ddim(10),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("negative", ["", "a blurry photo"])  # the empty prompt DDPO guides against, and another
def test_end_to_end_parity_with_diffusers_pipeline(tiny_sd, negative):
    """10 steps at eta = 1, w = 5: same initial latents and per-step noise -> same final latents and images."""
    pipe = diffusers_pipeline(tiny_sd)
    prompts, seeds = ["a red cat", "a dog"], [3, 4]
    ours = sample(tiny_sd, prompts, seeds, num_steps=10, guidance_scale=5.0, eta=1.0, negative_prompt=negative)
    # Each of our samples draws x_T then the 10 step noises from one generator seeded by its seed. Handing the
    # pipeline x_T and those same generators (advanced past x_T) makes it draw the same step noise: torch's CPU
    # normal sampler gives the same stream whether drawn as one (11, 4, 8, 8) block or eleven (4, 8, 8) blocks.
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = torch.stack([torch.randn(tiny_sd.latent_shape, generator=g) for g in generators])
    assert torch.equal(latents, ours.latents[:, 0])
    final = {}
    theirs = pipe(prompts, num_inference_steps=10, guidance_scale=5.0, eta=1.0, latents=latents,
                  negative_prompt=[negative] * len(prompts), generator=generators, output_type="pt",
                  callback_on_step_end=lambda p, i, t, kw: final.update(kw) or kw).images
    torch.testing.assert_close(ours.latents[:, -1], final["latents"], rtol=1e-5, atol=1e-5 * final["latents"].abs().max())
    torch.testing.assert_close(ours.images, theirs, rtol=1e-5, atol=1e-5)
    assert (ours.images - theirs).norm() / theirs.norm() < 1e-5
    assert (ours.latents[:, -1] - final["latents"]).norm() / final["latents"].norm() < 1e-5


def test_same_seed_same_image_whatever_the_batch_tiny_model(tiny_sd):
    """The noise of a sample depends only on its seed, bit for bit. The images agree to float32 rounding, not bit for
    bit: CPU matrix kernels block rows differently by batch size and row position (two identical rows of one matmul
    can differ in the last bit), so the UNet itself is not batch-invariant. Measured: relative difference ~1e-6."""
    batch = sample(tiny_sd, ["a dog", "a red cat", "a cat"], seeds=[9, 3, 5], num_steps=3)
    single = sample(tiny_sd, ["a red cat"], seeds=[3], num_steps=3)
    assert torch.equal(batch.latents[1, 0], single.latents[0, 0])
    for ours, alone in [(batch.latents[1], single.latents[0]), (batch.images[1], single.images[0])]:
        assert (ours - alone).norm() / alone.norm() < 1e-5
    assert (batch.images[0] - batch.images[1]).abs().max() > 1e-2  # different seeds, visibly different images


def test_step_and_guidance_never_read_tensor_values_on_the_host():
    """On the meta device tensors have no values: any .item(), int(tensor) or branch on a value raises. Passing
    there is the CPU-checkable form of 'no host-device sync inside the step loop'."""
    ddim = DDIM(50).to("meta")
    unet = ToyUNet().to("meta")
    x_t = torch.empty(2, 4, 8, 8, device="meta")
    context, negative_context = torch.empty(2, 77, 16, device="meta"), torch.empty(1, 77, 16, device="meta")
    for t in [ddim.timesteps[3], ddim.timesteps[[0, 49]]]:  # a 0-d and a (B,) tensor on the device
        eps = guided_eps(unet, x_t, t, context, negative_context, 5.0)
        x_prev, log_prob = ddim.step(eps, t, x_t, noise=torch.empty_like(x_t))
        assert x_prev.shape == x_t.shape and log_prob.shape == (2,)
        assert log_prob_of_step(unet, ddim, x_t, x_prev, t, context, negative_context).shape == (2,)


def test_sample_under_bf16_autocast_and_with_bf16_weights(tiny_sd):
    """Latents, log-probs and images stay float32 whatever the UNet computes in; bf16 moves the images a little."""
    reference = sample(tiny_sd, ["a cat"], [0], num_steps=3)
    in_autocast = sample(tiny_sd, ["a cat"], [0], num_steps=3, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    in_bf16 = sample(copy.deepcopy(tiny_sd).to(torch.bfloat16), ["a cat"], [0], num_steps=3)
    for traj in (in_autocast, in_bf16):
        assert traj.latents.dtype == traj.log_probs.dtype == traj.images.dtype == torch.float32
        assert torch.isfinite(traj.log_probs).all()
        assert 0 < (traj.images - reference.images).abs().max() < 0.1  # measured 0.03 with bf16's 8-bit mantissa


def test_step_compiles_as_one_graph():
    """fullgraph=True fails on any graph break (a .item(), a branch on a tensor value), for 0-d and (B,) timesteps."""
    ddim = DDIM(50)
    torch.manual_seed(0)
    x_t, eps, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sample_step = torch.compile(lambda eps, t, x_t, noise: ddim.step(eps, t, x_t, noise=noise), fullgraph=True,
                                backend="eager")
    score_step = torch.compile(lambda eps, t, x_t, x_prev: ddim.step(eps, t, x_t, x_prev=x_prev)[1], fullgraph=True,
                               backend="eager")
    for t in [torch.tensor(981), torch.tensor([981, 1])]:
        x_prev, log_prob = sample_step(eps, t, x_t, noise)
        torch.testing.assert_close(x_prev, ddim.step(eps, t, x_t, noise=noise)[0])
        torch.testing.assert_close(score_step(eps, t, x_t, x_prev), log_prob)
