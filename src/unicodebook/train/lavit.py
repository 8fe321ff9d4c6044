"""Stage I recipe of the LaVIT family: one run, three phases declared in ``train_tokenizer.phases``,
run by the phased loop it shares with SEED (``train/phased.py``: data, resume, the run folder).

* ``vit`` — stage 0, SEED's: the ViT and a caption encoder trained from scratch against each
  other (CLIP's loss). Left out when ``model.vit_path`` names a local ViT (a SEED run's ``vit/``
  folder is one).
* ``tokenizer`` — the ViT frozen: selector, merger, ``token_pos_embed`` (if any),
  ``encode_task_layer`` and the de-tokenizer, ``loss.feature_recon``·(1 − cos of the reconstructed
  to the ViT's patch features) + ``loss.feature_detail``·(the same with both less their image's mean
  patch: what tells the patches apart) + ``loss.vq``·commitment + ``loss.ratio``·(ρ − kept fraction)² (the
  fraction per image, the square averaged over the batch, DynamicViT's; with
  ``model.keep_ratio_over: batch`` the batch's mean fraction, so busier images may keep more); the keep decisions
  Gumbel-sampled, their noise a function of (seed, step); the codebook follows by EMA, with its
  k-means start and dead-code restarts (every ``model.restart_dead`` steps) when asked.
* ``decoder`` — everything above frozen: the pixel decoder from the features the de-tokenizer
  reconstructs from the codes of ``encode`` (inference selection), ``loss.l1``·L1 + ``loss.l2``·L2;
  or, with ``model.pixel_decoder: diffusion``, the diffusion decoder conditioned on their mean,
  its denoising MSE (logged as ``diffusion``).

Logged in phase ``tokenizer``: ``keep_fraction`` (the sampled decisions' mean: what the ratio loss
pulls to ρ), ``keep_fraction_inference`` (what ``encode``'s rule, ``model.inference_keep``, keeps of
the same batch, with one patch at least), ``tokens_per_image``, ``batch_usage`` (codes used in the
batch / K).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..eval.metrics import psnr
from ..tokenizers.base import PAD_CODE
from ..tokenizers.lavit import LavitTokenizer, build_tokenizer, save_tokenizer
from ..tokenizers.lavit.selector import keep_decisions
from ..tokenizers.seed.model import feature_loss
from ..tokenizers.text_tower import TextTower
from .phased import PhasedFamily, Scales, train_in_phases
from .stage1 import Stage1Result

PHASES = ("vit", "tokenizer", "decoder")


def _trainable(name: str, visual_tok: LavitTokenizer, tower: TextTower, scales: Scales) -> list[nn.Parameter]:
    """The parameters a phase after ``vit`` trains (the codebook is EMA-updated, never trained)."""
    if name == "tokenizer":
        mods = (
            visual_tok.token_predictor,
            visual_tok.causal_encoder,
            visual_tok.encode_task_layer,
            visual_tok.tokenizer_decoder,
        )
        extra = [visual_tok.token_pos_embed] if visual_tok.token_pos_embed is not None else []
        return [p for m in mods for p in m.parameters()] + extra
    return list(visual_tok.pixel_decoder.parameters())


def _centred(features: torch.Tensor) -> torch.Tensor:
    """(B, N, W) patch features less their image's mean patch: what tells an image's patches apart."""
    return features - features.mean(1, keepdim=True)


def _noise(cfg: Config, step: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.train_tokenizer.seed * 1_000_003 + salt * 7_919 + step)


def _phase_loss(
    name: str,
    cfg: Config,
    visual_tok: LavitTokenizer,
    tower: TextTower,
    scales: Scales,
    text_tok,
    images: torch.Tensor,
    captions: list[str],
    step: int,
) -> tuple[torch.Tensor, dict]:
    loss_cfg = cfg.loss
    if name == "tokenizer":
        out = visual_tok(images, step, _noise(cfg, step, 1))
        rec = feature_loss(out.recon, out.features)
        detail = feature_loss(_centred(out.recon), _centred(out.features))
        kept = out.keep.mean(1)  # (B,) the fraction of each image's patches kept
        if cfg.model.keep_ratio_over == "batch":  # busier images may keep more, as long as the mean is ρ
            ratio = (kept.mean() - visual_tok.keep_ratio) ** 2
        else:
            ratio = ((kept - visual_tok.keep_ratio) ** 2).mean()
        real = out.codes != PAD_CODE
        parts = {
            "feature_recon": float(rec.detach()),
            "feature_detail": float(detail.detach()),
            "vq": float(out.vq_loss.detach()),
            "ratio": float(ratio.detach()),
            "keep_fraction": float(kept.detach().mean()),
            "keep_fraction_inference": float(
                keep_decisions(out.log_probs.detach(), 1, visual_tok.inference_rule).mean()
            ),
            "tokens_per_image": float(real.sum(1).float().mean()),
            "batch_usage": out.codes[real].unique().numel() / visual_tok.num_codes,
        }
        recon_terms = loss_cfg.feature_recon * rec + loss_cfg.feature_detail * detail
        return recon_terms + loss_cfg.vq * out.vq_loss + loss_cfg.ratio * ratio, parts
    with torch.no_grad():  # the codes as encode gives them (sampled from a (seed, step) generator, if asked)
        recon = visual_tok.reconstruct_features(visual_tok.encode(images, generator=_noise(cfg, step, 2)))
    if visual_tok.pixel_kind == "diffusion":
        d = visual_tok.pixel_decoder.loss(images, visual_tok.condition(recon), _noise(cfg, step, 3))
        return d, {"diffusion": float(d.detach())}
    pixels = visual_tok.pixel_decoder(recon)
    a, b = F.l1_loss(pixels, images), F.mse_loss(pixels, images)
    return loss_cfg.l1 * a + loss_cfg.l2 * b, {
        "l1": float(a.detach()),
        "l2": float(b.detach()),
        "psnr": float(psnr(pixels.detach().clamp(0, 1), images).mean()),
    }


def _after_step(name: str, cfg: Config, visual_tok: LavitTokenizer, images: torch.Tensor, step: int) -> int:
    """Dead-code restarts in phase tokenizer, every ``model.restart_dead`` steps, onto the batch's
    normalised features (of the deterministic selection) → the codes restarted."""
    every = cfg.model.restart_dead
    if name != "tokenizer" or not every or (step + 1) % every:
        return 0
    with torch.no_grad():
        features = visual_tok.patch_features(images)
        keep = keep_decisions(visual_tok.keep_scores(features), visual_tok.min_tokens, visual_tok.inference_rule)
        tokens, mask = visual_tok.merge(features, keep)
        z = F.normalize(visual_tok.encode_task_layer(tokens[mask]), dim=-1)
    return visual_tok.quantize.restart_dead(z, step, every, _noise(cfg, step, 4))


LAVIT = PhasedFamily(
    title="LaVIT",
    phases=PHASES,
    temperatures=("vit",),
    build=build_tokenizer,
    save=save_tokenizer,
    vit=lambda visual_tok: visual_tok.encoder,
    trainable=_trainable,
    loss=_phase_loss,
    after_step=_after_step,
)


def train_lavit_tokenizer(
    cfg: Config,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    val_split: str | None = "val",
) -> Stage1Result:
    """Run the three (or two) LaVIT phases of ``cfg.train_tokenizer.phases`` on ``data``."""
    return train_in_phases(LAVIT, cfg, data, out, resume=resume, progress=progress, val_split=val_split)
