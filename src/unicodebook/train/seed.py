"""Stage I recipe of the SEED family: one run, four phases declared in ``train_tokenizer.phases``.

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

Data: a shapes-world root (its ``train`` split) or a folder with ``t2i.jsonl`` image–caption pairs;
the images are read once into memory. Each phase trains only its own modules (the others get no
gradient; one AdamW throughout), warms up and decays on its own schedule. Batches are a function
of (seed, step), so ``--resume`` continues exactly, from any step of any phase. The run folder
is a tokenizer folder (``load_tokenizer(RUN)``); it keeps the caption encoder
(``text_tower.safetensors``) and, once phase ``vit`` is done, the ViT as a folder of its own
(``vit/``, timm's format) that another run can start from (``model.vit_path``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import Config, save_config
from ..data.images import load_image
from ..data.multimodal import read_records, split_folder
from ..errors import BadImageError, UnicodebookError
from ..eval.metrics import psnr
from ..eval.plots import image_grid, plot_curves
from ..lm.text import train_word_tokenizer
from ..tokenizers.seed import SeedTokenizer, build_tokenizer, save_tokenizer
from ..tokenizers.seed.model import feature_loss
from ..tokenizers.text_tower import TextTower, contrastive_loss, tokenize_captions
from ..tokenizers.vit import save_vit
from ..utils.io import atomic_save_tensors
from .checkpoint import check_resume, load_checkpoint
from .engine import Engine, NonFiniteError, NonFiniteGuard, save_training_checkpoint
from .runlog import RunLog
from .stage1 import Stage1Result, lr_at

PHASES = ("vit", "qformer", "vq", "decoder")


def phase_plan(cfg: Config) -> list[tuple[int, str, object]]:
    """(first step, name, settings) of each phase; one error line when the list does not fit."""
    tc, mc = cfg.train_tokenizer, cfg.model
    want = PHASES[1:] if mc.vit_path else PHASES
    names = tuple(p.name for p in tc.phases)
    if names != want:
        why = "model.vit_path is set, so no vit phase" if mc.vit_path else "the ViT is trained here first"
        raise UnicodebookError(f"a SEED run declares train_tokenizer.phases named {', '.join(want)} in that order "
                               f"({why}); got {', '.join(names) or 'none'}")
    out, at = [], 0
    for p in tc.phases:
        over = {k: getattr(p, k) for k in ("lr", "warmup_steps", "min_lr_ratio") if getattr(p, k) is not None}
        out.append((at, p.name, dataclasses.replace(tc, steps=p.steps, phases=[], **over)))
        at += p.steps
    return out


class Pairs:
    """Image–caption pairs of a folder, the images decoded once: (B, 3, H, W) and captions per batch."""

    def __init__(self, data: str | Path, size: int, odd_size: str):
        folder = split_folder(data, "train")
        caps = read_records(folder).captions
        if not caps:
            raise UnicodebookError(f"{folder}: SEED's contrastive phases need image–caption pairs (t2i.jsonl)")
        images, captions, self.bad = [], [], 0
        cache: dict[str, torch.Tensor | None] = {}
        for c in caps:
            if c.image not in cache:
                try:
                    cache[c.image] = load_image(folder / c.image, size, odd_size)
                except BadImageError:
                    cache[c.image] = None
                    self.bad += 1
            if cache[c.image] is not None:
                images.append(cache[c.image])
                captions.append(c.caption)
        if not images:
            raise UnicodebookError(f"{folder}: none of the captioned images could be read")
        self.images, self.captions = torch.stack(images), captions

    def batch(self, step: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
        n = len(self.captions)
        per_epoch = max(1, n // size)
        epoch, k = divmod(step, per_epoch)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))[k * size:(k + 1) * size]
        return self.images[idx], [self.captions[i] for i in idx.tolist()]


class Scales(nn.Module):
    """The two learnable contrastive temperatures (as log inverse temperatures)."""

    def __init__(self, temperature: float):
        super().__init__()
        start = math.log(1 / temperature)
        self.vit = nn.Parameter(torch.tensor(start))
        self.qformer = nn.Parameter(torch.tensor(start))


def _trainable(name: str, tok: SeedTokenizer, tower: TextTower, scales: Scales) -> list[nn.Parameter]:
    """The parameters a phase trains (the others get no gradient in it)."""
    if name == "vit":
        return [*tok.visual_encoder.parameters(), *tower.parameters(), scales.vit]
    if name == "qformer":
        return [tok.query_tokens, *tok.ln_vision.parameters(), *tok.Qformer.parameters(), *tok.vision_proj.parameters(),
                scales.qformer]
    if name == "vq":
        mods = (tok.encode_task_layer, tok.quantize, tok.decode_task_layer, tok.blocks, tok.blocks_image,
                tok.Reverse_Qformer, tok.distill_image_proj)
        return [p for m in mods for p in m.parameters()] + [tok.pos_embed, tok.pos_embed_image, tok.reverse_tokens]
    return list(tok.pixel_decoder.parameters())


def _phase_loss(name: str, cfg: Config, tok: SeedTokenizer, tower: TextTower, scales: Scales, text_tok,
                images: torch.Tensor, captions: list[str], step: int) -> tuple[torch.Tensor, dict]:
    lc = cfg.loss
    if name in ("vit", "qformer"):
        ids, mask = tokenize_captions(text_tok, captions, tower.max_length)
        ids, mask = ids.to(images.device), mask.to(images.device)
        if name == "vit":
            loss, acc = contrastive_loss(tok.visual_encoder.embedding(images), tower(ids, mask), scales.vit)
        else:
            with torch.no_grad():
                text = tower(ids, mask)
            loss, acc = contrastive_loss(tok.contrastive_embedding(tok.causal_embeddings(images)), text, scales.qformer)
        return loss, {"contrastive_acc": float(acc.detach()), "temperature": float(1 / getattr(scales, name).detach().exp())}
    if name == "vq":
        with torch.no_grad():
            causal = tok.causal_embeddings(images)
            target = tok.visual_encoder.embedding(images)
        zq, codes, vq = tok.quantize(tok.encode_task_layer(causal), step)
        recon, gen = tok.detokenize(zq)
        rec, g = feature_loss(recon, causal), F.mse_loss(gen.float(), target.float())
        parts = {"vq": float(vq.detach()), "feature_recon": float(rec.detach()), "generation": float(g.detach()),
                 "batch_usage": codes.unique().numel() / tok.num_codes}
        return lc.vq * vq + lc.feature_recon * rec + lc.generation * g, parts
    with torch.no_grad():
        recon, gen = tok.detokenize(tok.quantize.embedding(tok.encode(images)))
    if tok.pixel_kind == "diffusion":
        noise = torch.Generator().manual_seed(cfg.train_tokenizer.seed * 1_000_003 + step)
        d = tok.pixel_decoder.loss(images, gen, noise)
        return d, {"diffusion": float(d.detach())}
    out = tok.pixel_decoder(recon)
    a, b = F.l1_loss(out, images), F.mse_loss(out, images)
    return lc.l1 * a + lc.l2 * b, {"l1": float(a.detach()), "l2": float(b.detach()), "psnr": float(psnr(out.detach().clamp(0, 1), images).mean())}


def train_seed_tokenizer(cfg: Config, data: str | Path, out: str | Path, resume: bool = False,
                         progress: bool = True, val_split: str | None = "val") -> Stage1Result:
    """Run the four (or three) SEED phases of ``cfg.train_tokenizer.phases`` on ``data``."""
    tc, mc = cfg.train_tokenizer, cfg.model
    run = Path(out)
    plan = phase_plan(cfg)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    engine = Engine()
    if engine.world > 1:
        raise UnicodebookError("the SEED recipe runs in one process (its phases are small); launch it without torchrun")
    ckpts = check_resume(run, cfg, resume)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")

    torch.manual_seed(tc.seed)
    pairs = Pairs(data, mc.image_size, cfg.data.odd_size)
    text_folder = run / "text_tokenizer"
    if text_folder.exists():
        from ..lm.text import load_text_tokenizer

        text_tok = load_text_tokenizer(text_folder)
    else:
        text_tok = train_word_tokenizer(pairs.captions, max_vocab=4096)
        text_tok.save_pretrained(str(text_folder))
    tok = build_tokenizer(cfg, seed=tc.seed)
    cfg = tok.config  # with a local ViT's sizes written in
    if mc.generation_dim not in (0, tok.visual_encoder.embed_dim):
        raise UnicodebookError(f"model.generation_dim {mc.generation_dim}: the generation branch regresses the ViT's "
                               f"{tok.visual_encoder.embed_dim}-d image embedding here (0 takes its size)")
    t = mc.text
    if mc.contrastive_dim not in (0, tok.visual_encoder.embed_dim):
        raise UnicodebookError(f"model.contrastive_dim {mc.contrastive_dim}: the Q-Former is aligned with the caption "
                               f"encoder of stage 0, whose space is the ViT's {tok.visual_encoder.embed_dim}-d (0 takes it)")
    tower = TextTower(len(text_tok), t.width, t.layers, t.heads, t.max_length, tok.visual_encoder.embed_dim)
    scales = Scales(cfg.loss.temperature)
    tok.train(), tower.train()
    params = [*tok.parameters(), *tower.parameters(), *scales.parameters()]
    for p in params:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    modules = {"model": tok, "text_tower": tower, "scales": scales}
    start = 0
    if resume:
        start = load_checkpoint(ckpts[-1], modules, {"model": opt}, kind="tokenizer")["step"]
    for m in modules.values():
        m.to(engine.device)
    guard = NonFiniteGuard(tc.max_nonfinite, "SEED stage I", run)
    log = RunLog(run, start, resume)
    (run / "samples").mkdir(exist_ok=True)
    fixed = pairs.images[:8]

    def checkpoint(at: int) -> None:
        save_training_checkpoint(engine, run, at, {k: m.state_dict() for k, m in modules.items()}, {"model": opt},
                                 {"bad_images": pairs.bad}, tc.keep_last, "tokenizer")
        save_tokenizer(tok, run)
        atomic_save_tensors(tower.state_dict(), run / "text_tower.safetensors")
        if any(name == "vit" for _, name, _ in plan) and at >= plan[0][2].steps:  # stage 0 done: a ViT folder
            save_vit(tok.visual_encoder, run / "vit")  # of its own, for model.vit_path (SEED, LaVIT)

    t0, last, restarted, current = time.time(), {}, 0, None
    bar = tqdm(total=tc.steps, initial=start, desc="SEED stage I", disable=not progress, dynamic_ncols=True)
    for step in range(start, tc.steps):
        first, name, pc = next(p for p in reversed(plan) if step >= p[0])
        if name != current:  # only this phase's modules train
            for p in params:
                p.requires_grad_(False)
            trainable = _trainable(name, tok, tower, scales)
            for p in trainable:
                p.requires_grad_(True)
            current = name
        images, captions = pairs.batch(step, min(tc.batch_size, len(pairs.captions)), tc.seed)
        images = images.to(engine.device)
        lr = lr_at(step - first, pc)
        for g in opt.param_groups:
            g["lr"] = lr
        with engine.autocast(tc.precision):
            loss, parts = _phase_loss(name, cfg, tok, tower, scales, text_tok, images, captions, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        skipped = engine.clip_and_check(loss, trainable, tc.grad_clip)
        if skipped is None:
            opt.step()
            if name == "vq" and mc.restart_dead and (step + 1) % mc.restart_dead == 0:
                with torch.no_grad():
                    z = tok.encode_task_layer(tok.causal_embeddings(images))
                restarted += tok.quantize.restart_dead(z, step, mc.restart_dead,
                                                       torch.Generator().manual_seed(tc.seed * 7_919 + step))
        else:
            opt.zero_grad(set_to_none=True)
            log.write({"step": step + 1, "skipped": skipped, "phase": name})
        try:
            guard.record(skipped, step + 1)
        except NonFiniteError:
            log.close()
            raise
        bar.update(1)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps or done == first + pc.steps:
            last = {"step": done, "phase": name, f"loss_{name}": float(loss.detach()), **parts, "lr": lr,
                    "restarted_codes": restarted, "bad_images": pairs.bad, "elapsed_s": round(time.time() - t0, 2)}
            log.write(last, scalars=True)
            bar.set_postfix(phase=name, loss=f"{float(loss.detach()):.4f}")
        if tc.grid_every and name == "decoder" and (done % tc.grid_every == 0 or done == tc.steps):
            _write_grid(tok, fixed, run / "samples" / f"recon_{done:07d}.png")
        if tc.save_every and done % tc.save_every == 0 and done < tc.steps:
            checkpoint(done)
    bar.close()
    checkpoint(tc.steps)
    tok.eval()
    _write_grid(tok, fixed, run / "reconstructions.png")
    val = None
    root = Path(data)
    if val_split and (root / val_split).is_dir():
        from ..eval.tokenizer import evaluate_tokenizer

        val = evaluate_tokenizer(tok, root, split=val_split, progress=progress, usage_plot=run / "codebook_usage.png")
        log.write({"step": tc.steps, "split": val_split, **val})
    log.close()
    plot_curves(run / "metrics.jsonl", run / "curves.png",
                keys=tuple(f"loss_{n}" for _, n, _ in plan))
    return Stage1Result(run, tc.steps, last, val, time.time() - t0)


@torch.no_grad()
def _write_grid(tok: SeedTokenizer, images: torch.Tensor, path: Path) -> None:
    was = tok.training
    tok.eval()
    recon = tok.decode(tok.encode(images.to(tok.device))).cpu()
    tok.train(was)
    image_grid([images, recon], labels=["input", "recon"]).save(path)
