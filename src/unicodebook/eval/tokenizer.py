"""Reconstruction quality and codebook health of a visual tokenizer (any family) on an image split.

On a shapes-world split the judge also reads every reconstruction: ``judge_accuracy`` is the
fraction whose objects (shape, colour, size, position) all come back exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.images import ImageFolder, image_limits, resolve_image_folder
from ..tokenizers.base import odd_size_of
from ..utils.modules import eval_mode
from .metrics import CodeUsage, psnr, ssim
from .plots import plot_codebook_usage


@torch.no_grad()
def evaluate_tokenizer(
    visual_tok,
    data: str | Path,
    split: str | None = "test",
    batch_size: int = 100,
    progress: bool = True,
    usage_plot: Path | None = None,
    odd_size: str | None = None,
) -> dict:
    """PSNR / SSIM (mean over images), codebook usage and perplexity per code layer (the
    tokenizer's ``code_layers``), codes per image, and the family's own ``health`` figures.

    Bad images are reported, counted (``n_bad``) and skipped.
    """
    folder = resolve_image_folder(data, split)
    ds = ImageFolder(
        folder,
        visual_tok.image_size,
        odd_size or odd_size_of(visual_tok),
        preload=False,
        limits=image_limits(visual_tok.config.data if visual_tok.config is not None else None),
    )
    scenes = _shapes_scenes(folder)
    with eval_mode(visual_tok):
        usage, lengths = None, []
        psnrs, ssims, judged, n_bad, names = [], [], [], 0, None
        starts = range(0, len(ds), batch_size)
        for start in tqdm(starts, desc=f"eval {split or folder.name}", disable=not progress, leave=False):
            items = [(ds.files[i], ds[i]) for i in range(start, min(start + batch_size, len(ds)))]
            n_bad += sum(x is None for _, x in items)
            items = [(f, x) for f, x in items if x is not None]
            if not items:
                continue
            images = torch.stack([x for _, x in items])
            codes = visual_tok.encode(images).cpu()
            recon = visual_tok.decode(codes).cpu()
            psnrs.append(psnr(recon, images).clamp(max=100.0))
            ssims.append(ssim(recon, images))
            layers, names = visual_tok.code_layers(codes)
            usage = usage or CodeUsage(visual_tok.num_codes, len(names))
            usage.update(layers)
            lengths.append(visual_tok.layout.lengths(codes).float())
            if scenes is not None:
                judged += _judge(recon, [scenes.get(f.name) for f, _ in items])
    if not psnrs:
        from ..errors import UnicodebookError

        raise UnicodebookError(f"no readable images in '{folder}' ({n_bad} bad)")
    st = usage.stats()
    if usage_plot is not None:
        plot_codebook_usage(usage.counts, usage_plot, names, title=f"codebook usage on {split or folder.name}")
    lengths = torch.cat(lengths)
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
        "num_codes": visual_tok.num_codes,
        "codes_per_image": visual_tok.layout.length,
        "codes_per_image_mean": round(float(lengths.mean()), 2),
        **visual_tok.health(),
        **_judge_summary(judged),
    }


def _judge_summary(judged: list[tuple[bool, bool]]) -> dict:
    """(correct, held_out) pairs → overall accuracy and accuracy on seen / held-out scenes."""
    if not judged:
        return {}
    out = {"judge_accuracy": sum(ok for ok, _ in judged) / len(judged)}
    for name, flag in (("seen", False), ("held_out", True)):
        part = [ok for ok, held in judged if held == flag]
        if part:
            out[f"judge_accuracy_{name}"] = sum(part) / len(part)
    return out


def _shapes_scenes(folder: Path) -> dict | None:
    """Ground-truth scenes of a shapes-world split (``scenes.jsonl`` beside ``images/``), by file name."""
    from ..data.shapes import read_scenes

    if folder.name != "images" or not (folder.parent / "scenes.jsonl").exists():
        return None
    return {Path(image).name: sc for image, sc in read_scenes(folder.parent).items()}


def _judge(recon: torch.Tensor, scenes: list) -> list[tuple[bool, bool]]:
    """For each reconstruction: (the judge reads exactly its true scene, the scene is held out)."""
    from ..data.shapes import score

    arr = (recon.clamp(0, 1) * 255 + 0.5).byte().permute(0, 2, 3, 1).cpu().numpy()
    return [(bool(score(a, sc)["all_correct"]), bool(sc.held_out)) for a, sc in zip(arr, scenes) if sc is not None]
