"""What limits reading in stage II: the visual representation, or the LLM learning to route a
question to the right slots? (An experiment, not part of the library.)

Trains stage II on questions alone, then evaluates, with the image slots the LLM reads replaced
by an oracle built from the scene the image was drawn from:

* ``base``     the image's Ẑ, as the library does (the reference row);
* ``caption``  the caption's word embeddings (the LLM's own input rows), padded to the slot count:
               the image as text, reading reduced to a text-to-text task;
* ``grid``     each object's cell of the 3×3 scene grid filled with the sum of its size, colour
               and shape word embeddings, empty cells zero: a perfect, spatially laid-out code.

If an oracle reads far better than Ẑ at the same steps, the representation is the lever; if it
reads about as well, the routing is. The oracle finds an image's scene by its codes (the frozen
tokenizer encodes every train and test image once). Usage::

    python bench/read_probe.py --tokenizer runs/demo/tokenizer --data runs/demo/data \
        --out runs/probe/caption --mode caption train_lm.steps=300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unicodebook.cli import main as cli
from unicodebook.data.images import load_image
from unicodebook.data.shapes import POSITIONS
from unicodebook.lm.llm import input_embedding
from unicodebook.lm.model import UniCodeLM
from unicodebook.lm.text import text_ids
from unicodebook.tokenizers.base import load_tokenizer

MODES = ("base", "caption", "grid")


class Scenes:
    """The scene and caption of an image, found by its codes: exactly, or else (a near-tie the
    encoder broke otherwise in another batch) the image whose codes agree most."""

    def __init__(self, codes: list[torch.Tensor], items: list[dict]):
        self.exact = {c.numpy().tobytes(): item for c, item in zip(codes, items)}
        self.codes, self.items = torch.stack(codes), items

    def __getitem__(self, codes: torch.Tensor) -> dict:
        codes = codes.long().cpu()
        hit = self.exact.get(codes.numpy().tobytes())
        if hit is None:
            hit = self.items[int((self.codes == codes).flatten(1).sum(1).argmax())]
        return hit


def scenes_by_codes(tokenizer_run: str, data: Path) -> Scenes:
    """The codes of every train and test image → its scene and caption."""
    visual_tok = load_tokenizer(tokenizer_run)
    codes_seen: list[torch.Tensor] = []
    items: list[dict] = []
    for split in ("train", "test"):
        caps = {json.loads(x)["image"]: json.loads(x)["caption"] for x in open(data / split / "captions.jsonl")}
        rows = [json.loads(x) for x in open(data / split / "scenes.jsonl")]
        for i in range(0, len(rows), 64):
            part = rows[i : i + 64]
            images = torch.stack([load_image(data / split / r["image"], visual_tok.image_size) for r in part])
            with torch.no_grad():
                codes = visual_tok.encode(images)
            for r, c in zip(part, codes):
                codes_seen.append(c.long().cpu())
                items.append({"scene": r["scene"], "caption": caps[r["image"]]})
    return Scenes(codes_seen, items)


def install(mode: str, found: Scenes | None) -> None:
    """Replace UniCodeLM.latents by the oracle of ``mode``."""
    original = UniCodeLM.latents
    if mode == "base":
        return

    def latents(self, codes):
        base = original(self, codes)
        table = input_embedding(self.llm).weight.detach()
        word = lambda w: table[torch.tensor(text_ids(self.text_tok, w))].mean(0)  # noqa: E731
        out = torch.zeros_like(base)
        n, side = base.shape[1], int(base.shape[1] ** 0.5)
        for b, c in enumerate(codes.long()):
            item = found[c]
            if mode == "caption":
                ids = text_ids(self.text_tok, item["caption"])[:n]
                out[b, : len(ids)] = table[torch.tensor(ids)]
            else:
                grid = out[b].view(side, side, -1)
                for o in item["scene"]["objects"]:
                    r, q = divmod(POSITIONS.index(o["position"]), 3)
                    v = word(o["size"]) + word(o["colour"]) + word(o["shape"])
                    grid[r * side // 3 : (r + 1) * side // 3, q * side // 3 : (q + 1) * side // 3] = v
        return out

    UniCodeLM.latents = latents


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=MODES, default="base")
    ap.add_argument("--max-vqa", type=int, default=500)
    ap.add_argument("overrides", nargs="*", help="train_lm overrides, e.g. train_lm.steps=300")
    a = ap.parse_args()
    install(a.mode, scenes_by_codes(a.tokenizer, a.data) if a.mode != "base" else None)
    t0 = time.time()
    questions_only = ["train_lm.tasks.decompress=0", "train_lm.tasks.t2i=0", "train_lm.image_layout=depth"]
    cli(["train-lm", "--tokenizer", a.tokenizer, "--data", str(a.data), "--out", a.out, *questions_only, *a.overrides])
    trained = time.time() - t0
    cli(
        [
            "eval",
            "model",
            "--model",
            a.out,
            "--data",
            str(a.data),
            "--split",
            "test",
            "--max-vqa",
            str(a.max_vqa),
            "--max-t2i",
            "0",
        ]
    )
    print(f"{a.mode}: stage II {trained:.0f} s")


if __name__ == "__main__":
    run()
