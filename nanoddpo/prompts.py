"""
The DDPO paper's prompt sets, and the one loader of a run's prompts that train.py and sample.py share.

    simple_animals()      45 prompts, the bare words "cat", "dog", ... (aesthetic task), as in both reference codes
    animals_activities()  135 prompts, "a cat riding a bike", "an ant playing chess" (prompt-alignment task)
    imagenet_animals()    398 prompts, the first 398 ImageNet classes, each whole line of data/imagenet_animals.txt
                          ("tench, Tinca tinca", synonyms and Latin name included) (JPEG compressibility tasks)

`load_prompts(spec, model_dir)` turns a --prompts setting (a set name in `PROMPTS`, a .txt or .json file, or "" for
the model's own prompts.json, else simple_animals) into the list and says where it came from; `draw_prompts` draws
each epoch's prompts from that list.
"""
import json
from pathlib import Path

import torch

from nanoddpo.cli import UsageError

ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
]
ACTIVITIES = ["washing the dishes", "riding a bike", "playing chess"]
IMAGENET_ANIMALS = Path(__file__).resolve().parent / "data" / "imagenet_animals.txt"  # ImageNet-1k classes 0-397


def with_article(noun):
    """'a cat', 'an ant'. The vowel rule is exact for these nouns (no 'hour' or 'unicorn' among them)."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def simple_animals():
    return list(ANIMALS)  # bare words: the reference codes prompt "cat", not "a cat"


def animals_activities():
    return [f"{with_article(animal)} {activity}" for animal in ANIMALS for activity in ACTIVITIES]


def imagenet_animals():
    return IMAGENET_ANIMALS.read_text(encoding="utf-8").splitlines()


PROMPTS = {"simple_animals": simple_animals, "animals_activities": animals_activities,
           "imagenet_animals": imagenet_animals}


class PromptError(UsageError):
    """A --prompts setting that names no usable list of prompts; the message says what is wrong and where."""


def read_prompts_file(path):
    """A .json file holds a list of strings, used as they are; any other file holds one prompt per line, with
    surrounding spaces stripped and blank lines (a trailing newline included) dropped."""
    try:  # -sig: drops the byte-order mark Windows editors put first, which would otherwise start the first prompt
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PromptError(f"prompt file {path} is not UTF-8 text: save it as UTF-8") from None
    if path.suffix != ".json":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptError(f"prompt file {path} is not valid JSON ({e})") from None
        if not isinstance(prompts, list):
            raise PromptError(f"prompt file {path} must hold a JSON list of strings, found a {type(prompts).__name__}")
        wrong = [(i, p) for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if wrong:
            i, p = wrong[0]
            raise PromptError(f"prompt file {path} must hold a JSON list of non-empty strings; {len(wrong)} entries "
                              f"are not, the first at index {i}: {json.dumps(p)}")
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompt")
    return prompts


def load_prompts(spec, model_dir):
    """-> (prompts, why): the list of prompts that `spec` names, and a few words on where it came from, for the log.

    spec is a set name in PROMPTS (checked first), a prompt file (see read_prompts_file), or "": the model's own
    prompts (model_dir/prompts.json, as weights/tiny ships its 80 captions) when it has them, else simple_animals.
    Raises PromptError (a ValueError) with one line naming the file or the sets."""
    if spec in PROMPTS:
        return PROMPTS[spec](), f"the set {spec}"
    if spec:
        path = Path(spec)
        if not path.is_file():
            raise PromptError(f"prompts {spec!r} is neither a file nor a prompt set ({', '.join(PROMPTS)})")
        return read_prompts_file(path), f"the file {path}"
    path = Path(model_dir) / "prompts.json"
    if path.is_file():
        return read_prompts_file(path), f"{path}, the model's own prompts (no prompt set chosen)"
    return simple_animals(), f"the set simple_animals (no prompt set chosen and {model_dir} has no prompts.json)"


def spread(prompts, n=4):
    """n prompts evenly spaced over the list (all of them when it is shorter), e.g. for a sample grid."""
    return prompts[:: max(1, len(prompts) // n)][:n]


def draw_prompts(prompts, n, images_per_prompt, gen):
    """An epoch's n prompts in random order: n / images_per_prompt prompts, each repeated images_per_prompt times.
    Prompts come in shuffled passes over the list, so each is drawn equally often. Several images of a prompt in one
    epoch give its per-prompt statistics from the very first epoch, instead of z-scoring against other prompts."""
    passes = -(-n // images_per_prompt // len(prompts))  # ceil
    drawn = torch.cat([torch.randperm(len(prompts), generator=gen) for _ in range(passes)])
    drawn = drawn[: n // images_per_prompt].repeat_interleave(images_per_prompt)
    return [prompts[i] for i in drawn[torch.randperm(n, generator=gen)]]
