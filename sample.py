"""
Compare checkpoints: render the base model and fine-tuned checkpoints on the same prompts and seeds into one PNG grid
(a row per checkpoint, a column per prompt and seed), and print each checkpoint's mean reward.

    python sample.py                                   # base + the newest run's latest checkpoint, scored with its reward
    python sample.py --reward jpeg --per-prompt 2      # score every image; two seeds per prompt
    python sample.py --ckpt base runs/x/checkpoints/step_100 --prompts "a cat" "a dog" --steps 20

The base model is --model, else the one the checkpoints were trained on, else weights/stable-diffusion-v1-4 when
present, else the bundled weights/tiny. The prompts, DDIM steps, eta, guidance and the reward that scores the rows
default to what the checkpoints were trained with.
"""
import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from nanoddpo.cli import (IMAGE_SUFFIXES, Parser, UsageError, auto_precision, autocast_to, check_device,
                          check_output, keep_freed_memory, need, number, run)
from nanoddpo.checkpoint import apply_checkpoint, checkpoints_of, latest_run_checkpoint, trained, trained_base
from nanoddpo.ddim import sample
from nanoddpo.images import grid, to_uint8
from nanoddpo.model import StableDiffusion, resolve_model
from nanoddpo.prompts import load_prompts, spread
from nanoddpo.rewards import REWARDS, check_reward, get_reward

parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", nargs="+", help="checkpoint folders or run folders (their latest checkpoint); 'base' is "
                    "the base model. Default: base and the latest checkpoint of the newest run under runs/")
parser.add_argument("--model", help="base model: a folder in the published SD layout, or a single-file SD 1.x "
                    ".safetensors checkpoint. Default: the one the checkpoints were trained on, else "
                    "weights/stable-diffusion-v1-4 if downloaded, else weights/tiny")
parser.add_argument("--prompts", nargs="+", help="default: 4 spread over the prompts the checkpoints were trained on, "
                    "else over the model's prompts.json, else 4 animals")
parser.add_argument("--per-prompt", type=number(int), default=1, help="images per prompt, with seeds 0 .. per-prompt - 1")
parser.add_argument("--seeds", nargs="+", type=number(int), help="the seeds of each prompt's images instead (one image each); "
                    "the same seeds in every row")
parser.add_argument("--steps", type=number(int), help="DDIM steps; default: the steps the checkpoints were trained "
                    "with, else 50")
parser.add_argument("--eta", type=number(float), help="DDIM stochasticity in [0, 1]; default: the eta the checkpoints "
                    "were trained with, else 1")
parser.add_argument("--guidance", type=number(float), help="classifier-free guidance scale w; default: the one the "
                    "checkpoints were trained with, else 5")
parser.add_argument("--reward", nargs="+", help=f"score every image with each of these rewards ({', '.join(REWARDS)}, "
                    "or your own path/to/file.py:function); each row's mean is printed, and its paired difference "
                    "from the base row +- its standard error. Default: the reward the checkpoints were trained on; "
                    "none: no scores")
parser.add_argument("--scores", help="also write every image's scores to this JSON file")
parser.add_argument("--out", default="runs/compare.png", help="where to write the grid")
parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
parser.add_argument("--batch-size", type=number(int), default=8, help="images per sampling batch (the images do not "
                    "depend on it: each has its own seed)")


