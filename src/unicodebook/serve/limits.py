"""What one request may ask of the server; past any of these it gets a 4xx with a clear message."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 << 20  # a request body (JSON with base64 images)
    max_images: int = 1  # image parts per conversation: the model reads one image
    max_image_pixels: int = 4096 * 4096  # width × height of an uploaded image, checked before decoding it
    max_n: int = 8  # images per generation request
    max_draw_batch: int = 16  # images one batched model call draws for several waiting greedy requests
    max_tokens: int = 256  # new tokens per answer
    max_prompt_chars: int = 8000  # a question or a drawing prompt, before it is tokenized
