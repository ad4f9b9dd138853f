"""
The tiny procedural world behind the bundled model in weights/tiny: captioned 32x32 pictures of one coloured shape
on a grey background, a checker that reads the caption back from the pixels, and a CLIP-format tokenizer for its words.

    "a red circle on a striped background"  ->  draw("red", "circle", "striped", seed)  ->  (32, 32, 3) uint8
    check(image) -> {"colour": "red", "shape": "circle", "background": "striped"}
    tinyworld_reward(images, prompts) -> fraction of the prompt's three attributes the checker finds, in [0, 1]

Shapes are saturated colours and backgrounds are grey, so the checker separates them by saturation alone; it then
names the colour by hue, the shape by how it fills its bounding box, and the background by how its grey levels vary.
Every scale below is chosen so that it survives the tiny VAE (factor 4, one latent cell per 4x4 pixels): shapes are
at least 14 px across, stripes 4 px wide, and the noise comes in 4 px blocks. nanoddpo/pretrain.py trains the tiny model on these pictures.
Run `python -m nanoddpo.world [--out world.png]` to write a contact sheet of drawn examples and the checker's
accuracy.
"""
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from nanoddpo.cli import IMAGE_SUFFIXES, Parser, check_output, run

SIZE = 32          # image side in pixels
SUPERSAMPLE = 4    # shapes are drawn 4x larger and box-filtered down, which anti-aliases their edges

