"""The real ``unicodebook serve`` process on 127.0.0.1 (a free port), called over HTTP: its
greedy answers and seeded pictures are the CLI's ``chat`` and ``generate`` for the same model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from _serving import QUESTION, chat_body, data_url, png_pixels, server_process, sse_events, talking_copy  # noqa: E402

from unicodebook.cli import main  # noqa: E402

PROMPT = "draw a small red circle at the top left"


@pytest.fixture(scope="module")
def talk(model_run, tmp_path_factory):
    return talking_copy(model_run, tmp_path_factory.mktemp("talk_proc") / "model")


def test_the_served_model_answers_and_draws_as_the_cli_does(talk, shapes_dir, tmp_path, capsys):
    images = [shapes_dir / "test" / "images" / f"00000{i}.png" for i in range(3)]
    cli_answers = []
    for img in images:
        assert main(["chat", "--model", str(talk), "--image", str(img), QUESTION]) == 0
        cli_answers.append(capsys.readouterr().out.strip())
    assert (
        main(
            [
                "generate",
                "--model",
                str(talk),
                PROMPT,
                "--out",
                str(tmp_path / "g.png"),
                "--n",
                "2",
                "--temperature",
                "1",
                "--top-k",
                "8",
                "--seed",
                "7",
            ]
        )
        == 0
    )
    cli_pictures = [np.asarray(Image.open(p).convert("RGB")) for p in json.loads(capsys.readouterr().out)["images"]]
    assert any(cli_answers)

    with server_process(talk) as (url, proc):
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/health").json()["status"] == "ok"
            assert c.get("/v1/models").json()["data"][0]["id"] == "model"
            for img, expected in zip(images, cli_answers):
                res = c.post("/v1/chat/completions", json=chat_body(data_url(img)))
                assert res.status_code == 200 and res.json()["choices"][0]["message"]["content"] == expected
                streamed = sse_events(c.post("/v1/chat/completions", json=chat_body(data_url(img), stream=True)).text)
                assert streamed[-1] == "[DONE]"
                text = "".join(
                    json.loads(e)["choices"][0]["delta"].get("content", "")
                    for e in streamed[:-1]
                    if json.loads(e)["choices"]
                )
                assert text == expected
            res = c.post(
                "/v1/images/generations",
                json={"prompt": PROMPT, "n": 2, "temperature": 1, "top_k": 8, "seed": 7, "response_format": "b64_json"},
            )
            assert res.status_code == 200
            served = [png_pixels(d["b64_json"]) for d in res.json()["data"]]
            assert len(served) == 2 and all(np.array_equal(a, b) for a, b in zip(served, cli_pictures))
            bad = c.post("/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
            assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        assert proc.poll() is None  # still serving after all that


def test_serve_on_a_missing_model_is_one_error_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error: model folder '{tmp_path / 'nowhere'}' does not exist"]


def test_serve_on_a_taken_port_is_one_error_line(talk, capsys):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(talk), "--port", str(port)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    finally:
        taken.close()


def test_serve_with_a_draw_batch_below_one_is_one_error_line(talk, capsys):
    assert main(["serve", "--model", str(talk), "--port", "0", "--max-draw-batch", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["error: --max-draw-batch must be at least 1, got 0"]
