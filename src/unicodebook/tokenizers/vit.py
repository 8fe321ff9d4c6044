"""The stage-0 image encoder shared by the SEED and LaVIT families: a plain pre-norm ViT.

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.norm1`` / ``attn.qkv`` / ``attn.proj`` / ``norm2`` /
``mlp.fc1`` / ``mlp.fc2``, ``norm``, ``head``), so a timm state dict loads unchanged. Our own
folder format is timm's Hugging Face hub format (``config.json`` + ``model.safetensors``); a
Hugging Face ``transformers`` ViT folder loads too, its keys mapped onto ours. Nothing downloads.

Dimensions: B images, N patches, W width, e the embedding size of the projection head.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import UnicodebookError
from ..utils.io import atomic_save_tensors, atomic_write_json

LN_EPS = 1e-6  # timm's LayerNorm epsilon
CONFIG, WEIGHTS = "config.json", "model.safetensors"


@dataclass
class ViTConfig:
    image_size: int = 36
    patch_size: int = 6
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0  # the MLP's hidden size is int(width · mlp_ratio), as in timm
    embed_dim: int = 128  # the CLIP-style projection head's output (0: no head)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # input normalisation, per channel
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    class_token: bool = True

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ViT {name} must be at least 1, got {getattr(self, name)}")
        if self.embed_dim < 0 or self.mlp_ratio <= 0:
            raise ValueError(f"ViT embed_dim must be ≥ 0 and mlp_ratio > 0, got {self.embed_dim}, {self.mlp_ratio}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch size {self.patch_size} does not divide image size {self.image_size}")
        if self.width % self.heads:
            raise ValueError(f"{self.heads} heads do not divide width {self.width}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each (std > 0), got {self.mean} and {self.std}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) → (B, N, W) in raster order."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """(B, n, W) → (B, n, W); full (non-causal) self-attention."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-norm ViT block (also SEED's de-tokenizer blocks): (B, n, W) → (B, n, W)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """images (B, 3, H, W) float in [0, 1] → tokens (normalised with ``mean``/``std`` inside);
    see :class:`ViTConfig`."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = _PatchEmbed(cfg.patch_size, cfg.width)
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + int(cfg.class_token), cfg.width) * 0.02)
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
        """The size of :meth:`embedding`: the head's output, or the width without a head."""
        return self.config.embed_dim or self.config.width

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def _check_images(self, images: Tensor) -> None:
        s = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (s, s):
            raise ValueError(f"expected images (B, 3, {s}, {s}), got {tuple(images.shape)}")

    def forward_tokens(self, images: Tensor, normed: bool = True) -> Tensor:
        """images (B, 3, H, W) in [0, 1] → (B, [1 +] N, W): every token after the last block, the
        class token first; ``normed``: through the final norm too (LaVIT reads them before it)."""
        self._check_images(images)
        x = self.patch_embed((images.to(self.pos_embed) - self.mean) / self.std)
        if self.config.class_token:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if normed else x

    def patch_features(self, images: Tensor, normed: bool = True) -> Tensor:
        """(B, N, W): the patch tokens, the class token dropped."""
        return self.forward_tokens(images, normed)[:, int(self.config.class_token) :]

    def embedding(self, images: Tensor) -> Tensor:
        """(B, e): the class token (or the patches' mean without one) after the final norm, through
        ``head`` when there is one; not L2-normalised."""
        x = self.forward_tokens(images)
        pooled = x[:, 0] if self.config.class_token else x.mean(1)
        return self.head(pooled) if self.config.embed_dim else pooled


