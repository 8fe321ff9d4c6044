"""Typed run configuration: one YAML file per run, mapped onto dataclasses.

A run is described by :class:`Config`. ``load_config(path, overrides)`` reads a YAML file (or
a preset name such as ``tiny``), applies dotted overrides like ``model.codebook.mode=frozen`` and
checks every key and type; an unknown key or a wrong type raises :class:`ConfigError` with a
one-line message naming the dotted key. Modules never read configs: builders
(``build_*`` functions) turn these objects into modules.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError
from .quantize.codebook import CodebookRule

PRESET_DIR = Path(__file__).parent / "configs"


# --------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------
@dataclass
class LLMConfig:
    """The language model whose input-embedding table is the codebook."""

    name: str = "builtin"  # "builtin": a random Llama-style model sized below; else a local HF folder
    # sizes of the builtin model (ignored for a local folder):
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class CodebookConfig(CodebookRule):
    """Which LLM rows form the codebook, and how the visual codebook learns.

    The update-rule fields (mode, ema_decay, the iterative ramp, restarts, …) are those of
    :class:`~unicodebook.quantize.codebook.CodebookRule`; this adds the choice of rows.
    """

    rows: Optional[list[int]] = None  # explicit token ids; overrides row_offset/num_rows
    row_offset: int = 0  # first token id of a contiguous block of rows
    num_rows: Optional[int] = None  # size of that block (None: every row from row_offset on)


@dataclass
class QuantizerConfig:
    kind: Literal["rq", "hq"] = "rq"
    depth: int = 4  # RQ: code layers per position; HQ: residual depth at each of the 2 levels
    beta: float = 0.25  # commitment weight
    entropy_weight: float = 0.0  # batch code-usage entropy term (frozen/iterative; not dual)
    entropy_temperature: float = 0.1  # softmax temperature, in units of the mean ‖C‖²
    # shared: every code layer searches all the codebook's rows (the paper's); split: layer l
    # has its own num_rows/depth rows (RQ only), started by residual k-means
    layer_rows: Literal["shared", "split"] = "shared"


@dataclass
class AutoencoderConfig:
    """VQGAN-style conv encoder/decoder; down-sampling factor 2**(len(ch_mult)-1)."""

    ch: int = 64
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)  # latent sizes with attention
    z_channels: int = 64
    dropout: float = 0.0
    # 3×3 convolutions' border rule; circular: an object's codes do not depend on where it stands
    padding: Literal["zeros", "replicate", "circular"] = "zeros"
    # a linear path beside the convolutions: each f×f pixel patch (f the down-sampling factor)
    # maps orthogonally onto its latent and back, the conv paths starting at zero, so training
    # starts as residual VQ of pixel patches and learns the rest (docs/tokenizers.md)
    patch_skip: bool = False


@dataclass
class ModelConfig:
    """The UniCode tokenizer (``family: unicode``): conv autoencoder, RQ/HQ over the LLM's rows."""

    family: Literal["unicode"] = "unicode"
    image_size: int = 36
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)


@dataclass
class VitConfig:
    """The stage-0 image encoder shared by SEED and LaVIT (its image size is the model's)."""

    patch_size: int = 6
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    embed_dim: int = 128  # the contrastive embedding (CLIP-style projection of the class token)
    class_token: bool = True
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # input normalisation
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class TextTowerConfig:
    """The caption encoder of the stage-0 contrastive training (word tokens, a small transformer)."""

    width: int = 128
    layers: int = 2
    heads: int = 4
    max_length: int = 48


@dataclass
class QFormerConfig:
    """SEED's causal Q-Former: learnable queries, causal among themselves, cross-attending to the
    ViT's patches every ``cross_attention_freq``-th layer."""

    queries: int = 32
    width: int = 128
    layers: int = 4
    heads: int = 4
    cross_attention_freq: int = 2
    mlp_ratio: float = 4.0


