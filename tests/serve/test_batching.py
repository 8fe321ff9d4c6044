"""Greedy drawing requests that wait for the model together are drawn by one batched call, and
each gets the pictures it would have got alone; sampled requests keep their own call (their seed)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _serving import png_pixels  # noqa: E402

from unicodebook.lm.model import load_model  # noqa: E402
from unicodebook.serve import Limits, create_app  # noqa: E402

PROMPTS = [
    "a red circle in the center",
    "a small blue square at the top left and a green triangle on the right",
    "two yellow stars",
]


@pytest.fixture(scope="module")
def model(model_run):
    return load_model(model_run)


def _held_scenario(model, app, bodies: list[dict]) -> list[httpx.Response]:
    """Hold the model with a first drawing, send ``bodies`` while it is held, then release it."""
    release, entered = threading.Event(), threading.Event()
    real = model.generate_codes
    calls: list[int] = []

    def counted(prompts, *args, **kw):
        calls.append(len(prompts))
        if len(calls) == 1:
            entered.set()
            assert release.wait(30)
        return real(prompts, *args, **kw)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            first = asyncio.create_task(c.post("/v1/images/generations", json={"prompt": "a red circle"}))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            waiting = [asyncio.create_task(c.post("/v1/images/generations", json=b)) for b in bodies]
            while app.state.worker.waiting < 1 + len(bodies):
                await asyncio.sleep(0.01)
            release.set()
            return [await first] + [await w for w in waiting]

    model.generate_codes = counted
    try:
        responses = asyncio.run(scenario())
    finally:
        del model.generate_codes
    responses.append(calls)
    return responses


def test_waiting_greedy_drawings_share_one_call_and_draw_what_they_draw_alone(model):
    app = create_app(model, "model")
    bodies = [{"prompt": p, "n": n} for p, n in zip(PROMPTS, (1, 2, 1))]
    *responses, calls = _held_scenario(model, app, bodies)
    assert all(r.status_code == 200 for r in responses)
    # the held call drew 1 image; the three waiting requests (4 images) were drawn by one call
    assert calls == [1, 4]
    assert [r.json()["batched_requests"] for r in responses] == [1, 3, 3, 3]
    alone = [
        model.generate_image(b["prompt"], n=b["n"], cfg_scale=model.config.generate.cfg_scale, temperature=0.0)
        for b in bodies
    ]
    assert not np.array_equal(alone[0][0].numpy(), alone[1][0].numpy())  # the prompts draw different pictures
    from unicodebook.data.images import tensor_to_pil

    for res, pictures in zip(responses[1:], alone):
        data = res.json()["data"]
        assert len(data) == len(pictures)
        for item, picture in zip(data, pictures):
            assert np.array_equal(png_pixels(item["b64_json"]), np.asarray(tensor_to_pil(picture)))


def test_a_batched_call_holds_at_most_max_draw_batch_images_and_sampled_requests_draw_alone(model):
    app = create_app(model, "model", Limits(max_draw_batch=3))
    bodies = [
        {"prompt": PROMPTS[0], "n": 2},
        {"prompt": PROMPTS[1], "n": 2},
        {"prompt": PROMPTS[2], "temperature": 1.0, "seed": 3},
        {"prompt": PROMPTS[2], "n": 1},
    ]
    *responses, calls = _held_scenario(model, app, bodies)
    assert all(r.status_code == 200 for r in responses)
    # 2 + 2 greedy images exceed 3: two calls; the greedy 1 joins the second; the sampled one draws alone
    assert sorted(calls[1:]) == [1, 2, 3] and len(calls) == 4
    served = [r.json()["batched_requests"] for r in responses[1:]]
    assert served[0] == 1 and served[1] == served[3] == 2 and served[2] == 1
