"""Mutation check: does the test suite catch one-line bugs? (opt-in, about 30 minutes on 2 cores)

Each entry below is a plausible slip (a sign, a missing factor, an off-by-one, a dropped restore, the wrong
timestep, a default or a prompt that is not the authors') in diffusion math, RL math, the loop, the rewards or the
prompts. For each, a copy of the repository gets that one change and the tests of that file run; a mutant the tests
pass is MISSED, and a test should be written that fails it. Those the tests missed when first planted (twelve, then
24 more found by an audit against the authors' code) got the test that catches them.

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
    "nanoddpo/ddim.py": ["tests/test_2_ddim.py", "tests/test_3_train.py"],
    "nanoddpo/rewards.py": ["tests/test_4_rewards.py"],
    "nanoddpo/model.py": ["tests/test_1_model.py"],
    "nanoddpo/cpu_layers.py": ["tests/test_1_model.py"],
    "nanoddpo/cli.py": ["tests/test_6_bench.py"],
    "nanoddpo/images.py": ["tests/test_4_rewards.py"],
    "nanoddpo/learned_rewards.py": ["tests/test_4_rewards.py"],
    "nanoddpo/prompts.py": ["tests/test_4_prompts.py"],
}
DEFAULT_TESTS = ["tests/test_3_train.py"]

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
 ("train.py",
  "timesteps=max(1, int(s.num_steps * s.timestep_fraction))",
  "timesteps=max(1, int(s.num_steps * s.timestep_fraction) - 1)"),
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
 ("train.py", "micro = d.grad_accum * d.timesteps", "micro = d.grad_accum * s.num_steps"),
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
        failed = next((line[7:] for line in result.stdout.splitlines() if line.startswith("FAILED ")), "")
        print(f"M{i}: {'caught' if result.returncode else 'MISSED'}  {path}: {new.strip()[:70]!r}  {failed[:80]}",
              flush=True)
        missed += [] if result.returncode else [i]
    print(f"{len(missed)} missed: {missed}" if missed else "every mutant caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]]))
