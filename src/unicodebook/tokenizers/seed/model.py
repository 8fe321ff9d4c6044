"""The SEED tokenizer: frozen ViT features → causal Q-Former → VQ → de-tokenizer → pixels.

Encode: the ViT's tokens (``visual_encoder``, before its final norm, then ``ln_vision``) are read by N learnable
queries through the causal Q-Former; each of its N outputs goes through ``encode_task_layer``
(Linear–Tanh–Linear down to c) to the nearest of K codes (``quantize``). The N codes form a
left-to-right sequence: output i depends on the first i queries only.

Decode: the codes' embeddings go back up (``decode_task_layer``), through the reconstruction
branch (bidirectional blocks; trained to match the Q-Former's outputs under 1 − cosine) and the
pixel decoder (ours by default: a grid of learnable queries cross-attending to the N embeddings,
then the conv decoder of the UniCode autoencoder). The generation branch (blocks and a one-query
reverse Q-Former) regresses the ViT's image embedding (MSE), the vector a diffusion decoder is
conditioned on: the original conditions Stable unCLIP on it, ``pixel_decoder: diffusion`` a small
pixel-space UNet (``diffusion.py``; decode samples it from a fixed seed, so it stays deterministic).

Parameter names are the official checkpoint's where the modules correspond (``query_tokens``,
``ln_vision``, ``Qformer.bert…``, ``encode_task_layer``, ``quantize.embedding``,
``decode_task_layer``, ``pos_embed`` / ``blocks``, ``pos_embed_image`` / ``blocks_image``,
``reverse_tokens`` / ``Reverse_Qformer`` / ``distill_image_proj``); ``official.py`` maps a local
official state dict onto ours.

Dimensions: B images, P patches, N queries (= codes per image), d Q-Former width, c code size,
K codes, e the ViT's embedding size. Images enter and leave as (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import SeedModelConfig
from ..base import CodeLayout, VisualTokenizer
from ..unicode.autoencoder import Decoder
from ..vit import Block, VisionTransformer
from .qformer import QFormer, init_queries
from .quantizer import VectorQuantizer

DECODER_GRID = 4  # the pixel decoder's latent is image_size / DECODER_GRID on a side
DECODE_SEED = 0  # the diffusion decoder's starting noise in decode, every image's


@dataclass
class SeedOutput:
    causal: Tensor  # (B, N, d) the Q-Former's outputs (the reconstruction target)
    codes: Tensor  # (B, N)
    vq_loss: Tensor
    recon: Tensor  # (B, N, d) the reconstruction branch's output from the quantised codes
    generation: Tensor  # (B, e) the generation branch's image embedding


def task_mlp(d_in: int, d_out: int, hidden: int) -> nn.Sequential:
    """Linear–Tanh–Linear: the task layers SEED and LaVIT put before and after their codebooks."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


class PixelDecoder(nn.Module):
    """(B, N, d) token embeddings → (B, 3, H, W): an h×h grid of queries cross-attends to the
    tokens (``reader_layers`` layers), then the conv decoder (UniCode's, widths ``ch``·``mult``)
    upsamples ×4."""

    def __init__(
        self,
        dim: int,
        heads: int,
        image_size: int,
        ch: int,
        mult: list[int] = (1, 2, 2),
        res_blocks: int = 1,
        reader_layers: int = 2,
    ):
        super().__init__()
        side = image_size // DECODER_GRID
        self.side = side
        self.grid_queries = init_queries(side * side, dim)
        self.reader = QFormer(dim, reader_layers, heads, kv_dim=dim, cross_every=1, causal=False)
        self.decoder = Decoder(
            ch=ch, ch_mult=list(mult), num_res_blocks=res_blocks, z_channels=dim, resolution=image_size
        )

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.reader(self.grid_queries.expand(tokens.shape[0], -1, -1), tokens)
        x = x.transpose(1, 2).reshape(tokens.shape[0], -1, self.side, self.side)
        return (self.decoder(x) + 1) / 2


