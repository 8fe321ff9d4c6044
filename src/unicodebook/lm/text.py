"""The text tokenizer of a stage II model, and the image markers it must know.

* the builtin LLM gets a word-level tokenizer trained on the run's own text (the shapes world
  has a closed vocabulary, so every word is one token);
* a real model uses ``AutoTokenizer`` from the same local folder as the LLM.

Either way the three markers below are added as special tokens when missing (the LLM's
embedding table grows to match, new rows initialised to the mean of the old ones).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import UnicodebookError

IMAGE_TOKEN = "<image>"  # where Ẑ (h·w embeddings) is spliced into the input
IMG_START = "<img>"  # an image written by the model: <img> h·w·D code ids </img>
IMG_END = "</img>"
MARKERS = (IMAGE_TOKEN, IMG_START, IMG_END)
BUILTIN_SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_word_tokenizer(texts: Iterable[str], max_vocab: int):
    """A word-level ``PreTrainedTokenizerFast`` over ``texts``: specials first (pad 0, bos 1, eos 2,
    unk 3, then the markers), then every word and punctuation mark, most frequent first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(BUILTIN_SPECIALS.values()) + list(MARKERS)
    model = Tokenizer(models.WordLevel(unk_token=BUILTIN_SPECIALS["unk_token"]))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    trainer = trainers.WordLevelTrainer(vocab_size=max_vocab, special_tokens=specials, min_frequency=1)
    model.train_from_iterator(texts, trainer=trainer)
    if model.get_vocab_size() > max_vocab:  # pragma: no cover - the trainer caps it
        raise UnicodebookError(f"text vocabulary ({model.get_vocab_size()}) exceeds {max_vocab}")
    text_tok = PreTrainedTokenizerFast(
        tokenizer_object=model, **BUILTIN_SPECIALS, additional_special_tokens=list(MARKERS)
    )
    return text_tok


def load_text_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnicodebookError(f"cannot load the text tokenizer from {folder}: {first}") from None


def ensure_markers(text_tok, llm) -> list[str]:
    """Add the image markers (and a pad token) to ``text_tok`` when it lacks them; grow the LLM's
    embeddings to match. Returns the tokens added."""
    vocab = text_tok.get_vocab()
    missing = [m for m in MARKERS if m not in vocab]
    added = []
    if missing:
        text_tok.add_special_tokens({"additional_special_tokens": list(missing)}, replace_extra_special_tokens=False)
        added += missing
    if text_tok.pad_token is None:
        text_tok.pad_token = text_tok.eos_token or text_tok.unk_token
    if text_tok.eos_token is None:
        raise UnicodebookError("the text tokenizer has no end-of-sequence token")
    n = len(text_tok)
    emb = llm.get_input_embeddings()
    if n > emb.weight.shape[0]:
        old = emb.weight.shape[0]
        llm.resize_token_embeddings(n, mean_resizing=True)
        added.append(f"(embeddings {old} → {n} rows)")
    return added


def marker_ids(text_tok) -> dict[str, int]:
    ids = {m: text_tok.convert_tokens_to_ids(m) for m in MARKERS}
    bad = [m for m, i in ids.items() if i is None or i == text_tok.unk_token_id]
    if bad:
        raise UnicodebookError(f"the text tokenizer lacks the marker(s) {', '.join(bad)}")
    return ids


def text_ids(text_tok, text: str) -> list[int]:
    """Token ids of ``text`` without any special tokens the tokenizer would add itself."""
    return list(text_tok(text, add_special_tokens=False)["input_ids"])


def pad_id_of(text_tok) -> int:
    """The id padded positions hold: the text tokenizer's pad token, else 0. Padding is kept out
    of attention and of the loss, so the id only has to be a row the LLM has."""
    return text_tok.pad_token_id if text_tok.pad_token_id is not None else 0


def allowed_text_ids(text_tok, vocab_size: int) -> torch.Tensor:
    """Boolean mask over the LLM vocabulary of the ids a text answer may use: the text
    tokenizer's ids, minus the image markers and padding."""
    n = min(len(text_tok), vocab_size)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[:n] = True
    for i in marker_ids(text_tok).values():
        mask[i] = False
    if text_tok.pad_token_id is not None and text_tok.pad_token_id != text_tok.eos_token_id:
        mask[text_tok.pad_token_id] = False
    return mask
