"""No request crashes the server: each bad one gets a 4xx in OpenAI's error shape with a clear
message, and a good request afterwards is still answered; /health answers during a long model
call; a streaming client that goes away frees the model."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from _serving import chat_body, data_url, sse_events  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from unicodebook.lm.model import load_model  # noqa: E402
from unicodebook.serve import Limits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def model(model_run):
    return load_model(model_run)


@pytest.fixture(scope="module")
def image(shapes_dir):
    return shapes_dir / "test" / "images" / "000000.png"


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "white").save(buf, format="PNG")
    return buf.getvalue()


def test_bad_requests_get_clear_4xx_errors_and_the_server_still_answers(model, image):
    good = chat_body(data_url(image))
    png = image.read_bytes()
    long_question = " ".join(["what colour is the small red circle at the top left"] * 150)
    bad = [  # (body, status, words the message must hold)
        (chat_body(data_url(b"hello, world", "text/plain")), 400, "not an image"),
        (chat_body(data_url(b"just some bytes", "image/png")), 400, "not an image file"),
        (chat_body(data_url(png[:60])), 400, "corrupt or truncated"),
        (chat_body(data_url(_png(4100, 4100))), 400, "4100×4100 px"),
        (chat_body("data:image/png;base64,@@@"), 400, "not valid base64"),
        ({"model": "model", "messages": []}, 400, "messages is empty"),
        (chat_body(None), 400, "add an image_url part"),
        ({**good, "model": "gpt-4o"}, 404, "'gpt-4o' does not exist"),
        ({**good, "max_tokens": 0}, 400, "max_tokens must be within 1..256"),
        ({**good, "max_tokens": 100000}, 400, "max_tokens must be within 1..256"),
        (chat_body(data_url(image), long_question, max_tokens=256), 400, "past the model's context of 1024"),
        ({"model": "model", "messages": good["messages"] * 2}, 400, "holds 2 images"),
        ({"prompt": "a red circle", "n": 0}, 400, "n must be within 1..8"),
        ({"prompt": "a red circle", "n": 9}, 400, "n must be within 1..8"),
        ({"prompt": "a red circle", "response_format": "url"}, 400, "b64_json"),
        ({"prompt": "   "}, 400, "prompt is empty"),
        ({"prompt": long_question[:7000]}, 400, "past the model's context"),
        ("{not json", 400, "not valid JSON"),
        (b"", 400, "needs a JSON body"),
    ]
    with TestClient(create_app(model, "model"), raise_server_exceptions=False) as c:
        before = c.post("/v1/chat/completions", json=good).json()["choices"][0]["message"]["content"]
        for body, status, words in bad:
            path = "/v1/images/generations" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
            if isinstance(body, dict):
                res = c.post(path, json=body)
            else:
                res = c.post(path, content=body, headers={"content-type": "application/json"})
            assert res.status_code == status, (words, res.text)
            err = res.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and words in err["message"], (words, err)
        after = c.post("/v1/chat/completions", json=good)
        assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == before
        assert c.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 0}).status_code == 200


def test_a_body_past_the_limit_is_a_413(model, image):
    with TestClient(create_app(model, "model", Limits(max_body_bytes=300))) as c:
        res = c.post("/v1/chat/completions", json=chat_body(data_url(image)))
        assert res.status_code == 413 and "larger than 300 bytes" in res.json()["error"]["message"]
        chunked = c.post(
            "/v1/chat/completions",
            content=iter([b"{" + b" " * 200, b" " * 200 + b"}"]),
            headers={"content-type": "application/json"},
        )
        assert chunked.status_code == 413  # no Content-Length: counted as it arrives
        assert c.post("/v1/images/generations", json={"prompt": "a red circle"}).status_code == 200


def test_health_answers_while_the_model_is_busy(model):
    app = create_app(model, "model")
    release, entered = threading.Event(), threading.Event()
    real = model.generate_codes

    def slow(*args, **kw):  # a long generation: it holds the model until the test releases it
        entered.set()
        assert release.wait(30)
        return real(*args, **kw)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            drawing = asyncio.create_task(c.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 0}))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            health = await c.get("/health")
            waited = time.perf_counter() - t0
            assert not drawing.done()
            release.set()
            return health, waited, await drawing

    model.generate_codes = slow
    try:
        health, waited, drawn = asyncio.run(scenario())
    finally:
        del model.generate_codes
    assert health.status_code == 200 and health.json()["busy"] is True and waited < 1.0
    assert drawn.status_code == 200 and len(drawn.json()["data"]) == 1


def test_a_client_that_disconnects_mid_stream_frees_the_model(model, image):
    import uvicorn

    from unicodebook.serve.run import bind

    closed = threading.Event()

    def endless(*args, **kw):  # an answer that never ends on its own
        try:
            while True:
                time.sleep(0.01)
                yield "word "
        finally:
            closed.set()

    app = create_app(model, "model")
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    model.stream_answer = endless
    try:
        while not server.started:
            time.sleep(0.02)
        with httpx.Client(base_url=url, timeout=10) as c:
            with c.stream("POST", "/v1/chat/completions", json=chat_body(data_url(image), stream=True)) as res:
                got = ""
                for text in res.iter_text():
                    got += text
                    if got.count("word") >= 3:
                        break  # the client goes away mid-answer
            assert closed.wait(5), "the decoding went on after the client left"
            del model.stream_answer
            t0 = time.perf_counter()
            while c.get("/health").json()["busy"] and time.perf_counter() - t0 < 5:
                time.sleep(0.02)
            assert c.get("/health").json() == {"status": "ok", "model": "model", "busy": False, "waiting": 0}
            res = c.post("/v1/chat/completions", json=chat_body(data_url(image), stream=True))
            assert res.status_code == 200 and sse_events(res.text)[-1] == "[DONE]"
    finally:
        model.__dict__.pop("stream_answer", None)
        server.should_exit = True
        thread.join(10)
