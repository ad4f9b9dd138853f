"""
Where train.py's approx_kl and clipfrac come from, DDIM step by DDIM step.

Runs train.py as given (its own main, losses and loop) and records, for every trained (sample, step) pair, the log-ratio
log p_theta(x_prev | x_t) - log p_old(x_prev | x_t) that its DDPO loss saw. Prints one row per DDIM step: the step's
sigma, how far a change of eps moves the step's mean in units of sigma (|d mean / d eps| / sigma: the step's KL for a change of
eps grows with its square), the mean approx_kl (0.5 log_ratio^2) and clipfrac there, and each step's share of the epoch's
approx_kl. Ratios are 1 until the epoch's first optimizer step, so those calls are counted apart. Last, the KL to the
base model that train.py estimates from one random step per trajectory (kl_to_base): its draws at each step, their mean
and their share of the sum.

    python docs/kl_by_step.py                                  # the tiny preset's first epoch, about 15 s
    python docs/kl_by_step.py --reward jpeg --epochs 3         # any train.py flags (default: --reward jpeg --epochs 1)
"""
import collections
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from nanoddpo.ddim import DDIM  # noqa: E402

log_ratios = collections.defaultdict(list)  # DDIM step index -> log-ratios after the epoch's first optimizer step
before_update = collections.defaultdict(list)  # the same before it: exactly 0 in fp32 (the policy that sampled)
kl_to_base = collections.defaultdict(list)  # timestep -> train.py's KL-to-base estimates drawn at it
state = {"steps": None, "updated": False}
ddpo_step_loss, policy_loss, sample, measure_kl_to_base, adamw_step = (
    train.ddpo_step_loss, train.policy_loss, train.sample, train.kl_to_base, torch.optim.AdamW.step)


def recording_step_loss(s, unet, base_unet, ddim, e, rows, step, gen):
    state["steps"] = step.tolist()  # (B,) DDIM step indices of this batch
    return ddpo_step_loss(s, unet, base_unet, ddim, e, rows, step, gen)


def recording_policy_loss(s, log_prob, old_log_prob, advantages):
    into = log_ratios if state["updated"] else before_update
    for j, r in zip(state["steps"], (log_prob - old_log_prob).tolist()):
        into[j].append(r)
    return policy_loss(s, log_prob, old_log_prob, advantages)


def counting_step(self, *args, **kwargs):
    state["updated"] = True
    return adamw_step(self, *args, **kwargs)


def recording_kl_to_base(s, unet, base_unet, ddim, e, gen):
    kl = ddim.kl  # kl_to_base draws one step per trajectory and averages ddim.kl over them: keep each with its t

    def recording_kl(eps, eps_base, t, x_t, eta=1.0):
        out = kl(eps, eps_base, t, x_t, eta)
        for step, value in zip(t.tolist(), out.tolist()):
            kl_to_base[step].append(value)
        return out
    ddim.kl = recording_kl
    try:
        return measure_kl_to_base(s, unet, base_unet, ddim, e, gen)
    finally:
        del ddim.kl


def recording_sample(*args, **kwargs):
    state["updated"] = False  # a new epoch samples with the current policy: its ratios start at 1 again
    return sample(*args, **kwargs)


def main(argv):
    argv = argv or ["--reward", "jpeg", "--epochs", "1"]
    with tempfile.TemporaryDirectory() as out:
        s, ckpt = train.parse_settings(argv + ["--out-dir", out])
        if s.algo not in ("ppo", "reinforce"):
            sys.exit(f"kl_by_step: --algo {s.algo} has no log-ratios; use ppo (DDPO_IS) or reinforce (DDPO_SF)")
        train.ddpo_step_loss, train.policy_loss = recording_step_loss, recording_policy_loss
        train.sample, train.kl_to_base, torch.optim.AdamW.step = recording_sample, recording_kl_to_base, counting_step
        train.main(s, ckpt)
    ddim = DDIM(s.num_steps)
    total = sum(0.5 * np.square(v).sum() for v in log_ratios.values())
    count = sum(len(v) for v in log_ratios.values())
    zero = all(r == 0 for v in before_update.values() for r in v)
    n_before = sum(len(v) for v in before_update.values())
    print(f"\n{n_before} trained steps before an epoch's first optimizer step, all log-ratios "
          f"{'exactly 0' if zero else 'NOT 0'}; after it, {count} (mean approx_kl {total / max(count, 1):.4g}):")
    base_total = sum(sum(v) for v in kl_to_base.values())
    print(f"{'step':>4} {'t -> t_prev':>12} {'sigma':>7} {'|dmean/deps|/sigma':>18} {'approx_kl':>10} {'clipfrac':>8} "
          f"{'max |log-ratio|':>15} {'share of kl':>11} {'kl_to_base':>10} {'(draws)':>7} {'share':>6}")
    steepness, sigmas = ddim.steepness(s.eta), ddim.sigma(ddim.timesteps, s.eta)  # |d mean / d eps| / sigma
    for j in range(s.num_steps):
        t, sigma = ddim.timesteps[j], sigmas[j].item()
        r = np.array(log_ratios[j]) if log_ratios[j] else np.zeros(1)
        kl = 0.5 * np.square(r)
        print(f"{j:>4} {int(t):>5} -> {max(int(t) - ddim.step_size, 0):>4} {sigma:>7.4f} {steepness[j].item():>18.2f} "
              f"{kl.mean():>10.3g} {(np.abs(np.expm1(r)) > s.clip_range).mean():>8.3f} {np.abs(r).max():>15.3g} "
              f"{kl.sum() / max(total, 1e-30):>11.1%} {np.mean(kl_to_base[int(t)] or [0]):>10.3g} "
              f"{len(kl_to_base[int(t)]):>7} {sum(kl_to_base[int(t)]) / max(base_total, 1e-30):>6.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
