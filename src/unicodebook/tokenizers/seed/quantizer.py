"""SEED's vector quantizer: a free codebook (K × c), Euclidean nearest code, straight-through
gradients, taming's legacy weighting (commitment 1, codebook β), no EMA.

Two options the official code does not have, off by default and measured in the docs:
``kmeans_init`` (the codebook starts at k-means centroids of the first batch's features) and
``restart_dead`` (codes unused for that many steps move onto random features of the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class VectorQuantizer(nn.Module):
    """z (B, N, c) → (quantised z with straight-through gradient, codes (B, N), VQ loss)."""

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, kmeans_init: bool = False):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(num_codes, dim)
        self.embedding.weight.data.uniform_(-1.0 / num_codes, 1.0 / num_codes)  # taming's start
        self.register_buffer("initialised", torch.tensor(not kmeans_init))
        self.register_buffer("last_used", torch.zeros(num_codes, dtype=torch.long))  # step a code was last chosen

    @property
    def num_codes(self) -> int:
        return self.embedding.num_embeddings

    def lookup(self, z: Tensor) -> Tensor:
        """z (..., c) → nearest code (...) by Euclidean distance."""
        flat = z.reshape(-1, z.shape[-1]).float()
        w = self.embedding.weight.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ w.t() + w.pow(2).sum(1)[None]
        return d.argmin(1).reshape(z.shape[:-1])

    def forward(self, z: Tensor, step: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        if self.training and not bool(self.initialised):
            self._kmeans(z.detach().reshape(-1, z.shape[-1]))
        codes = self.lookup(z)
        zq = self.embedding(codes)
        loss = F.mse_loss(zq.detach(), z) + self.beta * F.mse_loss(zq, z.detach())
        if self.training:
            self.last_used[codes.unique()] = step
        return z + (zq - z).detach(), codes, loss

    @torch.no_grad()
    def _kmeans(self, x: Tensor, iters: int = 10) -> None:
        k = self.num_codes
        g = torch.Generator(device="cpu").manual_seed(0)
        pick = torch.randint(len(x), (k,), generator=g) if len(x) < k else torch.randperm(len(x), generator=g)[:k]
        c = x[pick.to(x.device)].float().clone()
        for _ in range(iters):
            a = torch.cdist(x.float(), c).argmin(1)
            sums = torch.zeros_like(c).index_add_(0, a, x.float())
            counts = torch.bincount(a, minlength=k).float()[:, None]
            c = self._project(torch.where(counts > 0, sums / counts.clamp_min(1), c))
        self.embedding.weight.copy_(c.to(self.embedding.weight.dtype))
        self.initialised.fill_(True)

    def _project(self, centroids: Tensor) -> Tensor:
        """Where k-means centroids live: anywhere here (a subclass may keep them on the sphere)."""
        return centroids

    @torch.no_grad()
    def restart_dead(self, z: Tensor, step: int, patience: int, generator: torch.Generator) -> int:
        """Codes not chosen in the last ``patience`` steps → random features of ``z`` (B, N, c)."""
        dead = (step - self.last_used >= patience).nonzero().flatten()
        if not dead.numel():
            return 0
        x = z.detach().reshape(-1, z.shape[-1])
        pick = torch.randint(len(x), (dead.numel(),), generator=generator).to(x.device)
        self.embedding.weight[dead] = x[pick].to(self.embedding.weight.dtype)
        self.last_used[dead] = step
        return int(dead.numel())
