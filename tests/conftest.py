"""Shared fixtures: tiny configs and a tiny shapes-world dataset made on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from unicodebook.config import load_config

# A model small enough to train for a few steps in seconds on 2 CPU cores.
TINY_OVERRIDES = [
    "model.image_size=32",
    "llm.vocab_size=256",
    "llm.hidden_size=32",
    "llm.num_layers=1",
    "llm.num_heads=2",
    "llm.intermediate_size=64",
    "model.autoencoder.ch=8",
    "model.autoencoder.ch_mult=[1,2,2]",
    "model.autoencoder.z_channels=8",
    "model.autoencoder.num_res_blocks=0",
    "model.codebook.row_offset=128",
    "model.codebook.num_rows=64",
    "train_tokenizer.batch_size=16",
    "train_tokenizer.steps=30",
    "train_tokenizer.warmup_steps=5",
    "train_tokenizer.log_every=5",
    "train_tokenizer.save_every=10",
    "train_tokenizer.grid_every=15",
    "train_tokenizer.lr=3e-3",
    "train_lm.steps=8",
    "train_lm.batch_size=8",
    "train_lm.warmup_steps=2",
    "train_lm.log_every=2",
    "train_lm.save_every=4",
    "train_lm.sample_every=0",
    "train_lm.image_layout=flat",  # the paper's layout; the depth layout's tests ask for it by name
]

# the SEED family at test sizes: four phases of 10 steps (tests/tokenizers/test_seed.py)
SEED_TINY = [
    "model.image_size=32",
    "model.vit.patch_size=8",
    "model.vit.width=32",
    "model.vit.layers=1",
    "model.vit.heads=2",
    "model.vit.embed_dim=16",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "model.qformer.queries=8",
    "model.qformer.width=32",
    "model.qformer.layers=2",
    "model.qformer.heads=2",
    "model.num_codes=64",
    "model.code_dim=8",
    "model.recon_blocks=1",
    "model.gen_blocks=1",
    "model.decoder_ch=8",
    "train_tokenizer.steps=40",
    "train_tokenizer.batch_size=16",
    "train_tokenizer.warmup_steps=2",
    "train_tokenizer.log_every=5",
    "train_tokenizer.save_every=20",
    "train_tokenizer.grid_every=0",
    "train_tokenizer.phases=[{name: vit, steps: 10}, {name: qformer, steps: 10}, {name: vq, steps: 10}, "
    "{name: decoder, steps: 10}]",
]


def pytest_configure(config):
    """The suite is a CPU suite (its bit-for-bit resume and 1-vs-2-process claims are CPU
    claims): on a GPU machine the GPU is hidden, subprocesses included, unless the run asks for
    the GPU tests with ``-m cuda`` (tests/train/test_cuda.py, tolerances stated there)."""
    if (config.option.markexpr or "").strip() != "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def tiny_config(*extra: str):
    return load_config("tiny", TINY_OVERRIDES + list(extra))


def assert_report_counts(report: dict) -> None:
    """What an ``eval model`` report must satisfy whatever the model: each accuracy is a whole
    number of right answers out of its n, its seen and held-out parts add up to the whole, and the
    examples it shows agree with the count of right answers."""
    from unicodebook.eval.model import normalise_answer

    for task in ("vqa", "description", "t2i"):
        if f"{task}_accuracy" not in report:
            continue
        n = report[f"{task}_n"]
        right = report[f"{task}_accuracy"] * n
        assert abs(right - round(right)) < 1e-6, f"{task}: {right} right answers"
        parts = [
            (report[f"{task}_accuracy_{p}"], report[f"{task}_n_{p}"])
            for p in ("seen", "held_out")
            if f"{task}_n_{p}" in report
        ]
        if sum(k for _, k in parts) == n:  # VQA's parts cover only the scenes the split marks
            assert abs(sum(a * k for a, k in parts) - right) < 1e-6, f"{task}: the parts do not add up"
        shown = report.get(f"{task}_examples", [])
        shown_right = sum(normalise_answer(e["answer"]) == normalise_answer(e["truth"]) for e in shown)
        assert shown_right <= round(right) <= n - (len(shown) - shown_right), f"{task}: the examples disagree"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from unicodebook.data.shapes import write_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, n_train=96, n_val=24, n_test=24, size=32, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tokenizer_run(shapes_dir, tmp_path_factory) -> Path:
    """A stage I run (a few steps) on the tiny shapes world."""
    from unicodebook.train.stage1 import train_tokenizer

    run = tmp_path_factory.mktemp("stage1") / "run"
    train_tokenizer(tiny_config("train_tokenizer.steps=10"), shapes_dir, run, progress=False)
    return run


@pytest.fixture(scope="session")
def model_run(tokenizer_run, shapes_dir, tmp_path_factory) -> Path:
    """A stage II run (8 steps) on top of ``tokenizer_run``."""
    from unicodebook.train.stage2 import train_lm

    run = tmp_path_factory.mktemp("stage2") / "run"
    train_lm(tiny_config(), tokenizer_run, shapes_dir, run, progress=False)
    return run


@pytest.fixture(scope="session")
def depth_model_run(tokenizer_run, shapes_dir, tmp_path_factory) -> Path:
    """A stage II run (8 steps) of the depth layout on top of ``tokenizer_run``."""
    from unicodebook.train.stage2 import train_lm

    run = tmp_path_factory.mktemp("stage2_depth") / "run"
    train_lm(
        tiny_config("train_lm.image_layout=depth", "train_lm.depth_head.heads=2"),
        tokenizer_run,
        shapes_dir,
        run,
        progress=False,
    )
    return run


@pytest.fixture
def own_kernel_cache(tmp_path_factory, monkeypatch):
    """The compiled CPU kernels (lm/cpu_kernel.py) built into this session's temporary cache and
    loaded afresh by the test (the kernel and decoder tests)."""
    from unicodebook.lm import cpu_kernel

    monkeypatch.setenv("UNICODEBOOK_CACHE", str(tmp_path_factory.getbasetemp() / "unicodebook-cache"))
    cpu_kernel._load.cache_clear()
    yield
    cpu_kernel._load.cache_clear()
