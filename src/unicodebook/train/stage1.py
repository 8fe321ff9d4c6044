"""Stage I recipe: train the UniCode visual tokenizer by image reconstruction.

``Stage1Recipe`` is the run in parts: its construction is the setup (run folder, data, model,
optimizer); ``train_step`` is one step; ``checkpoint`` writes an atomic checkpoint; ``run``
loops (tqdm, metrics.jsonl, TensorBoard, grids) and finishes (the validation split's
evaluation, curves). Other families' stage I recipes live beside it (``train/seed.py``).

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
from ..data.augment import augment_batch
from ..data.sources import image_source
from ..errors import UnicodebookError
from ..eval.metrics import CodeUsage, psnr
from ..eval.plots import image_grid, plot_curves
from ..tokenizers.unicode import UniCodeTokenizer, build_tokenizer, save_tokenizer
from ..tokenizers.unicode.model import reconstruction_loss
from ..utils.modules import eval_mode
from .checkpoint import check_resume, load_checkpoint, run_lock, write_errors
from .engine import Engine, NonFiniteError, NonFiniteGuard, StopOnSigterm, save_training_checkpoint
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


def train_tokenizer(
    cfg: Config,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    val_split: str | None = "val",
) -> Stage1Result:
    """Stage I of the family ``cfg.model.family`` names: each family's tokenizer has its own recipe;
    the run folder is locked while it trains (:func:`~unicodebook.train.checkpoint.run_lock`)."""
    with run_lock(Path(out)):
        return _train_family(cfg, data, out, resume, progress, val_split)


def _train_family(cfg: Config, data, out, resume: bool, progress: bool, val_split: str | None) -> Stage1Result:
    if cfg.model.family == "seed":
        from .seed import train_seed_tokenizer

        return train_seed_tokenizer(cfg, data, out, resume=resume, progress=progress, val_split=val_split)
    if cfg.model.family == "lavit":
        from .lavit import train_lavit_tokenizer

        return train_lavit_tokenizer(cfg, data, out, resume=resume, progress=progress, val_split=val_split)
    return train_unicode_tokenizer(cfg, data, out, resume=resume, progress=progress, val_split=val_split)


def train_unicode_tokenizer(
    cfg: Config,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    val_split: str | None = "val",
) -> Stage1Result:
    """Run UniCode's stage I (``Stage1Recipe``). ``data``: a shapes-world root (uses
    ``train``/``val``), an image folder, or WebDataset tar shards (a folder of ``*.tar``, one
    ``.tar`` or a ``{000..011}`` pattern)."""
    return Stage1Recipe(cfg, data, out, resume=resume, progress=progress, val_split=val_split).run()


class Stage1Recipe:
    """One UniCode stage I run, in parts: construction is the setup (run folder, data, model,
    optimizers, restored on resume); ``train_step`` is one step; ``checkpoint`` saves (and the run
    folder is a tokenizer folder after each); ``run`` is the loop and the finish (validation,
    grids, curves).

    Runs as one process or as every rank of a distributed launch (``torchrun``/``accelerate
    launch``): ``train_tokenizer.batch_size`` is the global batch; the main process writes the
    run folder.
    """

    def __init__(
        self,
        cfg: Config,
        data: str | Path,
        out: str | Path,
        resume: bool = False,
        progress: bool = True,
        val_split: str | None = "val",
    ):
        self.cfg, self.tc = cfg, cfg.train_tokenizer
        tc = self.tc
        self.run_dir, self.progress, self.val_split = Path(out), progress, val_split
        if cfg.model.family != "unicode" or tc.phases:
            raise UnicodebookError(
                f"this recipe trains a UniCode tokenizer in one phase, not a {cfg.model.family} one"
                + (" with train_tokenizer.phases" if tc.phases else "")
            )
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.engine = engine = Engine()
        if engine.shards_parameters:
            raise UnicodebookError(
                "stage I runs on DDP, not FSDP: the autoencoder is small and the quantizer keeps "
                "whole codebook statistics on every rank (launch it with configs/accelerate/ddp_8gpu.yaml)"
            )
        self.main = engine.is_main
        if cfg.loss.gan > 0 and engine.world > 1:
            raise UnicodebookError("loss.gan > 0 (the adaptive GAN weight) runs in one process only")

        ckpts = check_resume(self.run_dir, cfg, resume)
        engine.barrier()  # every rank has checked before the main process writes
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        torch.manual_seed(tc.seed)
        self.source = image_source(data, cfg, engine, progress=progress and self.main)
        self.visual_tok = visual_tok = build_tokenizer(cfg, seed=tc.seed)
        check_enough_vectors(self.source, visual_tok)
        visual_tok.set_gradient_checkpointing(tc.gradient_checkpointing)
        visual_tok.train()
        self.start = self._optimizers(ckpts, resume)
        self.loader = self.source.batches(self.start, tc.steps)
        self.guard = NonFiniteGuard(tc.max_nonfinite, "stage I", self.run_dir)
        self.log = RunLog(self.run_dir, self.start, resume, enabled=self.main)
        self.fixed = self.source.fixed(8)  # the images of the reconstruction grids
        if self.main:
            (self.run_dir / "samples").mkdir(exist_ok=True)
        self.bad_here = 0  # bad images this process met since the start (summed over ranks when reported)
        self.restarted = 0
        self.usage = CodeUsage(visual_tok.codebook.num_codes, len(visual_tok.quantizer.layer_names))

    def _optimizers(self, ckpts, resume: bool) -> int:
        """AdamW for the tokenizer (and the discriminator's, with the optional losses), prepared
        for the engine and restored on resume; returns the first step to train."""
        tc, engine, visual_tok = self.tc, self.engine, self.visual_tok
        opt = torch.optim.AdamW(visual_tok.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        self.aux = AuxLosses(self.cfg, visual_tok, engine.device)
        self.modules = {"model": visual_tok, **self.aux.modules()}
        self.optimizers = {"model": opt, **self.aux.optimizers()}
        start = 0
        self.bad_images = self.source.bad_at_start
        if resume:
            state = load_checkpoint(ckpts[-1], self.modules, self.optimizers, kind="tokenizer", rank=engine.rank)
            start, self.bad_images = state["step"], state.get("bad_images", self.bad_images)
            if self.cfg.model.codebook.mode == "dual":
                visual_tok.codebook.write_to_llm()  # the LLM rows as they were at that step
        self.model, self.opt = engine.prepare(visual_tok, opt)
        self.optimizers["model"] = self.opt
        return start

    def bad_total(self) -> int:
        return self.bad_images + int(self.engine.sum(self.bad_here))

    def checkpoint(self, at: int) -> None:
        """An atomic checkpoint of step ``at``; the run folder is then a tokenizer folder of it."""
        engine, aux = self.engine, self.aux
        states = {"model": engine.state_dict(self.model), **{k: m.state_dict() for k, m in aux.modules().items()}}
        save_training_checkpoint(
            engine,
            self.run_dir,
            at,
            states,
            self.optimizers,
            {"bad_images": self.bad_total()},
            self.tc.keep_last,
            "tokenizer",
            self.model,
        )
        if self.main:
            with write_errors(self.run_dir, f"the tokenizer in {self.run_dir}"):
                save_tokenizer(self.visual_tok, self.run_dir)

    def train_step(self, step: int, images: torch.Tensor) -> dict:
        """One optimizer step on ``images`` (codebook updates and restarts included); returns
        what the step's log row is made of."""
        tc, engine, visual_tok, opt, aux = self.tc, self.engine, self.visual_tok, self.opt, self.aux
        n = images.shape[0]  # this rank's slice of the global batch
        images = augment_batch(
            images.to(engine.device), tc.augment, tc.seed, step, first=engine.rank * n, total=engine.world * n
        )
        lr = lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        with engine.autocast(tc.precision):
            out = self.model(images)
        recon = out.recon.float()
        rec, parts = reconstruction_loss(recon, images, self.cfg.loss.l1, self.cfg.loss.l2)
        rec, aux_parts = aux.generator_terms(rec, recon, images, step)
        loss = rec + out.commit_loss
        opt.zero_grad(set_to_none=True)
        engine.backward(loss)
        skipped = engine.clip_and_check(loss, list(visual_tok.parameters()), tc.grad_clip)
        update = visual_tok.quantizer.pop_updates()
        if skipped is None:
            opt.step()
            parts.update(aux_parts, **aux.discriminator_step(recon.detach(), images, step, lr))
            if update is not None:
                gen = torch.Generator().manual_seed(tc.seed * 7_919 + step)
                self.restarted += visual_tok.codebook.update(
                    *update, progress=(step + 1) / tc.steps, step=step, generator=gen
                )
            layers, _ = visual_tok.code_layers(out.codes)
            self.usage.update(engine.gather(layers).flatten(0, 1))  # the global batch's codes
        else:
            opt.zero_grad(set_to_none=True)
            self.log.write({"step": step + 1, "skipped": skipped})
        try:
            self.guard.record(skipped, step + 1)
        except NonFiniteError:
            self.log.close()  # the metrics so far stay readable; the checkpoints are untouched
            raise
        return {"loss": loss, "out": out, "parts": parts, "recon": recon, "images": images, "lr": lr}

    def _log(self, step: int, s: dict, t0: float) -> dict:
        engine, visual_tok, out = self.engine, self.visual_tok, s["out"]
        st = self.usage.stats()
        self.usage.reset()
        mean = engine.mean_over_ranks
        row = {
            "step": step,
            "loss": mean(s["loss"]),
            "quant_loss": mean(out.commit_loss),
            **({"usage_entropy": mean(out.usage_loss)} if out.usage_loss is not None else {}),
            **{k: mean(v) for k, v in s["parts"].items()},
            "psnr": mean(psnr(s["recon"].detach().clamp(0, 1), s["images"]).mean()),
            "usage": round(sum(st["usage"]) / len(st["usage"]), 4),
            "usage_per_layer": st["usage"],
            "perplexity": st["perplexity"],
            "lr": s["lr"],
            "bad_images": self.bad_total(),
            "skipped_steps": self.guard.total,
            "restarted_codes": self.restarted,
            "codebook_cosine_llm": visual_tok.codebook.alignment()["cosine"],
            "elapsed_s": round(time.time() - t0, 2),
        }
        if engine.world > 1 and step == self.tc.steps:  # the invariant of a distributed run, checked
            row["codebook_rank_max_diff"] = engine.max_diff_from_main(
                visual_tok.codebook.embed, visual_tok.codebook.ema_count
            )
        self.log.write(row, scalars=True)
        return row

    def run(self) -> Stage1Result:
        tc, main = self.tc, self.main
        t0, last = time.time(), {}
        bar = tqdm(
            total=tc.steps, initial=self.start, desc="stage I", disable=not (self.progress and main), dynamic_ncols=True
        )
        step = self.start
        with StopOnSigterm(self.engine) as sigterm:
            for images, n_bad in self.loader:
                self.bad_here += int(n_bad)
                if images.numel() == 0:  # every image of the batch was bad
                    step += 1
                    bar.update(1)
                    continue
                s = self.train_step(step, images)
                step += 1
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.steps:
                    last = self._log(step, s, t0)
                    bar.set_postfix(
                        loss=f"{last['loss']:.4f}", psnr=f"{last['psnr']:.1f}", usage=f"{last['usage']:.0%}"
                    )
                if main and tc.grid_every and (step % tc.grid_every == 0 or step == tc.steps):
                    _write_grid(
                        self.visual_tok,
                        self.fixed,
                        self.run_dir / "samples" / f"recon_{step:07d}.png",
                        self.log.writer,
                        step,
                    )
                if step < tc.steps and sigterm.requested():
                    bar.close()
                    self.checkpoint(step)
                    self.log.close()
                    raise sigterm.stop("stage I", step, tc.steps, self.run_dir)
                if tc.save_every and step % tc.save_every == 0 and step < tc.steps:
                    self.checkpoint(step)
        bar.close()
        self.checkpoint(step)
        val = self._finish(step)
        self.engine.barrier()
        return Stage1Result(self.run_dir, step, last, val, time.time() - t0, main)

    def _finish(self, step: int) -> dict | None:
        """The final grid, the validation split's evaluation and the curves (main process)."""
        visual_tok, run, log = self.visual_tok, self.run_dir, self.log
        visual_tok.eval()
        val = None
        if self.main:
            _write_grid(visual_tok, self.fixed, run / "reconstructions.png", log.writer, step)
            root, split = self.source.val_root, self.val_split
            if root is not None and split and (root / split).is_dir():
                from ..eval.tokenizer import evaluate_tokenizer

                val = evaluate_tokenizer(
                    visual_tok, root, split=split, progress=self.progress, usage_plot=run / "codebook_usage.png"
                )
                log.write({"step": step, "split": split, **val})
                for k in ("psnr", "ssim", "usage_mean"):
                    log.writer.add_scalar(f"{split}/{k}", val[k], step)
        log.close()
        if self.main:
            plot_curves(run / "metrics.jsonl", run / "curves.png")
        return val


class AuxLosses:
    """The optional perceptual (LPIPS) and adversarial (PatchGAN, hinge) terms of stage I.

    Both are off unless their weight is > 0. LPIPS loads VGG16 and LPIPS weights from local
    files; the discriminator starts at ``loss.gan_start`` with taming's adaptive weight.
    """

    def __init__(self, cfg: Config, visual_tok: UniCodeTokenizer, device: torch.device | str = "cpu"):
        from .losses import LPIPS, PatchDiscriminator, disc_layers_for_size

        loss_cfg, tc = cfg.loss, cfg.train_tokenizer
        self.cfg, self.visual_tok = loss_cfg, visual_tok
        self.lpips = None
        if loss_cfg.perceptual > 0:
            if not loss_cfg.perceptual_vgg or not loss_cfg.perceptual_lin:
                raise UnicodebookError(
                    "loss.perceptual > 0 needs loss.perceptual_vgg and loss.perceptual_lin (local weight files)"
                )
            try:
                self.lpips = LPIPS.from_pretrained(loss_cfg.perceptual_vgg, loss_cfg.perceptual_lin).to(device)
            except ValueError as e:
                raise UnicodebookError(str(e)) from None
        self.disc = self.disc_opt = None
        if loss_cfg.gan > 0:
            self.disc = PatchDiscriminator(n_layers=disc_layers_for_size(cfg.model.image_size)).to(device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=tc.lr, betas=(0.5, 0.9), weight_decay=0.0)

    def modules(self) -> dict:
        return {"discriminator": self.disc} if self.disc is not None else {}

    def optimizers(self) -> dict:
        return {"discriminator": self.disc_opt} if self.disc_opt is not None else {}

    def generator_terms(
        self, rec: torch.Tensor, recon: torch.Tensor, images: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict]:
        from .losses import adaptive_gan_weight, hinge_g_loss

        parts = {}
        if self.lpips is not None:
            p = self.lpips(recon, images).mean()
            rec = rec + self.cfg.perceptual * p
            parts["lpips"] = float(p.detach())
        if self.disc is not None and step >= self.cfg.gan_start:
            gan_loss = hinge_g_loss(self.disc(recon))
            w = adaptive_gan_weight(rec, gan_loss, self.visual_tok.decoder.last_layer)
            rec = rec + self.cfg.gan * w * gan_loss
            parts["gan_g"] = float(gan_loss.detach())
        return rec, parts

    def discriminator_step(self, fake: torch.Tensor, real: torch.Tensor, step: int, lr: float) -> dict:
        from .losses import hinge_d_loss

        if self.disc is None or step < self.cfg.gan_start:
            return {}
        for group in self.disc_opt.param_groups:
            group["lr"] = lr
        d = hinge_d_loss(self.disc(real), self.disc(fake))
        self.disc_opt.zero_grad(set_to_none=True)
        d.backward()
        self.disc_opt.step()
        return {"gan_d": float(d.detach())}


@torch.no_grad()
def check_enough_vectors(source, visual_tok: UniCodeTokenizer) -> None:
    """A folder whose images hold fewer latent vectors than a code layer has rows can never use
    the codebook (k-means would start most rows on copies of one another): one error line."""
    dataset = getattr(source, "dataset", None)  # a folder; shards are streamed, their size unknown
    if dataset is None or visual_tok.codebook.mode == "frozen":
        return
    n_images = len(dataset)  # the readable ones when preloaded
    vectors = n_images * visual_tok.num_latents
    rows = visual_tok.codebook.num_codes // visual_tok.codebook.groups
    if vectors < rows:
        raise UnicodebookError(
            f"{n_images} training images give {vectors} latent vectors ({visual_tok.num_latents} each), "
            f"fewer than the {rows} codebook rows a code layer has: add images or lower "
            f"model.codebook.num_rows"
        )


def _write_grid(visual_tok: UniCodeTokenizer, images: torch.Tensor, path: Path, writer, step: int) -> None:
    with eval_mode(visual_tok):
        recon = visual_tok.decode(visual_tok.encode(images)).cpu()
    grid = image_grid([images, recon], labels=["input", "recon"])
    grid.save(path)
    import numpy as np

    writer.add_image("reconstructions", np.asarray(grid), step, dataformats="HWC")


def train_tokenizer_from_files(
    config: str | Path,
    overrides: list[str],
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> Stage1Result:
    """CLI entry: on ``--resume`` the run's own config.yaml is the base unless one is given."""
    run = Path(out)
    if resume and config is None and (run / "config.yaml").exists():
        config = run / "config.yaml"
    return train_tokenizer(load_config(config or "tiny", overrides), data, out, resume=resume, progress=progress)
