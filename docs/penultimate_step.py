"""
Does the penultimate DDIM step's clipping matter, or its gradient? train.py's approx_kl and clipfrac are nearly all that
one step's (docs/RESULTS.md, "Reading approx_kl and kl_to_base"): its Gaussian is narrow, so the same change of eps
moves its log-ratio about 8 times as far as at a middle step (DDIM.steepness), and under the clip it is clipped almost
always. This runs train.py itself (its own main, losses and loop) four ways, on the same seeds, and compares what they
learn:

  authors   train.py as it is, the paper's loss;
  skip      the penultimate step never trains (its terms get advantage 0; the loss is still the mean over the batch);
  scaled    each step's clip range times its steepness over the median step's, so that it bounds the same change of
            eps at every step;
  balanced  train.py --balance-steps yes: each step's term divided by that same factor, so that every step's
            gradient has the same scale (a step's log-prob gradient w.r.t. eps grows with its steepness); all train.

    python docs/penultimate_step.py                          # 4 ways x seeds 0-2 of the default run, about 32 min
    python docs/penultimate_step.py --seeds 3 4 --ways authors balanced   # more runs into the same table
    python docs/penultimate_step.py --seeds 0 --ways authors skip -- --epochs 2   # train.py flags after --
    python docs/penultimate_step.py --keep runs/penultimate   # and keep the run folders, for sample.py
"""
import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from nanoddpo.ddim import DDIM  # noqa: E402

ddpo_step_loss, policy_loss = train.ddpo_step_loss, train.policy_loss


def run(way, argv, out):
    balanced = ["--balance-steps", "yes"] if way == "balanced" else []
    s, ckpt = train.parse_settings(argv + ["--out-dir", out, "--name", way] + balanced)
    penultimate, scale = s.num_steps - 2, DDIM(s.num_steps).steepness(s.eta)
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


def table(results):
    """One row per way: its runs' mean reward in the first and last epoch and over the last 3, the last 3 against the
    authors' way on the same seeds (paired, +- the SE over seeds), and at the last epoch the tiny world's faithfulness
    and kl_to_base; clipfrac over every epoch."""
    print(f"\n{'way':>8} {'seeds':>5} {'first epoch':>11} {'last epoch':>10} {'last 3':>8} {'vs authors (last 3)':>20} "
          f"{'faithfulness':>12} {'kl_to_base':>10} {'clipfrac':>8}")
    authors = results.get("authors", {})
    for way, by_seed in results.items():
        runs = list(by_seed.values())
        last3 = {seed: np.mean([m["reward_mean"] for m in r[-3:]]) for seed, r in by_seed.items()}
        paired = np.array([last3[seed] - np.mean([m["reward_mean"] for m in authors[seed][-3:]])
                           for seed in by_seed if seed in authors])
        se = paired.std(ddof=1) / np.sqrt(len(paired)) if len(paired) > 1 else float("nan")
        print(f"{way:>8} {len(runs):>5} {np.mean([r[0]['reward_mean'] for r in runs]):>11.4f} "
              f"{np.mean([r[-1]['reward_mean'] for r in runs]):>10.4f} {np.mean(list(last3.values())):>8.4f} "
              f"{paired.mean() if len(paired) else np.nan:>+12.4f} +- {se:.4f} "
              f"{np.mean([r[-1].get('faithfulness', np.nan) for r in runs]):>12.3f} "
              f"{np.mean([r[-1].get('kl_to_base') or 0 for r in runs]):>10.3g} "
              f"{np.mean([m['clipfrac'] for r in runs for m in r]):>8.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ways = ["authors", "skip", "scaled", "balanced"]
    p.add_argument("--ways", nargs="+", default=ways, choices=ways)
    p.add_argument("--results", default="runs/penultimate_step.json", help="every run's metrics by epoch; the runs "
                   "of an earlier call (give it the same train.py flags) are kept, and the table covers them all")
    p.add_argument("--keep", help="keep the run folders, <keep>/<way>-seed<N>, for sample.py (default: deleted)")
    p.add_argument("flags", nargs="*", help="train.py flags (default: --reward jpeg)")
    args = p.parse_args()
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.is_file() else {}  # way -> seed (a str, as JSON keys are) -> epochs
    for seed in args.seeds:
        for way in args.ways:
            with tempfile.TemporaryDirectory() as out:
                flags = (args.flags or ["--reward", "jpeg"]) + ["--seed", str(seed)]
                results.setdefault(way, {})[str(seed)] = run(way, flags, out)
                if args.keep:
                    shutil.copytree(Path(out) / way, Path(args.keep) / f"{way}-seed{seed}")
            last = results[way][str(seed)][-1]
            print(f"seed {seed} {way}: epoch {last['epoch']} reward {last['reward_mean']:.4f}", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results))
    table(results)


if __name__ == "__main__":
    main()