@dataclass
class DiffusionConfig:
    """SEED's optional diffusion pixel decoder (``pixel_decoder: diffusion``): a ``diffusers`` UNet in
    pixel space, cross-attending to ``cond_tokens`` projections of the generation embedding."""

    channels: list[int] = field(default_factory=lambda: [32, 64])  # cross-attention blocks; all but the last halve
    layers_per_block: int = 1
    heads: int = 1  # attention heads; they divide every entry of channels
    unet_path: str = ""  # a local UNet2DConditionModel folder (RGB, the model's size); replaces the three above
    cond_tokens: int = 4
    train_timesteps: int = 1000
    cond_dropout: float = 0.1  # conditions dropped in training, for classifier-free guidance
    steps: int = 25  # DDIM steps of decode
    guidance: float = 1.0  # classifier-free guidance of decode; 1: the conditional prediction only

    def __post_init__(self) -> None:
        if not self.channels or min(self.channels) < 1 or any(c % max(self.heads, 1) for c in self.channels):
            raise ValueError(f"channels {self.channels}: each >= 1 and divisible by heads {self.heads}")
        if min(self.layers_per_block, self.heads, self.cond_tokens) < 1:
            raise ValueError("layers_per_block, heads and cond_tokens must be >= 1")
        if not 1 <= self.steps <= self.train_timesteps:
            raise ValueError(f"steps must be within 1..train_timesteps ({self.train_timesteps}), got {self.steps}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError("cond_dropout must be in [0, 1)")


@dataclass
class SeedModelConfig:
    """The SEED tokenizer (``family: seed``): frozen ViT → causal Q-Former → VQ of its outputs →
    de-tokenizer (the causal embeddings and a generation embedding) → pixel decoder."""

    family: Literal["seed"] = "seed"
    image_size: int = 36
    vit: VitConfig = field(default_factory=VitConfig)
    vit_path: str = (
        ""  # a local ViT folder (ours, timm or Hugging Face), its sizes copied into ``vit``; empty: trained here
    )
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    code_dim: int = 32
    num_codes: int = 1024
    beta: float = 0.25  # the codebook term's weight (the commitment term has 1: taming's legacy VQ)
    kmeans_init: bool = False  # codebook start from k-means of the first batch's features
    restart_dead: int = 0  # every N steps, codes unused since the last restart move to batch features (0: never)
    recon_blocks: int = 2  # the reconstruction branch (official: 4)
    gen_blocks: int = 2  # the generation branch's blocks (official: 4) ...
    reverse_layers: int = 2  # ... and its one-query reverse Q-Former (official: 12, BERT-base)
    generation_dim: int = 0  # the generation embedding (official: 1024, CLIP-H's); 0: the ViT's embedding size
    contrastive_dim: int = 0  # the Q-Former's contrastive projection (official: 256); 0: the ViT's embedding size
    decoder_ch: int = 64  # the conv pixel decoder (pixel_decoder: conv): its base width ...
    decoder_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # ... per level, coarse last (3 levels: ×4)
    decoder_res_blocks: int = 1  # ... residual blocks per level, plus one
    decoder_reader_layers: int = 2  # the cross-attention layers its grid of queries reads the embeddings with
    # pixels from the codes: conv (a deterministic conv decoder, L1 + L2) or diffusion (``diffusion``, needs diffusers)
    pixel_decoder: Literal["conv", "diffusion"] = "conv"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self) -> None:
        halvings = len(self.diffusion.channels) - 1
        if self.pixel_decoder == "diffusion" and not self.diffusion.unet_path and self.image_size % 2**halvings:
            raise ValueError(
                f"diffusion.channels: {halvings + 1} blocks halve the image {halvings} times, "
                f"which image_size {self.image_size} does not allow"
            )
        if self.image_size % self.vit.patch_size:
            raise ValueError(f"vit.patch_size {self.vit.patch_size} does not divide image_size {self.image_size}")
        if self.qformer.width % self.qformer.heads or self.vit.width % self.vit.heads:
            raise ValueError("the heads must divide the widths")
        if len(self.decoder_mult) != 3:
            raise ValueError(
                f"decoder_mult has {len(self.decoder_mult)} levels; the pixel decoder upsamples ×4: 3 levels"
            )


@dataclass
class MergerConfig:
    """LaVIT's token merger at the ViT's width: blocks of causal self-attention among the kept
    patches, cross-attention to the dropped ones, MLP (the official ``causal_encoder``)."""

    layers: int = 2  # official: 12
    heads: int = 4  # official: 16
    mlp_ratio: float = 4.0  # official: 4.3637 (EVA-g's)


