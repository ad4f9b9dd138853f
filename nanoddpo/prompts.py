"""
Prompt sets of the DDPO paper's aesthetic and prompt-alignment tasks: `simple_animals()` (45 prompts, "a cat", "an ant")
and `animals_activities()` (135 prompts, "a cat riding a bike"). train.py picks one by name from `PROMPTS`, and
draws each epoch's prompts from whichever list it uses with `draw_prompts`.

The paper's third set, the first 398 ImageNet classes (the animals) used for the compressibility tasks, is not here.
"""
import torch

ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
]
ACTIVITIES = ["washing the dishes", "riding a bike", "playing chess"]


def with_article(noun):
    """'a cat', 'an ant'. The vowel rule is exact for these nouns (no 'hour' or 'unicorn' among them)."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def simple_animals():
    return [with_article(animal) for animal in ANIMALS]


def animals_activities():
    return [f"{with_article(animal)} {activity}" for animal in ANIMALS for activity in ACTIVITIES]


PROMPTS = {"simple_animals": simple_animals, "animals_activities": animals_activities}


def draw_prompts(prompts, n, images_per_prompt, gen):
    """An epoch's n prompts in random order: n / images_per_prompt prompts, each repeated images_per_prompt times.
    Prompts come in shuffled passes over the list, so each is drawn equally often. Several images of a prompt in one
    epoch give its per-prompt statistics from the very first epoch, instead of z-scoring against other prompts."""
    passes = -(-n // images_per_prompt // len(prompts))  # ceil
    drawn = torch.cat([torch.randperm(len(prompts), generator=gen) for _ in range(passes)])
    drawn = drawn[: n // images_per_prompt].repeat_interleave(images_per_prompt)
    return [prompts[i] for i in drawn[torch.randperm(n, generator=gen)]]
