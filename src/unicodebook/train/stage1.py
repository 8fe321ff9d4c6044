"""Stage I recipe: train the UniCode visual tokenizer by image reconstruction.

Life cycle: setup (run folder, data, model, optimizer) → train (tqdm, metrics.jsonl,
TensorBoard, grids, atomic checkpoints) → final eval on the validation split → save.

The run folder is itself a tokenizer folder (``load_tokenizer(RUN)`` works) and holds
``checkpoints/`` for ``--resume``, which continues the same run exactly: data order, restarts
and the learning-rate schedule are functions of (seed, step).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config, load_config, save_config
from ..data.images import ImageFolder, collate_images, is_split_root, resolve_image_folder
from ..errors import UnicodebookError
from ..eval.metrics import CodeUsage, psnr
from ..eval.plots import image_grid, plot_curves
from ..tokenizers.unicode import UniCodeTokenizer, build_tokenizer, save_tokenizer
from ..tokenizers.unicode.model import reconstruction_loss
from ..utils.io import atomic_write_text
from .checkpoint import check_resume, load_checkpoint, save_checkpoint


class ResumableBatches(torch.utils.data.Sampler):
    """Batches of indices in an order fixed by (seed, epoch), starting at any global step."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, total_steps: int | None = None):
        if n == 0:
            raise UnicodebookError("no training images")
        self.n, self.bs, self.seed = n, min(batch_size, n), seed
        self.per_epoch = max(1, n // self.bs)  # drop the ragged last batch
        self.start, self.total = start_step, total_steps

    def __iter__(self):
        step = self.start
        while self.total is None or step < self.total:
            epoch, k = divmod(step, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=g)
            yield order[k * self.bs : (k + 1) * self.bs].tolist()
            step += 1

    def __len__(self) -> int:
        return (self.total or 0) - self.start


def lr_at(step: int, cfg) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio``·lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@dataclass
class Stage1Result:
    run: Path
    steps: int
    final: dict  # last training metrics
    val: dict | None  # validation eval, if a val split exists
    seconds: float


def train_tokenizer(cfg: Config, data: str | Path, out: str | Path, resume: bool = False,
                    progress: bool = True, val_split: str | None = "val") -> Stage1Result:
    """Run stage I. ``data``: a shapes-world root (uses ``train``/``val``) or an image folder."""
    tc = cfg.train_tokenizer
    run = Path(out)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    data = Path(data)
    has_splits = is_split_root(data)
    train_folder = resolve_image_folder(data, "train")

    # ------------------------------------------------------------------ setup
    ckpts = check_resume(run, cfg, resume)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")

    torch.manual_seed(tc.seed)
    dataset = ImageFolder(train_folder, cfg.model.image_size, cfg.data.odd_size, preload=cfg.data.preload, progress=progress)
    tok = build_tokenizer(cfg, seed=tc.seed)
    tok.train()
    opt = torch.optim.AdamW(tok.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    aux = AuxLosses(cfg, tok)
    modules, optimizers = {"model": tok, **aux.modules()}, {"model": opt, **aux.optimizers()}
    start = 0
    bad_images = len(dataset.bad)
    if resume:
        state = load_checkpoint(ckpts[-1], modules, optimizers, kind="tokenizer")
        start, bad_images = state["step"], state.get("bad_images", bad_images)
        if cfg.model.codebook.mode == "dual":
            tok.codebook.write_to_llm()  # the LLM rows as they were at that step
    batches = ResumableBatches(len(dataset), tc.batch_size, tc.seed, start, tc.steps)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_images, num_workers=cfg.data.num_workers)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "tb"), purge_step=start if resume else None)
    if resume:
        _trim_metrics(run / "metrics.jsonl", start)
    metrics_file = open(run / "metrics.jsonl", "a" if resume else "w")
    (run / "samples").mkdir(exist_ok=True)
    fixed = torch.stack([x for x in (dataset[i] for i in range(min(8, len(dataset)))) if x is not None])

    # ------------------------------------------------------------------ train
    t0, last = time.time(), {}
    usage = CodeUsage(tok.codebook.num_codes, tok.depth if tok.kind == "rq" else 2 * tok.depth)
    bar = tqdm(total=tc.steps, initial=start, desc="stage I", disable=not progress, dynamic_ncols=True)
    step = start
    for images, n_bad in loader:
        bad_images += n_bad
        if images.numel() == 0:
            step += 1
            continue
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        out = tok(images)
        rec, parts = reconstruction_loss(out.recon, images, cfg.loss.l1, cfg.loss.l2)
        rec, aux_parts = aux.generator_terms(rec, out.recon, images, step)
        loss = rec + out.commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(tok.parameters(), tc.grad_clip)
        opt.step()
        parts.update(aux_parts, **aux.discriminator_step(out.recon.detach(), images, step, lr))
        update = tok.quantizer.pop_updates()
        if update is not None:
            gen = torch.Generator().manual_seed(tc.seed * 7_919 + step)
            tok.codebook.update(*update, progress=(step + 1) / tc.steps, step=step, generator=gen)
        layers, _ = tok.code_layers(out.codes)
        usage.update(layers)
        step += 1
        bar.update(1)

        if step % tc.log_every == 0 or step == tc.steps:
            st = usage.stats()
            usage.reset()
            last = {
                "step": step, "loss": float(loss.detach()), "quant_loss": float(out.commit_loss.detach()),
                **({"usage_entropy": float(out.usage_loss.detach())} if out.usage_loss is not None else {}), **parts,
                "psnr": float(psnr(out.recon.detach().clamp(0, 1), images).mean()),
                "usage": round(sum(st["usage"]) / len(st["usage"]), 4), "usage_per_layer": st["usage"],
                "perplexity": st["perplexity"], "lr": lr, "bad_images": bad_images,
                "codebook_cosine_llm": tok.codebook.alignment()["cosine"], "elapsed_s": round(time.time() - t0, 2),
            }
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
            for k, v in last.items():
                if isinstance(v, float) and k != "elapsed_s":
                    writer.add_scalar(f"train/{k}", v, step)
            bar.set_postfix(loss=f"{last['loss']:.4f}", psnr=f"{last['psnr']:.1f}", usage=f"{last['usage']:.0%}")
        if tc.grid_every and (step % tc.grid_every == 0 or step == tc.steps):
            _write_grid(tok, fixed, run / "samples" / f"recon_{step:07d}.png", writer, step)
        if tc.save_every and step % tc.save_every == 0 and step < tc.steps:
            _save(tok, modules, optimizers, run, step, bad_images, tc.keep_last)
    bar.close()

    # ------------------------------------------------------------------ finish
    _save(tok, modules, optimizers, run, step, bad_images, tc.keep_last)
    tok.eval()
    _write_grid(tok, fixed, run / "reconstructions.png", writer, step)
    val = None
    if has_splits and val_split and (data / val_split).is_dir():
        from ..eval.tokenizer import evaluate_tokenizer

        val = evaluate_tokenizer(tok, data, split=val_split, progress=progress, usage_plot=run / "codebook_usage.png")
        metrics_file.write(json.dumps({"step": step, "split": val_split, **val}) + "\n")
        for k in ("psnr", "ssim", "usage_mean"):
            writer.add_scalar(f"{val_split}/{k}", val[k], step)
    metrics_file.close()
    writer.close()
    plot_curves(run / "metrics.jsonl", run / "curves.png")
    return Stage1Result(run, step, last, val, time.time() - t0)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint a resumed run restarts from (no duplicates)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _save(tok: UniCodeTokenizer, modules: dict, optimizers: dict, run: Path, step: int, bad_images: int, keep: int) -> None:
    save_checkpoint(run, step, modules, optimizers, {"bad_images": bad_images}, keep=keep, kind="tokenizer")
    save_tokenizer(tok, run)


