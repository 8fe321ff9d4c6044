"""Stage I of the families that train in phases over a ViT of their own (SEED: ``train/seed.py``,
LaVIT: ``train/lavit.py``): the run loop they share, their data and their stage 0.

A family's recipe is a :class:`PhasedFamily`: the phases it declares (``train_tokenizer.phases``,
first ``vit`` unless ``model.vit_path`` names a local ViT), how to build and save its tokenizer,
which parameters each phase trains and the loss of each phase other than ``vit``, and what it does
after an optimizer step (dead-code restarts). :func:`train_in_phases` runs it:

* ``vit`` — stage 0, here for every family: the ViT and a caption encoder trained from scratch
  against each other (CLIP's symmetric contrastive loss, a learnable temperature);
* then the family's phases, each training only its own modules (the others get no gradient; one
  AdamW throughout) with its own warm-up and decay.

Data: a shapes-world root (its ``train`` split) or a folder with ``t2i.jsonl`` image–caption pairs;
the images are read once into memory. Batches, restarts and any noise are functions of (seed,
step), so ``--resume`` continues exactly, from any step of any phase. The run folder is a
tokenizer folder (``load_tokenizer(RUN)``); it keeps the caption encoder (``text_tower.safetensors``)
and, once phase ``vit`` is done, the ViT as a folder of its own (``vit/``, timm's format) that
another run — of either family — can start from (``model.vit_path``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Config, save_config
from ..data.images import load_image, split_folder
from ..data.multimodal import read_records
from ..errors import BadImageError, UnicodebookError
from ..eval.plots import image_grid, plot_curves
from ..lm.text import train_word_tokenizer
from ..tokenizers.text_tower import TextTower, contrastive_loss, tokenize_captions
from ..tokenizers.vit import save_vit
from ..utils.io import atomic_save_tensors
from ..utils.modules import eval_mode
from .checkpoint import check_resume, load_checkpoint
from .engine import Engine, NonFiniteError, NonFiniteGuard, StopOnSigterm, save_training_checkpoint
from .runlog import RunLog
from .stage1 import Stage1Result, lr_at


@dataclass(frozen=True)
class PhasedFamily:
    """What :func:`train_in_phases` asks of a family. ``loss(name, cfg, visual_tok, tower, scales, text_tok,
    images, captions, step)`` → (loss, logged figures) for each phase but ``vit``;
    ``trainable(name, visual_tok, tower, scales)`` → its parameters (but ``vit``'s); ``after_step(name, cfg,
    visual_tok, images, step)`` → codes restarted; ``check(cfg, visual_tok)`` refuses sizes that do not fit."""

    title: str  # the family in messages ("SEED")
    phases: tuple[str, ...]  # in order, "vit" first
    temperatures: tuple[str, ...]  # the learnable contrastive temperatures (``Scales``), "vit" first
    build: Callable  # (cfg, seed) → tokenizer, its config (with a local ViT's sizes) as ``visual_tok.config``
    save: Callable  # (visual_tok, folder)
    vit: Callable  # visual_tok → its ViT
    trainable: Callable
    loss: Callable
    after_step: Callable
    check: Callable = lambda cfg, visual_tok: None


def phase_plan(family: PhasedFamily, cfg: Config) -> list[tuple[int, str, object]]:
    """(first step, name, settings) of each phase; one error line when the list does not fit."""
    tc, mc = cfg.train_tokenizer, cfg.model
    want = family.phases[1:] if mc.vit_path else family.phases
    names = tuple(p.name for p in tc.phases)
    if names != want:
        why = "model.vit_path is set, so no vit phase" if mc.vit_path else "the ViT is trained here first"
        raise UnicodebookError(
            f"a {family.title} run declares train_tokenizer.phases named {', '.join(want)} in that "
            f"order ({why}); got {', '.join(names) or 'none'}"
        )
    out, at = [], 0
    for p in tc.phases:
        over = {k: getattr(p, k) for k in ("lr", "warmup_steps", "min_lr_ratio") if getattr(p, k) is not None}
        out.append((at, p.name, dataclasses.replace(tc, steps=p.steps, phases=[], **over)))
        at += p.steps
    return out


class Pairs:
    """Image–caption pairs of a folder, the images decoded once: (B, 3, H, W) and captions per batch."""

    def __init__(self, data: str | Path, size: int, odd_size: str, title: str):
        folder = split_folder(data, "train")
        caps = read_records(folder).captions
        if not caps:
            raise UnicodebookError(f"{folder}: the {title} recipe reads image–caption pairs (t2i.jsonl)")
        images, captions, self.bad = [], [], 0
        cache: dict[str, torch.Tensor | None] = {}
        for c in caps:
            if c.image not in cache:
                try:
                    cache[c.image] = load_image(folder / c.image, size, odd_size, root=folder)
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
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))[
            k * size : (k + 1) * size
        ]
        return self.images[idx], [self.captions[i] for i in idx.tolist()]


class Scales(nn.Module):
    """The learnable contrastive temperatures (as log inverse temperatures), one per name."""

    def __init__(self, temperature: float, names: tuple[str, ...] = ("vit", "qformer")):
        super().__init__()
        start = math.log(1 / temperature)
        for name in names:
            setattr(self, name, nn.Parameter(torch.tensor(start)))


def caption_batch(text_tok, captions: list[str], tower: TextTower, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions → (ids, mask) on ``device``, cut at the caption encoder's length."""
    ids, mask = tokenize_captions(text_tok, captions, tower.max_length)
    return ids.to(device), mask.to(device)


