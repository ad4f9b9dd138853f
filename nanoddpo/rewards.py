"""
Rewards for DDPO: plain functions from generated images to one number per image.

Every reward takes `images`, a uint8 numpy array (B, H, W, 3), and `prompts`, a list of B strings, and returns a
float numpy array (B,). Rewards that need a model (aesthetic, alignment) are small classes that load it once and
are called the same way. `get_reward(name)` is what train.py and sample.py use; `REWARDS` lists the choices.
`check_reward(name, prompts)` checks a choice against the run's prompts and the reward's weight files before any model
loads, so a wrong setting fails in a second instead of after Stable Diffusion has loaded.
"""
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nanoddpo.cli import UsageError

# The learned rewards' weights (nanoddpo/learned_rewards.py reads them; weights/README.md says more).
WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
CLIP_DIR = WEIGHTS / "clip-vit-large-patch14"
AESTHETIC_MLP = WEIGHTS / "aesthetic-predictor" / "sac+logos+ava1-l14-linearMSE.pth"
LLAVA_DIR = WEIGHTS / "llava-1.5-7b-hf"
DEBERTA_DIR = WEIGHTS / "deberta-xlarge-mnli"
# The one command that fetches each reward model into its folder (also listed in weights/README.md).
DOWNLOADS = {
    "clip-vit-large-patch14": "hf download openai/clip-vit-large-patch14 config.json model.safetensors "
                              "--local-dir weights/clip-vit-large-patch14",
    "aesthetic-predictor": "wget -P weights/aesthetic-predictor https://github.com/christophschuhmann/"
                           "improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
    "llava-1.5-7b-hf": "hf download llava-hf/llava-1.5-7b-hf --exclude '*.bin' --local-dir weights/llava-1.5-7b-hf",
    "deberta-xlarge-mnli": "hf download microsoft/deberta-xlarge-mnli --exclude '*.h5' --exclude '*.msgpack' "
                           "--local-dir weights/deberta-xlarge-mnli",
}
# reward -> the files it reads by default, each with its key in DOWNLOADS
WEIGHT_FILES = {
    "aesthetic": [(CLIP_DIR, "clip-vit-large-patch14"), (AESTHETIC_MLP, "aesthetic-predictor")],
    "alignment": [(LLAVA_DIR, "llava-1.5-7b-hf"), (DEBERTA_DIR, "deberta-xlarge-mnli")],
}


def jpeg_kb(images, quality=95):
    """Size in kB of each image saved as a JPEG at `quality` (the paper's compressibility measure)."""
    sizes = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return np.array(sizes, dtype=np.float32)


def jpeg_compressibility(images, prompts=None):
    return -jpeg_kb(images)


def jpeg_incompressibility(images, prompts=None):
    return jpeg_kb(images)


def aesthetic():
    # Imported on use: the learned rewards pull in transformers and load GBs of weights; jpeg runs need neither.
    from nanoddpo.learned_rewards import AestheticReward
    return AestheticReward()  # on CUDA in bf16 when there is a GPU, else CPU fp32


def alignment():
    from nanoddpo.learned_rewards import AlignmentReward
    return AlignmentReward()


def tinyworld():
    # Prompt alignment for the bundled tiny model (weights/tiny): its world's checker reads colour, shape and
    # background back from the pixels; the reward is the fraction of the three that match the prompt.
    from nanoddpo.world import tinyworld_reward
    return tinyworld_reward


# name -> a zero-argument factory returning the callable reward(images, prompts) -> (B,) floats.
# Factories let rewards that load a model do so only when chosen.
REWARDS = {
    "jpeg": lambda: jpeg_compressibility,
    "jpeg-incompressibility": lambda: jpeg_incompressibility,
    "aesthetic": aesthetic,
    "alignment": alignment,
    "tinyworld": tinyworld,
}


def get_reward(name):
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of: {', '.join(REWARDS)}")
    return REWARDS[name]()


def check_reward(name, prompts):
    """Raise ValueError, with one message saying what to change, if reward `name` cannot score these prompts: an
    unknown name, tinyworld with prompts outside the tiny world's grammar, a learned reward whose weights are not
    downloaded. Loads nothing. Custom rewards ("path/to/file.py:function") are checked when they load."""
    if ".py:" in name:
        return
    if name not in REWARDS:
        raise UsageError(f"unknown reward {name!r}; choose one of: {', '.join(REWARDS)}")
    if name == "tinyworld":
        from nanoddpo.world import make_prompt, parse_prompt
        bad = []
        for prompt in prompts:
            try:
                parse_prompt(prompt)
            except ValueError:
                bad.append(prompt)
        if bad:
            example = make_prompt("red", "circle", "plain")
            raise UsageError(f"reward tinyworld reads colour, shape and background back from the image, so it scores "
                             f"only prompts of the tiny world such as {example!r} (weights/tiny/prompts.json); "
                             f"{len(bad)} of {len(prompts)} prompts are not, e.g. {', '.join(map(repr, bad[:3]))}")
    missing = [(path, key) for path, key in WEIGHT_FILES.get(name, []) if not Path(path).exists()]
    if missing:
        fetch = "\n".join(f"    {DOWNLOADS[key]}" for _, key in missing)
        raise UsageError(f"reward {name} needs {', '.join(str(path) for path, _ in missing)}, not downloaded; fetch "
                         f"{'it' if len(missing) == 1 else 'them'}, from the repository root, with:\n{fetch}\n"
                         f"(see weights/README.md)")


class AsyncReward:
    """Scores batches on one background thread, so train.py can sample batch k+1 while batch k is scored.

    `submit(images, prompts)` returns a concurrent.futures.Future whose result() is the reward array for exactly those
    images, in their order; the inputs are copied, so the caller may reuse its buffers at once. One worker means batches
    are scored in submission order and a reward model is never used by two threads. On a GPU both threads queue kernels
    on the same CUDA stream: the GPU stays busy while either has work, and what is hidden is the reward's CPU time
    (JPEG encoding, tokenizing, the generation loop in Python) and its wait for results.
    """

    def __init__(self, reward):
        self.reward = reward
        # A new thread's current CUDA device is 0 whatever the caller set (train.py sets cuda:LOCAL_RANK), so the worker
        # starts by taking the caller's: a reward that puts a tensor on a bare "cuda" then lands on this process's GPU.
        # (The built-in rewards name their device's index anyway; see learned_rewards.resolve_device.)
        same_gpu = (torch.cuda.set_device, (torch.cuda.current_device(),)) if torch.cuda.is_available() else (None, ())
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward", initializer=same_gpu[0],
                                       initargs=same_gpu[1])

    def submit(self, images, prompts):
        return self.pool.submit(self.reward, np.array(images, copy=True), list(prompts))

    def close(self):
        self.pool.shutdown(wait=True)
