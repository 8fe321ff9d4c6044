"""``unicodebook demo``: the main job on the embedded shapes world, with a Markdown report.

Today it runs stage I end to end — make the data, train the unified-codebook tokenizer on the
tiny preset, evaluate it on the held-out test split — and writes ``report.md`` with the metric
table and pictures. Stage II (the LLM reading and writing images) joins it when it lands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import load_config
from .data.images import ImageFolder, resolve_image_folder
from .eval.plots import image_grid
from .eval.tokenizer import evaluate_tokenizer
from .tokenizers.unicode import load_tokenizer
from .train.stage1 import train_tokenizer


def run_demo(out: Path, overrides: list[str] | None = None, n_train: int = 2000, n_val: int = 200, n_test: int = 500) -> Path:
    from .data.shapes import write_dataset

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "meta.json").exists():
        print(f"[demo] writing the shapes world to {data}")
        write_dataset(data, n_train=n_train, n_val=n_val, n_test=n_test, size=32, seed=0)
    cfg = load_config("tiny", overrides)
    run = out / "tokenizer"
    print(f"[demo] stage I: training the visual tokenizer ({cfg.train_tokenizer.steps} steps) in {run}")
    resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
    result = train_tokenizer(cfg, data, run, resume=resume)
    t_train = result.seconds
    tok = load_tokenizer(run)
    print("[demo] evaluating on the test split")
    test = evaluate_tokenizer(tok, data, split="test", usage_plot=out / "codebook_usage_test.png")
    (out / "eval_tokenizer_test.json").write_text(json.dumps(test, indent=2))

    ds = ImageFolder(resolve_image_folder(data, "test"), tok.image_size, preload=False)
    images = torch.stack([ds[i] for i in range(12)])
    recon = tok.decode(tok.encode(images))
    image_grid([images, recon], labels=["test", "recon"]).save(out / "reconstructions_test.png")

    report = out / "report.md"
    report.write_text(_report(cfg, test, t_train, time.time() - t0, tok))
    return report


def _report(cfg, test: dict, t_train: float, t_total: float, tok) -> str:
    cb = cfg.model.codebook
    layers = "; ".join(f"{n}: {u:.0%} / {p:.0f}" for n, u, p in zip(test["layers"], test["usage"], test["perplexity"]))
    return f"""# unicodebook demo report

Shapes world at {tok.image_size} px, tiny preset: a {cfg.model.quantizer.kind.upper()} tokenizer
({'×'.join(map(str, tok.grid_shape))} = {tok.codes_per_image} codes per image) whose codebook is
{tok.codebook.num_codes} rows of the tiny LLM's embedding table (mode `{cb.mode}`).

## Stage I — visual tokenizer (test split: {test['n_images']} images never seen in training)

| metric | value |
|---|---|
| PSNR | {test['psnr']:.2f} dB |
| SSIM | {test['ssim']:.4f} |
| codebook usage, mean over layers | {test['usage_mean']:.1%} |
| codebook usage, any layer | {test['usage_all']:.1%} |
| usage / perplexity per layer | {layers} |
| mean cosine(visual codebook, LLM rows) | {test['codebook_cosine_llm']:.4f} |
| judge reads the reconstruction as the true scene | {test.get('judge_accuracy', float('nan')):.1%} (seen combinations {test.get('judge_accuracy_seen', float('nan')):.1%}, held-out {test.get('judge_accuracy_held_out', float('nan')):.1%}) |
| training time | {t_train / 60:.1f} min |
| demo wall time | {t_total / 60:.1f} min |

Reconstructions (top: test image, bottom: decode(encode(image))):

![reconstructions](reconstructions_test.png)

Codebook usage on the test split:

![codebook usage](codebook_usage_test.png)

Training curves:

![curves](tokenizer/curves.png)
"""
