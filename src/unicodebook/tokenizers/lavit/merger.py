"""LaVIT's token merger (the official ``causal_encoder``, a ``TokenMerger``): the kept patches
gather what the dropped ones held.

Every block runs at all N positions under the keep decisions (B, N), as the official one does:

* causal self-attention among the kept patches — position i sees the kept positions j ≤ i (and
  itself, kept or not): policy ``keep_j + (1 − keep_j)·[i = j]`` times the lower triangle;
* cross-attention whose keys and values are the LayerNorm'd (``ln_vision``) ViT features of the
  *dropped* patches only: policy ``1 − keep_j``;
* an MLP; pre-norm residual blocks (``norm0``, ``norm1``, ``norm2``), a final ``norm``.

The masked softmax is DynamicViT's (``exp`` times the policy, renormalised with a small ε), so the
straight-through keep decisions pass a gradient back to the selector. The kept positions are
taken out afterwards in raster order (``selector.pack``). Dimensions: B images, N patches, W width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..vit import Mlp
from .selector import init_weights

EPS = 1e-6


def softmax_with_policy(attn: Tensor, policy: Tensor) -> Tensor:
    """attention logits (B, H, N, M) and a policy broadcastable to them, in [0, 1] → weights: the
    softmax over the policy's keys (a row whose policy is all 0 spreads evenly)."""
    n, dtype = attn.shape[-1], attn.dtype
    attn = (attn - attn.max(-1, keepdim=True).values).float().exp() * policy.float()
    return ((attn + EPS / n) / (attn.sum(-1, keepdim=True) + EPS)).to(dtype)


def _heads(t: Tensor, heads: int) -> Tensor:
    b, n, w = t.shape
    return t.reshape(b, n, heads, w // heads).transpose(1, 2)


class TokenCausalAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x (B, N, W), keep (B, N) → (B, N, W)."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        eye = torch.eye(n, device=x.device, dtype=keep.dtype)
        policy = keep[:, None, None, :] + (1 - keep[:, None, None, :]) * eye  # (B, 1, N, N)
        policy = policy * torch.ones(n, n, device=x.device, dtype=keep.dtype).tril()
        attn = softmax_with_policy((q @ k.transpose(-2, -1)) * (w // self.heads) ** -0.5, policy)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, w))


class TokenCrossAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, origin: Tensor, keep: Tensor) -> Tensor:
        """x (B, N, W) reads the dropped patches of ``origin`` (B, N, W) → (B, N, W)."""
        b, n, w = x.shape
        q, k, v = (_heads(t, self.heads) for t in (self.query(x), self.key(origin), self.value(origin)))
        attn = softmax_with_policy((q @ k.transpose(-2, -1)) * (w // self.heads) ** -0.5, (1 - keep)[:, None, None, :])
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, w))


class CausalFuserBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm0 = nn.LayerNorm(width)
        self.token_causal_attn = TokenCausalAttention(width, heads)
        self.norm1 = nn.LayerNorm(width)
        self.token_cross_attn = TokenCrossAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: Tensor, origin: Tensor, keep: Tensor) -> Tensor:
        x = x + self.token_causal_attn(self.norm0(x), keep)
        x = x + self.token_cross_attn(self.norm1(x), origin, keep)
        return x + self.mlp(self.norm2(x))


class TokenMerger(nn.Module):
    """ViT patch features (B, N, W) before its final norm and keep decisions (B, N) → merged
    features (B, N, W) (meaningful at the kept positions)."""

    def __init__(self, width: int, heads: int, layers: int, mlp_ratio: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"{heads} heads do not divide the merger's width {width}")
        self.blocks = nn.ModuleList(CausalFuserBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_vision = nn.LayerNorm(width)
        self.norm = nn.LayerNorm(width)
        self.apply(init_weights)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        origin = self.ln_vision(x)  # the raw ViT features, normalised: the dropped patches' keys and values
        for blk in self.blocks:
            x = blk(x, origin, keep)
        return self.norm(x)
