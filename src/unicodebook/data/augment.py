"""Training-time augmentation of image batches for reconstruction (stage I of UniCode).

A reconstruction objective has no labels a flip could contradict, and a tokenizer trained on
a few photographs sees each of their patches under eight orientations instead of one.
Captioned training (SEED's and LaVIT's phases, stage II) is not augmented: "on the left" would
then lie.
"""

from __future__ import annotations

import torch

AUGMENTS = ("none", "dihedral")


def dihedral(images: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Image ``i`` of a (B, C, H, W) batch of square images under symmetry ``which[i]`` of the
    square's eight: 0–3 quarter turns, 4–7 the same after a transpose (a mirror)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"dihedral augmentation needs square images, got {tuple(images.shape[-2:])}")
    out = images.clone()
    for t in which.unique().tolist():
        idx = (which == t).nonzero().flatten().to(images.device)
        x = images[idx]
        if t >= 4:
            x = x.transpose(-1, -2)
        out[idx] = torch.rot90(x, t % 4, dims=(-2, -1))
    return out


def augment_batch(
    images: torch.Tensor, kind: str, seed: int, step: int, first: int = 0, total: int | None = None
) -> torch.Tensor:
    """``images`` under augmentation ``kind`` (one of ``AUGMENTS``). ``images`` are items
    ``first …`` of a global batch of ``total``: the choices are drawn for the whole global batch
    from (seed, step), so a run on W ranks augments exactly as one process would, and a resumed
    run exactly as the uninterrupted one."""
    if kind == "none":
        return images
    if kind == "dihedral":
        total = images.shape[0] if total is None else total
        which = torch.randint(0, 8, (total,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        return dihedral(images, which[first : first + images.shape[0]])
    raise ValueError(f"unknown augmentation {kind!r}; expected one of {', '.join(AUGMENTS)}")
