"""Benchmark 3: the stage II training step against a plain ``transformers`` causal-LM step.

Same model, same token ids, same labels, same optimiser (AdamW): ours is ``UniCodeLM.forward``
(Ẑ spliced in at the ``<image>`` slots, image position embeddings, loss on the labelled
positions) + backward + step; the baseline is ``llm(input_ids, attention_mask, labels)`` +
backward + step. Batches are in-context decompression samples (Ẑ in, the h·w·D codes out),
the longest of the three tasks. Steps alternate between the two so drift hits both alike.

    python bench/train_step.py [--presets tiny 100m] [--steps 6] [--precision bf16] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, sync, table, write_json
from _models import build_model, n_params

from unicodebook.lm.sequence import collate

BATCH = {"tiny": 32, "100m": 4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "100m"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    rows, raw = [], {}
    for preset in args.presets:
        model = build_model(preset, args.device, image_positions=True).train()
        dev = args.device
        plain = copy.deepcopy(model.llm).train()
        g = torch.Generator().manual_seed(0)
        n_codes = model.tokenizer.codebook.num_codes
        codes = torch.randint(0, n_codes, (BATCH[preset], *model.tokenizer.grid_shape), generator=g)
        batch = collate([model.fmt.decompression(c) for c in codes], model.fmt.pad_id)
        latents = model.latents(codes.to(dev))
        tokens = int(batch.attention_mask.sum())
        opt_ours = torch.optim.AdamW(model.parameters(), lr=1e-4)
        opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4)
        autocast = torch.autocast(torch.device(dev).type, torch.bfloat16, enabled=args.precision == "bf16")
        ids, mask, labels = (t.to(dev) for t in (batch.input_ids, batch.attention_mask, batch.labels))

        def ours_step():
            with autocast:
                loss = model(batch, latents).loss
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)

        def plain_step():
            with autocast:
                loss = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt_plain.step()
            opt_plain.zero_grad(set_to_none=True)

        times = {"ours": [], "plain": []}
        for i in range(args.steps + 1):
            for name, fn in (("ours", ours_step), ("plain", plain_step)):
                sync(dev)
                t = time.perf_counter()
                fn()
                sync(dev)
                if i:  # the first step of each is a warm-up
                    times[name].append(time.perf_counter() - t)
        ours, base = statistics.median(times["ours"]), statistics.median(times["plain"])
        raw[preset] = {"tokens": tokens, "ours_s": times["ours"], "plain_s": times["plain"]}
        rows.append(
            [
                preset,
                f"{n_params(model.llm) / 1e6:.0f}M",
                f"{BATCH[preset]}×{batch.input_ids.shape[1]}",
                f"{tokens / ours:,.0f}",
                f"{tokens / base:,.0f}",
                f"{base / ours:.2f}×",
            ]
        )
    print(f"\nstage II training step ({args.precision}, AdamW, decompression batches; median of {args.steps} steps)")
    print(f"machine: {machine(args.device)}\n")
    print(table(["model", "params", "batch × length", "tokens/s ours", "tokens/s plain transformers", "ratio"], rows))
    write_json(args.json, {"machine": machine(args.device), "precision": args.precision, "results": raw})


if __name__ == "__main__":
    main()
