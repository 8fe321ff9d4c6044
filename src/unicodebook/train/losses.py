"""Optional perceptual (LPIPS) and adversarial (PatchGAN, hinge) terms of a VQGAN-style tokenizer.

Images are float tensors ``(B, 3, H, W)`` in ``[0, 1]``. Nothing here downloads
weights: :meth:`LPIPS.from_pretrained` reads local files only.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..utils.io import first_state_mismatch

__all__ = [
    "VGG16Features",
    "LPIPS",
    "PatchDiscriminator",
    "min_disc_input_size",
    "disc_layers_for_size",
    "hinge_d_loss",
    "hinge_g_loss",
    "adaptive_gan_weight",
]

# --------------------------------------------------------------------------- VGG16 trunk

# torchvision vgg16 "D" config; "M" = 2x2 max-pool.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# indices into `features` of the ReLUs tapped by LPIPS: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_VGG16_TAPS = (3, 8, 15, 22, 29)
_VGG16_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """Hand-written VGG16 conv trunk with torchvision's layer indices.

    ``self.features`` is an ``nn.Sequential`` laid out exactly like
    ``torchvision.models.vgg16().features[:30]`` (the final max-pool is not
    needed), so a state dict with keys ``features.0.weight`` ...
    ``features.28.bias`` loads into this module. Randomly initialised
    (torchvision's Kaiming init) until weights are loaded.
    """

    taps = _VGG16_TAPS
    channels = _VGG16_CHANNELS

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Args: x ``(B, 3, H, W)`` (already normalised).

        Returns:
            5 feature maps: ``(B, 64, H, W)``, ``(B, 128, H/2, W/2)``,
            ``(B, 256, H/4, W/4)``, ``(B, 512, H/8, W/8)``, ``(B, 512, H/16, W/16)``.
        """
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


# --------------------------------------------------------------------------- LPIPS


class _NetLin(nn.Module):
    """1x1 conv without bias; ``model.1.weight`` as in the lpips package (index 0 was Dropout)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(c_in, 1, kernel_size=1, bias=False))
        nn.init.constant_(self.model[1].weight, 1.0 / c_in)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _unit_normalize(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Normalise ``(B, C, H, W)`` to unit L2 norm along channels (lpips ``normalize_tensor``)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS perceptual distance (Zhang et al. 2018), 'vgg' variant, frozen.

    Inputs in ``[0, 1]`` are mapped to ``[-1, 1]`` and through the LPIPS scaling
    layer; each VGG tap is unit-normalised over channels, the squared difference
    is weighted by a 1x1 linear layer ``lin{i}``, averaged over space and summed
    over the 5 taps. All parameters have ``requires_grad=False`` and the module
    always stays in eval mode; gradients still flow to the inputs.

    Built with random VGG weights and ``lin`` weights ``1/C`` (channel mean)
    unless loaded via :meth:`from_pretrained`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.net = VGG16Features()
        for i, c in enumerate(VGG16Features.channels):
            self.add_module(f"lin{i}", _NetLin(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """Always eval: LPIPS is a fixed metric."""
        return super().train(False)

    @property
    def lins(self) -> list[_NetLin]:
        return [getattr(self, f"lin{i}") for i in range(len(VGG16Features.channels))]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Args: x, y ``(B, 3, H, W)`` in ``[0, 1]``. Returns ``(B,)`` distances (0 for x == y)."""
        if x.shape != y.shape:
            raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
        fx = self.net(((2 * x - 1) - self.shift) / self.scale)
        fy = self.net(((2 * y - 1) - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for a, b, lin in zip(fx, fy, self.lins):
            diff = (_unit_normalize(a) - _unit_normalize(b)).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total

    @classmethod
    def from_pretrained(cls, vgg_path: str | os.PathLike, lin_path: str | os.PathLike) -> "LPIPS":
        """Build LPIPS from local weight files.

        Args:
            vgg_path: torchvision-style VGG16 weights (keys ``features.N.weight/bias``;
                ``classifier.*`` keys of a full vgg16 checkpoint are ignored).
            lin_path: official lpips linear weights (keys ``lin{i}.model.1.weight``).

        Each file may be ``.safetensors`` or a PyTorch file (loaded with
        ``weights_only=True``); a leading ``net.``/``module.`` key prefix is
        stripped. Raises ``ValueError`` naming the file and first offending key on
        a missing file, missing/unexpected keys or wrong shapes.
        """
        model = cls()
        vgg_sd = _load_state_dict(vgg_path)
        vgg_sd = {k: v for k, v in vgg_sd.items() if not k.startswith("classifier.")}
        _load_strict(model.net, vgg_sd, vgg_path)
        lin_targets = {f"lin{i}": lin for i, lin in enumerate(model.lins)}
        _load_strict(_ModuleDict(lin_targets), _load_state_dict(lin_path), lin_path)
        return model


class _ModuleDict(nn.Module):
    """Wraps named submodules so their state-dict keys carry the given names."""

    def __init__(self, mods: Mapping[str, nn.Module]) -> None:
        super().__init__()
        for name, m in mods.items():
            self.add_module(name, m)


_PREFIX = re.compile(r"^(?:module\.|net\.)+")


def _load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a flat ``{key: tensor}`` dict from a .safetensors or PyTorch file; strip prefixes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: weights file not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        msg = "refused by torch.load(weights_only=True): holds objects other than tensors"
        raise ValueError(f"{path}: cannot read weights ({msg})") from None
    except Exception as e:  # corrupt/truncated file, wrong format (SafetensorError, RuntimeError, ...)
        lines = str(e).strip().splitlines()
        msg = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise ValueError(f"{path}: cannot read weights ({msg})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out: dict[str, Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            raise ValueError(f"{path}: key '{k}' is not a tensor ({type(v).__name__})")
        out[_PREFIX.sub("", str(k))] = v
    return out


def _load_strict(module: nn.Module, sd: Mapping[str, Tensor], path) -> None:
    """Copy ``sd`` into ``module`` or raise a one-line ``ValueError`` naming the first bad key."""
    bad = first_state_mismatch(module, dict(sd))
    if bad is not None:
        raise ValueError(f"{os.fspath(path)}: key {bad}")
    with torch.no_grad():
        for k, v in module.state_dict().items():
            v.copy_(sd[k].to(v.dtype))


# --------------------------------------------------------------------------- PatchGAN discriminator


def min_disc_input_size(n_layers: int) -> int:
    """Smallest square input (pixels) giving a >= 1x1 output for :class:`PatchDiscriminator`.

    ``n_layers`` stride-2 convs then two 4x4 stride-1 convs (each -1 px): ``3 * 2**n_layers``.
    """
    return 3 * 2**n_layers


def disc_layers_for_size(image_size: int, max_layers: int = 3) -> int:
    """Largest ``n_layers <= max_layers`` keeping an 8x8 map after the strided convs.

    e.g. 256 -> 3 (30x30 patch logits), 64 -> 3 (6x6), 32 -> 2 (6x6), 16 -> 1 (6x6).
    """
    n = max_layers
    while n > 1 and image_size // 2**n < 8:
        n -= 1
    return n


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, c), c)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming-transformers ``NLayerDiscriminator``).

    4x4 conv stride 2 + LeakyReLU(0.2), then ``n_layers - 1`` blocks of
    4x4 stride-2 conv + norm + LeakyReLU with channels ``ndf * min(2**n, 8)``, one
    stride-1 block, and a 4x4 stride-1 conv to 1 channel. The output is
    ``(B, 1, S / 2**n_layers - 2, ...)`` logits for an ``S x S`` input; the input
    must be at least :func:`min_disc_input_size` ``(n_layers)`` pixels
    (24 for the default 3; for 32 px images ``n_layers=2`` gives 6x6 logits,
    see :func:`disc_layers_for_size`).

    Args:
        in_channels: image channels.
        ndf: base width.
        n_layers: number of stride-2 convs.
        norm: ``'group'`` (default; works with batch size 1) or ``'batch'``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "group") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        _norm(norm, 8)  # validate early
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``(B, C, H, W)``. Returns patch logits ``(B, 1, h', w')``."""
        need = min_disc_input_size(self.n_layers)
        if min(x.shape[-2:]) < need:
            raise ValueError(
                f"PatchDiscriminator(n_layers={self.n_layers}) needs inputs >= {need}px, "
                f"got {tuple(x.shape[-2:])}; lower n_layers (see disc_layers_for_size)"
            )
        return self.main(x)


# --------------------------------------------------------------------------- GAN losses


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss ``0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))])``; scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator hinge loss ``-E[D(fake)]``; scalar."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    nll_loss: Tensor,
    g_loss: Tensor,
    last_layer_weight: Tensor,
    max: float = 1e4,  # noqa: A002 - name from taming-transformers' API
    eps: float = 1e-4,
) -> Tensor:
    """VQGAN adaptive weight ``||grad nll|| / (||grad g|| + eps)``, clamped to ``[0, max]``, detached.

    Gradients are taken w.r.t. ``last_layer_weight`` (the decoder's final conv
    weight); both losses must depend on it through a live graph (the graph is
    retained). Multiply by the discriminator weight yourself.

    Returns:
        scalar tensor (no grad).
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max).detach()
