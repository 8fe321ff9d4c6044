"""SEED's optional diffusion pixel decoder (``model.pixel_decoder: diffusion``): a ``diffusers`` UNet
in pixel space conditioned on the generation embedding, as the original conditions Stable unCLIP
on it (ours is small, 3 channels at the tokenizer's image size, no VAE).

The generation embedding (B, e) is projected to ``cond_tokens`` tokens of the UNet's
``cross_attention_dim`` that its cross-attention reads. Training (:meth:`DiffusionDecoder.loss`):
DDPM epsilon prediction, MSE, a cosine noise schedule of ``train_timesteps`` steps; with
probability ``cond_dropout`` an image's condition is replaced by a learned null embedding
(classifier-free guidance). Sampling (:meth:`DiffusionDecoder.sample`): DDIM (η = 0, trailing
timesteps), guided when ``guidance`` ≠ 1. Every draw comes from the ``torch.Generator`` given
(a CPU one; the tensors are moved to the model's device), so both are reproducible. Images enter
and leave in [0, 1] as the conv decoder's; the UNet works in [-1, 1].

``diffusers`` is imported only when a decoder is built (``pip install 'unicodebook[diffusion]'``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import DiffusionConfig
from ...errors import UnicodebookError


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise UnicodebookError(
            "model.pixel_decoder diffusion needs diffusers: pip install 'unicodebook[diffusion]'"
        ) from None
    return diffusers


def new_unet(dc: DiffusionConfig, image_size: int):
    """A fresh pixel-space UNet: one cross-attention block per entry of ``dc.channels`` (each but the
    last halving the image), cross-attention width the last block's."""
    n = len(dc.channels)
    return _diffusers().UNet2DConditionModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(dc.channels),
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        layers_per_block=dc.layers_per_block,
        norm_num_groups=math.gcd(32, *dc.channels),
        cross_attention_dim=dc.channels[-1],
        attention_head_dim=dc.heads,
    )  # (diffusers' name for the head count)


def local_unet(path: str | Path, image_size: int):
    """A user's ``UNet2DConditionModel`` folder (``save_pretrained``'s), read with no network; one
    error line when it cannot draw ``image_size`` px RGB images from cross-attention alone."""
    unet_cls = _diffusers().UNet2DConditionModel
    where = f"model.diffusion.unet_path: {path}"
    if not (Path(path) / "config.json").is_file():
        raise UnicodebookError(f"{where} is not a diffusers UNet folder (no config.json)")
    try:
        unet = unet_cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnicodebookError(f"{where} is not a loadable UNet ({why})") from None
    c = unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size or ())
    if (c.in_channels, c.out_channels) != (3, 3) or size not in (image_size, (image_size, image_size)):
        px = f"{size} px" if isinstance(size, int) else f"{'×'.join(map(str, size))} px" if size else "unsized"
        ch = c.in_channels if c.in_channels == c.out_channels else f"{c.in_channels} → {c.out_channels}"
        raise UnicodebookError(
            f"{where} is a UNet for {px} images with {ch} channels; the model draws {image_size} px RGB"
        )
    if c.class_embed_type or c.addition_embed_type:
        raise UnicodebookError(
            f"{where} needs {c.class_embed_type or c.addition_embed_type} embeddings as input; "
            f"this decoder conditions by cross-attention only"
        )
    return unet