class AuxLosses:
    """The optional perceptual (LPIPS) and adversarial (PatchGAN, hinge) terms of stage I.

    Both are off unless their weight is > 0. LPIPS loads VGG16 and LPIPS weights from local
    files; the discriminator starts at ``loss.gan_start`` with taming's adaptive weight.
    """

    def __init__(self, cfg: Config, tok: UniCodeTokenizer):
        from .losses import LPIPS, PatchDiscriminator, disc_layers_for_size

        lc, tc = cfg.loss, cfg.train_tokenizer
        self.cfg, self.tok = lc, tok
        self.lpips = None
        if lc.perceptual > 0:
            if not lc.perceptual_vgg or not lc.perceptual_lin:
                raise UnicodebookError("loss.perceptual > 0 needs loss.perceptual_vgg and loss.perceptual_lin (local weight files)")
            try:
                self.lpips = LPIPS.from_pretrained(lc.perceptual_vgg, lc.perceptual_lin)
            except ValueError as e:
                raise UnicodebookError(str(e)) from None
        self.disc = self.disc_opt = None
        if lc.gan > 0:
            self.disc = PatchDiscriminator(n_layers=disc_layers_for_size(cfg.model.image_size))
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=tc.lr, betas=(0.5, 0.9), weight_decay=0.0)

    def modules(self) -> dict:
        return {"discriminator": self.disc} if self.disc is not None else {}

    def optimizers(self) -> dict:
        return {"discriminator": self.disc_opt} if self.disc_opt is not None else {}

    def generator_terms(self, rec: torch.Tensor, recon: torch.Tensor, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        from .losses import adaptive_gan_weight, hinge_g_loss

        parts = {}
        if self.lpips is not None:
            p = self.lpips(recon, images).mean()
            rec = rec + self.cfg.perceptual * p
            parts["lpips"] = float(p.detach())
        if self.disc is not None and step >= self.cfg.gan_start:
            g = hinge_g_loss(self.disc(recon))
            w = adaptive_gan_weight(rec, g, self.tok.decoder.last_layer)
            rec = rec + self.cfg.gan * w * g
            parts["gan_g"] = float(g.detach())
        return rec, parts

    def discriminator_step(self, fake: torch.Tensor, real: torch.Tensor, step: int, lr: float) -> dict:
        from .losses import hinge_d_loss

        if self.disc is None or step < self.cfg.gan_start:
            return {}
        for g in self.disc_opt.param_groups:
            g["lr"] = lr
        d = hinge_d_loss(self.disc(real), self.disc(fake))
        self.disc_opt.zero_grad(set_to_none=True)
        d.backward()
        self.disc_opt.step()
        return {"gan_d": float(d.detach())}


@torch.no_grad()
def _write_grid(tok: UniCodeTokenizer, images: torch.Tensor, path: Path, writer, step: int) -> None:
    was = tok.training
    tok.eval()
    recon = tok.decode(tok.encode(images))
    tok.train(was)
    grid = image_grid([images, recon], labels=["input", "recon"])
    grid.save(path)
    import numpy as np

    writer.add_image("reconstructions", np.asarray(grid), step, dataformats="HWC")


def train_tokenizer_from_files(config: str | Path, overrides: list[str], data: str | Path, out: str | Path,
                               resume: bool = False, progress: bool = True) -> Stage1Result:
    """CLI entry: on ``--resume`` the run's own config.yaml is the base unless one is given."""
    run = Path(out)
    if resume and config is None and (run / "config.yaml").exists():
        config = run / "config.yaml"
    cfg = load_config(config or "tiny", overrides)
    return train_tokenizer(cfg, data, out, resume=resume, progress=progress)
