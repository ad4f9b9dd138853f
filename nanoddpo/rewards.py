"""
Rewards for DDPO: plain functions from generated images to one number per image.

Every reward takes `images`, a uint8 numpy array (B, H, W, 3), and `prompts`, a list of B strings, and returns a
float numpy array (B,). Rewards that need a model (aesthetic, alignment) are small classes that load it once and
are called the same way. `get_reward(name)` is what train.py and sample.py use; `REWARDS` lists the choices.
"""
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


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
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def submit(self, images, prompts):
        return self.pool.submit(self.reward, np.array(images, copy=True), list(prompts))

    def close(self):
        self.pool.shutdown(wait=True)