def main(args):
    need(args.steps is None or args.steps >= 1, "steps", args.steps, "must be at least 1")
    need(args.steps is None or args.steps <= 1000, "steps", args.steps,
         "must be at most 1000 (the schedule's training steps)")
    need(args.eta is None or 0 <= args.eta <= 1, "eta", args.eta, "must be in [0, 1]")
    need(args.guidance is None or args.guidance >= 0, "guidance", args.guidance, "must be 0 or more (1 is no guidance)")
    need(args.per_prompt >= 1, "per_prompt", args.per_prompt, "must be at least 1")
    need(all(0 <= seed < 2**63 for seed in args.seeds or []), "seeds", args.seeds, "must be 0 or more and below 2**63")
    need(args.batch_size >= 1, "batch_size", args.batch_size, "must be at least 1")
    check_device(args.device)
    check_output(args.out, "out", IMAGE_SUFFIXES)  # now, not after every image is sampled
    if args.scores:
        check_output(args.scores, "scores", (".json",))
    ckpts = args.ckpt or ["base"] + [str(c) for c in [latest_run_checkpoint()] if c is not None]
    for i, ckpt in enumerate(ckpts):
        need(ckpt == "base" or Path(ckpt).is_dir(), "ckpt", ckpt, "no such checkpoint or run folder")
        if ckpt != "base" and checkpoints_of(Path(ckpt)):  # a run folder stands for its latest checkpoint
            ckpts[i] = str(checkpoints_of(Path(ckpt))[-1])
        need(ckpt == "base" or Path(ckpts[i], "state.json").is_file(), "ckpt", ckpt, "holds no checkpoint: give a run "
             "folder with checkpoints/step_<N>, or a step_<N> folder")  # now, not after the rows before it
    trained_on = trained(ckpts, "base_model", None)  # by default, the base model they were trained on
    args.model = str(resolve_model(args.model or (trained_on and trained_base(trained_on, "the checkpoints were"))))
    print(f"base model: {args.model}")
    seeds = args.seeds or list(range(args.per_prompt))
    if None in (args.steps, args.eta, args.guidance):
        args.steps = trained(ckpts, "num_steps", 50) if args.steps is None else args.steps
        args.eta = trained(ckpts, "eta", 1.0) if args.eta is None else args.eta
        args.guidance = trained(ckpts, "guidance_scale", 5.0) if args.guidance is None else args.guidance
        why = "the defaults (no checkpoint)" if set(ckpts) == {"base"} else \
            "as the checkpoints were trained (else 50, 1, 5)"
        print(f"DDIM steps {args.steps}, eta {args.eta}, guidance {args.guidance}: {why}; --steps, --eta and --guidance "
              f"to change")
    prompts = args.prompts
    if not prompts:  # 4 spread over the prompts the checkpoints learned on ("": the model's prompts.json, else animals)
        try:
            prompts = spread(load_prompts(trained(ckpts, "prompts", ""), args.model)[0], 4)
        except UsageError as err:  # their prompt file has moved: say so, and take the model's own
            print(f"not the checkpoints' prompts: {err}; the model's own instead")
            prompts = spread(load_prompts("", args.model)[0], 4)
    args.reward = [] if args.reward == ["none"] else args.reward
    for name in args.reward or []:  # the rewards asked for, before the model loads
        need(name != "none", "reward", " ".join(args.reward), "none stands alone: no scores")
        check_reward(name, prompts)
    if args.reward is None and (own := trained(ckpts, "reward", None)):  # by default, what the checkpoints learned
        try:
            check_reward(own, prompts)
            args.reward = [own]
            print(f"reward: {own}, as the checkpoints were trained; --reward to choose others, --reward none for none")
        except UsageError as err:  # not asked for: say why and go on without it
            print(f"not scored with {own}, the checkpoints' reward: {err}")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    keep_freed_memory(device)  # on a CPU, large tensors reuse freed pages instead of faulting in fresh ones (cli.py)
    sd = StableDiffusion.from_pretrained(args.model, device=device)
    reward_fns = {name: get_reward(name) for name in args.reward or []}
    autocast = autocast_to(sd.device, auto_precision(sd.device))  # fp32 on a CPU: none
    # every column is one (prompt, seed) pair, rendered identically in every row
    column_prompts = [p for p in prompts for _ in seeds]
    column_seeds = [s for _ in prompts for s in seeds]
    base_unet, rows, scores = sd.unet, [], {}
    for ckpt in ckpts:
        sd.unet = copy.deepcopy(base_unet)
        if ckpt != "base":
            apply_checkpoint(sd, ckpt)  # refuses a checkpoint of another base model
        images = np.concatenate([to_uint8(sample(sd, column_prompts[i:i + args.batch_size],
                                                 column_seeds[i:i + args.batch_size], num_steps=args.steps,
                                                 guidance_scale=args.guidance, eta=args.eta, autocast=autocast).images)
                                 for i in range(0, len(column_prompts), args.batch_size)])
        rows.append(list(images))
        for name, reward_fn in reward_fns.items():
            r = scores.setdefault(name, {})[ckpt] = reward_fn(images, column_prompts).astype(np.float64)
            paired = ""
            if "base" in scores[name] and ckpt != "base":  # the same prompts and seeds: differences cancel the noise
                diff = r - scores[name]["base"]
                paired = f", {diff.mean():+.4f} +- {diff.std(ddof=1) / np.sqrt(len(diff)):.4f} paired against base"
            print(f"{ckpt}: mean {name} reward {r.mean():.4f} over {len(images)} images{paired}")
    labels = [f"#{s} {p}" if len(seeds) > 1 else p for p, s in zip(column_prompts, column_seeds)]  # seed first: long prompts get cut
    row_labels = [c if c == "base" else f"{Path(c).parent.parent.name}/{Path(c).name}" for c in ckpts]  # run/step_N
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    first = next(iter(scores), None)  # the grid shows the first reward under each image
    grid(rows, row_labels, labels, list(scores[first].values()) if first else None).save(args.out)
    print(f"wrote {args.out}" + (f", the {first} reward under each image" if first else ""))
    if args.scores:
        Path(args.scores).parent.mkdir(parents=True, exist_ok=True)
        every = {name: {ckpt: r.tolist() for ckpt, r in rows_of.items()} for name, rows_of in scores.items()}
        Path(args.scores).write_text(json.dumps(dict(prompts=column_prompts, seeds=column_seeds, steps=args.steps,
                                                     eta=args.eta, scores=every)))
        print(f"wrote {args.scores}")


if __name__ == "__main__":
    run("sample.py", lambda: main(parser.parse_args()), out_of_memory="lower --batch-size")
