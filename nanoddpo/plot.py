"""
Draw reward against samples seen from runs' metrics.jsonl, one curve per run, with PIL (no plotting library needed).

    python -m nanoddpo.plot runs/jpeg-ppo-x                       # one run
    python -m nanoddpo.plot runs/cmp-jpeg-* --out runs/jpeg.png   # several together, labelled by folder name
"""
import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def read_curve(run):
    """(samples seen after each epoch, mean reward of that epoch) from run/metrics.jsonl."""
    seen, xs, ys = 0, [], []
    for line in Path(run, "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        seen += m["samples"]
        xs.append(seen)
        ys.append(m["reward_mean"])
    return xs, ys


def plot(curves, title="", size=(720, 440)):
    """curves: {label: (xs, ys)}. Returns a PIL image with axes, tick labels and a legend."""
    W, H = size
    left, right, top, bottom = 70, 20, 30, 45
    xs = [x for c in curves.values() for x in c[0]]
    ys = [y for c in curves.values() for y in c[1]]
    x0, x1 = 0, max(xs)
    pad = (max(ys) - min(ys)) * 0.1 or 0.01
    y0, y1 = min(ys) - pad, max(ys) + pad
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):  # ticks
        x, y = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        draw.text((px(x) - 10, H - bottom + 5), f"{x:.0f}", fill="black", font=font)
        draw.text((5, py(y) - 6), f"{y:.3f}", fill="black", font=font)
    draw.text((W // 2 - 40, H - 18), "samples seen", fill="black", font=font)
    draw.text((left, 8), title or "mean reward per epoch", fill="black", font=font)
    for k, (label, (cx, cy)) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        draw.line([(px(x), py(y)) for x, y in zip(cx, cy)], fill=colour, width=2)
        for x, y in zip(cx, cy):
            draw.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=colour)
        draw.text((left + 10, top + 8 + 14 * k), label, fill=colour, font=font)
    return img


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", default="runs/rewards.png")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    missing = [r for r in args.runs if not Path(r, "metrics.jsonl").is_file()]
    if missing:
        raise SystemExit(f"plot: error: no metrics.jsonl in {', '.join(missing)}")
    img = plot({Path(r).name: read_curve(r) for r in args.runs}, args.title)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"wrote {args.out}")
