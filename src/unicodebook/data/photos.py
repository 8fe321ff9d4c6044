"""A natural-photo set built from photographs that installed packages ship.

No download: scikit-image's wheel carries a few classic test photographs (astronaut, coffee, a
cat, a rocket, …) and matplotlib's carries a portrait of Grace Hopper. :func:`write_photo_set`
cuts square crops from them into the split layout stage I reads (``train/images``,
``val/images``, ``test/images``), each split from *different* photographs, so a test figure says
how a tokenizer does on pictures it has never seen any part of.

Crops are taken at several scales (each photo downsampled by 1, 2 or 4 with a box filter before
cropping) so a 36-px crop holds texture at one scale and whole objects at another.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UnicodebookError
from .shapes import SPLITS

SCALES = (1, 2, 4)  # a photo is downsampled by one of these before a crop is cut


@dataclass(frozen=True)
class Photo:
    package: str  # the installed package that ships it
    path: str  # inside the package
    split: str


#: Which photo goes to which split. Grey photos are read as RGB (three equal channels).
PHOTOS: tuple[Photo, ...] = (
    *(
        Photo("skimage", f"data/{n}", "train")
        for n in (
            "astronaut.png",
            "coffee.png",
            "rocket.jpg",
            "motorcycle_left.png",
            "motorcycle_right.png",
            "hubble_deep_field.jpg",
            "retina.jpg",
            "camera.png",
            "brick.png",
            "grass.png",
            "moon.png",
            "cell.png",
        )
    ),
    Photo("skimage", "data/ihc.png", "val"),
    Photo("skimage", "data/gravel.png", "val"),
    Photo("skimage", "data/chelsea.png", "test"),
    Photo("skimage", "data/coins.png", "test"),
    Photo("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "test"),
)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_photos() -> dict[str, list[Path]]:
    """The photographs of :data:`PHOTOS` installed here, by split. One error line when a split
    would be empty (scikit-image missing: ``pip install scikit-image``)."""
    found: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for p in PHOTOS:
        root = _package_dir(p.package)
        if root is not None and (root / p.path).is_file():
            found[p.split].append(root / p.path)
    empty = [s for s in SPLITS if not found[s]]
    if empty:
        raise UnicodebookError(
            f"no photographs for the {', '.join(empty)} split: the photo set is cut from the test "
            f"images scikit-image and matplotlib ship (pip install scikit-image matplotlib)"
        )
    return found


def _scaled(img: Image.Image, size: int) -> list[np.ndarray]:
    """The photo at each of :data:`SCALES` that still holds a ``size`` crop, as uint8 arrays."""
    out = []
    for s in SCALES:
        w, h = img.width // s, img.height // s
        if min(w, h) >= size:
            out.append(np.asarray(img if s == 1 else img.resize((w, h), Image.Resampling.BOX)))
    return out


def crops(photos: list[Path], n: int, size: int, seed: int) -> list[np.ndarray]:
    """``n`` random ``size`` × ``size`` RGB crops (uint8) of ``photos``, spread evenly over the
    photos and their scales; deterministic for a seed."""
    rng = random.Random(seed)
    pyramids = []
    for path in photos:
        with Image.open(path) as im:
            pyramids.append(_scaled(im.convert("RGB"), size))
    pyramids = [p for p in pyramids if p]
    if not pyramids:
        raise UnicodebookError(f"no photograph is {size} px or larger")
    out = []
    for i in range(n):
        levels = pyramids[i % len(pyramids)]
        arr = levels[rng.randrange(len(levels))]
        y, x = rng.randrange(arr.shape[0] - size + 1), rng.randrange(arr.shape[1] - size + 1)
        out.append(arr[y : y + size, x : x + size].copy())
    return out


def write_photo_set(
    out: Path | str, size: int = 36, n_train: int = 20_000, n_val: int = 500, n_test: int = 2000, seed: int = 0
) -> dict:
    """Write crops of the installed photographs to ``out/{train,val,test}/images/*.png`` and
    ``out/meta.json`` (which photos, how many crops, the size). Deterministic for a seed."""
    if size < 8:
        raise UnicodebookError(f"photo crops of {size} px are too small (8 px at least)")
    out = Path(out)
    found = find_photos()
    counts = {"train": n_train, "val": n_val, "test": n_test}
    meta = {
        "size": size,
        "seed": seed,
        "counts": counts,
        "scales": list(SCALES),
        "photos": {s: [f"{p.parent.name}/{p.name}" for p in found[s]] for s in SPLITS},
    }
    for k, split in enumerate(SPLITS):
        d = out / split / "images"
        d.mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(crops(found[split], counts[split], size, seed * 1000 + k)):
            Image.fromarray(arr).save(d / f"{i:06d}.png")
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def check_crop_size(data: Path | str, image_size: int) -> None:
    """A photo set (``data`` or the set above it has :func:`write_photo_set`'s ``meta.json``) cut
    smaller than the model's images would be blown up to them, blurred: one error line."""
    for folder in (Path(data), Path(data).parent, Path(data).parent.parent):
        meta = folder / "meta.json"
        if not meta.is_file():
            continue
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            return  # not ours: a folder may hold any meta.json
        size = info.get("size") if isinstance(info, dict) and "photos" in info else None
        if isinstance(size, int) and size < image_size:
            raise UnicodebookError(
                f"the photo crops in {folder} are {size} px, smaller than model.image_size "
                f"{image_size}: write the set again with `unicodebook data photos --size {image_size}`"
            )
        return
