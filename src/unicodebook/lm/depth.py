"""Depth-head image decoding: the LLM steps once per code position, a small transformer emits
that position's G codes.

With the flat layout an image is h·w·D code tokens in the LLM's sequence (324 for the tiny
preset). With the depth head (RQ-Transformer / VILA-U style) it is one LLM position per cell of
the code grid (gh·gw = 81): the LLM's hidden state at a position goes into :class:`DepthHead`,
a causal transformer over G steps whose first input is that hidden state and whose later inputs
are the embeddings of the codes chosen so far; each step's output is scored against the unified
codebook's rows — the LLM's own input embeddings of the code tokens, so there is no new
vocabulary and no separate output table. What the LLM reads back for a written position is the
aggregated embedding of its G codes (:func:`position_latents`), the same Ẑ it reads when it
looks at an image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DepthHead(nn.Module):
    """hidden (N, d) and the embeddings of the first G−1 codes (N, G−1, d) → logits (N, G, K)
    over the K code rows ``rows`` (K, d).

    ``width``: the transformer's own width (0: the LLM's d). A narrower head reads fewer weights
    per code when decoding a large LLM; its inputs are projected down and its outputs back up to
    d, where they are scored against the code rows."""

    def __init__(self, dim: int, depth: int, layers: int = 2, heads: int = 4, mlp_ratio: int = 4, width: int = 0,
                 std: float = 0.02):
        super().__init__()
        if depth < 2:
            raise ValueError(f"a depth head needs codes of depth ≥ 2 per position; this tokenizer has {depth}")
        width = width or dim
        if width % heads:
            raise ValueError(f"depth head: {heads} heads do not divide its width {width}")
        self.depth = depth
        self.down = nn.Identity() if width == dim else nn.Linear(dim, width, bias=False)
        self.pos = nn.Parameter(torch.randn(depth, width) * std)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, mlp_ratio * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim, bias=False)
        self.register_buffer("causal", torch.triu(torch.full((depth, depth), float("-inf")), 1), persistent=False)

    def features(self, hidden: Tensor, code_emb: Tensor) -> Tensor:
        """The transformer's output (N, n, width) for the inputs so far (n = 1 + codes given)."""
        x = self.down(torch.cat([hidden[:, None], code_emb], 1))
        n = x.shape[1]
        x = x + self.pos[:n].to(x.dtype)
        for blk in self.blocks:
            x = blk(x, src_mask=self.causal[:n, :n].to(x.dtype))
        return self.norm(x)

    def forward(self, hidden: Tensor, code_emb: Tensor, rows: Tensor) -> Tensor:
        return self.out(self.features(hidden, code_emb)) @ rows.to(hidden.dtype).t()

    @torch.no_grad()
    def sample(self, hidden: Tensor, rows: Tensor, embed, pick, guided_rows: int = 0, cfg_scale: float = 1.0,
               score=F.linear) -> Tensor:
        """Codes (B, G) of one position, in depth order. ``hidden`` (B', d) — with guidance the
        conditional rows first, then ``guided_rows`` unconditional ones; ``embed(codes (B,)) →
        (B, d)``; ``pick(logits (B, K)) → codes (B,)``; ``score(x, rows)`` = x·rowsᵀ (decoding
        passes a small-batch kernel)."""
        b = hidden.shape[0] - guided_rows
        chosen: list[Tensor] = []
        emb = hidden.new_zeros(hidden.shape[0], 0, hidden.shape[1])
        for _ in range(self.depth):
            logits = score(self.out(self.features(hidden, emb)[:, -1]), rows).float()  # the last step's only
            if guided_rows:
                logits = logits[b:] + cfg_scale * (logits[:b] - logits[b:])
            code = pick(logits)
            chosen.append(code)
            e = embed(code)
            if guided_rows:
                e = torch.cat([e, e])
            emb = torch.cat([emb, e[:, None]], 1)
        return torch.stack(chosen, 1)


def position_latents(quantizer, codes: Tensor) -> Tensor:
    """codes (B, n, G) of n code positions → (B, n, d): each position's aggregated code embedding.

    RQ: the sum of its D codebook rows, i.e. Ẑ at that position. HQ: its top code and the 2×2
    bottom codes under it fused as the tokenizer fuses them, averaged over the 2×2 latent cells
    it covers. Computed position by position, so a generated position is read exactly as the
    same position of an encoded image."""
    b, n, g = codes.shape
    z = quantizer.codes_to_embeddings(codes.reshape(b * n, 1, 1, g))  # (B·n, k, k, d)
    return z.mean((1, 2)).reshape(b, n, -1)


def depth_loss(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and the number of right codes, logits (N, G, K), target (N, G)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum")
    right = (logits.argmax(-1) == target).sum()
    return loss, right