def contrastive_figures(acc: torch.Tensor, scale: nn.Parameter) -> dict:
    return {"contrastive_acc": float(acc.detach()), "temperature": float(1 / scale.detach().exp())}


def vit_loss(
    vit: nn.Module, tower: TextTower, scale: nn.Parameter, text_tok, images: torch.Tensor, captions: list[str]
) -> tuple[torch.Tensor, dict]:
    """Stage 0: the ViT's image embedding against its caption's (CLIP's loss) → (loss, figures)."""
    ids, mask = caption_batch(text_tok, captions, tower, images.device)
    loss, acc = contrastive_loss(vit.embedding(images), tower(ids, mask), scale)
    return loss, contrastive_figures(acc, scale)


def _trainable(family: PhasedFamily, name: str, visual_tok, tower: TextTower, scales: Scales) -> list[nn.Parameter]:
    if name == "vit":
        return [*family.vit(visual_tok).parameters(), *tower.parameters(), scales.vit]
    return family.trainable(name, visual_tok, tower, scales)


def _phase_loss(
    family: PhasedFamily,
    name: str,
    cfg: Config,
    visual_tok,
    tower: TextTower,
    scales: Scales,
    text_tok,
    images: torch.Tensor,
    captions: list[str],
    step: int,
) -> tuple[torch.Tensor, dict]:
    if name == "vit":
        return vit_loss(family.vit(visual_tok), tower, scales.vit, text_tok, images, captions)
    return family.loss(name, cfg, visual_tok, tower, scales, text_tok, images, captions, step)


