"""Reconstruction quality and codebook health of a visual tokenizer on an image split."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.images import ImageFolder, collate_images, resolve_image_folder
from .metrics import CodeUsage, psnr, ssim
from .plots import plot_codebook_usage


@torch.no_grad()
def evaluate_tokenizer(tok, data: str | Path, split: str | None = "test", batch_size: int = 100,
                       progress: bool = True, usage_plot: Path | None = None, odd_size: str | None = None) -> dict:
    """PSNR / SSIM (mean over images), and per-layer codebook usage and perplexity.

    Bad images are reported, counted (``n_bad``) and skipped.
    """
    folder = resolve_image_folder(data, split)
    cfg = tok.config
    ds = ImageFolder(folder, tok.image_size, odd_size or cfg.data.odd_size, preload=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate_images)
    was = tok.training
    tok.eval()
    n_layers = tok.depth if tok.kind == "rq" else 2 * tok.depth
    usage = CodeUsage(tok.codebook.num_codes, n_layers)
    psnrs, ssims, n_bad, names = [], [], 0, None
    for images, bad in tqdm(loader, desc=f"eval {split or folder.name}", disable=not progress, leave=False):
        n_bad += bad
        if images.numel() == 0:
            continue
        codes = tok.encode(images)
        recon = tok.decode(codes)
        psnrs.append(psnr(recon, images).clamp(max=100.0))
        ssims.append(ssim(recon, images))
        layers, names = tok.code_layers(codes)
        usage.update(layers)
    tok.train(was)
    if not psnrs:
        from ..errors import UnicodebookError

        raise UnicodebookError(f"no readable images in '{folder}' ({n_bad} bad)")
    st = usage.stats()
    if usage_plot is not None:
        plot_codebook_usage(usage.counts, usage_plot, names, title=f"codebook usage on {split or folder.name}")
    align = tok.codebook.alignment()
    return {
        "n_images": int(sum(p.numel() for p in psnrs)),
        "n_bad": n_bad,
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "layers": names,
        "usage": [round(u, 4) for u in st["usage"]],
        "usage_mean": float(sum(st["usage"]) / len(st["usage"])),
        "usage_all": st["usage_all"],
        "perplexity": [round(p, 2) for p in st["perplexity"]],
        "num_codes": tok.codebook.num_codes,
        "codes_per_image": tok.codes_per_image,
        "codebook_mode": tok.codebook.mode,
        "codebook_cosine_llm": align["cosine"],
    }
