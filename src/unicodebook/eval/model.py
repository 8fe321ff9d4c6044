"""Stage II evaluation: does the LLM read images (VQA), write them (text-to-image, judged), and
reproduce their codes (in-context decompression)?

* ``vqa_accuracy``: normalised exact match (lower case, no punctuation or articles), overall
  and per question type (the ``type`` of shapes-world human turns); where the split has the
  shapes world's ``scenes.jsonl``, also for images with and without a held-out (colour, shape)
  pair (``vqa_accuracy_seen`` / ``vqa_accuracy_held_out``), the composition gap of reading;
* ``t2i_accuracy``: the shapes-world judge reads the generated picture and every attribute the
  prompt names (shape, colour, size, position of each object) must be right; reported for
  seen and held-out (colour, shape) combinations separately;
* ``description_accuracy``: the same match for the whole answer to the shapes world's
  description turn (human turns of type ``caption``; kept out of the VQA figures);
* ``decompression_code_accuracy``: with Ẑ in context and the true earlier codes fed back
  (teacher forcing), the fraction of the h·w·D codes the model predicts exactly.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.images import image_limits, split_folder
from ..data.multimodal import cached_codes, read_llava, read_pairs
from ..data.shapes import DESCRIBE_TYPE, read_scenes
from ..errors import UnicodebookError
from ..lm.sequence import collate
from ..utils.modules import eval_mode

_ARTICLES = {"a", "an", "the"}


def normalise_answer(s: str) -> str:
    words = re.sub(r"[^\w\s]", " ", s.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def questions_of(conversations) -> list[tuple[str, str, str, str]]:
    """(image, question, answer, type) for each human→gpt pair."""
    out = []
    for c in conversations:
        turns = c.turns
        for h, g in zip(turns[::2], turns[1::2]):
            if h["from"] == "human" and g["from"] == "gpt":
                out.append((c.image, h["value"].replace("<image>", "").strip(), g["value"], h.get("type", "all")))
    return out


@torch.no_grad()
def evaluate_model(
    model,
    data: str | Path,
    split: str = "test",
    batch_size: int = 64,
    max_t2i: int | None = None,
    max_vqa: int | None = None,
    max_decompress: int = 200,
    max_describe: int = 200,
    cfg_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    progress: bool = True,
    pictures: Path | None = None,
) -> dict:
    """Metrics of a stage II model on a split (a shapes-world root or a folder with the files)."""
    folder = split_folder(data, split)
    g = model.config.generate
    cfg_scale = g.cfg_scale if cfg_scale is None else cfg_scale
    temperature = g.temperature if temperature is None else temperature
    top_k = g.top_k if top_k is None else top_k
    res: dict = {"split": split}
    d = model.config.data
    convs, bad = (
        read_llava(folder / "instruct.json", d.max_conversation_chars)
        if (folder / "instruct.json").exists()
        else ([], 0)
    )
    pairs, bad2 = read_pairs(folder / "t2i.jsonl", d.max_caption_chars) if (folder / "t2i.jsonl").exists() else ([], 0)
    if not convs and not pairs:
        raise UnicodebookError(f"{folder}: nothing to evaluate (no instruct.json or t2i.jsonl records)")
    res["bad_records"] = bad + bad2
    visual_tok = model.tokenizer
    cache = cached_codes(
        visual_tok,
        folder,
        [c.image for c in convs] + [p.image for p in pairs],
        progress=progress,
        odd_size=d.odd_size,
        limits=image_limits(d),
        features=model.reads_features,
    )
    res["bad_images"] = len(cache.bad)
    with eval_mode(model):
        if convs:
            qs = questions_of(convs)
            held_out = {image: sc.held_out for image, sc in read_scenes(folder).items()}
            res.update(
                _vqa(
                    model,
                    cache,
                    [q for q in qs if q[3] != DESCRIBE_TYPE][:max_vqa],
                    batch_size,
                    progress,
                    pictures,
                    held_out,
                )
            )
            described = [q for q in qs if q[3] == DESCRIBE_TYPE][:max_describe]
            if described:
                res.update(_describe(model, cache, described, batch_size))
            if "decompress" in visual_tok.tasks:
                images = sorted({c.image for c in convs if c.image in cache.index})[:max_decompress]
                res["decompression_code_accuracy"] = _decompression(model, cache, images, batch_size)
        pairs = pairs[:max_t2i]
        if pairs:
            res.update(_t2i(model, pairs, batch_size, cfg_scale, temperature, top_k, seed, progress, pictures))
            res.update(_t2i_reference(model, cache, pairs, batch_size))
    return res


def _answered(model, cache, qs, batch_size: int, max_new_tokens: int = 16, desc: str | None = None):
    """(image, question, truth, type, prediction) for each question whose image has codes, greedy."""
    qs = [q for q in qs if q[0] in cache.index]
    for s in tqdm(range(0, len(qs), batch_size), desc=desc, disable=desc is None, leave=False):
        chunk = qs[s : s + batch_size]
        codes, features = cache.take([cache.index[q[0]] for q in chunk])
        answers = model.answer(codes, [q[1] for q in chunk], max_new_tokens=max_new_tokens, features=features)
        yield from ((*q, pred) for q, pred in zip(chunk, answers))


def _vqa(
    model, cache, qs, batch_size: int, progress: bool, pictures: Path | None, held_out: dict[str, bool] | None = None
) -> dict:
    right: dict[str, list[bool]] = defaultdict(list)
    by_scene: dict[bool, list[bool]] = defaultdict(list)
    held_out = held_out or {}
    examples = []
    for img, q, a, t, pred in _answered(model, cache, qs, batch_size, desc="VQA" if progress else None):
        ok = normalise_answer(pred) == normalise_answer(a)
        right["all"].append(ok)
        if t != "all":
            right[t].append(ok)
        if img in held_out:
            by_scene[held_out[img]].append(ok)
        if len(examples) < 12:
            examples.append((img, q, pred, a, ok))
    if pictures is not None and examples:
        _vqa_picture(model, cache, examples, pictures / "vqa_examples.png")
    allr = right["all"]
    res = {
        "vqa_accuracy": sum(allr) / max(1, len(allr)),
        "vqa_n": len(allr),
        "vqa_by_type": {t: round(sum(v) / len(v), 4) for t, v in sorted(right.items()) if t != "all"},
    }
    for name, flag in (("seen", False), ("held_out", True)):
        if by_scene[flag]:
            res[f"vqa_accuracy_{name}"] = sum(by_scene[flag]) / len(by_scene[flag])
            res[f"vqa_n_{name}"] = len(by_scene[flag])
    res["vqa_examples"] = [{"image": i, "question": q, "answer": p, "truth": a} for i, q, p, a, _ in examples[:6]]
    return res


def _describe(model, cache, qs, batch_size: int) -> dict:
    """Whole-description match: every object's words must come out, in the caption's order."""
    right, n, examples = 0, 0, []
    for img, _, a, _, pred in _answered(model, cache, qs, batch_size, max_new_tokens=64):
        right += normalise_answer(pred) == normalise_answer(a)
        n += 1
        if len(examples) < 4:
            examples.append({"image": img, "answer": pred, "truth": a})
    return {"description_accuracy": right / max(1, n), "description_n": n, "description_examples": examples}


def _vqa_picture(model, cache, examples, path: Path) -> None:
    from .plots import captioned_grid

    codes = cache.codes[[cache.index[e[0]] for e in examples]].long()
    images = model.tokenizer.decode(codes)
    caps = [f"Q: {q} A: {p} ({'right' if ok else 'truth: ' + a})" for _, q, p, a, ok in examples]
    captioned_grid(images.cpu(), caps, cols=4, width_chars=26).save(path)


def _decompression(model, cache, images: list[str], batch_size: int) -> float:
    """Teacher-forced: the fraction of the images' codes the model predicts exactly (the flat
    layout's code tokens, or the depth head's codes of every position)."""
    fmt = model.fmt
    right = total = 0.0
    for s in range(0, len(images), batch_size):
        codes = cache.codes[[cache.index[i] for i in images[s : s + batch_size]]].long()
        batch = collate([fmt.decompression(c) for c in codes], fmt.pad_id)
        out = model(batch, model.latents(codes))
        n = codes.shape[0] * model.codes_per_image
        right += float(out.code_accuracy) * n
        total += n
    return right / max(1.0, total)


def _judge(images: torch.Tensor, captions: list[str]) -> list[bool]:
    """Does each picture (B, 3, H, W) in [0, 1] show everything its caption names?"""
    from ..data.shapes import matches_prompt

    arr = (images.clamp(0, 1) * 255 + 0.5).byte().permute(0, 2, 3, 1).numpy()
    return [bool(matches_prompt(a, c)) for a, c in zip(arr, captions)]


def _t2i_reference(model, cache, pairs, batch_size: int) -> dict:
    """The ceiling the frozen tokenizer sets: the judge on the reconstructions of the pairs' own
    images, i.e. what a stage II model that emitted exactly the reference codes would score."""
    from ..data.shapes import judgeable

    if not all(judgeable(p.caption) for p in pairs):  # judged only where _t2i judges too
        return {}
    pairs = [p for p in pairs if p.image in cache.index]
    ok: dict[bool, list[bool]] = {False: [], True: []}
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        images = model.tokenizer.decode(cache.codes[[cache.index[p.image] for p in chunk]].long()).cpu()
        hits = _judge(images, [p.caption for p in chunk])
        for p, hit in zip(chunk, hits):
            ok[p.held_out].append(hit)
    return {
        f"t2i_reference_accuracy_{name}": sum(ok[flag]) / len(ok[flag])
        for name, flag in (("seen", False), ("held_out", True))
        if ok[flag]
    }


def _t2i(
    model,
    pairs,
    batch_size: int,
    cfg_scale: float,
    temperature: float,
    top_k: int,
    seed: int,
    progress: bool,
    pictures: Path | None,
) -> dict:
    from ..data.shapes import judgeable

    judged = all(judgeable(p.caption) for p in pairs)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    ok: dict[bool, list[bool]] = {False: [], True: []}
    shown: dict[bool, list[tuple[torch.Tensor, str]]] = {False: [], True: []}  # the first 8 of each kind
    layout = model.tokenizer.layout
    lengths: list[int] = []  # a variable layout's generated lengths
    for s in tqdm(range(0, len(pairs), batch_size), desc="text-to-image", disable=not progress, leave=False):
        chunk = pairs[s : s + batch_size]
        codes = model.generate_codes([p.caption for p in chunk], cfg_scale, temperature, top_k, gen)
        images = model.tokenizer.decode(codes).cpu()
        if not layout.fixed:
            lengths += layout.lengths(codes).tolist()
        hits = _judge(images, [p.caption for p in chunk]) if judged else [False] * len(chunk)
        for p, hit, img in zip(chunk, hits, images):
            ok[p.held_out].append(hit)
            if len(shown[p.held_out]) < 8:
                verdict = f", {'right' if hit else 'wrong'}" if judged else ""
                shown[p.held_out].append(
                    (img, f"{p.caption.removeprefix('draw ')} [{'held-out' if p.held_out else 'seen'}{verdict}]")
                )
    out: dict = {"t2i_n": len(pairs), "cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k}
    if judged:
        allr = ok[False] + ok[True]
        out["t2i_accuracy"] = sum(allr) / len(allr)
        for name, flag in (("seen", False), ("held_out", True)):
            if ok[flag]:
                out[f"t2i_accuracy_{name}"] = sum(ok[flag]) / len(ok[flag])
                out[f"t2i_n_{name}"] = len(ok[flag])
    if lengths:  # how often the image ended at </img> inside the layout's range, not cut at its maximum
        out["t2i_ended_in_range"] = sum(layout.shortest <= n < layout.length for n in lengths) / len(lengths)
        out["t2i_codes_mean"] = sum(lengths) / len(lengths)
    tiles = shown[False] + shown[True]  # seen prompts first, then held-out ones
    if pictures is not None and tiles:
        from .plots import captioned_grid

        captioned_grid(torch.stack([t for t, _ in tiles]), [c for _, c in tiles], cols=4).save(
            pictures / "t2i_samples.png"
        )
    return out
