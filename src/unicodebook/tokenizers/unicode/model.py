"""UniCode visual tokenizer: conv encoder → projection to the LLM hidden size → stacked
quantizer over the unified codebook → projection back → conv decoder.

Dimensions: B batch, H×W image, h×w latent map, (gh, gw, G) code grid (see
``quantize.stacked``), d LLM hidden size, z autoencoder latent channels.

Images enter and leave as float tensors (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ...config import ModelConfig
from ...errors import UnicodebookError
from ...quantize import UnifiedCodebook, build_quantizer, position_embeddings
from ..base import CodeLayout, VisualTokenizer
from .autoencoder import Decoder, Encoder


@dataclass
class TokenizerOutput:
    recon: Tensor  # (B, 3, H, W), unclamped, in image units ([0, 1] range targets)
    codes: Tensor  # (B, gh, gw, G)
    commit_loss: Tensor  # scalar: the quantizer's training loss (commitment + usage term)
    usage_loss: Tensor | None = None  # unweighted usage-entropy term, when on


class UniCodeTokenizer(VisualTokenizer):
    """The stage-I visual tokenizer whose codebook is the LLM's embedding table.

    As a :class:`~unicodebook.tokenizers.base.VisualTokenizer`: a fixed (gh, gw, G) grid; the
    LLM reads Ẑ at h·w slots; its codes are rows the LLM already has (the codebook *is* them)."""

    family = "unicode"
    reads = "latents"
    tasks = ("decompress", "instruct", "t2i")
    shares_text_rows = True

    def __init__(self, cfg: ModelConfig, codebook: UnifiedCodebook):
        super().__init__()
        ae, qc = cfg.autoencoder, cfg.quantizer
        factor = 2 ** (len(ae.ch_mult) - 1)
        if cfg.image_size % factor:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by the down-sampling factor {factor}")
        self.image_size = cfg.image_size
        self.latent_size = cfg.image_size // factor
        d = codebook.dim
        common = dict(
            ch=ae.ch,
            ch_mult=ae.ch_mult,
            num_res_blocks=ae.num_res_blocks,
            z_channels=ae.z_channels,
            resolution=cfg.image_size,
            attn_resolutions=ae.attn_resolutions,
            dropout=ae.dropout,
            padding=ae.padding,
        )
        self.encoder = Encoder(**common)
        self.pre_quant = nn.Conv2d(ae.z_channels, d, 1)  # latent → LLM hidden size
        self.quantizer = build_quantizer(
            qc.kind, codebook, qc.depth, qc.beta, qc.entropy_weight, qc.entropy_temperature, qc.layer_rows
        )
        self.quantizer.grid_shape(self.latent_size)  # refuses a latent the quantizer cannot tile
        self.post_quant = nn.Conv2d(d, ae.z_channels, 1)
        self.decoder = Decoder(**common)
        self.patch = factor if ae.patch_skip else 0
        if ae.patch_skip:
            self.patch_in, self.patch_out = patch_skip_layers(3 * factor * factor, d)
            nn.init.zeros_(self.pre_quant.weight)  # the conv paths start at zero: the latent is
            nn.init.zeros_(self.pre_quant.bias)  # the patch's orthogonal image, the picture
            nn.init.zeros_(self.decoder.conv_out.weight)  # its projection back
            nn.init.zeros_(self.decoder.conv_out.bias)

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Recompute the encoder's and decoder's block activations in backward (less memory)."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = on

    # ---------------------------------------------------------------- shapes
    @property
    def codebook(self) -> UnifiedCodebook:
        return self.quantizer.codebook

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """(gh, gw, G): the code grid of one image."""
        return self.quantizer.grid_shape(self.latent_size)

    @property
    def codes_per_image(self) -> int:
        gh, gw, g = self.grid_shape
        return gh * gw * g

    @property
    def num_latents(self) -> int:
        """Length of Ẑ = embed(codes): positions of the aggregated latent (h·w)."""
        return self.latent_size**2

    @property
    def layout(self) -> CodeLayout:
        return CodeLayout(self.codes_per_image, self.grid_shape)

    @property
    def num_codes(self) -> int:
        return self.codebook.num_codes

    # ---------------------------------------------------------------- stage II
    def bound_llm(self):
        """The LLM the codebook is bound to (None for a frozen copy inside a model folder)."""
        return self.__dict__.get("llm")

    def attach(self, llm, text_tok) -> Tensor:
        """The codes are the LLM's rows ``codebook.token_ids``: nothing is added, the LLM is checked."""
        from ...lm.llm import input_embedding

        vocab, dim = input_embedding(llm).weight.shape
        if dim != self.codebook.dim:
            raise UnicodebookError(f"the LLM's hidden size {dim} is not the codebook's {self.codebook.dim}")
        if int(self.codebook.token_ids.max()) >= vocab:
            raise UnicodebookError(
                f"codebook token ids reach {int(self.codebook.token_ids.max())} but the LLM has {vocab} rows"
            )
        return self.codebook.token_ids.clone()

    def health(self) -> dict:
        """The codebook's update rule and how close the visual codebook stays to the LLM's rows."""
        return {"codebook_mode": self.codebook.mode, "codebook_cosine_llm": self.codebook.alignment()["cosine"]}

    def save_frozen(self, folder) -> None:
        from .build import save_frozen

        save_frozen(self, folder)

    def position_latents(self, codes: Tensor) -> Tensor:
        """codes (B, n, G) of n code positions → (B, n, d), each position's aggregate (what the
        depth layout reads for a written position; for RQ exactly Ẑ there)."""
        return position_embeddings(self.quantizer, codes.long().to(self.device))

    # ---------------------------------------------------------------- pipeline
    @property
    def device(self) -> torch.device:
        return self.codebook.embed.device

    def _latent(self, images: Tensor) -> Tensor:
        self._check_images(images)
        x = images.to(self.device) * 2 - 1  # inputs follow the model
        z = rearrange(self.pre_quant(self.encoder(x)), "b d h w -> b h w d")  # (B, h, w, d)
        if self.patch:
            z = z + self.patch_in(rearrange(x, "b c (h p) (w q) -> b h w (c p q)", p=self.patch, q=self.patch))
        return z

    def _decode_latent(self, zq: Tensor) -> Tensor:
        """zq (B, h, w, d) → images (B, 3, H, W) (unclamped)."""
        x = self.decoder(self.post_quant(rearrange(zq, "b h w d -> b d h w")))
        if self.patch:
            x = x + rearrange(self.patch_out(zq), "b h w (c p q) -> b c (h p) (w q)", p=self.patch, q=self.patch)
        return (x + 1) / 2

    def forward(self, images: Tensor) -> TokenizerOutput:
        q = self.quantizer(self._latent(images))
        return TokenizerOutput(self._decode_latent(q.quantized), q.codes, q.loss, q.usage_loss)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] → codes (B, gh, gw, G) long (codebook rows)."""
        return self.quantizer(self._latent(images)).codes

    def embed(self, codes: Tensor) -> Tensor:
        """codes (B, gh, gw, G) → Ẑ (B, h·w, d): the aggregated code embeddings for the LLM."""
        self._check_codes(codes)
        return rearrange(self.quantizer.codes_to_embeddings(codes.to(self.device)), "b h w d -> b (h w) d")

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, gh, gw, G) → images (B, 3, H, W) in [0, 1]."""
        z = rearrange(self.embed(codes), "b (h w) d -> b h w d", h=self.latent_size)
        return self._decode_latent(z).clamp(0, 1)

    def code_layers(self, codes: Tensor) -> tuple[Tensor, list[str]]:
        """codes (B, gh, gw, G) → (N, L) one column per code layer, and the layers' names
        (the quantizer's: RQ D layers, HQ 2·D, top then bottom)."""
        return self.quantizer.code_layers(codes), self.quantizer.layer_names

    def token_ids(self, codes: Tensor) -> Tensor:
        """codes → the LLM token ids they stand for (same shape)."""
        return self.codebook.codes_to_token_ids(codes)

    # ---------------------------------------------------------------- checks
    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")

    def _check_codes(self, codes: Tensor) -> None:
        if codes.ndim != 4 or tuple(codes.shape[1:]) != self.grid_shape:
            raise ValueError(f"expected codes (B, {', '.join(map(str, self.grid_shape))}), got {tuple(codes.shape)}")
        if codes.dtype != torch.long or (codes < 0).any() or (codes >= self.codebook.num_codes).any():
            raise ValueError(f"codes must be long indices in [0, {self.codebook.num_codes})")


def patch_skip_layers(pixels: int, d: int) -> tuple[nn.Linear, nn.Linear]:
    """Linear maps patch (pixels) → latent (d) and back, started orthogonal and transposed:
    distances between patches are distances between latents, and back(in(x)) = x when d ≥ pixels."""
    q, _ = torch.linalg.qr(torch.randn(max(d, pixels), min(d, pixels)))  # orthonormal columns
    w = q if d >= pixels else q.t()  # (d, pixels)
    patch_in, patch_out = nn.Linear(pixels, d, bias=False), nn.Linear(d, pixels, bias=False)
    with torch.no_grad():
        patch_in.weight.copy_(w)
        patch_out.weight.copy_(w.t())
    return patch_in, patch_out


def reconstruction_loss(recon: Tensor, target: Tensor, l1: float, l2: float) -> tuple[Tensor, dict]:
    a = F.l1_loss(recon, target)
    b = F.mse_loss(recon, target)
    return l1 * a + l2 * b, {"l1": float(a.detach()), "l2": float(b.detach())}
