"""Benchmark 5: the depth layout against the flat one, the same LLM.

Flat: the LLM writes an image as h·w·D code tokens. Depth: it steps once per code position
(h·w) and a depth head (2 layers; ``--depth-width`` narrower than the LLM if asked) emits that position's D codes.
Same LLM weights, same
tokenizer geometry (the bench models: 36 px, 9×9×4 codes), random weights (speed does not
depend on training). Two figures per preset:

* generation: seconds per image at batch 1 and 8, CFG 3 (each batch runs 2b sequences), greedy;
* training: one text-to-image step (forward + backward + AdamW) at the given batch, and the LLM
  positions it runs per image.

    python bench/depth.py [--presets tiny 100m] [--batches 1 8] [--train-batch 16] [--depth-width 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, timeit, write_json
from _models import build_model, n_params

from unicodebook.lm.model import UniCodeLM
from unicodebook.lm.sequence import collate

CFG_SCALE = 3.0
PROMPT = "a red circle on the left of a blue square"


def depth_twin(flat: UniCodeLM, layers: int, width: int) -> UniCodeLM:
    """The same LLM, tokenizer and text tokenizer with a depth head (``width`` 0: the LLM's)."""
    heads = 4 if width else flat.llm.config.num_attention_heads
    return UniCodeLM(
        flat.llm,
        flat.tokenizer,
        flat.text_tok,
        image_positions=False,
        layout="depth",
        depth_head={"layers": layers, "heads": heads, "width": width},
    ).eval()


def train_step_s(model: UniCodeLM, batch: int, repeat: int) -> float:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, model.tokenizer.codebook.num_codes, (batch, *model.tokenizer.grid_shape), generator=g)
    b = collate([model.fmt.text_to_image(PROMPT, c) for c in codes], model.fmt.pad_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        out = model(b, None)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    model.train()
    t = timeit(step, "cpu", repeat=repeat)
    model.eval()
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "100m"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--depth-layers", type=int, default=2)
    p.add_argument("--depth-width", type=int, default=0, help="the depth head's width (0: the LLM's hidden size)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    gen_rows, train_rows, raw = [], [], {}
    for preset in args.presets:
        flat = build_model(preset)
        depth = depth_twin(flat, args.depth_layers, args.depth_width)
        extra = n_params(depth.depth_head) / 1e6
        for b in args.batches:
            prompts = [PROMPT] * b
            t = {}
            with torch.no_grad():
                for name, m in (("flat", flat), ("depth", depth)):
                    t[name] = timeit(
                        lambda: m.generate_codes(prompts, CFG_SCALE, temperature=0), "cpu", repeat=args.repeat
                    )
            raw[f"{preset}/b{b}"] = {"flat_s": t["flat"], "depth_s": t["depth"]}
            gen_rows.append(
                [
                    preset,
                    f"{n_params(flat.llm) / 1e6:.0f}M + {extra:.2f}M",
                    b,
                    f"{t['flat'] / b:.3f}",
                    f"{t['depth'] / b:.3f}",
                    f"{t['flat'] / t['depth']:.2f}×",
                ]
            )
        ts = {name: train_step_s(m, args.train_batch, args.repeat) for name, m in (("flat", flat), ("depth", depth))}
        raw[f"{preset}/train_b{args.train_batch}"] = {"flat_s": ts["flat"], "depth_s": ts["depth"]}
        train_rows.append(
            [
                preset,
                args.train_batch,
                flat.steps_per_image,
                depth.steps_per_image,
                f"{ts['flat']:.3f}",
                f"{ts['depth']:.3f}",
                f"{ts['flat'] / ts['depth']:.2f}×",
            ]
        )
    print(
        f"machine: {machine('cpu')}; depth head: {args.depth_layers} layers, width {args.depth_width or 'of the LLM'}; "
        f"CFG {CFG_SCALE}, greedy, fp32\n"
    )
    print(
        table(
            ["model", "params (LLM + depth head)", "batch", "flat s / image", "depth s / image", "speed-up"], gen_rows
        )
    )
    print()
    print(
        table(
            [
                "model",
                "batch",
                "LLM positions / image, flat",
                "depth",
                "t2i training step s, flat",
                "depth",
                "speed-up",
            ],
            train_rows,
        )
    )
    write_json(
        args.json,
        {"machine": machine("cpu"), "depth_layers": args.depth_layers, "depth_width": args.depth_width, "results": raw},
    )


if __name__ == "__main__":
    main()
