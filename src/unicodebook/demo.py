"""``unicodebook demo``: the main job on the embedded shapes world, with a Markdown report.

Makes the data, trains the unified-codebook tokenizer (stage I) and the LLM that reads and
writes images through it (stage II) on the tiny preset (``--full``: the ``tiny_full`` recipe
on ten times the images), evaluates both on the test split and writes ``report.md`` with the
metric tables and picture grids. Re-running it resumes or reuses finished runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import load_config
from .data.images import ImageFolder, resolve_image_folder
from .eval.model import evaluate_model
from .eval.plots import image_grid
from .eval.tokenizer import evaluate_tokenizer
from .lm.model import load_model
from .tokenizers.base import load_tokenizer
from .train.checkpoint import list_checkpoints
from .train.stage1 import train_tokenizer
from .train.stage2 import train_lm

# ``demo --full``: the shipped full recipe (one run of declared phases) on ten times the images
FULL = {"preset": "tiny_full", "n_train": 20_000}


def run_demo(
    out: Path,
    overrides: list[str] | None = None,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 500,
    preset: str = "tiny",
) -> Path:
    from .data.shapes import write_dataset

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    cfg = load_config(preset, overrides)
    if not (data / "meta.json").exists():
        print(f"[demo] writing the shapes world to {data}")
        write_dataset(data, n_train=n_train, n_val=n_val, n_test=n_test, size=cfg.model.image_size, seed=0)
    run = out / "tokenizer"
    print(f"[demo] stage I: training the visual tokenizer ({cfg.train_tokenizer.steps} steps) in {run}")
    resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
    result = train_tokenizer(cfg, data, run, resume=resume)
    t_train = result.seconds
    visual_tok = load_tokenizer(run)
    print("[demo] evaluating on the test split")
    test = evaluate_tokenizer(visual_tok, data, split="test", usage_plot=out / "codebook_usage_test.png")
    (out / "eval_tokenizer_test.json").write_text(json.dumps(test, indent=2))

    ds = ImageFolder(resolve_image_folder(data, "test"), visual_tok.image_size, preload=False)
    images = torch.stack([ds[i] for i in range(12)])
    recon = visual_tok.decode(visual_tok.encode(images)).cpu()
    image_grid([images, recon], labels=["test", "recon"]).save(out / "reconstructions_test.png")

    model_run = out / "model"
    print(f"[demo] stage II: training the LLM to read and write images ({cfg.train_lm.steps} steps) in {model_run}")
    if (model_run / "model.json").exists() and _finished(model_run, cfg.train_lm.steps):
        t_lm = 0.0
    else:
        resume = bool(list_checkpoints(model_run))
        t_lm = train_lm(cfg, run, data, model_run, resume=resume).seconds
    model = load_model(model_run)
    print("[demo] evaluating the model on the test split (VQA, text-to-image, decompression)")
    lm_test = evaluate_model(model, data, split="test", pictures=out)
    (out / "eval_model_test.json").write_text(json.dumps(lm_test, indent=2))

    report = out / "report.md"
    report.write_text(
        _report(cfg, test, t_train, time.time() - t0, visual_tok, preset) + _report_lm(cfg, lm_test, t_lm, model)
    )
    return report


def _finished(run: Path, steps: int) -> bool:
    ckpts = list_checkpoints(run)
    return bool(ckpts) and json.loads((ckpts[-1] / "state.json").read_text())["step"] >= steps


def _report_lm(cfg, r: dict, t_lm: float, model) -> str:
    tc = cfg.train_lm
    by_type = ", ".join(f"{t} {v:.0%}" for t, v in r.get("vqa_by_type", {}).items())

    def mix(p) -> str:
        return ", ".join(f"{t} {getattr(p.tasks, t):g}" for t in ("decompress", "instruct", "t2i"))

    if tc.phases:
        plan = "the phases " + "; ".join(
            f"{p.name or i + 1}: {q.steps} steps of {mix(q)} at lr {q.lr:g}"
            for i, (p, (_, q)) in enumerate(zip(tc.phases, tc.phase_list()))
        )
    else:
        plan = f"the task mix ({mix(tc)})"
    if model.layout == "depth":
        gh, gw, g = model.fmt.grid_shape
        out = (
            f"`<img>` + {model.steps_per_image} positions + `</img>`, the depth head writing each position's {g} "
            f"codes ({model.codes_per_image} in all)"
        )
    else:
        up_to = "" if model.tokenizer.layout.fixed else "up to "
        out = f"`<img>` + {up_to}{model.codes_per_image} code ids + `</img>`"
    if model.reads_features:
        inp = "their codes' continuous features (one slot per code, through a learned projector)"
    else:
        inp = "their code tokens" if model.reads_codes else "Ẑ at the `<image>` slots"
    decomp = (
        f"| decompression code accuracy (teacher-forced) | {r['decompression_code_accuracy']:.1%} |\n"
        if "decompression_code_accuracy" in r
        else ""
    )  # a family without the task has no row
    if "t2i_ended_in_range" in r:  # a variable-length layout: how the generated images ended
        decomp += (
            f"| generated images: mean length, ended at `</img>` within the range (not cut at the maximum) | "
            f"{r['t2i_codes_mean']:.1f} codes, {r['t2i_ended_in_range']:.1%} |\n"
        )

    def pct(key):
        return f"{r.get(key, float('nan')):.1%}"

    return f"""
