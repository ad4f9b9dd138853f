"""
train.py's RL maths against a reference library: trl's DDPOTrainer (trl 0.11.4, the last release that has it), a port
of the authors' ddpo-pytorch, run on our tiny model. trl is a test-time oracle only: the product never imports it.

- trl's defaults (DDPOConfig) are ours, where trl follows the paper;
- a trajectory trl's own sampler drew (pipeline_step): our log-prob of each of its steps is the one trl recorded;
- advantages over a stream of epochs, per prompt and over the batch: trl's PerPromptStatTracker (the authors', copied)
  and its batch z-score give ours, clip included;
- the clipped loss, approx_kl, clipfrac and the UNet's gradient: trl's calculate_loss and our ddpo_step_loss on the
  same stored steps, with ratios inside and outside the clip range.

    python -m pytest -q tests/test_3_train_trl.py
"""
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from nanoddpo.ddim import DDIM, log_prob_of_step
from nanoddpo.model import StableDiffusion
from test_2_ddim import diffusers_ddim, diffusers_pipeline

trl_sd = pytest.importorskip("trl.models.modeling_sd_base")
trl_trainer = pytest.importorskip("trl.trainer.ddpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")
STEPS, PROMPTS = 10, ["a red cat", "a cat", "red", "a red cat"]


@pytest.fixture(scope="module")
def sd(tiny_model_dir):
    return StableDiffusion.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def trl_trajectory(sd):
    """What trl's sampler records for PROMPTS: latents (B, T+1, C, h, w), log-probs (B, T) and the scheduler it used."""
    pipe = diffusers_pipeline(sd)
    with torch.no_grad():
        out = trl_sd.pipeline_step(pipe, PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, eta=1.0,
                                   generator=torch.Generator().manual_seed(0), output_type="pt")
    return SimpleNamespace(latents=torch.stack(out.latents, dim=1), log_probs=torch.stack(out.log_probs, dim=1),
                           timesteps=pipe.scheduler.timesteps, scheduler=pipe.scheduler)


class TrlUNet(torch.nn.Module):
    """Our UNet behind the diffusers-style call trl makes (`.sample`): both sides share it; only the RL maths differ."""
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, c):
        return SimpleNamespace(sample=self.unet(x, t, c))


def trl_trainer_for(s, unet, scheduler, **more):
    """What DDPOTrainer's calculate_loss (and, with `more`, _train_batched_samples) read of `self`: its config from our
    settings `s`, the pipeline's UNet and its scheduler step, with guidance against the negative prompt (train_cfg)."""
    trainer = SimpleNamespace(
        config=SimpleNamespace(train_cfg=True, sample_guidance_scale=s.guidance_scale, sample_eta=s.eta,
                               train_adv_clip_max=s.adv_clip_max, train_clip_range=s.clip_range,
                               train_max_grad_norm=s.max_grad_norm),
        autocast=nullcontext, sd_pipeline=SimpleNamespace(
            unet=TrlUNet(unet), scheduler_step=lambda *a, **k: trl_sd.scheduler_step(scheduler, *a, **k)), **more)
    trainer.loss = lambda *a: trl_trainer.DDPOTrainer.loss(trainer, *a)
    trainer.calculate_loss = lambda *a: trl_trainer.DDPOTrainer.calculate_loss(trainer, *a)
    return trainer


def test_defaults_are_trls_where_trl_follows_the_paper():
    trl = trl_trainer.DDPOConfig()
    ours = train.Settings()
    pairs = dict(num_steps="sample_num_steps", eta="sample_eta", guidance_scale="sample_guidance_scale",
                 lr="train_learning_rate", adam_beta1="train_adam_beta1", adam_beta2="train_adam_beta2",
                 weight_decay="train_adam_weight_decay", adam_eps="train_adam_epsilon",
                 max_grad_norm="train_max_grad_norm", num_inner_epochs="train_num_inner_epochs",
                 adv_clip_max="train_adv_clip_max", clip_range="train_clip_range",
                 timestep_fraction="train_timestep_fraction", stat_buffer="per_prompt_stat_tracking_buffer_size",
                 stat_min_count="per_prompt_stat_tracking_min_count", epochs="num_epochs")
    assert {k: getattr(ours, k) for k in pairs} == {k: getattr(trl, v) for k, v in pairs.items()}
    assert trl.train_cfg and trl.negative_prompts == ""  # guidance inside the loss, against the empty prompt


