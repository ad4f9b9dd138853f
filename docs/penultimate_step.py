"""
Does the penultimate DDIM step's clipping matter? train.py's approx_kl and clipfrac are nearly all that one step's
(docs/RESULTS.md, "Reading approx_kl and kl_to_base"): its Gaussian is narrow, so the same change of eps moves its
log-ratio about 8 times as far as at a middle step, and under the clip it is clipped almost always. This runs train.py
itself (its own main, losses and loop) three ways, on the same seeds, and compares what they learn:

  authors  train.py as it is: one clip range for every step;
  skip     the penultimate step never trains (its terms get advantage 0; the loss is still the mean over the batch);
  scaled   each step's clip range is scaled by that step's |d mean / d eps| / sigma over the median step's, so that it
           bounds the same change of eps at every step (the log-ratio of a taken step moves with that factor).

    python docs/penultimate_step.py                          # 3 ways x seeds 0-2 of the default run, about 25 min
    python docs/penultimate_step.py --seeds 0 --ways authors skip -- --epochs 2   # train.py flags after --
"""
import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from nanoddpo.ddim import DDIM  # noqa: E402

ddpo_step_loss, policy_loss = train.ddpo_step_loss, train.policy_loss


def steepness(num_steps, eta):
    """(T,) |d mean / d eps| / sigma of each DDIM step: the step's mean is affine in eps, so its slope is
    mean(eps = 1) - mean(eps = 0) (as docs/kl_by_step.py measures it)."""
    ddim, zero = DDIM(num_steps), torch.zeros(num_steps, 1)
    (mean_1, sigma), (mean_0, _) = (ddim.mean_and_sigma(eps, ddim.timesteps, zero, eta) for eps in (zero + 1, zero))
    return ((mean_1 - mean_0).abs() / sigma).flatten()


def run(way, argv, out):
    s, ckpt = train.parse_settings(argv + ["--out-dir", out, "--name", way])
    penultimate, scale = s.num_steps - 2, steepness(s.num_steps, s.eta)
    scale = scale / scale.median()
    current = {}

    def step_loss(s, unet, base_unet, ddim, e, rows, step, gen):
        current["step"] = step  # (B,) the DDIM step of each row of this batch
        return ddpo_step_loss(s, unet, base_unet, ddim, e, rows, step, gen)

    def changed_policy_loss(s, log_prob, old_log_prob, advantages):
        step = current["step"].to(advantages.device)
        if way == "skip":
            advantages = torch.where(step == penultimate, torch.zeros_like(advantages), advantages)
        elif way == "scaled":
            s = copy.copy(s)
            s.clip_range = s.clip_range * scale.to(advantages.device)[step]
        return policy_loss(s, log_prob, old_log_prob, advantages)

    train.ddpo_step_loss, train.policy_loss = step_loss, changed_policy_loss
    try:
        train.main(s, ckpt)
    finally:
        train.ddpo_step_loss, train.policy_loss = ddpo_step_loss, policy_loss
    return [json.loads(line) for line in (Path(out) / way / "metrics.jsonl").read_text().splitlines()]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ways", nargs="+", default=["authors", "skip", "scaled"], choices=["authors", "skip", "scaled"])
    p.add_argument("flags", nargs="*", help="train.py flags (default: --reward jpeg)")
    args = p.parse_args()
    results = {}  # way -> seed -> metrics by epoch
    for seed in args.seeds:
        for way in args.ways:
            with tempfile.TemporaryDirectory() as out:
                flags = (args.flags or ["--reward", "jpeg"]) + ["--seed", str(seed)]
                results.setdefault(way, {})[seed] = run(way, flags, out)
            last = results[way][seed][-1]
            print(f"seed {seed} {way}: epoch {last['epoch']} reward {last['reward_mean']:.4f}", flush=True)
    Path("runs").mkdir(exist_ok=True)
    Path("runs/penultimate_step.json").write_text(json.dumps(results))
    print(f"\n{'way':>8} {'first epoch':>12} {'last epoch':>11} {'last 3':>8} {'vs authors (last 3)':>20} "
          f"{'faithfulness':>12} {'kl_to_base':>10} {'clipfrac':>8}   (means over seeds {args.seeds}; +- SE)")
    authors = results.get("authors")
    for way, by_seed in results.items():
        runs = [by_seed[seed] for seed in args.seeds]
        first, last = (np.array([r[i]["reward_mean"] for r in runs]) for i in (0, -1))
        last3 = np.array([np.mean([m["reward_mean"] for m in r[-3:]]) for r in runs])
        paired = last3 - np.array([np.mean([m["reward_mean"] for m in authors[seed][-3:]]) for seed in args.seeds]) \
            if authors else last3 * np.nan
        se = paired.std(ddof=1) / np.sqrt(len(paired)) if len(paired) > 1 else float("nan")
        faith = np.mean([r[-1].get("faithfulness", np.nan) for r in runs])
        kl = np.mean([r[-1].get("kl_to_base") or 0 for r in runs])
        clip = np.mean([m["clipfrac"] for r in runs for m in r])
        print(f"{way:>8} {first.mean():>12.4f} {last.mean():>11.4f} {last3.mean():>8.4f} {paired.mean():>+12.4f} +- "
              f"{se:.4f} {faith:>12.3f} {kl:>10.3g} {clip:>8.3f}")


if __name__ == "__main__":
    main()
