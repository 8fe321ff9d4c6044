"""The LaVIT dynamic tokenizer: frozen ViT patches → selector → merger → cosine codebook →
a variable number of codes; de-tokenizer → patch features → pixels.

Encode: the ViT's patch tokens (``encoder``, before its final norm, class token dropped) are
scored by the selector (``token_predictor``, ``selector.py``), which keeps some of them; the
merger (``causal_encoder``, ``merger.py``) lets the kept patches read the dropped ones; the kept
ones, in raster order (each plus its patch's row of ``token_pos_embed``, a learnable table over the
N positions, when ``model.token_pos_embed`` > 0), go through ``encode_task_layer``
(Linear–Tanh–Linear down to c) to the nearest code by cosine (``quantize``, ``quantizer.py``). An
image is 1…N codes, :data:`PAD_CODE` after its end. The selection is deterministic at inference
(``inference_keep``: keep probability > ½, or the round(Σ p) most probable; at least
``min_tokens``); ``sample_at_inference`` samples it as the released code does, from a generator
seeded with ``sample_seed`` when the tokenizer is built (or one passed to :meth:`encode`).

Decode: the codes' embeddings → the de-tokenizer (``tokenizer_decoder``, ``detokenizer.py``)
reconstructs every patch's ViT feature (trained under 1 − cosine) → the pixel decoder: the conv
decoder reading the N reconstructed features as their √N×√N grid (``pixel_reader: spatial``,
:class:`SpatialPixelDecoder`) or through SEED's grid of queries (``queries``), or SEED's
diffusion decoder conditioned on their mean (``pixel_decoder: diffusion``; decoded from a fixed
seed, so deterministic too). The original decodes with Stable Diffusion conditioned on them.

Parameter names are the official checkpoint's where the modules correspond (``encoder``,
``token_predictor.in_conv`` / ``out_conv``, ``causal_encoder.blocks.{i}.token_causal_attn`` /
``token_cross_attn``, ``encode_task_layer``, ``quantize.embedding``, ``tokenizer_decoder.in_proj``
/ ``pos_embed`` / ``query_embed`` / ``blocks`` / ``decode_task_layer``); ``official.py`` maps a
local official state dict onto ours.

Dimensions: B images, N patches (the most codes of an image), L kept tokens (the most in the
batch), W the ViT's width (the merger's and the de-tokenizer's too), c code size, K codes.
Images enter and leave as (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import LavitModelConfig
from ..base import PAD_CODE, CodeLayout, VisualTokenizer
from ..seed.model import DECODE_SEED, DECODER_GRID, PixelDecoder, diffusion_decoder, task_mlp
from ..unicode.autoencoder import Decoder
from ..vit import VisionTransformer
from .detokenizer import FeatureDecoder
from .merger import TokenMerger
from .quantizer import NormEMAQuantizer
from .selector import TokenPredictor, at_least, gumbel_keep, keep_decisions, pack


class SpatialPixelDecoder(nn.Module):
    """(B, N, W) reconstructed patch features, one per patch in raster order → (B, 3, H, W): the
    features laid out on their √N×√N grid, bilinearly resized to the conv decoder's latent
    (image_size / 4 on a side; 6×6 → 9×9 at 36 px in 6-px patches), then UniCode's conv decoder
    (×4). No reader: where a feature sits is where it is drawn (``pixel_reader: spatial``)."""

    def __init__(
        self, dim: int, patches: int, image_size: int, ch: int, mult: list[int] = (1, 2, 2), res_blocks: int = 1
    ):
        super().__init__()
        self.grid = round(patches**0.5)
        if self.grid**2 != patches:
            raise ValueError(f"pixel_reader spatial needs a square grid of patches, not {patches}")
        self.side = image_size // DECODER_GRID
        self.decoder = Decoder(
            ch=ch, ch_mult=list(mult), num_res_blocks=res_blocks, z_channels=dim, resolution=image_size
        )

    def forward(self, features: Tensor) -> Tensor:
        b, n, w = features.shape
        x = features.transpose(1, 2).reshape(b, w, self.grid, self.grid)
        if self.grid != self.side:
            x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False)
        return (self.decoder(x) + 1) / 2


@dataclass
class LavitOutput:
    features: Tensor  # (B, N, W) the ViT's patch features (the reconstruction target)
    log_probs: Tensor  # (B, N, 2) the selector's, index 0 = keep
    keep: Tensor  # (B, N) the keep decisions, with their straight-through gradient
    codes: Tensor  # (B, L) PAD_CODE after each image's end
    vq_loss: Tensor  # the commitment term
    recon: Tensor  # (B, N, W) the de-tokenizer's reconstruction from the quantised tokens


class LavitTokenizer(VisualTokenizer):
    """The LaVIT tokenizer at the sizes of ``cfg`` (a :class:`~unicodebook.config.LavitModelConfig`);
    ``unet``: the diffusion decoder's UNet (a loaded or rebuilt one; None: a fresh one from ``cfg``)."""

    family = "lavit"
    reads = "codes"
    tasks = ("instruct", "t2i")  # an image read and an image written are the same ids: no decompression

    def __init__(self, cfg: LavitModelConfig, encoder: VisionTransformer, unet: nn.Module | None = None):
        super().__init__()
        if cfg.image_size % DECODER_GRID:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by {DECODER_GRID}")
        n, w = encoder.num_patches, encoder.width
        self.image_size, self.num_codes = cfg.image_size, cfg.num_codes
        self.feature_dim = w  # the merged tokens (the official understanding input, before ``vit_proj``)
        self.keep_ratio, self.min_tokens = cfg.keep_ratio, cfg.min_tokens
        self.layout = CodeLayout(n, min_length=cfg.min_tokens)
        self.encoder = encoder.requires_grad_(False)
        self.token_predictor = TokenPredictor(w)
        mc, dc = cfg.merger, cfg.detokenizer
        self.causal_encoder = TokenMerger(w, mc.heads, mc.layers, mc.mlp_ratio)
        self.encode_task_layer = task_mlp(w, cfg.code_dim, w)
        if cfg.token_pos_embed:  # where each kept token's patch is, added before encode_task_layer
            self.token_pos_embed = nn.Parameter(torch.randn(1, n, w) * cfg.token_pos_embed)
        else:
            self.token_pos_embed = None
        self.quantize = NormEMAQuantizer(cfg.num_codes, cfg.code_dim, cfg.ema_decay, cfg.kmeans_init)
        self.tokenizer_decoder = FeatureDecoder(cfg.code_dim, w, n, dc.layers, dc.heads, dc.mlp_ratio)
        self.inference_rule, self.sample_at_inference = cfg.inference_keep, cfg.sample_at_inference
        self.sampler = torch.Generator().manual_seed(cfg.sample_seed)  # inference sampling (not a weight)
        self.pixel_kind = cfg.pixel_decoder
        if cfg.pixel_decoder == "diffusion":
            self.pixel_decoder = diffusion_decoder(cfg, w, unet)
            self.sampling = (cfg.diffusion.steps, cfg.diffusion.guidance)
        elif cfg.pixel_reader == "spatial":
            self.pixel_decoder = SpatialPixelDecoder(
                w, n, cfg.image_size, cfg.decoder_ch, cfg.decoder_mult, cfg.decoder_res_blocks
            )
        else:
            self.pixel_decoder = PixelDecoder(
                w,
                dc.heads,
                cfg.image_size,
                cfg.decoder_ch,
                cfg.decoder_mult,
                cfg.decoder_res_blocks,
                cfg.decoder_reader_layers,
            )

    @property
    def device(self) -> torch.device:
        return self.quantize.embedding.weight.device

    # ---------------------------------------------------------------- the pipeline
    def patch_features(self, images: Tensor) -> Tensor:
        """images → the ViT's patch tokens before its final norm (B, N, W), no gradient."""
        self._check_images(images)
        with torch.no_grad():
            return self.encoder.patch_features(images.to(self.device), normed=False)

    def keep_scores(self, features: Tensor) -> Tensor:
        """(B, N, W) → the selector's log-probabilities (B, N, 2), index 0 = keep."""
        policy = features.new_ones(features.shape[0], features.shape[1], 1)
        return self.token_predictor(features.float(), policy)

    def merge(self, features: Tensor, keep: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
        """Features (B, N, W) and keep decisions (B, N) → the merged kept tokens in raster order
        (B, L, W) and their mask (B, L); L: ``length``, or the most kept. Each token is scaled by its
        decision (1: the values do not change), so what the tokens are used for reaches the selector
        through the straight-through gradient, as well as through the merger's attention."""
        merged = self.causal_encoder(features, keep)
        if self.token_pos_embed is not None:  # each token at its patch's position
            merged = merged + self.token_pos_embed.to(merged.dtype)
        merged = merged * keep[..., None]
        return pack(merged, keep > 0.5, length)

    def forward(self, images: Tensor, step: int = 0, generator: torch.Generator | None = None) -> LavitOutput:
        """The training pass: keep decisions sampled (Gumbel, noise from ``generator``), codebook updated."""
        features = self.patch_features(images)
        scores = self.keep_scores(features)
        keep = at_least(gumbel_keep(scores, generator), scores[..., 0].detach(), self.min_tokens)
        tokens, mask = self.merge(features, keep)
        z = self.encode_task_layer(tokens)
        zq_kept, codes_kept, vq_loss = self.quantize(z[mask], step)
        zq = torch.zeros_like(z).masked_scatter(mask[..., None], zq_kept)
        codes = torch.full(mask.shape, PAD_CODE, dtype=torch.long, device=z.device).masked_scatter(mask, codes_kept)
        return LavitOutput(features, scores, keep, codes, vq_loss, self.tokenizer_decoder(zq, mask))

    def inference_decisions(self, features: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, N, W) → the keep decisions of encode (B, N) in {0, 1}: by ``inference_keep``, or sampled
        from ``generator`` (None: the tokenizer's own) with ``sample_at_inference``."""
        sample = self.sample_at_inference
        return keep_decisions(
            self.keep_scores(features),
            self.min_tokens,
            self.inference_rule,
            sample,
            (generator or self.sampler) if sample else None,
        )

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """images (B, 3, H, W) in [0, 1] → codes (B, N): the kept patches' codes in raster order,
        :data:`PAD_CODE` after. ``generator``: the sampling's, with ``sample_at_inference``."""
        return self.encode_features(images, generator)[0]

    @torch.no_grad()
    def encode_features(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """images → (codes (B, N) as :meth:`encode`, the merged kept tokens they quantise (B, N, W),
        zeros after each image's end): what the official model reads for understanding (there
        through ``vit_proj`` to the LLM's width; here the stage II model's own ``vit_proj``)."""
        features = self.patch_features(images)
        tokens, mask = self.merge(features, self.inference_decisions(features, generator), self.layout.length)
        codes = torch.full(mask.shape, PAD_CODE, dtype=torch.long, device=tokens.device)
        codes[mask] = self.quantize.lookup(self.encode_task_layer(tokens[mask]))
        return codes, tokens

    def reconstruct_features(self, codes: Tensor) -> Tensor:
        """codes (B, ≤N) with PAD_CODE after each end → the de-tokenizer's patch features (B, N, W)."""
        mask = codes != PAD_CODE
        length = int(mask.sum(1).max())
        codes, mask = codes[:, :length], mask[:, :length]
        zq = self.quantize.embedding(codes.clamp_min(0)) * mask[..., None]
        return self.tokenizer_decoder(zq, mask)

    @staticmethod
    def condition(recon: Tensor) -> Tensor:
        """What the diffusion decoder is conditioned on: the reconstructed features' mean (B, W)."""
        return recon.mean(1)

    def pixels(self, recon: Tensor) -> Tensor:
        """Reconstructed patch features (B, N, W) → images (B, 3, H, W) in [0, 1]."""
        if self.pixel_kind == "diffusion":
            return self.pixel_decoder.draw(self.condition(recon), *self.sampling, DECODE_SEED)
        return self.pixel_decoder(recon).clamp(0, 1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, N) (PAD_CODE after each end) → images (B, 3, H, W) in [0, 1]."""
        self._check_codes(codes)
        return self.pixels(self.reconstruct_features(codes.to(self.device).long()))

    def save_frozen(self, folder) -> None:
        from .build import save_tokenizer

        save_tokenizer(self, folder)

    def encode_settings(self) -> dict:
        rule = {"inference_keep": self.inference_rule, "min_tokens": self.min_tokens}
        if self.sample_at_inference:  # the cache then holds one draw an image, from the tokenizer's own generator
            rule |= {"sample": True, "sampler_state": hashlib.sha256(self.sampler.get_state().numpy()).hexdigest()[:16]}
        return rule

    def health(self) -> dict:
        return {
            "keep_ratio_target": self.keep_ratio,
            "inference_keep": "sample" if self.sample_at_inference else self.inference_rule,
        }

    # ---------------------------------------------------------------- checks
    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")

    def _check_codes(self, codes: Tensor) -> None:
        n = self.layout.length
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"expected codes (B, {n}), got {tuple(codes.shape)}")
        real = codes != PAD_CODE
        if ((codes < 0) & real).any() or (codes >= self.num_codes).any():
            raise ValueError(f"codes must be indices in [0, {self.num_codes}) or PAD_CODE ({PAD_CODE}) after the end")
        if not real[:, 0].all() or (real[:, 1:] & ~real[:, :-1]).any():
            raise ValueError("each image needs a first code, and PAD_CODE only after its last one")