def test_our_log_probs_of_trls_trajectory_are_trls(sd, trl_trajectory):
    """The same step index, timestep, guidance and log-prob reduction as trl's sampler, step by step."""
    traj, ddim = trl_trajectory, DDIM(STEPS)
    assert ddim.timesteps.tolist() == traj.timesteps.tolist()
    context, negative = sd.encode_prompts(PROMPTS), sd.encode_prompts([""])
    with torch.no_grad():
        ours = torch.stack([log_prob_of_step(sd.unet, ddim, traj.latents[:, j], traj.latents[:, j + 1],
                                             ddim.timesteps[j], context, negative, 5.0, 1.0) for j in range(STEPS)], 1)
    torch.testing.assert_close(ours, traj.log_probs, rtol=0, atol=1e-5)
    assert traj.log_probs.std() > 0.01  # the steps' log-probs differ: a step mixed up would show
    # at eta 0.5 (sigma is linear in eta, DDIM eq. 16), with trl's scheduler step; a random eps and steps that do not
    # go together give log-probs in the thousands, equal to float32's 7 digits
    eps, t, x_t, x_prev = torch.randn(4, 4, 8, 8), traj.timesteps[[0, 3, 8, 9]], traj.latents[:, 2], traj.latents[:, 3]
    theirs = trl_sd.scheduler_step(traj.scheduler, eps, t, x_t, eta=0.5, prev_sample=x_prev).log_probs
    torch.testing.assert_close(ddim.step(eps, t, x_t, eta=0.5, x_prev=x_prev)[1], theirs, rtol=1e-6, atol=1e-5)


def test_advantages_are_trls_over_a_stream_of_epochs():
    """Four epochs of rewards for prompts seen 1 to 30 times each: below min_count trl (and the authors) z-score against
    the batch, then against the prompt's buffer of the last 16; without per-prompt stats, over the batch (eps 1e-8)."""
    rng = np.random.default_rng(0)
    s = train.Settings(stat_buffer=16, stat_min_count=4, adv_clip_max=5.0)
    ours, trls = train.PerPromptStatTracker(s.stat_buffer, s.stat_min_count), trl_utils.PerPromptStatTracker(16, 4)
    prompts = ["cat"] * 30 + ["dog"] * 3 + ["fox"] + ["owl"] * 2
    scale = np.array([1.0] * 30 + [3.0] * 3 + [0.1] + [2.0] * 2)
    for epoch in range(4):
        rewards = rng.normal(size=len(prompts)) * scale + epoch
        rewards[33] += 40 * (epoch == 0)  # fox's first reward, an outlier against the batch: its advantage is clipped
        theirs = np.clip(trls.update(prompts, rewards), -5, 5)  # trl clips in calculate_loss, at train_adv_clip_max
        np.testing.assert_allclose(train.compute_advantages(s, ours, prompts, rewards), theirs, rtol=1e-12, atol=0)
        assert epoch > 0 or theirs[33] == 5.0
    batch = train.Settings(per_prompt_stats=False)
    rewards[0] -= 100  # over the batch of 36 the outlier's z-score is about -5.9
    theirs = np.clip((rewards - rewards.mean()) / (rewards.std() + 1e-8), -5, 5)  # DDPOTrainer.compute_rewards
    np.testing.assert_allclose(train.compute_advantages(batch, None, prompts, rewards), theirs, rtol=1e-12, atol=0)
    assert theirs[0] == -5.0


def test_loss_approx_kl_clipfrac_and_gradient_are_trls(sd, trl_trajectory):
    """One stored step per trajectory, each its own timestep, one in each regime of the clipped objective: ratio above
    1 + 1e-4 with A > 0 and below 1 - 1e-4 with A < 0 (clipped: no gradient), inside the range, and above it with
    A < 0 (the unclipped term is the larger: gradient). The last advantage is beyond the clip of 5."""
    traj, ddim = trl_trajectory, DDIM(STEPS)
    steps = torch.tensor([0, 3, 7, 9])
    rows = torch.arange(len(PROMPTS))
    log_ratio = torch.tensor([1.5e-4, -3e-4, 5e-5, 2e-4])  # the first between 1 + clip_range and 1 + 2 clip_range
    old = traj.log_probs.clone()
    old[rows, steps] -= log_ratio  # our log-probs are trl's to 3e-6 (the test above)
    advantages = torch.tensor([1.5, -0.7, 0.4, -9.0])
    context, negative = sd.encode_prompts(PROMPTS).detach(), sd.encode_prompts([""]).detach()
    s = train.Settings(algo="ppo", num_steps=STEPS, eta=1.0, guidance_scale=5.0, clip_range=1e-4, kl_coef=0.0)
    e = SimpleNamespace(latents=traj.latents, old_log_probs=old, context=context, negative_context=negative,
                        advantages=advantages.clamp(-s.adv_clip_max, s.adv_clip_max))  # compute_advantages clips

    def gradient(loss):
        sd.unet.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in sd.unet.parameters()]

    sd.unet.requires_grad_(True)
    loss, approx_kl, clipfrac = train.ddpo_step_loss(s, sd.unet, None, ddim, e, rows, steps, None)
    ours = (loss.detach(), approx_kl, clipfrac, gradient(loss))

    embeds = torch.cat([negative.expand(len(rows), -1, -1), context])
    loss, approx_kl, clipfrac = trl_trainer_for(s, sd.unet, traj.scheduler).calculate_loss(
        traj.latents[rows, steps], traj.timesteps[steps], traj.latents[rows, steps + 1], old[rows, steps], advantages,
        embeds)
    theirs = (loss.detach(), approx_kl, clipfrac, gradient(loss))
    sd.unet.requires_grad_(False)

    assert theirs[2].item() == 0.75 and ours[2].item() == 0.75  # three of the four ratios are outside the range
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=0)
    # approx_kl squares log-ratios of about 2e-4 taken between float32 log-probs near -1.2 (steps of 1.2e-7)
    torch.testing.assert_close(ours[1], theirs[1], rtol=5e-3, atol=0)
    # float32 gradients through a UNet: compared as one vector, since single entries that cancel keep fewer digits
    g_ours, g_theirs = torch.cat([g.flatten() for g in ours[3]]), torch.cat([g.flatten() for g in theirs[3]])
    assert (g_ours - g_theirs).norm() <= 2e-5 * g_theirs.norm() and g_theirs.norm() > 0


