"""Resource limits as configuration: ``data.max_image_pixels``,
``data.max_image_bytes``, ``data.max_caption_chars`` and ``data.max_conversation_chars``, each
with a default and one line past it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _corpus import stderr_lines
from conftest import TINY_OVERRIDES
from PIL import Image

from unicodebook.cli import main


def _cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_defaults_are_documented_values():
    from unicodebook.config import load_config

    d = load_config("tiny").data
    assert (d.max_image_pixels, d.max_image_bytes, d.max_caption_chars, d.max_conversation_chars) == (
        40_000_000,
        64 * 2**20,
        2000,
        16000,
    )


@pytest.mark.parametrize("key", ["max_image_pixels", "max_image_bytes", "max_caption_chars", "max_conversation_chars"])
def test_a_limit_below_one_is_refused_in_one_line(key, shapes_dir, tmp_path, capsys):
    rc, out, err = _cli(
        capsys, "train-tokenizer", "--data", shapes_dir, "--out", tmp_path / "run", *TINY_OVERRIDES, f"data.{key}=0"
    )
    assert rc == 2 and err.splitlines() == [f"error: data: {key} must be >= 1, got 0"]
    assert not (tmp_path / "run").exists()


def test_a_stage1_run_skips_files_past_its_limits_and_its_tokenizer_keeps_them(shapes_dir, tmp_path, capsys):
    """A run's limits are part of its config: the stage I pass skips a file past them, and the
    tokenizer it makes refuses one with one line."""
    folder = tmp_path / "images"
    shutil.copytree(shapes_dir / "train" / "images", folder)
    noisy = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(folder / "noisy.png")  # ~3 KB: shapes images are a few hundred bytes
    size = (folder / "noisy.png").stat().st_size
    limit = size - 1
    rc, out, err = _cli(
        capsys,
        "train-tokenizer",
        "--data",
        folder,
        "--out",
        tmp_path / "run",
        *TINY_OVERRIDES,
        "train_tokenizer.steps=1",
        "train_tokenizer.save_every=1",
        f"data.max_image_bytes={limit}",
        "data.max_image_pixels=1100",
    )
    assert rc == 0, err
    assert [line for line in stderr_lines(err) if line.startswith("warning: skipping")] == [
        f"warning: skipping bad image: {folder / 'noisy.png'}: {size:,} bytes, more than the {limit:,} accepted "
        "(data.max_image_bytes)"
    ]
    Image.new("RGB", (40, 40), "red").save(tmp_path / "big.png")  # 1600 pixels, a small file
    rc, out, err = _cli(capsys, "tokenize", "--tokenizer", tmp_path / "run", tmp_path / "big.png")
    assert rc == 1 and out == ""
    assert err.splitlines() == [
        f"error: {tmp_path / 'big.png'}: 40×40 px, more than the 1,100 pixels accepted (data.max_image_pixels)"
    ]
    rc, out, err = _cli(capsys, "tokenize", "--tokenizer", tmp_path / "run", folder / "000000.png")
    assert rc == 0 and json.loads(out)["image"] == str(folder / "000000.png")


def test_a_stage2_run_skips_captions_and_conversations_past_its_limits(tokenizer_run, shapes_dir, tmp_path, capsys):
    split = tmp_path / "split"
    split.mkdir()
    img = shapes_dir / "train" / "images" / "000000.png"
    shutil.copy(img, split / "a.png")
    conv = {
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red"}],
    }
    long_conv = {
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the object?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    (split / "instruct.json").write_text(json.dumps([conv, conv, long_conv]))
    (split / "t2i.jsonl").write_text(
        "\n".join(
            json.dumps({"image": "a.png", "caption": c})
            for c in ["a red circle", "a blue square", "a small red circle at the top"]
        )
        + "\n"
    )
    rc, out, err = _cli(
        capsys,
        "train-lm",
        "--tokenizer",
        tokenizer_run,
        "--data",
        split,
        "--out",
        tmp_path / "m",
        *TINY_OVERRIDES,
        "train_lm.steps=1",
        "train_lm.save_every=1",
        "train_lm.batch_size=2",
        "data.max_caption_chars=20",
        "data.max_conversation_chars=30",
    )
    assert rc == 0, err
    skipped = [line for line in stderr_lines(err) if line.startswith("warning: skipping")]
    assert skipped == [
        "warning: skipping instruct.json item 2: 37 characters, more than the 30 accepted "
        "(data.max_conversation_chars)",
        "warning: skipping t2i.jsonl line 3: caption of 29 characters, more than the 20 accepted "
        "(data.max_caption_chars)",
    ]
    last = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["bad_records"] == 2
