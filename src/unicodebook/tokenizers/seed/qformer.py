"""SEED's causal Q-Former: N learnable queries, causal among themselves, cross-attending to the
ViT's patch features every ``cross_attention_freq``-th layer.

A BERT-style (post-norm) transformer over the queries alone, as BLIP-2's Q-Former runs when it
is given no text. Parameter names follow the BERT / BLIP-2 modules the official checkpoint was
saved from (``bert.encoder.layer.{i}.attention.self.query``, ``crossattention``,
``intermediate_query``, ``output_query``, …), so a local official state dict maps onto ours by
name (``tokenizers/seed/official.py``). Dimensions: B batch, N queries, P patches, d width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN_EPS = 1e-12  # BERT's


class _Attention(nn.Module):
    """``query`` / ``key`` / ``value`` projections (keys and values from ``kv_dim`` inputs)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim or dim, dim)
        self.value = nn.Linear(kv_dim or dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, causal: bool = False) -> Tensor:
        ctx = x if context is None else context
        b, n, d = x.shape
        q, k, v = (
            t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)
            for t in (self.query(x), self.key(ctx), self.value(ctx))
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return out.transpose(1, 2).reshape(b, n, d)


class _Output(nn.Module):
    """``dense`` then ``LayerNorm(residual + ·)`` (BERT's post-norm)."""

    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.dense = nn.Linear(d_in, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _AttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.self = _Attention(dim, heads, kv_dim)
        self.output = _Output(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, causal: bool = False) -> Tensor:
        return self.output(self.self(x, context, causal), x)


class _Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention among the queries (causal or not), cross-attention to the patches (in the
    layers that have it), then the queries' feed-forward."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, kv_dim: int | None):
        super().__init__()
        self.attention = _AttentionBlock(dim, heads)
        self.has_cross_attention = kv_dim is not None
        if self.has_cross_attention:
            self.crossattention = _AttentionBlock(dim, heads, kv_dim)
        hidden = int(dim * mlp_ratio)
        self.intermediate_query = _Intermediate(dim, hidden)
        self.output_query = _Output(hidden, dim)

    def forward(self, x: Tensor, patches: Tensor | None, causal: bool) -> Tensor:
        x = self.attention(x, causal=causal)
        if self.has_cross_attention and patches is not None:
            x = self.crossattention(x, patches)
        return self.output_query(self.intermediate_query(x), x)


class _Embeddings(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(dim, eps=LN_EPS)


class _Encoder(nn.Module):
    def __init__(self, layers: list[QFormerLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class _Bert(nn.Module):
    def __init__(self, dim: int, layers: list[QFormerLayer]):
        super().__init__()
        self.embeddings = _Embeddings(dim)
        self.encoder = _Encoder(layers)


class QFormer(nn.Module):
    """queries (B, N, d) and patch features (B, P, kv_dim) → (B, N, d).

    ``cross_every``: layers 0, k, 2k, … cross-attend (BLIP-2's ``cross_attention_freq``).
    ``causal``: each query sees only the queries before it (SEED), so the i-th output depends on
    the first i queries only — the property that makes SEED's tokens a left-to-right sequence."""

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        kv_dim: int,
        cross_every: int = 2,
        mlp_ratio: float = 4.0,
        causal: bool = True,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide the Q-Former width {dim}")
        self.causal = causal
        self.bert = _Bert(
            dim, [QFormerLayer(dim, heads, mlp_ratio, kv_dim if i % cross_every == 0 else None) for i in range(layers)]
        )

    def forward(self, queries: Tensor, patches: Tensor | None) -> Tensor:
        x = self.bert.embeddings.LayerNorm(queries)
        for layer in self.bert.encoder.layer:
            x = layer(x, patches, self.causal)
        return x


def init_queries(n: int, dim: int, std: float = 0.02) -> nn.Parameter:
    """BLIP-2's ``query_tokens`` (1, N, d)."""
    return nn.Parameter(torch.randn(1, n, dim) * std)