@dataclass
class DetokenizerConfig:
    """LaVIT's feature de-tokenizer at the ViT's width: one learnable query per patch, blocks of
    self-attention and cross-attention to the tokens, MLP (the official ``VQDecoder``)."""

    layers: int = 2  # official: 12
    heads: int = 4  # official: 16
    mlp_ratio: float = 4.0  # official: 4.3637


@dataclass
class LavitModelConfig:
    """The LaVIT dynamic tokenizer (``family: lavit``): frozen ViT patches → token selector (keep
    or drop each) → token merger → cosine codebook with EMA → a variable number of codes; the
    de-tokenizer reconstructs the patch features from them, a pixel decoder the image."""

    family: Literal["lavit"] = "lavit"
    image_size: int = 36
    vit: VitConfig = field(default_factory=VitConfig)
    vit_path: str = (
        ""  # a local ViT folder (ours, timm or Hugging Face), its sizes copied into ``vit``; empty: trained here
    )
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    keep_ratio: float = 1 / 3  # ρ, the fraction of patches the selector is trained to keep ...
    keep_ratio_over: Literal["image", "batch"] = (
        "image"  # ... in every image (DynamicViT's), or on average over the batch
    )
    min_tokens: int = 1  # codes per image at least (the top-scoring patches are kept up to it)
    # encode's deterministic selection: threshold (keep probability > ½) or expected (the round(Σ p)
    # most probable patches: as many as a training sample keeps on average)
    inference_keep: Literal["threshold", "expected"] = "threshold"
    sample_at_inference: bool = False  # the released code's behaviour: encode samples the keep decisions too
    sample_seed: int = 0  # ... from a generator seeded with this when the tokenizer is built or loaded
    merger: MergerConfig = field(default_factory=MergerConfig)
    detokenizer: DetokenizerConfig = field(default_factory=DetokenizerConfig)
    code_dim: int = 32
    num_codes: int = 1024
    ema_decay: float = 0.99  # the l2-normalised codebook follows the normalised means of its features
    kmeans_init: bool = False  # codebook start from spherical k-means of the first batch's features
    restart_dead: int = 0  # every N steps, codes unused since the last restart move to batch features (0: never)
    decoder_ch: int = 64  # the conv pixel decoder (SEED's): its base width ...
    decoder_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # ... per level, coarse last (3 levels: ×4)
    decoder_res_blocks: int = 1  # ... residual blocks per level, plus one
    decoder_reader_layers: int = 2  # the cross-attention layers its grid of queries reads the features with
    # how the conv pixel decoder reads the N reconstructed features: queries (SEED's: a grid of queries
    # cross-attending to them) or spatial (one feature per patch in raster order: the √N×√N grid,
    # bilinearly resized to the conv decoder's latent, image_size / 4, no reader)
    pixel_reader: Literal["queries", "spatial"] = "queries"
    # > 0: a learnable table over the N patch positions, started at this std, added to each merged
    # kept token (at its patch's position) before encode_task_layer, so an image's tokens say where
    # they are (the merger's output is LayerNorm'd: std 1 is its scale); 0: no table
    token_pos_embed: float = 0.0
    # pixels from the reconstructed features: conv (L1 + L2) or diffusion (SEED's, conditioned on their mean)
    pixel_decoder: Literal["conv", "diffusion"] = "conv"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self) -> None:
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio {self.keep_ratio} is not in (0, 1]")
        if self.image_size % self.vit.patch_size:
            raise ValueError(f"vit.patch_size {self.vit.patch_size} does not divide image_size {self.image_size}")
        patches = (self.image_size // self.vit.patch_size) ** 2
        if not 1 <= self.min_tokens <= patches:
            raise ValueError(f"min_tokens {self.min_tokens} is not in [1, {patches}] (the image's patches)")
        if any(self.vit.width % h for h in (self.vit.heads, self.merger.heads, self.detokenizer.heads)):
            raise ValueError(
                f"the heads of the ViT, the merger and the de-tokenizer must divide the ViT's width {self.vit.width}"
            )
        if self.token_pos_embed < 0:
            raise ValueError(f"token_pos_embed {self.token_pos_embed} is negative (0: no position table)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay {self.ema_decay} is not in [0, 1)")
        if len(self.decoder_mult) != 3:
            raise ValueError(
                f"decoder_mult has {len(self.decoder_mult)} levels; the pixel decoder upsamples ×4: 3 levels"
            )
        halvings = len(self.diffusion.channels) - 1
        if self.pixel_decoder == "diffusion" and not self.diffusion.unet_path and self.image_size % 2**halvings:
            raise ValueError(
                f"diffusion.channels: {halvings + 1} blocks halve the image {halvings} times, "
                f"which image_size {self.image_size} does not allow"
            )


MODEL_FAMILIES: dict[str, type] = {"unicode": ModelConfig, "seed": SeedModelConfig, "lavit": LavitModelConfig}


@dataclass
class DataConfig:
    """How data is read, and the resource limits past which an input is refused (one error line)
    or, in a batch pass, reported, counted and skipped (docs/reliability.md)."""

    odd_size: Literal["resize", "refuse"] = "resize"  # images not at model.image_size
    preload: bool = True  # decode the whole folder into memory once (small datasets)
    num_workers: int = 0
    max_image_pixels: int = 40_000_000  # width × height from the header, checked before decoding
    max_image_bytes: int = 64 * 2**20  # an image file's size on disk
    max_caption_chars: int = 2000  # a t2i caption, in characters (the text tokenizer is built later)
    max_conversation_chars: int = 16000  # all turns of a conversation together, in characters

    def __post_init__(self) -> None:
        for k in ("max_image_pixels", "max_image_bytes", "max_caption_chars", "max_conversation_chars"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


@dataclass
class LossConfig:
    l1: float = 1.0
    l2: float = 1.0
    perceptual: float = 0.0  # LPIPS weight; needs local VGG16 + LPIPS weights below
    perceptual_vgg: str = ""
    perceptual_lin: str = ""
    gan: float = 0.0  # PatchGAN weight (adaptive, taming-style)
    # SEED (family seed): 5·VQ + 2·(1 − cos) to the causal embeddings + 0.5·MSE of the generation embedding;
    # LaVIT (family lavit): vq (the commitment term) and feature_recon (1 − cos to the ViT's patches) too
    vq: float = 5.0
    feature_recon: float = 2.0
    generation: float = 0.5
    temperature: float = 0.07  # contrastive (stage 0 and the Q-Former), learnable from this start
    ratio: float = 2.0  # LaVIT: λ of the keep-ratio loss λ·(ρ − kept fraction)² (DynamicViT's 2.0; LaVIT's unpublished)
    # LaVIT: 1 − cos between the reconstruction and the ViT's patch features, each centred on its
    # image's mean patch: what differs between an image's patches, which the plain cosine barely
    # sees (an image's patch features share a cosine of ~0.9)
    feature_detail: float = 0.0
    gan_start: int = 0  # step at which the discriminator starts


@dataclass
class TrainLoopConfig:
    """What both training stages share: optimiser, schedule, precision, reliability, logging.

    The stages redeclare the fields whose defaults differ.
    """

    steps: int = 1000
    batch_size: int = 32  # the global batch: split evenly across the ranks of a distributed run
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decay ends at min_lr_ratio·lr
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    # bf16: autocast (the quantizer's maths and the losses stay fp32); auto: bf16 where the device
    # computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16/AMX), fp32 elsewhere
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~1.3× the time
    max_nonfinite: int = 5  # a non-finite loss/gradient skips the step; this many in a row stop the run
    log_every: int = 25
    save_every: int = 500
    keep_last: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.max_nonfinite < 1:
            raise ValueError("max_nonfinite must be >= 1")


@dataclass
class TokenizerPhaseConfig:
    """One phase of a stage I run whose family trains in phases (SEED: vit, qformer, vq, decoder; LaVIT:
    vit, tokenizer, decoder); a field left out keeps the run's value. Each phase warms up and decays on its own."""

    name: str = ""
    steps: int = 0
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    min_lr_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"phase '{self.name or '?'}' has {self.steps} steps (each phase needs >= 1)")


@dataclass
class TokenizerTrainConfig(TrainLoopConfig):
    """Stage I: the visual tokenizer learns to reconstruct images through the unified codebook."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grid_every: int = 500
    # dihedral: each training image under one of the 8 flips / quarter turns, drawn per (seed, step);
    # UniCode's reconstruction only (captioned phases would have "left" lie)
    augment: Literal["none", "dihedral"] = "none"
    phases: list[TokenizerPhaseConfig] = field(default_factory=list)  # their steps add up to ``steps``

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.phases and sum(p.steps for p in self.phases) != self.steps:
            raise ValueError(
                f"the phases' steps add up to {sum(p.steps for p in self.phases)}, not to steps={self.steps}"
            )


@dataclass
class TaskMix:
    """Relative frequency of each stage II task (a step trains one task, drawn by these weights)."""

    decompress: float = 1.0  # in-context image decompression: Ẑ in, the h·w·D codes out
    instruct: float = 1.0  # visual instruction tuning (LLaVA JSON), loss on assistant turns
    t2i: float = 1.0  # text-to-image: caption → <img> codes </img>

    def __post_init__(self) -> None:
        if min(self.decompress, self.instruct, self.t2i) < 0 or self.decompress + self.instruct + self.t2i <= 0:
            raise ValueError("task weights must be >= 0 and not all 0")


@dataclass
class LoraConfig:
    enabled: bool = False  # False: full fine-tuning
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DepthHeadConfig:
    """The small causal transformer that writes one code position's G codes (depth layout)."""

    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    width: int = 0  # the head's own width (0: the LLM's hidden size); narrower reads fewer weights per code

    def __post_init__(self) -> None:
        if min(self.layers, self.heads, self.mlp_ratio) < 1 or self.width < 0:
            raise ValueError("depth_head layers, heads and mlp_ratio must be >= 1, width >= 0")


@dataclass
class PhaseConfig:
    """One phase of a stage II run: its steps and what it changes; a field left out (null) keeps
    the run's own value (``train_lm.lr``, ``train_lm.tasks``, …). Each phase has its own
    warm-up and cosine decay of the learning rate."""

    steps: int = 0
    name: str = ""
    tasks: Optional[TaskMix] = None
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    min_lr_ratio: Optional[float] = None
    code_noise: Optional[float] = None
    caption_dropout: Optional[float] = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"phase '{self.name or '?'}' has {self.steps} steps (each phase needs >= 1)")


