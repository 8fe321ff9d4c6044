"""A local official LaVIT tokenizer checkpoint (its state dicts) mapped onto ours.

The release keeps the tokenizer in three files under ``visual_tokenizer/``:
``tokenizer_encoder.bin`` (the ``DynamicVisualTokenizer``: ``token_predictor``, ``causal_encoder``,
``encode_task_layer``, ``quantize``, ``vit_proj``, maybe the ViT under ``encoder.``),
``tokenizer_decoder.bin`` (the ``VQDecoder``, our ``tokenizer_decoder``) and ``eva_vitg_psz14.bin``
(EVA-CLIP-g, keys without a prefix, our ``encoder``). Our names are the official ones where the
modules correspond, so the map is short:

* the decoder's keys go under ``tokenizer_decoder.``, the EVA file's under ``encoder.``;
* EVA's attention keeps a query and a value bias apart (``attn.q_bias``, ``attn.v_bias``): they
  become our ``attn.qkv.bias`` (query, zeros, value), as for SEED;
* keys of parts we do not have are left out and listed: ``vit_proj`` (the understanding
  projection to LLaMA's 4096: here it belongs to the stage II model, ``UniCodeLM.vit_proj`` with
  ``understanding_input: features``, and :func:`understanding_projector` gives its weights), the
  decoder's ``unet_proj`` (Stable Diffusion's condition), EVA's ``head`` bias (and its head, when
  ours is built without one) and relative position biases;
* our parts the official files have no weights for are listed as missing: the pixel decoder (the
  original decodes with Stable Diffusion) and the codebook's bookkeeping (``quantize.initialised``,
  ``quantize.last_used``).

Build the tokenizer at the official sizes (EVA-g: 224 px, patch 14, width 1408, 40 blocks, 16
heads, MLP 6144, no head; merger and de-tokenizer 12 blocks of 16 heads, MLP ratio 4.3637; 16384
× 32 codes). The files are pickles: convert each first with
``safetensors.torch.save_file(torch.load(path, weights_only=True), "….safetensors")``
(``weights_only`` runs no code), then :func:`load_official`.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from ...errors import UnicodebookError
from ..seed.official import fit_mapped, read_converted, split_official

DROPPED = re.compile(
    r"^vit_proj\.|^tokenizer_decoder\.unet_proj\."
    r"|^encoder\.(head\.bias|rel_pos_bias|.*relative_position)"
)
HOW = "tokenizers/lavit/official.py"


def map_official(
    encoder: dict[str, Tensor], decoder: dict[str, Tensor] | None = None, vit: dict[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], list[str]]:
    """the official tokenizer-encoder state dict (and those of its decoder and its EVA ViT) → (our
    state dict, the official keys left out, named as ours would be)."""
    state = {k.removeprefix("module."): v for k, v in encoder.items()}
    state |= {f"tokenizer_decoder.{k.removeprefix('module.')}": v for k, v in (decoder or {}).items()}
    state |= {f"encoder.{k.removeprefix('module.')}": v for k, v in (vit or {}).items()}
    return split_official(state, "encoder", DROPPED)


def load_mapped(
    visual_tok,
    encoder: dict[str, Tensor],
    decoder: dict[str, Tensor] | None = None,
    vit: dict[str, Tensor] | None = None,
    name: str = "the checkpoint",
) -> dict:
    return fit_mapped(visual_tok, *map_official(encoder, decoder, vit), name)


def load_official(
    visual_tok, encoder_path: str | Path, decoder_path: str | Path | None = None, vit_path: str | Path | None = None
) -> dict:
    """Load the official LaVIT tokenizer files (converted to safetensors) into ``visual_tok`` (a
    :class:`~unicodebook.tokenizers.lavit.LavitTokenizer` built at the official sizes) → a report:
    ``{"loaded": n, "left_out": [...], "missing": [...]}``. Keys on both sides with different
    shapes are one error line."""
    decoder, vit = (read_converted(p, HOW) if p is not None else None for p in (decoder_path, vit_path))
    return load_mapped(visual_tok, read_converted(encoder_path, HOW), decoder, vit, str(encoder_path))


def understanding_projector(encoder: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official tokenizer-encoder state dict → the state dict of its ``vit_proj`` (the merged
    tokens → LLaMA's width), for the ``vit_proj`` of a stage II model that reads the features."""
    state = {k.removeprefix("module."): v for k, v in encoder.items()}
    proj = {k.removeprefix("vit_proj."): v for k, v in state.items() if k.startswith("vit_proj.")}
    if set(proj) != {"weight", "bias"}:
        raise UnicodebookError("the checkpoint has no vit_proj.weight and vit_proj.bias (the understanding projection)")
    return proj
