"""`unicodebook chat` without a question: a loop over stdin, answers streamed, images swapped."""

from __future__ import annotations

import io
import re

import pytest
from _serving import QUESTION, talking_copy

from unicodebook.cli import main


@pytest.fixture(scope="module")
def talk(model_run, tmp_path_factory):
    return talking_copy(model_run, tmp_path_factory.mktemp("talk_loop") / "model")


def test_the_loop_answers_as_chat_does_and_loads_another_image(talk, shapes_dir, tmp_path, capsys, monkeypatch):
    first, second = (shapes_dir / "test" / "images" / f"00000{i}.png" for i in (0, 1))
    one_shot = []
    for img in (first, second):
        assert main(["chat", "--model", str(talk), "--image", str(img), QUESTION]) == 0
        one_shot.append(capsys.readouterr().out.strip())
    (tmp_path / "notes.png").write_text("not an image")
    lines = [QUESTION, f"/image {tmp_path / 'notes.png'}", QUESTION, f"/image {second}", QUESTION, "/quit", "ignored"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(talk), "--image", str(first)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [one_shot[0], one_shot[0], one_shot[1]]  # a bad image keeps the one it had
    assert f"error: {tmp_path / 'notes.png'}: not an image file" in err
    assert len(re.findall(r"\d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)", err)) == 3
