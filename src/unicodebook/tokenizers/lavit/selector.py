"""LaVIT's token selector: a score for each patch, then a keep-or-drop decision.

The scorer is the official ``TokenPredictor`` (DynamicViT's ``PredictorLG``): LayerNorm → Linear
→ GELU (``in_conv``); half of the channels stay local, the other half become the policy-weighted
mean over the patches; an MLP (``out_conv``) down to two log-probabilities, index 0 = keep.

Decisions (B, N) float in {0, 1}:

* training — a hard Gumbel-softmax sample with a straight-through gradient (DynamicViT's);
* inference — deterministic, by one of two rules: ``threshold`` keeps the patches whose keep
  probability exceeds ½; ``expected`` keeps the round(Σ p) most probable ones (as many as a sample
  keeps on average, so an unsure selector — every p near ρ — still keeps about ρ·N, where
  ``threshold`` keeps none). Or, with ``sample``, a Gumbel sample as in training (the released
  code does this, so its token count varies from call to call), drawn from the generator given.

Either way at least ``min_tokens`` patches are kept: the top-scoring ones make up the count (no
gradient flows through that top-up). Dimensions: B images, N patches, W width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def init_weights(m: nn.Module) -> None:
    """The official init of the selector and merger: linear weights N(0, 0.02) truncated, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class TokenPredictor(nn.Module):
    """patch features (B, N, W) and a policy (B, N, 1) → log-probabilities (B, N, 2), index 0 = keep."""

    def __init__(self, width: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(width, width // 2),
            nn.GELU(),
            nn.Linear(width // 2, width // 4),
            nn.GELU(),
            nn.Linear(width // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        self.apply(init_weights)

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        x = self.in_conv(x)
        b, n, w = x.shape
        local = x[..., : w // 2]
        pooled = (x[..., w // 2 :] * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True)  # (B, 1, W/2)
        return self.out_conv(torch.cat([local, pooled.expand(b, n, w - w // 2)], -1))


def gumbel_keep(log_probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """(B, N, 2) → hard keep decisions (B, N) of a Gumbel-softmax sample (τ = 1) with a
    straight-through gradient; the noise from ``generator`` (a CPU one; None: torch's global)."""
    noise = -torch.empty(log_probs.shape).exponential_(generator=generator).log().to(log_probs)
    soft = F.softmax(log_probs + noise, -1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft)
    return (hard - soft.detach() + soft)[..., 0]


def at_least(keep: Tensor, score: Tensor, count: int) -> Tensor:
    """``keep`` (B, N) with the ``count`` top-``score`` patches of each image kept too."""
    top = torch.zeros_like(keep).scatter_(1, score.topk(count, dim=1).indices, 1.0)
    return keep + (1 - keep.detach()) * top


RULES = ("threshold", "expected")


def expected_keep(log_probs: Tensor) -> Tensor:
    """(B, N, 2) → (B, N): the round(Σ p) patches of highest keep probability p, per image."""
    p = log_probs[..., 0].exp()
    rank = p.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)  # 0 = most probable
    return (rank < p.sum(1).round()[:, None]).to(p)


def keep_decisions(
    log_probs: Tensor,
    min_tokens: int,
    rule: str = "threshold",
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, N, 2) → keep decisions (B, N) in {0, 1}: Gumbel-sampled (``sample``, as in training) or by
    ``rule`` (threshold: keep probability > ½; expected: the round(Σ p) most probable), and at
    least ``min_tokens`` kept."""
    if sample:
        keep = gumbel_keep(log_probs, generator)
    elif rule == "expected":
        keep = expected_keep(log_probs)
    else:
        keep = (log_probs[..., 0] > log_probs[..., 1]).to(log_probs)
    return at_least(keep, log_probs[..., 0], min_tokens)


def pack(x: Tensor, kept: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
    """The kept rows of ``x`` (B, N, D) in raster order, first → (B, L, D) zero after each image's
    end, and the mask of real rows (B, L); ``kept`` (B, N) bool; L: ``length``, or the most kept."""
    counts = kept.sum(1)
    length = int(counts.max()) if length is None else length
    order = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices[:, :length]  # kept first, in order
    rows = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    mask = torch.arange(length, device=x.device)[None] < counts[:, None]
    return rows.masked_fill(~mask[..., None], 0.0), mask
