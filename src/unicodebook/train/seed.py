"""Stage I recipe of the SEED family: one run, four phases declared in ``train_tokenizer.phases``,
run by the phased loop it shares with LaVIT (``train/phased.py``: data, resume, the run folder).

* ``vit`` — stage 0: the ViT and a caption encoder trained from scratch against each other
  (CLIP's symmetric contrastive loss). Left out when ``model.vit_path`` names a local ViT.
* ``qformer`` — the causal Q-Former's *last* query, projected, against the (now frozen) caption
  embedding: the same contrastive loss, its own learnable temperature (SEED's stage I).
* ``vq`` — the Q-Former frozen: codebook, the two task layers and the de-tokenizer's branches,
  ``loss.vq``·VQ + ``loss.feature_recon``·(1 − cos to the causal embeddings) +
  ``loss.generation``·MSE(generation embedding, the ViT's image embedding) (SEED's stage II).
* ``decoder`` — everything above frozen: the pixel decoder from the reconstructed embeddings of
  the codes, ``loss.l1``·L1 + ``loss.l2``·L2; or, with ``model.pixel_decoder: diffusion``, the
  diffusion decoder from the codes' generation embedding, its denoising MSE (logged as
  ``diffusion``; its noise a function of (seed, step), so a resumed run stays exact).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..errors import UnicodebookError
from ..eval.metrics import psnr
from ..tokenizers.seed import SeedTokenizer, build_tokenizer, save_tokenizer
from ..tokenizers.seed.model import feature_loss
from ..tokenizers.text_tower import TextTower, contrastive_loss
from .phased import PhasedFamily, Scales, caption_batch, contrastive_figures, train_in_phases
from .stage1 import Stage1Result

PHASES = ("vit", "qformer", "vq", "decoder")


def _trainable(name: str, visual_tok: SeedTokenizer, tower: TextTower, scales: Scales) -> list[nn.Parameter]:
    """The parameters a phase after ``vit`` trains (the others get no gradient in it)."""
    if name == "qformer":
        return [
            visual_tok.query_tokens,
            *visual_tok.ln_vision.parameters(),
            *visual_tok.Qformer.parameters(),
            *visual_tok.vision_proj.parameters(),
            scales.qformer,
        ]
    if name == "vq":
        mods = (
            visual_tok.encode_task_layer,
            visual_tok.quantize,
            visual_tok.decode_task_layer,
            visual_tok.blocks,
            visual_tok.blocks_image,
            visual_tok.Reverse_Qformer,
            visual_tok.distill_image_proj,
        )
        return [p for m in mods for p in m.parameters()] + [
            visual_tok.pos_embed,
            visual_tok.pos_embed_image,
            visual_tok.reverse_tokens,
        ]
    return list(visual_tok.pixel_decoder.parameters())


def _phase_loss(
    name: str,
    cfg: Config,
    visual_tok: SeedTokenizer,
    tower: TextTower,
    scales: Scales,
    text_tok,
    images: torch.Tensor,
    captions: list[str],
    step: int,
) -> tuple[torch.Tensor, dict]:
    loss_cfg = cfg.loss
    if name == "qformer":
        ids, mask = caption_batch(text_tok, captions, tower, images.device)
        with torch.no_grad():
            text = tower(ids, mask)
        loss, acc = contrastive_loss(
            visual_tok.contrastive_embedding(visual_tok.causal_embeddings(images)), text, scales.qformer
        )
        return loss, contrastive_figures(acc, scales.qformer)
    if name == "vq":
        with torch.no_grad():
            causal = visual_tok.causal_embeddings(images)
            target = visual_tok.visual_encoder.embedding(images)
        zq, codes, vq = visual_tok.quantize(visual_tok.encode_task_layer(causal), step)
        recon, gen = visual_tok.detokenize(zq)
        rec, gen_loss = feature_loss(recon, causal), F.mse_loss(gen.float(), target.float())
        parts = {
            "vq": float(vq.detach()),
            "feature_recon": float(rec.detach()),
            "generation": float(gen_loss.detach()),
            "batch_usage": codes.unique().numel() / visual_tok.num_codes,
        }
        return loss_cfg.vq * vq + loss_cfg.feature_recon * rec + loss_cfg.generation * gen_loss, parts
    with torch.no_grad():
        recon, gen = visual_tok.detokenize(visual_tok.quantize.embedding(visual_tok.encode(images)))
    if visual_tok.pixel_kind == "diffusion":
        noise = torch.Generator().manual_seed(cfg.train_tokenizer.seed * 1_000_003 + step)
        d = visual_tok.pixel_decoder.loss(images, gen, noise)
        return d, {"diffusion": float(d.detach())}
    out = visual_tok.pixel_decoder(recon)
    a, b = F.l1_loss(out, images), F.mse_loss(out, images)
    return loss_cfg.l1 * a + loss_cfg.l2 * b, {
        "l1": float(a.detach()),
        "l2": float(b.detach()),
        "psnr": float(psnr(out.detach().clamp(0, 1), images).mean()),
    }


def _after_step(name: str, cfg: Config, visual_tok: SeedTokenizer, images: torch.Tensor, step: int) -> int:
    """Dead-code restarts in phase vq, every ``model.restart_dead`` steps → the codes restarted."""
    every = cfg.model.restart_dead
    if name != "vq" or not every or (step + 1) % every:
        return 0
    with torch.no_grad():
        z = visual_tok.encode_task_layer(visual_tok.causal_embeddings(images))
    generator = torch.Generator().manual_seed(cfg.train_tokenizer.seed * 7_919 + step)
    return visual_tok.quantize.restart_dead(z, step, every, generator)


def _check(cfg: Config, visual_tok: SeedTokenizer) -> None:
    mc, e = cfg.model, visual_tok.visual_encoder.embed_dim
    if mc.generation_dim not in (0, e):
        raise UnicodebookError(
            f"model.generation_dim {mc.generation_dim}: the generation branch regresses the ViT's "
            f"{e}-d image embedding here (0 takes its size)"
        )
    if mc.contrastive_dim not in (0, e):
        raise UnicodebookError(
            f"model.contrastive_dim {mc.contrastive_dim}: the Q-Former is aligned with the caption "
            f"encoder of stage 0, whose space is the ViT's {e}-d (0 takes it)"
        )


SEED = PhasedFamily(
    title="SEED",
    phases=PHASES,
    temperatures=("vit", "qformer"),
    build=build_tokenizer,
    save=save_tokenizer,
    vit=lambda visual_tok: visual_tok.visual_encoder,
    trainable=_trainable,
    loss=_phase_loss,
    after_step=_after_step,
    check=_check,
)


def train_seed_tokenizer(
    cfg: Config,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    val_split: str | None = "val",
) -> Stage1Result:
    """Run the four (or three) SEED phases of ``cfg.train_tokenizer.phases`` on ``data``."""
    return train_in_phases(SEED, cfg, data, out, resume=resume, progress=progress, val_split=val_split)
