"""LaVIT's quantizer: an l2-normalised codebook (K × c), cosine lookup, EMA updates.

The features (M, c) are l2-normalised and take the nearest code by cosine (for unit vectors the
Euclidean nearest, SEED's lookup). The codebook is not trained by gradients: after each training
forward every code that was chosen moves towards the normalised mean of its features and back
onto the sphere, ``w ← normalise(decay·w + (1 − decay)·normalise(mean))`` (BEiT-v2's VQ-KD rule,
LaVIT's lineage: the released weights are l2-normalised, the update rule is not released). The
loss is the commitment term ‖sg(q) − z‖² alone; gradients pass straight through.

Two options against codebook collapse, SEED's (``tokenizers/seed/quantizer.py``, shared):
``kmeans_init`` (the codebook starts at spherical k-means centroids of the first batch's
features; with fewer features than codes some start as copies) and dead-code restarts
(``restart_dead``, called by the recipe: codes unused for N steps move onto batch features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..seed.quantizer import VectorQuantizer


class NormEMAQuantizer(VectorQuantizer):
    """z (..., c) → (quantised unit z with straight-through gradient, codes (...), commitment loss)."""

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, kmeans_init: bool = False):
        super().__init__(num_codes, dim, beta=0.0, kmeans_init=kmeans_init)
        self.decay = decay
        self.embedding.weight.requires_grad_(False)  # EMA, not gradients
        with torch.no_grad():
            self.embedding.weight.copy_(F.normalize(torch.randn(num_codes, dim), dim=-1))

    def lookup(self, z: Tensor) -> Tensor:
        """z (..., c) → the code of highest cosine (...)."""
        return super().lookup(F.normalize(z.float(), dim=-1))

    def forward(self, z: Tensor, step: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        z = F.normalize(z, dim=-1)
        if self.training and not bool(self.initialised):
            self._kmeans(z.detach().reshape(-1, z.shape[-1]).float())
        codes = self.lookup(z)
        zq = self.embedding(codes).to(z.dtype)
        loss = F.mse_loss(zq.detach().float(), z.float())
        if self.training:
            self._ema(z.detach().reshape(-1, z.shape[-1]), codes.reshape(-1))
            self.last_used[codes.unique()] = step
        return z + (zq - z).detach(), codes, loss

    @torch.no_grad()
    def _ema(self, z: Tensor, codes: Tensor) -> None:
        """Each chosen code towards the normalised mean of its features (M, c), back on the sphere."""
        w = self.embedding.weight
        sums = torch.zeros_like(w).index_add_(0, codes, z.to(w.dtype))
        hit = torch.bincount(codes, minlength=self.num_codes) > 0
        moved = self.decay * w[hit] + (1 - self.decay) * F.normalize(sums[hit], dim=-1)
        w[hit] = F.normalize(moved, dim=-1)

    def _project(self, centroids: Tensor) -> Tensor:
        return F.normalize(centroids, dim=-1)  # spherical k-means
