"""Mutation check: does the test suite catch one-line bugs? (opt-in, about half an hour on 2 cores)

Each entry below is a plausible slip (a sign, a missing factor, an off-by-one, a dropped restore, the wrong
timestep, a default or a prompt that is not the authors') in diffusion math, RL math, the loop, the rewards or the
prompts. For each, a copy of the repository gets that one change and the tests of that file run; a mutant the tests
pass is MISSED, and a test should be written that fails it. Those the tests missed when first planted (twelve, then
24 more found by an audit against the authors' code, then 25 of the 58 planted in the model, single-file, LoRA,
checkpoint, export, data-parallel, tiny-world and sample.py code) got the test that catches them.

    python tests/mutants.py            # every mutant
    python tests/mutants.py 3 17       # some of them, by index
"""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = {  # which tests guard which file
    "nanoddpo/ddim.py": ["tests/test_2_ddim.py", "tests/test_3_train.py", "tests/test_3_train_trl.py"],
    "nanoddpo/rewards.py": ["tests/test_4_rewards.py"],
    "nanoddpo/model.py": ["tests/test_1_model.py"],
    "nanoddpo/cpu_layers.py": ["tests/test_1_model.py"],
    "nanoddpo/cli.py": ["tests/test_6_bench.py"],
    "nanoddpo/images.py": ["tests/test_4_rewards.py"],
    "nanoddpo/learned_rewards.py": ["tests/test_4_rewards.py"],
    "nanoddpo/prompts.py": ["tests/test_4_prompts.py"],
    "nanoddpo/single_file.py": ["tests/test_1_model_single_file.py"],
    "nanoddpo/export.py": ["tests/test_6_export.py"],
    "nanoddpo/world.py": ["tests/test_5_world.py"],
    "sample.py": ["tests/test_6_sample.py"],
    # The tests of these modules that do not need all of train.py's (a minute and a half): by name
    "nanoddpo/lora.py": ["tests/test_6_export.py", "tests/test_6_sample.py::test_lora_checkpoint_row",
                         *(f"tests/test_3_train.py::test_{name}" for name in (
                             "lora_starts_at_the_base_and_switches_off_to_it", "lora_rank_at_most_the_narrowest_projection",
                             "lora_on_sd_v1_4_trains_the_papers_797184_parameters",
                             "kl_penalty_with_lora_reaches_only_the_adapters", "lora_starts_as_diffusers_lora_linear_layer"))],
    "nanoddpo/checkpoint.py": ["tests/test_6_export.py", "tests/test_6_sample.py::test_only_step_folders_are_checkpoints",
                               "tests/test_6_sample.py::test_default_checkpoint_is_the_newest_runs_latest",
                               *(f"tests/test_3_train.py::test_{name}" for name in (
                                   "resume_continues_exactly", "resume_forgets_the_metrics_of_the_epochs_it_reruns",
                                   "checkpoints_keep_the_newest_and_resume_gives_back_the_optimizer_and_rng"))],
    "nanoddpo/distributed.py": [f"tests/test_3_train.py::test_{name}" for name in (
        "gather_is_in_batch_rank_image_order_and_gradients_are_averaged", "two_processes_train_as_one")],
}
DEFAULT_TESTS = ["tests/test_3_train.py", "tests/test_3_train_trl.py"]