def train_in_phases(
    family: PhasedFamily,
    cfg: Config,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    val_split: str | None = "val",
) -> Stage1Result:
    """Run the phases of ``cfg.train_tokenizer.phases`` of ``family`` on ``data``."""
    tc, mc = cfg.train_tokenizer, cfg.model
    run = Path(out)
    plan = phase_plan(family, cfg)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.augment != "none":
        raise UnicodebookError(
            f"train_tokenizer.augment={tc.augment} flips images their captions describe; the "
            f"{family.title} recipe trains on captions, so it takes augment=none"
        )
    engine = Engine()
    if engine.world > 1:
        raise UnicodebookError(
            f"the {family.title} recipe runs in one process (its phases are small); launch it without torchrun"
        )
    ckpts = check_resume(run, cfg, resume)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")

    torch.manual_seed(tc.seed)
    pairs = Pairs(data, mc.image_size, cfg.data.odd_size, family.title)
    text_folder = run / "text_tokenizer"
    if text_folder.exists():
        from ..lm.text import load_text_tokenizer

        text_tok = load_text_tokenizer(text_folder)
    else:
        text_tok = train_word_tokenizer(pairs.captions, max_vocab=4096)
        text_tok.save_pretrained(str(text_folder))
    visual_tok = family.build(cfg, tc.seed)
    cfg = visual_tok.config  # with a local ViT's sizes written in
    family.check(cfg, visual_tok)
    t, vit = mc.text, family.vit(visual_tok)
    tower = TextTower(len(text_tok), t.width, t.layers, t.heads, t.max_length, vit.embed_dim)
    scales = Scales(cfg.loss.temperature, family.temperatures)
    visual_tok.train(), tower.train()
    params = [*visual_tok.parameters(), *tower.parameters(), *scales.parameters()]
    for p in params:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    modules = {"model": visual_tok, "text_tower": tower, "scales": scales}
    start = 0
    if resume:
        start = load_checkpoint(ckpts[-1], modules, {"model": opt}, kind="tokenizer")["step"]
    for m in modules.values():
        m.to(engine.device)
    guard = NonFiniteGuard(tc.max_nonfinite, f"{family.title} stage I", run)
    log = RunLog(run, start, resume)
    (run / "samples").mkdir(exist_ok=True)
    fixed = pairs.images[:8]

    def checkpoint(at: int) -> None:
        save_training_checkpoint(
            engine,
            run,
            at,
            {k: m.state_dict() for k, m in modules.items()},
            {"model": opt},
            {"bad_images": pairs.bad},
            tc.keep_last,
            "tokenizer",
        )
        family.save(visual_tok, run)
        atomic_save_tensors(tower.state_dict(), run / "text_tower.safetensors")
        if any(name == "vit" for _, name, _ in plan) and at >= plan[0][2].steps:  # stage 0 done: a ViT folder
            save_vit(family.vit(visual_tok), run / "vit")  # of its own, for model.vit_path (SEED, LaVIT)

    t0, last, restarted, current = time.time(), {}, 0, None
    bar = tqdm(total=tc.steps, initial=start, desc=f"{family.title} stage I", disable=not progress, dynamic_ncols=True)
    with StopOnSigterm(engine) as sigterm:
        for step in range(start, tc.steps):
            first, name, pc = next(p for p in reversed(plan) if step >= p[0])
            if name != current:  # only this phase's modules train
                for p in params:
                    p.requires_grad_(False)
                trainable = _trainable(family, name, visual_tok, tower, scales)
                for p in trainable:
                    p.requires_grad_(True)
                current = name
            images, captions = pairs.batch(step, min(tc.batch_size, len(pairs.captions)), tc.seed)
            images = images.to(engine.device)
            lr = lr_at(step - first, pc)
            for group in opt.param_groups:
                group["lr"] = lr
            with engine.autocast(tc.precision):
                loss, parts = _phase_loss(
                    family, name, cfg, visual_tok, tower, scales, text_tok, images, captions, step
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            skipped = engine.clip_and_check(loss, trainable, tc.grad_clip)
            if skipped is None:
                opt.step()
                restarted += family.after_step(name, cfg, visual_tok, images, step)
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
                last = {
                    "step": done,
                    "phase": name,
                    f"loss_{name}": float(loss.detach()),
                    **parts,
                    "lr": lr,
                    "restarted_codes": restarted,
                    "bad_images": pairs.bad,
                    "elapsed_s": round(time.time() - t0, 2),
                }
                log.write(last, scalars=True)
                bar.set_postfix(phase=name, loss=f"{float(loss.detach()):.4f}")
            if tc.grid_every and name == "decoder" and (done % tc.grid_every == 0 or done == tc.steps):
                write_grid(visual_tok, fixed, run / "samples" / f"recon_{done:07d}.png")
            if done < tc.steps and sigterm.requested():
                bar.close()
                checkpoint(done)
                log.close()
                raise sigterm.stop(f"{family.title} stage I", done, tc.steps, run)
            if tc.save_every and done % tc.save_every == 0 and done < tc.steps:
                checkpoint(done)
    bar.close()
    checkpoint(tc.steps)
    visual_tok.eval()
    write_grid(visual_tok, fixed, run / "reconstructions.png")
    val = None
    root = Path(data)
    if val_split and (root / val_split).is_dir():
        from ..eval.tokenizer import evaluate_tokenizer

        val = evaluate_tokenizer(
            visual_tok, root, split=val_split, progress=progress, usage_plot=run / "codebook_usage.png"
        )
        log.write({"step": tc.steps, "split": val_split, **val})
    log.close()
    plot_curves(run / "metrics.jsonl", run / "curves.png", keys=tuple(f"loss_{n}" for _, n, _ in plan))
    return Stage1Result(run, tc.steps, last, val, time.time() - t0)


@torch.no_grad()
def write_grid(visual_tok, images: torch.Tensor, path: Path) -> None:
    """Inputs above, their reconstructions (decode ∘ encode) below."""
    with eval_mode(visual_tok):
        recon = visual_tok.decode(visual_tok.encode(images.to(visual_tok.device))).cpu()
    image_grid([images, recon], labels=["input", "recon"]).save(path)
