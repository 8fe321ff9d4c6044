"""The caption encoder of the contrastive (CLIP-style) trainings: stage 0 aligns the ViT with it,
SEED's Q-Former phase aligns its last query with it (frozen then).

Word tokens of a word-level text tokenizer trained on the captions → a small pre-norm
transformer → the mean over the caption's tokens → a projection. Dimensions: B captions, T
tokens, d width, e embedding size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lm.text import pad_id_of


class TextTower(nn.Module):
    """token ids (B, T) and mask (B, T) → caption embeddings (B, e), not normalised."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_length: int, embed_dim: int):
        super().__init__()
        self.max_length = max_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(max_length, width) * 0.01)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim, bias=False)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        ids, mask = ids[:, : self.max_length], mask[:, : self.max_length].bool()
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x, src_key_padding_mask=~mask)
        x = self.ln_final(x)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return self.text_projection(pooled)


def tokenize_captions(text_tok, captions: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Captions → (ids (B, T), mask (B, T)), right-padded, cut at ``max_length`` tokens."""
    rows = [
        text_tok(c, add_special_tokens=False)["input_ids"][:max_length] or [text_tok.unk_token_id] for c in captions
    ]
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id_of(text_tok), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def contrastive_loss(a: Tensor, b: Tensor, logit_scale: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE of paired rows a (B, e), b (B, e) (normalised here) → (loss, accuracy of
    picking the right partner, both directions averaged). Duplicate captions in a batch are each
    other's positives' rivals, as in CLIP."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100) * a @ b.t()
    target = torch.arange(len(a), device=a.device)
    loss = (
        F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing)
    ) / 2
    acc = ((logits.argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean()) / 2
    return loss, acc
