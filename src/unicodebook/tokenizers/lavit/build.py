"""Build, save and load a LaVIT tokenizer folder.

The folder is laid out as SEED's (``tokenizers/seed/build.py``, whose functions these call):
``config.yaml`` (the run config; its ``model`` section the ``lavit`` family's),
``model.safetensors`` (every weight, the frozen ViT's included), ``pixel_unet/config.json`` with
``model.pixel_decoder: diffusion``, and the family tag ``visual_tokenizer.json`` (written last).
A stage I run folder is one; so is the copy a stage II model folder keeps in ``visual_tokenizer/``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...config import Config, LavitModelConfig
from ..seed.build import build_on_vit, load_on_vit, save_on_vit
from .model import LavitTokenizer


def build_tokenizer(cfg: Config, seed: int = 0) -> LavitTokenizer:
    """A fresh LaVIT tokenizer; its ViT loaded from ``model.vit_path`` (its sizes written into the
    returned config's ``model.vit``) or new (trained in phase vit); the diffusion decoder's UNet
    from ``model.diffusion.unet_path`` or new."""
    return build_on_vit(LavitTokenizer, cfg, seed)


def save_tokenizer(visual_tok: LavitTokenizer, folder: str | Path) -> None:
    save_on_vit(visual_tok, folder)


def load(folder: Path, device: str | torch.device = "cpu") -> LavitTokenizer:
    """A LaVIT tokenizer folder → the tokenizer on ``device``, in eval mode."""
    return load_on_vit(LavitTokenizer, LavitModelConfig, "LaVIT", folder, device)


load_frozen = load
