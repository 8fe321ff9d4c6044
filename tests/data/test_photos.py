"""The natural-photo set (crops of the photographs installed packages ship) and stage II on photos
through the ordinary commands."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES
from PIL import Image

from unicodebook.cli import main
from unicodebook.data.photos import PHOTOS, SPLITS, crops, find_photos, write_photo_set
from unicodebook.errors import UnicodebookError

pytest.importorskip("skimage", reason="the photo set is cut from scikit-image's photographs (the dev extra has it)")


def test_each_split_comes_from_other_photographs():
    found = find_photos()
    names = {s: {p.name for p in found[s]} for s in SPLITS}
    assert all(names[s] for s in SPLITS)
    assert not names["train"] & names["test"] and not names["train"] & names["val"] and not names["val"] & names["test"]
    assert {p.path.rsplit("/", 1)[1] for p in PHOTOS if p.split == "test"} == names["test"]


def test_the_set_is_deterministic_and_in_the_split_layout(tmp_path):
    a = write_photo_set(tmp_path / "a", size=24, n_train=6, n_val=2, n_test=3, seed=3)
    write_photo_set(tmp_path / "b", size=24, n_train=6, n_val=2, n_test=3, seed=3)
    write_photo_set(tmp_path / "c", size=24, n_train=6, n_val=2, n_test=3, seed=4)
    for split, n in a["counts"].items():
        files = sorted((tmp_path / "a" / split / "images").glob("*.png"))
        assert len(files) == n
        for f in files:
            assert f.read_bytes() == (tmp_path / "b" / split / "images" / f.name).read_bytes()
            assert Image.open(f).size == (24, 24) and Image.open(f).mode == "RGB"
    other = [
        (tmp_path / "a" / "train/images" / f"{i:06d}.png").read_bytes()
        != (tmp_path / "c" / "train/images" / f"{i:06d}.png").read_bytes()
        for i in range(6)
    ]
    assert all(other)  # another seed, other crops
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["photos"]["test"] == a["photos"]["test"]


def test_crops_cover_the_photos_and_are_not_flat():
    photos = find_photos()["train"]
    cut = crops(photos, 4 * len(photos), 32, seed=0)
    assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in cut)
    assert np.mean([c.std() > 2 for c in cut]) > 0.8  # crops of pictures, not of empty borders


def test_crops_larger_than_every_photo_are_one_error_line(tmp_path):
    with pytest.raises(UnicodebookError, match="no photograph is 4000 px or larger"):
        crops(find_photos()["test"], 2, 4000, seed=0)


def _one_error_line(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(list(argv)) != 0
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and "it/s]" not in x]  # less progress bars
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_a_photo_set_too_small_for_the_codebook_is_one_error_line(tmp_path, capsys):
    write_photo_set(tmp_path / "few", size=32, n_train=1, n_val=1, n_test=1)
    line = _one_error_line(
        capsys,
        "train-tokenizer",
        "--data",
        str(tmp_path / "few"),
        "--out",
        str(tmp_path / "tok"),
        *TINY_OVERRIDES,
        "model.codebook.num_rows=128",
    )
    assert "1 training images give 64 latent vectors" in line and "fewer than the 128 codebook rows" in line
    assert not (tmp_path / "tok" / "model.safetensors").exists()


def test_crops_smaller_than_the_model_images_are_one_error_line(tmp_path, capsys):
    write_photo_set(tmp_path / "small", size=16, n_train=40, n_val=2, n_test=2)
    line = _one_error_line(
        capsys, "train-tokenizer", "--data", str(tmp_path / "small"), "--out", str(tmp_path / "tok"), *TINY_OVERRIDES
    )
    assert "are 16 px, smaller than model.image_size 32" in line and "data photos --size 32" in line


def _captioned(root: Path, split: str, n: int, seed: int) -> None:
    """Crops of two photographs with a caption and two questions each (the documented formats)."""
    found = {p.name: p for p in find_photos()["train"] + find_photos()["test"]}
    subjects = {"chelsea.png": ("cat", "orange"), "coffee.png": ("coffee", "brown")}
    d = root / split / "images"
    d.mkdir(parents=True)
    convs, pairs = [], []
    for k, (photo, (what, colour)) in enumerate(subjects.items()):
        for i, arr in enumerate(crops([found[photo]], n, 32, seed * 10 + k)):
            name = f"images/{what}_{i:03d}.png"
            Image.fromarray(arr).save(root / split / name)
            convs.append(
                {
                    "id": f"{what}{i}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": "<image>\nwhat is in the photo?"},
                        {"from": "gpt", "value": what},
                        {"from": "human", "value": "what colour is it?"},
                        {"from": "gpt", "value": colour},
                    ],
                }
            )
            pairs.append({"image": name, "caption": f"a photo of {what}"})
    (root / split / "instruct.json").write_text(json.dumps(convs))
    (root / split / "t2i.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))


@pytest.mark.slow
def test_stage_two_on_photographs_trains_chats_and_draws(tmp_path, capsys):
    root = tmp_path / "photos"
    _captioned(root, "train", 24, seed=0)
    _captioned(root, "test", 4, seed=1)
    tok_dir, lm = tmp_path / "tok", tmp_path / "lm"
    assert main(["train-tokenizer", "--data", str(root), "--out", str(tok_dir), *TINY_OVERRIDES]) == 0
    assert (
        main(
            [
                "train-lm",
                "--tokenizer",
                str(tok_dir),
                "--data",
                str(root),
                "--out",
                str(lm),
                *TINY_OVERRIDES,
                "train_lm.steps=80",
                "train_lm.lr=5e-3",
                "train_lm.log_every=1",
                "train_lm.tasks={decompress: 1, instruct: 2, t2i: 1}",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (lm / "metrics.jsonl").read_text().splitlines()]
    instruct = [r["loss_instruct"] for r in rows if "loss_instruct" in r]
    assert len(instruct) >= 20 and np.mean(instruct[-5:]) < 0.5 * np.mean(instruct[:3])  # it learns to answer
    capsys.readouterr()
    image = root / "test" / "images" / "cat_000.png"
    assert main(["chat", "--model", str(lm), "--image", str(image), "what is in the photo?"]) == 0
    answer = capsys.readouterr().out.strip().split()
    vocab = {"cat", "coffee", "orange", "brown", "what", "is", "in", "the", "photo", "colour", "it", "a", "of", "?"}
    assert set(answer) <= vocab  # words of this dataset (or nothing yet), never an image marker
    out = tmp_path / "g.png"
    assert main(["generate", "--model", str(lm), "a photo of cat", "--out", str(out)]) == 0
    drawn = Image.open(json.loads(capsys.readouterr().out)["images"][0])
    assert drawn.size == (32, 32) and np.asarray(drawn).std() > 0  # a decoded picture, not a blank page
    assert main(["eval", "model", "--model", str(lm), "--data", str(root), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["vqa_n"] == 16


def _photo_batch(n: int, size: int, seed: int):
    import torch

    arr = np.stack(list(crops(find_photos()["train"], n, size, seed)))
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("patch_skip", [False, True])
def test_the_patch_path_starts_a_photo_tokenizer_where_residual_vq_ends(patch_skip):
    """Before any gradient step: the k-means start on one batch of photo crops, then the
    reconstruction of other crops. With the linear patch path (and a layer's own rows) the
    tokenizer *is* residual VQ of 4×4 pixel patches at that point; without it, the zero-trained
    convolutions give back a grey page."""
    import torch

    from unicodebook.config import load_config
    from unicodebook.eval.metrics import psnr
    from unicodebook.tokenizers.unicode.build import build_tokenizer

    over = [] if patch_skip else ["model.autoencoder.patch_skip=false", "model.quantizer.layer_rows=shared"]
    visual_tok = build_tokenizer(load_config("photos", over)).train()
    with torch.no_grad():
        visual_tok(_photo_batch(64, 36, seed=0))  # the k-means start
        visual_tok.quantizer.pop_updates()
        visual_tok.eval()
        test = _photo_batch(32, 36, seed=1)
        pixels = visual_tok._decode_latent(visual_tok._latent(test))  # no quantization: the autoencoder alone
        coded = visual_tok.decode(visual_tok.encode(test))
    if patch_skip:
        assert torch.allclose(pixels, test, atol=1e-5)  # the patch path is an exact round trip
        assert psnr(coded, test).mean() > 30  # 4 layers of 512 rows, 9 bits a code (measured: 33.7 dB)
    else:
        assert psnr(coded, test).mean() < 15  # (measured: 10.4 dB)


def test_a_budget_that_does_not_divide_the_code_grid_is_one_error_line(tmp_path):
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[2] / "bench" / "rate_distortion.py"
    run = subprocess.run(
        [sys.executable, str(bench), "--out", str(tmp_path), "--bits", "729", "1000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        "error: a budget of 1000 bits does not divide the 9×9 code grid at 9 bits a code: "
        "use multiples of 729 (729, 1458, 2916, …)"
    ]
    assert not any(tmp_path.iterdir())  # refused before the photo set is written