@dataclass
class LMTrainConfig(TrainLoopConfig):
    """Stage II: the LLM learns to read and write images through the unified codebook."""

    tasks: TaskMix = field(default_factory=TaskMix)
    # adamw, or muon: Muon for the hidden layers' matrices, AdamW for the rest (train/optim.py)
    optimizer: Literal["adamw", "muon"] = "adamw"
    decompress_segments: int = 1  # >1: each sample predicts one segment, the earlier ones as context
    caption_dropout: float = 0.1  # t2i captions dropped (→ unconditional) for classifier-free guidance
    # noisy teacher forcing: this fraction of the code tokens *fed in* (t2i, decompression) is
    # replaced by random codes, targets unchanged, so the model cannot only copy the codes above
    # and must read the prompt / Ẑ (and learns to recover from its own sampling errors)
    code_noise: float = 0.0
    lora: LoraConfig = field(default_factory=LoraConfig)
    # learned image position embeddings added to the Ẑ slots and the code tokens (a (row, col)
    # table shared by both, plus a depth table for codes); false: the paper's plain sequence
    image_positions: bool = True
    # how the LLM writes an image: flat (the paper's: h·w·D code tokens) or depth (one LLM step per
    # code position, a small depth transformer emitting its G codes against the same codebook rows)
    image_layout: Literal["flat", "depth"] = "flat"
    depth_head: DepthHeadConfig = field(default_factory=DepthHeadConfig)
    # how the Ẑ slots of an image the LLM reads attend: causal (the paper's: each slot sees the
    # slots before it) or bidirectional (they all see each other, a prefix-LM over the image;
    # the text after it and every image the LLM writes stay causal)
    image_attention: Literal["causal", "bidirectional"] = "causal"
    # what the LLM reads for an image of a tokenizer read through its codes (LaVIT, SEED): its code
    # tokens, or (LaVIT's official way) each code's continuous feature before quantisation, through
    # a linear projector trained here; an image the model writes is its codes either way
    understanding_input: Literal["codes", "features"] = "codes"
    # a curriculum in one run: consecutive phases whose steps add up to ``steps`` (empty: one phase)
    phases: list[PhaseConfig] = field(default_factory=list)
    sample_every: int = 500  # image samples written to RUN/samples (0: only at the end)
    # a stage II model folder this run starts from: its LLM weights, image positions and text
    # tokenizer (not its optimizer or step), e.g. text-to-image alone first, then the mix; it must
    # share this run's frozen visual tokenizer. Ignored on --resume (the checkpoint holds the weights)
    init_from: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decompress_segments < 1:
            raise ValueError("decompress_segments must be >= 1")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError("caption_dropout must be in [0, 1)")
        if not 0 <= self.code_noise < 1:
            raise ValueError("code_noise must be in [0, 1)")
        for p in self.phases:
            for name in ("code_noise", "caption_dropout"):
                v = getattr(p, name)
                if v is not None and not 0 <= v < 1:
                    raise ValueError(f"phase '{p.name or '?'}': {name} must be in [0, 1)")
        if self.phases and sum(p.steps for p in self.phases) != self.steps:
            raise ValueError(
                f"the phases' steps add up to {sum(p.steps for p in self.phases)}, not to steps={self.steps}"
            )
        if self.image_layout == "depth" and self.decompress_segments > 1:
            raise ValueError("decompress_segments > 1 is a flat-layout option (the depth layout writes whole images)")

    def phase_list(self) -> list[tuple[int, "LMTrainConfig"]]:
        """The run as (start step, settings) phases: each a copy of this config with the phase's
        values filled in and ``steps`` its own length."""
        if not self.phases:
            return [(0, self)]
        out, at = [], 0
        for p in self.phases:
            over = {
                k: getattr(p, k)
                for k in ("tasks", "lr", "warmup_steps", "min_lr_ratio", "code_noise", "caption_dropout")
                if getattr(p, k) is not None
            }
            out.append((at, dataclasses.replace(self, steps=p.steps, phases=[], **over)))
            at += p.steps
        return out


