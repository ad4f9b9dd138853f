"""
Rewards for DDPO: plain functions from generated images to one number per image.

Every reward takes `images`, a uint8 numpy array (B, H, W, 3), and `prompts`, a list of B strings, and returns a
float numpy array (B,). Rewards that need a model (aesthetic, alignment) are small classes that load it once and
are called the same way. `get_reward(name)` is what train.py and sample.py use; `REWARDS` lists the choices.
`check_reward(name, prompts)` checks a choice against the run's prompts and the reward's weight files before any model
loads, so a wrong setting fails in a second instead of after Stable Diffusion has loaded.

Your own reward is a function in a file of yours, named as "path/to/file.py:function":

    # my_reward.py                                   python train.py --reward my_reward.py:redness
    import numpy as np
    def redness(images, prompts):
        # uint8 (B, H, W, 3) images and B prompts -> (B,) floats: mean red minus the mean of green and blue
        return images[..., 0].mean(axis=(1, 2)) - images[..., 1:].mean(axis=(1, 2, 3))
"""
import importlib.util
import io
import json
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


def is_custom_reward(name):
    """A reward named as "path/to/file.py:function" rather than one of REWARDS."""
    return ".py:" in name


def reward_label(name):
    """A name fit for a run folder: the reward's name, or "<file stem>-<function>" for a custom one."""
    if is_custom_reward(name):
        path, function = name.rsplit(":", 1)
        return f"{Path(path).stem}-{function}"
    return name


def get_reward(name):
    """The reward callable for a name in REWARDS or a "path/to/file.py:function"; loads its model if it has one."""
    if is_custom_reward(name):
        return load_custom_reward(name)
    if name not in REWARDS:
        raise UsageError(unknown_reward(name))
    return REWARDS[name]()


def unknown_reward(name):
    """What train.py and sample.py say for a --reward they do not know."""
    return f"--reward {name}: choose one of {', '.join(REWARDS)}, or your own path/to/file.py:function"


class CustomReward:
    """A user's reward function, with its result checked on every call so that a mistake in it stops the run with a
    message naming it, rather than surfacing later as a shape error in the advantages. Accepted results: anything
    numpy reads as a floating-point array of shape (B,) (a float numpy array, a list of Python floats, a CPU torch
    tensor); integers and booleans are refused, since a reward of whole numbers is more often a bug than a choice.
    The result is returned as float32. NaN is allowed: train.py gives such a sample no weight."""

    def __init__(self, function, name):
        self.function, self.name = function, name

    def __call__(self, images, prompts):
        try:
            result = self.function(images, prompts)
        except (Exception, SystemExit) as e:  # sys.exit() in a reward would end training silently
            raise UsageError(f"reward {self.name} raised {type(e).__name__}: {e}") from e
        if hasattr(result, "detach"):  # a torch tensor, possibly on the GPU
            result = result.detach().float().cpu().numpy()
        try:
            scores = np.asarray(result)
        except Exception:
            scores = np.asarray(None)
        expected = f"a float array of shape ({len(images)},): one number per image"
        if scores.dtype.kind != "f":
            raise UsageError(f"reward {self.name} returned {type(result).__name__} of dtype {scores.dtype}; expected "
                             f"{expected}, e.g. np.asarray(scores, dtype=np.float32)")
        if scores.shape != (len(images),):
            raise UsageError(f"reward {self.name} returned shape {scores.shape} for {len(images)} images; expected "
                             f"{expected}")
        return scores.astype(np.float32)


def load_custom_reward(name):
    """"path/to/file.py:function" -> CustomReward. The file is imported as a module (its top level runs once)."""
    path, function = name.rsplit(":", 1)
    if not Path(path).is_file():
        raise UsageError(f"reward {name}: no file {path} (name a reward as path/to/file.py:function)")
    spec = importlib.util.spec_from_file_location(f"custom_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # a script's own sys.exit() at its top level, too
        raise UsageError(f"reward {name}: importing {path} raised {type(e).__name__}: {e}") from e
    found = getattr(module, function, None)
    if not callable(found):
        defined = [k for k, v in vars(module).items() if callable(v) and getattr(v, "__module__", None) == module.__name__]
        what = "is not a function" if found is not None else "is not defined"
        raise UsageError(f"reward {name}: {function} {what} in {path} (its functions: {', '.join(defined) or 'none'})")
    return CustomReward(found, name)


def write_answers(reward, path, epoch, k=4):
    """Append `k` of the answers a reward model gave since the last call (its take_answers(): (prompt, answer, score)
    triples; AlignmentReward has it) to the JSON-lines file `path`, one {"epoch", "prompt", "answer", "score"} per
    line, spread evenly over the epoch's answers. Rewards that give no answers write nothing. Returns lines written."""
    answers = reward.take_answers() if hasattr(reward, "take_answers") else []
    if not answers:
        return 0
    picked = sorted(set(np.linspace(0, len(answers) - 1, min(k, len(answers))).round().astype(int).tolist()))
    with open(path, "a") as f:
        for i in picked:
            prompt, answer, score = answers[i]
            f.write(json.dumps({"epoch": epoch, "prompt": prompt, "answer": answer, "score": round(float(score), 4)}) + "\n")
    return len(picked)


def check_reward(name, prompts):
    """Raise UsageError, with one message saying what to change, if reward `name` cannot score these prompts: an
    unknown name, tinyworld with prompts outside the tiny world's grammar, a learned reward whose weights are not
    downloaded, a custom "path/to/file.py:function" that does not import. Loads no model."""
    if is_custom_reward(name):
        load_custom_reward(name)
        return
    if name not in REWARDS:
        raise UsageError(unknown_reward(name))
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