## Stage II — the LLM reads and writes images through the codebook (test split)

The tiny LLM ({sum(p.numel() for p in model.llm.parameters()) / 1e6:.1f} M parameters) trained {tc.steps} steps on
{plan}; images enter as {inp} and leave as {out}, decoded by the frozen tokenizer.

| metric | value |
|---|---|
| VQA accuracy (normalised exact match, {r.get("vqa_n", 0)} questions) | {r.get("vqa_accuracy", float("nan")):.1%} |
| VQA by question type | {by_type} |
| description: the whole caption right ({r.get("description_n", 0)} images) | {pct("description_accuracy")} |
| text-to-image, judge: every named attribute right — seen combinations | {pct("t2i_accuracy_seen")} \
({r.get("t2i_n_seen", 0)} prompts) |
| text-to-image — held-out combinations | {pct("t2i_accuracy_held_out")} ({r.get("t2i_n_held_out", 0)} prompts) |
| ceiling set by the tokenizer: the judge on the reconstructions of the prompts' own images, seen / held-out \
| {pct("t2i_reference_accuracy_seen")} / {pct("t2i_reference_accuracy_held_out")} |
{decomp}| sampling | CFG {r.get("cfg_scale")}, temperature {r.get("temperature")}, top-k {r.get("top_k")} |
| stage II training time | {t_lm / 60:.1f} min |

Generated images under their prompts (the judge's verdict in brackets):

![text-to-image](t2i_samples.png)

Questions about test images (shown as the tokenizer reconstructs them) and the model's answers:

![VQA](vqa_examples.png)

Stage II training curves:

![stage II curves](model/curves.png)
"""


def _describe(cfg, visual_tok) -> str:
    """One sentence on the tokenizer: its family, code layout and codebook."""
    lay = visual_tok.layout
    shape = f"{'×'.join(map(str, lay.shape))} = {lay.length}" if lay.grid else str(lay.length)
    if not lay.fixed:
        shape = f"{lay.shortest} to {lay.length}"
    if cfg.model.family == "unicode":
        return (
            f"a {cfg.model.quantizer.kind.upper()} UniCode tokenizer ({shape} codes per image) whose codebook is "
            f"{visual_tok.num_codes} rows of the tiny LLM's embedding table (mode `{cfg.model.codebook.mode}`)"
        )
    rows = (
        "rows of the LLM's own vocabulary"
        if visual_tok.shares_text_rows
        else "new rows appended to the LLM's vocabulary"
    )
    return (
        f"a {visual_tok.family} tokenizer ({shape} codes per image) over {visual_tok.num_codes} codes, "
        f"read and written as {rows}"
    )


def _report(cfg, test: dict, t_train: float, t_total: float, visual_tok, preset: str = "tiny") -> str:
    layers = "; ".join(f"{n}: {u:.0%} / {p:.0f}" for n, u, p in zip(test["layers"], test["usage"], test["perplexity"]))
    cosine = (
        f"| mean cosine(visual codebook, LLM rows) | {test['codebook_cosine_llm']:.4f} |\n"
        if "codebook_cosine_llm" in test
        else ""
    )

    def pct(key):
        return f"{test.get(key, float('nan')):.1%}"

    return f"""# unicodebook demo report

Shapes world at {visual_tok.image_size} px, `{preset}` preset: {_describe(cfg, visual_tok)}.

## Stage I — visual tokenizer (test split: {test["n_images"]} images never seen in training)

| metric | value |
|---|---|
| PSNR | {test["psnr"]:.2f} dB |
| SSIM | {test["ssim"]:.4f} |
| codebook usage, mean over layers | {test["usage_mean"]:.1%} |
| codebook usage, any layer | {test["usage_all"]:.1%} |
| usage / perplexity per layer | {layers} |
{cosine}| judge reads the reconstruction as the true scene | {pct("judge_accuracy")} \
(seen combinations {pct("judge_accuracy_seen")}, held-out {pct("judge_accuracy_held_out")}) |
| training time | {t_train / 60:.1f} min |
| demo wall time | {t_total / 60:.1f} min |

Reconstructions (top: test image, bottom: decode(encode(image))):

![reconstructions](reconstructions_test.png)

Codebook usage on the test split:

![codebook usage](codebook_usage_test.png)

Training curves:

![curves](tokenizer/curves.png)
"""
