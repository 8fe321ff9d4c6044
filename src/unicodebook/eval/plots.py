"""Pictures people would rather look at than read: image grids, codebook usage, curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.images import tensor_to_pil


def image_grid(rows: list[torch.Tensor], scale: int = 4, pad: int = 2, labels: list[str] | None = None) -> Image.Image:
    """Rows of images (each (B, 3, H, W) in [0, 1]) → one grid picture, upscaled (nearest)."""
    b = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    ch, cw = h * scale, w * scale
    label_w = 0 if not labels else 8 + 7 * max(len(s) for s in labels)
    grid = Image.new("RGB", (label_w + b * (cw + pad) + pad, len(rows) * (ch + pad) + pad), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for r, imgs in enumerate(rows):
        y = pad + r * (ch + pad)
        if labels:
            draw.text((4, y + ch // 2 - 5), labels[r], fill=(255, 255, 255))
        for c in range(imgs.shape[0]):
            tile = tensor_to_pil(imgs[c]).resize((cw, ch), Image.NEAREST)
            grid.paste(tile, (label_w + pad + c * (cw + pad), y))
    return grid


def plot_codebook_usage(
    counts: torch.Tensor, path: Path, layer_names: list[str] | None = None, title: str = ""
) -> None:
    """counts (L, V): how often each code was chosen per layer → sorted-frequency plot per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = counts.float().cpu()
    n_layers, v = counts.shape
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers, 2.8), squeeze=False, sharey=True)
    for i in range(n_layers):
        c = counts[i]
        p = c / c.sum().clamp_min(1)
        used = float((c > 0).float().mean())
        nz = p[p > 0]
        ppl = float(torch.exp(-(nz * nz.log()).sum())) if nz.numel() else 0.0
        ax = axes[0, i]
        ax.bar(np.arange(v), np.sort(p.numpy())[::-1], width=1.0, color="tab:blue")
        ax.set_title(
            f"{layer_names[i] if layer_names else f'layer {i}'}\nused {used:.0%}, ppl {ppl:.0f}/{v}", fontsize=9
        )
        ax.set_xlabel("codes (sorted)")
    axes[0, 0].set_ylabel("frequency")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(metrics_path: Path, path: Path, keys: tuple[str, ...] = ("loss", "psnr", "usage")) -> None:
    """Training curves from metrics.jsonl (records with a 'step' and those keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split", "train") == "train"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def captioned_grid(
    images: torch.Tensor, captions: list[str], cols: int = 4, scale: int = 4, pad: int = 4, width_chars: int = 22
) -> Image.Image:
    """Images (B, 3, H, W) in [0, 1], each with its (wrapped) caption underneath."""
    import textwrap

    b = images.shape[0]
    h, w = images.shape[-2:]
    tile_w = max(w * scale, 7 * width_chars)
    wrapped = [textwrap.wrap(c, width_chars) or [""] for c in captions]
    text_h = 12 * max(len(x) for x in wrapped) + 4
    rows = (b + cols - 1) // cols
    cell_h = h * scale + text_h
    grid = Image.new("RGB", (pad + min(b, cols) * (tile_w + pad), pad + rows * (cell_h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        r, c = divmod(i, cols)
        x, y = pad + c * (tile_w + pad), pad + r * (cell_h + pad)
        tile = tensor_to_pil(images[i]).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (x + (tile_w - w * scale) // 2, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x, y + h * scale + 2 + 12 * j), line, fill=(0, 0, 0))
    return grid
