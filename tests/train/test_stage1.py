"""Stage I training: the loss falls, the run folder describes itself, resume is exact."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_OVERRIDES, tiny_config
from safetensors.torch import load_file

from unicodebook.errors import UnicodebookError
from unicodebook.tokenizers.unicode import load_tokenizer
from unicodebook.train.stage1 import train_tokenizer


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_the_run_folder_describes_itself(shapes_dir, tmp_path):
    run = tmp_path / "run"
    res = train_tokenizer(tiny_config(), shapes_dir, run, progress=False)
    rows = [r for r in _metrics(run) if "loss" in r]
    assert rows[-1]["l1"] < 0.6 * rows[0]["l1"]
    assert rows[-1]["psnr"] > rows[0]["psnr"] + 3
    for name in (
        "config.yaml",
        "model.safetensors",
        "binding.json",
        "llm/config.json",
        "metrics.jsonl",
        "reconstructions.png",
        "codebook_usage.png",
        "curves.png",
    ):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000020", "step_0000030"]  # keep_last=2
    assert res.val["n_images"] == 24 and len(res.val["usage"]) == 4 and len(res.val["perplexity"]) == 4
    # the run folder is a tokenizer folder
    visual_tok = load_tokenizer(run)
    assert visual_tok.codes_per_image == 256
    assert torch.equal(load_file(run / "model.safetensors")["quantizer.codebook.embed"], visual_tok.codebook.embed)


def _cli(*args):
    return [sys.executable, "-m", "unicodebook", *args]


def test_resume_after_sigkill_matches_an_uninterrupted_run(shapes_dir, tmp_path):
    steps = ["train_tokenizer.steps=60", "train_tokenizer.save_every=10"]
    ref = tmp_path / "ref"
    train_tokenizer(tiny_config(*steps), shapes_dir / "train", ref, progress=False)

    run = tmp_path / "killed"
    args = _cli("train-tokenizer", "--data", str(shapes_dir / "train"), "--out", str(run), *TINY_OVERRIDES, *steps)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_0000020").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert "step_0000060" not in done, "the run finished before it could be killed"

    out = subprocess.run(
        _cli("train-tokenizer", "--data", str(shapes_dir / "train"), "--out", str(run), "--resume"),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    a, b = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    # the metrics log reads as one run: every step once, the same values as the uninterrupted run
    steps = [r["step"] for r in _metrics(run) if "loss" in r]
    assert steps == sorted(set(steps)) == [r["step"] for r in _metrics(ref) if "loss" in r]
    assert [r["loss"] for r in _metrics(run) if "loss" in r] == [r["loss"] for r in _metrics(ref) if "loss" in r]


def test_bad_images_in_the_training_folder_are_counted_and_skipped(shapes_dir, tmp_path, caplog):
    data = tmp_path / "imgs"
    shutil.copytree(shapes_dir / "train" / "images", data)
    (data / "broken.png").write_bytes((data / "000000.png").read_bytes()[:50])
    (data / "notes.png").write_text("hello")
    run = tmp_path / "run"
    train_tokenizer(tiny_config("train_tokenizer.steps=5"), data, run, progress=False)
    assert _metrics(run)[-1]["bad_images"] == 2
    assert sum("skipping bad image" in r.getMessage() for r in caplog.records) == 2


def test_refuses_to_overwrite_a_run_or_resume_with_another_config(shapes_dir, tmp_path):
    run = tmp_path / "run"
    train_tokenizer(tiny_config("train_tokenizer.steps=10"), shapes_dir, run, progress=False)
    with pytest.raises(UnicodebookError, match="already holds a run"):
        train_tokenizer(tiny_config("train_tokenizer.steps=10"), shapes_dir, run, progress=False)
    with pytest.raises(UnicodebookError, match="differs from the run's config.yaml"):
        train_tokenizer(tiny_config("train_tokenizer.steps=20"), shapes_dir, run, resume=True, progress=False)
    with pytest.raises(UnicodebookError, match="nothing to resume"):
        train_tokenizer(tiny_config(), shapes_dir, tmp_path / "fresh", resume=True, progress=False)


def test_optional_perceptual_and_gan_terms_train_and_resume(shapes_dir, tmp_path):
    """LPIPS from local weight files and the PatchGAN: logged, checkpointed, resumable."""
    from safetensors.torch import save_file

    from unicodebook.train.losses import LPIPS

    m = LPIPS()
    save_file(
        {f"features.{k}": v.clone() for k, v in m.net.features.state_dict().items()}, str(tmp_path / "vgg.safetensors")
    )
    save_file(
        {f"lin{i}.model.1.weight": torch.rand_like(lin.model[1].weight) * 0.1 for i, lin in enumerate(m.lins)},
        str(tmp_path / "lin.safetensors"),
    )
    extra = [
        "loss.perceptual=0.1",
        f"loss.perceptual_vgg={tmp_path / 'vgg.safetensors'}",
        f"loss.perceptual_lin={tmp_path / 'lin.safetensors'}",
        "loss.gan=0.1",
        "loss.gan_start=2",
        "train_tokenizer.steps=4",
        "train_tokenizer.save_every=2",
        "train_tokenizer.batch_size=4",
    ]
    run = tmp_path / "run"
    train_tokenizer(tiny_config(*extra), shapes_dir / "train", run, progress=False)
    last = [r for r in _metrics(run) if "loss" in r][-1]
    assert {"lpips", "gan_g", "gan_d"} <= last.keys()
    assert (run / "checkpoints" / "step_0000004" / "discriminator.safetensors").exists()
    cfg = tiny_config(*extra[:-3], "train_tokenizer.steps=6")
    with pytest.raises(UnicodebookError, match="differs from the run's config.yaml"):
        train_tokenizer(cfg, shapes_dir / "train", run, resume=True, progress=False)
    with pytest.raises(UnicodebookError, match="needs loss.perceptual_vgg"):
        train_tokenizer(tiny_config("loss.perceptual=0.1"), shapes_dir / "train", tmp_path / "r2", progress=False)
