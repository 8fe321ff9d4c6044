"""LaVIT's feature de-tokenizer (the official ``VQDecoder``, held as ``tokenizer_decoder``): a
variable number of quantised tokens → one feature per ViT patch.

The tokens (B, L, c) go up to the width (``in_proj``) and get a position embedding by their rank in
the kept sequence (``pos_embed[:, :L]``: rank, not patch location, as the official one). One
learnable query per patch (``query_embed``, N of them) runs through blocks of self-attention among
the queries, cross-attention to the tokens (padding masked out) and an MLP; a final ``norm``,
then ``decode_task_layer`` (Linear–Tanh–Linear) gives the reconstruction of the ViT's patch
features, trained under 1 − cosine. The official ``unet_proj`` (to Stable Diffusion's 768-d
condition) has no counterpart: our pixel decoders read the reconstruction itself.
Dimensions: B images, L tokens (the most in the batch), N patches, c code size, W width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..vit import Attention as SelfAttention  # full self-attention, official names qkv / proj
from ..vit import Mlp


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        """queries (B, N, W) read ``tokens`` (B, L, W) where ``mask`` (B, L) is true → (B, N, W)."""
        (b, n, w), h = x.shape, self.heads
        q = self.query(x).reshape(b, n, h, w // h).transpose(1, 2)
        k, v = (f(tokens).reshape(b, -1, h, w // h).transpose(1, 2) for f in (self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm0 = nn.LayerNorm(width)
        self.self_attn = SelfAttention(width, heads)
        self.norm1 = nn.LayerNorm(width)
        self.cross_attn = CrossAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), tokens, mask)
        return x + self.mlp(self.norm2(x))


class FeatureDecoder(nn.Module):
    """quantised tokens (B, L, c) and their mask (B, L) → reconstructed patch features (B, N, W).
    Every image needs at least one real token."""

    def __init__(self, code_dim: int, width: int, patches: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"{heads} heads do not divide the de-tokenizer's width {width}")
        self.in_proj = nn.Linear(code_dim, width)
        self.pos_embed = nn.Parameter(torch.empty(1, patches, width))  # by rank in the kept sequence
        self.query_embed = nn.Parameter(torch.empty(1, patches, width))  # one query per patch
        for p in (self.pos_embed, self.query_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.decode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, zq: Tensor, mask: Tensor) -> Tensor:
        tokens = self.in_proj(zq) + self.pos_embed[:, : zq.shape[1]]
        x = self.query_embed.expand(zq.shape[0], -1, -1)
        for blk in self.blocks:
            x = blk(x, tokens, mask)
        return self.decode_task_layer(self.norm(x))
