"""The multimodal LLM: a causal LM that reads and writes images through a frozen visual tokenizer.

It knows the tokenizer only through :class:`~unicodebook.tokenizers.base.VisualTokenizer`.
Reading: a tokenizer that is read as latents (UniCode) has its h·w rows of Ẑ = F(e(M)) replace
the input embeddings at the ``<image>`` slots (no projector: Ẑ already lives in the LLM's
embedding space); one read through its codes has ``<img> codes </img>`` there — or, with
``understanding_input: features`` (LaVIT's official way), the same slots hold each code's
continuous feature before quantisation through a linear projector (``vit_proj``), while an image
the model writes stays its code tokens. The code token
ids come from ``tokenizer.attach`` (UniCode: rows the LLM already has; other families append
theirs). Writing, in one of two layouts:
``flat`` (the paper's) — between ``<img>`` and ``</img>`` the model emits the code token ids
(constrained decoding with a KV cache: exactly h·w·D for a fixed layout; for a variable one
``</img>`` ends the image, allowed from the layout's minimum, forced at its maximum); ``depth`` — the LLM
steps once per code position and a small depth transformer (:mod:`.depth`) emits that position's codes, scored
against the same codebook rows, the LLM reading back each position's aggregated Ẑ (a tokenizer
with a depth grid, read as latents). Either way the tokenizer's ``decode`` turns the codes into
a picture.

A model folder (the stage II run folder) holds::

    config.yaml                  the run config
    model.json                   format, geometry, layout and where the tokenizer came from
    image_positions.safetensors  the image-position table (``image_positions: true``)
    depth_head.safetensors       the depth head (depth layout only)
    vit_proj.safetensors         the features' projector (``understanding_input: features`` only)
    visual_tokenizer/            the frozen stage I tokenizer (``save_frozen``; tagged with its family)
    llm/                         the trained LLM (``save_pretrained``; LoRA merged)
    text_tokenizer/              the text tokenizer with the image markers
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, config_from_dict, read_yaml, save_config
from ..errors import UnicodebookError
from ..tokenizers.base import PAD_CODE, load_frozen
from ..utils.io import atomic_dir, atomic_save_tensors, atomic_write_json
from ..utils.modules import eval_mode
from .cache import reserve_cache
from .cpu_decoder import CPUDecoder
from .cpu_decoder import unsupported as cpu_decoder_unsupported
from .cpu_kernel import run_kernel, small_linear_kernel, unsupported
from .depth import DepthHead, depth_loss
from .llm import cache_argument, input_embedding, kv_cache, quiet_transformers
from .sequence import IGNORE, Batch, SequenceFormat
from .text import allowed_text_ids, load_text_tokenizer

MODEL_FORMAT = "unicodebook-model"
MODEL_VERSION = 2  # 2: the visual tokenizer in its own tagged folder


UNDERSTANDING_INPUTS = ("codes", "features")
SMALL_ROWS = 64  # decoding batches up to this many rows take the small-batch path on CPU


def small_batch_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for decoding: the streaming kernel (or W·xᵀ) for ≤ 64 rows."""
    rows = x.numel() // x.shape[-1]
    if rows > SMALL_ROWS:
        return F.linear(x, weight, bias)
    kernel = small_linear_kernel()
    if (
        kernel is not None
        and unsupported(x, weight, bias) is None
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):  # no backward
        return run_kernel(kernel, x, weight, bias)
    # both sides contiguous row-major: a (rows, K) input laid out column-major (the transposed
    # output of the previous W·xᵀ, carried through an elementwise op) sends MKL down a 3× slower path
    out = (weight @ x.reshape(rows, -1).contiguous().t()).t().contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _small_batch_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    return small_batch_linear(x, layer.weight, layer.bias)


@contextmanager
def decoding_kernels(llm: nn.Module):
    """Token-by-token decoding on CPU: every ``nn.Linear`` of the LLM takes a small-batch path
    for ≤ 64 rows.

    ``F.linear`` computes x·Wᵀ; for a couple of rows MKL then streams the weights at a fraction
    of the memory bandwidth. The path is the streaming kernel of :mod:`.cpu_kernel` (fp32, AVX2;
    80–90 % of a plain read) where it can be built, else W·xᵀ through PyTorch (same maths, a
    GEMV-like MKL kernel; bench/README.md has the figures). Weights are only read; outside the
    block nothing is changed.
    """
    patched = []
    if next(llm.parameters()).device.type == "cpu":
        for layer in llm.modules():
            if type(layer) is nn.Linear:
                layer.forward = _small_batch_linear.__get__(layer)
                patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


@dataclass
class LMOutput:
    loss: Tensor
    accuracy: Tensor  # next-token accuracy on the labelled positions (text and codes)
    n_tokens: int  # labelled targets: text tokens and codes
    code_accuracy: Tensor | None = None  # the codes' share of it (None: no code target in the batch)


