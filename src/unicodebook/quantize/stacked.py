"""Stacked quantization over the unified codebook: residual (RQ) and hierarchical (HQ).

Dimensions: B batch, h×w latent map (the decoder's input resolution), D code layers,
d hidden size (= the LLM's), V codebook rows.

Both quantizers take ``z (B, h, w, d)`` and return a :class:`QuantOutput` whose ``quantized``
is the aggregated ``Ẑ = F(e(M_1..M_D))`` with a straight-through gradient to ``z``, and whose
``codes`` is the *code grid* ``(B, gh, gw, G)``:

* RQ: ``gh, gw = h, w`` and ``G = D`` (layer-major per position); F = sum.
* HQ: a top map at half resolution (pixel-unshuffle) and a bottom map that quantizes the
  residual; ``gh, gw = h/2, w/2`` and each top position groups its ``D`` top codes followed by
  the ``4·D`` codes of the 2×2 bottom positions under it (row-major), i.e. ``G = 5·D``;
  F = concatenation of the up-projected top and the bottom, fused by a 1×1 projection.

``codes_to_embeddings(codes)`` gives back ``quantized`` exactly (in eval), which is what the
LLM consumes (docs/design.md, "Data flow").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..utils.distributed import mean_with_grad, world_size
from .codebook import UnifiedCodebook

LAYER_ROWS = ("shared", "split")


@dataclass
class QuantOutput:
    quantized: Tensor  # (B, h, w, d) aggregated, straight-through
    codes: Tensor  # (B, gh, gw, G) long code indices (rows of the codebook)
    loss: Tensor  # scalar: β·commitment + entropy_weight·usage entropy (what training adds)
    usage_loss: Tensor | None = None  # the unweighted usage-entropy term, when it is on


class ResidualQuantizer(nn.Module):
    """D passes of one codebook over the residual; aggregation F = sum.

    ``layer_rows``: ``shared`` — every layer searches all V rows (the paper's); ``split`` — layer
    l has its own V/D rows (``UnifiedCodebook.split_rows``), the codebooks of classic residual
    VQ laid side by side in one table. At equal bits a code (V/D rows a layer against V), split
    costs D times the LLM rows; on photos one shared table loses most of what depth adds (docs/tokenizers.md).
    """

    def __init__(
        self,
        codebook: UnifiedCodebook,
        depth: int,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.1,
        layer_rows: str = "shared",
    ):
        super().__init__()
        if depth < 1:
            raise ValueError("quantizer depth must be >= 1")
        if layer_rows not in LAYER_ROWS:
            raise ValueError(f"layer_rows must be one of {LAYER_ROWS}, got {layer_rows!r}")
        self.codebook = codebook
        self.depth = depth
        self.split = layer_rows == "split"
        if self.split:
            codebook.split_rows(depth)
        self.beta = beta
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.entropy_samples = 1024
        self._pending: list[tuple[Tensor, Tensor]] = []  # (features, codes) for the EMA update

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """z (..., d) → summed codes (..., d), codes (..., D), per-layer inputs (D·N, d) (training only)."""
        flat = z.detach().reshape(-1, z.shape[-1]).float()
        start = self.training and not bool(self.codebook.initialised)
        if start and not self.split:
            self.codebook.kmeans_init(flat)
        residual = flat
        codes, inputs = [], []
        for layer in range(self.depth):
            group = layer if self.split else None
            if start and self.split:  # residual k-means: layer l's rows from what layers < l left
                self.codebook.kmeans_init(residual, group=group)
            idx, _ = self.codebook.search(residual, group)
            if self.training:  # the EMA update needs what each layer quantized
                inputs.append(residual)
            codes.append(idx)
            residual = residual - self.codebook.lookup(idx)
        codes_t = torch.stack(codes, -1).reshape(*z.shape[:-1], self.depth)
        # position-major (N, D, d): the order is the same whether the batch is split across
        # ranks or not, so restarts drawn from it are too
        inputs_t = torch.stack(inputs, 1).reshape(-1, flat.shape[-1]) if inputs else None
        # the aggregate is rebuilt from the codes, so codes_to_embeddings(codes) is bit-identical
        return self.codes_to_embeddings(codes_t).to(z.dtype), codes_t, inputs_t

    def forward(self, z: Tensor) -> QuantOutput:
        with torch.autocast("cuda" if z.is_cuda else "cpu", enabled=False):  # distances, losses and EMA maths in fp32
            return self._forward(z)

    def _forward(self, z: Tensor) -> QuantOutput:
        q, codes, inputs = self.quantize(z)
        # commitment: pull the encoder output towards the (stop-gradient) aggregated codes
        loss = self.beta * F.mse_loss(z.float(), q.detach().float())
        usage = None
        if self.training and self.entropy_weight > 0 and self.codebook.mode != "dual":
            # dual's EMA codebook chases the encoder this term pushes apart (measured: stage I
            # stuck at 16 dB); there, dead-code restarts keep usage up instead
            usage = self.usage_entropy_loss(z, codes)
            loss = loss + self.entropy_weight * usage
        if self.training:
            self._pending.append((inputs, codes.reshape(-1)))
        quantized = z + (q - z).detach() if self.training else q  # straight-through in training
        return QuantOutput(quantized, codes, loss, usage)

    def usage_entropy_loss(self, z: Tensor, codes: Tensor) -> Tensor:
        """Mean over layers of H(p(code | r)) − H(E[p(code | r)]), normalised by log V.

        p is a softmax over negative squared distances of each layer's residual r to the
        codebook (temperature = ``entropy_temperature`` × mean ‖C‖²). Minimising it makes
        each assignment confident and the batch's codes spread over the whole codebook
        (the entropy term of MAGVIT-2's LFQ); the gradient reaches the encoder through r.
        Memory: n×V per layer for n = min(N, entropy_samples) vectors. Under torch.distributed
        each rank scores its share of the subset and the marginal is all-reduced, so the term
        is that of the global batch.
        """
        cb = self.codebook.embed
        flat = z.reshape(-1, z.shape[-1]).float()
        flat_codes = codes.reshape(-1, self.depth)
        world = world_size()
        samples = max(1, self.entropy_samples // world)  # each rank's share of the global subset
        if flat.shape[0] > samples:  # a random subset estimates the batch marginal
            keep = torch.randperm(flat.shape[0], device=flat.device)[:samples]
            flat, flat_codes = flat[keep], flat_codes[keep]
        prev = torch.zeros_like(flat)
        tau = self.entropy_temperature * cb.pow(2).sum(1).mean().clamp_min(1e-12)
        total = flat.new_zeros(())
        for layer in range(self.depth):
            lo, hi = self.codebook.group_rows(layer if self.split else None)
            rows = cb[lo:hi]
            sq = rows.pow(2).sum(1)
            r = flat - prev
            logits = -(r.pow(2).sum(1, keepdim=True) - 2 * r @ rows.t() + sq) / tau  # (N, V) or (N, V/D)
            logp = logits.log_softmax(1)
            p = logp.exp()
            per_sample = -(p * logp).sum(1).mean()
            avg = p.mean(0)
            avg = mean_with_grad(avg)  # the marginal of the global batch
            marginal = -(avg * avg.clamp_min(1e-12).log()).sum()
            total = total + (per_sample - marginal)
            prev = prev + self.codebook.lookup(flat_codes[:, layer])
        return total / (self.depth * math.log(self.codebook.num_codes // self.codebook.groups))

    def grid_shape(self, latent_hw: int) -> tuple[int, int, int]:
        """(gh, gw, G) of the code grid for a square latent of side ``latent_hw``: D codes a position."""
        return latent_hw, latent_hw, self.depth

    @property
    def layer_names(self) -> list[str]:
        """One name per code layer (the columns of :meth:`code_layers`)."""
        return [f"layer {i}" for i in range(self.depth)]

    def code_layers(self, codes: Tensor) -> Tensor:
        """codes (B, gh, gw, D) → (N, D): one column per code layer."""
        return codes.reshape(-1, self.depth)

    def codes_to_embeddings(self, codes: Tensor) -> Tensor:
        """codes (..., D) → Σ_l e(codes_l) (..., d), summed layer by layer in order."""
        total = self.codebook.lookup(codes[..., 0])  # one (..., d) at a time, never (..., D, d)
        for layer in range(1, codes.shape[-1]):
            total = total + self.codebook.lookup(codes[..., layer])
        return total

    def pop_updates(self) -> tuple[Tensor, Tensor] | None:
        if not self._pending:
            return None
        feats = torch.cat([f for f, _ in self._pending])
        codes = torch.cat([c for _, c in self._pending])
        self._pending.clear()
        return feats, codes


class HierarchicalQuantizer(nn.Module):
    """Top map at half resolution + bottom map on the residual; F = concat → 1×1 projection."""

    def __init__(
        self,
        codebook: UnifiedCodebook,
        depth: int,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.1,
    ):
        super().__init__()
        d = codebook.dim
        self.codebook = codebook
        self.depth = depth
        self.top = ResidualQuantizer(codebook, depth, beta, entropy_weight, entropy_temperature)
        self.bottom = ResidualQuantizer(codebook, depth, beta, entropy_weight, entropy_temperature)
        self.down = nn.Linear(4 * d, d)  # pixel-unshuffled 2×2 block → top feature
        self.up = nn.Linear(d, 4 * d)  # top code → 2×2 block (pixel-shuffle)
        self.fuse = nn.Linear(2 * d, d)  # concat(top-up, bottom) → Ẑ

    def _split(self, z: Tensor) -> Tensor:
        return rearrange(z, "b (h p) (w q) d -> b h w (p q d)", p=2, q=2)

    def _unsplit(self, t: Tensor) -> Tensor:
        return rearrange(t, "b h w (p q d) -> b (h p) (w q) d", p=2, q=2)

    def forward(self, z: Tensor) -> QuantOutput:
        if z.shape[1] % 2 or z.shape[2] % 2:
            raise ValueError(f"HQ needs an even latent size, got {tuple(z.shape[1:3])}")
        top_in = self.down(self._split(z))  # (B, h/2, w/2, d)
        top = self.top(top_in)
        top_up = self._unsplit(self.up(top.quantized))  # (B, h, w, d)
        bottom = self.bottom(z - top_up)
        out = self.fuse(torch.cat([top_up, bottom.quantized], -1))
        codes = self.group_codes(top.codes, bottom.codes)
        usage = None if top.usage_loss is None else (top.usage_loss + bottom.usage_loss) / 2
        return QuantOutput(out, codes, top.loss + bottom.loss, usage)

    def group_codes(self, top: Tensor, bottom: Tensor) -> Tensor:
        """top (B,h/2,w/2,D), bottom (B,h,w,D) → grid (B,h/2,w/2,5D): D top then 2×2×D bottom."""
        return torch.cat([top, rearrange(bottom, "b (h p) (w q) D -> b h w (p q D)", p=2, q=2)], -1)

    def ungroup_codes(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        top, bot = codes[..., : self.depth], codes[..., self.depth :]
        return top, rearrange(bot, "b h w (p q D) -> b (h p) (w q) D", p=2, q=2)

    def grid_shape(self, latent_hw: int) -> tuple[int, int, int]:
        """(gh, gw, G): one cell a top position, holding its D top and 2×2×D bottom codes."""
        if latent_hw % 2:
            raise ValueError(f"HQ needs an even latent size; got {latent_hw}")
        return latent_hw // 2, latent_hw // 2, 5 * self.depth

    @property
    def layer_names(self) -> list[str]:
        return [f"top {i}" for i in range(self.depth)] + [f"bottom {i}" for i in range(self.depth)]

    def code_layers(self, codes: Tensor) -> Tensor:
        """codes (B, gh, gw, 5D) → (N, 2D): the top layers, then the bottom layers. The 4× fewer
        top rows are repeated 4 times, which leaves their usage and perplexity unchanged."""
        top, bottom = self.ungroup_codes(codes)
        return torch.cat([top.reshape(-1, self.depth).repeat(4, 1), bottom.reshape(-1, self.depth)], 1)

    def codes_to_embeddings(self, codes: Tensor) -> Tensor:
        top, bottom = self.ungroup_codes(codes)
        top_up = self._unsplit(self.up(self.top.codes_to_embeddings(top)))
        return self.fuse(torch.cat([top_up, self.bottom.codes_to_embeddings(bottom)], -1))

    def pop_updates(self) -> tuple[Tensor, Tensor] | None:
        parts = [p for p in (self.top.pop_updates(), self.bottom.pop_updates()) if p is not None]
        if not parts:
            return None
        return torch.cat([f for f, _ in parts]), torch.cat([c for _, c in parts])


def build_quantizer(
    kind: str,
    codebook: UnifiedCodebook,
    depth: int,
    beta: float,
    entropy_weight: float = 0.0,
    entropy_temperature: float = 0.1,
    layer_rows: str = "shared",
) -> nn.Module:
    if kind == "rq":
        return ResidualQuantizer(codebook, depth, beta, entropy_weight, entropy_temperature, layer_rows)
    if kind == "hq":
        if layer_rows != "shared":
            raise ValueError("layer_rows=split needs the rq quantizer (HQ's two levels share the rows)")
        return HierarchicalQuantizer(codebook, depth, beta, entropy_weight, entropy_temperature)
    raise ValueError(f"unknown quantizer kind {kind!r} (rq or hq)")


def position_embeddings(quantizer, codes: Tensor) -> Tensor:
    """codes (B, n, G) of n code positions → (B, n, d): each position's aggregated code embedding.

    RQ: the sum of its D codebook rows, i.e. Ẑ at that position. HQ: its top code and the 2×2
    bottom codes under it fused as the quantizer fuses them, averaged over the 2×2 latent cells
    it covers. Computed position by position, so a generated position is read exactly as the
    same position of an encoded image."""
    b, n, g = codes.shape
    z = quantizer.codes_to_embeddings(codes.reshape(b * n, 1, 1, g))  # (B·n, k, k, d)
    return z.mean((1, 2)).reshape(b, n, -1)
