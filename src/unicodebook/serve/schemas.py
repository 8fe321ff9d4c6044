"""Request bodies in OpenAI's shapes (fields the server does not use are accepted and ignored)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Loose):
    url: str
    detail: str | None = None


class ContentPart(_Loose):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None  # an object as OpenAI sends it; a bare string is taken too


class ChatMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatRequest(_Loose):
    model: str
    messages: list[ChatMessage]
    temperature: float | None = Field(None, ge=0, le=2)  # None: greedy, as `unicodebook chat`
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


class ImageRequest(_Loose):
    prompt: str
    model: str | None = None
    n: int = 1
    response_format: str = "b64_json"
    size: str | None = None
    seed: int | None = None  # None: a random seed, reported in the response
    cfg_scale: float | None = Field(None, ge=0)  # the project's: None takes the model's config
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
