"""A local official SEED tokenizer checkpoint (its state dict) mapped onto ours.

Our parameter names are the official ones where the modules correspond, so the map is short:

* the EVA ViT's attention keeps a query and a value bias apart (``attn.q_bias``, ``attn.v_bias``,
  no key bias): they become our ``attn.qkv.bias`` (query, zeros, value);
* keys of parts we do not have are left out and listed: the Q-Former's text side (word and
  position embeddings, the text feed-forward ``intermediate`` / ``output``, ``cls``), BLIP-2's
  ``text_proj`` / ``itm_head`` / ``temp``, EVA's relative position biases, and the released
  SEED-2 generation head ``image_down`` (ours is the paper's reverse Q-Former);
* our parts the official checkpoint has no weights for are listed as missing: the pixel decoder
  (the original decodes with Stable unCLIP), the ViT's final norm (BLIP-2 reads the ViT before
  it), the contrastive ``vision_proj`` of a codebook checkpoint, the codebook's bookkeeping.

The official files are pickles: convert one first with
``safetensors.torch.save_file(torch.load(path, weights_only=True), "seed.safetensors")``
(``weights_only`` runs no code), then :func:`load_official`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ...errors import UnicodebookError

DROPPED = re.compile(
    r"^(Qformer|Reverse_Qformer)\.(cls\.|bert\.embeddings\.(word|position)_embeddings|"
    r"bert\.embeddings\.position_ids|bert\.encoder\.layer\.\d+\.(intermediate|output)\.)"
    r"|^(text_proj|itm_head|temp|image_down)\b|^visual_encoder\.(rel_pos_bias|.*relative_position)"
)


def eva_qkv_biases(state: dict[str, Tensor], encoder: str) -> tuple[dict[str, Tensor], set[str]]:
    """EVA's attention biases under ``{encoder}.blocks.{i}.attn.`` (``q_bias`` and ``v_bias``, no key
    bias) → (our ``attn.qkv.bias`` of each block: query, zeros, value; the official keys used)."""
    out, used = {}, set()
    for key, value in state.items():
        m = re.match(rf"^({re.escape(encoder)}\.blocks\.\d+\.attn\.)(q_bias|v_bias)$", key)
        if m:
            used.add(key)
            if m.group(2) == "q_bias":
                v = state[m.group(1) + "v_bias"]
                out[m.group(1) + "qkv.bias"] = torch.cat([value, torch.zeros_like(v), v])
    return out, used


def map_official(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """official state dict → (our state dict, the official keys left out)."""
    return split_official({k.removeprefix("model."): v for k, v in state.items()}, "visual_encoder", DROPPED)


def split_official(state: dict[str, Tensor], encoder: str, dropped: re.Pattern) -> tuple[dict[str, Tensor], list[str]]:
    """An official state dict under our names but for EVA's q/v biases (of the ViT at ``encoder``)
    → (our state dict, the keys ``dropped`` leaves out, sorted)."""
    out, used = eva_qkv_biases(state, encoder)
    left = []
    for key, value in state.items():
        if key in used:
            continue
        if dropped.search(key):
            left.append(key)
            continue
        out[key] = value
    return out, sorted(left)


def load_official(visual_tok, path: str | Path, strict_shapes: bool = True) -> dict:
    """Load an official SEED checkpoint (a safetensors file) into ``visual_tok`` (a
    :class:`~unicodebook.tokenizers.seed.SeedTokenizer` built at the official sizes) → a report:
    ``{"loaded": n, "left_out": [...], "missing": [...]}``. Keys that exist on both sides with
    different shapes are one error line."""
    return load_mapped(visual_tok, read_converted(path, "tokenizers/seed/official.py"), str(path))


def read_converted(path: str | Path, how: str) -> dict[str, Tensor]:
    """A converted official checkpoint (safetensors) → its state dict; one error line naming
    ``how`` (where the conversion is described) when it is not readable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(Path(path))
    except (SafetensorError, OSError) as e:
        raise UnicodebookError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); convert the "
            f"official .pth first (see {how})"
        ) from None


def load_mapped(visual_tok, state: dict[str, Tensor], name: str = "the checkpoint") -> dict:
    return fit_mapped(visual_tok, *map_official(state), name)


def fit_mapped(visual_tok, mapped: dict[str, Tensor], left: list[str], name: str) -> dict:
    """Load ``mapped`` (official weights under our names) into ``visual_tok`` → the report of
    :func:`load_official`; ``left``: the official keys already left out."""
    left = list(left)
    mine = visual_tok.state_dict()
    for k, v in mapped.items():
        if k not in mine:
            left.append(k)
        elif tuple(v.shape) != tuple(mine[k].shape):
            raise UnicodebookError(
                f"{name}: {k} has shape {tuple(v.shape)}, this tokenizer's {tuple(mine[k].shape)} "
                f"(build it at the checkpoint's sizes)"
            )
    fit = {k: v for k, v in mapped.items() if k in mine}
    visual_tok.load_state_dict(fit, strict=False, assign=any(p.is_meta for p in visual_tok.parameters()))
    return {"loaded": len(fit), "left_out": sorted(left), "missing": sorted(set(mine) - set(fit))}
