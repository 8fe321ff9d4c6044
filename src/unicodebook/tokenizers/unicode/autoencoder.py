"""VQGAN-style convolutional encoder and decoder (ResNet blocks, optional attention).

Dimensions: B batch, C image channels (3), H×W image, h×w latent (H / 2**(L-1) for
L = len(ch_mult)), z latent channels.

``padding`` is the 3×3 convolutions' border rule. ``zeros`` (VQGAN's) makes every feature depend on
its distance to the border, so the same object gets other codes in another place. ``circular``
makes the encoder and decoder commute with any shift by a multiple of the down-sampling factor
(GroupNorm and attention do not see position): an object alone on a plain background, moved from
one grid cell to another, gets exactly the same codes. ``replicate`` avoids the wrap-around but
not the border: near it the padding copies the object's own features (a lone object still gets a
different block in each of the shapes world's 9 cells, measured).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _conv3(cin: int, cout: int, padding: str, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, padding_mode=padding)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, ch // 4) or 1, num_channels=ch, eps=1e-6)


def run_blocks(blocks: nn.Sequential, x: Tensor, checkpointing: bool) -> Tensor:
    """Apply ``blocks`` in order; with ``checkpointing`` (in training) each block's activations
    are recomputed in backward instead of kept."""
    for block in blocks:
        if checkpointing and x.requires_grad:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0, padding: str = "zeros"):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), _conv3(cin, cout, padding)
        self.norm2, self.conv2 = _norm(cout), _conv3(cout, cout, padding)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, hw, c)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] → (B, z, h, w)."""

    def __init__(
        self,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        z_channels: int,
        resolution: int,
        attn_resolutions: list[int] = (),
        dropout: float = 0.0,
        in_channels: int = 3,
        padding: str = "zeros",
    ):
        super().__init__()
        self.conv_in = _conv3(in_channels, ch, padding)
        blocks: list[nn.Module] = []
        cin, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            cout = ch * mult
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, cout, dropout, padding))
                cin = cout
                if res in attn_resolutions:
                    blocks.append(AttnBlock(cin))
            if i < len(ch_mult) - 1:
                blocks.append(_conv3(cin, cin, padding, stride=2))
                res //= 2
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(
            ResBlock(cin, cin, dropout, padding),
            AttnBlock(cin) if res in attn_resolutions else nn.Identity(),
            ResBlock(cin, cin, dropout, padding),
        )
        self.norm_out = _norm(cin)
        self.conv_out = _conv3(cin, z_channels, padding)

    gradient_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        ckpt = self.gradient_checkpointing and self.training
        h = run_blocks(self.mid, run_blocks(self.down, self.conv_in(x), ckpt), ckpt)
        return self.conv_out(F.silu(self.norm_out(h)))


class Upsample(nn.Module):
    def __init__(self, ch: int, padding: str = "zeros"):
        super().__init__()
        self.conv = _conv3(ch, ch, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """(B, z, h, w) → (B, 3, H, W) in roughly [-1, 1]."""

    def __init__(
        self,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        z_channels: int,
        resolution: int,
        attn_resolutions: list[int] = (),
        dropout: float = 0.0,
        out_channels: int = 3,
        padding: str = "zeros",
    ):
        super().__init__()
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = _conv3(z_channels, cin, padding)
        self.mid = nn.Sequential(
            ResBlock(cin, cin, dropout, padding),
            AttnBlock(cin) if res in attn_resolutions else nn.Identity(),
            ResBlock(cin, cin, dropout, padding),
        )
        blocks: list[nn.Module] = []
        for i, mult in reversed(list(enumerate(ch_mult))):
            cout = ch * mult
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(cin, cout, dropout, padding))
                cin = cout
                if res in attn_resolutions:
                    blocks.append(AttnBlock(cin))
            if i > 0:
                blocks.append(Upsample(cin, padding))
                res *= 2
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(cin)
        self.conv_out = _conv3(cin, out_channels, padding)

    @property
    def last_layer(self) -> Tensor:
        return self.conv_out.weight

    gradient_checkpointing = False

    def forward(self, z: Tensor) -> Tensor:
        ckpt = self.gradient_checkpointing and self.training
        h = run_blocks(self.up, run_blocks(self.mid, self.conv_in(z), ckpt), ckpt)
        return self.conv_out(F.silu(self.norm_out(h)))
