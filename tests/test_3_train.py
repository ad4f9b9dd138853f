"""train.py: the RL math (losses, advantages), then whole runs at tiny settings: outputs, resume, bad input."""
import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from safetensors.torch import load_file

import train
from nanoddpo import model, rewards
from nanoddpo.ddim import DDIM, guided_eps, log_prob_of_step, sample
from nanoddpo.lora import add_lora, lora_off, lora_parameters
from nanoddpo.model import StableDiffusion
from nanoddpo.prompts import draw_prompts


def settings(**kw):
    return train.Settings(**{**train.PRESETS["tiny"], **kw})


# --- the losses ---------------------------------------------------------------------------------------------------

def grad_of(loss_fn, log_prob, old, adv):
    log_prob = log_prob.clone().requires_grad_(True)
    loss_fn(log_prob, old, adv).backward()
    return log_prob.grad


def test_clipped_objective_has_reinforce_gradient_at_ratio_one():
    torch.manual_seed(0)
    old, adv = torch.randn(6), torch.randn(6)
    ppo = lambda lp, o, a: train.policy_loss(settings(algo="ppo"), lp, o, a)[0]
    reinforce = lambda lp, o, a: train.policy_loss(settings(algo="reinforce"), lp, o, a)[0]
    g_ppo, g_sf = grad_of(ppo, old, old, adv), grad_of(reinforce, old, old, adv)
    assert torch.allclose(g_ppo, g_sf, atol=1e-7) and torch.allclose(g_sf, -adv / 6)


def test_clipping_engages_outside_the_clip_range():
    s = settings(clip_range=1e-4)
    old = torch.zeros(4)
    log_prob = torch.log(torch.tensor([1 + 5e-4, 1 + 5e-4, 1 - 5e-4, 1 - 5e-4]))  # ratios outside 1 +- 1e-4
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    grad = grad_of(lambda lp, o, a: train.policy_loss(s, lp, o, a)[0], log_prob, old, adv)
    # Ratio above the range with A > 0, or below it with A < 0: the clipped term wins and the gradient is zero.
    assert grad[0] == 0 and grad[3] == 0
    # The other two move the policy back toward the range, so they keep their gradient.
    assert grad[1] != 0 and grad[2] != 0
    _, _, clipfrac = train.policy_loss(s, log_prob, old, adv)
    assert clipfrac == 1.0


def test_clip_is_symmetric_at_its_edges():
    # Ratios 1.5 clip ranges from 1 on either side are clipped; half a clip range inside are not. A range made
    # asymmetric, (1 - 2c, 1 + c) or (1 - c, 1 + 2c), fails one of the four.
    c = 1e-3
    s = settings(clip_range=c)
    log_prob = torch.log(torch.tensor([1 - 1.5 * c, 1 + 1.5 * c, 1 - 0.5 * c, 1 + 0.5 * c]))
    adv = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # each pushes its ratio further out: clipped when out of range
    grad = grad_of(lambda lp, o, a: train.policy_loss(s, lp, o, a)[0], log_prob, torch.zeros(4), adv)
    ratio = log_prob.exp()
    assert grad[0] == 0 and grad[1] == 0
    assert torch.allclose(grad[2:], -adv[2:] * ratio[2:] / 4)  # inside: d/dlogp of -A * ratio, averaged over 4
    assert train.policy_loss(s, log_prob, torch.zeros(4), adv)[2] == 0.5


def test_approx_kl_and_clipfrac():
    # approx_kl = mean(log_ratio^2) / 2: log-ratios 0.1 and -0.2 give (0.01 + 0.04) / 2 / 2 = 0.0125. clipfrac counts
    # ratios strictly outside 1 +- clip_range, as the authors' code does: a ratio exactly on the edge is inside.
    s = settings(clip_range=1e-3)
    approx_kl = train.policy_loss(s, torch.tensor([0.1, -0.2]), torch.zeros(2), torch.ones(2))[1]
    assert approx_kl.item() == pytest.approx(0.0125, rel=1e-6)
    log_prob = torch.tensor([0.25, -0.25])
    edge = (log_prob.exp() - 1).abs()  # the exact float32 distances from 1 of the two ratios
    clipfrac = lambda c: train.policy_loss(settings(clip_range=c), log_prob, torch.zeros(2), torch.ones(2))[2]
    assert clipfrac(edge[0].item()) == 0  # 1.284 on the edge, 0.779 inside
    assert clipfrac(edge[1].item()) == 0.5  # 1.284 outside, 0.779 on the edge


def test_rwr_loss_weighs_each_sample_by_its_weight(tiny_model_dir):
    # w_i * ||eps - noise||^2 averaged over the batch: linear in the weights, so the loss with weights (1, 1) is the
    # sum of those with (1, 0) and (0, 1), and weight 2 doubles a sample's share. Same generator: same t and noise.
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    traj = sample(sd, ["a red cat", "cat"], seeds=[1, 2], num_steps=4, guidance_scale=5.0)
    def loss(weights):
        e = SimpleNamespace(latents=traj.latents, context=traj.context, negative_context=traj.negative_context,
                            advantages=torch.tensor(weights), rank=0, world=1)
        with torch.no_grad():
            return train.rwr_step_loss(settings(algo="rwr"), sd.unet, None, DDIM(4), e, torch.tensor([0, 1]), None,
                                       torch.Generator().manual_seed(0))[0]
    first, second = loss([1.0, 0.0]), loss([0.0, 1.0])
    assert first != second
    torch.testing.assert_close(loss([1.0, 1.0]), first + second)
    torch.testing.assert_close(loss([2.0, 0.0]), 2 * first)


def test_kl_to_base_weighs_only_in_the_penalty(tiny_model_dir):
    # --kl-coef 0 is the paper's DDPO: the loss is exactly policy_loss of the step's log-prob, bit for bit; with
    # c > 0 it adds c * KL(policy || base), computed from the base model's eps.
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    traj = sample(sd, ["a red cat", "cat"], seeds=[1, 2], num_steps=4, guidance_scale=5.0)
    base = train.base_model(sd, sd.unet, False, torch.float32)
    sd.unet.requires_grad_(True)
    with torch.no_grad():
        for p in sd.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the policy has moved away from the base
    ddim = DDIM(4)
    e = SimpleNamespace(latents=traj.latents, old_log_probs=traj.log_probs, context=traj.context,
                        negative_context=traj.negative_context, advantages=torch.tensor([1.0, -0.5]))
    rows, step = torch.tensor([0, 1]), torch.tensor([1, 2])
    t = ddim.timesteps[step]
    log_prob = log_prob_of_step(sd.unet, ddim, traj.latents[rows, step], traj.latents[rows, step + 1], t, traj.context,
                                traj.negative_context, 5.0)
    expected = train.policy_loss(settings(), log_prob, traj.log_probs[rows, step], e.advantages)[0]
    loss0 = train.ddpo_step_loss(settings(kl_coef=0.0), sd.unet, base, ddim, e, rows, step, None)[0]
    assert torch.equal(loss0, expected)
    eps = guided_eps(sd.unet, traj.latents[rows, step], t, traj.context, traj.negative_context, 5.0)
    eps_base = guided_eps(base, traj.latents[rows, step], t, traj.context, traj.negative_context, 5.0)
    kl = ddim.kl(eps, eps_base, t, traj.latents[rows, step]).mean()
    loss2 = train.ddpo_step_loss(settings(kl_coef=2.0), sd.unet, base, ddim, e, rows, step, None)[0]
    assert kl > 0 and torch.allclose(loss2, expected + 2.0 * kl, rtol=1e-6)
    loss2.backward()  # the frozen base gets no gradient; the policy does
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is not None for p in sd.unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("algo,eta", [("ppo", 1.0), ("reinforce", 1.0), ("ppo", 0.5)])
def test_balance_steps_gives_every_step_the_same_gradient_scale(algo, eta):
    # A policy whose eps is one free parameter, and one trajectory that took the same noise z at every step. A step's
    # gradient is -A x weight x steepness_j x z / D (test_2_ddim): with the authors' loss it grows with the step's
    # steepness (8.3x the median's at the next-to-last of 10 steps); with --balance-steps it is the median's everywhere.
    ddim, z, advantage = DDIM(10), torch.randn(1, 4, 2, 2), 0.7

    class ConstantEps(nn.Module):
        def __init__(self):
            super().__init__()
            self.eps = nn.Parameter(torch.randn(1, 4, 2, 2))

        def forward(self, x, t, context):
            return self.eps.expand_as(x)
    unet = ConstantEps()
    latents, log_probs = [torch.randn(1, 4, 2, 2)], []
    with torch.no_grad():
        for j in range(10):
            x_prev, log_prob = ddim.step(unet.eps, ddim.timesteps[j], latents[-1], eta=eta, noise=z)
            latents.append(x_prev), log_probs.append(log_prob)
    e = SimpleNamespace(latents=torch.stack(latents, dim=1), old_log_probs=torch.stack(log_probs, dim=1),
                        context=torch.zeros(1, 77, 8), negative_context=torch.zeros(1, 77, 8),
                        advantages=torch.tensor([advantage]))
    steepness = ddim.steepness(eta)  # the steps' steepness at the run's eta
    for balance in (False, True):
        for j in range(10):
            unet.eps.grad = None
            loss = train.ddpo_step_loss(settings(algo=algo, eta=eta, balance_steps=balance), unet, None, ddim, e,
                                        torch.tensor([0]), torch.tensor([j]), None)[0]
            loss.backward()
            unit = advantage * (steepness.median() if balance else steepness[j]) / z.numel()  # per unit of noise
            # atol: x_prev - mean = sigma z loses float32 digits where z is small, by about 1e-7 / sigma
            torch.testing.assert_close(unet.eps.grad.abs(), unit * z.abs(), rtol=1e-4, atol=1e-4 * unit.item())


