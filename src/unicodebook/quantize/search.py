"""Nearest-code search that scales to LLM-sized codebooks.

Dimensions: N query vectors, V codebook rows, d hidden size.

``argmin_k ‖z − C_k‖² = argmin_k (‖C_k‖² − 2·z·C_kᵀ)`` (‖z‖² is constant per row), computed
one block of codebook rows at a time with a matmul and a running minimum, so the extra memory
is ``O(N·chunk)`` and never ``N×V×d`` (nor even ``N×V`` when ``chunk < V``). Accumulation is in
fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def nearest_code(
    z: Tensor,
    codebook: Tensor,
    chunk_size: int = 8192,
    codebook_sqnorm: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Index of the nearest codebook row for each query, and its squared distance.

    Args:
        z: (N, d) queries.
        codebook: (V, d) rows.
        chunk_size: rows of the codebook scored per matmul.
        codebook_sqnorm: optional precomputed (V,) ‖C‖² in fp32.

    Returns:
        indices (N,) long, squared distances (N,) fp32.
    """
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code: z {tuple(z.shape)} and codebook {tuple(codebook.shape)} do not match")
    z32 = z.float()
    n, v = z32.shape[0], codebook.shape[0]
    best = torch.full((n,), float("inf"), device=z.device)
    best_idx = torch.zeros(n, dtype=torch.long, device=z.device)
    for start in range(0, v, chunk_size):
        block = codebook[start : start + chunk_size].float()  # (c, d)
        sq = codebook_sqnorm[start : start + chunk_size] if codebook_sqnorm is not None else block.pow(2).sum(1)
        # (N, c) = ‖C‖² − 2 z·Cᵀ   (addmm: one fused fp32 GEMM, no N×c×d temporaries)
        scores = torch.addmm(sq.unsqueeze(0), z32, block.t(), beta=1.0, alpha=-2.0)
        val, idx = scores.min(dim=1)
        better = val < best
        best = torch.where(better, val, best)
        best_idx = torch.where(better, idx + start, best_idx)
    dist = (best + z32.pow(2).sum(1)).clamp_min_(0.0)
    return best_idx, dist


def brute_force_nearest(z: Tensor, codebook: Tensor) -> Tensor:
    """Reference: materialises (N, V) exact distances via cdist. For tests only."""
    return torch.cdist(z.double(), codebook.double()).argmin(dim=1)