class ImagePositions(nn.Module):
    """Where in the picture a Ẑ slot or a code token sits, as an embedding added to its input.

    A causal LM with relative (RoPE) positions would otherwise have to count tokens since the
    image began to know the row, column and depth of a code. One (row, col) table is shared by
    the Ẑ slots and the codes of the same cell, so "copy the code of this cell" and "draw here"
    become lookups; codes add a depth table. Not a projector: Ẑ itself is unchanged.
    """

    def __init__(self, grid_shape: tuple[int, int, int], latent_size: int | None, dim: int, std: float = 0.02):
        super().__init__()
        gh, gw, g = grid_shape
        self.cell = nn.Parameter(torch.randn(gh * gw, dim) * std)
        self.depth = nn.Parameter(torch.randn(g, dim) * std)
        if latent_size is not None:  # Ẑ slots of a latent map latent_size × latent_size
            r = torch.arange(latent_size) * gh // latent_size
            c = torch.arange(latent_size) * gw // latent_size
            self.register_buffer("latent_cell", (r[:, None] * gw + c[None, :]).flatten(), persistent=False)
        self.codes_per_cell = g

    # F.embedding rather than advanced indexing: its CPU backward sums repeated rows in a fixed
    # order, so a seeded run is bit-for-bit repeatable (and resumable)
    def latents(self) -> Tensor:
        """(h·w, d) for the Ẑ slots."""
        return F.embedding(self.latent_cell, self.cell)

    def codes(self, index: Tensor) -> Tensor:
        """index (...) of codes in sequence order → (..., d)."""
        return F.embedding(index // self.codes_per_cell, self.cell) + F.embedding(
            index % self.codes_per_cell, self.depth
        )


LAYOUTS = ("flat", "depth")
IMAGE_ATTENTION = ("causal", "bidirectional")


def attention_kernel(llm) -> str:
    """The attention implementation a ``transformers`` LLM runs (sdpa unless it says otherwise)."""
    return getattr(llm.config, "_attn_implementation", None) or "sdpa"


def image_block_mask(mask: Tensor, image_at: Tensor, slots: int | Tensor, llm) -> Tensor:
    """The LLM's attention mask (B, 1, L, L) for a right- or left-padded batch: causal over the
    keys ``mask`` (B, L) keeps, except that the ``slots`` (an int, or one per row) image input
    positions from ``image_at`` (rows ≥ 0) also see each other (a prefix-LM over the image it reads; what it
    writes stays causal).
    Every position sees itself, so no row of a left-padded prefill is empty (an empty row is NaN
    in SDPA, and a pad's NaN value would reach the real rows through a zero weight). Boolean
    (True: attend) for SDPA-style kernels, additive for the eager one."""
    length = mask.shape[1]
    i = torch.arange(length, device=mask.device)
    allowed = ((i[:, None] >= i[None, :])[None] & mask[:, None, :].bool()) | (i[:, None] == i[None, :])
    slots = torch.as_tensor(slots, device=mask.device).reshape(-1, 1)
    inside = (image_at[:, None] >= 0) & (i[None] >= image_at[:, None]) & (i[None] < image_at[:, None] + slots)
    allowed = (allowed | (inside[:, :, None] & inside[:, None, :]))[:, None]
    if attention_kernel(llm) == "eager":
        dtype = input_embedding(llm).weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


