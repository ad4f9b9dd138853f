"""
Tests of nanoddpo/ddim.py: the SD v1 schedule, the DDIM step and its log-prob against torch.distributions.Normal and
diffusers' DDIMScheduler (test-time oracle only), gradients, eta = 0, per-sample reproducibility, end-to-end parity.

    python -m pytest -x -q tests/test_ddim.py
"""
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
        ours, _ = ddim.step(eps, t, x_t, eta=1.0, noise=noise)
        theirs = scheduler.step(eps, t, x_t, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        ours_deterministic, _ = ddim.step(eps, t, x_t, eta=0.0)
        theirs_deterministic = scheduler.step(eps, t, x_t, eta=0.0).prev_sample
        torch.testing.assert_close(ours_deterministic, theirs_deterministic, rtol=1e-5, atol=1e-6)


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
