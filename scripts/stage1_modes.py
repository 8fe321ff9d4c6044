"""The README's stage-I table: one row per codebook update rule on the same data and budget.

    .venv/bin/python scripts/stage1_modes.py --data runs/shapes --out runs/modes [overrides…]

Trains the tiny preset three times (model.codebook.mode = frozen, dual, iterative; a run
already in OUT/MODE is only re-evaluated), evaluates each on the test split, and prints a
Markdown table: PSNR, SSIM, codebook usage, how often the judge reads a reconstruction as its
true scene, mean cosine between the visual codebook and the LLM's rows now, and between the
LLM's rows now and their original values (only `dual` writes into the LLM).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unicodebook.config import load_config
from unicodebook.eval.tokenizer import evaluate_tokenizer
from unicodebook.lm.llm import input_embedding, load_llm
from unicodebook.tokenizers.unicode import load_tokenizer
from unicodebook.train.stage1 import train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--modes", nargs="+", default=["frozen", "dual", "iterative"])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    for mode in args.modes:
        cfg = load_config("tiny", [*args.overrides, f"model.codebook.mode={mode}"])
        run = args.out / mode
        if not (run / "binding.json").exists():
            train_tokenizer(cfg, args.data, run, progress=False)
        tok = load_tokenizer(run)
        test = evaluate_tokenizer(tok, args.data, split="test", progress=False)
        original = input_embedding(load_llm(cfg.llm, seed=cfg.train_tokenizer.seed)).weight.detach().float()
        now = input_embedding(tok.llm).weight.detach().float()
        ids = tok.codebook.token_ids
        drift = torch.nn.functional.cosine_similarity(now[ids], original[ids], dim=1).mean()
        rows.append(
            {
                "mode": mode,
                "psnr": test["psnr"],
                "ssim": test["ssim"],
                "usage_all": test["usage_all"],
                "usage_mean": test["usage_mean"],
                "cos_llm": test["codebook_cosine_llm"],
                "cos_llm_original": float(drift),
                "judge": test.get("judge_accuracy", float("nan")),
                "judge_seen": test.get("judge_accuracy_seen", float("nan")),
                "judge_held_out": test.get("judge_accuracy_held_out", float("nan")),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| rule | test PSNR (dB) | SSIM | usage (any layer) | usage (mean per layer) | judge: seen / held-out "
        "| cos(codebook, LLM rows) | cos(LLM rows, original) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| `{r['mode']}` | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['usage_all']:.1%} | {r['usage_mean']:.1%} | "
            f"{r['judge_seen']:.1%} / {r['judge_held_out']:.1%} | {r['cos_llm']:.4f} | {r['cos_llm_original']:.4f} |"
        )


if __name__ == "__main__":
    main()
