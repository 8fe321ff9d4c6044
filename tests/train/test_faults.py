"""Faults during training (issue 33, part 2): a checkpoint write that fails, a second process in
the same run folder, a run folder edited by hand."""

from __future__ import annotations

import errno
import os

import pytest

from conftest import TINY_OVERRIDES
from unicodebook.cli import main

RUN4 = [*TINY_OVERRIDES, "train_tokenizer.steps=4", "train_tokenizer.save_every=2", "train_tokenizer.grid_every=0",
        "train_tokenizer.log_every=2"]


def _cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _errors(err: str) -> list[str]:
    """The error lines of stderr (the rest is progress bars), checked to hold no traceback."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error")]


def _train(capsys, data, run, *extra):
    return _cli(capsys, "train-tokenizer", "--data", data, "--out", run, *extra)


def test_a_checkpoint_write_that_runs_out_of_space_stops_in_one_line_and_keeps_the_last_good_one(
        shapes_dir, tmp_path, capsys, monkeypatch):
    from unicodebook.train import checkpoint
    from unicodebook.utils.io import atomic_save_tensors

    def full_disk(tensors, path, metadata=None):
        if "step_0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        atomic_save_tensors(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "atomic_save_tensors", full_disk)
    run = tmp_path / "run"
    rc, out, err = _train(capsys, shapes_dir, run, *RUN4)
    good = run / "checkpoints" / "step_0000002"
    assert rc == 2 and out == ""
    assert _errors(err) == [f"error: could not write checkpoint {run / 'checkpoints' / 'step_0000004'} (No space "
                            f"left on device); the last good checkpoint is {good} (make room, then --resume)"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]  # no half-written folder
    monkeypatch.undo()  # space again: the run resumes from that checkpoint and finishes
    rc, out, err = _train(capsys, shapes_dir, run, "--resume")
    assert rc == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_a_second_process_in_the_same_run_folder_is_refused(shapes_dir, tmp_path, capsys):
    from unicodebook.train.checkpoint import run_lock

    run = tmp_path / "run"
    with run_lock(run):  # a training process holds the folder
        rc, out, err = _train(capsys, shapes_dir, run, *RUN4)
        assert rc == 2 and _errors(err) == [
            f"error: {run} is in use by another training process (pid {os.getpid()}, {run / '.lock'}); "
            "wait for it to end or choose another --out"]
        assert not (run / "checkpoints").exists()
    rc, out, err = _train(capsys, shapes_dir, run, *RUN4)  # released: the folder is free again
    assert rc == 0, err


def test_a_lock_left_by_a_dead_process_is_taken_over(shapes_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999999\n")  # a pid that does not run: its flock went with it
    rc, out, err = _train(capsys, shapes_dir, run, *RUN4)
    assert rc == 0, err
    assert (run / ".lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("name", ["model.safetensors", "optimizers.safetensors"])
def test_a_checkpoint_edited_by_hand_is_refused_on_resume_naming_the_file(shapes_dir, tmp_path, capsys, name):
    run = tmp_path / "run"
    assert _train(capsys, shapes_dir, run, *RUN4)[0] == 0
    last = run / "checkpoints" / "step_0000004"
    data = bytearray((last / name).read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: the file still loads
    (last / name).write_bytes(bytes(data))
    rc, out, err = _train(capsys, shapes_dir, run, "--resume")
    assert rc == 2 and _errors(err) == [
        f"error: checkpoint {last}: {name} was changed after it was saved (its sha256 is not the one state.json "
        "recorded); restore it or remove this checkpoint"]


def test_sigterm_saves_and_exits_cleanly_and_resume_gives_the_uninterrupted_weights(tokenizer_run, shapes_dir, tmp_path):
    """A scheduler's SIGTERM (preemption): the run saves at the end of its step, says so on one
    line and exits 143; ``--resume`` then ends at the weights of a run never stopped."""
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    def args(run, *extra):
        return [sys.executable, "-m", "unicodebook", "train-lm", "--tokenizer", str(tokenizer_run), "--data",
                str(shapes_dir), "--out", str(run), *extra]

    steps = [*TINY_OVERRIDES, "train_lm.steps=40", "train_lm.save_every=10"]
    ref = tmp_path / "ref"
    assert subprocess.run(args(ref, *steps), capture_output=True, text=True).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen(args(run, *steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_0000010").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stopped = [line for line in err.splitlines() if "SIGTERM" in line]
    assert len(stopped) == 1 and "Traceback" not in err, err
    at = int(stopped[0].split("at step ")[1].split()[0])
    assert 10 <= at < 40
    assert stopped[0].endswith(f"stage II stopped by SIGTERM at step {at} of 40: checkpoint "
                               f"{run}/checkpoints/step_{at:07d} written; continue with --resume")
    assert (run / "checkpoints" / f"step_{at:07d}").is_dir() and not (run / "llm").exists()
    res = subprocess.run(args(run, "--resume"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for name in ("llm/model.safetensors", "image_positions.safetensors"):
        a, b = load_file(ref / name), load_file(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"
