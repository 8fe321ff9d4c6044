"""Benchmark 7: the visual tokenizer on natural photographs against classic VQ at equal bits.

One run, one photo set (``unicodebook.data.photos``: crops of the photographs scikit-image and
matplotlib ship; train, val and test crops from *different* photographs), written by the
benchmark itself. At each budget — D code layers over the preset's 9×9 grid of 512 rows, i.e.
81·D·9 bits per image — it measures on the held-out test crops:

* residual k-means VQ of the pixel patches under one code cell (4×4 at 36 px): D stages of
  512 codewords, fitted on the train crops (D = 1 is classic single-stage k-means VQ), and the
  same with one table of 512 shared by the D stages (what ``layer_rows: shared`` is);
* the project's tokenizer, trained by ``train_tokenizer`` with ``model.quantizer.depth = D``;
* at the largest budget, the unified codebook's paradigms side by side: ``iterative`` (the
  preset: codes pulled onto the LLM's rows), ``frozen`` (the LLM's rows as they are) and
  ``dual`` (a free codebook, copied into the LLM's rows).

PSNR and SSIM are the means over test images (``unicodebook.eval.metrics``), as
``unicodebook eval tokenizer`` reports them.

    pip install scikit-image        # the photographs (the bench extra has it)
    python bench/rate_distortion.py --out runs/rd [--depths 1 2 4] [--steps 1200] [--json out.json]
        [--config tiny] [--set KEY=VALUE ...]    # tokenizer overrides, e.g. model.codebook.mode=dual
    python bench/rate_distortion.py --config photos     # the natural-photo preset (split rows: 512 a layer)
        [--skip-kmeans]    # the tokenizer rows only, e.g. for a lever: --set train_tokenizer.augment=dihedral

It writes ``OUT/test_crops.png``: eight test crops and their reconstructions by every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_json

from unicodebook.config import load_config
from unicodebook.data.photos import write_photo_set
from unicodebook.eval.metrics import psnr, ssim
from unicodebook.eval.plots import image_grid
from unicodebook.eval.tokenizer import evaluate_tokenizer
from unicodebook.tokenizers.base import load_tokenizer
from unicodebook.train.stage1 import train_tokenizer


# ------------------------------------------------------------------------------ classic VQ
def load_split(root: Path, split: str) -> torch.Tensor:
    """(N, 3, S, S) floats in [0, 1]."""
    files = sorted((root / split / "images").glob("*.png"))
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """(N, 3, S, S) → (N·(S/p)², 3·p·p)."""
    n, c, s, _ = images.shape
    x = images.reshape(n, c, s // p, p, s // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c * p * p)


def unpatch(x: torch.Tensor, n: int, s: int, p: int) -> torch.Tensor:
    return x.reshape(n, s // p, s // p, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, 3, s, s)


def nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    c2 = c.pow(2).sum(1)
    return torch.cat([(c2 - 2 * xs @ c.t()).argmin(1) for xs in x.split(chunk)])


def kmeans(x: torch.Tensor, k: int, iters: int, g: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from k distinct random points; an emptied cluster restarts at a random point."""
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        a = nearest(x, c)
        counts = torch.bincount(a, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, a, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None])
        if bool(empty.any()):
            c[empty] = x[torch.randint(x.shape[0], (int(empty.sum()),), generator=g)]
    return c


def residual_kmeans(
    train: torch.Tensor, test: torch.Tensor, depth: int, k: int, p: int, iters: int, max_patches: int, seed: int
) -> list[torch.Tensor]:
    """Test reconstructions after 1, 2, …, ``depth`` stages of ``k`` codewords each."""
    g = torch.Generator().manual_seed(seed)
    xt = patches(train, p)
    xt = xt[torch.randperm(xt.shape[0], generator=g)[:max_patches]]
    xs = patches(test, p)
    rec, out = torch.zeros_like(xs), []
    for _ in range(depth):
        c = kmeans(xt, k, iters, g)
        xt = xt - c[nearest(xt, c)]
        rec = rec + c[nearest(xs - rec, c)]
        out.append(unpatch(rec, test.shape[0], test.shape[-1], p).clamp(0, 1))
    return out


