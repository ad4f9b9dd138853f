"""
Draw reward against samples seen from runs' metrics.jsonl, one curve per run, with PIL (no plotting library needed);
or a trade-off, one point per checkpoint: JPEG gained against faithfulness lost, paired against the base model, from
the scores that `sample.py --reward jpeg tinyworld --scores FILE` writes.

    python -m nanoddpo.plot runs/jpeg-ppo-x                       # one run
    python -m nanoddpo.plot runs/cmp-jpeg-* --out runs/jpeg.png   # several together, labelled by folder name
    python -m nanoddpo.plot --tradeoff runs/kl_scores.json --out docs/kl_tradeoff.png
"""
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nanoddpo.cli import IMAGE_SUFFIXES, Parser, UsageError, check_output, first_line, run

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def read_curve(run):
    """(samples seen after each epoch, mean reward of that epoch) from run/metrics.jsonl."""
    path, seen, xs, ys = Path(run, "metrics.jsonl"), 0, [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            m = json.loads(line)
            ok = all(isinstance(m[k], (int, float)) and math.isfinite(m[k]) for k in ("samples", "reward_mean"))
        except (ValueError, KeyError, TypeError):  # not JSON, a key missing, not an object
            ok = False
        if not ok:
            raise UsageError(f"{path} line {i} is not an epoch's metrics as train.py writes them (numbers samples and "
                             f"reward_mean): remove that line")
        seen += m["samples"]
        xs.append(seen)
        ys.append(m["reward_mean"])
    if not xs:
        raise UsageError(f"{path} holds no epoch: plot the run once it has finished one")
    return xs, ys


LEFT, RIGHT, TOP, BOTTOM = 70, 20, 30, 45  # margins around the plot area, in pixels


def axes(size, x_range, y_range, x_format, x_label, title):
    """A white image with a framed plot area, 5 ticks per axis, the x label and the title. Returns the image, its
    drawing context and font, and px / py mapping data coordinates to pixels."""
    (W, H), (x0, x1), (y0, y1) = size, x_range, y_range
    left, right, top, bottom = LEFT, RIGHT, TOP, BOTTOM
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):
        x, y = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        draw.text((px(x) - 12, H - bottom + 5), x_format.format(x), fill="black", font=font)
        draw.text((5, py(y) - 6), f"{y:.3f}", fill="black", font=font)
    draw.text((W // 2 - 3 * len(x_label), H - 18), x_label, fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=font)
    return img, draw, font, px, py


def plot(curves, title="", size=(720, 440)):
    """curves: {label: (xs, ys)}. Returns a PIL image with axes, tick labels and a legend."""
    xs = [x for c in curves.values() for x in c[0]]
    ys = [y for c in curves.values() for y in c[1]]
    pad = (max(ys) - min(ys)) * 0.1 or 0.01
    img, draw, font, px, py = axes(size, (0, max(xs)), (min(ys) - pad, max(ys) + pad), "{:.0f}", "samples seen",
                                   title or "mean reward per epoch")
    for k, (label, (cx, cy)) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        draw.line([(px(x), py(y)) for x, y in zip(cx, cy)], fill=colour, width=2)
        for x, y in zip(cx, cy):
            draw.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=colour)
        draw.text((LEFT + 10, TOP + 8 + 14 * k), label, fill=colour, font=font)
    return img


def read_tradeoff(scores_file):
    """{run name: (JPEG gain in kB, faithfulness lost, their standard errors)} from sample.py's --scores JSON: paired
    differences from the base row on the same prompts and seeds (the jpeg reward is -kB, so a gain is smaller files)."""
    se = lambda d: d.std(ddof=1) / np.sqrt(len(d))
    points = {}
    if not Path(scores_file).is_file():
        raise UsageError(f"--tradeoff {scores_file}: no such file")
    try:
        scores = json.loads(Path(scores_file).read_text())["scores"]
        jpeg, world = scores["jpeg"], scores["tinyworld"]
        for ckpt in jpeg.keys() - {"base"}:
            gain = np.subtract(jpeg[ckpt], jpeg["base"])
            lost = np.subtract(world["base"], world[ckpt])
            points[Path(ckpt).parent.parent.name or ckpt] = (gain.mean(), lost.mean(), se(gain), se(lost))  # run/checkpoints/step_N
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not these scores
        raise UsageError(f"--tradeoff {scores_file}: not what `sample.py --reward jpeg tinyworld --scores FILE` writes "
                         f"({first_line(e)})") from None
    return dict(sorted(points.items()))


def tradeoff(points, title="", size=(560, 440)):
    """points: {label: (x, y, x_se, y_se)}, x the JPEG gain, y the faithfulness lost. A dot per point with +-1 SE bars,
    the origin (the base model) included in the axes."""
    xs = [0] + [x + e * k for x, _, e, _ in points.values() for k in (-1, 1)]
    ys = [0] + [y + e * k for _, y, _, e in points.values() for k in (-1, 1)]
    xpad, ypad = (max(xs) - min(xs)) * 0.1 or 0.01, (max(ys) - min(ys)) * 0.1 or 0.01
    img, draw, font, px, py = axes(size, (min(xs) - xpad, max(xs) + xpad), (min(ys) - ypad, max(ys) + ypad), "{:.3f}",
                                   "JPEG gain (kB smaller, paired)",
                                   title or "faithfulness lost (tinyworld reward drop, paired) against JPEG gain")
    draw.ellipse([px(0) - 3, py(0) - 3, px(0) + 3, py(0) + 3], outline="black")
    draw.text((px(0) + 6, py(0) - 6), "base", fill="black", font=font)
    for k, (label, (x, y, x_se, y_se)) in enumerate(points.items()):
        colour = COLOURS[k % len(COLOURS)]
        draw.line([(px(x - x_se), py(y)), (px(x + x_se), py(y))], fill=colour)
        draw.line([(px(x), py(y - y_se)), (px(x), py(y + y_se))], fill=colour)
        draw.ellipse([px(x) - 4, py(y) - 4, px(x) + 4, py(y) + 4], fill=colour)
        draw.text((px(x) + 7, py(y) - 12), label, fill=colour, font=font)
    return img


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="run folders holding metrics.jsonl")
    parser.add_argument("--tradeoff", metavar="SCORES", help="instead: sample.py's --scores JSON (rewards jpeg and "
                        "tinyworld, a base row); one point per checkpoint")
    parser.add_argument("--out", default="runs/rewards.png")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    check_output(args.out, "out", IMAGE_SUFFIXES)
    if args.tradeoff:
        img = tradeoff(read_tradeoff(args.tradeoff), args.title)
    else:
        if not args.runs:
            parser.error("give run folders, or --tradeoff SCORES")
        missing = [r for r in args.runs if not Path(r, "metrics.jsonl").is_file()]
        if missing:
            raise UsageError(f"no metrics.jsonl in {', '.join(missing)}: give run folders that train.py wrote")
        img = plot({Path(r).name: read_curve(r) for r in args.runs}, args.title)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run("plot", main)
