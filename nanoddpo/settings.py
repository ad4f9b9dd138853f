"""
train.py's settings checked, a resumed run's settings, and the quantities that follow from them: the machinery a
reader of the algorithm can skip. The Settings dataclass, its presets and the paper's per-task settings head train.py,
where they are read.

    s = preset_settings(Settings, PRESETS, PAPER_TASKS, flags)  # a new run: preset < the paper's task < flags
    s, ckpt = resume_settings(Settings, flags)  # --resume: the run's saved settings, the flags given over them
    check_settings(s, world, flags)  # every field's range, before anything loads: a bad value is one line naming it
    d = derived(s, world)      # samples per epoch, train batches, optimizer steps per epoch, timesteps trained
    model_dir, prompts, why = model_and_prompts(s)  # what --model, --prompts and --reward name, found and checked

    train.py: error: --timestep-fraction 1.5: must be in (0, 1]
"""
import dataclasses
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from nanoddpo import cli
from nanoddpo.checkpoint import run_state
from nanoddpo.model import WEIGHTS, resolve_model
from nanoddpo.prompts import PromptError, load_prompts
from nanoddpo.rewards import REWARDS, check_reward, is_custom_reward, unknown_reward

CHOICES = dict(algo=("ppo", "reinforce", "rwr", "rwr-sparse"), precision=("auto", "fp32", "bf16", "fp16"),
               compile=("auto", "on", "off"))  # --preset is checked where presets are applied (preset_settings)


def preset_settings(cls, presets, tasks, given):
    """A new run's settings (a train.Settings, `cls`): the preset's (train.py's PRESETS), with --preset sd14 the
    paper's for the --reward (PAPER_TASKS), and the flags `given` over them."""
    preset = given.get("preset", cls.preset)
    cli.need(preset in presets, "preset", preset, f"choose one of {', '.join(presets)}")
    task = tasks.get(given.get("reward", cls.reward), {}) if preset == "sd14" else {}
    if preset == "sd14" and given.get("lora") is False:
        task = {**task, "lr": 1e-5}  # the authors' rate to fine-tune the whole UNet (3e-4 is LoRA's)
    s = cls(**{**presets[preset], **task, **given})
    if task:
        chosen = {k: v for k, v in task.items() if k not in given}
        print(f"--preset sd14 --reward {s.reward}: the paper's settings for this task: "
              f"{', '.join(f'{k}={v}' for k, v in chosen.items()) or 'all overridden by flags'}")
    return s


def resume_settings(cls, given):
    """--resume: the run's saved settings (a train.Settings, `cls`) with the flags `given` over them, and the
    checkpoint to continue from (None: the run's start). Flags that would change what the saved weights are must
    match them."""
    run = Path(given["resume"])
    state, ckpt = run_state(run)
    saved = state["settings"]
    unknown = set(saved) - {f.name for f in dataclasses.fields(cls)}
    cli.need(not unknown, "resume", run, f"saved by another version of train.py (settings {sorted(unknown)})")
    for field in ("name", "out_dir"):  # the run goes on where it is: a new folder given here would be ignored
        cli.need(field not in given, field, given.get(field), f"--resume goes on in the run's own folder, {run}: "
                 f"leave it out")
    for field in ("preset", "lora") + ("lora_rank",) * saved["lora"]:
        cli.need(given.get(field, saved[field]) == saved[field], field, given.get(field),
                 f"the run trains with --{field.replace('_', '-')} {saved[field]}")
    s = cls(**{**saved, **given})
    done = state.get("epoch", 0)
    cli.need(done < s.epochs, "epochs", s.epochs, f"{run} has done {done} epochs: pass more to train on")
    return s, ckpt