def test_full_fine_tuning_starts_from_the_published_fp32_weights(tiny_model_dir):
    # Under bf16 the frozen parts load in bf16, but a fully fine-tuned UNet is AdamW's fp32 master copy: it must be the
    # published weights exactly, not their bf16 rounding. With LoRA the UNet's published weights are frozen: bf16.
    published = StableDiffusion.from_pretrained(tiny_model_dir)
    full, lora = (train.load_model(tiny_model_dir, "cpu", torch.bfloat16, lora) for lora in (False, True))
    for name, p in published.unet.state_dict().items():
        assert torch.equal(full.unet.state_dict()[name], p), name
    assert lora.unet.conv_in.weight.dtype == torch.bfloat16
    for sd in (full, lora):
        assert {p.dtype for p in [*sd.vae.parameters(), *sd.text_encoder.parameters()]} == {torch.bfloat16}


def test_full_fine_tuning_base_gives_the_policy_numbers_under_autocast(tiny_model_dir):
    # The frozen base for the KL: before training it must compute exactly what the fp32 policy computes under autocast,
    # so epoch 0's KL is 0, not a rounding artefact. Casting the whole copy to bf16 rounds the norms' weights, which
    # autocast keeps in fp32 for the policy (the outputs then differed by 0.03).
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    base = train.base_model(sd, sd.unet, False, torch.bfloat16)
    x, ctx, neg, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.randn(1, 77, 32), torch.tensor([981, 21])
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(guided_eps(base, x, t, ctx, neg, 5.0), guided_eps(sd.unet, x, t, ctx, neg, 5.0))
    assert base.conv_in.weight.dtype == torch.bfloat16 and base.conv_norm_out.weight.dtype == torch.float32


def test_kl_penalty_with_lora_reaches_only_the_adapters(tiny_model_dir):
    # With LoRA the base is the same UNet with its adapters off: the penalty's gradient must reach the LoRA weights
    # and nothing else (the published weights stay frozen), and be nonzero once the adapters have moved.
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    traj = sample(sd, ["a red cat", "cat"], seeds=[1, 2], num_steps=4, guidance_scale=5.0)
    add_lora(sd.unet, rank=2)
    with torch.no_grad():
        for p in lora_parameters(sd.unet):
            p.add_(0.1 * torch.randn_like(p))
    base = train.base_model(sd, sd.unet, True, torch.float32)
    e = SimpleNamespace(latents=traj.latents, old_log_probs=traj.log_probs, context=traj.context,
                        negative_context=traj.negative_context, advantages=torch.zeros(2))  # only the KL term
    loss = train.ddpo_step_loss(settings(kl_coef=1.0), sd.unet, base, DDIM(4), e, torch.tensor([0, 1]),
                                torch.tensor([0, 3]), None)[0]
    loss.backward()
    trained = {name for name, p in sd.unet.named_parameters() if p.grad is not None}
    assert loss > 0 and trained == {name for name, p in sd.unet.named_parameters() if ".lora_" in name}
    assert all(p.grad.abs().sum() > 0 for p in lora_parameters(sd.unet))


# --- LoRA -----------------------------------------------------------------------------------------------------------

def test_lora_starts_at_the_base_and_switches_off_to_it(tiny_model_dir):
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([981, 1]), torch.randn(2, 77, 32)
    with torch.no_grad():
        base = sd.unet(x, t, ctx)
        add_lora(sd.unet, rank=4)
        assert torch.equal(sd.unet(x, t, ctx), base)  # B = 0 at the start: exactly the base model
        for p in lora_parameters(sd.unet):
            p.add_(0.1 * torch.randn_like(p))  # as if trained
        assert not torch.allclose(sd.unet(x, t, ctx), base, atol=1e-4)
        with lora_off(sd.unet):
            assert torch.equal(sd.unet(x, t, ctx), base)  # the published weights' output, bit for bit
        assert not torch.allclose(sd.unet(x, t, ctx), base, atol=1e-4)  # and back on after the block


def test_compiled_unet_shares_one_graph_between_sampling_the_kl_and_the_base(tiny_model_dir):
    # train.py's sampling (one t), KL metric (a t per row) and base model (LoRA off) run one compiled graph: each more
    # graph costs about 45 s of compiling at SD size. The graph must still see lora_off, not a folded-in constant.
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    add_lora(sd.unet, rank=2)
    with torch.no_grad():
        for p in lora_parameters(sd.unet):
            p.add_(0.1 * torch.randn_like(p))
    compiled = torch.compile(sd.unet, dynamic=False)
    x, ctx, neg = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    t_one, t_rows = torch.tensor(981), torch.tensor([981, 21])
    with torch.no_grad():
        on = guided_eps(compiled, x, t_one, ctx, neg, 5.0)
        rows = guided_eps(compiled, x, t_rows, ctx, neg, 5.0)
        with lora_off(sd.unet):
            off = guided_eps(compiled, x, t_rows, ctx, neg, 5.0)
            off_eager = guided_eps(sd.unet, x, t_rows, ctx, neg, 5.0)
        on_eager = guided_eps(sd.unet, x, t_rows, ctx, neg, 5.0)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.allclose(on[0], rows[0], atol=1e-5) and torch.allclose(rows, on_eager, atol=1e-4)
    assert torch.allclose(off, off_eager, atol=1e-4) and not torch.allclose(off, on_eager, atol=1e-3)


def test_lora_rank_at_most_the_narrowest_projection(tiny_model_dir):
    unet = StableDiffusion.from_pretrained(tiny_model_dir).unet  # attention projections 32 features at the narrowest
    with pytest.raises(train.UsageError, match="--lora-rank 33: must be at most 32, this UNet's narrowest attention"):
        add_lora(unet, rank=33)
    assert len(lora_parameters(add_lora(unet, rank=32))) > 0


def test_lora_on_sd_v1_4_trains_the_papers_797184_parameters():
    from nanoddpo.model import UNet
    cfg = json.loads((Path(__file__).parents[1] / "nanoddpo/configs/sd-v1-4/unet_config.json").read_text())
    with torch.device("meta"):
        unet = add_lora(UNet(cfg), rank=4)
    assert sum(p.numel() for p in lora_parameters(unet)) == 797_184


# --- the epoch's prompts ------------------------------------------------------------------------------------------

def test_prompts_are_drawn_evenly_and_in_groups():
    prompts = [f"p{i}" for i in range(10)]
    gen = torch.Generator().manual_seed(0)
    drawn = draw_prompts(prompts, 40, 4, gen)  # 10 prompts x 4 images: every prompt exactly 4 times
    assert len(drawn) == 40 and all(drawn.count(p) == 4 for p in prompts)
    assert drawn != sorted(drawn)  # shuffled, so a sampling batch mixes prompts
    drawn = draw_prompts(prompts, 24, 4, gen)  # 6 groups of 4 from one pass: 6 distinct prompts
    assert sorted(drawn.count(p) for p in set(drawn)) == [4] * 6
    drawn = draw_prompts(prompts, 25, 1, gen)  # 2.5 passes: every prompt 2 or 3 times, never 1 or 4
    assert {drawn.count(p) for p in prompts} <= {2, 3}


# --- advantages ---------------------------------------------------------------------------------------------------

def test_per_prompt_stats_use_the_batch_until_min_count_then_the_buffer():
    tracker = train.PerPromptStatTracker(buffer_size=4, min_count=3)
    rewards = np.array([1.0, 2.0, 10.0, 20.0])
    adv = tracker.advantages(["a", "a", "b", "b"], rewards)  # 2 < 3 rewards each: batch statistics
    assert np.allclose(adv, (rewards - rewards.mean()) / (rewards.std() + 1e-6))
    adv = tracker.advantages(["a", "a", "b", "b"], np.array([3.0, 4.0, 30.0, 40.0]))  # 4 each: own buffers
    assert np.allclose(adv[:2], (np.array([3, 4]) - 2.5) / (np.std([1, 2, 3, 4]) + 1e-6))
    tracker.advantages(["a"], np.array([5.0]))
    assert tracker.buffers["a"] == [2.0, 3.0, 4.0, 5.0]  # capped at buffer_size, oldest out


def test_per_prompt_stats_switch_at_exactly_min_count():
    tracker = train.PerPromptStatTracker(buffer_size=8, min_count=3)
    rewards = np.array([1.0, 2.0, 4.0, 100.0])
    adv = tracker.advantages(["a", "a", "a", "b"], rewards)  # "a" has exactly min_count rewards: its own buffer
    assert np.allclose(adv[:3], (rewards[:3] - rewards[:3].mean()) / (rewards[:3].std() + 1e-6))
    assert np.isclose(adv[3], (100.0 - rewards.mean()) / (rewards.std() + 1e-6))  # "b" has 1: the batch's


def test_batch_advantages_are_z_scores():
    rewards = np.array([1.0, 2.0, 3.0, 10.0])
    adv = train.compute_advantages(settings(per_prompt_stats=False, adv_clip_max=100), None, ["p"] * 4, rewards)
    assert np.allclose(adv, (rewards - 4.0) / rewards.std()) and np.isclose(adv.std(), 1.0, atol=1e-5)
    # The authors' epsilon over the batch is 1e-8 (1e-6 in the per-prompt tracker): it shows on rewards 1e-7 apart
    close = np.array([0.0, 1e-7, 2e-7, 3e-7])
    adv = train.compute_advantages(settings(per_prompt_stats=False, adv_clip_max=100), None, ["p"] * 4, close)
    assert np.allclose(adv, (close - close.mean()) / (close.std() + 1e-8), rtol=1e-6)


