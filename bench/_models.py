"""The models the benchmarks time: the tiny preset and a ~100M-parameter configuration.

Random weights (speed does not depend on training); the tokenizer geometry is the tiny preset's
(36 px, a 9×9×4 code grid = 324 code tokens per image). Image position embeddings are off so
our decoding and ``transformers``' ``generate`` run exactly the same network.
"""

from __future__ import annotations

import torch

from unicodebook.config import load_config
from unicodebook.data.shapes import COLOURS, SHAPES
from unicodebook.lm.llm import load_llm
from unicodebook.lm.model import UniCodeLM
from unicodebook.lm.text import ensure_markers, train_word_tokenizer
from unicodebook.tokenizers.unicode.build import build_tokenizer

PRESETS = {
    "tiny": [],  # the tiny preset as shipped: 4 layers, d = 128, 1024 rows (512 of them codes)
    # ~100M: a 12-layer d = 768 Llama over an 8192-row vocabulary, 4096 rows exposed as codes
    "100m": [
        "llm.vocab_size=8192",
        "llm.hidden_size=768",
        "llm.num_layers=12",
        "llm.num_heads=12",
        "llm.intermediate_size=2048",
        "model.codebook.row_offset=4096",
        "model.codebook.num_rows=4096",
    ],
}


def build_model(
    preset: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    image_positions: bool = False,
    layout: str = "flat",
) -> UniCodeLM:
    cfg = load_config("tiny", PRESETS[preset])
    llm = load_llm(cfg.llm, seed=0)
    visual_tok = build_tokenizer(cfg, llm, seed=0)
    words = [
        f"a {c} {s} on the left of a {c2} {s2}" for c in COLOURS for s in SHAPES for c2 in COLOURS for s2 in SHAPES
    ]
    text_tok = train_word_tokenizer(words, max_vocab=cfg.llm.vocab_size // 2)
    ensure_markers(text_tok, llm)
    model = UniCodeLM(llm, visual_tok, text_tok, image_positions=image_positions, layout=layout).eval()
    model.to(device=device, dtype=dtype)
    model.tokenizer.to(device)
    return model


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
