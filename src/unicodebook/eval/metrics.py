"""Image reconstruction metrics (PSNR, SSIM) and codebook-usage statistics.

Images are float tensors ``(B, C, H, W)`` with values in ``[0, data_range]``
(``[0, 1]`` by default). Every image metric returns one value per image, ``(B,)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "ssim", "CodeUsage"]


# --------------------------------------------------------------------------- PSNR


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB, per image.

    Args:
        x, y: images ``(B, C, H, W)`` (any trailing shape after B works).
        data_range: max minus min of the value range (1.0 for ``[0, 1]``).

    Returns:
        ``(B,)`` float tensor; ``inf`` where ``x == y`` exactly.
    """
    _check_pair(x, y)
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    diff = (x.to(dtype) - y.to(dtype)).flatten(1)
    mse = diff.pow(2).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


# --------------------------------------------------------------------------- SSIM


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() < 2:
        raise ValueError(f"expected a batch of images (B, ...), got shape {tuple(x.shape)}")


def gaussian_window(size: int, sigma: float, dtype=torch.float32, device=None) -> Tensor:
    """Normalised 1-D Gaussian kernel ``(size,)`` centred on the middle tap."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter(img: Tensor, g: Tensor) -> Tensor:
    """Separable 'valid' Gaussian filtering of ``(B, C, H, W)`` per channel.

    Returns ``(B, C, H - k + 1, W - k + 1)`` for a kernel of length k.
    """
    c = img.shape[1]
    k = g.numel()
    kh = g.view(1, 1, k, 1).expand(c, 1, k, 1)
    kw = g.view(1, 1, 1, k).expand(c, 1, 1, k)
    return F.conv2d(F.conv2d(img, kh, groups=c), kw, groups=c)


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Structural similarity (Wang et al. 2004), per image.

    A Gaussian window (``win_size`` taps, std ``sigma``) is applied per channel
    with **'valid'** filtering (no padding; skimage's ``gaussian_weights=True``
    convention), local statistics use the population (biased) variance as in the
    paper, and the SSIM map is averaged over positions and then channels.
    If the image is smaller than the window, the window shrinks to the largest
    odd size that fits (the Gaussian ``sigma`` is kept).

    Args:
        x, y: images ``(B, C, H, W)`` in ``[0, data_range]``.
        data_range: max minus min of the value range.

    Returns:
        ``(B,)`` tensor, 1 for identical images.
    """
    _check_pair(x, y)
    if x.dim() != 4:
        raise ValueError(f"ssim expects (B, C, H, W), got shape {tuple(x.shape)}")
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    size = min(win_size, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # make odd
    g = gaussian_window(size, sigma, dtype=dtype, device=x.device)

    mu_x, mu_y = _filter(x, g), _filter(y, g)
    var_x = _filter(x * x, g) - mu_x**2
    var_y = _filter(y * y, g) - mu_y**2
    cov = _filter(x * y, g) - mu_x * mu_y

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------- codebook usage


def _perplexity(counts: Tensor) -> float:
    """exp(entropy) of the empirical distribution given by ``counts (K,)``; 0.0 if empty."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0].double() / total
    return math.exp(float(-(p * p.log()).sum()))


class CodeUsage:
    """Streaming codebook statistics from bincount counts.

    Holds only a ``(depth, num_codes)`` count table, so an evaluation pass over a
    dataset never keeps all codes in memory.

    Args:
        num_codes: codebook size K (valid codes are ``0 .. K-1``).
        depth: number of code layers D (e.g. residual-quantizer depth); 1 for
            a single codebook.
    """

    def __init__(self, num_codes: int, depth: int = 1) -> None:
        if num_codes < 1 or depth < 1:
            raise ValueError(f"num_codes and depth must be >= 1, got {num_codes}, {depth}")
        self.num_codes = num_codes
        self.depth = depth
        self.counts = torch.zeros(depth, num_codes, dtype=torch.long)

    def reset(self) -> None:
        """Zero all counts."""
        self.counts.zero_()

    def update(self, codes: Tensor) -> "CodeUsage":
        """Add codes to the counts.

        Args:
            codes: integer tensor ``(..., D)`` where D == ``depth``; with
                ``depth == 1`` any shape is accepted (all entries are layer 0).
        """
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        codes = codes.detach().to("cpu", torch.long)
        if self.depth == 1:
            codes = codes.reshape(-1, 1)
        elif codes.dim() == 0 or codes.shape[-1] != self.depth:
            raise ValueError(f"expected codes (..., {self.depth}), got shape {tuple(codes.shape)}")
        codes = codes.reshape(-1, self.depth)
        if codes.numel() == 0:
            return self
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.num_codes:
            raise ValueError(f"codes must lie in [0, {self.num_codes}), got range [{lo}, {hi}]")
        offsets = torch.arange(self.depth) * self.num_codes
        flat = (codes + offsets).reshape(-1)
        binned = torch.bincount(flat, minlength=self.depth * self.num_codes)
        self.counts += binned.view(self.depth, self.num_codes)
        return self

    def stats(self) -> dict:
        """Usage and perplexity per layer and over all layers.

        Returns:
            ``{"usage": [D floats], "perplexity": [D floats], "usage_all": float,
            "perplexity_all": float}``. ``usage`` is the fraction of the
            ``num_codes`` entries used at least once; ``perplexity`` is
            exp(entropy) of the empirical code distribution. ``usage_all`` is the
            usage of the union of layers; ``perplexity_all`` pools the codes of
            all layers into one distribution. Empty counts give 0.0 everywhere.
        """
        used = self.counts > 0
        pooled = self.counts.sum(dim=0)
        return {
            "usage": [float(u) / self.num_codes for u in used.sum(dim=1)],
            "perplexity": [_perplexity(c) for c in self.counts],
            "usage_all": float(used.any(dim=0).sum()) / self.num_codes,
            "perplexity_all": _perplexity(pooled),
        }
