"""What the released LaVIT's sampling at inference changes: token counts from call to call, and
what a stage II model reads.

LaVIT's released code draws the selector's keep decisions at inference as in training, so one
image gives another number of tokens (and other codes) at every call. Ours decides
deterministically by default (``model.inference_keep``) and samples only with
``model.sample_at_inference``. On a trained tokenizer folder this measures, on a split's images:

* tokens per image: the deterministic rule against ``--draws`` sampled encodes (generators seeded
  0, 1, …): the mean, the spread of one image's count over its draws, how often a draw gives the
  deterministic sequence, how many distinct sequences an image gets, and the overlap of two draws'
  code sets (Jaccard);
* with ``--model`` (a stage II folder on that tokenizer): the model's VQA on the split with the
  images encoded deterministically, then sampled (each image drawn once, as one call of the
  released code would), the same questions.

    python bench/lavit_sampling.py --tokenizer runs/lavit/tokenizer --data runs/lavit/data \
        [--model runs/lavit/model] [--split test] [--draws 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json

from unicodebook.data.images import load_image, split_folder
from unicodebook.lm.model import load_model
from unicodebook.tokenizers.base import PAD_CODE, load_tokenizer


def images_of(folder: Path, size: int, limit: int) -> torch.Tensor:
    paths = sorted((folder / "images").glob("*.png"))[:limit]
    if not paths:
        raise SystemExit(f"error: no images under {folder / 'images'}")
    return torch.stack([load_image(p, size) for p in paths])


def encode_all(visual_tok, images: torch.Tensor, sample: bool, seed: int = 0) -> torch.Tensor:
    visual_tok.sample_at_inference = sample
    gen = torch.Generator().manual_seed(seed) if sample else None
    return torch.cat([visual_tok.encode(images[i : i + 64], generator=gen) for i in range(0, len(images), 64)])


def count_figures(det: torch.Tensor, draws: list[torch.Tensor]) -> dict:
    """Deterministic codes (B, N) and R sampled ones → the figures of the table."""
    n_det = (det != PAD_CODE).sum(1).float()
    n = torch.stack([(d != PAD_CODE).sum(1).float() for d in draws])  # (R, B)
    same = torch.stack([(d == det).all(1) for d in draws]).float()
    distinct = [len({tuple(d[b].tolist()) for d in draws}) for b in range(len(det))]

    def codes(row: torch.Tensor) -> set:
        return set(row[row != PAD_CODE].tolist())

    jac = [
        len(codes(a[b]) & codes(c[b])) / max(1, len(codes(a[b]) | codes(c[b])))
        for a, c in zip(draws[:-1], draws[1:])
        for b in range(len(det))
    ]
    return {
        "images": len(det),
        "draws": len(draws),
        "tokens_deterministic_mean": n_det.mean().item(),
        "tokens_deterministic_range": [int(n_det.min()), int(n_det.max())],
        "tokens_sampled_mean": n.mean().item(),
        "tokens_sampled_range": [int(n.min()), int(n.max())],
        "count_std_within_image": n.std(0).mean().item(),
        "count_abs_diff_to_deterministic": (n - n_det).abs().mean().item(),
        "draws_equal_to_deterministic": same.mean().item(),
        "distinct_sequences_per_image": sum(distinct) / len(distinct),
        "code_set_jaccard_between_draws": sum(jac) / len(jac),
    }


def vqa_figures(model_dir: str, data: Path, split: str, max_vqa: int) -> dict:
    from unicodebook.eval.model import evaluate_model

    out = {}
    for name, sample in (("deterministic", False), ("sampled", True)):
        model = load_model(model_dir)
        model.tokenizer.sample_at_inference = sample  # its own generator: seeded, one draw an image
        r = evaluate_model(model, data, split=split, max_vqa=max_vqa, max_t2i=0, progress=False)
        out[name] = {k: r[k] for k in ("vqa_accuracy", "vqa_by_type", "description_accuracy") if k in r}
    return out


def span(r: list[int]) -> str:
    return f"{r[0]}–{r[1]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--model", help="a stage II folder on that tokenizer: VQA deterministic against sampled")
    p.add_argument("--split", default="test")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--max-images", type=int, default=500)
    p.add_argument("--max-vqa", type=int, default=500)
    p.add_argument("--json")
    a = p.parse_args()
    visual_tok = load_tokenizer(a.tokenizer).eval()
    if visual_tok.family != "lavit":
        raise SystemExit(f"error: {a.tokenizer} is a {visual_tok.family} tokenizer; this measures LaVIT's selector")
    images = images_of(split_folder(a.data, a.split), visual_tok.image_size, a.max_images)
    det = encode_all(visual_tok, images, sample=False)
    draws = [encode_all(visual_tok, images, sample=True, seed=s) for s in range(a.draws)]
    res = {"counts": count_figures(det, draws)}
    c = res["counts"]
    rule = visual_tok.inference_rule
    print(
        table(
            ["", f"deterministic ({rule})", f"sampled ({a.draws} draws)"],
            [
                ["tokens an image, mean", f"{c['tokens_deterministic_mean']:.2f}", f"{c['tokens_sampled_mean']:.2f}"],
                ["range", span(c["tokens_deterministic_range"]), span(c["tokens_sampled_range"])],
                ["std of one image's count over draws", "0", f"{c['count_std_within_image']:.2f}"],
                ["mean |count − deterministic count|", "0", f"{c['count_abs_diff_to_deterministic']:.2f}"],
                ["draws equal to the deterministic codes", "", f"{100 * c['draws_equal_to_deterministic']:.1f}%"],
                ["distinct sequences an image", "1", f"{c['distinct_sequences_per_image']:.2f}"],
                ["Jaccard of two draws' code sets", "1", f"{c['code_set_jaccard_between_draws']:.3f}"],
            ],
        )
    )
    if a.model:
        res["vqa"] = vqa_figures(a.model, a.data, a.split, a.max_vqa)
        for name, r in res["vqa"].items():
            print(f"VQA with {name} encodes: {100 * r['vqa_accuracy']:.1f}%  {r.get('vqa_by_type', '')}")
    write_json(a.json, res)


if __name__ == "__main__":
    main()
