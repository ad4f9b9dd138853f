"""
Training checkpoints: runs/<name>/checkpoints/step_<N>/, written by train.py, read by train.py --resume and sample.py.

    step_<N>/lora.safetensors     the LoRA tensors (<layer>.lora_A.weight, ...), or
    step_<N>/unet.safetensors     the full fine-tuned UNet under the published key names (drops in for the original)
    step_<N>/optimizer.safetensors  AdamW moments;  rng.safetensors  torch RNG states
    step_<N>/state.json           epoch, step, base model, settings, per-prompt reward buffers, optimizer settings

    <run>/settings.json           the settings, written once the model and the reward have loaded: even a run
                                  killed before its first checkpoint can be resumed (from epoch 0)
    <run>/metrics.jsonl           a line per epoch

Tensors are safetensors and everything else JSON, never pickles. A checkpoint is written to a hidden temp folder and
renamed into place, so a run killed in the middle of a save loses that save and nothing else.
"""
import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nanoddpo.cli import UsageError, first_line, is_out_of_memory
from nanoddpo.lora import apply_lora_file, lora_state_dict
from nanoddpo.model import LoadError, save_json, save_safetensors


def checkpoints_of(run):
    """A run's checkpoints, oldest first: the folders step_<N>. Anything else there (a user's step_final, a file) is
    not one, and is neither read nor removed by save_checkpoint."""
    found = [p for p in Path(run, "checkpoints").glob("step_*") if p.name[5:].isdecimal() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_run_checkpoint(runs="runs"):
    """The latest checkpoint of the most recently written run under `runs`, or None."""
    found = [checkpoints_of(r)[-1] for r in Path(runs).glob("*") if checkpoints_of(r)]
    return max(found, key=lambda c: c.stat().st_mtime) if found else None


def save_checkpoint(run_dir, sd, lora, optimizer, state, keep=3):
    """Write step_<state['global_step']> atomically and keep the newest `keep` checkpoints."""
    final = Path(run_dir) / "checkpoints" / f"step_{state['global_step']}"
    tmp = final.with_name(".tmp_" + final.name)  # not matched by step_*: a save killed half way is ignored
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = lora_state_dict(sd.unet) if lora else sd.unet.state_dict()
    save_safetensors(weights, tmp / ("lora.safetensors" if lora else "unet.safetensors"))
    moments = {f"{i}.{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}
    save_safetensors(moments, tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    save_safetensors(rng, tmp / "rng.safetensors")
    save_json(dict(state, base_model=sd.path, base_fingerprint=sd.fingerprint,
                   optimizer_groups=optimizer.state_dict()["param_groups"]), tmp / "state.json")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in checkpoints_of(run_dir)[:-keep]:
        shutil.rmtree(old)


@contextmanager
def readable(ckpt, what="checkpoint"):
    """A checkpoint whose files are damaged (truncated, edited, missing) fails in one line that names it."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as e:
        if is_out_of_memory(e):
            raise
        raise LoadError(f"{what} {ckpt} cannot be read ({first_line(e)}): " + (
            "use another one (or delete it, and --resume goes on from the one before)" if what == "checkpoint" else
            "start a new run")) from None


def run_state(run):
    """What --resume continues from: (the latest checkpoint's state.json, that checkpoint), or (settings.json, None)
    for a run stopped before its first checkpoint. No run there, or a file that cannot be read, is one line."""
    ckpts = checkpoints_of(run)
    saved = ckpts[-1] / "state.json" if ckpts else Path(run) / "settings.json"
    if not saved.is_file():
        raise UsageError(f"--resume {run}: no run there (no checkpoints/step_* and no settings.json)")
    with readable(ckpts[-1], "checkpoint") if ckpts else readable(saved, "the run's settings"):
        state = json.loads(saved.read_text())
        state["settings"]["lora"]  # the shape train.py reads: a dict of settings
    return state, ckpts[-1] if ckpts else None


def trained_base(base, what):
    """`base`, the model that `what` ("the checkpoints were", "<checkpoint> was") trained on as state.json names it,
    or a line saying to pass --model when it is not there any more (moved, or the runs copied from another machine)."""
    if not Path(base).exists():
        raise LoadError(f"{what} trained on {base}, which is not there: pass --model with where it is now")
    return base


def trained(ckpts, key, otherwise):
    """What the checkpoints' state.json say for `key` ("base_model", or a setting: "num_steps", "reward", ...) if they
    agree, else `otherwise`: sample.py compares a policy as it learned, on its base model and prompts, at its DDIM steps,
    eta and guidance (the guided eps is the policy), scored by its reward."""
    values = set()
    for c in ckpts:
        if (Path(c) / "state.json").is_file():
            with readable(c):  # a damaged state.json: one line naming the checkpoint
                state = json.loads((Path(c) / "state.json").read_text())
                values.add(state.get(key, state.get("settings", {}).get(key)))
    values -= {None}
    return values.pop() if len(values) == 1 else otherwise


def apply_checkpoint(sd, ckpt):
    """Put a checkpoint's weights into sd.unet (adding LoRA layers for a LoRA checkpoint). Returns its state.json."""
    ckpt = Path(ckpt)
    if not (ckpt / "state.json").is_file():
        raise LoadError(f"{ckpt} is not a nanoddpo checkpoint (no state.json)")
    with readable(ckpt):
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("base_fingerprint") != sd.fingerprint:
            raise LoadError(f"{ckpt} was trained on a different base model ({state.get('base_model')}) than "
                            f"{sd.path}; pass its base model with --model")
        if (ckpt / "lora.safetensors").is_file():
            apply_lora_file(sd.unet, ckpt / "lora.safetensors")
        elif (ckpt / "unet.safetensors").is_file():
            sd.unet.load_state_dict(load_file(ckpt / "unet.safetensors"))
        else:
            raise LoadError(f"{ckpt} holds neither lora.safetensors nor unet.safetensors")
        return state


def resume(ckpt, sd, optimizer):
    """Restore weights, optimizer and RNG from a checkpoint; returns its state.json (epoch, step, reward buffers)."""
    state = apply_checkpoint(sd, ckpt)
    moments = {}
    with readable(ckpt):
        for key, value in load_file(Path(ckpt) / "optimizer.safetensors").items():
            i, name = key.split(".", 1)
            moments.setdefault(int(i), {})[name] = value
        optimizer.load_state_dict({"state": moments, "param_groups": state["optimizer_groups"]})
        rng = load_file(Path(ckpt) / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def start_run(run_dir, s, rank):
    """One run, one folder: a fresh run never writes into another run's folder. Checked before the model loads, so a
    name already taken or a folder that cannot be written fails at once."""
    if rank > 0 or s.resume:
        return
    if any((run_dir / f).exists() for f in ("settings.json", "metrics.jsonl")):
        raise UsageError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or start a new one "
                         f"with another --name")
    try:  # made and removed again: save_settings makes it once the model has loaded
        made = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        if made:
            run_dir.rmdir()
    except OSError as e:
        raise UsageError(f"cannot write to {run_dir} ({e.strerror}); choose another folder with --out-dir") from None


def save_settings(run_dir, s, rank):
    """settings.json, once the model and the reward have loaded (a file that fails to load leaves no run folder behind)
    and before the first epoch, so that a run killed before its first checkpoint can still be resumed (from epoch 0)."""
    if rank == 0 and not s.resume:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_json(dict(settings=dataclasses.asdict(s)), run_dir / "settings.json")


def how_to_go_on(s):
    """What to do after a run stopped early (Ctrl-C, out of memory): resume its folder once settings.json is written,
    else nothing was saved and the same command starts it again."""
    run_dir = Path(s.resume or Path(s.out_dir) / s.name) if s.resume or s.name else None
    if run_dir and (run_dir / "settings.json").is_file():
        return f"--resume {run_dir} goes on from its last checkpoint"
    return "nothing was saved yet: the same command starts it again"


def forget_after(metrics_path, start_epoch):
    """A resumed run reruns the epochs after its checkpoint: drop their lines so each epoch is logged once."""
    if metrics_path.exists():
        lines = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["epoch"] < start_epoch]
        metrics_path.write_text("".join(l + "\n" for l in lines))