def test_gradients_are_clipped_to_max_grad_norm(tmp_path, tiny_model_dir, monkeypatch):
    clip, seen = torch.nn.utils.clip_grad_norm_, []
    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        total = clip(params, max_norm, *args, **kwargs)
        seen.append((max_norm, torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()))
        return total
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    run(tmp_path, tiny_model_dir, name="clip", max_grad_norm=1e-3, epochs=1)
    assert seen and all(max_norm == 1e-3 and norm <= 1e-3 * (1 + 1e-4) for max_norm, norm in seen)


def test_advantages_are_clipped():
    rewards = np.array([0.0] * 98 + [100.0, -100.0])  # z-scores of about +-7: clipped on both sides
    adv = train.compute_advantages(settings(per_prompt_stats=False, adv_clip_max=5), None, ["p"] * 100, rewards)
    assert adv.max() == 5.0 and adv.min() == -5.0 and np.all(adv[:98] == 0)


# --- the stored trajectory is scored exactly as it was sampled: ratio 1 on the first update --------------------------

def test_recomputed_log_probs_match_sampling(tiny_model_dir):
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    traj = sample(sd, ["a red cat", "cat"], seeds=[1, 2], num_steps=4, guidance_scale=5.0)
    ddim = DDIM(4)
    for j in range(4):
        t = ddim.timesteps[j].repeat(2)
        lp = log_prob_of_step(sd.unet, ddim, traj.latents[:, j], traj.latents[:, j + 1], t, traj.context,
                              traj.negative_context, 5.0)
        assert torch.allclose(lp, traj.log_probs[:, j], atol=1e-5)


# --- whole runs ---------------------------------------------------------------------------------------------------

TINY_RUN = dict(prompts="simple_animals", num_steps=3, batch_size=4, batches_per_epoch=2, train_batch_size=4,
                grad_accum=1, timestep_fraction=1.0, clip_range=1e-4, save_every=1, grid_every=1, stat_min_count=2)


def run(tmp_path, tiny_model_dir, **kw):
    s = settings(model=str(tiny_model_dir), out_dir=str(tmp_path), **{**TINY_RUN, **kw})
    train.main(s, None)
    return tmp_path / s.name


@pytest.mark.parametrize("algo,lora", [("ppo", False), ("reinforce", True)])
def test_run_writes_metrics_grids_and_checkpoints(tmp_path, tiny_model_dir, algo, lora):
    run_dir = run(tmp_path, tiny_model_dir, name="r", algo=algo, lora=lora, epochs=2)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]
    for key in ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "sample_s", "reward_s", "train_s", "images_per_s"):
        assert all(np.isfinite(m[key]) for m in metrics), key
    steps_per_epoch = 1 if algo == "reinforce" else 2
    assert metrics[-1]["global_step"] == 2 * steps_per_epoch
    ckpt = run_dir / "checkpoints" / f"step_{2 * steps_per_epoch}"
    weights = load_file(ckpt / ("lora.safetensors" if lora else "unet.safetensors"))
    base = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    if lora:
        assert all(".lora_" in k for k in weights) and len(weights) > 0
    else:
        assert set(weights) == set(base)  # the published key names: drops in where the original file does
        assert any(not torch.equal(weights[k], base[k]) for k in base)  # and it trained
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 2 and state["settings"]["algo"] == algo
    assert (run_dir / "samples_epoch0001.png").is_file()


def two_prompts(tmp_path):
    (tmp_path / "two.txt").write_text("a red cat\nred cat\n")
    return str(tmp_path / "two.txt")