class SeedTokenizer(VisualTokenizer):
    """The SEED tokenizer at the sizes of ``cfg`` (a :class:`~unicodebook.config.SeedModelConfig`);
    ``unet``: the diffusion decoder's UNet (a loaded or rebuilt one; None: a fresh one from ``cfg``)."""

    family = "seed"
    reads = "codes"
    tasks = ("instruct", "t2i")  # an image read and an image written are the same ids: no decompression

    def __init__(self, cfg: SeedModelConfig, visual_encoder: VisionTransformer, unet: nn.Module | None = None):
        super().__init__()
        if cfg.image_size % DECODER_GRID:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by {DECODER_GRID}")
        qc = cfg.qformer
        self.image_size = cfg.image_size
        self.num_codes = cfg.num_codes
        self.layout = CodeLayout(qc.queries)
        self.visual_encoder = visual_encoder.requires_grad_(False)
        vw, e = visual_encoder.width, visual_encoder.embed_dim
        self.ln_vision = nn.LayerNorm(vw)
        self.query_tokens = init_queries(qc.queries, qc.width)
        self.Qformer = QFormer(
            qc.width,
            qc.layers,
            qc.heads,
            kv_dim=vw,
            cross_every=qc.cross_attention_freq,
            mlp_ratio=qc.mlp_ratio,
            causal=True,
        )
        self.vision_proj = nn.Linear(qc.width, cfg.contrastive_dim or e)  # the last query → the contrastive space
        self.encode_task_layer = task_mlp(qc.width, cfg.code_dim, qc.width)
        self.quantize = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.kmeans_init)
        self.decode_task_layer = task_mlp(cfg.code_dim, qc.width, cfg.code_dim)
        # the reconstruction branch (the official ``pos_embed`` + ``blocks``)
        self.pos_embed = nn.Parameter(torch.zeros(1, qc.queries, qc.width))
        self.blocks = nn.ModuleList(Block(qc.width, qc.heads, 4.0) for _ in range(cfg.recon_blocks))
        # the generation branch: blocks, then a one-query reverse Q-Former reading them
        self.pos_embed_image = nn.Parameter(torch.zeros(1, qc.queries, qc.width))
        self.blocks_image = nn.ModuleList(Block(qc.width, qc.heads, 4.0) for _ in range(cfg.gen_blocks))
        self.reverse_tokens = init_queries(1, qc.width)
        self.Reverse_Qformer = QFormer(
            qc.width, cfg.reverse_layers, qc.heads, kv_dim=qc.width, cross_every=qc.cross_attention_freq, causal=False
        )
        self.distill_image_proj = nn.Linear(qc.width, cfg.generation_dim or e)
        self.pixel_kind = cfg.pixel_decoder
        if cfg.pixel_decoder == "diffusion":
            self.pixel_decoder = diffusion_decoder(cfg, self.distill_image_proj.out_features, unet)
            self.sampling = (cfg.diffusion.steps, cfg.diffusion.guidance)
        else:
            self.pixel_decoder = PixelDecoder(
                qc.width,
                qc.heads,
                cfg.image_size,
                cfg.decoder_ch,
                cfg.decoder_mult,
                cfg.decoder_res_blocks,
                cfg.decoder_reader_layers,
            )

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    # ---------------------------------------------------------------- the pipeline
    def causal_embeddings(self, images: Tensor) -> Tensor:
        """images → the Q-Former's N outputs (B, N, d)."""
        self._check_images(images)
        with torch.no_grad():  # every token, the class token too, before the ViT's own final norm (as BLIP-2)
            tokens = self.visual_encoder.forward_tokens(images.to(self.device), normed=False)
        return self.Qformer(self.query_tokens.expand(images.shape[0], -1, -1), self.ln_vision(tokens))

    def contrastive_embedding(self, causal: Tensor) -> Tensor:
        """The last query's projection (B, e): what SEED aligns with the caption."""
        return self.vision_proj(causal[:, -1])

    def detokenize(self, zq: Tensor) -> tuple[Tensor, Tensor]:
        """Quantised codes (B, N, c) → (the reconstructed causal embeddings (B, N, d), the
        generation embedding (B, e))."""
        t = self.decode_task_layer(zq)
        recon, g = t + self.pos_embed, t + self.pos_embed_image
        for blk in self.blocks:
            recon = blk(recon)
        for blk in self.blocks_image:
            g = blk(g)
        g = self.Reverse_Qformer(self.reverse_tokens.expand(t.shape[0], -1, -1), g)[:, 0]
        return recon, self.distill_image_proj(g)

    def forward(self, images: Tensor, step: int = 0) -> SeedOutput:
        causal = self.causal_embeddings(images)
        zq, codes, vq_loss = self.quantize(self.encode_task_layer(causal), step)
        recon, gen = self.detokenize(zq)
        return SeedOutput(causal, codes, vq_loss, recon, gen)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] → codes (B, N)."""
        return self.quantize.lookup(self.encode_task_layer(self.causal_embeddings(images)))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, N) → images (B, 3, H, W) in [0, 1]."""
        self._check_codes(codes)
        recon, gen = self.detokenize(self.quantize.embedding(codes.to(self.device).long()))
        if self.pixel_kind == "diffusion":
            return self.pixel_decoder.draw(gen, *self.sampling, DECODE_SEED)
        return self.pixel_decoder(recon).clamp(0, 1)

    def code_layers(self, codes: Tensor) -> tuple[Tensor, list[str]]:
        """Usage per query position would be N columns; SEED's one codebook serves them all."""
        return codes.reshape(-1, 1), ["codes"]

    def save_frozen(self, folder) -> None:
        from .build import save_tokenizer

        save_tokenizer(self, folder)

    # ---------------------------------------------------------------- checks
    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")

    def _check_codes(self, codes: Tensor) -> None:
        if codes.ndim != 2 or codes.shape[1] != self.layout.length:
            raise ValueError(f"expected codes (B, {self.layout.length}), got {tuple(codes.shape)}")
        if (codes < 0).any() or (codes >= self.num_codes).any():
            raise ValueError(f"codes must be indices in [0, {self.num_codes})")


def diffusion_decoder(cfg, cond_dim: int, unet: nn.Module | None) -> nn.Module:
    """The optional diffusion pixel decoder of a family config with a ``diffusion`` section
    (SEED's, LaVIT's), conditioned on a ``cond_dim`` vector; ``unet``: a loaded one (None: fresh)."""
    from .diffusion import DiffusionDecoder, new_unet

    dc = cfg.diffusion
    unet = new_unet(dc, cfg.image_size) if unet is None else unet
    return DiffusionDecoder(unet, cond_dim, dc.cond_tokens, dc.train_timesteps, dc.cond_dropout)


def feature_loss(recon: Tensor, target: Tensor) -> Tensor:
    """1 − cosine between the reconstructed and the Q-Former's causal embeddings, mean over tokens."""
    return (1 - F.cosine_similarity(recon.float(), target.float(), dim=-1)).mean()
