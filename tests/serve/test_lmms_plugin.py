"""The lmms-eval plugin: declared where lmms-eval looks for it, answering its requests as the
model answers (greedy batches equal one-by-one answers, `until` cuts, a seed fixes a sampled
answer). lmms-eval itself is not installed in CI: the test that needs it is skipped there."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from _serving import QUESTION, talking_copy
from PIL import Image

from unicodebook.data.images import load_image
from unicodebook.errors import UnicodebookError
from unicodebook.eval.lmms_plugin import Request, answer_requests
from unicodebook.lm.model import load_model


@pytest.fixture(scope="module")
def model(model_run, tmp_path_factory):
    return load_model(talking_copy(model_run, tmp_path_factory.mktemp("talk") / "model"))


@pytest.fixture(scope="module")
def images(shapes_dir):
    return [shapes_dir / "test" / "images" / f"{i:06d}.png" for i in range(5)]


def _alone(model, path, question, max_new_tokens=16):
    codes = model.tokenizer.encode(load_image(path, model.tokenizer.image_size)[None])
    return model.answer(codes, [question], max_new_tokens)[0]


def test_the_plugin_is_declared_where_lmms_eval_looks_for_models():
    (ep,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "unicodebook"]
    assert ep.value == "unicodebook.eval.lmms_plugin:manifest"


def test_batched_greedy_requests_get_the_answers_asked_alone_cut_at_until(model, images):
    questions = [QUESTION, "how many objects are there?", "is there a red circle?", QUESTION, "describe the image."]
    budgets = [16, 16, 4, 16, 8]
    requests = [
        Request(q, [Image.open(p).convert("RGB")], {"max_new_tokens": b, "temperature": 0})
        for q, p, b in zip(questions, images, budgets)
    ]
    got = answer_requests(model, requests, batch_size=2)
    alone = [_alone(model, p, q, b) for q, p, b in zip(questions, images, budgets)]
    assert got == [a.strip() for a in alone]
    assert any(len(a.split()) > 1 for a in got)  # the answers say something: the comparison is not '' == ''
    word = got[0].split()[1]
    cut = answer_requests(model, [Request(QUESTION, [Image.open(images[0])], {"until": [word]})])[0]
    assert cut == got[0][: got[0].index(word)].strip()


def test_a_seed_fixes_a_sampled_answer_and_a_request_without_an_image_is_refused(model, images):
    def sampled(seed):
        kw = {"temperature": 1.0, "seed": seed, "max_new_tokens": 12}
        return answer_requests(model, [Request(QUESTION, [Image.open(images[1])], kw)])[0]

    assert sampled(3) == sampled(3)
    assert len({sampled(s) for s in range(4)}) > 1
    with pytest.raises(UnicodebookError, match="has no image: this model answers questions about an image"):
        answer_requests(model, [Request(QUESTION, [])])


def test_lmms_eval_loads_the_model_through_its_registry(model_run, images):
    pytest.importorskip("lmms_eval")
    from unicodebook.eval.lmms_plugin import UnicodebookLMMs, manifest

    assert manifest().simple_class_path == "unicodebook.eval.lmms_plugin.UnicodebookLMMs"
    lm = UnicodebookLMMs(pretrained=str(model_run), batch_size=2)

    class Instance:  # lmms-eval's Instance carries its request in .args
        def __init__(self, args):
            self.args = args

    lm.task_dict = {"t": {"test": {0: {"image": Image.open(images[0])}}}}
    out = lm.generate_until(
        [Instance(("<image>\n" + QUESTION, {"max_new_tokens": 8}, lambda doc: [doc["image"]], 0, "t", "test"))]
    )
    assert out == [_alone(lm.model, images[0], QUESTION, 8).strip()]
