"""Stage II data: LLaVA conversations, text-to-image pairs, and the cached codes of their images.

Readers are forgiving per record and strict per file: a malformed JSON line or conversation is
reported (logger ``unicodebook.data``), counted and skipped; a missing or unreadable file is an
error. Images are encoded once by the frozen tokenizer and the codes cached beside the data
(``SPLIT/.codes/<tokenizer hash>-<image list hash>.safetensors``), so the LLM stage never
re-encodes an image. The cache holds each image's codes in its tokenizer's layout; a
variable-length tokenizer's shorter images are padded with ``PAD_CODE`` (``CodeCache.lengths``).
Where the LLM reads a tokenizer's continuous features (``understanding_input: features``) the
cache holds them beside the codes, from the same encoding (``…-features.safetensors``, float16).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import DataConfig
from ..errors import BadImageError, UnicodebookError
from ..tokenizers.base import PAD_CODE
from ..utils.modules import eval_mode
from .images import load_image

log = logging.getLogger("unicodebook.data")


@dataclass
class Conversation:
    image: str  # path relative to the data folder
    turns: list[dict]  # [{"from": "human"|"gpt", "value": str, ...}]


@dataclass
class Caption:
    image: str
    caption: str
    held_out: bool = False


@dataclass
class Records:
    conversations: list[Conversation] = field(default_factory=list)
    captions: list[Caption] = field(default_factory=list)
    bad: int = 0  # malformed records skipped


MAX_CAPTION_CHARS = (
    DataConfig.max_caption_chars
)  # the defaults of data.max_caption_chars and data.max_conversation_chars
MAX_CONVERSATION_CHARS = DataConfig.max_conversation_chars


def read_llava(path: Path, max_chars: int = MAX_CONVERSATION_CHARS) -> tuple[list[Conversation], int]:
    """LLaVA JSON: ``[{"id", "image", "conversations": [{"from", "value"}, …]}]``; a conversation
    of more than ``max_chars`` characters (all turns) is skipped."""
    try:
        items = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UnicodebookError(f"{path}: not valid JSON (line {e.lineno})") from None
    if not isinstance(items, list):
        raise UnicodebookError(f"{path}: expected a JSON list of conversations")
    out, bad = [], 0
    for i, it in enumerate(items):
        why = _conversation_problem(it, max_chars)
        if why:
            log.warning("skipping %s item %d: %s", path.name, i, why)
            bad += 1
            continue
        turns = [{k: t[k] for k in ("from", "value", "type") if k in t} for t in it["conversations"]]
        out.append(Conversation(it["image"], turns))
    return out, bad


def _conversation_problem(it, max_chars: int) -> str | None:
    if not isinstance(it, dict) or not isinstance(it.get("image"), str):
        return "no 'image' path"
    conv = it.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "no 'conversations' list"
    for t in conv:
        if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
            return "a turn is not {'from': 'human'|'gpt', 'value': str}"
    if sum("<image>" in t["value"] for t in conv) != 1 or "<image>" not in conv[0]["value"]:
        return "the first human turn must hold the one '<image>'"
    if not any(t["from"] == "gpt" for t in conv):
        return "no assistant ('gpt') turn"
    n = sum(len(t["value"]) for t in conv)
    if n > max_chars:
        return f"{n} characters, more than the {max_chars} accepted (data.max_conversation_chars)"
    return None


def read_pairs(path: Path, max_chars: int = MAX_CAPTION_CHARS) -> tuple[list[Caption], int]:
    """JSONL ``{"image", "caption"[, "held_out"]}`` per line; a caption of more than
    ``max_chars`` characters is skipped."""
    out, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec.get("image"), str) or not isinstance(rec.get("caption"), str):
                    raise ValueError("needs string 'image' and 'caption'")
                if len(rec["caption"]) > max_chars:
                    raise ValueError(
                        f"caption of {len(rec['caption'])} characters, more than the {max_chars} "
                        "accepted (data.max_caption_chars)"
                    )
            except (json.JSONDecodeError, ValueError, AttributeError) as e:
                log.warning(
                    "skipping %s line %d: %s",
                    path.name,
                    n,
                    "not valid JSON" if isinstance(e, json.JSONDecodeError) else e,
                )
                bad += 1
                continue
            out.append(Caption(rec["image"], rec["caption"], bool(rec.get("held_out", False))))
    return out, bad


def read_records(folder: Path, instruct: str = "instruct.json", pairs: str = "t2i.jsonl", data=None) -> Records:
    """Whatever of the two files ``folder`` holds (at least one); ``data``: a config's ``data``
    section, for its length limits (None: the defaults)."""
    data = data or DataConfig()
    rec = Records()
    found = False
    if (folder / instruct).exists():
        rec.conversations, b = read_llava(folder / instruct, data.max_conversation_chars)
        rec.bad += b
        found = True
    if (folder / pairs).exists():
        rec.captions, b = read_pairs(folder / pairs, data.max_caption_chars)
        rec.bad += b
        found = True
    if not found:
        raise UnicodebookError(f"{folder}: neither {instruct} (LLaVA conversations) nor {pairs} (image-caption pairs)")
    return rec


def tokenizer_hash(visual_tok) -> str:
    h = hashlib.sha256()
    for k, v in sorted(visual_tok.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    settings = visual_tok.encode_settings()
    if settings:  # how it encodes, where that is not in the weights (LaVIT's keep rule)
        h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass
class CodeCache:
    codes: torch.Tensor  # (N, *layout.shape) int32 code indices, PAD_CODE after a shorter image's end
    index: dict[str, int]  # image path → row
    bad: list[str]  # images that could not be read
    features: torch.Tensor | None = None  # (N, length, feature_dim) float16, with ``features=True``

    def take(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The codes (long) of ``rows``, and their features where the cache holds them."""
        return self.codes[rows].long(), None if self.features is None else self.features[rows]

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) the number of codes of each image."""
        return (self.codes.reshape(self.codes.shape[0], -1) != PAD_CODE).sum(1)


def cached_codes(
    visual_tok,
    folder: Path,
    images: list[str],
    fallback: Path | None = None,
    batch_size: int = 256,
    progress: bool = True,
    odd_size: str = "resize",
    limits: dict | None = None,
    features: bool = False,
) -> CodeCache:
    """Codes of ``images`` (paths relative to ``folder``, which they must not leave), encoded once
    by the visual tokenizer ``visual_tok`` and cached on disk; ``odd_size``: what to do with images not
    at its size; ``limits``: :func:`~unicodebook.data.images.image_limits`; ``features``: each code's
    continuous feature too (``visual_tok.encode_features``)."""
    from safetensors.torch import load_file

    from ..utils.io import atomic_save_tensors

    images = sorted(set(images))
    key = tokenizer_hash(visual_tok) + "-" + hashlib.sha256("\n".join(images).encode()).hexdigest()[:12]
    key += "-features" if features else ""
    path = folder / ".codes" / f"{key}.safetensors"
    for candidate in (path, (fallback / f"{key}.safetensors") if fallback else None):
        if candidate is not None and candidate.exists():
            from safetensors import safe_open

            with safe_open(candidate, "pt") as f:
                meta = f.metadata()
            tensors = load_file(candidate)
            ok = json.loads(meta["images"])
            return CodeCache(
                tensors["codes"], {p: i for i, p in enumerate(ok)}, json.loads(meta["bad"]), tensors.get("features")
            )
    ok, bad, chunks, feature_chunks, pending = [], [], [], [], []

    def flush():
        if pending:
            x = torch.stack([t for _, t in pending])
            if features:
                codes, feats = visual_tok.encode_features(x)
                feature_chunks.append(feats.to(torch.float16).cpu())
            else:
                codes = visual_tok.encode(x)
            chunks.append(codes.to(torch.int32).cpu())
            ok.extend(p for p, _ in pending)
            pending.clear()

    with eval_mode(visual_tok):
        for p in tqdm(images, desc="encoding images", disable=not progress, leave=False):
            try:
                pending.append(
                    (p, load_image(folder / p, visual_tok.image_size, odd_size, root=folder, **(limits or {})))
                )
            except BadImageError as e:
                log.warning("skipping bad image %s", e)
                bad.append(p)
            if len(pending) >= batch_size:
                flush()
        flush()
    if not ok:
        raise UnicodebookError(f"{folder}: none of the {len(images)} images could be read")
    tensors = {"codes": torch.cat(chunks)} | ({"features": torch.cat(feature_chunks)} if features else {})
    meta = {"images": json.dumps(ok), "bad": json.dumps(bad)}
    try:
        atomic_save_tensors(tensors, path, metadata=meta)
    except OSError:
        if fallback is None:
            raise
        atomic_save_tensors(tensors, fallback / f"{key}.safetensors", metadata=meta)
    return CodeCache(tensors["codes"], {p: i for i, p in enumerate(ok)}, bad, tensors.get("features"))
