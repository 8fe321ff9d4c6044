"""The natural-photo set (crops of the photographs installed packages ship) and stage II on photos
through the ordinary commands."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_OVERRIDES
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
    other = [(tmp_path / "a" / "train/images" / f"{i:06d}.png").read_bytes()
             != (tmp_path / "c" / "train/images" / f"{i:06d}.png").read_bytes() for i in range(6)]
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
            convs.append({"id": f"{what}{i}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\nwhat is in the photo?"}, {"from": "gpt", "value": what},
                {"from": "human", "value": "what colour is it?"}, {"from": "gpt", "value": colour}]})
            pairs.append({"image": name, "caption": f"a photo of {what}"})
    (root / split / "instruct.json").write_text(json.dumps(convs))
    (root / split / "t2i.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))


@pytest.mark.slow
def test_stage_two_on_photographs_trains_chats_and_draws(tmp_path, capsys):
    root = tmp_path / "photos"
    _captioned(root, "train", 24, seed=0)
    _captioned(root, "test", 4, seed=1)
    tok, lm = tmp_path / "tok", tmp_path / "lm"
    assert main(["train-tokenizer", "--data", str(root), "--out", str(tok), *TINY_OVERRIDES]) == 0
    assert main(["train-lm", "--tokenizer", str(tok), "--data", str(root), "--out", str(lm), *TINY_OVERRIDES,
                 "train_lm.steps=80", "train_lm.lr=5e-3", "train_lm.log_every=1",
                 "train_lm.tasks={decompress: 1, instruct: 2, t2i: 1}"]) == 0
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
