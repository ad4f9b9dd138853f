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
    python docs/penultimate_step.py --seeds                   # only the table of the runs so far
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
    """One row per way, means over its seeds: the reward in the first epoch (the base model's samples) and over the last
    3, the gain, the last 3 against the authors' way on the same seeds (paired, +- the SE over seeds); the tiny world's
    faithfulness in the first epoch and over the last 3; kl_to_base over the last 3; clipfrac over every epoch."""
    def mean(runs, key, epochs=slice(-3, None)):
        return np.mean([np.mean([m.get(key) or 0.0 for m in r[epochs]]) for r in runs])
    print(f"\n{'way':>8} {'seeds':>5} {'reward: first':>13} {'last 3':>8} {'gain':>7} {'vs authors':>17} "
          f"{'faithfulness: first':>19} {'last 3':>6} {'kl_to_base':>10} {'clipfrac':>8}")
    authors = results.get("authors", {})
    for way, by_seed in results.items():
        runs = list(by_seed.values())
        first, last3 = mean(runs, "reward_mean", slice(0, 1)), mean(runs, "reward_mean")
        paired = np.array([mean([r], "reward_mean") - mean([authors[seed]], "reward_mean")
                           for seed, r in by_seed.items() if seed in authors])
        se = paired.std(ddof=1) / np.sqrt(len(paired)) if len(paired) > 1 else float("nan")
        print(f"{way:>8} {len(runs):>5} {first:>13.4f} {last3:>8.4f} {last3 - first:>+7.4f} "
              f"{paired.mean() if len(paired) else np.nan:>+8.4f} +- {se:.4f} "
              f"{mean(runs, 'faithfulness', slice(0, 1)):>19.3f} {mean(runs, 'faithfulness'):>6.3f} "
              f"{mean(runs, 'kl_to_base'):>10.3g} {mean(runs, 'clipfrac', slice(None)):>8.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: print the table of --results")
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
