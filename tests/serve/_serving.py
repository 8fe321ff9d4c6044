"""Helpers shared by the serve tests: a tiny model that talks, data URLs, a real server process."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

QUESTION = "what colour is the object in the center?"


def talking_copy(model_run: Path, out: Path) -> Path:
    """A copy of the tiny model whose end-of-answer logit is pinned to 0 (its output row zeroed).

    Eight training steps leave the tiny model ending every answer at once, and '' == '' would
    prove nothing; pinned, its greedy answers run several tokens, still the model's own."""
    import torch
    from safetensors.torch import load_file, save_file

    from unicodebook.lm.text import load_text_tokenizer

    shutil.copytree(model_run, out)
    eos = load_text_tokenizer(out / "text_tokenizer").eos_token_id
    weights = out / "llm" / "model.safetensors"
    state = load_file(weights)
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # untied: reading unchanged
    state["lm_head.weight"][eos] = 0
    save_file(state, weights, metadata={"format": "pt"})
    return out


def data_url(path: Path | bytes, mime: str = "image/png") -> str:
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(url: str | None, question: str = QUESTION, model: str = "model", **kw) -> dict:
    parts = ([{"type": "image_url", "image_url": {"url": url}}] if url else []) + [{"type": "text", "text": question}]
    return {"model": model, "messages": [{"role": "user", "content": parts}], **kw}


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of a server-sent-event stream, in order."""
    return [block[len("data: ") :] for block in text.split("\n\n") if block.startswith("data: ")]


@contextlib.contextmanager
def server_process(model: Path, *extra: str, timeout: float = 120):
    """``unicodebook serve --model MODEL --port 0`` on 127.0.0.1 → (url, process); stopped after."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    src = Path(__file__).resolve().parents[2] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])  # this checkout's package
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "unicodebook",
            "serve",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()  # the one line it prints once it listens
        if not line:
            raise AssertionError(f"the server exited before listening: {proc.wait(timeout)}: {proc.stderr.read()}")
        yield json.loads(line)["url"], proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
