"""Build, save and load a SEED tokenizer folder.

A SEED tokenizer folder holds ``config.yaml`` (the run config; its ``model`` section is the
``seed`` family's), ``model.safetensors`` (every weight, the frozen ViT's included) and the
family tag ``visual_tokenizer.json`` (written last); with ``model.pixel_decoder: diffusion`` also
``pixel_unet/config.json``, the UNet's ``diffusers`` config (its weights are in ``model.safetensors``),
so that loading needs neither the network nor ``model.diffusion.unet_path``. A stage I run folder is
one; so is the copy a stage II model folder keeps in ``visual_tokenizer/``.

The other family on a frozen ViT (LaVIT, ``tokenizers/lavit/``) keeps its folders the same way:
:func:`build_on_vit`, :func:`save_on_vit` and :func:`load_on_vit` take the tokenizer class.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...config import Config, SeedModelConfig, VitConfig, config_from_dict, read_yaml, save_config
from ...errors import UnicodebookError
from ...utils.io import atomic_save_tensors, atomic_write_text, first_state_mismatch
from ..base import write_family
from ..vit import VisionTransformer, ViTConfig, load_local_vit
from .model import SeedTokenizer

UNET_CONFIG = Path("pixel_unet") / "config.json"


def vit_config(cfg) -> ViTConfig:
    """The ViT of a model section with ``image_size`` and ``vit`` (SEED's, LaVIT's)."""
    v = cfg.vit
    return ViTConfig(
        image_size=cfg.image_size,
        patch_size=v.patch_size,
        width=v.width,
        layers=v.layers,
        heads=v.heads,
        mlp_ratio=v.mlp_ratio,
        embed_dim=v.embed_dim,
        class_token=v.class_token,
        mean=list(v.mean),
        std=list(v.std),
    )


def _vit_section(vc: ViTConfig) -> VitConfig:
    return VitConfig(
        patch_size=vc.patch_size,
        width=vc.width,
        layers=vc.layers,
        heads=vc.heads,
        mlp_ratio=vc.mlp_ratio,
        embed_dim=vc.embed_dim,
        class_token=vc.class_token,
        mean=list(vc.mean),
        std=list(vc.std),
    )


def build_tokenizer(cfg: Config, seed: int = 0) -> SeedTokenizer:
    """A fresh SEED tokenizer; its ViT loaded from ``model.vit_path`` (its sizes written into the
    returned config's ``model.vit``, so the folder describes itself) or new (trained in phase vit);
    the diffusion decoder's UNet from ``model.diffusion.unet_path`` (its own sizes) or new."""
    return build_on_vit(SeedTokenizer, cfg, seed)


def build_on_vit(cls, cfg: Config, seed: int = 0):
    """A fresh tokenizer of class ``cls`` (built as ``cls(cfg.model, vit, unet)``), as
    :func:`build_tokenizer` describes."""
    mc = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if mc.vit_path:
            vit = load_local_vit(mc.vit_path)
            if vit.config.image_size != mc.image_size:
                raise UnicodebookError(
                    f"model.vit_path: {mc.vit_path} takes {vit.config.image_size} px images, the model {mc.image_size}"
                )
            mc = dataclasses.replace(mc, vit=_vit_section(vit.config))
            cfg = dataclasses.replace(cfg, model=mc)
        else:
            vit = VisionTransformer(vit_config(mc))
        visual_tok = cls(mc, vit, _local_unet(mc))
    visual_tok.__dict__["config"] = cfg
    return visual_tok


def _local_unet(mc):
    if mc.pixel_decoder != "diffusion" or not mc.diffusion.unet_path:
        return None
    from .diffusion import local_unet

    return local_unet(mc.diffusion.unet_path, mc.image_size)


def save_tokenizer(visual_tok: SeedTokenizer, folder: str | Path) -> None:
    save_on_vit(visual_tok, folder)


def save_on_vit(visual_tok, folder: str | Path) -> None:
    """config.yaml, the UNet's config (diffusion), model.safetensors, then the family tag."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(visual_tok.config, folder / "config.yaml")
    if visual_tok.pixel_kind == "diffusion":
        atomic_write_text(folder / UNET_CONFIG, visual_tok.pixel_decoder.unet.to_json_string())
    atomic_save_tensors(
        visual_tok.state_dict(), folder / "model.safetensors", metadata={"format": f"unicodebook-{visual_tok.family}"}
    )
    write_family(folder, visual_tok.family)


def load(folder: Path, device: str | torch.device = "cpu") -> SeedTokenizer:
    """A SEED tokenizer folder → the tokenizer on ``device``, in eval mode."""
    return load_on_vit(SeedTokenizer, SeedModelConfig, "SEED", folder, device)


def load_on_vit(cls, config_cls: type, title: str, folder: Path, device: str | torch.device = "cpu"):
    """A tokenizer folder of class ``cls`` (its ``model`` section a ``config_cls``; ``title`` names
    the family in errors) → the tokenizer on ``device``, in eval mode."""
    folder = Path(folder)
    for name in ("config.yaml", "model.safetensors"):
        if not (folder / name).exists():
            raise UnicodebookError(f"{folder}: not a {title} tokenizer folder (missing {name})")
    cfg = config_from_dict(read_yaml(folder / "config.yaml"))
    if not isinstance(cfg.model, config_cls):
        raise UnicodebookError(
            f"{folder}: tagged {cls.family}, but its config.yaml describes a {cfg.model.family} model"
        )
    try:
        state = load_file(folder / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise UnicodebookError(f"{folder}/model.safetensors is corrupt or truncated ({e})") from None
    # the ViT's weights (and the UNet's) are in the folder
    visual_tok = cls(cfg.model, VisionTransformer(vit_config(cfg.model)), _saved_unet(folder, cfg.model, title))
    bad = first_state_mismatch(visual_tok, state)
    if bad:
        raise UnicodebookError(f"{folder}/model.safetensors does not match its config (first bad key: {bad})")
    visual_tok.load_state_dict(state)
    visual_tok.__dict__["config"] = cfg
    return visual_tok.to(device).eval()


def _saved_unet(folder: Path, mc, title: str):
    if mc.pixel_decoder != "diffusion":
        return None
    if not (folder / UNET_CONFIG).is_file():
        raise UnicodebookError(
            f"{folder}: not a {title} tokenizer folder (missing {UNET_CONFIG}, its diffusion decoder)"
        )
    from .diffusion import unet_from_config

    return unet_from_config(folder / UNET_CONFIG.parent)


load_frozen = load
