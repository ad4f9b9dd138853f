"""
Images as the rewards and the grids see them: uint8 (B, H, W, 3) arrays, and labelled PNG grids.
Used by train.py (a grid every few epochs) and sample.py (checkpoints side by side).
"""
import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images):
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8 numpy, rounded as an image file would store them."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(rows, row_labels, column_labels, rewards=None, cell=128):
    """rows[i][j] a uint8 (H, W, 3) image; labels on the left and on top; rewards[i][j] written under each image."""
    font = ImageFont.load_default()
    line, left = 14, 110
    below = line if rewards is not None else 0
    headers = [textwrap.wrap(label, cell // 6)[:3] for label in column_labels]  # prompts wrap onto up to 3 lines
    head = line * max(1, *map(len, headers))
    canvas = Image.new("RGB", (left + cell * len(column_labels), head + (cell + below) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(headers):
        draw.text((left + j * cell + 2, 1), "\n".join(lines), fill="black", font=font, spacing=2)
    for i, (images, label) in enumerate(zip(rows, row_labels)):
        top = head + i * (cell + below)
        lines = textwrap.wrap(label, left // 6, break_on_hyphens=False)[-4:]  # run/step_N: keep its end
        draw.text((2, top + cell // 2 - line * len(lines) // 2), "\n".join(lines), fill="black", font=font, spacing=2)
        for j, image in enumerate(images):
            canvas.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (left + j * cell, top))
            if rewards is not None:
                draw.text((left + j * cell + 2, top + cell + 1), f"{rewards[i][j]:.3f}", fill="black", font=font)
    return canvas