def shared_residual_kmeans(
    train: torch.Tensor, test: torch.Tensor, depth: int, k: int, p: int, iters: int, max_patches: int, seed: int
) -> list[torch.Tensor]:
    """Residual VQ whose ``depth`` stages share ONE table of ``k`` codewords (as the unified
    codebook's ``layer_rows: shared``): started at k-means of the patches, then Lloyd steps in
    which every codeword moves to the mean of the residuals it was assigned at any stage."""
    g = torch.Generator().manual_seed(seed)
    xt = patches(train, p)
    xt = xt[torch.randperm(xt.shape[0], generator=g)[:max_patches]]
    c = kmeans(xt, k, iters, g)
    for _ in range(iters):
        r, sums, counts = xt, torch.zeros_like(c), torch.zeros(k)
        for _ in range(depth):
            a = nearest(r, c)
            sums.index_add_(0, a, r)
            counts += torch.bincount(a, minlength=k).float()
            r = r - c[a]
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
    xs = patches(test, p)
    rec, out = torch.zeros_like(xs), []
    for _ in range(depth):
        rec = rec + c[nearest(xs - rec, c)]
        out.append(unpatch(rec, test.shape[0], test.shape[-1], p).clamp(0, 1))
    return out


# ------------------------------------------------------------------------------ the tokenizer
def grid_picks(test: torch.Tensor, n: int = 8) -> torch.Tensor:
    """``n`` test crops spread over the split (its photos are written one after another)."""
    return torch.linspace(0, test.shape[0] - 1, n).round().long()


