"""Where a LaVIT tokenizer loses its pixels: in the ViT's patch features, or in their
reconstruction from the codes?

For each feature source a fresh pixel decoder of the tokenizer's own kind (the spatial reader and
conv decoder, ``pixel_reader: spatial``) is trained on the train split's features, cached once
(batch 64, AdamW at 2e-3 after 50 warm-up steps, L1 + L2, as phase ``decoder``), and scored on the
test split every ``--every`` steps: PSNR, the shapes-world judge on the decoded images (when the
split has ``scenes.jsonl``) and the spread of the output across images (≈ 0: the mean image).

* ``true`` — the ViT's patch features themselves (what the de-tokenizer is trained to rebuild);
* ``recon`` — the de-tokenizer's reconstruction from the codes ``encode`` gives (what the
  tokenizer's decoder reads).

    python bench/lavit_pixels.py --tokenizer runs/lavit/tokenizer --data runs/lavit/data \
        [--sources true recon] [--steps 600] [--every 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_json

from unicodebook.data.images import load_image, split_folder
from unicodebook.data.shapes import read_scenes
from unicodebook.eval.metrics import psnr
from unicodebook.eval.tokenizer import _judge
from unicodebook.tokenizers.base import load_tokenizer
from unicodebook.tokenizers.lavit.model import SpatialPixelDecoder


def split_images(data: Path, split: str, size: int) -> tuple[torch.Tensor, list]:
    folder = split_folder(data, split)
    paths = sorted((folder / "images").glob("*.png"))
    if not paths:
        raise SystemExit(f"error: no images under {folder / 'images'}")
    scenes = {Path(k).name: v for k, v in read_scenes(folder).items()} if (folder / "scenes.jsonl").exists() else {}
    return torch.stack([load_image(p, size) for p in paths]), [scenes.get(p.name) for p in paths]


@torch.no_grad()
def features_of(visual_tok, images: torch.Tensor, source: str) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 250):
        x = images[i : i + 250]
        if source == "true":
            out.append(visual_tok.patch_features(x))
        else:
            out.append(visual_tok.reconstruct_features(visual_tok.encode(x)))
    return torch.cat(out)


def judged(images: torch.Tensor, scenes: list) -> float | None:
    """The fraction of decoded images the judge reads as their scene (None: no scenes)."""
    ok = [right for right, _ in _judge(images, scenes)]
    return sum(ok) / len(ok) if ok else None


def train_decoder(visual_tok, ftr, xtr, fte, xte, scenes, steps: int, every: int, seed: int) -> list[dict]:
    cfg = visual_tok.config.model
    torch.manual_seed(seed)
    dec = SpatialPixelDecoder(
        visual_tok.feature_dim,
        ftr.shape[1],
        visual_tok.image_size,
        cfg.decoder_ch,
        cfg.decoder_mult,
        cfg.decoder_res_blocks,
    )
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    rows, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, step / 50)
        idx = torch.randint(len(xtr), (64,), generator=g)
        out = dec(ftr[idx])
        loss = F.l1_loss(out, xtr[idx]) + F.mse_loss(out, xtr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                rec = torch.cat([dec(fte[i : i + 100]).clamp(0, 1) for i in range(0, len(fte), 100)])
            rows.append(
                {
                    "step": step,
                    "psnr": float(psnr(rec, xte).mean()),
                    "judge": judged(rec, scenes),
                    "output_std": float(rec.std(0).mean()),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--sources", nargs="+", default=["true", "recon"], choices=["true", "recon"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    visual_tok = load_tokenizer(args.tokenizer).eval()
    if visual_tok.family != "lavit":
        raise SystemExit(f"error: {args.tokenizer} is a {visual_tok.family} tokenizer, not a LaVIT one")
    xtr, _ = split_images(args.data, "train", visual_tok.image_size)
    xte, scenes = split_images(args.data, "test", visual_tok.image_size)
    results = {"machine": machine(), "sources": {}}
    for source in args.sources:
        ftr, fte = features_of(visual_tok, xtr, source), features_of(visual_tok, xte, source)
        results["sources"][source] = train_decoder(
            visual_tok, ftr, xtr, fte, xte, scenes, args.steps, args.every, args.seed
        )
    print(f"{len(xtr)} train / {len(xte)} test images; {results['machine']}\n")
    rows = [
        [
            s,
            r["step"],
            f"{r['psnr']:.2f} dB",
            "–" if r["judge"] is None else f"{100 * r['judge']:.1f}%",
            f"{r['output_std']:.4f}",
            f"{r['seconds']:.0f} s",
        ]
        for s, rs in results["sources"].items()
        for r in rs
    ]
    print(table(["features", "decoder steps", "test PSNR", "judge", "output std across images", "time"], rows))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
