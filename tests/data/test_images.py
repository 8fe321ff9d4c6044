"""Image I/O: odd modes converted, odd sizes resized or refused, bad files one clear error."""

import numpy as np
import pytest
import torch
from PIL import Image

from unicodebook.data.images import ImageFolder, collate_images, list_images, load_image
from unicodebook.errors import BadImageError, UnicodebookError


def _rgb(path, size=32, colour=(200, 30, 40)):
    Image.new("RGB", (size, size), colour).save(path)
    return path


def test_modes_are_converted_to_rgb(tmp_path):
    Image.new("L", (32, 32), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent → white
    Image.new("RGB", (32, 32), (10, 200, 30)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "pal.png")
    Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")  # 16-bit
    assert torch.allclose(load_image(tmp_path / "gray.png"), torch.full((3, 32, 32), 128 / 255))
    assert torch.allclose(load_image(tmp_path / "clear.png"), torch.ones(3, 32, 32))
    pal = load_image(tmp_path / "pal.png")
    assert pal.shape == (3, 32, 32) and abs(float(pal[1].mean()) - 200 / 255) < 0.02
    assert torch.allclose(load_image(tmp_path / "deep.png"), torch.ones(3, 32, 32))


def test_odd_size_is_resized_or_refused(tmp_path):
    _rgb(tmp_path / "big.png", size=48)
    assert load_image(tmp_path / "big.png", size=32).shape == (3, 32, 32)
    with pytest.raises(BadImageError, match=r"size 48×48, expected 32×32 \(data.odd_size=refuse\)"):
        load_image(tmp_path / "big.png", size=32, odd_size="refuse")


def test_bad_files_are_one_clear_error(tmp_path):
    good = _rgb(tmp_path / "good.png")
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "notes.png").write_text("not an image at all")
    for name, msg in [
        ("trunc.png", "corrupt or truncated image"),
        ("notes.png", "not an image file"),
        ("missing.png", "no such file"),
    ]:
        with pytest.raises(BadImageError) as e:
            load_image(tmp_path / name)
        assert msg in str(e.value) and "\n" not in str(e.value)


def test_folder_dataset_reports_counts_and_skips_bad_files(tmp_path, caplog):
    for i in range(5):
        _rgb(tmp_path / f"{i}.png")
    (tmp_path / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "6.png").write_text("text")
    ds = ImageFolder(tmp_path, 32, preload=True)
    assert len(ds) == 5 and len(ds.bad) == 2
    reported = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(reported) == 2 and any("5.png" in m for m in reported) and any("6.png" in m for m in reported)
    lazy = ImageFolder(tmp_path, 32, preload=False)
    batch, bad = collate_images([lazy[i] for i in range(len(lazy))])
    assert batch.shape == (5, 3, 32, 32) and bad == 2


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(UnicodebookError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnicodebookError, match="holds no images"):
        list_images(tmp_path / "empty")
