"""unicodebook: UniCode — one codebook, the LLM's own embedding table, for text and images.

Python API (mirrors the CLI)::

    from unicodebook import load_tokenizer
    visual_tok = load_tokenizer("runs/tok")   # a stage-I run folder, of any tokenizer family
    codes = visual_tok.encode(images)         # (B, 3, H, W) in [0, 1] → (B, gh, gw, G)
    recon = visual_tok.decode(codes)          # → (B, 3, H, W)
    z_hat = visual_tok.embed(codes)           # → (B, h·w, d), what the LLM reads
"""

from .config import Config, load_config
from .errors import UnicodebookError
from .tokenizers.base import load_tokenizer
from .tokenizers.unicode import build_tokenizer, save_tokenizer

__version__ = "0.1.0"

__all__ = ["Config", "load_config", "UnicodebookError", "build_tokenizer", "load_tokenizer", "save_tokenizer"]
