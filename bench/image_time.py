"""Seconds per generated image of trained stage II model folders (any tokenizer family): text in,
pixels out (constrained decoding with the generation settings of the model's config, CFG, then
the tokenizer's decode), at batch 1 and batch 8, median of a few repeats; the codes each image
took are reported beside the time (a family's image length sets most of its cost).

    python bench/image_time.py --models runs/demo/model runs/seed_demo/model [--batches 1 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unicodebook.config import load_config
from unicodebook.lm.model import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, timeit, write_json

PROMPT = "a small red circle at the top left"


def measure(folder: str, batches: list[int], repeat: int) -> list[dict]:
    model = load_model(folder).eval()
    g = load_config(Path(folder) / "config.yaml").generate
    rows = []
    for b in batches:
        prompts = [PROMPT] * b

        def draw():
            return model.generate_image(
                prompts, cfg_scale=g.cfg_scale, temperature=g.temperature, top_k=g.top_k, seed=0
            )

        s = timeit(draw, repeat=repeat)
        rows.append(
            {
                "model": folder,
                "family": model.tokenizer.family,
                "batch": b,
                "codes_per_image": model.tokenizer.layout.length,
                "s_per_image": round(s / b, 4),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = [r for m in a.models for r in measure(m, a.batches, a.repeat)]
    print(machine())
    cols = ["model", "family", "batch", "codes_per_image", "s_per_image"]
    print(table(cols, [[r[c] for c in cols] for r in rows]))
    write_json(a.json, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