def unet_from_config(folder: str | Path):
    """A UNet rebuilt from the ``config.json`` in ``folder`` (weights not loaded: they come from the
    tokenizer's safetensors file)."""
    unet_cls = _diffusers().UNet2DConditionModel
    try:
        return unet_cls.from_config(unet_cls.load_config(str(folder)))
    except (OSError, ValueError, TypeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnicodebookError(f"{folder}/config.json is not a diffusers UNet config ({why})") from None


class DiffusionDecoder(nn.Module):
    """The generation embedding (B, e) → images (B, 3, H, W) in [0, 1] by denoising with ``unet``."""

    def __init__(self, unet: nn.Module, cond_dim: int, cond_tokens: int, train_timesteps: int, cond_dropout: float):
        super().__init__()
        d = _diffusers()
        self.unet = unet
        width = unet.config.cross_attention_dim
        self.cond_tokens, self.cond_dropout = cond_tokens, cond_dropout
        self.cond_proj = nn.Linear(cond_dim, cond_tokens * width)
        self.null_cond = nn.Parameter(torch.zeros(1, cond_tokens, width))  # the condition CFG drops to
        self.noise_schedule = d.DDPMScheduler(num_train_timesteps=train_timesteps, beta_schedule="squaredcos_cap_v2")
        self.sampler = d.DDIMScheduler.from_config(self.noise_schedule.config, timestep_spacing="trailing")

    @property
    def image_size(self) -> int:
        s = self.unet.config.sample_size
        return s if isinstance(s, int) else s[0]

    def context(self, cond: Tensor) -> Tensor:
        """(B, e) → the (B, cond_tokens, width) tokens the UNet's cross-attention reads."""
        return self.cond_proj(cond).reshape(cond.shape[0], self.cond_tokens, -1)

    def loss(self, images: Tensor, cond: Tensor, generator: torch.Generator) -> Tensor:
        """Epsilon-prediction MSE on ``images`` (B, 3, H, W) in [0, 1] under condition ``cond`` (B, e);
        timesteps, noise and the dropped conditions drawn from ``generator``."""
        b, dev = images.shape[0], images.device
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (b,), generator=generator).to(dev)
        noise = torch.randn(images.shape, generator=generator).to(dev)
        drop = (torch.rand(b, generator=generator) < self.cond_dropout).to(dev)
        ctx = self.context(cond)
        ctx = torch.where(drop[:, None, None], self.null_cond.to(ctx.dtype), ctx)
        noisy = self.noise_schedule.add_noise(images * 2 - 1, noise, t)
        return F.mse_loss(self.unet(noisy, t, encoder_hidden_states=ctx).sample.float(), noise.float())

    def draw(self, cond: Tensor, steps: int, guidance: float, seed: int) -> Tensor:
        """A tokenizer's deterministic decode: :meth:`sample` with each image's noise drawn from its
        own generator seeded ``seed``, so an image's pixels are the same alone or in a batch."""
        return self.sample(cond, steps, guidance, [torch.Generator().manual_seed(seed) for _ in range(len(cond))])

    @torch.no_grad()
    def sample(
        self, cond: Tensor, steps: int, guidance: float, generator: torch.Generator | list[torch.Generator]
    ) -> Tensor:
        """``steps`` DDIM steps (deterministic, eta 0) from noise drawn from ``generator`` — or one
        generator per image, so an image's pixels do not depend on the batch it is decoded in —
        → images (B, 3, H, W) in [0, 1]."""
        ctx = self.context(cond)
        if guidance != 1:
            ctx = torch.cat([ctx, self.null_cond.expand_as(ctx).to(ctx.dtype)])
        self.sampler.set_timesteps(steps)
        shape = (3, self.image_size, self.image_size)
        if isinstance(generator, torch.Generator):
            x = torch.randn((cond.shape[0], *shape), generator=generator)
        else:
            x = torch.stack([torch.randn(shape, generator=g) for g in generator])
        x = x.to(cond.device)
        for t in self.sampler.timesteps:
            eps = self.unet(x if guidance == 1 else torch.cat([x, x]), t.to(x.device), encoder_hidden_states=ctx).sample
            if guidance != 1:
                cond_eps, null_eps = eps.chunk(2)
                eps = null_eps + guidance * (cond_eps - null_eps)
            x = self.sampler.step(eps, t, x, eta=0.0).prev_sample
        return ((x + 1) / 2).clamp(0, 1)
