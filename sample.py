"""
Compare checkpoints: render the base model and fine-tuned checkpoints on the same prompts and seeds into one PNG grid
(a row per checkpoint, a column per prompt and seed), and print each checkpoint's mean reward.

    python sample.py                                   # base model + latest checkpoint of the newest run under runs/
    python sample.py --reward jpeg --per-prompt 2      # score every image; two seeds per prompt
    python sample.py --ckpt base runs/x/checkpoints/step_100 --prompts "a cat" "a dog" --steps 20

The base model is --model, else weights/stable-diffusion-v1-4 when present, else the bundled weights/tiny.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

from nanoddpo.checkpoint import apply_checkpoint, checkpoints_of, latest_run_checkpoint
from nanoddpo.ddim import sample
from nanoddpo.images import grid, to_uint8
from nanoddpo.model import LoadError, StableDiffusion, resolve_model
from nanoddpo.rewards import REWARDS, get_reward

DEFAULT_PROMPTS = ["a cat", "a dog", "a horse", "a monkey"]  # DDPO's "simple animals", used when the model has no prompts.json

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", nargs="+", help="checkpoint folders or run folders (their latest checkpoint); 'base' is "
                    "the base model. Default: base and the latest checkpoint of the newest run under runs/")
parser.add_argument("--model", help="base model: a folder in the published SD layout, or a single-file SD 1.x "
                    ".safetensors checkpoint")
parser.add_argument("--prompts", nargs="+", help="default: 4 spread over the model's prompts.json, else 4 animals")
parser.add_argument("--per-prompt", type=int, default=1, help="images per prompt, with seeds 0 .. per-prompt - 1")
parser.add_argument("--seeds", nargs="+", type=int, help="the seeds of each prompt's images instead (one image each); "
                    "the same seeds in every row")
parser.add_argument("--steps", type=int, help="DDIM steps (eta = 1, as in training); default: the steps the "
                    "checkpoints were trained with, else 50")
parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale w")
parser.add_argument("--reward", help=f"score every image with this reward: one of {', '.join(REWARDS)}, or your own "
                    "function as path/to/file.py:function")
parser.add_argument("--out", default="runs/compare.png", help="where to write the grid")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def fail(message):
    sys.exit(f"sample.py: error: {message}")


def trained_steps(ckpts):
    """The DDIM steps the checkpoints were trained with (a model is best compared at the steps it learned), else 50."""
    states = [json.loads((Path(c) / "state.json").read_text()) for c in ckpts if (Path(c) / "state.json").is_file()]
    steps = {state.get("settings", {}).get("num_steps") for state in states} - {None}
    return steps.pop() if len(steps) == 1 else 50


def main(args):
    if args.steps is not None and args.steps < 1:
        fail(f"--steps must be at least 1, got {args.steps}")
    if args.guidance < 0:
        fail(f"--guidance must be >= 0 (1 is no guidance), got {args.guidance}")
    if args.per_prompt < 1:
        fail(f"--per-prompt must be at least 1, got {args.per_prompt}")
    try:
        reward_fn = get_reward(args.reward) if args.reward else None
    except (ValueError, FileNotFoundError) as e:  # an unknown name, a broken custom reward, a missing reward model
        fail(e)
    try:
        args.model = str(resolve_model(args.model))
    except LoadError as e:
        fail(e)
    print(f"base model: {args.model}")
    ckpts = args.ckpt or ["base"] + [str(c) for c in [latest_run_checkpoint()] if c is not None]
    for i, ckpt in enumerate(ckpts):
        if ckpt != "base" and not Path(ckpt).is_dir():
            fail(f"checkpoint {ckpt} does not exist")
        if ckpt != "base" and checkpoints_of(Path(ckpt)):  # a run folder stands for its latest checkpoint
            ckpts[i] = str(checkpoints_of(Path(ckpt))[-1])
    seeds = args.seeds or list(range(args.per_prompt))
    if args.steps is None:
        args.steps = trained_steps(ckpts)
        print(f"DDIM steps: {args.steps}, as the checkpoints were trained (else 50); --steps to change")

    try:
        sd = StableDiffusion.from_pretrained(args.model, device=args.device)
    except LoadError as e:
        fail(e)
    prompts_file = Path(args.model) / "prompts.json"
    model_prompts = json.loads(prompts_file.read_text()) if prompts_file.is_file() else DEFAULT_PROMPTS
    prompts = args.prompts or model_prompts[:: max(1, len(model_prompts) // 4)][:4]  # 4 spread over the list
    autocast = torch.autocast("cuda", torch.bfloat16) if sd.device.type == "cuda" else None
    # every column is one (prompt, seed) pair, rendered identically in every row
    column_prompts = [p for p in prompts for _ in seeds]
    column_seeds = [s for _ in prompts for s in seeds]
    base_unet, rows, rewards = sd.unet, [], []
    for ckpt in ckpts:
        sd.unet = copy.deepcopy(base_unet)
        if ckpt != "base":
            try:
                apply_checkpoint(sd, ckpt)  # refuses a checkpoint of another base model
            except (LoadError, ValueError) as e:
                fail(e)
        images = to_uint8(sample(sd, column_prompts, column_seeds, num_steps=args.steps, guidance_scale=args.guidance,
                                 autocast=autocast).images)
        rows.append(list(images))
        if reward_fn:
            rewards.append(reward_fn(images, column_prompts))
            print(f"{ckpt}: mean {args.reward} reward {np.mean(rewards[-1]):.4f} over {len(images)} images")
    labels = [f"#{s} {p}" if len(seeds) > 1 else p for p, s in zip(column_prompts, column_seeds)]  # seed first: long prompts get cut
    row_labels = [c if c == "base" else f"{Path(c).parent.parent.name}/{Path(c).name}" for c in ckpts]  # run/step_N
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid(rows, row_labels, labels, rewards if reward_fn else None).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(parser.parse_args())