# ------------------------------------------------------------------------------------ folders
def save_vit(model: VisionTransformer, folder: str | Path) -> None:
    """``folder`` in timm's hub format: ``model.safetensors``, then ``config.json`` (the old one
    goes first and the new one comes last, so a torn save leaves a folder without a config)."""
    c, folder = model.config, Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).unlink(missing_ok=True)
    atomic_save_tensors(model.state_dict(), folder / WEIGHTS, metadata={"format": "pt"})
    pool = "token" if c.class_token else "avg"
    atomic_write_json(
        folder / CONFIG,
        {
            "architecture": "vit_custom",
            "num_classes": 0,
            "num_features": c.width,
            "global_pool": pool,
            "model_args": {
                "img_size": c.image_size,
                "patch_size": c.patch_size,
                "embed_dim": c.width,
                "depth": c.layers,
                "num_heads": c.heads,
                "mlp_ratio": c.mlp_ratio,
                "class_token": c.class_token,
                "global_pool": pool,
                "fc_norm": False,
            },
            "pretrained_cfg": {
                "custom_load": False,
                "input_size": [3, c.image_size, c.image_size],
                "fixed_input_size": True,
                "interpolation": "bicubic",
                "crop_pct": 1.0,
                "crop_mode": "center",
                "mean": c.mean,
                "std": c.std,
                "num_classes": 0,
                "first_conv": "patch_embed.proj",
                "classifier": "head",
            },
            "unicodebook": {"embed_dim": c.embed_dim, "mean": c.mean, "std": c.std},
        },
    )


# timm's plain ViTs by size: (width, depth, heads, mlp_ratio); a name is vit_{size}_patch{p}_{image size}
TIMM_SIZES = {
    "tiny": (192, 12, 3, 4.0),
    "small": (384, 12, 6, 4.0),
    "base": (768, 12, 12, 4.0),
    "large": (1024, 24, 16, 4.0),
    "huge": (1280, 32, 16, 4.0),
    "giant": (1408, 40, 16, 48 / 11),
}
_TIMM_NAME = re.compile(r"vit_(tiny|small|base|large|huge|giant)_patch(\d+)_(\d+)")


