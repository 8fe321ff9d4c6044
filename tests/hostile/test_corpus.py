"""Every entry point that reads user files, over the hostile-input corpus (tests/hostile/_corpus.py).

Single-file commands (``tokenize``, ``reconstruct``, ``chat``, the server) give an odd but legal
image a normal answer and an unusable file one ``error: …`` line (a 4xx from the server); batch
passes (``eval tokenizer``, ``eval model``, a stage I and a stage II data pass, ``data shards``)
report each bad file or record on one line, count it and go on. Nothing may print a traceback
or change a file that was already there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from _corpus import ENTRIES, UNUSABLE, usable_here, write_images, write_records
from _corpus import stderr_lines as _lines
from conftest import TINY_OVERRIDES

from unicodebook.cli import main

CASES = [
    pytest.param(
        e,
        id=e.name,
        marks=[] if usable_here(e) else pytest.mark.skip(reason="running as root: a mode-000 file is still readable"),
    )
    for e in ENTRIES
]


def _tree_hash(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for f in folders
        for p in sorted(f.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "corpus"
    write_images(folder)
    return folder


@pytest.fixture(scope="module")
def good_image(shapes_dir) -> Path:
    return shapes_dir / "test" / "images" / "000000.png"


# ------------------------------------------------------------------------------ one file, one answer
@pytest.mark.parametrize("entry", CASES)
@pytest.mark.parametrize("command", ["tokenize", "reconstruct", "chat"])
def test_a_single_file_command_answers_or_gives_one_error_line(
    command, entry, corpus, tokenizer_run, model_run, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "recon.png").write_bytes(b"an earlier result")
    before = _tree_hash(out, tokenizer_run, model_run)
    path = corpus / entry.name
    args = {
        "tokenize": ["tokenize", "--tokenizer", tokenizer_run, path],
        "reconstruct": ["reconstruct", "--tokenizer", tokenizer_run, path, "--out", out / "recon.png"],
        "chat": ["chat", "--model", model_run, "--image", path, "--max-new-tokens", "2", "what colour is it?"],
    }
    rc, stdout, err = _cli(capsys, *args[command])
    assert "Traceback" not in stdout + err
    if entry.legal:
        assert rc == 0 and _lines(err) == [], err
        if command == "tokenize":
            assert json.loads(stdout)["image"] == str(path)
        changed = {p for p, h in _tree_hash(out, tokenizer_run, model_run).items() if before.get(p) != h}
        assert changed == ({str(out / "recon.png")} if command == "reconstruct" else set())
        return
    assert rc == (1 if command == "tokenize" else 2)  # tokenize reads a list: a bad one is a partial result
    lines = _lines(err)  # the message, and for some Pillow's reason in brackets
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {entry.message}"), err
    assert stdout == ""
    assert _tree_hash(out, tokenizer_run, model_run) == before


def test_odd_images_are_converted_not_just_accepted(corpus):
    from unicodebook.data.images import load_image

    gif = load_image(corpus / "animated.gif", 8)  # the first frame: red
    assert gif[0].min() > 0.9 and gif[1:].max() < 0.1
    rgba = load_image(corpus / "rgba.png")  # over white: the transparent corner is white
    assert rgba.shape == (3, 40, 40) and rgba[:, 0, 0].min() > 0.99
    deep = load_image(corpus / "deep16.png")  # 16 bit, black to white
    assert deep.shape == (3, 40, 40) and deep.min() < 0.01 and deep.max() > 0.99
    assert load_image(corpus / "thin.png").shape == (3, 300, 7)
    assert load_image(corpus / "cmyk.jpg").shape == (3, 40, 40)


# ------------------------------------------------------------------------------ the server
@pytest.mark.parametrize(
    "entry",
    [e for e in ENTRIES if e.name not in ("folder.png", "dangling.png", "unreadable.png")],
    ids=lambda e: e.name,
)
def test_the_server_answers_200_or_a_4xx(entry, corpus, served):
    url = "data:image/png;base64," + base64.b64encode((corpus / entry.name).read_bytes()).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what colour is it?"}]
    res = served.post(
        "/v1/chat/completions",
        json={"model": "model", "messages": [{"role": "user", "content": parts}], "max_tokens": 2},
    )
    if entry.legal:
        assert res.status_code == 200, res.text
    else:
        assert 400 <= res.status_code < 500 and set(res.json()["error"]) == {"message", "type", "param", "code"}, (
            res.text
        )


@pytest.fixture(scope="module")
def served(model_run):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from unicodebook.lm.model import load_model
    from unicodebook.serve import create_app

    with TestClient(create_app(load_model(model_run), "model"), raise_server_exceptions=False) as c:
        yield c


# ------------------------------------------------------------------------------ batch passes
def _skipped_in_a_folder():
    """The unusable files a folder pass meets: a folder named like an image is a subfolder."""
    return [e for e in UNUSABLE if usable_here(e) and e.name != "folder.png"]


@pytest.fixture(scope="module")
def image_folder(corpus, shapes_dir, tmp_path_factory) -> Path:
    """The corpus and 16 good images in one folder."""
    folder = tmp_path_factory.mktemp("folder") / "images"
    shutil.copytree(corpus, folder, symlinks=True)
    for p in sorted((shapes_dir / "train" / "images").glob("*.png"))[:16]:
        shutil.copy(p, folder / p.name)
    return folder


def _assert_each_reported_once(err: str, folder: Path, bad) -> None:
    lines = _lines(err)
    assert "Traceback" not in err and all(line.startswith("warning: ") for line in lines), err
    for e in bad:
        assert sum(str(folder / e.name) in line and e.message in line for line in lines) == 1, (e.name, err)
    assert len(lines) == len(bad), err


def test_eval_tokenizer_reports_counts_and_skips_the_bad_files(image_folder, tokenizer_run, capsys):
    before = _tree_hash(tokenizer_run)
    rc, out, err = _cli(capsys, "eval", "tokenizer", "--tokenizer", tokenizer_run, "--data", image_folder)
    bad = _skipped_in_a_folder()
    assert rc == 1 and json.loads(out)["n_bad"] == len(bad)
    _assert_each_reported_once(err, image_folder, bad)
    assert _tree_hash(tokenizer_run) == before


def test_a_stage1_data_pass_reports_counts_and_skips_the_bad_files(image_folder, tmp_path, capsys):
    rc, out, err = _cli(
        capsys,
        "train-tokenizer",
        "--data",
        image_folder,
        "--out",
        tmp_path / "run",
        *TINY_OVERRIDES,
        "train_tokenizer.steps=1",
        "train_tokenizer.batch_size=8",
        "train_tokenizer.save_every=1",
    )
    assert rc == 0, err
    _assert_each_reported_once(err, image_folder, _skipped_in_a_folder())
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_data_shards_of_a_folder_skips_what_it_cannot_read(image_folder, tmp_path, capsys):
    """``data shards`` copies image bytes without decoding them (the stream that reads the shards
    counts an undecodable one): here only the files that cannot be read are skipped."""
    rc, out, err = _cli(capsys, "data", "shards", "--src", image_folder, "--out", tmp_path / "shards")
    unreadable = [e for e in UNUSABLE if e.name == "dangling.png" or (e.name == "unreadable.png" and usable_here(e))]
    assert rc == 1 and json.loads(out)["skipped"] == len(unreadable)
    lines = _lines(err)
    assert len(lines) == len(unreadable) and all(line.startswith("warning: skipping image") for line in lines), err


@pytest.fixture
def records(corpus, good_image, tmp_path) -> tuple[Path, dict]:
    """A stage II folder of its own per test (a pass caches the codes in it)."""
    folder = tmp_path / "split"
    folder.mkdir()
    shutil.copytree(corpus, folder / "corpus", symlinks=True)
    return folder, write_records(folder, good_image, folder / "corpus")


def test_a_stage2_data_pass_reports_counts_and_skips_bad_records(records, tokenizer_run, tmp_path, capsys):
    folder, n = records
    before = _tree_hash(tokenizer_run)
    rc, out, err = _cli(
        capsys,
        "train-lm",
        "--tokenizer",
        tokenizer_run,
        "--data",
        folder,
        "--out",
        tmp_path / "m",
        *TINY_OVERRIDES,
        "train_lm.steps=1",
        "train_lm.save_every=1",
        "train_lm.batch_size=4",
    )
    assert rc == 0, err
    last = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["bad_records"] == n["malformed"] + n["bad_image"]  # a record whose image is bad is skipped too
    assert last["bad_images"] == n["bad_image"] // 2  # each bad image serves one conversation and one caption
    assert "Traceback" not in err and all(line.startswith("warning: ") for line in _lines(err)), err
    assert len(_lines(err)) == n["malformed"] + n["bad_image"] // 2, err
    assert _tree_hash(tokenizer_run) == before


def test_eval_model_reports_counts_and_skips_bad_records(records, model_run, capsys):
    folder, n = records
    before = _tree_hash(model_run)
    rc, out, err = _cli(
        capsys, "eval", "model", "--model", model_run, "--data", folder, "--max-t2i", "2", "--max-vqa", "2"
    )
    res = json.loads(out)
    assert rc == 1 and res["bad_records"] == n["malformed"], (res, err)
    assert res["bad_images"] == n["bad_image"] // 2  # each bad image serves one conversation and one caption
    assert "Traceback" not in err and all(line.startswith("warning: ") for line in _lines(err)), err
    assert len(_lines(err)) == n["malformed"] + n["bad_image"] // 2, err
    assert _tree_hash(model_run) == before


def test_data_shards_of_records_skips_unreadable_and_escaping_images(records, tmp_path, capsys):
    folder, n = records
    rc, out, err = _cli(capsys, "data", "shards", "--src", folder, "--out", tmp_path / "shards")
    res = json.loads(out)
    assert rc == 1 and "Traceback" not in err
    lines = _lines(err)
    assert any("../outside.png" in line and "outside the dataset folder" in line for line in lines), err
    assert res["skipped"] >= n["malformed"]


def test_the_reported_bomb_gets_one_line_from_the_real_command(corpus, tokenizer_run):
    """A user's report, as they ran it: a PNG whose header declares 60000 × 60000 pixels."""
    import subprocess
    import sys

    for cmd in (
        ["tokenize", "--tokenizer", tokenizer_run, corpus / "bomb.png"],
        ["reconstruct", "--tokenizer", tokenizer_run, corpus / "bomb.png", "--out", corpus.parent / "r.png"],
    ):
        p = subprocess.run([sys.executable, "-m", "unicodebook", *map(str, cmd)], capture_output=True, text=True)
        assert p.returncode == (1 if cmd[0] == "tokenize" else 2) and p.stdout == ""
        assert p.stderr.splitlines() == [
            f"error: {corpus / 'bomb.png'}: too large to decode (Image size (3600000000 "
            "pixels) exceeds limit of 178956970 pixels)"
        ], p.stderr
        assert not (corpus.parent / "r.png").exists()