class UniCodeLM(nn.Module):
    """The LLM (trainable), the depth head (depth layout) and the visual tokenizer (frozen, kept
    out of ``parameters()``; any :class:`~unicodebook.tokenizers.base.VisualTokenizer`).

    ``layout``: ``flat`` writes h·w·D code tokens; ``depth`` one LLM position per code position,
    decoded by a :class:`~.depth.DepthHead` built from ``depth_head`` (its keyword arguments:
    layers, heads, mlp_ratio). With the depth layout the image slots an LLM reads are the code
    positions too (for RQ exactly Ẑ; for HQ Ẑ averaged over each position's 2×2 cells)."""

    def __init__(
        self,
        llm,
        tokenizer,
        text_tok,
        image_positions: bool = True,
        layout: str = "flat",
        depth_head: dict | None = None,
        image_attention: str = "causal",
        understanding_input: str = "codes",
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise UnicodebookError(f"image layout '{layout}' is not one of {', '.join(LAYOUTS)}")
        if image_attention not in IMAGE_ATTENTION:
            raise UnicodebookError(f"image attention '{image_attention}' is not one of {', '.join(IMAGE_ATTENTION)}")
        kernel = attention_kernel(llm)
        if image_attention == "bidirectional" and kernel not in ("sdpa", "eager"):
            raise UnicodebookError(
                f"image attention 'bidirectional' needs a 4-D attention mask, which the LLM's "
                f"'{kernel}' attention does not take (sdpa and eager do)"
            )
        self.image_attention = image_attention
        self.llm = llm
        self.layout = layout
        dim = input_embedding(llm).weight.shape[1]
        std = float(getattr(llm.config, "initializer_range", 0.02))
        codes = tokenizer.layout
        reads_codes = tokenizer.reads == "codes"
        depth = layout == "depth"
        if depth and codes.depth < 2:
            raise UnicodebookError(
                f"a depth head needs several codes per position; this tokenizer's grid "
                f"{'×'.join(map(str, codes.shape))} has {codes.depth}"
            )
        if depth and reads_codes:
            raise UnicodebookError(
                f"a depth head feeds each written position back as latents; the {tokenizer.family} "
                f"tokenizer is read through its codes"
            )
        if tokenizer.reads not in ("latents", "codes"):
            raise UnicodebookError(f"a tokenizer is read as 'latents' or 'codes', not '{tokenizer.reads}'")
        self.vit_proj = self._feature_projector(tokenizer, understanding_input, dim, std)
        self.understanding_input = understanding_input
        grid = codes.grid or (1, codes.length, 1)
        self.depth_head_args = dict(depth_head or {})
        self.depth_head = DepthHead(dim, grid[2], std=std, **self.depth_head_args) if depth else None
        slots = None if reads_codes else codes.positions if depth else tokenizer.num_latents
        side = None if slots is None else math.isqrt(slots)
        if side is not None and side * side != slots:
            raise UnicodebookError(f"the {tokenizer.family} tokenizer's {slots} latent slots are not a square map")
        self.image_positions = ImagePositions(grid, side, dim, std) if image_positions else None
        self.__dict__["tokenizer"] = tokenizer.eval().requires_grad_(False)
        self.text_tok = text_tok
        code_ids = tokenizer.attach(llm, text_tok)  # may append rows: read the vocabulary after it
        self.fmt = SequenceFormat(text_tok, code_ids, codes, slots, layout)
        vocab = input_embedding(llm).weight.shape[0]
        if len(code_ids) != tokenizer.num_codes or int(code_ids.max()) >= vocab:
            raise UnicodebookError(
                f"the {tokenizer.family} tokenizer's {tokenizer.num_codes} codes are not "
                f"attached to the LLM's {vocab} rows"
            )
        allowed = allowed_text_ids(text_tok, vocab)
        if not tokenizer.shares_text_rows:  # its codes are rows of their own: never part of an answer
            allowed[code_ids] = False
        self.register_buffer("code_token_ids", code_ids.clone(), persistent=False)
        self.register_buffer("text_allowed", allowed, persistent=False)

    @staticmethod
    def _feature_projector(tokenizer, understanding_input: str, dim: int, std: float) -> nn.Linear | None:
        """``vit_proj``: the tokenizer's continuous features → the LLM's width, where the model
        reads them (``understanding_input: features``); None where it reads the codes."""
        if understanding_input not in UNDERSTANDING_INPUTS:
            raise UnicodebookError(
                f"understanding_input '{understanding_input}' is not one of {', '.join(UNDERSTANDING_INPUTS)}"
            )
        if understanding_input == "codes":
            return None
        if tokenizer.reads != "codes":
            raise UnicodebookError(
                f"understanding_input 'features' is for a tokenizer read through its codes; the "
                f"{tokenizer.family} tokenizer is read as latents already"
            )
        if tokenizer.feature_dim <= 0:
            raise UnicodebookError(f"the {tokenizer.family} tokenizer has no continuous features to read")
        proj = nn.Linear(tokenizer.feature_dim, dim)
        nn.init.normal_(proj.weight, std=std)
        nn.init.zeros_(proj.bias)
        return proj

    def parts(self) -> dict[str, nn.Module]:
        """The trained modules besides the LLM, by the name they are saved and checkpointed under."""
        named = {"image_positions": self.image_positions, "depth_head": self.depth_head, "vit_proj": self.vit_proj}
        return {k: m for k, m in named.items() if m is not None}

    # ---------------------------------------------------------------- shapes
    @property
    def reads_features(self) -> bool:
        """The LLM reads an image as its codes' continuous features (``understanding_input: features``)."""
        return self.vit_proj is not None

    @property
    def codes_per_image(self) -> int:
        return self.fmt.codes_per_image

    @property
    def reads_codes(self) -> bool:
        """The LLM reads an image as its code tokens (not as latents spliced in)."""
        return self.fmt.reads_codes

    @property
    def steps_per_image(self) -> int:
        """LLM decoding steps to write one image: h·w·D (flat) or gh·gw (depth)."""
        return self.fmt.positions if self.layout == "depth" else self.fmt.codes_per_image

    @property
    def device(self) -> torch.device:
        return input_embedding(self.llm).weight.device

    @property
    def max_positions(self) -> int:
        return int(getattr(self.llm.config, "max_position_embeddings", 1 << 30))

    # ---------------------------------------------------------------- inputs
    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """images (B, 3, H, W) → (codes, features or None): what :meth:`answer` reads, by the frozen
        tokenizer; the features only where the model reads them."""
        images = images.to(self.device)  # the tokenizer sits where the model does (load_model)
        if self.reads_features:
            return self.tokenizer.encode_features(images)
        return self.tokenizer.encode(images), None

    def latents(self, codes: Tensor, features: Tensor | None = None) -> Tensor | None:
        """codes (B, gh, gw, G) → what the LLM reads for the images, from the frozen visual
        codebook: Ẑ (B, h·w, d) (flat layout) or each code position's aggregate (B, gh·gw, d);
        for a tokenizer read through its codes None (they are in the sequence itself), or the
        codes' ``features`` (B, length, F) where the model reads those."""
        if self.reads_features:
            if features is None:
                raise UnicodebookError(
                    "this model reads the tokenizer's continuous features (understanding_input: features): "
                    "pass them beside the codes (model.encode(images) gives both)"
                )
            return features
        if self.reads_codes:
            return None
        with torch.no_grad():
            if self.layout == "depth":
                return self.tokenizer.position_latents(codes.long().flatten(1, 2))
            return self.tokenizer.embed(codes.long())

    def _put_image(self, emb: Tensor, at: Tensor, latents: Tensor | None) -> Tensor:
        """``latents`` (R, n, d) (plus the slots' position embeddings) over the n slots from
        ``at`` in the R rows where ``at`` ≥ 0."""
        rows = (at >= 0).nonzero().flatten()
        if not rows.numel():
            return emb
        if latents is None or latents.shape[0] != rows.numel():
            raise ValueError("one Ẑ per row with an image is needed")
        latents = latents.to(emb.device, emb.dtype)
        if self.image_positions is not None:
            latents = latents + self.image_positions.latents().to(emb.dtype)
        pos = at[rows, None] + torch.arange(latents.shape[1], device=emb.device)
        return emb.index_put((rows[:, None], pos), latents)

    def _put_features(self, emb: Tensor, at: Tensor, n: Tensor, features: Tensor | None) -> Tensor:
        """``vit_proj(features)`` (R, length, F) over the ``n`` code slots from ``at`` in the R
        rows where ``at`` ≥ 0 (each row's first ``n`` features)."""
        rows = (at >= 0).nonzero().flatten()
        if not rows.numel():
            return emb
        if features is None or features.shape[0] != rows.numel():
            raise ValueError("one feature sequence per row with an image is needed")
        proj = self.vit_proj(features.to(emb.device, self.vit_proj.weight.dtype)).to(emb.dtype)
        offs = torch.arange(proj.shape[1], device=emb.device)
        inside = offs[None] < n.to(emb.device)[rows, None]
        pos = at[rows, None] + offs
        return emb.index_put((rows[:, None].expand_as(pos)[inside], pos[inside]), proj[inside])

    def _code_positions(self, emb: Tensor, at: Tensor, n: Tensor) -> Tensor:
        """``emb`` plus the image-position embeddings of the ``n`` code tokens from ``at`` (rows ≥ 0)."""
        if self.image_positions is None:
            return emb
        offs = torch.arange(emb.shape[1], device=emb.device) - at[:, None]
        inside = (at[:, None] >= 0) & (offs >= 0) & (offs < n.to(emb.device)[:, None])
        if bool(inside.any()):
            emb = emb.index_put(
                inside.nonzero(as_tuple=True), emb[inside] + self.image_positions.codes(offs[inside]).to(emb.dtype)
            )
        return emb

    def embed_inputs(
        self,
        input_ids: Tensor,
        image_at: Tensor,
        latents: Tensor | None,
        codes_at: Tensor | None = None,
        n_codes: Tensor | None = None,
        written: Tensor | None = None,
        image_len: Tensor | None = None,
    ) -> Tensor:
        """Token embeddings with Ẑ written over the h·w slots starting at ``image_at`` (rows ≥ 0)
        — or, for a tokenizer read through its codes, the ``image_len`` code tokens there as they
        are —, and (with image positions) the position embeddings of those slots and of the
        ``n_codes`` code tokens starting at ``codes_at``. Depth layout: ``written`` (R, gh·gw, d),
        the aggregates of the written image's positions, over the slots from ``codes_at``."""
        emb = input_embedding(self.llm)(input_ids)
        if self.reads_codes:
            if image_len is None:
                raise ValueError("the image's length is needed where the LLM reads its codes")
            if self.reads_features:  # the features over the code slots, then their positions as for codes
                emb = self._put_features(emb, image_at, image_len, latents)
            emb = self._code_positions(emb, image_at, image_len)
        else:
            emb = self._put_image(emb, image_at, latents)
        if self.layout == "depth":
            return emb if codes_at is None else self._put_image(emb, codes_at, written)
        return emb if codes_at is None else self._code_positions(emb, codes_at, n_codes)

    def attention_mask(self, mask: Tensor, image_at: Tensor, image_len: Tensor | None = None) -> Tensor:
        """What the LLM is given as its attention mask: the padding mask ``mask`` (B, L) as it is
        (causal), or with ``image_attention: bidirectional`` the 4-D mask of :func:`image_block_mask`
        over each row's ``image_len`` input slots (all: ``num_latents`` when read as latents)."""
        if self.image_attention == "causal" or not bool((image_at >= 0).any()):
            return mask
        slots = self.fmt.num_latents if image_len is None or not self.reads_codes else image_len
        return image_block_mask(mask, image_at, slots, self.llm)

    def code_embedding(self, token_ids: Tensor, index: int) -> Tensor:
        """Input embedding (B, 1, d) of the code tokens at sequence index ``index`` of an image."""
        emb = input_embedding(self.llm)(token_ids[:, None])
        if self.image_positions is not None:
            emb = emb + self.image_positions.codes(torch.tensor([index], device=emb.device)).to(emb.dtype)
        return emb

    def forward(self, batch: Batch, latents: Tensor | None) -> LMOutput:
        if self.layout == "depth":
            return self._forward_depth(batch, latents)
        dev = self.device
        ids, labels, mask = batch.input_ids.to(dev), batch.labels.to(dev), batch.attention_mask.to(dev)
        image_at, image_len = batch.image_at.to(dev), batch.image_len.to(dev)
        emb = self.embed_inputs(
            ids, image_at, latents, batch.codes_at.to(dev), batch.n_codes.to(dev), image_len=image_len
        )
        logits = self.llm(inputs_embeds=emb, attention_mask=self.attention_mask(mask, image_at, image_len)).logits
        # shift the labels, not the logits: no copy of the (B, L, V) tensor
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE)
        keep = target != IGNORE
        with torch.no_grad():
            hit = logits.argmax(-1) == target
            acc = hit[keep].float().mean()
            is_code = keep & torch.isin(target, self.code_token_ids)
            code_acc = hit[is_code].float().mean() if bool(is_code.any()) else None
        return LMOutput(loss, acc, int(keep.sum()), code_acc)

    def _hidden(self, emb: Tensor, mask: Tensor, cache=None, **kw):
        """The LLM's last (normed) hidden states, through its decoder (the output layer apart);
        ``cache``: a KV cache to extend."""
        decoder = self.llm.get_decoder()
        if cache is not None:
            kw[cache_argument(decoder)] = cache
        return decoder(inputs_embeds=emb, attention_mask=mask, **kw)

    def _forward_depth(self, batch: Batch, latents: Tensor | None) -> LMOutput:
        """Text targets through the LM head; each written position's codes through the depth
        head from the hidden state one slot earlier; the loss is the mean over both.

        Under code noise the LLM reads the noisy positions (``codes_in``) but the depth head's
        prefix within a position stays the true codes: it learns p(c_k | h, c_<k), the
        conditional it samples from, while the LLM learns to draw on from its own slips."""
        dev = self.device
        ids, labels, mask = batch.input_ids.to(dev), batch.labels.to(dev), batch.attention_mask.to(dev)
        codes_at = batch.codes_at.to(dev)
        codes = batch.codes.to(dev) if batch.codes is not None else None
        codes_in = batch.codes_in.to(dev) if batch.codes_in is not None else codes
        written = self.tokenizer.position_latents(codes_in) if codes is not None else None
        image_at = batch.image_at.to(dev)
        emb = self.embed_inputs(ids, image_at, latents, codes_at, written=written)
        hidden = self._hidden(emb, self.attention_mask(mask, image_at)).last_hidden_state
        logits = self.llm.get_output_embeddings()(hidden)
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
        keep = target != IGNORE
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE, reduction="sum")
        right = (logits.argmax(-1)[keep] == target[keep]).sum()
        n_text, n_codes, code_acc = int(keep.sum()), 0, None
        if codes is not None:
            rows = (codes_at >= 0).nonzero().flatten()
            n, g = codes.shape[1:]
            at = codes_at[rows, None] - 1 + torch.arange(n, device=dev)  # <img> and every slot but the last
            h = hidden[rows[:, None], at].flatten(0, 1)
            table = input_embedding(self.llm)
            code_emb = table(self.code_token_ids[codes[..., : g - 1]]).flatten(0, 1)
            d_loss, d_right = depth_loss(
                self.depth_head(h, code_emb, table.weight[self.code_token_ids]), codes.flatten(0, 1)
            )
            loss, right, n_codes = loss + d_loss, right + d_right, codes.numel()
            code_acc = d_right.float() / n_codes
        total = max(n_text + n_codes, 1)
        return LMOutput(loss / total, right.float() / total, n_text + n_codes, code_acc)

    # ---------------------------------------------------------------- decoding
    def _check_length(self, n: int, what: str) -> None:
        if n > self.max_positions:
            raise UnicodebookError(f"{what} needs {n} positions but the model's context is {self.max_positions}")

    def _prefill(
        self,
        rows: list[list[int]],
        image_at: list[int],
        latents: Tensor | None,
        extra: int,
        hidden: bool = False,
        image_len: list[int] | None = None,
    ):
        """Left-pad ``rows``, run them through the LLM once; → (last logits — or with ``hidden``
        the last normed hidden states —, cache, mask, next positions)."""
        dev = self.device
        n = max(len(r) for r in rows)
        self._check_length(n + extra, "this input")
        ids = torch.full((len(rows), n), self.fmt.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((len(rows), n), dtype=torch.long, device=dev)
        at = torch.full((len(rows),), -1, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            ids[i, n - len(r) :] = torch.tensor(r, device=dev)
            mask[i, n - len(r) :] = 1
            if image_at[i] >= 0:
                at[i] = image_at[i] + n - len(r)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        lens = torch.tensor(image_len or [0] * len(rows), dtype=torch.long, device=dev)
        emb = self.embed_inputs(ids, at, latents, image_len=lens)
        attend = self.attention_mask(mask, at, lens)
        if hidden:
            out = self._hidden(emb, attend, position_ids=pos, use_cache=True)
            last = out.last_hidden_state[:, -1]
        else:
            out = self.llm(inputs_embeds=emb, attention_mask=attend, position_ids=pos, use_cache=True)
            last = out.logits[:, -1].float()
        return last, reserve_cache(kv_cache(out), extra), mask, pos[:, -1] + 1

    @contextmanager
    def _decoder(
        self, cache, mask: Tensor, pos: Tensor, extra: int, out_rows: Tensor | None = None, hidden: bool = False
    ):
        """Decoding from a prefill's state, for up to ``extra`` tokens: yields ``step(emb (B, 1, d))
        → logits (B, rows) fp32`` over the output rows ``out_rows`` (all by default), or with
        ``hidden`` the last normed hidden states (B, d).

        On a CPU, a Llama-family LLM in fp32 decodes through :class:`.cpu_decoder.CPUDecoder`
        (one compiled call per layer); any other LLM through its own ``forward`` with the KV
        cache, its linear layers on the small-batch path (:func:`decoding_kernels`)."""
        if self.device.type == "cpu" and cpu_decoder_unsupported(self.llm, mask.shape[1] + extra) is None:
            yield CPUDecoder(self.llm, cache, mask, pos, extra, out_rows, hidden=hidden).step
            return
        state = [cache, mask, pos]

        def step(emb: Tensor) -> Tensor:
            cache, mask, pos = state
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            if hidden:
                out = self._hidden(emb, mask, cache, position_ids=pos[:, None], use_cache=True)
                state[:] = kv_cache(out), mask, pos + 1
                return out.last_hidden_state[:, -1]
            out = self.llm(
                inputs_embeds=emb,
                attention_mask=mask,
                position_ids=pos[:, None],
                use_cache=True,
                **{cache_argument(self.llm): cache},
            )
            state[:] = kv_cache(out), mask, pos + 1
            logits = out.logits[:, -1].float()
            return logits if out_rows is None else logits[:, out_rows]

        with decoding_kernels(self.llm):
            yield step

    @torch.inference_mode()
    def generate_codes(
        self,
        prompts: list[str | None],
        cfg_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Constrained decoding: for each prompt the code ids after ``<img>`` — exactly the
        layout's number for a fixed layout; for a variable one until ``</img>``, which is allowed
        from the layout's minimum and forced at its maximum.

        ``cfg_scale`` != 1 adds the unconditional prefix ``<s> <img>`` as a second half of the
        batch and samples from u + s·(c − u). Returns code indices (B, *layout.shape), the
        positions after a shorter image's end :data:`~unicodebook.tokenizers.base.PAD_CODE`.
        """
        b = len(prompts)
        rows = [self.fmt.t2i_prefix(p) for p in prompts]
        if cfg_scale != 1.0:
            rows += [self.fmt.t2i_prefix(None)] * b
        with eval_mode(self):
            if self.layout == "depth":
                return self._generate_depth(rows, b, cfg_scale, temperature, top_k, generator, progress)
            ids = self._generate_flat(rows, b, cfg_scale, temperature, top_k, generator, progress)
        return self.fmt.ids_to_codes(ids)

    def _generate_flat(
        self,
        rows: list[list[int]],
        b: int,
        cfg_scale: float,
        temperature: float,
        top_k: int,
        generator: torch.Generator | None,
        progress: bool,
    ) -> Tensor:
        """Flat layout: code ids one LLM step each (the output restricted to the code rows, and
        ``</img>`` where the layout's length varies). → (B, length) code indices, padded."""
        from tqdm.auto import tqdm

        guided = len(rows) > b
        layout = self.fmt.code_layout
        n, shortest, end = layout.length, layout.shortest, len(self.code_token_ids)
        out_rows = self.code_token_ids
        if not layout.fixed:  # the last column stands for </img>
            out_rows = torch.cat([out_rows, out_rows.new_tensor([self.fmt.end_id])])
        extra = n + 2
        logits, cache, mask, pos = self._prefill(rows, [-1] * len(rows), None, extra)
        codes = torch.full((b, n), PAD_CODE, dtype=torch.long, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        sub = logits[:, out_rows]  # only code ids (and </img>) are allowed between the markers
        with self._decoder(cache, mask, pos, extra, out_rows=out_rows) as step:
            for t in tqdm(range(n), desc="codes", disable=not progress, leave=False):
                if guided:
                    sub = sub[b:] + cfg_scale * (sub[:b] - sub[b:])
                if not layout.fixed and t < shortest:
                    sub = sub.clone()
                    sub[:, end] = float("-inf")
                pick = _sample(sub, temperature, top_k, generator)
                done |= pick == end
                codes[:, t] = pick.masked_fill(done, PAD_CODE)
                if t == n - 1 or bool(done.all()):
                    break
                nxt = out_rows[pick]
                sub = step(self.code_embedding(torch.cat([nxt, nxt]) if guided else nxt, t))
        return codes

    def _generate_depth(
        self,
        rows: list[list[int]],
        b: int,
        cfg_scale: float,
        temperature: float,
        top_k: int,
        generator: torch.Generator | None,
        progress: bool,
    ) -> Tensor:
        """Depth layout: one LLM step per code position, its codes from the depth head, the
        position's aggregate (and its image position) fed back. → (B, gh, gw, G)."""
        from tqdm.auto import tqdm

        guided = len(rows) > b
        n = self.fmt.positions
        extra = n + 2
        h, cache, mask, pos = self._prefill(rows, [-1] * len(rows), None, extra, hidden=True)
        table = input_embedding(self.llm)
        code_rows = table.weight[self.code_token_ids]
        cells = self.image_positions.latents() if self.image_positions is not None else None
        codes = torch.empty((b, n, self.fmt.grid_shape[2]), dtype=torch.long, device=self.device)

        def pick(logits: Tensor) -> Tensor:
            return _sample(logits, temperature, top_k, generator)

        head = self.depth_head.decoder(code_rows, small_batch_linear if self.device.type == "cpu" else F.linear)
        with self._decoder(cache, mask, pos, extra, hidden=True) as step:
            for t in tqdm(range(n), desc="positions", disable=not progress, leave=False):
                codes[:, t] = head.sample(h, pick, b if guided else 0, cfg_scale)
                if t == n - 1:
                    break
                x = self.tokenizer.position_latents(codes[:, t : t + 1])[:, 0].to(table.weight.device)
                if cells is not None:
                    x = x + cells[t]
                h = step((torch.cat([x, x]) if guided else x)[:, None].to(table.weight.dtype))
        return codes.reshape(b, *self.fmt.grid_shape)

    @torch.no_grad()
    def generate_image(
        self,
        prompt: str | list[str],
        n: int = 1,
        cfg_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> Tensor:
        """Prompt(s) → images (B, 3, H, W) in [0, 1]; ``n`` samples per prompt."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(n)]
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        codes = self.generate_codes(prompts, cfg_scale, temperature, top_k, gen)
        return self.tokenizer.decode(codes)

    @torch.inference_mode()
    def answer(
        self, codes: Tensor, questions: list[str], max_new_tokens: int = 16, features: Tensor | None = None
    ) -> list[str]:
        """Greedy answers to one question per image (codes (B, *layout.shape)), text ids only;
        ``features``: the codes' (:meth:`encode`), where the model reads them."""
        with eval_mode(self):
            codes = codes.cpu()
            prompts = [self.fmt.prompt(q, codes=c) for q, c in zip(questions, codes)]
            latents = self.latents(codes, features)
            logits, cache, mask, pos = self._prefill(
                [p for p, _ in prompts],
                [a for _, a in prompts],
                latents,
                max_new_tokens,
                image_len=[self.fmt.read_length(c) for c in codes],
            )
            eos = self.fmt.eos_id
            out = [[] for _ in questions]
            done = torch.zeros(len(questions), dtype=torch.bool, device=self.device)
            with self._decoder(cache, mask, pos, max_new_tokens) as step:
                for _ in range(max_new_tokens):
                    nxt = logits.masked_fill(~self.text_allowed, float("-inf")).argmax(-1)
                    for i in (~done).nonzero().flatten().tolist():
                        if int(nxt[i]) != eos:
                            out[i].append(int(nxt[i]))
                    done |= nxt == eos
                    if bool(done.all()):
                        break
                    logits = step(input_embedding(self.llm)(nxt[:, None]))
        return [self.text_tok.decode(o, skip_special_tokens=True).strip() for o in out]

    def stream_answer(
        self,
        codes: Tensor,
        question: str,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        seed: int | None = None,
        features: Tensor | None = None,
    ):
        """The answer to one question about one image (codes (*layout.shape); ``features``
        (length, F) where the model reads them), yielded as text pieces while it is decoded; the
        pieces join to what :meth:`answer` returns when ``temperature`` is 0 (greedy), else
        tokens are sampled (``seed`` fixes them).

        A generator: closing it stops the decoding (a server's client went away); once exhausted
        its return value (``StopIteration.value``) is the number of tokens decoded."""
        with torch.inference_mode():  # per resumption: the generator may be resumed on another thread
            was = self.training
            self.eval()
            codes = codes.cpu()
            ids, at = self.fmt.prompt(question, codes=codes)
            latents = self.latents(codes[None], None if features is None else features[None])
            logits, cache, mask, pos = self._prefill(
                [ids], [at], latents, max_new_tokens, image_len=[self.fmt.read_length(codes)]
            )
            gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
            decoder = self._decoder(cache, mask, pos, max_new_tokens)
            step = decoder.__enter__()
        out: list[int] = []
        sent = ""
        try:
            for _ in range(max_new_tokens):
                with torch.inference_mode():  # never across a yield: the next resumption may be on another thread
                    nxt = _sample(logits.masked_fill(~self.text_allowed, float("-inf")), temperature, 0, gen)
                if int(nxt[0]) == self.fmt.eos_id:
                    break
                out.append(int(nxt[0]))
                # text decoded so far, less trailing blanks a later token may still join onto
                text = self.text_tok.decode(out, skip_special_tokens=True).strip()
                if text.startswith(sent) and len(text) > len(sent):
                    piece, sent = text[len(sent) :], text
                    yield piece
                if len(out) == max_new_tokens:
                    break
                with torch.inference_mode():
                    logits = step(input_embedding(self.llm)(nxt[:, None]))
            text = self.text_tok.decode(out, skip_special_tokens=True).strip()
            if text != sent and text.startswith(sent):
                yield text[len(sent) :]
            return len(out)
        finally:
            decoder.__exit__(None, None, None)
            self.train(was)

    @torch.no_grad()
    def chat(self, image: Tensor, question: str, max_new_tokens: int = 16) -> str:
        """image (3, H, W) or (1, 3, H, W) in [0, 1] → the answer to ``question``."""
        if image.ndim == 3:
            image = image[None]
        codes, features = self.encode(image)
        return self.answer(codes, [question], max_new_tokens, features=features)[0]


def _sample(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


# -------------------------------------------------------------------------------- save / load
def save_model(model: UniCodeLM, folder: Path, cfg: Config, tokenizer_run: str, states: dict | None = None) -> None:
    """Write the model folder (each part atomically; ``model.json`` last). ``states``: the
    full ``llm`` state dict and those of the :meth:`~UniCodeLM.parts` to write instead of the
    modules' own (a sharded FSDP run gathers them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    model.tokenizer.save_frozen(folder / "visual_tokenizer")
    states = states or {}
    for name, part in model.parts().items():
        atomic_save_tensors(states.get(name) or part.state_dict(), folder / f"{name}.safetensors")
    llm = model.llm
    if (
        hasattr(llm, "merge_and_unload") and "llm" not in states
    ):  # LoRA: save the merged weights, keep training the adapter
        import copy

        llm = copy.deepcopy(llm).merge_and_unload()
    with atomic_dir(folder / "llm") as tmp:
        llm.save_pretrained(tmp, safe_serialization=True, state_dict=states.get("llm"))
    with atomic_dir(folder / "text_tokenizer") as tmp:
        model.text_tok.save_pretrained(str(tmp))
    visual_tok = model.tokenizer
    codes = visual_tok.layout
    atomic_write_json(
        folder / "model.json",
        {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "tokenizer_run": str(tokenizer_run),
            "family": visual_tok.family,
            "image_size": visual_tok.image_size,
            "code_shape": list(codes.shape),
            "codes_per_image": codes.length,
            "min_codes_per_image": codes.shortest,
            "reads": visual_tok.reads,
            "num_codes": visual_tok.num_codes,
            "image_positions": model.image_positions is not None,
            "layout": model.layout,
            "image_attention": model.image_attention,
            "understanding_input": model.understanding_input,
            **({"depth_head": model.depth_head_args} if model.depth_head is not None else {}),
        },
    )


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> UniCodeLM:
    """Load a stage II model folder (see the module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise UnicodebookError(f"model folder '{folder}' does not exist")
    try:
        meta = json.loads((folder / "model.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UnicodebookError(f"{folder}: not a model folder (missing or unreadable model.json)") from None
    if meta.get("format") != MODEL_FORMAT or meta.get("version") != MODEL_VERSION:
        old = (
            meta.get("format") == MODEL_FORMAT
            and isinstance(meta.get("version"), int)
            and meta["version"] < MODEL_VERSION
        )
        raise UnicodebookError(
            f"{folder}: model.json is not a {MODEL_FORMAT} v{MODEL_VERSION} file"
            + (f" (v{meta['version']}: written by an earlier unicodebook; train it again)" if old else "")
        )
    for name, what in (
        ("visual_tokenizer", "visual tokenizer"),
        ("text_tokenizer", "text tokenizer"),
        ("llm/config.json", "LLM"),
    ):
        if not (folder / name).exists():
            raise UnicodebookError(f"{folder}: no bound {what} (missing {name})")
    cfg = config_from_dict(read_yaml(folder / "config.yaml"))
    visual_tok = load_frozen(folder / "visual_tokenizer")
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        llm = AutoModelForCausalLM.from_pretrained(folder / "llm", local_files_only=True)
    except (OSError, ValueError) as e:
        raise UnicodebookError(f"cannot load the LLM in {folder}/llm: {str(e).splitlines()[0]}") from None
    text_tok = load_text_tokenizer(folder / "text_tokenizer")
    model = UniCodeLM(
        llm,
        visual_tok,
        text_tok,
        image_positions=bool(meta.get("image_positions")),
        layout=meta.get("layout", "flat"),
        depth_head=meta.get("depth_head"),
        image_attention=meta.get("image_attention", "causal"),
        understanding_input=meta.get("understanding_input", "codes"),
    ).eval()
    for name, part in model.parts().items():
        try:
            part.load_state_dict(load_file(folder / f"{name}.safetensors"))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise UnicodebookError(
                f"{folder}/{name}.safetensors is missing or does not fit ({str(e).splitlines()[0]})"
            ) from None
    model.to(device)
    model.tokenizer.to(device)
    model.__dict__["config"] = cfg
    return model
