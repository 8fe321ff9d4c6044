"""Depth-head image decoding: the LLM steps once per code position, a small transformer emits
that position's G codes.

With the flat layout an image is h·w·D code tokens in the LLM's sequence (324 for the tiny
preset). With the depth head (RQ-Transformer / VILA-U style) it is one LLM position per cell of
the code grid (gh·gw = 81): the LLM's hidden state at a position goes into :class:`DepthHead`,
a causal transformer over G steps whose first input is that hidden state and whose later inputs
are the embeddings of the codes chosen so far; each step's output is scored against the unified
codebook's rows — the LLM's own input embeddings of the code tokens, so there is no new
vocabulary and no separate output table. What the LLM reads back for a written position is the
aggregated embedding of its G codes (the tokenizer's ``position_latents``), the same Ẑ it reads when it
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

    def __init__(
        self,
        dim: int,
        depth: int,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        width: int = 0,
        std: float = 0.02,
    ):
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
            nn.TransformerEncoderLayer(
                width, heads, mlp_ratio * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
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

    def decoder(self, rows: Tensor, linear=F.linear) -> "HeadDecoder":
        """What decoding against the code rows ``rows`` (K, d) needs, computed once per image batch."""
        return HeadDecoder(self, rows, linear)


class HeadDecoder:
    """Depth-head decoding of one position at a time, with a key/value cache over its G steps.

    The same arithmetic as :meth:`DepthHead.forward` (pre-norm blocks, causal attention, exact
    GELU), restated for one new input per step so each step reads the head's weights once. The
    code rows are folded into the head's width once per image batch: inputs ``down(rows)`` and
    scores ``(rows · W_out)`` (K, width), so a step reads K × width floats to score the codes
    instead of projecting up to d first. ``linear(x, weight, bias)``: decoding passes the
    small-batch kernel on CPU.
    """

    def __init__(self, head: DepthHead, rows: Tensor, linear=F.linear):
        self.head, self.linear = head, linear
        rows = rows.to(head.pos.dtype)
        self.in_rows = head.down(rows).contiguous()  # (K, width): a code's input before its depth embedding
        self.out_rows = (rows @ head.out.weight).contiguous()  # (K, width): f·out_rowsᵀ = out(f)·rowsᵀ
        self.layers = []
        for blk in head.blocks:
            attn = blk.self_attn
            self.layers.append(
                (
                    blk.norm1,
                    attn.in_proj_weight,
                    attn.in_proj_bias,
                    attn.out_proj.weight,
                    attn.out_proj.bias,
                    blk.norm2,
                    blk.linear1,
                    blk.linear2,
                    attn.num_heads,
                )
            )

    def _step(self, x: Tensor, k: int, keys: list[Tensor], values: list[Tensor]) -> Tensor:
        """Input ``x`` (B, width) at depth step ``k`` → the normed output there; fills the caches."""
        lin = self.linear
        for i, (n1, w_qkv, b_qkv, w_o, b_o, n2, fc1, fc2, heads) in enumerate(self.layers):
            b, w = x.shape
            q, key, value = (
                lin(F.layer_norm(x, (w,), n1.weight, n1.bias, n1.eps), w_qkv, b_qkv).view(b, 3, heads, 1, -1).unbind(1)
            )
            keys[i][:, :, k : k + 1], values[i][:, :, k : k + 1] = key, value
            o = F.scaled_dot_product_attention(q, keys[i][:, :, : k + 1], values[i][:, :, : k + 1])  # (B, heads, 1, e)
            x = x + lin(o.reshape(b, w), w_o, b_o)
            x = x + lin(
                F.gelu(lin(F.layer_norm(x, (w,), n2.weight, n2.bias, n2.eps), fc1.weight, fc1.bias)),
                fc2.weight,
                fc2.bias,
            )
        norm = self.head.norm
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    @torch.no_grad()
    def sample(self, hidden: Tensor, pick, guided_rows: int = 0, cfg_scale: float = 1.0) -> Tensor:
        """Codes (B, G) of one position, in depth order. ``hidden`` (B', d) — with guidance the
        conditional rows first, then ``guided_rows`` unconditional ones; ``pick(logits (B, K)) →
        codes (B,)``."""
        head = self.head
        n, b = hidden.shape[0], hidden.shape[0] - guided_rows
        width, g = self.in_rows.shape[1], head.depth
        heads = self.layers[0][-1] if self.layers else 1
        keys = [hidden.new_empty(n, heads, g, width // heads) for _ in self.layers]
        values = [torch.empty_like(t) for t in keys]
        x = hidden.to(self.in_rows.dtype)
        if isinstance(head.down, nn.Linear):
            x = self.linear(x, head.down.weight, None)
        chosen: list[Tensor] = []
        for k in range(g):
            logits = self.linear(self._step(x + head.pos[k], k, keys, values), self.out_rows, None).float()
            if guided_rows:
                logits = logits[b:] + cfg_scale * (logits[:b] - logits[b:])
            code = pick(logits)
            chosen.append(code)
            if k + 1 < g:
                x = self.in_rows[torch.cat([code, code]) if guided_rows else code]
        return torch.stack(chosen, 1)


def depth_loss(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and the number of right codes, logits (N, G, K), target (N, G)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum")
    right = (logits.argmax(-1) == target).sum()
    return loss, right