def _square(value, what: str) -> int:
    """An int, or a square [h, w] (timm and transformers allow both) → the side."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{what} {list(value)} is not square")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} {value!r} is not an integer")
    return value


def _triple(value, what: str) -> list[float]:
    """A per-channel mean/std (one number or three) → three floats."""
    value = [value] * 3 if isinstance(value, (int, float)) else value
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"{what} {value!r} is not 3 numbers")
    return [float(v) for v in value]


def _timm_config(meta: dict) -> tuple[ViTConfig, bool]:
    """timm's ``config.json`` (or its legacy single-dict form) → (config, whether ``head`` is a
    classifier to drop)."""
    pre = meta.get("pretrained_cfg", meta)
    args, ours = meta.get("model_args") or {}, meta.get("unicodebook") or {}
    if not isinstance(pre, dict) or not isinstance(args, dict) or not isinstance(ours, dict):
        raise ValueError("pretrained_cfg, model_args and unicodebook must be objects")
    sizes = {}
    named = _TIMM_NAME.fullmatch(str(meta["architecture"]).split(".")[0])
    if named:
        w, d, h, r = TIMM_SIZES[named[1]]
        sizes = {
            "embed_dim": w,
            "depth": d,
            "num_heads": h,
            "mlp_ratio": r,
            "patch_size": int(named[2]),
            "img_size": int(named[3]),
        }
    sizes |= {k: v for k, v in args.items() if k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size")}
    missing = [k for k in ("embed_dim", "depth", "num_heads", "patch_size") if k not in sizes]
    if missing:
        raise ValueError(
            f"architecture '{meta['architecture']}' is not a plain timm ViT name (vit_{{size}}_patch"
            f"{{p}}_{{px}}) and model_args lack {', '.join(missing)}"
        )
    if "img_size" in args:
        size = args["img_size"]
    elif "input_size" in pre:
        size = pre["input_size"][1:]
    else:
        size = sizes.get("img_size", 224)
    class_token = args.get("class_token", True)
    pool = args.get("global_pool", meta.get("global_pool"))
    if pool not in (None, "token" if class_token else "avg"):
        raise ValueError(f"global pool '{pool}' {'with' if class_token else 'without'} a class token is not ours")
    if args.get("act_layer") not in (None, "gelu"):  # other structural model_args show in the weights' keys
        raise ValueError(f"act_layer '{args['act_layer']}' is not our exact GELU")
    embed_dim = ours.get("embed_dim", 0)
    cfg = ViTConfig(
        image_size=_square(size, "image size"),
        patch_size=_square(sizes["patch_size"], "patch size"),
        width=int(sizes["embed_dim"]),
        layers=int(sizes["depth"]),
        heads=int(sizes["num_heads"]),
        mlp_ratio=float(sizes.get("mlp_ratio", 4.0)),
        embed_dim=int(embed_dim),
        mean=_triple(ours.get("mean", pre.get("mean", 0.5)), "mean"),
        std=_triple(ours.get("std", pre.get("std", 0.5)), "std"),
        class_token=bool(class_token),
    )
    return cfg, int(meta.get("num_classes", pre.get("num_classes", 0)) or 0) > 0 and not embed_dim


def _hf_config(meta: dict, folder: Path) -> ViTConfig:
    """A transformers ``ViTConfig`` (+ ``preprocessor_config.json``, if any) → ours."""
    bad = [
        f"{k} {meta[k]!r}"
        for k, ok in (("hidden_act", "gelu"), ("num_channels", 3), ("qkv_bias", True))
        if k in meta and meta[k] != ok
    ]
    if bad:
        raise ValueError(f"{', '.join(bad)}: only an RGB ViT with exact GELU and query/key/value biases maps onto ours")
    mean, std = [0.5] * 3, [0.5] * 3
    path = folder / "preprocessor_config.json"
    if path.exists():
        try:
            proc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            raise UnicodebookError(f"{path} is unreadable") from None
        if not proc.get("do_normalize", True):
            mean, std = [0.0] * 3, [1.0] * 3
        mean = _triple(proc.get("image_mean", mean), "image_mean")
        std = _triple(proc.get("image_std", std), "image_std")
    w, hidden = int(meta["hidden_size"]), int(meta["intermediate_size"])
    ratio = hidden / w
    if int(w * ratio) != hidden:  # one ulp up, so that int(width · ratio) gives the hidden size back
        ratio = math.nextafter(ratio, math.inf)
    return ViTConfig(
        image_size=_square(meta["image_size"], "image_size"),
        patch_size=_square(meta["patch_size"], "patch_size"),
        width=w,
        layers=int(meta["num_hidden_layers"]),
        heads=int(meta["num_attention_heads"]),
        mlp_ratio=ratio,
        embed_dim=0,
        mean=mean,
        std=std,
    )


# ours ← transformers' names: as ``save_pretrained`` writes them, and as transformers ≥ 5 holds them in memory
_HF_NAMES = {  # (layer prefix, block modules, attention module, its query/key/value names)
    "saved": (
        "encoder.layer.{}.",
        {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "attn.proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
        },
        "attention.attention.{}",
        ("query", "key", "value"),
    ),
    "memory": (
        "layers.{}.",
        {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "attn.proj": "attention.o_proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        },
        "attention.{}",
        ("q_proj", "k_proj", "v_proj"),
    ),
}


def _from_hf(state: dict[str, Tensor], layers: int, folder: Path) -> dict[str, Tensor]:
    """transformers ``ViTModel`` keys (maybe under ``vit.``; pooler and classifier dropped) → ours,
    query, key and value stacked into ``qkv``. Keys left over stay, for the caller to refuse."""
    state = {k.removeprefix("vit."): v for k, v in state.items() if not k.startswith(("pooler.", "classifier."))}

    def take(key: str) -> Tensor:
        if key not in state:
            raise UnicodebookError(f"{folder}: the weights lack {key} (of a transformers ViT)")
        return state.pop(key)

    layer, names, qkv, parts = _HF_NAMES["memory" if any(k.startswith("layers.") for k in state) else "saved"]
    out = {
        "cls_token": take("embeddings.cls_token"),
        "pos_embed": take("embeddings.position_embeddings"),
        "norm.weight": take("layernorm.weight"),
        "norm.bias": take("layernorm.bias"),
    }
    for p in ("weight", "bias"):
        out[f"patch_embed.proj.{p}"] = take(f"embeddings.patch_embeddings.projection.{p}")
        for i in range(layers):
            pre = layer.format(i)
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([take(f"{pre}{qkv.format(n)}.{p}") for n in parts])
            out |= {f"blocks.{i}.{ours}.{p}": take(f"{pre}{theirs}.{p}") for ours, theirs in names.items()}
    return out | state


def _shape_error(folder: Path, key: str, got: tuple, want: tuple, cfg: ViTConfig) -> UnicodebookError:
    msg = f"{folder}: {key} has shape {got}, the config wants {want}"
    if key == "pos_embed" and len(got) == 3 and got[2] == want[2]:
        n = got[1] - int(cfg.class_token)
        side = math.isqrt(max(n, 0))
        made = f"{side * cfg.patch_size} px images" if side * side == n else f"{n} patches"
        msg += (
            f" (weights made for {made}, the config's are {cfg.image_size} px at patch {cfg.patch_size}; "
            f"position embeddings are not interpolated)"
        )
    return UnicodebookError(msg)


def load_local_vit(folder: str | Path) -> VisionTransformer:
    """A ViT (in eval mode, on the CPU) from a local folder: ours / timm's hub format
    (``config.json`` with ``architecture``; a timm classifier's head is dropped), or a
    ``transformers`` ViT (``model_type`` vit; its ``layer_norm_eps`` is taken as timm's 1e-6).
    Weights from ``model.safetensors``. Any problem is one :class:`UnicodebookError` line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnicodebookError(f"ViT folder '{folder}' {'is not a folder' if folder.exists() else 'does not exist'}")
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise UnicodebookError(f"{folder}: not a ViT folder (no {CONFIG})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise UnicodebookError(f"{folder}/{CONFIG} is unreadable") from None
    hf = isinstance(meta, dict) and meta.get("model_type") == "vit"
    if not isinstance(meta, dict) or not (hf or "architecture" in meta):
        kind = meta.get("model_type") if isinstance(meta, dict) else None
        why = "no model_type" if kind is None else f"model_type '{kind}', not 'vit'"
        raise UnicodebookError(
            f"{folder}: {CONFIG} is neither timm's (no architecture) nor a transformers ViT's ({why})"
        )
    try:
        cfg, drop_head = (_hf_config(meta, folder), False) if hf else _timm_config(meta)
    except KeyError as e:
        raise UnicodebookError(f"{folder}/{CONFIG} does not describe a ViT (no {e.args[0]})") from None
    except (TypeError, ValueError, IndexError) as e:
        raise UnicodebookError(f"{folder}/{CONFIG} does not describe a ViT ({str(e).splitlines()[0]})") from None
    path = folder / WEIGHTS
    if not path.exists():
        pickle = (folder / "pytorch_model.bin").exists()
        raise UnicodebookError(
            f"{folder}: no {WEIGHTS}" + (" (pytorch_model.bin is not read: save it as safetensors)" if pickle else "")
        )
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UnicodebookError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    if hf:
        state = _from_hf(state, cfg.layers, folder)
    elif drop_head:
        state = {k: v for k, v in state.items() if k not in ("head.weight", "head.bias")}
    model = VisionTransformer(cfg)
    for k, want in model.state_dict().items():
        if k not in state:
            raise UnicodebookError(f"{folder}: the weights lack {k}")
        if tuple(state[k].shape) != tuple(want.shape):
            raise _shape_error(folder, k, tuple(state[k].shape), tuple(want.shape), cfg)
    extra = sorted(set(state) - set(model.state_dict()))
    if extra:
        raise UnicodebookError(f"{folder}: unexpected weight {extra[0]} (not part of this ViT)")
    model.load_state_dict(state)
    return model.eval()
