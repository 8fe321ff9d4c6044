"""The SEED visual tokenizer: a causal Q-Former over frozen ViT features, quantised to N codes."""

from .build import build_tokenizer, load, load_frozen, save_tokenizer
from .model import SeedTokenizer

__all__ = ["SeedTokenizer", "build_tokenizer", "save_tokenizer", "load", "load_frozen"]
