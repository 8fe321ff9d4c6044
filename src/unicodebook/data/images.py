"""Image I/O with clear errors, and an image-folder dataset that skips bad files.

Images are returned as float tensors (3, H, W) in [0, 1]. Odd modes are converted
(grayscale, RGBA over white, palette, 16-bit); an odd size is resized or refused, as the
config says.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..config import DataConfig
from ..errors import BadImageError, UnicodebookError
from .shapes import SPLITS

log = logging.getLogger("unicodebook.data")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = DataConfig.max_image_pixels  # the defaults of data.max_image_pixels and data.max_image_bytes
MAX_IMAGE_BYTES = DataConfig.max_image_bytes


def image_limits(data) -> dict:
    """``load_image``'s limits from a config's ``data`` section (None: the defaults)."""
    if data is None:
        return {}
    return {"max_pixels": data.max_image_pixels, "max_bytes": data.max_image_bytes}


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    return img.convert("RGB")


_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _has_image_signature(path: Path) -> bool:
    """Does the file start like an image (so a failed decode means corrupt, not 'not an image')?"""
    with open(path, "rb") as f:
        head = f.read(12)
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def load_image(
    path: str | Path,
    size: int | None = None,
    odd_size: str = "resize",
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
    root: str | Path | None = None,
) -> torch.Tensor:
    """Read one image as (3, size, size) float in [0, 1]; raise :class:`BadImageError` on bad input.

    ``root``: the dataset folder the path must stay inside (a record's ``../x.png`` is refused).
    A file over ``max_bytes``, or whose header declares more than ``max_pixels`` (or more than
    Pillow's decompression-bomb guard, ``Image.MAX_IMAGE_PIXELS``), is refused before decoding.
    """
    path = Path(path)
    _check_file(path, max_bytes, root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img, max_pixels, path)
                img.load()
                img = _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{path}: too large to decode ({str(e).split(',')[0]})") from None
    except PermissionError:
        raise BadImageError(f"{path}: not readable (permission denied)") from None
    except UnidentifiedImageError:
        if _has_image_signature(path):
            raise BadImageError(f"{path}: corrupt or truncated image (header unreadable)") from None
        raise BadImageError(f"{path}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(
            f"{path}: corrupt or truncated image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    return pil_to_tensor(img, size=size, odd_size=odd_size, name=str(path))


def _check_file(path: Path, max_bytes: int, root: str | Path | None) -> None:
    """The checks made before a file is opened: inside ``root``, a file, not empty, not too big."""
    if root is not None and not path.resolve().is_relative_to(Path(root).resolve()):
        raise BadImageError(f"{path}: outside the dataset folder {root}")
    if not path.exists():
        raise BadImageError(f"{path}: {'dangling symbolic link' if path.is_symlink() else 'no such file'}")
    if path.is_dir():
        raise BadImageError(f"{path}: is a folder, not an image")
    n = path.stat().st_size
    if n == 0:
        raise BadImageError(f"{path}: empty file")
    if n > max_bytes:
        raise BadImageError(f"{path}: {n:,} bytes, more than the {max_bytes:,} accepted (data.max_image_bytes)")


def _check_pixels(img: Image.Image, max_pixels: int, name: str | Path) -> None:
    w, h = img.size  # from the header: a huge image is refused before it is decoded
    if w * h > max_pixels:
        raise BadImageError(f"{name}: {w}×{h} px, more than the {max_pixels:,} pixels accepted (data.max_image_pixels)")


def pil_to_tensor(
    img: Image.Image, size: int | None = None, odd_size: str = "resize", name: str = "image"
) -> torch.Tensor:
    img = _to_rgb(img)
    if size is not None and img.size != (size, size):
        if odd_size == "refuse":
            raise BadImageError(
                f"{name}: size {img.size[0]}×{img.size[1]}, expected {size}×{size} (data.odd_size=refuse)"
            )
        img = img.resize((size, size), Image.BICUBIC if min(img.size) < size else Image.LANCZOS)
    arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] → RGB PIL image."""
    arr = (x.detach().float().clamp(0, 1) * 255.0 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); a missing or empty folder is an error."""
    folder = Path(folder)
    if not folder.exists():
        raise UnicodebookError(f"image folder '{folder}' does not exist")
    if not folder.is_dir():
        raise UnicodebookError(f"'{folder}' is not a folder")
    # a dangling link is listed (and reported when read), a folder named like an image is not
    files = sorted(p for p in folder.rglob("*") if not p.is_dir() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise UnicodebookError(f"image folder '{folder}' holds no images ({', '.join(IMAGE_EXTS)})")
    return files


def is_split_root(data: Path) -> bool:
    """A dataset root with split folders (``DIR/train``, ``DIR/val``, ``DIR/test``)."""
    return (data / "meta.json").exists() or any((data / s).is_dir() for s in SPLITS)


def split_folder(data: str | Path, split: str | None) -> Path:
    """A dataset root + split → ``DIR/<split>``; a folder without splits stands for itself.

    A root with splits must name one it has: one error line lists those it has."""
    data = Path(data)
    if not data.is_dir():
        raise UnicodebookError(f"data folder '{data}' does not exist")
    if split and (data / split).is_dir():
        return data / split
    if split and is_split_root(data):
        found = ", ".join(s for s in SPLITS if (data / s).is_dir()) or "none"
        raise UnicodebookError(f"'{data}' has no split '{split}' (its splits: {found})")
    return data


def resolve_image_folder(data: str | Path, split: str | None = None) -> Path:
    """The image folder to read: ``DIR/<split>/images`` of a dataset root, ``DIR/images``, or a
    plain folder (see :func:`split_folder`)."""
    if not Path(data).is_dir():
        return Path(data)  # the image folder's reader says it does not exist
    folder = split_folder(data, split)
    return folder / "images" if (folder / "images").is_dir() else folder


class ImageFolder(torch.utils.data.Dataset):
    """Images of a folder as (3, S, S) tensors; unreadable files are reported, counted and skipped.

    ``preload`` decodes everything once (bad files are dropped then); otherwise each item is
    read on access and a bad one yields ``None``, which :func:`collate_images` drops.
    """

    def __init__(
        self,
        folder: str | Path,
        size: int,
        odd_size: str = "resize",
        preload: bool = True,
        progress: bool = False,
        limits: dict | None = None,
    ):
        self.files = list_images(folder)
        self.size, self.odd_size, self.limits = size, odd_size, limits or {}
        self.bad: list[str] = []
        self.cache: torch.Tensor | None = None
        if preload:
            from tqdm.auto import tqdm

            good, tensors = [], []
            for f in tqdm(self.files, desc="loading images", disable=not progress, leave=False):
                try:
                    tensors.append((load_image(f, size, odd_size, **self.limits) * 255).round().to(torch.uint8))
                    good.append(f)
                except BadImageError as e:
                    self._report(str(e))
            if not good:
                raise UnicodebookError(f"no readable images in '{folder}' ({len(self.bad)} bad)")
            self.files, self.cache = good, torch.stack(tensors)

    def _report(self, msg: str) -> None:
        self.bad.append(msg)
        log.warning("skipping bad image: %s", msg)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        if self.cache is not None:
            return self.cache[i].float().div_(255.0)
        try:
            return load_image(self.files[i], self.size, self.odd_size, **self.limits)
        except BadImageError as e:
            self._report(str(e))
            return None


def collate_images(items: list[torch.Tensor | None]) -> tuple[torch.Tensor, int]:
    """Stack the good items; return (B, 3, S, S) and the number of bad ones dropped."""
    good = [x for x in items if x is not None]
    bad = len(items) - len(good)
    if not good:
        return torch.empty(0), bad
    return torch.stack(good), bad