@pytest.mark.parametrize("kl_coef", [0.0, 0.5])
def test_resume_continues_exactly(tmp_path, tiny_model_dir, kl_coef):
    # Two prompts, 4 images each per epoch and min count 2: from epoch 1 on, each prompt's advantages are z-scored
    # against a buffer that holds the earlier epochs' rewards, so a resume that lost the buffers would land elsewhere.
    # With the KL penalty, the base model must be the published weights, not the checkpoint resumed from.
    kw = dict(name="r", prompts=two_prompts(tmp_path), images_per_prompt=4, stat_min_count=2, kl_coef=kl_coef)
    straight = run(tmp_path / "a", tiny_model_dir, epochs=3, **kw)
    interrupted = run(tmp_path / "b", tiny_model_dir, epochs=1, **kw)
    s, ckpt = train.parse_settings(["--resume", str(interrupted), "--epochs", "3"])
    train.main(s, ckpt)
    a = load_file(straight / "checkpoints" / "step_6" / "unet.safetensors")
    b = load_file(interrupted / "checkpoints" / "step_6" / "unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2]


def test_one_run_one_folder(tmp_path, tiny_model_dir):
    # A fresh run never writes into an existing run's folder; a run killed before its first checkpoint resumes from
    # epoch 0 with its saved settings.
    first = run(tmp_path, tiny_model_dir, name="r", epochs=1)
    with pytest.raises(train.UsageError, match="already holds a run: continue it with --resume"):
        run(tmp_path, tiny_model_dir, name="r", epochs=1)
    (tmp_path / "junk.safetensors").write_text("junk")  # a model that fails to load leaves no run folder behind
    with pytest.raises(model.LoadError, match="is not a safetensors file"):
        run(tmp_path, tmp_path / "junk.safetensors", name="r2", epochs=1)
    assert not (tmp_path / "r2").exists()
    killed = tmp_path / "killed"

    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):  # killed while sampling
        patch.setattr(train, "sample", interrupted)
        run(tmp_path, tiny_model_dir, name="killed", epochs=1)
    s, ckpt = train.parse_settings(["--resume", str(killed)])
    assert ckpt is None and s.epochs == 1 and s.model == str(tiny_model_dir)
    with pytest.raises(train.UsageError, match="--name elsewhere: --resume goes on in the run's own folder, "):
        train.parse_settings(["--resume", str(killed), "--name", "elsewhere"])
    train.main(s, ckpt)
    a = load_file(first / "checkpoints" / "step_2" / "unet.safetensors")
    b = load_file(killed / "checkpoints" / "step_2" / "unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same settings and seed: the same run as the first


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_at_lr_0_the_stored_steps_score_as_sampled(tmp_path, tiny_model_dir, eta):
    # Training recomputes each stored step's log-prob with the same guided eps (same guidance scale, same x_t -> x_prev)
    # and the same step density (same eta) as sampling: with the weights frozen the ratio is 1, approx_kl ~0 and
    # nothing is clipped, across inner epochs.
    run_dir = run(tmp_path, tiny_model_dir, name="r", epochs=1, lr=0.0, num_inner_epochs=2, guidance_scale=7.0, eta=eta)
    m = json.loads((run_dir / "metrics.jsonl").read_text())
    assert m["approx_kl"] < 1e-10 and m["clipfrac"] == 0 and m["kl_to_base"] == 0


def test_one_update_averages_over_batches_and_timesteps(tmp_path, tiny_model_dir, monkeypatch):
    # Give every (batch, timestep) the same gradient, 1 on each conv_out bias: the optimizer step's gradient must be
    # exactly 1 whatever the number of trained timesteps or accumulated batches. Adam with eps >> |g| makes the first
    # update lr * g / (|g| + eps): linear in g, so a loss divided by grad_accum but not by the timesteps shows up 2x.
    def same_every_step(s, unet, base_unet, ddim, e, rows, step, gen):
        zero = torch.zeros(())
        return unet.conv_out.bias.sum(), zero, zero
    monkeypatch.setattr(train, "ddpo_step_loss", same_every_step)
    base = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")["conv_out.bias"]
    # 8 samples in train batches of 2: 4 batches, accumulated `accum` at a time, over `inner` passes; reinforce makes
    # one update of all of them, however many inner epochs are asked for
    for fraction, accum, algo, inner, expected in [(1.0, 2, "ppo", 1, 2), (0.5, 2, "ppo", 1, 2), (1.0, 1, "ppo", 1, 4),
                                                   (0.5, 2, "ppo", 2, 4), (0.5, 1, "reinforce", 3, 1)]:
        kw = dict(num_steps=4, timestep_fraction=fraction, train_batch_size=2, grad_accum=accum, lr=1e3,
                  adam_eps=1e3, weight_decay=0.0, max_grad_norm=1e9, epochs=1, algo=algo, num_inner_epochs=inner,
                  name=f"{fraction}-{accum}-{algo}-{inner}")
        run_dir = run(tmp_path, tiny_model_dir, **kw)
        steps = json.loads((run_dir / "metrics.jsonl").read_text())["global_step"]
        assert steps == expected, (fraction, accum, algo, inner)
        bias = load_file(run_dir / "checkpoints" / f"step_{steps}" / "unet.safetensors")["conv_out.bias"]
        first = -1e3 * 1 / (1 + 1e3)  # Adam's first step with g = 1; later steps repeat it (m, v stay those of g = 1)
        assert torch.allclose(bias - base, torch.full_like(base, first * steps), rtol=1e-4), (fraction, accum)


def record_sampling(monkeypatch):
    """train.py's sample() as before, with every call's (prompts, seeds) appended to the list returned."""
    calls, real_sample = [], train.sample
    def recording_sample(sd, prompts, seeds, *args, **kwargs):
        calls.append((list(prompts), list(seeds)))
        return real_sample(sd, prompts, seeds, *args, **kwargs)
    monkeypatch.setattr(train, "sample", recording_sample)
    return calls


def test_each_sample_trains_on_its_own_advantage_and_random_steps(tmp_path, tiny_model_dir, monkeypatch):
    # The reward is a function of the prompt, so each stored sample's advantage is known from the prompt it was sampled
    # with: every (batch, step) the loss sees must carry the z-score of its own sample's reward. And each sample trains
    # timestep_fraction of its steps, a random subset of its own, not the first ones.
    (tmp_path / "by_prompt.py").write_text("import numpy as np\ndef score(images, prompts):\n"
                                           "    return np.array([sum(map(ord, p)) % 97 for p in prompts], float)\n")
    calls, seen = record_sampling(monkeypatch), []
    def spy(s, unet, base_unet, ddim, e, rows, step, gen):
        seen.append((rows.tolist(), e.advantages[rows].tolist(), step.tolist()))
        zero = torch.zeros(())
        return unet.conv_out.bias.sum() * 0, zero, zero
    monkeypatch.setattr(train, "ddpo_step_loss", spy)
    run(tmp_path, tiny_model_dir, name="r", epochs=1, num_steps=4, timestep_fraction=0.5, train_batch_size=2,
        per_prompt_stats=False, adv_clip_max=100.0, reward=f"{tmp_path / 'by_prompt.py'}:score")
    sampled = [p for prompts, _ in calls for p in prompts]
    r = np.array([sum(map(ord, p)) % 97 for p in sampled], float)
    z = (r - r.mean()) / (r.std() + 1e-6)
    steps = {}
    for rows, advantages, step in seen:
        assert np.allclose(advantages, z[rows], atol=1e-5)
        for row, k in zip(rows, step):
            steps.setdefault(row, []).append(k)
    assert sorted(steps) == list(range(len(sampled)))
    assert any(rows != [rows[0], rows[0] + 1] for rows, _, _ in seen)  # train batches mix the sampling batches
    assert all(len(set(k)) == len(k) == 2 for k in steps.values())  # half of 4 steps, each once
    assert {frozenset(k) for k in steps.values()} != {frozenset({0, 1})}  # not always the first two
    assert set().union(*steps.values()) == {0, 1, 2, 3}


def test_each_epoch_draws_new_seeds_and_prompts(tmp_path, tiny_model_dir, monkeypatch):
    # An epoch's randomness derives from (seed, epoch): a loop that reused epoch 0's draw would start every epoch from
    # the same noises with the same prompts, and train the policy on a fixed handful of seeds. And the logged loss,
    # approx_kl and clipfrac are means over every training call of the epoch, inner epochs included.
    calls = record_sampling(monkeypatch)
    def constant_loss(s, unet, *args):
        return unet.conv_out.bias.sum() * 0 + 0.25, torch.tensor(0.5), torch.tensor(0.75)
    monkeypatch.setattr(train, "ddpo_step_loss", constant_loss)
    out = run(tmp_path, tiny_model_dir, name="r", epochs=2, num_steps=2, num_inner_epochs=2)
    for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        assert (m["loss"], m["approx_kl"], m["clipfrac"]) == (0.25, 0.5, 0.75)
    def epoch(k):  # its prompts and its seeds, over its sampling calls
        mine = calls[k * TINY_RUN["batches_per_epoch"]:(k + 1) * TINY_RUN["batches_per_epoch"]]
        return [p for prompts, _ in mine for p in prompts], [s for _, seeds in mine for s in seeds]
    (prompts0, seeds0), (prompts1, seeds1) = epoch(0), epoch(1)
    assert len(seeds1) == len(seeds0) == len(set(seeds0)) == 8  # every image of an epoch has a seed of its own
    assert not set(seeds0) & set(seeds1) and prompts0 != prompts1


def test_kl_to_base_is_the_closed_form_at_the_sampled_states(tiny_model_dir):
    # One random step per trajectory: KL(policy || base) of the step from latent j at timestep j, averaged.
    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    traj = sample(sd, ["a red cat", "cat", "a dog", "dog"], seeds=[1, 2, 3, 4], num_steps=4, guidance_scale=5.0)
    base = train.base_model(sd, sd.unet, False, torch.float32)
    with torch.no_grad():
        for p in sd.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ddim, s = DDIM(4), settings(train_batch_size=4)
    e = SimpleNamespace(latents=traj.latents, context=traj.context, negative_context=traj.negative_context)
    kl = train.kl_to_base(s, sd.unet, base, ddim, e, torch.Generator().manual_seed(0))
    step = torch.randint(4, (4,), generator=torch.Generator().manual_seed(0))  # the steps it drew
    x_t, t = traj.latents[torch.arange(4), step], ddim.timesteps[step]
    with torch.no_grad():
        eps = guided_eps(sd.unet, x_t, t, traj.context, traj.negative_context, 5.0)
        eps_base = guided_eps(base, x_t, t, traj.context, traj.negative_context, 5.0)
    assert kl > 0 and kl == pytest.approx(ddim.kl(eps, eps_base, t, x_t).mean().item(), rel=1e-5)
    # in sampling-sized batches (UNet batch 2 x batch_size), so that compiled runs reuse the sampling graph
    batches = []
    def spy(unet):
        return lambda x, *rest: batches.append(len(x)) or unet(x, *rest)
    train.kl_to_base(settings(batch_size=2, train_batch_size=1), spy(sd.unet), spy(base), ddim, e, torch.Generator())
    assert batches == [4, 4, 4, 4]


def test_your_own_reward_in_one_flag(tmp_path, tiny_model_dir):
    (tmp_path / "mine.py").write_text("import numpy as np\n"
                                      "def brightness(images, prompts):\n    return images.mean(axis=(1, 2, 3)) / 255\n"
                                      "def one_per_batch(images, prompts):\n    return np.zeros(1)\n")
    run_dir = run(tmp_path, tiny_model_dir, name="r", epochs=1, reward=f"{tmp_path / 'mine.py'}:brightness")
    m = json.loads((run_dir / "metrics.jsonl").read_text())
    assert 0 < m["reward_mean"] < 1 and m["reward_std"] > 0
    with pytest.raises(train.UsageError, match=r"mine.py:one_per_batch returned shape \(1,\) for 4 images"):
        run(tmp_path, tiny_model_dir, name="bad", epochs=1, reward=f"{tmp_path / 'mine.py'}:one_per_batch")


def test_kl_to_base_is_zero_until_the_model_moves(tmp_path, tiny_model_dir):
    run_dir = run(tmp_path, tiny_model_dir, name="r", epochs=2, kl_coef=0.1)
    kls = [json.loads(l)["kl_to_base"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kls[0] == 0.0 and kls[1] > 0


def test_nan_rewards_are_dropped_with_a_warning(tmp_path, tiny_model_dir, monkeypatch):
    def half_nan(images, prompts):
        r = rewards.jpeg_compressibility(images)
        r[::2] = np.nan
        return r
    monkeypatch.setitem(rewards.REWARDS, "half-nan", lambda: half_nan)
    with pytest.warns(UserWarning, match="NaN/inf reward"):
        run_dir = run(tmp_path, tiny_model_dir, name="r", reward="half-nan", epochs=1, train_batch_size=2)
    m = json.loads((run_dir / "metrics.jsonl").read_text())
    assert m["samples"] == 4 and np.isfinite(m["reward_mean"]) and np.isfinite(m["loss"])
    monkeypatch.setitem(rewards.REWARDS, "all-nan", lambda: lambda images, prompts: np.full(len(images), np.nan))
    with pytest.raises(train.UsageError, match="--reward all-nan: NaN or inf for every image of epoch 0"):
        run(tmp_path, tiny_model_dir, name="all", reward="all-nan", epochs=1)


def test_a_constant_reward_says_so(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "const", lambda: lambda images, prompts: np.full(len(images), 0.5))
    with pytest.warns(UserWarning, match="epoch 0: the images scored alike .all, or those of each prompt., so this epoch has nothing to learn"):
        run(tmp_path, tiny_model_dir, name="r", reward="const", epochs=1)
    with pytest.warns(UserWarning, match="epoch 0: the images scored alike"):  # RWR's weights are 1 then, not 0
        run(tmp_path, tiny_model_dir, name="rwr", reward="const", epochs=1, algo="rwr")
    by_prompt = lambda images, prompts: np.array([len(p) for p in prompts], dtype=float)  # noqa: E731
    monkeypatch.setitem(rewards.REWARDS, "prompt-length", lambda: by_prompt)  # equal within each prompt
    with pytest.warns(UserWarning, match="epoch 0: the images scored alike"):
        run(tmp_path, tiny_model_dir, name="p", reward="prompt-length", epochs=1, images_per_prompt=2)


def test_nan_weights_stop_the_run_before_they_are_saved(tmp_path, tiny_model_dir, monkeypatch):
    def nan_loss(s, unet, base_unet, ddim, e, rows, step, gen):
        zero = torch.zeros(())
        return unet.conv_out.bias.sum() * float("nan"), zero, zero
    monkeypatch.setattr(train, "ddpo_step_loss", nan_loss)
    with pytest.raises(train.UsageError, match="epoch 0: the weights became NaN or inf and were not saved: lower"):
        run(tmp_path, tiny_model_dir, name="r", epochs=1)
    assert not list((tmp_path / "r" / "checkpoints").iterdir())


def test_resume_refuses_what_cannot_continue(tmp_path, tiny_model_dir):
    import re
    full = run(tmp_path, tiny_model_dir, name="full", epochs=1)
    with pytest.raises(train.UsageError, match=re.escape(f"--epochs 1: {full} has done 1 epochs: pass more to train")):
        train.parse_settings(["--resume", str(full)])
    with pytest.raises(train.UsageError, match="--lora True: the run trains with --lora False"):
        train.parse_settings(["--resume", str(full), "--epochs", "2", "--lora", "yes"])
    with pytest.raises(train.UsageError, match="--preset sd14: the run trains with --preset tiny"):
        train.parse_settings(["--resume", str(full), "--epochs", "2", "--preset", "sd14"])
    assert train.parse_settings(["--resume", str(full), "--epochs", "2", "--lora-rank", "8"])[0].epochs == 2  # unused
    lora = run(tmp_path, tiny_model_dir, name="lora", epochs=1, lora=True, lora_rank=2)
    with pytest.raises(train.UsageError, match="--lora-rank 4: the run trains with --lora-rank 2"):
        train.parse_settings(["--resume", str(lora), "--epochs", "2", "--lora-rank", "4"])
    (lora / "checkpoints" / "step_2" / "rng.safetensors").write_bytes(b"not safetensors")  # damaged weights
    with pytest.raises(model.LoadError, match=r"checkpoint .*step_2 cannot be read \(SafetensorError: .*delete it"):
        train.main(*train.parse_settings(["--resume", str(lora), "--epochs", "2"]))
    (lora / "checkpoints" / "step_2" / "state.json").write_text("{")  # damaged
    with pytest.raises(model.LoadError, match=r"checkpoint .*step_2 cannot be read \(JSONDecodeError: .*\): use"):
        train.parse_settings(["--resume", str(lora), "--epochs", "2"])
    state = json.loads((full / "checkpoints" / "step_2" / "state.json").read_text())
    state["settings"]["bogus"] = 1  # a run from another version of train.py
    (full / "checkpoints" / "step_2" / "state.json").write_text(json.dumps(state))
    with pytest.raises(train.UsageError, match=r"saved by another version of train.py \(settings \['bogus'\]\)"):
        train.parse_settings(["--resume", str(full), "--epochs", "2"])
    shutil.rmtree(full / "checkpoints")  # as if killed before its first checkpoint, with a damaged settings.json
    (full / "settings.json").write_text("[]")
    with pytest.raises(model.LoadError, match=r"the run's settings .*settings.json cannot be read \(TypeError"):
        train.parse_settings(["--resume", str(full), "--epochs", "2"])


def test_each_preset_takes_its_own_model(tmp_path, command_line, monkeypatch):
    # The tiny preset's settings (batch 64, full fine-tuning, a clip range for 8x8x4 latents) are for the tiny model:
    # without --model it trains the tiny model even where SD v1-4 is downloaded, and sd14 never falls back to tiny.
    for folder in ("stable-diffusion-v1-4", "tiny"):  # the published layout, without the files
        for part in ("unet", "vae", "text_encoder", "tokenizer"):
            (tmp_path / folder / part).mkdir(parents=True)
    monkeypatch.setattr("nanoddpo.settings.WEIGHTS", tmp_path)
    loaded = []
    def stop(path, *args, **kwargs):
        loaded.append(path)
        raise train.UsageError("stop here")
    monkeypatch.setattr(train.StableDiffusion, "from_pretrained", stop)
    assert command_line("train.py", ["--out-dir", tmp_path / "runs"]) == (1, "train.py: error: stop here")
    assert loaded == [tmp_path / "tiny"]
    shutil.rmtree(tmp_path / "stable-diffusion-v1-4")
    monkeypatch.setattr(train.StableDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    status, err = command_line("train.py", ["--preset", "sd14", "--out-dir", tmp_path / "runs"])
    assert status == 1 and err == ("train.py: error: --preset sd14: SD v1-4 is not in weights/stable-diffusion-v1-4: "
                                   "fetch it (weights/README.md) or pass --model")


def cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, timeout=120)


BAD_SETTINGS = [  # (flags, what the one line must say); each is refused before any model is loaded
    (["--reward", "beauty"], "--reward beauty: choose one of jpeg, jpeg-incompressibility"),
    (["--algo", "dpo"], "--algo dpo: choose one of ppo, reinforce, rwr, rwr-sparse"),
    (["--preset", "huge"], "--preset huge: choose one of tiny, sd14"),
    (["--precision", "fp8"], "--precision fp8: choose one of auto, fp32, bf16, fp16"),
    (["--compile", "maybe"], "--compile maybe: choose one of auto, on, off"),
    (["--lora", "ture"], "--lora: ture: say one of 1, true, yes, on or 0, false, no, off"),
    (["--epochs", "abc"], "--epochs: abc: expected a whole number"),
    (["--lr", "fast"], "--lr: fast: expected a number"),
    (["--lr", "inf"], "--lr: inf: expected a finite number"),  # inf passes `>= 0`, and trains the weights to NaN
    (["--kl-coef", "1e400"], "--kl-coef: 1e400: expected a finite number"),
    (["--guidance-scale", "nan"], "--guidance-scale: nan: expected a finite number"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--batch-size", "1000000000"], "--batch-size 1000000000: 5000000000 samples per epoch (x --batches-per-epoch 5 "
                                     "x 1 process(es)): an epoch keeps every trajectory for training; at most 1,000,000"),
    (["--num-steps", "0"], "--num-steps 0: must be at least 1"),
    (["--num-steps", "1001"], "--num-steps 1001: must be at most 1000"),
    (["--epochs", "-3"], "--epochs -3: must be at least 1"),
    (["--eta", "0"], "--eta 0.0: must be in (0, 1]"),
    (["--eta", "1.5"], "--eta 1.5: must be in (0, 1]"),
    (["--lr", "-1"], "--lr -1.0: must be 0 or more"),
    (["--guidance-scale", "-1"], "--guidance-scale -1.0: must be 0 or more"),
    (["--clip-range", "-1"], "--clip-range -1.0: must be above 0"),
    (["--clip-range", "0"], "--clip-range 0.0: must be above 0"),
    (["--adv-clip-max", "0"], "--adv-clip-max 0.0: must be above 0"),
    (["--num-inner-epochs", "0"], "--num-inner-epochs 0: must be at least 1"),
    (["--lora", "on", "--lora-rank", "0"], "--lora-rank 0: must be at least 1"),
    (["--timestep-fraction", "2"], "--timestep-fraction 2.0: must be in (0, 1]"),
    (["--timestep-fraction", "0"], "--timestep-fraction 0.0: must be in (0, 1]"),
    (["--kl-coef", "-1"], "--kl-coef -1.0: must be 0 or more"),
    (["--rwr-top-fraction", "0"], "--rwr-top-fraction 0.0: must be in (0, 1]"),
    (["--algo", "rwr", "--balance-steps", "yes"], "--balance-steps True: weighs DDPO's per-step terms; RWR has none"),
    (["--stat-min-count", "17"], "--stat-min-count 17: must be at most --stat-buffer 16"),
    (["--adam-beta1", "1"], "--adam-beta1 1.0: must be in [0, 1)"),
    (["--adam-eps", "0"], "--adam-eps 0.0: must be above 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm 0.0: must be above 0"),
    (["--seed", "-1"], "--seed -1: must be 0 or more"),
    (["--threads", "-2"], "--threads -2: must be 0 or more"),
    (["--threads", "5000"], "--threads 5000: must be at most 1024"),
    (["--name", "../../elsewhere"], "--name ../../elsewhere: must be a folder name, without '/'"),  # under --out-dir
    (["--algo", "reinforce", "--num-inner-epochs", "2"],  # DDPO_SF: one update per fresh batch, so it would be ignored
     "--num-inner-epochs 2: --algo reinforce makes one update of each epoch's samples: leave it out"),
    (["--algo", "reinforce", "--grad-accum", "5"], "--grad-accum 5: --algo reinforce makes one update"),
    (["--save-every", "0"], "--save-every 0: must be at least 1"),
    (["--device", "gpu"], "--device gpu: choose auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:7"], "--device cuda:7: no such GPU"),
    (["--batch-size", "5", "--batches-per-epoch", "1", "--train-batch-size", "2"], "--train-batch-size 2: must divide "
     "the samples per epoch per process (5 x 1 = 5); --train-batch-size 1 would"),
    (["--batch-size", "48"], "--train-batch-size 32: must divide the samples per epoch per process (48 x 5 = 240); "
     "--train-batch-size 30 would"),  # the largest below it
    (["--grad-accum", "3"], "--grad-accum 3: must divide the 10 train batches per epoch (samples per epoch per process / "
                             "--train-batch-size); --grad-accum 2 would"),
    (["--grad-accum", "12"], "--grad-accum 12: must divide the 10 train batches per epoch (samples per epoch per "
                              "process / --train-batch-size); --grad-accum 10 would"),  # all of them: the largest
    (["--images-per-prompt", "0"], "--images-per-prompt 0: must be at least 1"),
    (["--batch-size", "6", "--batches-per-epoch", "1", "--train-batch-size", "2", "--grad-accum", "1",
      "--images-per-prompt", "4"], "--images-per-prompt 4: must divide the samples per epoch (6)"),
    (["--model", "/nonexistent/model"], "model folder /nonexistent/model does not exist"),
    (["--model", "nanoddpo"], "nanoddpo has no unet/ folder"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no run there"),
]
if not torch.cuda.is_available():
    BAD_SETTINGS += [(["--device", "cuda"], "--device cuda: no such GPU: this machine has 0 CUDA device(s)"),
                     (["--precision", "bf16"], "--precision bf16: bf16/fp16 need a GPU")]


@pytest.mark.parametrize("args,message", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_bad_settings_fail_in_one_line(args, message, command_line):
    status, err = command_line("train.py", args)
    assert status != 0 and message in err and "Traceback" not in err, err
    assert err.strip().count("\n") == 0 and err.startswith("train.py: error: ")


def test_more_threads_than_cores_is_a_one_line_warning(monkeypatch, command_line):
    # at 1000 threads on 2 cores, sampling took 40x as long
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.parse_settings(["--threads", "4"])
    status, err = command_line("train.py", ["--threads", "5", "--prompts", "/nonexistent.txt"])
    assert status == 1 and err.splitlines()[0] == ("train.py: warning: --threads 5: more than this machine's 4 CPU "
                                                   "cores makes torch slower, not faster (0: one thread per core)"), err
    assert err.splitlines()[1].startswith("train.py: error: --prompts") and len(err.splitlines()) == 2


def test_auto_precision_and_compile_fit_the_gpu(monkeypatch):
    # bf16 has tensor cores from compute capability 8 (Ampere) on; a V100 or T4 (7) gets fp16, as the authors trained,
    # and torch.compile's GPU compiler, Triton, builds for 7 on, so a P100 (6) runs eager, as does a GPU where Triton is
    # not installed (torch's Windows wheels). On a CPU: fp32, eager.
    from nanoddpo import cli
    gpu = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["capability"])
    find_spec = importlib.util.find_spec  # Triton, the GPU compiler, is installed (not on this CPU-only machine)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: find_spec("torch") if name == "triton" else
                        find_spec(name, *a))
    installed = {"gcc", "g++"}  # the C and C++ compilers that Triton and inductor build with (whatever this machine has)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in installed else None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    for capability, precision, dtype, compiles in (((9, 0), "bf16", torch.bfloat16, True),  # H100
                                                   ((8, 6), "bf16", torch.bfloat16, True),  # RTX 30xx
                                                   ((7, 5), "fp16", torch.float16, True),  # T4
                                                   ((7, 0), "fp16", torch.float16, True),  # V100
                                                   ((6, 0), "fp16", torch.float16, False)):  # P100
        gpu["capability"] = capability
        assert (cli.auto_precision("cuda"), cli.auto_compile("cuda:0")) == (precision, compiles), capability
        assert cli.torch_dtype(cli.auto_precision(torch.device("cuda", 0))) == dtype
    assert (cli.auto_precision("cpu"), cli.auto_compile("cpu"), cli.torch_dtype("fp32")) == ("fp32", False, torch.float32)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    gpu["capability"] = (9, 0)
    assert (cli.auto_precision("cuda"), cli.auto_compile("cuda")) == ("bf16", False)  # on an H100 without Triton
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: find_spec("torch") if name == "triton" else
                        find_spec(name, *a))
    # Triton builds each kernel's launcher with $CC, else gcc, else clang: a slim container image may have none
    for compilers, cc, compiles in (({"gcc"}, None, True), ({"clang"}, None, True), (set(), None, False),
                                    (set(), "/opt/bin/cc", True), ({"g++", "clang++"}, None, False)):
        installed.clear(), installed.update(compilers)
        monkeypatch.setenv("CC", cc) if cc else monkeypatch.delenv("CC", raising=False)
        assert cli.auto_compile("cuda") is compiles, (compilers, cc)
        assert (cli.compile_blocker("cuda") is None) is compiles
    assert "needs a C compiler" in cli.compile_blocker("cuda")
    # on a CPU inductor builds C++ with $CXX, else g++ (clang++ on a Mac); auto stays eager there either way
    monkeypatch.setattr(sys, "platform", "linux")
    for compilers, cxx, blocked in (({"g++"}, None, False), ({"gcc", "clang++"}, None, True),
                                    ({"clang++"}, "clang++", False), ({"g++"}, "icpx", True)):
        installed.clear(), installed.update(compilers)
        monkeypatch.setenv("CXX", cxx) if cxx else monkeypatch.delenv("CXX", raising=False)
        assert (cli.compile_blocker("cpu") is not None) is blocked, (compilers, cxx)
        assert cli.auto_compile("cpu") is False
    monkeypatch.delenv("CXX", raising=False)
    for system, compilers, blocked in (("darwin", {"clang++"}, False), ("darwin", {"g++"}, True),
                                       ("win32", set(), False)):  # a Mac builds with clang++; Windows is not checked
        monkeypatch.setattr(sys, "platform", system)
        installed.clear(), installed.update(compilers)
        assert (cli.compile_blocker("cpu") is not None) is blocked, (system, compilers)
    # the context the models run in: autocast to that precision on that device, nothing at all for fp32
    assert isinstance(cli.autocast_to("cpu", "fp32"), contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... disabling autocast" on this machine
        for device, precision, dtype in (("cpu", "bf16", torch.bfloat16), ("cuda:0", "fp16", torch.float16),
                                         (torch.device("cuda"), "bf16", torch.bfloat16)):
            context = cli.autocast_to(device, precision)
            assert (context.device, context.fast_dtype) == (torch.device(device).type, dtype)


def test_asking_a_gpu_for_what_it_lacks_is_one_line(monkeypatch, command_line):
    gpu = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["capability"])
    gpu["capability"] = (6, 0)  # a P100
    assert command_line("train.py", ["--compile", "on"]) == (1, "train.py: error: --compile on: torch.compile's GPU "
                                                             "compiler (Triton) needs compute capability 7 or more (a "
                                                             "V100 on); this GPU has 6: use --compile off")
    train.parse_settings(["--compile", "off"])  # and eager is fine
    gpu["capability"] = (9, 0)  # an H100 where Triton is missing (torch's Windows wheels)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert command_line("train.py", ["--compile", "on"]) == (1, "train.py: error: --compile on: torch.compile's GPU "
                                                             "compiler, Triton, is not installed here (torch's Linux "
                                                             "CUDA wheels bring it): use --compile off")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: name == "triton")  # installed
    monkeypatch.setattr(shutil, "which", lambda name: None)  # but no C compiler (a slim container image)
    monkeypatch.delenv("CC", raising=False)
    assert command_line("train.py", ["--compile", "on"]) == (1, "train.py: error: --compile on: torch.compile's GPU "
                                                             "compiler, Triton, needs a C compiler (install gcc) to "
                                                             "build its kernel launchers, and finds none here ($CC, "
                                                             "gcc, clang): use --compile off")
    with pytest.warns(UserWarning, match=r"^--compile auto: runs eager \(slower\): torch.compile's GPU compiler, "
                                         r"Triton, needs a C compiler \(install gcc\)"):
        train.parse_settings(["--preset", "sd14"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU: inductor needs a C++ compiler there
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert command_line("train.py", ["--compile", "on"]) == (1, "train.py: error: --compile on: torch.compile builds "
                                                             "C++ for the CPU with g++ ($CXX), which is not installed "
                                                             "here (install g++): use --compile off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto is eager on a CPU anyway: nothing to say
        train.parse_settings(["--preset", "sd14", "--compile", "auto"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    gpu["capability"] = (7, 5)  # a T4: bf16 is allowed, with a warning that says what fits
    with pytest.warns(UserWarning, match=r"--precision bf16: this GPU has no bf16 tensor cores .* fp16 \(auto\) is"):
        train.parse_settings(["--precision", "bf16", "--compile", "on"])
    gpu["capability"] = (8, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.parse_settings(["--precision", "bf16", "--compile", "on"])


def test_auto_is_what_the_device_train_py_runs_on_fits(tmp_path, monkeypatch, command_line):
    from nanoddpo import cli
    asked = []
    monkeypatch.setattr(cli, "auto_precision", lambda device: asked.append(("precision", str(device))) or "fp32")
    monkeypatch.setattr(cli, "auto_compile", lambda device: asked.append(("compile", str(device))) or False)

    def stop(*args, **kwargs):
        raise train.UsageError("stop here")
    monkeypatch.setattr(train.StableDiffusion, "from_pretrained", stop)
    assert command_line("train.py", ["--out-dir", tmp_path, "--compile", "auto"]) == (1, "train.py: error: stop here")
    assert asked == [("precision", "cpu"), ("compile", "cpu")]
    asked.clear()
    assert command_line("train.py", ["--out-dir", tmp_path, "--precision", "fp32", "--compile", "off"])[0] == 1
    assert asked == []  # what the flags name is kept


def test_out_of_memory_is_one_line_that_says_what_to_lower(tmp_path, command_line, monkeypatch):
    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity\n...")
    monkeypatch.setattr(train.StableDiffusion, "from_pretrained", too_big)
    status, err = command_line("train.py", ["--out-dir", tmp_path])
    assert status == 1 and err.strip().count("\n") == 0, err
    assert err.startswith("train.py: error: out of memory (OutOfMemoryError: CUDA out of memory. Tried to allocate "
                          "20.00 GiB. GPU 0 has a total capacity): halve --train-batch-size and double --grad-accum")
    assert err.rstrip().endswith("; nothing was saved yet: the same command starts it again"), err  # while loading
    def cublas(*args, **kwargs):  # CUDA libraries report it as a plain RuntimeError
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    monkeypatch.setattr(train.StableDiffusion, "from_pretrained", cublas)
    status, err = command_line("train.py", ["--out-dir", tmp_path / "cublas"])
    assert status == 1 and err.startswith("train.py: error: out of memory (RuntimeError: CUDA error: out of memory)")
    monkeypatch.setattr(train.StableDiffusion, "from_pretrained", lambda *a, **k: 1 / 0)  # a bug keeps its traceback
    with pytest.raises(ZeroDivisionError):
        command_line("train.py", ["--out-dir", tmp_path / "bug"])


def test_a_failed_torch_compile_is_one_line_that_says_how_to_go_on(tmp_path, tiny_model_dir, command_line, monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    class InvalidCxxCompiler(RuntimeError):  # inductor's, whose message starts with its own name
        def __str__(self):
            return "InvalidCxxCompiler: No working C++ compiler found\n..."

    def compiled(model, **kwargs):  # what a CPU machine without a C++ compiler raises at the first call
        def call(*args):
            raise BackendCompilerFailed(model, InvalidCxxCompiler(), None)
        return call
    monkeypatch.setattr(torch, "compile", compiled)
    status, err = command_line("train.py", ["--model", tiny_model_dir, "--out-dir", tmp_path, "--compile", "on"])
    assert status == 1 and err.rstrip().endswith("train.py: error: torch.compile failed (InvalidCxxCompiler: No working "
                                                 "C++ compiler found): run with --compile off") and "Traceback" not in err, err


def test_ctrl_c_is_one_line_that_says_how_to_go_on(tmp_path, tiny_model_dir, command_line, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:  # while the model loads: no run folder yet, nothing to resume
        patch.setattr(train.StableDiffusion, "from_pretrained", interrupted)
        status, err = command_line("train.py", ["--out-dir", tmp_path])
    assert status == 130 and err.strip() == ("train.py: interrupted: nothing was saved yet: the same command starts "
                                             "it again")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr("nanoddpo.ddim.sample", interrupted)  # while sampling: the run's own folder, named or not
    new = ["--model", tiny_model_dir, "--out-dir", tmp_path]
    for flags in (new, [*new, "--name", "mine"], ["--resume", tmp_path / "mine"]):  # resumed: its folder again
        status, err = command_line("train.py", flags)
        run_dir = tmp_path / "mine" if len(flags) > 4 or "--resume" in flags else next(tmp_path.glob("jpeg-ppo-*"))
        assert status == 130, err
        assert err.splitlines()[-1] == f"train.py: interrupted: --resume {run_dir} goes on from its last checkpoint"


def test_bad_prompts_fail_before_the_model_loads(tmp_path, command_line, monkeypatch):
    monkeypatch.setattr(train.StableDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    files = {"dict.json": '{"a": "red cat"}', "numbers.json": "[1, 2]", "empty.txt": "\n  \n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cases = [
        (["--prompts", tmp_path / "dict.json"], "must hold a JSON list of strings, found a dict"),
        (["--prompts", tmp_path / "numbers.json"], "must hold a JSON list of non-empty strings; 2 entries are not"),
        (["--prompts", tmp_path / "empty.txt"], "holds no prompt"),
        (["--prompts", "no_such_set"], "is neither a file nor a prompt set (simple_animals"),
        (["--reward", "tinyworld", "--prompts", "simple_animals"], "45 of 45 prompts are not, e.g. 'cat'"),
    ]
    for args, message in cases:
        status, err = command_line("train.py", args)
        flag = args[0] if args[0] != "--reward" else "--reward"
        assert status == 1 and message in err and err.startswith(f"train.py: error: {flag}: "), err


def test_bad_settings_from_a_real_shell():
    out = cli("--lora-rank", "0")  # the same path with a real process: exit status, one line, no traceback
    assert out.returncode == 1 and out.stderr == "train.py: error: --lora-rank 0: must be at least 1\n"


def test_flags_help_and_spellings(capsys):
    s, _ = train.parse_settings(["--out_dir", "elsewhere", "--lora", "no", "--compile", "off"])
    assert s.out_dir == "elsewhere" and s.lora is False
    with pytest.raises(SystemExit):
        train.parse_settings(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs int >= 1 (default: tiny 10, sd14 100)" in text  # the comment and each preset's actual default
    assert "--out-dir str, --out_dir str" in text


def test_defaults_are_the_authors():
    # ddpo-pytorch's config/base.py and the paper, read off the reference, not off this code: a run without flags
    # (and --preset sd14) trains with exactly these
    authors = dict(num_steps=50, eta=1.0, guidance_scale=5.0, lr=3e-4, adam_beta1=0.9, adam_beta2=0.999,
                   weight_decay=1e-4, adam_eps=1e-8, max_grad_norm=1.0, clip_range=1e-4, adv_clip_max=5.0,
                   num_inner_epochs=1, timestep_fraction=1.0, per_prompt_stats=True, stat_buffer=16, stat_min_count=16,
                   lora=True, lora_rank=4, kl_coef=0.0, algo="ppo", rwr_beta=0.2, rwr_top_fraction=0.1)
    assert {k: getattr(train.Settings(), k) for k in authors} == authors
    s, _ = train.parse_settings(["--preset", "sd14", "--reward", "jpeg"])
    assert {k: getattr(s, k) for k in authors} == authors
    d = train.derived(s, 1)  # 256 samples per epoch, 4 optimizer steps, every one of the 50 steps trained
    assert (d.samples_per_epoch, d.steps_per_epoch, d.timesteps_trained, s.epochs) == (256, 4, 50, 100)
    # The authors train int(num_steps * timestep_fraction) timesteps (rounded down, 37 of 50 at 0.75, not 38), and
    # every inner epoch repeats the epoch's optimizer steps.
    assert train.derived(dataclasses.replace(s, timestep_fraction=0.75), 1).timesteps_trained == 37
    assert train.derived(dataclasses.replace(s, num_inner_epochs=2), 1).steps_per_epoch == 8


def test_sd14_follows_the_papers_task_settings():
    for reward in ("jpeg", "jpeg-incompressibility"):
        s, _ = train.parse_settings(["--preset", "sd14", "--reward", reward])
        assert (s.prompts, s.stat_buffer, s.stat_min_count, s.epochs) == ("imagenet_animals", 16, 16, 100)
    s, _ = train.parse_settings(["--preset", "sd14", "--reward", "aesthetic"])
    assert (s.prompts, s.stat_buffer, s.stat_min_count, train.derived(s, 1).steps_per_epoch) == ("simple_animals", 32, 16, 2)
    s, _ = train.parse_settings(["--preset", "sd14", "--reward", "jpeg", "--prompts", "simple_animals"])
    assert s.prompts == "simple_animals" and train.derived(s, 1).steps_per_epoch == 4  # flags win
    s, _ = train.parse_settings(["--preset", "sd14", "--reward", "alignment"])
    assert s.prompts == "animals_activities" and train.derived(s, 1).steps_per_epoch == 2
    assert (s.stat_buffer, s.stat_min_count, s.epochs, train.derived(s, 1).samples_per_epoch) == (32, 16, 200, 288)
    s, _ = train.parse_settings(["--preset", "sd14", "--lora", "no"])  # the authors' JAX code fine-tunes all at 1e-5
    assert s.lr == 1e-5 and train.parse_settings(["--preset", "sd14", "--lora", "no", "--lr", "3e-5"])[0].lr == 3e-5
    assert train.parse_settings(["--lora", "no"])[0].lr == 3e-4  # the tiny preset trains its whole UNet at 3e-4
    # the tiny preset runs eager on a GPU too (its compile would outlast its run); SD v1-4 compiles where it can
    assert [train.parse_settings(flags)[0].compile for flags in ([], ["--preset", "sd14"])] == ["off", "auto"]
    for reward in train.PAPER_TASKS:  # the tiny preset keeps its own settings and its own prompts for every reward
        s, _ = train.parse_settings(["--reward", reward])
        assert {k: getattr(s, k) for k in train.PRESETS["tiny"]} == train.PRESETS["tiny"] and s.prompts == ""


def test_unwritable_output(tmp_path, tiny_model_dir, command_line):
    (tmp_path / "file").write_text("not a folder")
    status, err = command_line("train.py", ["--model", tiny_model_dir, "--out-dir", tmp_path / "file"])
    assert status != 0 and "cannot write to" in err and "Traceback" not in err


# --- RWR baselines ------------------------------------------------------------------------------------------------

def test_rwr_weights():
    rewards = np.array([0.0, 1.0, 2.0, np.nan, 3.0] + [0.5] * 15)
    w = train.compute_advantages(settings(algo="rwr", rwr_beta=0.2), None, ["p"] * 20, rewards)
    finite = np.isfinite(rewards)
    assert w[~finite] == 0 and np.isclose(w[finite].mean(), 1.0) and w.argmax() == 4
    # softmax(beta * r) * N, as the authors' code: one more unit of reward is e^0.2 more weight (not e^(1/0.2))
    assert np.isclose(w[4] / w[2], np.exp(0.2))
    expected = np.exp(0.2 * rewards[finite]) / np.exp(0.2 * rewards[finite]).sum() * 19
    assert np.allclose(w[finite], expected)
    equal = train.compute_advantages(settings(algo="rwr", rwr_beta=0.0), None, ["p"] * 20, rewards)
    assert np.all(equal[finite] == 1.0)  # beta 0: every sample weighs the same, the reward is ignored
    top = train.compute_advantages(settings(algo="rwr-sparse", rwr_top_fraction=0.1), None, ["p"] * 20, rewards)
    assert sorted(np.flatnonzero(top)) == [2, 4] and set(top) == {0.0, 1.0}  # the best 10% of 19 finite rewards


def test_rwr_denoises_the_final_latents_at_any_of_the_1000_timesteps():
    # A UNet that knows each trajectory's final latent x_0 predicts the noise of x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps
    # exactly, so its RWR loss is 0, and the timesteps it is asked about span the schedule's 1000 training steps (RWR
    # is the pretraining loss), not the 4 DDIM steps the trajectories were sampled with.
    ddim, seen = DDIM(4), []
    latents = torch.randn(8, 5, 4, 8, 8, dtype=torch.float64)  # (N, T + 1, C, h, w): step 0 noise ... step 4 = x_0
    def knows_x0(x, t, context):
        seen.append(t)
        alpha_bar = ddim.alpha_bar[t].view(-1, 1, 1, 1)
        return (x - alpha_bar.sqrt() * latents[:, -1].repeat(2, 1, 1, 1)) / (1 - alpha_bar).sqrt()
    e = SimpleNamespace(latents=latents, context=torch.zeros(8, 77, 4), negative_context=torch.zeros(1, 77, 4),
                        advantages=torch.ones(8, dtype=torch.float64), rank=0, world=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        loss = train.rwr_step_loss(settings(algo="rwr"), knows_x0, None, ddim, e, torch.arange(8), None, gen)[0]
        assert loss < 1e-8  # float rounding; a wrong x_0 gives about 1
    t = torch.cat(seen)
    assert t.min() >= 0 and t.max() < 1000 and t.max() > 500 and len(t.unique()) > 50
    # Under torchrun the ranks hold other samples but draw from one generator: each keeps its share of the t and noise
    # drawn for every rank, so no two ranks denoise at the same t with the same noise. Alone, a process draws as before.
    def draws(rank, world):  # -> the t and the noise (what knows_x0 predicts) of each sample, twice (the guidance pair)
        calls = []
        def unet(x, t, context):
            calls.append((t, knows_x0(x, t, context)))
            return calls[-1][1]
        e_rank = SimpleNamespace(**{**vars(e), "rank": rank, "world": world})
        train.rwr_step_loss(settings(algo="rwr"), unet, None, ddim, e_rank, torch.arange(8), None,
                            torch.Generator().manual_seed(1))
        return calls[0]
    (t0, noise0), (t1, noise1) = draws(0, 2), draws(1, 2)
    assert (t0 != t1).float().mean() > 0.9 and not torch.isclose(noise0, noise1).any()
    assert torch.equal(draws(0, 1)[0], torch.randint(1000, (8,), generator=torch.Generator().manual_seed(1)).repeat(2))


@pytest.mark.parametrize("algo", ["rwr", "rwr-sparse"])
def test_rwr_runs(tmp_path, tiny_model_dir, algo):
    run_dir = run(tmp_path, tiny_model_dir, name="r", algo=algo, epochs=1)
    m = json.loads((run_dir / "metrics.jsonl").read_text())
    assert m["global_step"] == 2 and np.isfinite(m["loss"]) and m["loss"] > 0


# --- data parallel: two processes on CPU with gloo ------------------------------------------------------------------

def ddp_worker(rank, world, port, out, model_dir, kw):
    import os
    from nanoddpo.model import save_safetensors
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on two cores
    if "resume" in kw:  # continue a run under torchrun, as `torchrun ... train.py --resume runs/x --epochs N` does
        sd = train.main(*train.parse_settings(["--resume", kw["resume"], "--epochs", str(kw["epochs"])]))
    else:
        sd = train.main(settings(model=model_dir, out_dir=out, **kw), None)
    save_safetensors(sd.unet.state_dict(), f"{out}/rank{rank}.safetensors")


def test_two_processes_train_as_one(tmp_path, tiny_model_dir):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Adam's first step is lr * g / (|g| + eps): with eps >> |g| it is linear in the gradient, so float rounding in
    # gradients near zero cannot flip the sign of a whole lr-sized step and the comparison below is meaningful.
    kw = {**TINY_RUN, "name": "ddp", "batches_per_epoch": 1, "train_batch_size": 4, "epochs": 2, "lr": 1.0, "adam_eps": 1.0}
    mp.spawn(ddp_worker, args=(2, port, str(tmp_path / "ddp"), str(tiny_model_dir), kw), nprocs=2)
    r0, r1 = (load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # (a) the ranks never drift apart
    # --resume under torchrun: 1 epoch, then resume to 2, lands exactly where the uninterrupted run did
    mp.spawn(ddp_worker, args=(2, port + 2, str(tmp_path / "cut"), str(tiny_model_dir), {**kw, "epochs": 1}), nprocs=2)
    resumed = {"resume": str(tmp_path / "cut" / "ddp"), "epochs": 2}
    mp.spawn(ddp_worker, args=(2, port + 3, str(tmp_path / "cut"), str(tiny_model_dir), resumed), nprocs=2)
    again = load_file(tmp_path / "cut" / "rank0.safetensors")
    assert all(torch.equal(r0[k], again[k]) for k in r0)
    # (b) one epoch (one optimizer step) of 2 batches of 2 x 4 samples equals one process with the same 2 x 8 samples,
    # each trained on the same one of its 3 steps
    one = {**kw, "epochs": 1, "batches_per_epoch": 2, "grad_accum": 2, "timestep_fraction": 0.5}
    mp.spawn(ddp_worker, args=(2, port + 1, str(tmp_path / "one"), str(tiny_model_dir), one), nprocs=2)
    single = run(tmp_path / "single", tiny_model_dir, **{**one, "batch_size": 8, "train_batch_size": 8})
    ddp = load_file(tmp_path / "one" / "rank0.safetensors")
    ref = load_file(single / "checkpoints" / "step_1" / "unet.safetensors")
    base = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    update_ddp, update_ref = (torch.cat([(w[k] - base[k]).flatten() for k in base]) for w in (ddp, ref))
    assert update_ref.abs().max() > 1e-4
    # Equal up to float32 rounding of the weights themselves (an update of 1e-3 on a weight of 1 keeps ~4 digits).
    assert (update_ddp - update_ref).norm() / update_ref.norm() < 1e-4


# --- LoRA's initialisation, checkpoints and the collectives, each checked on its own ---------------------------------

def test_lora_starts_as_diffusers_lora_linear_layer(tiny_model_dir):
    """DDPO's code trained diffusers' LoRA attention processors, whose LoRALinearLayer starts the up matrix (B) at
    zero and draws the down matrix (A) from N(0, (1 / rank)^2): the same start here, layer by layer."""
    import warnings
    LoRALinearLayer = getattr(pytest.importorskip("diffusers.models.lora"), "LoRALinearLayer", None)
    if LoRALinearLayer is None:
        pytest.skip("this diffusers no longer has LoRALinearLayer")

    unet = StableDiffusion.from_pretrained(tiny_model_dir).unet
    torch.manual_seed(0)
    add_lora(unet, rank=4)
    layers = [m for m in unet.modules() if hasattr(m, "lora_A")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of peft, whose default init is another
        refs = [LoRALinearLayer(m.in_features, m.out_features, rank=4) for m in layers]
    for m, ref in zip(layers, refs):
        assert m.lora_A.weight.shape == ref.down.weight.shape and m.lora_B.weight.shape == ref.up.weight.shape
        assert torch.equal(m.lora_B.weight, ref.up.weight)  # zero: the fine-tuned model starts at the base
    ours, theirs = (torch.cat([w.flatten() for w in ws]) for ws in ([m.lora_A.weight for m in layers],
                                                                     [r.down.weight for r in refs]))
    assert len(ours) > 4000  # each standard deviation below is then within about 1% of the truth (one sigma)
    assert abs(ours.std() / theirs.std() - 1) < 0.05 and abs(ours.mean()) < 0.05 * theirs.std()


def test_checkpoints_keep_the_newest_and_resume_gives_back_the_optimizer_and_rng(tmp_path, tiny_model_dir):
    """save_checkpoint keeps the newest `keep` step_N folders and is not stopped by a killed save's temp folder;
    run_state reads the newest; resume() gives back torch's own optimizer state_dict and RNG state as they were when
    saved."""
    import copy
    from nanoddpo.checkpoint import checkpoints_of, resume, run_state, save_checkpoint

    def adam(sd):
        params = list(sd.unet.conv_out.parameters())
        return params, torch.optim.AdamW([p.requires_grad_(True) for p in params], lr=1e-3)

    sd = StableDiffusion.from_pretrained(tiny_model_dir)
    params, optimizer = adam(sd)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".tmp_step_5").mkdir(parents=True)  # left by a save killed half way through
    (run_dir / "checkpoints" / ".tmp_step_5" / "unet.safetensors").write_bytes(b"half")
    torch.manual_seed(0)
    for step in range(1, 6):
        sd.unet.conv_out(torch.randn(1, 32, 8, 8)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        saved, rng = copy.deepcopy(optimizer.state_dict()), torch.get_rng_state()
        save_checkpoint(run_dir, sd, False, optimizer, {"global_step": step, "epoch": step, "settings": {"lora": False}},
                        keep=3)
    assert [c.name for c in checkpoints_of(run_dir)] == ["step_3", "step_4", "step_5"]
    state, ckpt = run_state(run_dir)
    assert state["epoch"] == 5 and ckpt.name == "step_5"

    fresh = StableDiffusion.from_pretrained(tiny_model_dir)
    _, restored = adam(fresh)
    torch.manual_seed(123)  # moves the RNG away from the saved state
    resume(ckpt, fresh, restored)
    assert torch.equal(torch.get_rng_state(), rng)
    got = restored.state_dict()
    assert got["state"].keys() == saved["state"].keys()
    for i, moments in saved["state"].items():
        assert moments.keys() == got["state"][i].keys() and all(torch.equal(v, got["state"][i][k]) for k, v in moments.items())
    for group, saved_group in zip(got["param_groups"], saved["param_groups"]):
        assert {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} == \
               {k: list(v) if isinstance(v, tuple) else v for k, v in saved_group.items()}
    assert all(torch.equal(a, b) for a, b in zip(fresh.unet.state_dict().values(), sd.unet.state_dict().values()))


def test_resume_forgets_the_metrics_of_the_epochs_it_reruns(tmp_path):
    """A run killed after logging epochs 0-2 but checkpointed after 1 epoch (state.json: epoch 1) reruns epochs 1 and
    2: their lines go, so that each epoch is logged once."""
    from nanoddpo.checkpoint import forget_after

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"epoch": e, "reward_mean": e / 10}) + "\n" for e in range(3)))
    forget_after(metrics, 1)
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == [{"epoch": 0, "reward_mean": 0.0}]


def collectives_worker(rank, world, port, out):
    import os
    from nanoddpo.distributed import Ranks
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ranks = Ranks()
    # rank r's rewards of batch b, image i are 100 b + 10 r + i: 2 batches of 3 images on each rank
    local = torch.tensor([100 * b + 10 * rank + i for b in range(2) for i in range(3)], dtype=torch.float32)
    gathered = ranks.gather(local, batches=2)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.full((2,), float(rank + 1))
    ranks.average_gradients([p])
    torch.save({"gathered": torch.as_tensor(gathered), "grad": p.grad}, f"{out}/rank{rank}.pt")
    ranks.close()


def test_gather_is_in_batch_rank_image_order_and_gradients_are_averaged(tmp_path):
    """Every rank draws the whole epoch's prompts in the order (batch, rank, image) and takes its slice (Ranks.mine):
    the gathered rewards must come back in that order, with more than one batch per epoch. Gradients are the mean
    over ranks: ranks holding 1 and 2 get 1.5."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(collectives_worker, args=(2, port, str(tmp_path)), nprocs=2)
    expected = [100 * b + 10 * r + i for b in range(2) for r in range(2) for i in range(3)]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["gathered"].tolist() == expected
        assert result["grad"].tolist() == [1.5, 1.5]