COLOURS = {  # name -> RGB; hues 0, 55, 130, 220, 285 degrees, far enough apart to survive blur
    "red": (220, 40, 40),
    "yellow": (230, 210, 40),
    "green": (40, 180, 70),
    "blue": (40, 90, 230),
    "purple": (160, 60, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUNDS = ("plain", "striped", "gradient", "noisy")
# The words of every prompt; pretrain.py's tokenizer gives each of them a single token.
WORDS = ("a", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS)


def make_prompt(colour, shape, background):
    return f"a {colour} {shape} on a {background} background"


def parse_prompt(prompt):
    """Inverse of make_prompt: "a red circle on a plain background" -> ("red", "circle", "plain")."""
    words = prompt.split()
    if len(words) != 7 or words[1] not in COLOURS or words[2] not in SHAPES or words[5] not in BACKGROUNDS:
        raise ValueError(f"not a prompt of the tiny world (weights/tiny/prompts.json): {prompt!r}")
    return words[1], words[2], words[5]


# All 5 x 4 x 4 = 80 prompts, in the order of weights/tiny/prompts.json. Prompt 20a + 5b + c has background a,
# shape a + b and colour a + c (mod 4, 4, 5): every 20th prompt differs in all three attributes, so the spread of
# prompts sample.py shows (0, 20, 40, 60) covers every background and shape.
PROMPTS = [make_prompt(list(COLOURS)[(a + c) % 5], SHAPES[(a + b) % 4], BACKGROUNDS[a])
           for a in range(4) for b in range(4) for c in range(5)]


# ----------------------------------------------------------------------------------------------------------------
# drawing

def _background(kind, rng):
    """(SIZE, SIZE) float grey levels in [0, 255]."""
    if kind == "plain":
        return np.full((SIZE, SIZE), rng.uniform(40, 215))
    if kind == "striped":
        # 4 px stripes (period 8) of two greys at least 90 apart, horizontal or vertical, random phase
        low = rng.uniform(30, 100)
        high = low + rng.uniform(90, 150)
        phase = rng.integers(8)
        bands = np.where(((np.arange(SIZE) + phase) // 4) % 2 == 0, low, high)
        grey = np.tile(bands[:, None], (1, SIZE))
        return grey if rng.random() < 0.5 else grey.T
    if kind == "gradient":
        # a linear ramp across the whole image between two greys at least 110 apart, in one of four directions
        ends = sorted(rng.uniform(25, 230, size=2))
        if ends[1] - ends[0] < 110:
            mid = (ends[0] + ends[1]) / 2
            ends = [mid - 55, mid + 55]
        ramp = np.linspace(ends[0], ends[1], SIZE)
        if rng.random() < 0.5:
            ramp = ramp[::-1]
        grey = np.tile(ramp[:, None], (1, SIZE))
        return grey if rng.random() < 0.5 else grey.T
    if kind == "noisy":
        # independent grey levels in 4x4 pixel blocks (one per latent cell) around a random mean
        blocks = rng.uniform(-70, 70, size=(SIZE // 4, SIZE // 4)) + rng.uniform(90, 165)
        return np.clip(np.kron(blocks, np.ones((4, 4))), 0, 255)
    raise ValueError(f"unknown background {kind!r}")


def _shape_mask(shape, rng):
    """(SIZE, SIZE) float coverage in [0, 1] of one shape of random size and position, drawn supersampled."""
    big = SIZE * SUPERSAMPLE
    side = rng.uniform(14, 22) * SUPERSAMPLE            # bounding box side, 14..22 px in the final image
    x0, y0 = rng.uniform(2 * SUPERSAMPLE, big - 2 * SUPERSAMPLE - side, size=2)
    x1, y1 = x0 + side, y0 + side
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":  # pointing up, base at the bottom
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.float64) / 255


def draw(colour, shape, background, seed):
    """The picture of one caption; the same seed always gives the same (SIZE, SIZE, 3) uint8 image."""
    rng = np.random.default_rng(seed)
    grey = _background(background, rng)[..., None]
    coverage = _shape_mask(shape, rng)[..., None]
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    return np.round(coverage * rgb + (1 - coverage) * grey).astype(np.uint8)


def draw_prompt(prompt, seed):
    return draw(*parse_prompt(prompt), seed)


def random_dataset(n, seed):
    """n drawn images (n, SIZE, SIZE, 3) uint8 with their prompts, captions drawn uniformly from PROMPTS."""
    rng = np.random.default_rng(seed)
    prompts = [PROMPTS[i] for i in rng.integers(len(PROMPTS), size=n)]
    seeds = rng.integers(2**31, size=n)
    return np.stack([draw_prompt(p, s) for p, s in zip(prompts, seeds)]), prompts


# ----------------------------------------------------------------------------------------------------------------
# checker

def _hue(rgb):
    """Hue in degrees of one RGB colour (the HSV hue)."""
    r, g, b = rgb
    mx, mn = max(rgb), min(rgb)
    if mx == mn:
        return 0.0
    if mx == r:
        h = (g - b) / (mx - mn)
    elif mx == g:
        h = 2 + (b - r) / (mx - mn)
    else:
        h = 4 + (r - g) / (mx - mn)
    return (60 * h) % 360


_HUES = {name: _hue(np.array(rgb, dtype=np.float64)) for name, rgb in COLOURS.items()}


def _neighbours(mask):
    """How many of each pixel's 3x3 neighbourhood (itself included) are set."""
    padded = np.pad(mask.astype(np.int32), 1)
    return sum(padded[1 + dy:SIZE + 1 + dy, 1 + dx:SIZE + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _classify_shape(mask):
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    height, width = bottom - top + 1, right - left + 1
    area = len(rows)
    fill = area / (height * width)
    # a triangle pointing up keeps 3/4 of its area below its middle row; the other shapes are symmetric
    middle = (top + bottom) / 2
    asymmetry = (np.sum(rows > middle) - np.sum(rows < middle)) / area
    if asymmetry > 0.25:
        return "triangle"
    if fill > 0.88:
        return "square"
    if fill > 0.66:
        return "circle"
    return "diamond"


def _classify_background(grey, keep):
    """grey: (SIZE, SIZE) floats; keep: the pixels that belong to the background."""
    values = grey[keep]
    if values.std() < 12:
        return "plain"
    # stripes and gradients are constant along one axis: their row (or column) means explain almost all the
    # variance, while noise blocks average out along every row and column
    best_explained, best_profile = 0.0, None
    for axis in (1, 0):
        counts = keep.sum(axis)
        valid = counts > 0
        profile = np.where(valid, (grey * keep).sum(axis) / np.maximum(counts, 1), 0)
        fitted = np.broadcast_to(profile[:, None] if axis == 1 else profile[None, :], grey.shape)[keep]
        explained = 1 - ((values - fitted) ** 2).mean() / values.var()
        if explained > best_explained:
            best_explained, best_profile = explained, profile[valid]
    if best_explained < 0.6:
        return "noisy"
    # a ramp changes monotonically (total variation = range); stripes go up and down every 4 px
    total_variation = np.abs(np.diff(best_profile)).sum()
    spread = best_profile.max() - best_profile.min()
    return "gradient" if total_variation < 2.0 * spread else "striped"


def check(image):
    """Read colour, shape and background back from one (H, W, 3) uint8 image; None where nothing is found."""
    if image.shape[:2] != (SIZE, SIZE):
        image = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BOX))
    rgb = image.astype(np.float64)
    saturation = rgb.max(-1) - rgb.min(-1)
    found = {"colour": None, "shape": None, "background": None}
    shape_mask = saturation > 70
    shape_mask &= _neighbours(shape_mask) >= 4          # drop isolated coloured specks
    if shape_mask.sum() >= 12:
        hue = _hue(rgb[shape_mask].mean(0))
        found["colour"] = min(_HUES, key=lambda name: min(abs(hue - _HUES[name]), 360 - abs(hue - _HUES[name])))
        found["shape"] = _classify_shape(shape_mask)
    # the background is what is clearly outside the shape (edges are blends of both)
    keep = _neighbours(saturation > 25) == 0
    if keep.sum() >= 64:
        found["background"] = _classify_background(rgb.mean(-1), keep)
    return found


def tinyworld_reward(images, prompts):
    """Fraction of each prompt's attributes (colour, shape, background) that the checker finds: (B,) in [0, 1].
    images: (B, H, W, 3) uint8, prompts: B strings made by make_prompt."""
    scores = []
    for image, prompt in zip(images, prompts):
        found = check(image)
        wanted = dict(zip(("colour", "shape", "background"), parse_prompt(prompt)))
        scores.append(np.mean([found[k] == v for k, v in wanted.items()]))
    return np.array(scores, dtype=np.float32)


def checker_for(prompts):
    """tinyworld_reward when every prompt is one of this world's, so train.py can log the faithfulness of any run on
    the tiny model whatever reward it trains; None otherwise (SD's prompts cannot be checked)."""
    try:
        [parse_prompt(p) for p in prompts]
    except (ValueError, AttributeError):
        return None
    return tinyworld_reward


# ----------------------------------------------------------------------------------------------------------------
# tokenizer

def bytes_to_unicode():
    """GPT-2/CLIP's byte-level alphabet: each of the 256 bytes as one printable unicode character. Printable
    Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are shifted to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _bpe(symbols, ranks):
    """Apply merges to a word (a list of symbols) the way BPE does: always the lowest-ranked adjacent pair first."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def write_tokenizer(folder, words=WORDS):
    """Write a CLIP-format BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json) in which each of `words`
    is a single token.

    The vocab follows CLIP's layout: the 256 byte characters, the same with "</w>" (end of word), one token per
    merge, then <|startoftext|> and <|endoftext|>. Merges are added word by word: BPE the word with the merges so
    far, then join the leftover pieces left to right. New merges rank after all older ones, so they never change
    how an earlier word splits, and every word ends as one token. Returns the vocab size."""
    alphabet = list(bytes_to_unicode().values())
    byte_of = bytes_to_unicode()
    merges, ranks = [], {}
    for word in words:
        chars = [byte_of[b] for b in word.lower().encode("utf-8")]
        pieces = _bpe(chars[:-1] + [chars[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens), "a merge produced a token twice"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # as in SD v1-4's tokenizer folder: CLIP's context length, and <|endoftext|> doubling as padding
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return len(vocab)


def main(argv=None):
    parser = Parser(description="Draw the tiny world, report its checker's accuracy, write a contact sheet.")
    parser.add_argument("--out", default="world.png", help="the contact sheet of 8 x 16 drawn examples")
    args = parser.parse_args(argv)
    check_output(args.out, "out", IMAGE_SUFFIXES)
    images, prompts = random_dataset(2000, seed=0)
    found = [check(img) for img in images]
    for i, key in enumerate(("colour", "shape", "background")):
        accuracy = np.mean([f[key] == parse_prompt(p)[i] for f, p in zip(found, prompts)])
        print(f"checker {key} accuracy on {len(images)} drawn images: {accuracy:.3f}")
    print(f"mean tinyworld reward: {tinyworld_reward(images, prompts).mean():.3f}")
    sheet = np.concatenate([np.concatenate(list(images[r * 16:(r + 1) * 16]), 1) for r in range(8)], 0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out} (8 x 16 drawn examples)")


if __name__ == "__main__":
    run("nanoddpo.world", main)
