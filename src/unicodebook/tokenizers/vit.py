"""The stage-0 image encoder shared by the SEED and LaVIT families: a plain pre-norm ViT.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.{i}.norm1`` / ``attn.qkv`` / ``attn.proj`` / ``norm2`` / ``mlp.fc1`` /
``mlp.fc2``, ``norm``, ``head``), so a timm checkpoint loads unchanged. Our own folder format is
timm's Hugging Face hub format (``config.json`` + ``model.safetensors``); a Hugging Face
``transformers`` ViT folder loads too (its keys mapped onto ours). Nothing downloads.

Dimensions: B images, N patches, W width, e the embedding size of the projection head.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import UnicodebookError

LN_EPS = 1e-6  # timm's


@dataclass
class ViTConfig:
    image_size: int = 36
    patch_size: int = 6
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    embed_dim: int = 128  # the projection head's output (0: none)
    class_token: bool = True
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch size {self.patch_size} does not divide image size {self.image_size}")
        if self.width % self.heads:
            raise ValueError(f"{self.heads} heads do not divide width {self.width}")


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-norm ViT block (also SEED's de-tokenizer blocks)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = _Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = _Mlp(width, round(width * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """images (B, 3, H, W) in [0, 1] → tokens; see :class:`ViTConfig`."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = _PatchEmbed(cfg.patch_size, cfg.width)
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, n + int(cfg.class_token), cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        if cfg.embed_dim:
            self.head = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.register_buffer("mean", torch.tensor(cfg.mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).reshape(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim or self.config.width

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def forward_tokens(self, images: Tensor, normed: bool = True) -> Tensor:
        """(B, [1 +] N, W): all tokens after the last block (``normed``: and the final norm)."""
        s = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (s, s):
            raise ValueError(f"expected images (B, 3, {s}, {s}), got {tuple(images.shape)}")
        x = (images.to(self.pos_embed.dtype) - self.mean) / self.std
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if self.config.class_token:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if normed else x

    def patch_features(self, images: Tensor, normed: bool = True) -> Tensor:
        """(B, N, W): the patch tokens, the class token dropped."""
        return self.forward_tokens(images, normed)[:, int(self.config.class_token):]

    def embedding(self, images: Tensor) -> Tensor:
        """(B, e): the class token (or the patches' mean) after the final norm, through ``head``."""
        x = self.forward_tokens(images)
        pooled = x[:, 0] if self.config.class_token else x.mean(1)
        return self.head(pooled) if self.config.embed_dim else pooled


# ------------------------------------------------------------------------------------ folders
def save_vit(model: VisionTransformer, folder: str | Path) -> None:
    """timm's hub format: ``model.safetensors``, then ``config.json`` (last)."""
    from ..utils.io import atomic_save_tensors, atomic_write_json

    c = model.config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    atomic_write_json(folder / "config.json", {
        "architecture": "vit_custom", "num_classes": 0, "num_features": c.width, "global_pool": "token" if c.class_token else "avg",
        "model_args": {"img_size": c.image_size, "patch_size": c.patch_size, "embed_dim": c.width, "depth": c.layers,
                       "num_heads": c.heads, "mlp_ratio": c.mlp_ratio, "class_token": c.class_token},
        "pretrained_cfg": {"input_size": [3, c.image_size, c.image_size], "mean": c.mean, "std": c.std},
        "unicodebook": asdict(c),
    })


TIMM_SIZES = {  # timm architecture name → (width, depth, heads, patch, image size)
    "vit_tiny_patch16_224": (192, 12, 3, 16, 224),
    "vit_small_patch16_224": (384, 12, 6, 16, 224),
    "vit_base_patch16_224": (768, 12, 12, 16, 224),
    "vit_base_patch32_224": (768, 12, 12, 32, 224),
    "vit_large_patch16_224": (1024, 24, 16, 16, 224),
}


def _timm_config(meta: dict, folder: Path) -> ViTConfig:
    if "unicodebook" in meta:
        return ViTConfig(**meta["unicodebook"])
    args, pre = meta.get("model_args") or {}, meta.get("pretrained_cfg") or {}
    if not args:
        if meta["architecture"] not in TIMM_SIZES:
            raise UnicodebookError(f"{folder}: timm architecture '{meta['architecture']}' without model_args is not "
                                   f"one of {', '.join(TIMM_SIZES)}")
        w, d, h, p, s = TIMM_SIZES[meta["architecture"]]
        args = {"embed_dim": w, "depth": d, "num_heads": h, "patch_size": p, "img_size": s}
    size = args.get("img_size", (pre.get("input_size") or [3, 224, 224])[-1])
    return ViTConfig(image_size=int(size if not isinstance(size, list) else size[-1]), patch_size=int(args["patch_size"]),
                     width=int(args["embed_dim"]), layers=int(args["depth"]), heads=int(args["num_heads"]),
                     mlp_ratio=float(args.get("mlp_ratio", 4.0)), embed_dim=0,
                     class_token=bool(args.get("class_token", True)),
                     mean=list(pre.get("mean", [0.5] * 3)), std=list(pre.get("std", [0.5] * 3)))


def _hf_config(meta: dict, folder: Path) -> ViTConfig:
    mean, std = [0.5] * 3, [0.5] * 3
    pre = folder / "preprocessor_config.json"
    if pre.exists():
        try:
            p = json.loads(pre.read_text())
            mean, std = list(p.get("image_mean", mean)), list(p.get("image_std", std))
        except (OSError, json.JSONDecodeError):
            raise UnicodebookError(f"{pre} is unreadable") from None
    w = int(meta["hidden_size"])
    return ViTConfig(image_size=int(meta["image_size"]), patch_size=int(meta["patch_size"]), width=w,
                     layers=int(meta["num_hidden_layers"]), heads=int(meta["num_attention_heads"]),
                     mlp_ratio=int(meta["intermediate_size"]) / w, embed_dim=0, mean=mean, std=std)


def _from_hf(state: dict[str, Tensor], layers: int) -> dict[str, Tensor]:
    """transformers ``ViTModel`` keys → ours (query, key and value stacked into ``qkv``)."""
    state = {k.removeprefix("vit."): v for k, v in state.items() if not k.startswith(("pooler.", "classifier."))}
    out = {"cls_token": state.pop("embeddings.cls_token"), "pos_embed": state.pop("embeddings.position_embeddings"),
           "patch_embed.proj.weight": state.pop("embeddings.patch_embeddings.projection.weight"),
           "patch_embed.proj.bias": state.pop("embeddings.patch_embeddings.projection.bias"),
           "norm.weight": state.pop("layernorm.weight"), "norm.bias": state.pop("layernorm.bias")}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state.pop(f"{p}attention.attention.{n}.{part}")
                                                           for n in ("query", "key", "value")])
            for ours, theirs in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                                 ("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                                 ("mlp.fc2", "output.dense")):
                out[f"blocks.{i}.{ours}.{part}"] = state.pop(f"{p}{theirs}.{part}")
    if state:
        raise KeyError(f"unexpected key {sorted(state)[0]}")
    return out


def load_local_vit(folder: str | Path) -> VisionTransformer:
    """A ViT from a local folder: ours / timm's hub format, or a ``transformers`` ViT. One error
    line for a missing or unreadable folder, an unknown format, or weights that do not fit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnicodebookError(f"ViT folder '{folder}' does not exist")
    try:
        meta = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise UnicodebookError(f"{folder}: not a ViT folder (no config.json)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise UnicodebookError(f"{folder}/config.json is unreadable") from None
    hf = isinstance(meta, dict) and meta.get("model_type") == "vit"
    if not isinstance(meta, dict) or not (hf or "architecture" in meta):
        raise UnicodebookError(f"{folder}: config.json is neither timm's (architecture) nor a transformers ViT's "
                               f"(model_type vit)")
    try:
        cfg = _hf_config(meta, folder) if hf else _timm_config(meta, folder)
    except (KeyError, TypeError, ValueError) as e:
        raise UnicodebookError(f"{folder}/config.json does not describe a ViT ({str(e).splitlines()[0]})") from None
    try:
        state = load_file(folder / "model.safetensors")
    except FileNotFoundError:
        raise UnicodebookError(f"{folder}: no model.safetensors") from None
    except (SafetensorError, OSError) as e:
        raise UnicodebookError(f"{folder}/model.safetensors is corrupt or truncated ({str(e).splitlines()[0]})") from None
    try:
        if hf:
            state = _from_hf(state, cfg.layers)
    except KeyError as e:
        raise UnicodebookError(f"{folder}: not the weights of a transformers ViT ({e.args[0]})") from None
    if not hf and "head.bias" in state and "unicodebook" not in meta:  # a timm classifier: no projection here
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    model = VisionTransformer(cfg)
    mine = model.state_dict()
    for k in mine:
        if k not in state:
            raise UnicodebookError(f"{folder}: the weights lack {k}")
        if tuple(state[k].shape) != tuple(mine[k].shape):
            raise UnicodebookError(f"{folder}: {k} has shape {tuple(state[k].shape)}, the config wants "
                                   f"{tuple(mine[k].shape)}")
    extra = sorted(set(state) - set(mine))
    if extra:
        raise UnicodebookError(f"{folder}: unexpected weight {extra[0]}")
    model.load_state_dict(state)
    return model.eval()
