"""Stage I recipe: train the UniCode visual tokenizer by image reconstruction.

Life cycle: setup (run folder, data, model, optimizer) → train (tqdm, metrics.jsonl,
TensorBoard, grids, atomic checkpoints) → final eval on the validation split → save.

The run folder is itself a tokenizer folder (``load_tokenizer(RUN)`` works) and holds
``checkpoints/`` for ``--resume``, which continues the same run exactly: data order, restarts
and the learning-rate schedule are functions of (seed, step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config, load_config, save_config
from ..data.sources import image_source
from ..errors import UnicodebookError
from ..eval.metrics import CodeUsage, psnr
from ..eval.plots import image_grid, plot_curves
from ..tokenizers.unicode import UniCodeTokenizer, build_tokenizer, save_tokenizer
from ..tokenizers.unicode.model import reconstruction_loss
from .checkpoint import check_resume, load_checkpoint
from .engine import Engine, NonFiniteError, NonFiniteGuard, save_training_checkpoint
from .runlog import RunLog


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
    main: bool = True  # the main process of the run (the one that reports)


def train_tokenizer(cfg: Config, data: str | Path, out: str | Path, resume: bool = False,
                    progress: bool = True, val_split: str | None = "val") -> Stage1Result:
    """Stage I of the family ``cfg.model.family`` names: each family's tokenizer has its own recipe."""
    if cfg.model.family == "seed":
        from .seed import train_seed_tokenizer

        return train_seed_tokenizer(cfg, data, out, resume=resume, progress=progress, val_split=val_split)
    return train_unicode_tokenizer(cfg, data, out, resume=resume, progress=progress, val_split=val_split)


