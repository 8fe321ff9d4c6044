"""`eval model`'s text-to-image figures: the judge's verdicts on generated pictures, and the
ceiling the frozen tokenizer sets (the same judge on the reconstructions of the reference images)."""

import pytest
import torch

from unicodebook.data.multimodal import cached_codes, read_pairs
from unicodebook.eval.model import evaluate_model
from unicodebook.lm.model import load_model


@pytest.fixture(scope="module")
def model(model_run):
    return load_model(model_run)


def test_a_model_that_emits_the_reference_codes_scores_the_reference_ceiling(model, shapes_dir, monkeypatch):
    folder = shapes_dir / "test"
    pairs, _ = read_pairs(folder / "t2i.jsonl")
    cache = cached_codes(model.tokenizer, folder, [p.image for p in pairs], progress=False)
    queue = [cache.codes[cache.index[p.image]].long() for p in pairs]

    def reference_codes(prompts, *args, **kwargs):  # the perfect stage II model: the image's own codes
        return torch.stack([queue.pop(0) for _ in prompts])

    monkeypatch.setattr(model, "generate_codes", reference_codes)
    res = evaluate_model(
        model, shapes_dir, "test", batch_size=5, max_vqa=0, max_decompress=0, max_describe=0, progress=False
    )
    assert not queue  # every prompt was drawn, in order
    assert res["t2i_n_seen"] > 0 and res["t2i_n_held_out"] > 0
    for name in ("seen", "held_out"):
        assert res[f"t2i_accuracy_{name}"] == res[f"t2i_reference_accuracy_{name}"]


def test_descriptions_are_scored_whole_and_apart_from_the_questions(model, shapes_dir, monkeypatch):
    """A model that answers every turn with its truth: VQA and description both 1; one whose every
    description has one word too many: description 0, VQA untouched."""
    from unicodebook.data.multimodal import read_llava
    from unicodebook.data.shapes import DESCRIBE_TYPE
    from unicodebook.eval.model import questions_of

    convs, _ = read_llava(shapes_dir / "test" / "instruct.json")
    qs = questions_of(convs)
    questions = [a for _, _, a, t in qs if t != DESCRIBE_TYPE]
    descriptions = [a for _, _, a, t in qs if t == DESCRIBE_TYPE]
    assert len(descriptions) == len(convs)

    for suffix, expected in (("", 1.0), (" too", 0.0)):
        queue = questions + [d + suffix for d in descriptions]  # asked in this order: questions, then descriptions

        def answer(codes, asked, max_new_tokens=16, features=None, queue=queue):
            return [queue.pop(0) for _ in asked]

        monkeypatch.setattr(model, "answer", answer)
        res = evaluate_model(model, shapes_dir, "test", batch_size=7, max_decompress=0, max_t2i=0, progress=False)
        assert not queue
        assert res["vqa_accuracy"] == 1.0 and res["vqa_n"] == len(questions)
        assert res["description_n"] == len(descriptions) and res["description_accuracy"] == expected


def test_the_text_to_image_picture_shows_seen_prompts_then_held_out_ones(model, shapes_dir, monkeypatch, tmp_path):
    """``pictures``: up to 8 seen and 8 held-out prompts, each captioned with its kind and verdict."""
    from PIL import Image

    from unicodebook.eval import plots

    folder = shapes_dir / "test"
    pairs, _ = read_pairs(folder / "t2i.jsonl")
    cache = cached_codes(model.tokenizer, folder, [p.image for p in pairs], progress=False)
    queue = [cache.codes[cache.index[p.image]].long() for p in pairs]
    monkeypatch.setattr(model, "generate_codes", lambda prompts, *a, **k: torch.stack([queue.pop(0) for _ in prompts]))
    drawn = []
    original = plots.captioned_grid
    monkeypatch.setattr(
        plots, "captioned_grid", lambda images, caps, **k: drawn.append(caps) or original(images, caps, **k)
    )

    res = evaluate_model(
        model,
        shapes_dir,
        "test",
        batch_size=5,
        max_vqa=0,
        max_decompress=0,
        max_describe=0,
        progress=False,
        pictures=tmp_path,
    )
    seen = [p.caption.removeprefix("draw ") for p in pairs if not p.held_out][:8]
    held = [p.caption.removeprefix("draw ") for p in pairs if p.held_out][:8]
    assert res["t2i_n_held_out"] > 0 and len(drawn) == 1
    caps = drawn[0]
    assert [c.split(" [")[0] for c in caps] == seen + held
    assert all(c.endswith((", right]", ", wrong]")) for c in caps)
    assert [c.split(" [")[1].split(",")[0] for c in caps] == ["seen"] * len(seen) + ["held-out"] * len(held)
    assert Image.open(tmp_path / "t2i_samples.png").size[0] > 0


def test_vqa_is_also_scored_apart_for_images_holding_a_held_out_pair(model, shapes_dir, monkeypatch):
    """A model right on every image without a held-out (colour, shape) pair and wrong on every image
    with one: seen 1, held-out 0, the two counts adding up to all questions."""
    import json

    from unicodebook.data.multimodal import read_llava
    from unicodebook.data.shapes import DESCRIBE_TYPE, Scene
    from unicodebook.eval.model import questions_of

    folder = shapes_dir / "test"
    held = {
        r["image"]: Scene.from_dict(r["scene"]).held_out
        for r in map(json.loads, (folder / "scenes.jsonl").read_text().splitlines())
    }
    convs, _ = read_llava(folder / "instruct.json")
    qs = [q for q in questions_of(convs) if q[3] != DESCRIBE_TYPE]
    queue = ["nothing" if held[img] else a for img, _, a, _ in qs]  # "nothing": never a shapes-world answer
    assert any(held[q[0]] for q in qs) and not all(held[q[0]] for q in qs)
    monkeypatch.setattr(
        model, "answer", lambda codes, asked, max_new_tokens=16, features=None: [queue.pop(0) for _ in asked]
    )
    res = evaluate_model(
        model, shapes_dir, "test", batch_size=6, max_decompress=0, max_t2i=0, max_describe=0, progress=False
    )
    assert not queue
    assert res["vqa_accuracy_seen"] == 1.0 and res["vqa_accuracy_held_out"] == 0.0
    assert res["vqa_n_seen"] + res["vqa_n_held_out"] == res["vqa_n"] == len(qs)
