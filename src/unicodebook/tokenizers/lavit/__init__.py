"""The LaVIT dynamic visual tokenizer: frozen ViT patches, a learnt selection of them merged with
the rest, quantised to a variable number of codes per image."""

from .build import build_tokenizer, load, load_frozen, save_tokenizer
from .model import LavitTokenizer

__all__ = ["LavitTokenizer", "build_tokenizer", "save_tokenizer", "load", "load_frozen"]
