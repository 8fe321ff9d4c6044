"""The FastAPI app: OpenAI's chat and image endpoints over one loaded model, and the web page.

Endpoints: ``GET /`` (the page), ``GET /health``, ``GET /v1/models``,
``POST /v1/chat/completions`` (one image and a question; ``stream: true`` for server-sent
events), ``POST /v1/images/generations`` (PNGs as ``b64_json``, plus the code ids).
Every refusal is a 4xx in OpenAI's error shape; nothing a client sends is a 500.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UnicodebookError
from .errors import APIError, error_body, error_response
from .images import data_url_bytes, decode_image, png_base64
from .limits import Limits
from .schemas import ChatMessage, ChatRequest, ImageRequest
from .worker import ModelWorker

log = logging.getLogger("unicodebook.serve")


# ------------------------------------------------------------------------------ the request's parts
def conversation_parts(messages: list[ChatMessage], limits: Limits) -> tuple[str, list[tuple[str, str]]]:
    """The question (the last user message's text) and the image URLs of the conversation, each
    with its parameter path for error messages. The model answers one question about one image:
    earlier turns and system messages are not part of its prompt."""
    if not messages:
        raise APIError(400, "messages is empty: send one user message with an image and a question", "messages")
    images: list[tuple[str, str]] = []
    for i, msg in enumerate(messages):
        if isinstance(msg.content, list):
            for j, part in enumerate(msg.content):
                if part.type != "image_url":
                    continue
                param = f"messages[{i}].content[{j}].image_url"
                url = part.image_url.url if hasattr(part.image_url, "url") else part.image_url
                if not url:
                    raise APIError(400, "an image_url part needs image_url.url", param)
                images.append((url, param))
    if len(images) > limits.max_images:
        raise APIError(
            400,
            f"the conversation holds {len(images)} images; this model reads at most {limits.max_images}",
            "messages",
        )
    last = messages[-1]
    if last.role != "user":
        raise APIError(400, f"the last message must be the user's question, not a '{last.role}' message", "messages")
    content = last.content
    texts = [content] if isinstance(content, str) else [p.text for p in content or [] if p.type == "text" and p.text]
    question = "\n".join(t.strip() for t in texts if t and t.strip())
    if not question:
        raise APIError(400, "the last user message has no text: ask a question about the image", "messages")
    if len(question) > limits.max_prompt_chars:
        raise APIError(
            400, f"the question is {len(question)} characters long; at most {limits.max_prompt_chars}", "messages"
        )
    return question, images


def _check_model(asked: str | None, served: str) -> None:
    if asked is not None and asked != served:
        raise APIError(
            404, f"the model '{asked}' does not exist here; this server serves '{served}'", "model", "model_not_found"
        )


class _ClosingStream(StreamingResponse):
    """A streaming response that always closes its body iterator, also when the client went away
    while a chunk was being sent (the iterator then holds the model's lock)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


# ------------------------------------------------------------------------------ the app
def create_app(model, model_id: str, limits: Limits | None = None) -> FastAPI:
    """The app serving ``model`` (a loaded :class:`~unicodebook.lm.model.UniCodeLM`) as ``model_id``."""
    limits = limits or Limits()
    app = FastAPI(title="unicodebook", docs_url="/docs", redoc_url=None)
    worker = ModelWorker()
    app.state.model, app.state.worker, app.state.limits, app.state.model_id = model, worker, limits, model_id
    size, odd_size = model.tokenizer.image_size, model.config.data.odd_size
    defaults = model.config.generate
    started = int(time.time())
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_id, "busy": worker.busy, "waiting": worker.waiting}

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_id,
                    "object": "model",
                    "created": started,
                    "owned_by": "unicodebook",
                    "image_size": size,
                    "codes_per_image": model.codes_per_image,
                    "context": model.max_positions,
                }
            ],
        }

    @app.get("/v1/models/{name}")
    def one_model(name: str) -> dict:
        _check_model(name, model_id)
        return models()["data"][0]

    def encode(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image's codes, and its features where the model reads them."""
        with torch.inference_mode():
            codes, features = model.encode(image[None])
        return codes[0].cpu(), None if features is None else features[0].cpu()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        _check_model(req.model, model_id)
        if req.n != 1:
            raise APIError(400, "n: this server returns one answer per request", "n")
        question, images = conversation_parts(req.messages, limits)
        if not images:
            raise APIError(
                400,
                "this model answers questions about an image: add an image_url part "
                "(data:image/png;base64,…) to the user message",
                "messages",
            )
        url, param = images[0]
        max_tokens = req.max_completion_tokens or req.max_tokens
        max_tokens = defaults.max_new_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= limits.max_tokens:
            raise APIError(400, f"max_tokens must be within 1..{limits.max_tokens}, got {max_tokens}", "max_tokens")
        image = decode_image(
            data_url_bytes(url, f"{param}.url"), size, odd_size, limits.max_image_pixels, f"{param}.url"
        )
        codes, features = await worker.run(encode, image)
        ids, _ = model.fmt.prompt(question, codes=codes)
        prompt_tokens = len(ids)  # the image's slots included
        if prompt_tokens + max_tokens > model.max_positions:
            raise APIError(
                400,
                f"the prompt takes {prompt_tokens} tokens (the image's included) and max_tokens "
                f"asks {max_tokens} more, past the model's context of {model.max_positions}",
                "messages",
                "context_length_exceeded",
            )
        temperature = req.temperature or 0.0
        seed = req.seed if req.seed is not None else (secrets.randbits(31) if temperature > 0 else None)
        gen = model.stream_answer(codes, question, max_tokens, temperature=temperature, seed=seed, features=features)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_id}
        counted: list[int] = []

        def usage() -> dict:
            n = counted[0] if counted else 0
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        def finish() -> str:
            return "length" if counted and counted[0] >= max_tokens else "stop"

        if not req.stream:
            pieces = [p async for p in worker.stream(gen, counted.append)]
            return {
                **head,
                "object": "chat.completion",
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "logprobs": None,
                        "finish_reason": finish(),
                    }
                ],
                "usage": usage(),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            chunk = {**head, "object": "chat.completion.chunk"}
            yield _sse(
                {
                    **chunk,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                }
            )
            async for piece in worker.stream(gen, counted.append):
                yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            yield _sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish()}]})
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": usage()})
            yield _sse("[DONE]")

        return _ClosingStream(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def draw(
        prompt: str, n: int, cfg: float, temperature: float, top_k: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # generate_image's own steps, keeping the codes: the same seed gives `unicodebook generate`'s pictures
        return draw_batch([prompt] * n, cfg, temperature, top_k, torch.Generator(device=model.device).manual_seed(seed))

    def draw_batch(
        prompts: list[str], cfg: float, temperature: float, top_k: int, gen: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        codes = model.generate_codes(prompts, cfg, temperature, top_k, gen)
        with torch.no_grad():
            return codes.cpu(), model.tokenizer.decode(codes).cpu()

    def draw_greedy(key: tuple[str, float], prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        codes, pictures = draw_batch(prompts, key[1], 0.0, 0, None)
        return list(zip(codes, pictures))

    @app.post("/v1/images/generations")
    async def images(req: ImageRequest):
        _check_model(req.model, model_id)
        if req.response_format != "b64_json":
            raise APIError(
                400,
                f"response_format '{req.response_format}': this server returns images inline, as b64_json",
                "response_format",
            )
        if not 1 <= req.n <= limits.max_n:
            raise APIError(400, f"n must be within 1..{limits.max_n}, got {req.n}", "n")
        if req.size is not None and req.size != f"{size}x{size}":
            raise APIError(400, f"size '{req.size}': this model draws {size}x{size} images", "size")
        prompt = req.prompt.strip()
        if not prompt:
            raise APIError(400, "prompt is empty: describe the picture to draw", "prompt")
        if len(prompt) > limits.max_prompt_chars:
            raise APIError(
                400, f"the prompt is {len(prompt)} characters long; at most {limits.max_prompt_chars}", "prompt"
            )
        needed = len(model.fmt.t2i_prefix(prompt)) + model.steps_per_image + 2
        if needed > model.max_positions:
            raise APIError(
                400,
                f"the prompt and its image need {needed} positions, past the model's context of "
                f"{model.max_positions}; shorten the prompt",
                "prompt",
                "context_length_exceeded",
            )
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        cfg = defaults.cfg_scale if req.cfg_scale is None else req.cfg_scale
        temperature = defaults.temperature if req.temperature is None else req.temperature
        top_k = defaults.top_k if req.top_k is None else req.top_k
        if temperature == 0:  # greedy: the seed plays no part, so waiting requests share one call
            drawn, served = await worker.run_batched(
                ("greedy", cfg), [prompt] * req.n, draw_greedy, limits.max_draw_batch
            )
        else:  # sampled: its own call, so a seed gives `unicodebook generate`'s pictures
            codes, pictures = await worker.run(draw, prompt, req.n, cfg, temperature, top_k, seed)
            drawn, served = list(zip(codes, pictures)), 1
        return {
            "created": int(time.time()),
            "model": model_id,
            "seed": seed,
            "cfg_scale": cfg,
            "temperature": temperature,
            "top_k": top_k,
            "batched_requests": served,
            "data": [{"b64_json": png_base64(p), "codes": c.tolist()} for c, p in drawn],
        }

    return app


# ------------------------------------------------------------------------------ errors and limits
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            loc = []  # its loc is a character offset, not a field
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})"
        elif first.get("type") == "missing" and not loc:
            message = "the request needs a JSON body"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(message, param=".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = (
            f"no such endpoint: {request.method} {request.url.path}" if err.status_code == 404 else str(err.detail)
        )
        return JSONResponse(error_body(message, code=str(err.status_code)), status_code=err.status_code)

    @app.exception_handler(UnicodebookError)
    async def user_error(request: Request, err: UnicodebookError) -> JSONResponse:
        return JSONResponse(error_body(str(err)), status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> JSONResponse:  # a bug of ours: logged, one line to the client
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error ({type(err).__name__})", type="server_error"), status_code=500)


class BodyLimit:
    """ASGI middleware: a request body past ``max_bytes`` gets a 413 and is read no further
    (a declared Content-Length is checked before reading; a chunked body as it arrives)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send) -> None:
        body = json.dumps(
            error_body(f"the request body is larger than {self.max_bytes:,} bytes", code="request_too_large")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        state = {"read": 0, "over": False}

        async def counted_receive():
            if state["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > self.max_bytes:  # the app sees a client gone; the client gets the 413
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            if not state["over"]:
                await send(message)

        await self.app(scope, counted_receive, guarded_send)
        if state["over"]:
            await self._refuse(send)


def model_id_of(folder: Path) -> str:
    """The id a model folder is served as: its folder's name."""
    return Path(folder).resolve().name
