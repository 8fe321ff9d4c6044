"""The GPU paths: both stages train on CUDA in bf16 (stage II with gradient checkpointing), a
GPU-trained model runs on the CPU and the other way round, a resumed CUDA run ends where the
uninterrupted one does, and stage II under FSDP (Accelerate, one GPU) matches the DDP/plain run
and resumes. Skipped where there is no CUDA GPU (CI); run on a GPU machine with
``pytest -m cuda``."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES
from safetensors.torch import load_file

from unicodebook.data.images import list_images, load_image
from unicodebook.lm.model import load_model
from unicodebook.tokenizers.unicode import load_tokenizer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# one process against FSDP on one GPU: the same maths up to the order of float sums
TOL = 5e-3
FSDP_CONFIG = Path(__file__).parents[2] / "src" / "unicodebook" / "configs" / "accelerate" / "fsdp_7b.yaml"


def _cli(*args, launcher=()):
    cmd = [*launcher, "-m", "unicodebook", *args] if launcher else [sys.executable, "-m", "unicodebook", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def gpu_tokenizer(shapes_dir, tmp_path_factory) -> Path:
    """Stage I on the GPU in bf16."""
    run = tmp_path_factory.mktemp("cuda") / "s1"
    _cli(
        "train-tokenizer",
        "--data",
        str(shapes_dir / "train"),
        "--out",
        str(run),
        *TINY_OVERRIDES,
        "train_tokenizer.steps=60",
        "train_tokenizer.precision=bf16",
        "train_tokenizer.grid_every=0",
    )
    return run


def test_stage1_trains_on_cuda_in_bf16_and_runs_on_the_cpu(gpu_tokenizer, shapes_dir):
    m = [r for r in _metrics(gpu_tokenizer) if "loss" in r]
    assert m[-1]["psnr"] > m[0]["psnr"] + 2.0
    images = torch.stack([load_image(p, 32) for p in list_images(shapes_dir / "val" / "images")[:16]])
    on_gpu, on_cpu = load_tokenizer(gpu_tokenizer, device="cuda"), load_tokenizer(gpu_tokenizer, device="cpu")
    a, b = on_gpu.encode(images).cpu(), on_cpu.encode(images)
    assert on_gpu.encode(images).device.type == "cuda"  # inputs follow the model
    assert (a == b).float().mean() > 0.95  # cuDNN and MKL round differently; the codes barely move


def test_stage2_trains_on_cuda_in_bf16_with_checkpointing_and_generates_on_both(gpu_tokenizer, shapes_dir, tmp_path):
    run = tmp_path / "s2"
    _cli(
        "train-lm",
        "--tokenizer",
        str(gpu_tokenizer),
        "--data",
        str(shapes_dir),
        "--out",
        str(run),
        *TINY_OVERRIDES,
        "train_lm.steps=30",
        "train_lm.precision=bf16",
        "train_lm.gradient_checkpointing=true",
        "train_lm.lr=3e-3",
    )
    m = [r for r in _metrics(run) if "loss_instruct" in r]
    assert m[-1]["loss_instruct"] < 0.9 * m[0]["loss_instruct"]
    for device in ("cuda", "cpu"):
        model = load_model(run, device=device)
        images = model.generate_image("draw a red circle", n=2, cfg_scale=2.0, temperature=1.0, top_k=0, seed=0)
        assert images.shape == (2, 3, 32, 32) and images.device.type == device
        assert isinstance(model.chat(images[0].cpu(), "what colour is the circle?", max_new_tokens=4), str)
    out = _cli(
        "generate", "--model", str(run), "draw a blue square", "--out", str(tmp_path / "g.png"), "--device", "cuda"
    )
    assert json.loads(out.stdout)["images"] == [str(tmp_path / "g.png")]


def test_a_resumed_cuda_run_ends_with_the_uninterrupted_weights(gpu_tokenizer, shapes_dir, tmp_path):
    args = ["--tokenizer", str(gpu_tokenizer), "--data", str(shapes_dir), *TINY_OVERRIDES]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _cli("train-lm", *args, "--out", str(ref))
    _cli("train-lm", *args, "--out", str(cut))
    shutil.rmtree(cut / "checkpoints" / "step_0000008")
    shutil.rmtree(cut / "llm")
    _cli("train-lm", "--tokenizer", str(gpu_tokenizer), "--data", str(shapes_dir), "--out", str(cut), "--resume")
    a, b = load_file(ref / "llm" / "model.safetensors"), load_file(cut / "llm" / "model.safetensors")
    # a run repeats itself on the GPU only as far as its kernels are deterministic; the RNG and
    # data position come back exactly, so the difference is float-order noise at most
    assert _max_diff(a, b) < 1e-4
    strip = lambda rows: [r["step"] for r in rows]  # noqa: E731
    assert strip(_metrics(cut)) == strip(_metrics(ref))


def test_stage2_under_fsdp_matches_one_process_and_resumes(gpu_tokenizer, shapes_dir, tmp_path):
    """The shipped FSDP config (FSDP2, LLaMA layers wrapped, full state dicts) on one GPU."""
    cfg = tmp_path / "fsdp1.yaml"
    cfg.write_text(FSDP_CONFIG.read_text().replace("num_processes: 8", "num_processes: 1"))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg)]
    # AdamW: FSDP shards the matrices Muon needs whole (refused under FSDP, see below)
    args = ["--tokenizer", str(gpu_tokenizer), "--data", str(shapes_dir), *TINY_OVERRIDES, "train_lm.optimizer=adamw"]
    plain, fsdp = tmp_path / "plain", tmp_path / "fsdp"
    _cli("train-lm", *args, "--out", str(plain))
    _cli("train-lm", *args, "--out", str(fsdp), launcher=launch)
    for name in ("llm/model.safetensors", "image_positions.safetensors"):
        assert _max_diff(load_file(plain / name), load_file(fsdp / name)) < TOL, name
    # the checkpoint is in the single-process layout: its optimizer state matches the plain run's
    opt_a = load_file(plain / "checkpoints" / "step_0000008" / "optimizers.safetensors")
    opt_b = load_file(fsdp / "checkpoints" / "step_0000008" / "optimizers.safetensors")
    assert opt_a.keys() == opt_b.keys()
    assert (
        _max_diff(
            {k: v for k, v in opt_a.items() if "rng" not in k}, {k: v for k, v in opt_b.items() if "rng" not in k}
        )
        < TOL
    )

    # resume under FSDP from step 4: the uninterrupted FSDP run's weights
    shutil.rmtree(fsdp / "checkpoints" / "step_0000008")
    kept = load_file(fsdp / "llm" / "model.safetensors")
    shutil.rmtree(fsdp / "llm")
    _cli(
        "train-lm",
        "--tokenizer",
        str(gpu_tokenizer),
        "--data",
        str(shapes_dir),
        "--out",
        str(fsdp),
        "--resume",
        launcher=launch,
    )
    assert _max_diff(kept, load_file(fsdp / "llm" / "model.safetensors")) < 1e-4
    model = load_model(fsdp, device="cuda")  # the folder an FSDP run writes is a working model
    assert model.generate_image("draw a red circle", n=1, cfg_scale=1.0, temperature=0.0, top_k=0, seed=0).shape == (
        1,
        3,
        32,
        32,
    )
