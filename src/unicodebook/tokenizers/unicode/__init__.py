"""The UniCode visual tokenizer: conv VQ-VAE whose codebook is the LLM's embedding table."""

from .build import build_tokenizer, codebook_rows, load, load_frozen, load_tokenizer, save_tokenizer
from .model import TokenizerOutput, UniCodeTokenizer

__all__ = [
    "UniCodeTokenizer",
    "TokenizerOutput",
    "build_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
    "codebook_rows",
    "load",
    "load_frozen",
]