@pytest.mark.parametrize("max_grad_norm", [0.05, 1e9])
def test_an_epoch_of_updates_is_trls(tmp_path, tiny_model_dir, monkeypatch, max_grad_norm):
    """train.py's loop against trl's: the stored steps train.py trained on, in its order (each sample its own shuffled
    timesteps), handed to trl's _train_batched_samples, whose accelerate Accelerator accumulates over batches and
    timesteps, clips the gradient norm and steps AdamW. 8 samples, train batches of 2 accumulated 2 at a time, 2 of each
    sample's 4 steps trained: two optimizer steps, the first at ratio 1, the second with every ratio outside the clip
    range; the gradient clipped (which hides the loss's scale) or not (which shows it). AdamW runs with eps 1, where its
    step is about lr * gradient: at eps 1e-8 it is about lr * sign(gradient), and one weight whose gradient is float32
    noise around 0 moves by 2 lr the other way, which says nothing about the loop."""
    accelerate = pytest.importorskip("accelerate")
    calls, real = [], train.ddpo_step_loss
    def recording(s, unet, base_unet, ddim, e, rows, step, gen):
        calls.append((e, rows.clone(), step.clone()))
        return real(s, unet, base_unet, ddim, e, rows, step, gen)
    monkeypatch.setattr(train, "ddpo_step_loss", recording)
    s = train.Settings(**{**train.PRESETS["tiny"], **dict(
        model=str(tiny_model_dir), out_dir=str(tmp_path), name="r", prompts="simple_animals", num_steps=4, batch_size=4,
        batches_per_epoch=2, train_batch_size=2, grad_accum=2, timestep_fraction=0.5, clip_range=1e-4, epochs=1,
        stat_min_count=2, max_grad_norm=max_grad_norm, lr=1.0, adam_eps=1.0, save_every=1, grid_every=1)})
    ours = train.main(s, None).unet
    T, e = 2, calls[0][0]  # timesteps trained per sample
    assert len(calls) == 4 * T and all(c[0] is e for c in calls)

    # The same stored steps as trl's batched samples: batch i, column j = the j-th step train.py trained each row on
    ddim, batches = DDIM(s.num_steps), []
    for i in range(4):
        rows, steps = calls[i * T][1], torch.stack([calls[i * T + j][2] for j in range(T)], 1)  # (2,), (2, T)
        assert all(torch.equal(calls[i * T + j][1], rows) for j in range(T))
        batches.append(dict(latents=e.latents[rows[:, None], steps], next_latents=e.latents[rows[:, None], steps + 1],
                            timesteps=ddim.timesteps[steps], log_probs=e.old_log_probs[rows[:, None], steps],
                            advantages=e.advantages[rows], prompt_embeds=e.context[rows],
                            negative_prompt_embeds=e.negative_context.expand(len(rows), -1, -1)))

    theirs = StableDiffusion.from_pretrained(tiny_model_dir).unet.requires_grad_(True)
    base = {k: v.clone() for k, v in theirs.state_dict().items()}
    scheduler = diffusers_ddim(s.num_steps)
    try:
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=s.grad_accum * T)
        optimizer = accelerator.prepare(torch.optim.AdamW(
            theirs.parameters(), lr=s.lr, betas=(s.adam_beta1, s.adam_beta2), weight_decay=s.weight_decay,
            eps=s.adam_eps))
        trainer = trl_trainer_for(s, theirs, scheduler, accelerator=accelerator, optimizer=optimizer,
                                  num_train_timesteps=T, trainable_layers=list(theirs.parameters()))
        assert trl_trainer.DDPOTrainer._train_batched_samples(trainer, 0, 0, 0, batches) == 2  # optimizer steps
    finally:
        accelerate.state.AcceleratorState._reset_state(True)
        accelerate.state.GradientState._reset_state()

    ours, theirs = ours.state_dict(), theirs.state_dict()
    moved_ours = torch.cat([(ours[k] - base[k]).flatten() for k in base])
    moved_theirs = torch.cat([(theirs[k] - base[k]).flatten() for k in base])
    # the float32 gradients of these (batch, timestep) pairs agree to about 3e-5, and so do the moves: 3-4e-5 measured
    assert (moved_ours - moved_theirs).norm() <= 2e-4 * moved_theirs.norm() and moved_theirs.norm() > 0
