"""lmms-eval plugin: a stage II model folder as lmms-eval's ``unicodebook`` model.

lmms-eval finds it through the ``lmms_eval.models`` entry point this package declares, so with
both installed::

    python -m lmms_eval --model unicodebook --model_args pretrained=runs/model,batch_size=8 --tasks TASK

runs the model in-process (no server). It is a *simple* lmms-eval model: a request brings its
question text (``<image>`` markers removed) and its visuals; the first image is read at the
tokenizer's size, the answer is greedy (``temperature`` 0) or sampled, cut at the task's
``until`` strings. Scoring by log-likelihood (multiple-choice tasks) is not offered.

The request handling (:func:`answer_requests`) needs no lmms-eval and is tested without it;
the class needs lmms-eval and is defined only when lmms-eval imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnicodebookError

MODEL_ID = "unicodebook"
CLASS_PATH = "unicodebook.eval.lmms_plugin.UnicodebookLMMs"


@dataclass
class Request:
    """One lmms-eval ``generate_until`` request, its parts as the model needs them."""

    question: str
    images: Sequence[Any]  # PIL images (or anything :func:`pil_to_tensor` reads), the first one is read
    gen_kwargs: dict = field(default_factory=dict)


def _question(context: str) -> str:
    return " ".join(context.replace("<image>", " ").split())


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


def answer_requests(model, requests: Sequence[Request], batch_size: int = 8) -> list[str]:
    """The model's answers, in order: greedy requests in batches of ``batch_size`` (one decoding
    each batch), sampled ones (``temperature`` > 0, ``seed`` from the request's kwargs if any)
    one at a time."""
    from ..data.images import pil_to_tensor

    size, odd = model.tokenizer.image_size, model.config.data.odd_size
    default_budget = model.config.generate.max_new_tokens  # as `unicodebook chat` answers
    answers: list[str | None] = [None] * len(requests)

    def read(r: Request) -> torch.Tensor:
        if not r.images:
            raise UnicodebookError(
                f"lmms-eval request '{r.question[:60]}' has no image: this model answers questions about an image"
            )
        return pil_to_tensor(r.images[0], size=size, odd_size=odd, name="lmms-eval visual")

    def until(r: Request) -> list[str]:
        u = r.gen_kwargs.get("until") or []
        return [u] if isinstance(u, str) else list(u)

    greedy = [i for i, r in enumerate(requests) if not r.gen_kwargs.get("temperature")]
    for start in range(0, len(greedy), batch_size):
        chunk = greedy[start : start + batch_size]
        by_budget: dict[int, list[int]] = {}
        for i in chunk:  # one decoding per max_new_tokens in the chunk
            by_budget.setdefault(int(requests[i].gen_kwargs.get("max_new_tokens", default_budget)), []).append(i)
        for budget, idx in by_budget.items():
            with torch.inference_mode():
                codes, features = model.encode(torch.stack([read(requests[i]) for i in idx]))
            texts = model.answer(codes, [requests[i].question for i in idx], budget, features=features)
            for i, text in zip(idx, texts):
                answers[i] = _cut(text, until(requests[i]))
    for i, r in enumerate(requests):
        if answers[i] is None:
            with torch.inference_mode():
                codes, features = model.encode(read(r)[None])
            pieces = model.stream_answer(
                codes[0],
                r.question,
                int(r.gen_kwargs.get("max_new_tokens", default_budget)),
                temperature=float(r.gen_kwargs["temperature"]),
                seed=r.gen_kwargs.get("seed"),
                features=None if features is None else features[0],
            )
            answers[i] = _cut("".join(pieces), until(r))
    return answers  # type: ignore[return-value]


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's manifest naming this model's class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


try:
    from lmms_eval.api.model import lmms as _LMMs
except ImportError:  # lmms-eval not installed: answer_requests still works
    _LMMs = None

if _LMMs is not None:

    class UnicodebookLMMs(_LMMs):
        """lmms-eval's view of a stage II model folder (``pretrained=RUN``)."""

        is_simple = True

        def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 8, **kwargs) -> None:
            super().__init__()
            from ..lm.model import load_model

            self.model = load_model(pretrained, device=device)
            self.batch_size_per_gpu = int(batch_size)

        def generate_until(self, requests) -> list[str]:
            mine = []
            for req in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
                mine.append(Request(_question(context), list(visuals), dict(gen_kwargs or {})))
            return answer_requests(self.model, mine, self.batch_size_per_gpu)

        def loglikelihood(self, requests):
            raise NotImplementedError(
                "the unicodebook lmms-eval model generates answers; "
                "log-likelihood scoring (multiple-choice tasks) is not offered"
            )

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("the unicodebook model answers one question about one image")