MUTANTS = [  # (file, original text, mutated text); the original must occur exactly once
 ("nanoddpo/ddim.py", "num_train_steps, dtype=torch.float64) ** 2", "num_train_steps, dtype=torch.float64) ** 1"),
 ("nanoddpo/ddim.py", "* self.step_size + steps_offset", "* self.step_size + 0"),
 ("nanoddpo/ddim.py",
  "return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise",
  "return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t) * noise"),
 ("nanoddpo/ddim.py", "return eta * ((1 - alpha_bar_prev)", "return eta**2 * ((1 - alpha_bar_prev)"),
 ("nanoddpo/ddim.py", "(t - self.step_size).clamp(min=0))", "(t - self.step_size).clamp(min=1))"),
 ("nanoddpo/ddim.py",
  "(2 * sigma_t**2) - sigma_t.log() - LOG_SQRT_2PI",
  "(2 * sigma_t**2) + sigma_t.log() - LOG_SQRT_2PI"),
 ("nanoddpo/ddim.py", "(2 * sigma_t**2) - sigma_t.log() - LOG_SQRT_2PI", "(sigma_t**2) - sigma_t.log() - LOG_SQRT_2PI"),
 ("nanoddpo/ddim.py", "(2 * sigma_t**2) - sigma_t.log() - LOG_SQRT_2PI", "(2 * sigma_t**2) - sigma_t.log()"),
 ("nanoddpo/ddim.py", "return x_prev, log_prob.mean(dim", "return x_prev, log_prob.sum(dim"),
 ("nanoddpo/ddim.py", "* eps) / alpha_bar_t.sqrt()", "* eps) / alpha_bar_t"),
 ("nanoddpo/ddim.py", "(1 - alpha_bar_prev - sigma_t**2).sqrt() * eps", "(1 - alpha_bar_prev).sqrt() * eps"),
 ("nanoddpo/ddim.py",
  "return ((mean - mean_base) ** 2 / (2 * sigma_t**2))",
  "return ((mean - mean_base) ** 2 / (sigma_t**2))"),
 ("nanoddpo/ddim.py",
  "return eps_uncond + guidance_scale * (eps_cond - eps_uncond)",
  "return eps_cond + guidance_scale * (eps_cond - eps_uncond)"),
 ("nanoddpo/ddim.py",
  "torch.cat([negative_context.expand(batch, -1, -1), context])",
  "torch.cat([context, negative_context.expand(batch, -1, -1)])"),
 ("nanoddpo/ddim.py",
  "x_prev = x_prev_mean + sigma_t * (torch.randn_like",
  "x_prev = x_prev_mean + 0.5 * sigma_t * (torch.randn_like"),
 ("nanoddpo/ddim.py",
  "x_t, log_prob = ddim.step(eps, t, x_t, eta=eta, noise=noise[:, j + 1])",
  "x_t, log_prob = ddim.step(eps, t, x_t, eta=eta, noise=noise[:, j])"),
 ("train.py", "log_ratio = log_prob - old_log_prob", "log_ratio = old_log_prob - log_prob"),
 ("train.py",
  "torch.clamp(ratio, 1 - s.clip_range, 1 + s.clip_range)",
  "torch.clamp(ratio, 1 - s.clip_range, 1 + 2 * s.clip_range)"),
 ("train.py", "pg_loss = torch.max(pg_loss1, pg_loss2).mean()", "pg_loss = torch.min(pg_loss1, pg_loss2).mean()"),
 ("train.py", "pg_loss = -(advantages * log_prob).mean()", "pg_loss = (advantages * log_prob).mean()"),
 ("train.py", "approx_kl = 0.5 * (log_ratio**2).mean()", "approx_kl = (log_ratio**2).mean()"),
 ("train.py", "clipfrac = ((ratio - 1).abs() > s.clip_range)", "clipfrac = ((ratio - 1).abs() >= s.clip_range)"),
 ("train.py",
  "out[ok] = np.clip(z, -s.adv_clip_max, s.adv_clip_max)",
  "out[ok] = np.clip(z, -s.adv_clip_max, 2 * s.adv_clip_max)"),
 ("train.py", "(r - r.mean()) / (r.std() + 1e-8)", "(r - r.mean())"),
 ("train.py", "out[ok] = w / w.sum() * len(r)", "out[ok] = w / w.sum()"),
 ("train.py", "w = np.exp(s.rwr_beta * (r - r.max()))", "w = np.exp((r - r.max()) / max(s.rwr_beta, 1e-9))"),
 ("train.py",
  "out[ok] = r >= np.quantile(r, 1 - s.rwr_top_fraction)",
  "out[ok] = r >= np.quantile(r, s.rwr_top_fraction)"),
 ("train.py", "            del buffer[: -self.buffer_size]\n", "            del buffer[: -self.buffer_size - 1]\n"),
 ("train.py",
  "stats = np.array(buffer) if len(buffer) >= self.min_count else rewards",
  "stats = np.array(buffer) if len(buffer) > self.min_count else rewards"),
 ("train.py", "loss = loss + s.kl_coef * ddim.kl(", "loss = loss - s.kl_coef * ddim.kl("),
 ("train.py",
  "x_t, x_prev, t = e.latents[rows, step], e.latents[rows, step + 1], ddim.timesteps[step]",
  "x_t, x_prev, t = e.latents[rows, step], e.latents[rows, step + 1], ddim.timesteps[step - 1]"),
 ("train.py",
  "loss, approx_kl, clipfrac = policy_loss(s, log_prob, e.old_log_probs[rows, step], e.advantages[rows])",
  "loss, approx_kl, clipfrac = policy_loss(s, log_prob, e.old_log_probs[rows, step - 1], e.advantages[rows])"),
 ("train.py",
  "return (e.advantages[rows] * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean(), zero, zero",
  "return (((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean(), zero, zero"),
 ("train.py", "scaler.scale(loss / micro).backward()", "scaler.scale(loss / d.grad_accum).backward()"),
 ("train.py",
  "torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)",
  "torch.nn.utils.clip_grad_norm_(params, 10 * s.max_grad_norm)"),
 ("train.py",
  "eps_base = guided_eps(base_unet, x_t, t, context, e.negative_context, s.guidance_scale)",
  "eps_base = guided_eps(unet, x_t, t, context, e.negative_context, s.guidance_scale)"),
 ("nanoddpo/lora.py", "            m.lora_scale = scale", "            pass"),
 ("nanoddpo/lora.py", "m.lora_scale = m.lora_zero", "m.lora_scale = m.lora_scale"),
 ("nanoddpo/ddim.py", "t_in = t.expand(batch).repeat(2)", "t_in = t.expand(batch).repeat_interleave(2)"),
 ("train.py", "rows, perms[rows, j], gen)", "rows, perms[rows, 0], gen)"),
 ("train.py",
  "advantages = compute_advantages(s, tracker, list(all_prompts.flat), rewards).reshape",
  "advantages = compute_advantages(s, tracker, list(all_prompts.flat), rewards[::-1].copy()).reshape"),
 ("train.py",
  "x_t, t, context = e.latents[rows, step], ddim.timesteps[step], e.context[rows]",
  "x_t, t, context = e.latents[rows, step], ddim.timesteps[step - 1], e.context[rows]"),
 ("train.py",
  "_, log_prob = ddim.step(eps, t, x_t, eta=s.eta, x_prev=x_prev)",
  "_, log_prob = ddim.step(eps, t, x_t, eta=1.0, x_prev=x_prev)"),
 ("train.py", "if n % micro == 0:", "if n % d.grad_accum == 0:"),
 ("nanoddpo/settings.py",
  "timesteps_trained=max(1, int(s.num_steps * s.timestep_fraction))",
  "timesteps_trained=max(1, int(s.num_steps * s.timestep_fraction) - 1)"),
 ("train.py",
  "eps = guided_eps(unet, x_t, t, e.context[rows], e.negative_context, s.guidance_scale)\n    _, log_prob",
  "eps = guided_eps(unet, x_t, t, e.context[rows], e.negative_context, 1.0)\n    _, log_prob"),
 ("nanoddpo/distributed.py",
  "return x[:, self.rank].reshape(-1, *x.shape[3:])",
  "return x[:, 0].reshape(-1, *x.shape[3:])"),
 ("train.py",
  "perms = torch.stack([torch.randperm(s.num_steps, generator=gen) for _ in range(d.samples_per_epoch)])",
  "perms = torch.stack([torch.arange(s.num_steps) for _ in range(d.samples_per_epoch)])"),
 ("nanoddpo/rewards.py",
  "Image.fromarray(img).save(buf, format=\"JPEG\", quality=quality)",
  "Image.fromarray(img).save(buf, format=\"JPEG\", quality=75)"),
 ("nanoddpo/rewards.py", "sizes.append(buf.tell() / 1000)", "sizes.append(buf.tell() / 1024)"),
 ("train.py", "return torch.cat(kls).mean().item()", "return torch.cat(kls).sum().item()"),
 ("nanoddpo/cpu_layers.py",
  "kept[1] != (weight._version, weight.data_ptr())",
  "kept[1][1] != weight.data_ptr()"),
 ("nanoddpo/cpu_layers.py", "conv2d_input(shape, weight, grad, stride, padding)", "conv2d_input(shape, weight, grad, 1, padding)"),
 ("nanoddpo/cpu_layers.py",
  "return _mm(x, weight if blocked is None else blocked, bias)",
  "return _mm(x, weight if blocked is None else blocked, None)"),
 ("nanoddpo/cpu_layers.py",
  "x.numel() > KEPT_MAX_POSITIONS * weight.shape[1]",
  "x.numel() > 2 * KEPT_MAX_POSITIONS * weight.shape[1]"),
 ("nanoddpo/cpu_layers.py", "        _kept.pop(layer, None)\n", "        pass\n"),
 ("nanoddpo/cpu_layers.py", "weight.flatten(1), bias)  # (B H' W', C_out)", "weight.flatten(1))  # (B H' W', C_out)"),
 ("nanoddpo/cpu_layers.py",
  "padding=padding, stride=stride)\n",
  "padding=padding, stride=1)\n"),
 ("nanoddpo/cpu_layers.py", "height = (x.shape[-2] + 2 * padding[0]", "height = (x.shape[-1] + 2 * padding[0]"),
 ("nanoddpo/cli.py", "libc.mallopt(M_MMAP_MAX, 0)", "libc.mallopt(M_MMAP_MAX, 65536)"),
 ("nanoddpo/cli.py", "libc.mallopt(M_TRIM_THRESHOLD, -1)", "libc.mallopt(M_TRIM_THRESHOLD, 0)"),
 ("nanoddpo/cpu_layers.py", "self.kernel_size == (1, 1) or self.groups", "self.groups"),
 ("nanoddpo/cpu_layers.py", "x if ctx.needs_input_grad[1] else None", "x"),
 ("nanoddpo/cpu_layers.py",
  "(weight.requires_grad or layer.bias is not None and layer.bias.requires_grad)",
  "weight.requires_grad"),
 ("nanoddpo/cpu_layers.py", "grad.sum(0) if ctx.needs_input_grad[2]", "grad.mean(0) if ctx.needs_input_grad[2]"),
 ("nanoddpo/cpu_layers.py", "_mm(grad.transpose(0, 1).reshape(grad.shape[1], -1),", "_mm(grad.reshape(grad.shape[1], -1),"),
 ("train.py", "dtype=dtype if lora else torch.float32)", "dtype=dtype)"),
 ("train.py", "m.to(dtype) if isinstance(m, (nn.Conv2d, nn.Linear)) else None", "m.to(dtype)"),
 # found by an audit against the authors' code (2026-11-26, seventh session): each was missed before its test
 ("train.py", "micro = d.grad_accum * d.timesteps_trained", "micro = d.grad_accum * s.num_steps"),
 ("train.py", "order = torch.randperm(d.local_samples, generator=gen).to(device)",
  "order = torch.arange(d.local_samples).to(device)"),
 ("train.py", "for _ in range(d.inner_epochs):", "for _ in range(s.num_inner_epochs):"),
 ("train.py", "t = torch.randint(ddim.alpha_bar.numel()", "t = torch.randint(ddim.num_steps"),
 ("train.py", "x0 = e.latents[rows, -1]", "x0 = e.latents[rows, 0]"),
 ("train.py", "out[ok] = np.clip(z, -s.adv_clip_max, s.adv_clip_max)", "out[ok] = np.minimum(z, s.adv_clip_max)"),
 ("train.py", "(r.std() + 1e-8)", "(r.std() + 1e-6)"),
 ("train.py", "weight_decay: float = 1e-4", "weight_decay: float = 1e-2"),
 ("train.py", "adam_beta2: float = 0.999", "adam_beta2: float = 0.99"),
 ("train.py", "clip_range: float = 1e-4", "clip_range: float = 1e-3"),
 ("train.py", "lr: float = 3e-4", "lr: float = 1e-4"),
 ("train.py", "adv_clip_max: float = 5.0", "adv_clip_max: float = 10.0"),
 ("train.py", "max_grad_norm: float = 1.0", "max_grad_norm: float = 10.0"),
 ("train.py", '"jpeg": dict(prompts="imagenet_animals")', '"jpeg": dict(prompts="simple_animals")'),
 ("train.py", '"alignment": dict(prompts="animals_activities", stat_buffer=32',
  '"alignment": dict(prompts="animals_activities", stat_buffer=16'),
 ("train.py", '"lr": 1e-5', '"lr": 3e-4'),
 ("train.py", "batches_per_epoch=18,", "batches_per_epoch=16,"),
 ("train.py", "if not torch.stack([p.isfinite().all() for p in params]).all():",
  "if False and torch.stack([p.isfinite().all() for p in params]).all():"),
 ("nanoddpo/images.py", "(images.float() * 255).round().clamp(0, 255)", "(images.float() * 255).clamp(0, 255)"),
 ("nanoddpo/learned_rewards.py", 'format="JPEG", quality=80)', 'format="JPEG", quality=95)'),
 ("nanoddpo/learned_rewards.py", 'QUESTION = "Answer concisely: what is going on in this image?"',
  'QUESTION = "Answer concisely: what is in this image?"'),
 ("nanoddpo/learned_rewards.py", 'f"USER: <image>\\n{QUESTION} ASSISTANT:"', 'f"USER: <image>\\n{QUESTION}\\nASSISTANT:"'),
 ("nanoddpo/learned_rewards.py", "dtype=None, max_new_tokens=64):", "dtype=None, max_new_tokens=32):"),
 ("nanoddpo/prompts.py", '"washing the dishes"', '"washing dishes"'),
 ("nanoddpo/prompts.py", '"raccoon"', '"racoon"'),
 # the files that had none: the model, single-file layout, LoRA, checkpoints, export, data parallelism, the tiny
 # world and sample.py
 ("nanoddpo/model.py", "out = F.scaled_dot_product_attention(q, k, v)\n",
  "out = F.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)\n"),
 ("nanoddpo/model.py", "F.scaled_dot_product_attention(q, k, v)[:, 0]",
  "F.scaled_dot_product_attention(q, k, v, scale=1.0)[:, 0]"),
 ("nanoddpo/model.py", "is_causal=True)", "is_causal=False)"),
 ("nanoddpo/model.py", 'if act == "quick_gelu" else F.gelu', 'if act == "gelu" else F.gelu'),
 ("nanoddpo/model.py", "return value * F.gelu(gate)", "return gate * F.gelu(value)"),
 ("nanoddpo/model.py", "return value * F.gelu(gate)", 'return value * F.gelu(gate, approximate="tanh")'),
 ("nanoddpo/model.py", "[cos, sin] if flip_sin_to_cos else [sin, cos]", "[sin, cos] if flip_sin_to_cos else [cos, sin]"),
 ("nanoddpo/model.py", "/ (half - shift))", "/ (dim - shift))"),
 ("nanoddpo/model.py", "res = lambda cin, cout: ResnetBlock(cin, cout, groups, 1e-6)",
  "res = lambda cin, cout: ResnetBlock(cin, cout, groups, 1e-5)"),
 ("nanoddpo/model.py", "self.norm = GroupNorm(channels, groups, 1e-6)", "self.norm = GroupNorm(channels, groups, 1e-5)"),
 ("nanoddpo/model.py", "self.conv_norm_out = GroupNorm(ch[0], groups, eps)",
  "self.conv_norm_out = GroupNorm(ch[0], groups, 1e-6)"),
 ("nanoddpo/model.py", "return tm.final_layer_norm(x)", "return x"),
 ("nanoddpo/model.py", 'scale_factor=2.0, mode="nearest")', 'scale_factor=2.0, mode="bilinear")'),
 ("nanoddpo/model.py", "torch.cat([h, skips[j]], dim=1)", "torch.cat([skips[j], h], dim=1)"),
 ("nanoddpo/model.py", "x = F.pad(x, (0, 1, 0, 1))", "x = F.pad(x, (1, 0, 1, 0))"),
 ("nanoddpo/model.py", 'vae_cfg.get("scaling_factor", 0.18215)', 'vae_cfg.get("scaling_factor", 1.0)'),
 ("nanoddpo/model.py", 'f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)', 'f = 2 ** len(vae_cfg["block_out_channels"])'),
 ("nanoddpo/model.py", "return self.quant_conv(h).chunk(2, dim=1)[0]", "return self.quant_conv(h).chunk(2, dim=1)[1]"),
 ("nanoddpo/single_file.py", '"conv2": "out_layers.3"', '"conv2": "out_layers.2"'),
 ("nanoddpo/single_file.py", "k = 1 + i * (layers + 1) + j", "k = i * (layers + 1) + j"),
 ("nanoddpo/single_file.py", "{2 if attention else 1}.conv", "{1 if attention else 2}.conv"),
 ("nanoddpo/single_file.py", 'f"decoder.up.{n - 1 - i}.block.{j}"', 'f"decoder.up.{i}.block.{j}"'),
 ("nanoddpo/single_file.py", "v[:, :, None, None] if is_attention else v", "v"),
 ("nanoddpo/single_file.py", 'unused_unet = UNET if ema and has_ema else EMA', 'unused_unet = EMA'),
 ("nanoddpo/lora.py", "self.lora_scale * self.lora_B.weight)",
  "self.lora_scale * self.lora_B.weight / self.lora_B.in_features)"),
 ("nanoddpo/lora.py", "nn.init.zeros_(module.lora_B.weight)", "nn.init.zeros_(module.lora_A.weight)"),
 ("nanoddpo/lora.py", "std=1 / rank)", "std=1 / rank**0.5)"),
 ("nanoddpo/lora.py", 'TARGETS = ("to_q", "to_k", "to_v", "to_out.0")', 'TARGETS = ("to_q", "to_k", "to_v")'),
 ("nanoddpo/lora.py", "ranks = {v.shape[0] for k, v", "ranks = {v.shape[1] for k, v"),
 ("nanoddpo/checkpoint.py", "sorted(found, key=lambda p: int(p.name[5:]))", "sorted(found)"),
 ("nanoddpo/checkpoint.py", "max(found, key=lambda c: c.stat().st_mtime)", "min(found, key=lambda c: c.stat().st_mtime)"),
 ("nanoddpo/checkpoint.py", "checkpoints_of(run_dir)[:-keep]", "checkpoints_of(run_dir)[:-keep - 1]"),
 ("nanoddpo/checkpoint.py", "    shutil.rmtree(tmp, ignore_errors=True)\n", ""),
 ("nanoddpo/checkpoint.py", 'saved = ckpts[-1] / "state.json" if ckpts', 'saved = ckpts[0] / "state.json" if ckpts'),
 ("nanoddpo/checkpoint.py", "moments.setdefault(int(i), {})[name] = value", "moments.setdefault(i, {})[name] = value"),
 ("nanoddpo/checkpoint.py", '    torch.set_rng_state(rng["torch"])\n', ""),
 ("nanoddpo/checkpoint.py", '["epoch"] < start_epoch]', '["epoch"] <= start_epoch]'),
 ("nanoddpo/export.py", 'name = "lora_unet_" + layer.replace(".", "_")', 'name = "lora_unet_" + layer'),
 ("nanoddpo/export.py", "torch.tensor(float(A.shape[0]))", "torch.tensor(1.0)"),
 ("nanoddpo/export.py", '"ss_network_alpha": str(rank)', '"ss_network_alpha": "1"'),
 ("nanoddpo/export.py", "    if step is None:\n        return ckpts[-1]", "    if step is None:\n        return ckpts[0]"),
 ("nanoddpo/export.py", 'scheduler = Path(base) / "scheduler" / "scheduler_config.json"',
  'scheduler = SD_V1 / "scheduler_config.json"'),
 ("nanoddpo/distributed.py", "op=dist.ReduceOp.AVG", "op=dist.ReduceOp.SUM"),
 ("nanoddpo/distributed.py", "x = torch.cat(parts, dim=1).cpu()", "x = torch.cat(parts, dim=0).cpu()"),
 ("nanoddpo/distributed.py", "x = torch.as_tensor(local).view(batches, 1, -1)", "x = torch.as_tensor(local).view(1, batches, -1)"),
 ("nanoddpo/world.py", "h = 2 + (b - r) / (mx - mn)", "h = 2 + (r - b) / (mx - mn)"),
 ("nanoddpo/world.py", 'range(ord("®"), ord("ÿ") + 1)', 'range(ord("®"), ord("ÿ"))'),
 ("nanoddpo/world.py", "coverage * rgb + (1 - coverage) * grey", "coverage * grey + (1 - coverage) * rgb"),
 ("nanoddpo/world.py", "scores.append(np.mean([found[k] == v", "scores.append(np.all([found[k] == v"),
 ("nanoddpo/world.py", "SHAPES[(a + b) % 4], BACKGROUNDS[a])", "SHAPES[b], BACKGROUNDS[a])"),
 ("sample.py", "sd.unet = copy.deepcopy(base_unet)", "sd.unet = base_unet"),
 ("sample.py", "seeds = args.seeds or list(range(args.per_prompt))", "seeds = args.seeds or list(range(1, args.per_prompt + 1))"),
 ("sample.py", "column_seeds = [s for _ in prompts for s in seeds]", "column_seeds = [s for s in seeds for _ in prompts]"),
 ("sample.py", 'trained(ckpts, "guidance_scale", 5.0)', 'trained(ckpts, "guidance_scale", 7.5)'),
 ("sample.py", 'trained(ckpts, "eta", 1.0)', 'trained(ckpts, "eta", 0.0)'),
 ("sample.py", 'trained(ckpts, "num_steps", 50)', 'trained(ckpts, "num_steps", 20)'),
 ("sample.py", "diff.std(ddof=1)", "diff.std()"),
 ("sample.py", 'diff = r - scores[name]["base"]', 'diff = scores[name]["base"] - r'),
]


def main(indices):
    missed = []
    for i in indices or range(len(MUTANTS)):
        path, old, new = MUTANTS[i]
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "repo"
            shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".whl"))
            text = (copy / path).read_text()
            if text.count(old) != 1:
                print(f"M{i}: the original text occurs {text.count(old)} times in {path}: update this list", flush=True)
                missed.append(i)
                continue
            (copy / path).write_text(text.replace(old, new))
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                     *TESTS.get(path, DEFAULT_TESTS)], cwd=copy, capture_output=True, text=True)
        if result.returncode in (4, 5):  # pytest found no such test, or none: a renamed test in TESTS, not a catch
            print(f"M{i}: the tests named for {path} were not found: update TESTS\n{result.stdout[-300:]}", flush=True)
            missed.append(i)
            continue
        failed = next((line[7:] for line in result.stdout.splitlines() if line.startswith("FAILED ")), "")
        print(f"M{i}: {'caught' if result.returncode else 'MISSED'}  {path}: {new.strip()[:70]!r}  {failed[:80]}",
              flush=True)
        missed += [] if result.returncode else [i]
    print(f"{len(missed)} missed: {missed}" if missed else "every mutant caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]]))
