"""Benchmark 4: visual tokenizer throughput, images per second for encode and decode.

* the tiny preset as shipped (36 px: 9×9×4 RQ codes over 512 rows of a d = 128 LLM).
* 256 px — the 7B preset's geometry (16×16 latent, HQ 8×8 top + 16×16 bottom = 320 codes, a
  32000 × 4096 codebook, so the nearest-code search runs at LLaMA size), with the autoencoder
  width reduced from 128 to ``--width`` channels so it fits a CPU.

Encode = image → codes (encoder, quantizer search); decode = codes → image (codebook,
aggregation, decoder). Random weights; speed does not depend on training.

    python bench/tokenizer.py [--width 32] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, timeit, write_json

from unicodebook.config import load_config
from unicodebook.tokenizers.unicode.build import build_tokenizer


def configs(width: int) -> dict:
    big = [
        "llm.name=builtin",
        "llm.num_layers=1",
        "llm.intermediate_size=1024",
        "llm.dtype=float32",
        f"model.autoencoder.ch={width}",
    ]
    tiny = load_config("tiny")
    return {f"tiny {tiny.model.image_size} px": (tiny, 64), "7B geometry 256 px": (load_config("7b", big), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    args = p.parse_args()
    rows, raw = [], {}
    for name, (cfg, batch) in configs(args.width).items():
        visual_tok = build_tokenizer(cfg, seed=0).eval().to(args.device)
        images = torch.rand(
            batch, 3, cfg.model.image_size, cfg.model.image_size, generator=torch.Generator().manual_seed(0)
        ).to(args.device)
        with torch.inference_mode():
            codes = visual_tok.encode(images)
            t_enc = timeit(lambda: visual_tok.encode(images), args.device, repeat=args.repeat)
            t_dec = timeit(lambda: visual_tok.decode(codes), args.device, repeat=args.repeat)
        search = "bf16 certified" if visual_tok.codebook.search_index().lowp is not None else "fp32"
        ae = sum(p.numel() for n, p in visual_tok.named_parameters() if not n.startswith("codebook"))
        raw[name] = {"batch": batch, "encode_s": t_enc, "decode_s": t_dec}
        rows.append(
            [
                name,
                f"{visual_tok.codebook.num_codes}×{visual_tok.codebook.dim}",
                search,
                f"{ae / 1e6:.1f}M",
                visual_tok.codes_per_image,
                batch,
                f"{batch / t_enc:.1f}",
                f"{batch / t_dec:.1f}",
            ]
        )
    print(f"\nvisual tokenizer throughput (fp32, median of {args.repeat}; 256 px autoencoder width {args.width})")
    print(f"machine: {machine(args.device)}\n")
    print(
        table(
            [
                "setting",
                "codebook",
                "search",
                "autoencoder params",
                "codes / image",
                "batch",
                "encode images/s",
                "decode images/s",
            ],
            rows,
        )
    )
    write_json(args.json, {"machine": machine(args.device), "width": args.width, "results": raw})


if __name__ == "__main__":
    main()