def check_settings(s, world=1, given=(), warn=True):
    """Every field's range, checked before anything is loaded: a bad value is one line naming the flag. `given`: the
    flags on the command line. warn=False: checked again, its warnings already given."""
    def need(ok, field, accepted):
        cli.need(ok, field, getattr(s, field), accepted)
    for field in ("grad_accum", "num_inner_epochs"):  # given with reinforce, they would be ignored
        need(s.algo != "reinforce" or field not in given, field,
             "--algo reinforce makes one update of each epoch's samples: leave it out")
    for field, choices in CHOICES.items():
        need(getattr(s, field) in choices, field, f"choose one of {', '.join(choices)}")
    if not (s.reward in REWARDS or is_custom_reward(s.reward)):
        raise cli.UsageError(unknown_reward(s.reward))
    for field in ("epochs", "batch_size", "batches_per_epoch", "images_per_prompt", "train_batch_size", "grad_accum",
                  "num_inner_epochs", "stat_buffer", "stat_min_count", "lora_rank", "save_every", "keep_checkpoints",
                  "grid_every", "num_steps"):
        need(getattr(s, field) >= 1, field, "must be at least 1")
    for field in ("clip_range", "adv_clip_max", "adam_eps", "max_grad_norm"):  # 0 would make the update vanish
        need(getattr(s, field) > 0, field, "must be above 0")
    for field in ("seed", "guidance_scale", "kl_coef", "rwr_beta", "lr", "weight_decay", "threads"):
        need(getattr(s, field) >= 0, field, "must be 0 or more")
    need(s.num_steps <= 1000, "num_steps", "must be at most 1000 (the schedule's training steps)")
    need(0 < s.eta <= 1 or (s.eta == 0 and s.algo.startswith("rwr")), "eta", "must be in (0, 1]: at eta 0 a "
         "DDIM step is deterministic and has no log-probability for DDPO to train (RWR alone can use eta 0)")
    need(not (s.balance_steps and s.algo.startswith("rwr")), "balance_steps", "weighs DDPO's per-step terms; RWR "
         "has none (it trains the final latents): leave it out")
    need(0 < s.timestep_fraction <= 1, "timestep_fraction", "must be in (0, 1]")
    need(0 < s.rwr_top_fraction <= 1, "rwr_top_fraction", "must be in (0, 1]")
    need(s.stat_min_count <= s.stat_buffer, "stat_min_count", f"must be at most --stat-buffer {s.stat_buffer}")
    need(0 <= s.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
    need(0 <= s.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
    need(s.seed < 2**40, "seed", "must be below 2**40")
    need(s.threads <= 1024, "threads", "must be at most 1024")
    need(Path(s.name).name == s.name and s.name not in (".", ".."), "name", "must be a folder name, without '/'")
    cli.check_device(s.device)
    cuda = s.device.startswith("cuda") or (s.device == "auto" and torch.cuda.is_available())
    need(s.precision in ("auto", "fp32") or cuda, "precision", "bf16/fp16 need a GPU; on the CPU use fp32 (auto)")
    gpu = "cuda" if s.device == "auto" else s.device  # what this GPU can run; auto picks what it runs fastest
    blocker = cli.compile_blocker(gpu if cuda else "cpu") if s.compile != "off" else None
    if s.compile == "on" and blocker:
        raise cli.UsageError(f"--compile on: {blocker}: use --compile off")
    if warn and cuda and s.compile == "auto" and blocker:  # auto runs eager then; say why it is slower than it could be
        warnings.warn(f"--compile auto: runs eager (slower): {blocker}")
    if warn and cuda and s.precision == "bf16" and cli.auto_precision(gpu) != "bf16":
        warnings.warn("--precision bf16: this GPU has no bf16 tensor cores (they came with compute capability 8, "
                      "Ampere): bf16 runs emulated and slowly, and torch.compile's bf16 kernels fail to build; fp16 "
                      "(auto) is the fast choice here")
    d = derived(s, world)
    need(d.samples_per_epoch <= 10**6, "batch_size", f"{d.samples_per_epoch} samples per epoch (x --batches-per-epoch "
         f"{s.batches_per_epoch} x {world} process(es)): an epoch keeps every trajectory for training; at most "
         f"1,000,000")
    divisor_below = lambda n, cap: max(k for k in range(1, min(cap, n) + 1) if n % k == 0)  # the largest that fits
    need(d.local_samples % s.train_batch_size == 0, "train_batch_size", f"must divide the samples per epoch per "
         f"process ({s.batch_size} x {s.batches_per_epoch} = {d.local_samples}); --train-batch-size "
         f"{divisor_below(d.local_samples, s.train_batch_size)} would")
    need(d.train_batches % d.grad_accum == 0, "grad_accum", f"must divide the {d.train_batches} train batches per "
         f"epoch (samples per epoch per process / --train-batch-size); --grad-accum "
         f"{divisor_below(d.train_batches, d.grad_accum)} would")
    need(d.samples_per_epoch % s.images_per_prompt == 0, "images_per_prompt",
         f"must divide the samples per epoch ({d.samples_per_epoch})")
    if warn and s.lr == 0:
        warnings.warn("--lr 0: the model will not change (useful only to measure)")
    if warn and s.threads > (os.cpu_count() or 1):  # each thread spins on a core of its own: oversubscribed, torch crawls
        warnings.warn(f"--threads {s.threads}: more than this machine's {os.cpu_count()} CPU cores makes torch slower, "
                      f"not faster (0: one thread per core)")
    return s


def derived(s, world):
    """The quantities that follow from the settings, printed at start-up."""
    local_samples = s.batch_size * s.batches_per_epoch
    train_batches = local_samples // s.train_batch_size
    # reinforce is one update per fresh batch: all of the epoch's samples go into one optimizer step
    grad_accum, inner = (train_batches, 1) if s.algo == "reinforce" else (s.grad_accum, s.num_inner_epochs)
    return SimpleNamespace(local_samples=local_samples, samples_per_epoch=local_samples * world,
                           train_batches=train_batches, grad_accum=grad_accum, inner_epochs=inner,
                           timesteps_trained=max(1, int(s.num_steps * s.timestep_fraction)),
                           steps_per_epoch=max(1, train_batches // grad_accum) * inner)


def model_and_prompts(s):
    """The model folder, the prompts and where they came from, checked against the reward before any model loads."""
    # each preset's settings fit its own model: tiny trains weights/tiny even where SD v1-4 is downloaded
    preset_model = WEIGHTS / ("stable-diffusion-v1-4" if s.preset == "sd14" else "tiny")
    cli.need(s.model or preset_model.is_dir(), "preset", s.preset, "SD v1-4 is not in weights/stable-diffusion-v1-4: "
             "fetch it (weights/README.md) or pass --model")
    model_dir = resolve_model(s.model or str(preset_model))
    try:
        prompts, why = load_prompts(s.prompts, model_dir)
        check_reward(s.reward, prompts)
    except cli.UsageError as e:
        raise cli.UsageError(f"--{'prompts' if isinstance(e, PromptError) else 'reward'}: {e}") from None
    return model_dir, prompts, why
