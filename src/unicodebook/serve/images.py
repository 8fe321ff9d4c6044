"""Images sent in a request as ``data:`` URLs → tensors, with a 400 for anything that is not a
readable image of an acceptable size. The server fetches nothing from the network."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from ..data.images import pil_to_tensor, tensor_to_pil
from ..errors import BadImageError
from .errors import APIError

_DATA_URL = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)", re.DOTALL
)
# the first bytes of the formats Pillow reads here: a failed decode after one of them means a
# corrupt or truncated file rather than something that is not an image at all
_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a ``data:image/…;base64,…`` URL; anything else is a 400."""
    if re.match(r"https?://", url, re.IGNORECASE):
        raise APIError(
            400,
            "image URLs are not fetched: send the image inline as data:image/png;base64,…",
            param,
            "image_url_not_supported",
        )
    m = _DATA_URL.fullmatch(url.strip())
    if m is None:
        raise APIError(400, "an image_url must be a data URL (data:image/png;base64,…)", param, "invalid_image_url")
    if not (m["mime"] or "").startswith("image/"):
        raise APIError(400, f"the data URL holds '{m['mime'] or 'text/plain'}', not an image", param, "invalid_image")
    if not m["b64"]:
        raise APIError(400, "the image data URL must be base64 (data:image/png;base64,…)", param, "invalid_image_url")
    try:
        return base64.b64decode(m["data"], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the image data URL is not valid base64", param, "invalid_image") from None


def decode_image(data: bytes, size: int, odd_size: str, max_pixels: int, param: str) -> torch.Tensor:
    """Image file bytes → (3, size, size) in [0, 1], as :func:`unicodebook.data.images.load_image`
    reads a file (same conversion and resizing, so a PNG gives the CLI's tensor)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's guard refuses, not warns
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size  # from the header: a huge image is refused before it is decoded
                if w * h > max_pixels:
                    raise APIError(
                        400,
                        f"the image is {w}×{h} px; at most {max_pixels:,} pixels are accepted",
                        param,
                        "image_too_large",
                    )
                img.load()
                return pil_to_tensor(img, size=size, odd_size=odd_size, name="the image")
    except APIError:
        raise
    except BadImageError as e:
        raise APIError(400, str(e), param, "invalid_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(400, "the image is too large to decode", param, "image_too_large") from None
    except UnidentifiedImageError:
        what = "corrupt or truncated image" if data.startswith(_SIGNATURES) else "not an image file"
        raise APIError(400, f"the image data is {what}", param, "invalid_image") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise APIError(
            400, f"the image data is a corrupt or truncated image ({reason})", param, "invalid_image"
        ) from None


def png_base64(image: torch.Tensor) -> str:
    """(3, H, W) in [0, 1] → base64 PNG, the pixels ``unicodebook generate`` writes."""
    buf = io.BytesIO()
    tensor_to_pil(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