def tokenizer_row(
    root: Path, run: Path, cfg_name: str, overrides: list[str], shown: torch.Tensor
) -> tuple[dict, torch.Tensor]:
    """Train at ``run``; the test figures, and the reconstructions of the ``shown`` crops."""
    cfg = load_config(cfg_name, overrides)
    t0 = time.time()
    res = train_tokenizer(cfg, root, run, progress=False)
    seconds = time.time() - t0
    visual_tok = load_tokenizer(run)
    ev = evaluate_tokenizer(visual_tok, root, split="test", progress=False)
    with torch.no_grad():
        recon = visual_tok.eval().decode(visual_tok.encode(shown.to(visual_tok.device))).clamp(0, 1).cpu()
    return {
        "psnr": ev["psnr"],
        "ssim": ev["ssim"],
        "usage": ev.get("usage_all"),
        "train_s": round(seconds),
        "train_psnr": res.final.get("psnr"),
    }, recon


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/rd"))
    p.add_argument("--config", default="tiny", help="the tokenizer's preset (its geometry sets the budgets)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="tokenizer overrides")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--bits",
        type=int,
        nargs="+",
        help="budgets in bits per image instead of --depths "
        "(each a multiple of the code grid's positions × bits a code)",
    )
    p.add_argument("--steps", type=int, default=None, help="stage I steps (default: the preset's)")
    p.add_argument(
        "--paradigms",
        nargs="*",
        default=["iterative", "frozen", "dual"],
        help="codebook modes compared at the largest budget",
    )
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--kmeans-iters", type=int, default=25)
    p.add_argument("--kmeans-patches", type=int, default=300_000)
    p.add_argument("--skip-tokenizer", action="store_true", help="the k-means rows only")
    p.add_argument(
        "--skip-kmeans",
        action="store_true",
        help="the tokenizer rows only (the k-means rows depend on the photo set and seed alone)",
    )
    p.add_argument("--json")
    args = p.parse_args()

    cfg = load_config(args.config, args.set)
    qc, cb = cfg.model.quantizer, cfg.model.codebook
    split = qc.layer_rows == "split"  # each layer its own num_rows/depth rows: a code carries log2 of that
    n_rows = cb.num_rows if cb.num_rows is not None else cfg.llm.vocab_size - cb.row_offset
    size, rows_k = cfg.model.image_size, n_rows // qc.depth if split else n_rows  # codewords a layer
    side = size // 2 ** (len(cfg.model.autoencoder.ch_mult) - 1)
    cell = size // side
    per_layer = side * side * int(np.log2(rows_k))  # bits of one code layer over the grid
    if args.bits:
        bad = [b for b in args.bits if b < per_layer or b % per_layer]
        if bad:
            raise SystemExit(
                f"error: a budget of {bad[0]} bits does not divide the {side}×{side} code grid "
                f"at {int(np.log2(rows_k))} bits a code: "
                f"use multiples of {per_layer} ({per_layer}, {2 * per_layer}, {4 * per_layer}, …)"
            )
        args.depths = sorted({b // per_layer for b in args.bits})
    bits = {d: per_layer * d for d in args.depths}
    root = args.out / f"photos{size}"
    if not (root / "meta.json").exists():
        write_photo_set(root, size=size, n_train=args.n_train, n_test=args.n_test)
    meta = json.loads((root / "meta.json").read_text())
    train, test = load_split(root, "train"), load_split(root, "test")
    print(
        f"photo set {root}: {len(train)} train crops of {', '.join(meta['photos']['train'])}; "
        f"{len(test)} test crops of {', '.join(meta['photos']['test'])}"
    )

    raw: dict = {"set": meta, "budgets": bits, "rows": []}
    picks = grid_picks(test)
    grid = [(0, "test crop", test[picks])]  # (bits, label, reconstructions): a row of the picture each
    fits = [] if args.skip_kmeans else [("residual k-means VQ", residual_kmeans)]
    if max(args.depths) > 1 and not args.skip_kmeans:
        fits.append(("residual k-means VQ, one shared codebook", shared_residual_kmeans))
    for name, fit in fits:
        t0 = time.time()
        recs = fit(train, test, max(args.depths), rows_k, cell, args.kmeans_iters, args.kmeans_patches, 0)
        km_s = time.time() - t0
        for d in args.depths:
            if d == 1 and fit is shared_residual_kmeans:
                continue  # one stage: the same as the row above
            r = recs[d - 1]
            grid.append((bits[d], f"{'shared ' * (fit is shared_residual_kmeans)}k-means, {bits[d]} bits", r[picks]))
            raw["rows"].append(
                {
                    "method": "k-means VQ" if d == 1 else name,
                    "depth": d,
                    "bits": bits[d],
                    "psnr": psnr(r, test).clamp(max=100).mean().item(),
                    "ssim": ssim(r, test).mean().item(),
                    "fit_s": round(km_s),
                }
            )
    if not args.skip_tokenizer:
        steps = [f"train_tokenizer.steps={args.steps}"] if args.steps else []
        runs = [(d, cfg.model.codebook.mode) for d in args.depths]
        runs += [(max(args.depths), m) for m in args.paradigms if m != cfg.model.codebook.mode]
        for d, mode in runs:
            over = [*args.set, *steps, f"model.quantizer.depth={d}", f"model.codebook.mode={mode}"]
            if split:  # rows_k a layer at every depth
                over += [
                    f"model.codebook.num_rows={rows_k * d}",
                    f"llm.vocab_size={max(cfg.llm.vocab_size, cb.row_offset + rows_k * d)}",
                ]
            row, recon = tokenizer_row(root, args.out / f"tok_d{d}_{mode}", args.config, over, test[picks])
            raw["rows"].append({"method": f"tokenizer ({mode} codebook)", "depth": d, "bits": bits[d], **row})
            grid.append((bits[d], f"{mode} tokenizer, {bits[d]} bits", recon))
            print(json.dumps(raw["rows"][-1]))
    raw["rows"].sort(key=lambda r: (r["bits"], r["method"]))
    print(f"\nrate–distortion on held-out photos ({size} px crops; {cell}×{cell} px cells, {rows_k} codewords a layer)")
    print(f"machine: {machine()}\n")
    print(
        table(
            ["bits / image", "method", "test PSNR", "test SSIM", "codebook usage", "train s"],
            [
                [
                    r["bits"],
                    r["method"],
                    f"{r['psnr']:.2f}",
                    f"{r['ssim']:.3f}",
                    "" if r.get("usage") is None else f"{r['usage']:.0%}",
                    r.get("train_s", r.get("fit_s")),
                ]
                for r in raw["rows"]
            ],
        )
    )
    grid.sort(key=lambda g: g[0])
    image_grid([g[2] for g in grid], labels=[g[1] for g in grid]).save(args.out / "test_crops.png")
    print(f"reconstructions of 8 test crops: {args.out / 'test_crops.png'}")
    if args.json:
        write_json(args.json, raw)


if __name__ == "__main__":
    main()
