"""The hostile-input corpus: every file written here, by Pillow, NumPy and the standard library.

``write_images(folder)`` writes the image corpus and returns its entries; ``write_records``
writes a stage II folder whose records are malformed, escape the folder or point at the
corpus's images. Nothing is checked in: the tests build the corpus in a temporary folder.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Entry:
    name: str  # the file's name in the corpus folder
    legal: bool  # an odd but legal image (accepted and converted) or an unusable file
    message: str = ""  # words of the one error line an unusable file gets (after the path)
    root_only_skip: bool = False  # a case that running as root cannot produce (chmod 000 still reads)


def _save(img: Image.Image, path: Path, **kw) -> None:
    img.save(path, **kw)


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header declares ``w`` × ``h`` (8-bit RGB) and whose data is one empty row:
    the decompression-bomb shape, a few dozen bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _gif(path: Path) -> None:
    frames = [Image.new("RGB", (24, 24), c) for c in ("red", "blue", "green")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _bytes_of(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


LEGAL = [
    Entry("gray.png", True),
    Entry("rgba.png", True),
    Entry("palette.png", True),
    Entry("deep16.png", True),
    Entry("cmyk.jpg", True),
    Entry("one.png", True),
    Entry("thin.png", True),
    Entry("animated.gif", True),
    Entry("lossy.webp", True),
    Entry("UPPER.PNG", True),
]
UNUSABLE = [
    Entry("empty.png", False, "empty file"),
    Entry("text.png", False, "not an image file"),
    Entry("truncated.png", False, "corrupt or truncated image"),
    Entry("truncated.jpg", False, "corrupt or truncated image"),
    Entry("bomb.png", False, "too large to decode"),  # 60000 × 60000: Pillow's DecompressionBombError
    Entry("bomb_warning.png", False, "too large to decode"),  # 10000 × 10000: Pillow's DecompressionBombWarning
    Entry("too_many_pixels.png", False, "7000×7000 px, more than the 40,000,000 pixels accepted"),
    Entry("random.png", False, "not an image file"),
    Entry("folder.png", False, "is a folder, not an image"),
    Entry("dangling.png", False, "dangling symbolic link"),
    Entry("unreadable.png", False, "not readable (permission denied)", root_only_skip=True),
]
ENTRIES = LEGAL + UNUSABLE


def write_images(folder: Path) -> list[Entry]:
    """Write every corpus entry into ``folder``; return the entries (unreadable.png is written
    with mode 000, which root still reads: :func:`usable_here` says whether a case holds)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = _rgb(40, 40)
    _save(base.convert("L"), folder / "gray.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 40)))
    _save(rgba, folder / "rgba.png")
    _save(base.convert("P", palette=Image.Palette.ADAPTIVE), folder / "palette.png")
    deep = (np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16)
    _save(Image.fromarray(deep), folder / "deep16.png")  # mode I;16
    _save(base.convert("CMYK"), folder / "cmyk.jpg", quality=90)
    _save(Image.new("RGB", (1, 1), "orange"), folder / "one.png")
    _save(_rgb(7, 300, 1), folder / "thin.png")
    _gif(folder / "animated.gif")
    _save(base, folder / "lossy.webp", quality=80)
    _save(base, folder / "UPPER.PNG", format="PNG")

    png, jpg = _bytes_of(base, "PNG"), _bytes_of(base, "JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is a text file, not a picture\n")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "bomb.png").write_bytes(_png_header_only(60000, 60000))
    (folder / "bomb_warning.png").write_bytes(_png_header_only(10000, 10000))
    (folder / "too_many_pixels.png").write_bytes(_png_header_only(7000, 7000))
    (folder / "random.png").write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (folder / "folder.png").mkdir()
    (folder / "dangling.png").symlink_to("gone.png")  # relative: it dangles in a copy too
    (folder / "unreadable.png").write_bytes(png)
    os.chmod(folder / "unreadable.png", 0)
    return ENTRIES


def usable_here(e: Entry) -> bool:
    """False for a case the running user cannot produce (root reads a mode-000 file)."""
    return not (e.root_only_skip and os.geteuid() == 0)


# ------------------------------------------------------------------------------ records
def write_records(folder: Path, good_image: Path, images: Path) -> dict[str, int]:
    """A stage II folder: one good record of each kind, the malformed records, and records
    whose image escapes the folder, is missing, or is one of the corpus's unusable files.

    ``images``: a corpus folder (:func:`write_images`) copied or linked inside ``folder``.
    Returns how many records of each kind must be skipped: ``malformed`` (the readers drop
    them) and ``bad_image`` (their image cannot be read)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "good.png").write_bytes(good_image.read_bytes())
    (folder.parent / "outside.png").write_bytes(good_image.read_bytes())
    rel = images.relative_to(folder)

    def conv(image, q="<image>\nwhat colour is the object?", a="red", **kw):
        return {
            "id": "x",
            "image": image,
            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
            **kw,
        }

    bad_images = ["../outside.png", "missing.png"] + [f"{rel}/{e.name}" for e in UNUSABLE if usable_here(e)]
    good_convs = [conv("good.png"), conv("good.png", a="blue")] + [conv(f"{rel}/{e.name}") for e in LEGAL]
    malformed_convs = [
        {"id": "no image", "conversations": conv("good.png")["conversations"]},  # an <image> marker, no image
        conv(42),  # wrong type
        {"id": "no turns", "image": "good.png"},  # missing key
        {"id": "no answer", "image": "good.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]},
        conv("good.png", q="what colour is the object?"),  # no <image> marker
        conv("good.png", a="word " * 4000),  # past data.max_conversation_chars
    ]
    items = good_convs + malformed_convs + [conv(p) for p in bad_images]
    (folder / "instruct.json").write_text(json.dumps(items))
    lines = [
        json.dumps({"image": "good.png", "caption": "a small red circle"}),
        json.dumps({"image": "good.png", "caption": "a big blue square"}),
        "{not json",
        json.dumps({"image": "good.png"}),  # missing key
        json.dumps({"image": "good.png", "caption": 7}),  # wrong type
        json.dumps(["a", "list"]),  # not an object
        json.dumps({"image": "good.png", "caption": "red " * 1000}),
    ]  # past data.max_caption_chars
    lines += [json.dumps({"image": p, "caption": "a red circle"}) for p in bad_images]
    (folder / "t2i.jsonl").write_text("\n".join(lines) + "\n")
    return {"malformed": len(malformed_convs) + 5, "bad_image": 2 * len(bad_images)}


_PROGRESS_BAR = re.compile(r"[^\r\n|]*\|[^|\r\n]*\| *\d+/\d+ \[[^\]]*\]")  # tqdm's, on stderr


def stderr_lines(err: str) -> list[str]:
    """The lines of stderr a user reads, the progress bars taken out."""
    return [line.strip() for line in re.split(r"[\r\n]", _PROGRESS_BAR.sub("", err)) if line.strip()]