def train_unicode_tokenizer(cfg: Config, data: str | Path, out: str | Path, resume: bool = False,
                            progress: bool = True, val_split: str | None = "val") -> Stage1Result:
    """Run UniCode's stage I. ``data``: a shapes-world root (uses ``train``/``val``), an image folder, or
    WebDataset tar shards (a folder of ``*.tar``, one ``.tar`` or a ``{000..011}`` pattern).

    Runs as one process or as every rank of a distributed launch (``torchrun``/``accelerate
    launch``): ``train_tokenizer.batch_size`` is the global batch; the main process writes
    the run folder.
    """
    tc = cfg.train_tokenizer
    run = Path(out)
    if cfg.model.family != "unicode" or tc.phases:
        raise UnicodebookError(f"this recipe trains a UniCode tokenizer in one phase, not a {cfg.model.family} one"
                               + (" with train_tokenizer.phases" if tc.phases else ""))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    engine = Engine()
    if engine.shards_parameters:
        raise UnicodebookError("stage I runs on DDP, not FSDP: the autoencoder is small and the quantizer keeps whole "
                               "codebook statistics on every rank (launch it with configs/accelerate/ddp_8gpu.yaml)")
    main = engine.is_main
    if cfg.loss.gan > 0 and engine.world > 1:
        raise UnicodebookError("loss.gan > 0 (the adaptive GAN weight) runs in one process only")

    # ------------------------------------------------------------------ setup
    ckpts = check_resume(run, cfg, resume)
    engine.barrier()  # every rank has checked before the main process writes
    if main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")

    torch.manual_seed(tc.seed)
    source = image_source(data, cfg, engine, progress=progress and main)
    tok = build_tokenizer(cfg, seed=tc.seed)
    tok.set_gradient_checkpointing(tc.gradient_checkpointing)
    tok.train()
    opt = torch.optim.AdamW(tok.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    aux = AuxLosses(cfg, tok, engine.device)
    modules, optimizers = {"model": tok, **aux.modules()}, {"model": opt, **aux.optimizers()}
    start = 0
    bad_images = source.bad_at_start
    if resume:
        state = load_checkpoint(ckpts[-1], modules, optimizers, kind="tokenizer", rank=engine.rank)
        start, bad_images = state["step"], state.get("bad_images", bad_images)
        if cfg.model.codebook.mode == "dual":
            tok.codebook.write_to_llm()  # the LLM rows as they were at that step
    model, opt = engine.prepare(tok, opt)
    optimizers["model"] = opt
    loader = source.batches(start, tc.steps)
    guard = NonFiniteGuard(tc.max_nonfinite, "stage I", run)

    log = RunLog(run, start, resume, enabled=main)
    fixed = source.fixed(8)
    if main:
        (run / "samples").mkdir(exist_ok=True)

    bad_here = 0  # bad images this process met since the start (summed over ranks when reported)

    def bad_total() -> int:
        return bad_images + int(engine.sum(bad_here))

    def checkpoint(at: int) -> None:
        states = {"model": engine.state_dict(model), **{k: m.state_dict() for k, m in aux.modules().items()}}
        save_training_checkpoint(engine, run, at, states, optimizers, {"bad_images": bad_total()}, tc.keep_last,
                                 "tokenizer", model)
        if main:
            save_tokenizer(tok, run)

    # ------------------------------------------------------------------ train
    t0, last, restarted = time.time(), {}, 0
    usage = CodeUsage(tok.codebook.num_codes, tok.depth if tok.kind == "rq" else 2 * tok.depth)
    bar = tqdm(total=tc.steps, initial=start, desc="stage I", disable=not (progress and main), dynamic_ncols=True)
    step = start
    for images, n_bad in loader:
        bad_here += int(n_bad)
        if images.numel() == 0:
            step += 1
            bar.update(1)
            continue
        images = images.to(engine.device)
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        with engine.autocast(tc.precision):
            out = model(images)
        recon = out.recon.float()
        rec, parts = reconstruction_loss(recon, images, cfg.loss.l1, cfg.loss.l2)
        rec, aux_parts = aux.generator_terms(rec, recon, images, step)
        loss = rec + out.commit_loss
        opt.zero_grad(set_to_none=True)
        engine.backward(loss)
        skipped = engine.clip_and_check(loss, list(tok.parameters()), tc.grad_clip)
        update = tok.quantizer.pop_updates()
        if skipped is None:
            opt.step()
            parts.update(aux_parts, **aux.discriminator_step(recon.detach(), images, step, lr))
            if update is not None:
                gen = torch.Generator().manual_seed(tc.seed * 7_919 + step)
                restarted += tok.codebook.update(*update, progress=(step + 1) / tc.steps, step=step, generator=gen)
            layers, _ = tok.code_layers(out.codes)
            usage.update(engine.gather(layers).flatten(0, 1))  # the global batch's codes
        else:
            opt.zero_grad(set_to_none=True)
            log.write({"step": step + 1, "skipped": skipped})
        try:
            guard.record(skipped, step + 1)
        except NonFiniteError:
            log.close()  # the metrics so far stay readable; the checkpoints are untouched
            raise
        step += 1
        bar.update(1)

        if step % tc.log_every == 0 or step == tc.steps:
            st = usage.stats()
            usage.reset()
            mean = engine.mean_over_ranks
            last = {
                "step": step, "loss": mean(loss), "quant_loss": mean(out.commit_loss),
                **({"usage_entropy": mean(out.usage_loss)} if out.usage_loss is not None else {}),
                **{k: mean(v) for k, v in parts.items()},
                "psnr": mean(psnr(recon.detach().clamp(0, 1), images).mean()),
                "usage": round(sum(st["usage"]) / len(st["usage"]), 4), "usage_per_layer": st["usage"],
                "perplexity": st["perplexity"], "lr": lr, "bad_images": bad_total(), "skipped_steps": guard.total,
                "restarted_codes": restarted,
                "codebook_cosine_llm": tok.codebook.alignment()["cosine"], "elapsed_s": round(time.time() - t0, 2),
            }
            if engine.world > 1 and step == tc.steps:  # the invariant of a distributed run, checked
                last["codebook_rank_max_diff"] = engine.max_diff_from_main(tok.codebook.embed, tok.codebook.ema_count)
            log.write(last, scalars=True)
            bar.set_postfix(loss=f"{last['loss']:.4f}", psnr=f"{last['psnr']:.1f}", usage=f"{last['usage']:.0%}")
        if main and tc.grid_every and (step % tc.grid_every == 0 or step == tc.steps):
            _write_grid(tok, fixed, run / "samples" / f"recon_{step:07d}.png", log.writer, step)
        if tc.save_every and step % tc.save_every == 0 and step < tc.steps:
            checkpoint(step)
    bar.close()

    # ------------------------------------------------------------------ finish
    checkpoint(step)
    tok.eval()
    val = None
    if main:
        _write_grid(tok, fixed, run / "reconstructions.png", log.writer, step)
        if source.val_root is not None and val_split and (source.val_root / val_split).is_dir():
            from ..eval.tokenizer import evaluate_tokenizer

            val = evaluate_tokenizer(tok, source.val_root, split=val_split, progress=progress,
                                     usage_plot=run / "codebook_usage.png")
            log.write({"step": step, "split": val_split, **val})
            for k in ("psnr", "ssim", "usage_mean"):
                log.writer.add_scalar(f"{val_split}/{k}", val[k], step)
    log.close()
    if main:
        plot_curves(run / "metrics.jsonl", run / "curves.png")
    engine.barrier()
    return Stage1Result(run, step, last, val, time.time() - t0, main)


class AuxLosses:
    """The optional perceptual (LPIPS) and adversarial (PatchGAN, hinge) terms of stage I.

    Both are off unless their weight is > 0. LPIPS loads VGG16 and LPIPS weights from local
    files; the discriminator starts at ``loss.gan_start`` with taming's adaptive weight.
    """

    def __init__(self, cfg: Config, tok: UniCodeTokenizer, device: torch.device | str = "cpu"):
        from .losses import LPIPS, PatchDiscriminator, disc_layers_for_size

        lc, tc = cfg.loss, cfg.train_tokenizer
        self.cfg, self.tok = lc, tok
        self.lpips = None
        if lc.perceptual > 0:
            if not lc.perceptual_vgg or not lc.perceptual_lin:
                raise UnicodebookError("loss.perceptual > 0 needs loss.perceptual_vgg and loss.perceptual_lin (local weight files)")
            try:
                self.lpips = LPIPS.from_pretrained(lc.perceptual_vgg, lc.perceptual_lin).to(device)
            except ValueError as e:
                raise UnicodebookError(str(e)) from None
        self.disc = self.disc_opt = None
        if lc.gan > 0:
            self.disc = PatchDiscriminator(n_layers=disc_layers_for_size(cfg.model.image_size)).to(device)
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
    recon = tok.decode(tok.encode(images)).cpu()
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
    return train_tokenizer(load_config(config or "tiny", overrides), data, out, resume=resume, progress=progress)
