"""Faults during training: a checkpoint write that fails, a second process in
the same run folder, a run folder edited by hand."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import SEED_TINY, TINY_OVERRIDES

from unicodebook.cli import main

RUN4 = [
    *TINY_OVERRIDES,
    "train_tokenizer.steps=4",
    "train_tokenizer.save_every=2",
    "train_tokenizer.grid_every=0",
    "train_tokenizer.log_every=2",
]


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
    shapes_dir, tmp_path, capsys, monkeypatch
):
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
    assert _errors(err) == [
        f"error: could not write checkpoint {run / 'checkpoints' / 'step_0000004'} (No space "
        f"left on device); the last good checkpoint is {good} (make room, then --resume)"
    ]
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
            "wait for it to end or choose another --out"
        ]
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
        "recorded); restore it or remove this checkpoint"
    ]


def _sigterm_then_resume(args, steps: int, stage: str, run, ref, finished: str, compare: tuple[str, ...]):
    """Run ``args(ref)`` to the end; start ``args(run)``, SIGTERM it once its first checkpoint
    (step 10) exists, check the one line and exit 143, ``--resume`` it, compare the weights."""
    import signal
    import subprocess
    import time

    import torch
    from safetensors.torch import load_file

    assert subprocess.run(args(ref), capture_output=True, text=True).returncode == 0
    proc = subprocess.Popen(args(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_0000010").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stopped = [line for line in err.splitlines() if "SIGTERM" in line]
    assert len(stopped) == 1 and "Traceback" not in err, err
    at = int(stopped[0].split("at step ")[1].split()[0])
    assert 10 <= at < steps
    assert stopped[0].endswith(
        f"{stage} stopped by SIGTERM at step {at} of {steps}: checkpoint "
        f"{run}/checkpoints/step_{at:07d} written; continue with --resume"
    )
    assert (run / "checkpoints" / f"step_{at:07d}").is_dir() and not (run / finished).exists()
    res = subprocess.run([*args(run), "--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for name in compare:
        a, b = load_file(ref / name), load_file(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"


def test_sigterm_saves_and_exits_cleanly_and_resume_gives_the_uninterrupted_weights(
    tokenizer_run, shapes_dir, tmp_path
):
    """A scheduler's SIGTERM (preemption): the run saves at the end of its step, says so on one
    line and exits 143; ``--resume`` then ends at the weights of a run never stopped."""
    import sys

    def args(run):
        return [
            sys.executable,
            "-m",
            "unicodebook",
            "train-lm",
            "--tokenizer",
            str(tokenizer_run),
            "--data",
            str(shapes_dir),
            "--out",
            str(run),
            *TINY_OVERRIDES,
            "train_lm.steps=40",
            "train_lm.save_every=10",
        ]

    _sigterm_then_resume(
        args,
        40,
        "stage II",
        tmp_path / "run",
        tmp_path / "ref",
        "llm",
        ("llm/model.safetensors", "image_positions.safetensors"),
    )


def test_sigterm_stops_a_phased_stage_one_and_resume_gives_the_uninterrupted_weights(shapes_dir, tmp_path):
    """The same for the phased stage I loop that SEED and LaVIT share (SEED's four phases here,
    the signal landing in one of them, the resumed run crossing the rest)."""
    import sys

    phases = (
        "train_tokenizer.phases=[{name: vit, steps: 40}, {name: qformer, steps: 40}, {name: vq, steps: 40}, "
        "{name: decoder, steps: 40}]"
    )
    llm = [o for o in TINY_OVERRIDES if o.startswith(("llm.", "train_lm."))]
    over = [
        o
        for o in SEED_TINY
        if not o.startswith(("train_tokenizer.steps", "train_tokenizer.phases", "train_tokenizer.save_every"))
    ]

    def args(run):
        return [
            sys.executable,
            "-m",
            "unicodebook",
            "train-tokenizer",
            "--config",
            "seed-tiny",
            "--data",
            str(shapes_dir),
            "--out",
            str(run),
            *llm,
            *over,
            "train_tokenizer.steps=160",
            phases,
            "train_tokenizer.save_every=10",
        ]

    _sigterm_then_resume(
        args,
        160,
        "SEED stage I",
        tmp_path / "run",
        tmp_path / "ref",
        "reconstructions.png",
        ("model.safetensors", "text_tower.safetensors"),
    )
