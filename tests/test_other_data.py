"""The training path knows nothing of the shapes world: a dataset of another kind, written here in
the documented formats (an image folder, LLaVA ``instruct.json``, ``t2i.jsonl``), goes through
data → stage I → stage II (a two-phase recipe, depth layout) → ``chat`` → ``generate``."""

import json
import random

import pytest
from conftest import TINY_OVERRIDES, assert_report_counts
from PIL import Image

from unicodebook.cli import main

COLOURS = {"red": (220, 30, 30), "teal": (20, 160, 160), "black": (10, 10, 10)}
WAYS = {"across": "horizontal", "down": "vertical"}


def _bars(folder, n: int, seed: int) -> None:
    """Stripes: one bar of a colour running across or down a grey gradient, at a random offset."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    convs, pairs = [], []
    for i in range(n):
        colour, way = rng.choice(list(COLOURS)), rng.choice(list(WAYS))
        img = Image.new("RGB", (32, 32))
        px = img.load()
        at = rng.randrange(4, 24)
        for y in range(32):
            for x in range(32):
                on = at <= (y if way == "across" else x) < at + 5
                px[x, y] = COLOURS[colour] if on else (120 + 3 * y, 120 + 3 * y, 120 + 3 * y)
        name = f"images/bar_{i:03d}.png"
        img.save(folder / name)
        caption = f"a {colour} bar running {way}"
        convs.append(
            {
                "id": str(i),
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nwhich colour is the bar?"},
                    {"from": "gpt", "value": colour},
                    {"from": "human", "value": "which way does it run?"},
                    {"from": "gpt", "value": WAYS[way]},
                ],
            }
        )
        pairs.append({"image": name, "caption": caption})
    (folder / "instruct.json").write_text(json.dumps(convs))
    (folder / "t2i.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))


RECIPE = [
    "train_lm.image_layout=depth",
    "train_lm.depth_head.heads=2",
    "train_lm.steps=40",
    "train_lm.phases=[{steps: 6, name: draw, tasks: {decompress: 0, instruct: 0, t2i: 1}, code_noise: 0.5},"
    " {steps: 34, name: mix, lr: 3e-3, tasks: {decompress: 1, instruct: 2, t2i: 1}}]",
    "train_lm.log_every=1",
]


@pytest.mark.slow
def test_a_dataset_of_another_kind_goes_from_data_to_chat_and_generate(tmp_path, capsys):
    root = tmp_path / "bars"
    _bars(root / "train", 48, seed=0)
    _bars(root / "test", 8, seed=1)
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
                *RECIPE,
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (lm / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r]
    assert all(set(r) & {"loss_t2i", "loss_instruct", "loss_decompress"} == {"loss_t2i"} for r in steps[:6])
    assert steps[0]["loss_t2i"] > steps[5]["loss_t2i"]  # the drawing phase learns
    instruct = [r["loss_instruct"] for r in steps[6:] if "loss_instruct" in r]
    assert len(instruct) >= 5 and instruct[-1] < 0.7 * instruct[0]  # and the mix phase reads
    capsys.readouterr()
    image = root / "test" / "images" / "bar_000.png"
    assert main(["chat", "--model", str(lm), "--image", str(image), "which colour is the bar?"]) == 0
    answer = capsys.readouterr().out.strip().split()
    vocab = {
        "red",
        "teal",
        "black",
        "horizontal",
        "vertical",
        "which",
        "colour",
        "is",
        "the",
        "bar",
        "way",
        "does",
        "it",
        "run",
        "a",
        "running",
        "?",
    }
    assert set(answer) <= vocab  # text words of this dataset (or nothing yet), never an image marker
    out = tmp_path / "g.png"
    assert main(["generate", "--model", str(lm), "a teal bar running vertical", "--out", str(out)]) == 0
    assert Image.open(json.loads(capsys.readouterr().out)["images"][0]).size == (32, 32)
    assert main(["eval", "model", "--model", str(lm), "--data", str(root), "--split", "test"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["vqa_n"] == 16 and "decompression_code_accuracy" in res
    # the shapes judge does not score this world's drawings (it would call every one right)
    assert res["t2i_n"] == 8 and "t2i_accuracy" not in res and "t2i_reference_accuracy_seen" not in res
    assert_report_counts(res)