@dataclass
class GenerateConfig:
    """Defaults of image generation (CLI flags override them)."""

    cfg_scale: float = 3.0  # classifier-free guidance; 1 = conditional logits only
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = all codes
    max_new_tokens: int = 16  # text answers (chat)


@dataclass
class Config:
    llm: LLMConfig = field(default_factory=LLMConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train_tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    train_lm: LMTrainConfig = field(default_factory=LMTrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` (converting YAML scalars where lossless)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if tp is ModelConfig:  # the model section is the named family's own
            family = value.get("family", "unicode")
            if family not in MODEL_FAMILIES:
                raise ConfigError(f"{key}.family: {family!r} is not one of {', '.join(MODEL_FAMILIES)}")
            tp = MODEL_FAMILIES[family]
        return _build(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a dataclass's own validation (__post_init__)
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["a.b=1", "c=[1,2]"]`` → nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    presets = ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name_or_path}' not found (a YAML path or a preset: {presets})")


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    return _build(Config, _merge(data, parse_overrides(overrides)))


def read_config_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file as one mapping: a top-level ``base:`` (a preset name, or a YAML path taken
    relative to this file) is read first and this file's keys are merged over it, mappings key by
    key, anything else (lists included) replaced — and a ``model`` section of another family
    replaces the base's whole; a base may have a base of its own."""
    data = read_yaml(path)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: 'base' must be a preset name or a YAML path")
    near = Path(path).parent / base
    base_path = near if near.is_file() else resolve_config_path(base)
    if base_path.resolve() in _seen + (Path(path).resolve(),):
        raise ConfigError(f"{path}: its bases form a cycle through {base_path}")
    parent = read_config_tree(base_path, _seen + (Path(path).resolve(),))

    def family(tree):
        return (tree.get("model") or {}).get("family", "unicode") if isinstance(tree.get("model"), dict) else None

    if "model" in data and family(data) != family(parent):  # another family's model section replaces the base's
        parent = {k: v for k, v in parent.items() if k != "model"}
    return _merge(parent, data)


def load_config(name_or_path: str | Path | None = "tiny", overrides: list[str] | None = None) -> Config:
    """Read a YAML file or preset (with its ``base:``, if any), apply dotted overrides, and
    type-check everything."""
    data = read_config_tree(resolve_config_path(name_or_path)) if name_or_path else {}
    return config_from_dict(data, overrides)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    """Write ``cfg`` as YAML, atomically (temporary name, then rename)."""
    from .utils.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
