"""Training reliability: the non-finite guard (both stages), exact stage II resume after a
SIGKILL, torn and foreign checkpoints refused, bf16 autocast and gradient checkpointing."""

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

from unicodebook.cli import main as cli_main
from unicodebook.data.images import list_images, load_image
from unicodebook.eval.metrics import psnr
from unicodebook.lm.llm import enable_checkpointing
from unicodebook.lm.model import LMOutput, UniCodeLM, load_model
from unicodebook.lm.sequence import collate
from unicodebook.tokenizers.unicode import build_tokenizer, load_tokenizer
from unicodebook.tokenizers.unicode.model import reconstruction_loss
from unicodebook.train import stage1
from unicodebook.train.checkpoint import load_checkpoint, save_checkpoint
from unicodebook.train.engine import NonFiniteError
from unicodebook.train.stage1 import train_tokenizer
from unicodebook.train.stage2 import TASKS, train_lm


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _skipped(run):
    return [r for r in _metrics(run) if "skipped" in r]


def _all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def _adam_steps(ckpt, name):
    """The optimizer's update count, as the checkpoint holds it: the most any parameter had (a
    parameter a task leaves without a gradient, e.g. the depth table, is not updated that step)."""
    return max(
        float(v)
        for k, v in load_file(ckpt / "optimizers.safetensors").items()
        if k.startswith(f"{name}/state.") and k.endswith(".step")
    )


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _InfGrad(torch.autograd.Function):
    """Identity forward (a finite loss), an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _poison_stage1(monkeypatch, bad, how="nan"):
    """Stage I's reconstruction loss, made non-finite on the steps ``bad(step)`` (1-based, as logged):
    ``nan``: a NaN loss; ``grad``: a finite loss whose gradient is infinite."""
    calls = []

    def fake(recon, target, l1, l2):
        calls.append(1)
        if not bad(len(calls)):
            return reconstruction_loss(recon, target, l1, l2)
        if how == "nan":
            loss, parts = reconstruction_loss(recon, target, l1, l2)
            return loss * float("nan"), parts
        return reconstruction_loss(_InfGrad.apply(recon), target, l1, l2)

    monkeypatch.setattr(stage1, "reconstruction_loss", fake)
    return calls


# ------------------------------------------------------------------------------------ guard, stage I
NO_EXTRAS = ["train_tokenizer.grid_every=0"]


def test_stage1_isolated_nan_steps_are_skipped_logged_and_leave_the_weights_finite(shapes_dir, tmp_path, monkeypatch):
    _poison_stage1(monkeypatch, lambda s: s in (3, 8))
    run = tmp_path / "run"
    cfg = tiny_config(
        *NO_EXTRAS, "train_tokenizer.steps=12", "train_tokenizer.max_nonfinite=3", "train_tokenizer.save_every=0"
    )
    res = train_tokenizer(cfg, shapes_dir / "train", run, progress=False)
    assert res.steps == 12
    assert _skipped(run) == [{"step": 3, "skipped": "non-finite loss"}, {"step": 8, "skipped": "non-finite loss"}]
    logged = [r for r in _metrics(run) if "loss" in r]
    assert logged[-1]["step"] == 12 and logged[-1]["skipped_steps"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert _all_finite(load_file(run / "model.safetensors"))
    assert _adam_steps(run / "checkpoints" / "step_0000012", "model") == 10  # the 2 skipped steps never updated


def test_stage1_stops_after_max_nonfinite_in_a_row_naming_the_last_good_checkpoint(shapes_dir, tmp_path, monkeypatch):
    steps = [*NO_EXTRAS, "train_tokenizer.steps=10", "train_tokenizer.save_every=5", "train_tokenizer.max_nonfinite=3"]
    ref = tmp_path / "ref"  # the same run, never poisoned
    train_tokenizer(tiny_config(*steps, "train_tokenizer.keep_last=3"), shapes_dir / "train", ref, progress=False)

    _poison_stage1(monkeypatch, lambda s: s >= 7)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as e:
        train_tokenizer(tiny_config(*steps), shapes_dir / "train", run, progress=False)
    good = run / "checkpoints" / "step_0000005"
    assert str(e.value) == (
        f"stage I stopped at step 9: 3 steps in a row had a non-finite loss; the last good "
        f"checkpoint is {good} (lower the learning rate and --resume)"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000005"]
    assert _skipped(run) == [{"step": s, "skipped": "non-finite loss"} for s in (7, 8, 9)]
    # the checkpoint is the uninterrupted run's step 5, bit for bit, and loads into a fresh tokenizer
    weights = load_file(good / "model.safetensors")
    assert _all_finite(weights)
    assert _same_tensors(weights, load_file(ref / "checkpoints" / "step_0000005" / "model.safetensors"))
    cfg = tiny_config(*steps)
    fresh = build_tokenizer(cfg, seed=cfg.train_tokenizer.seed)
    opt = torch.optim.AdamW(fresh.parameters())
    assert load_checkpoint(good, {"model": fresh}, {"model": opt}, kind="tokenizer")["step"] == 5
    assert _same_tensors(fresh.state_dict(), weights)
    # the run folder is still a tokenizer folder: the weights of that checkpoint
    assert _same_tensors(load_file(run / "model.safetensors"), weights)


def test_stage1_non_finite_gradient_is_reported_as_such(shapes_dir, tmp_path, monkeypatch):
    _poison_stage1(monkeypatch, lambda s: s == 2, how="grad")
    run = tmp_path / "run"
    with pytest.raises(
        NonFiniteError,
        match=r"^stage I stopped at step 2: .* non-finite gradient; "
        r"the last good checkpoint is \(none yet\)",
    ):
        train_tokenizer(
            tiny_config(*NO_EXTRAS, "train_tokenizer.steps=4", "train_tokenizer.max_nonfinite=1"),
            shapes_dir / "train",
            run,
            progress=False,
        )
    assert _skipped(run) == [{"step": 2, "skipped": "non-finite gradient"}]


# ------------------------------------------------------------------------------------ guard, stage II
def test_stage2_nan_steps_are_skipped_and_training_goes_on(tokenizer_run, shapes_dir, tmp_path, monkeypatch):
    real, calls = UniCodeLM.forward, []

    def forward(self, batch, latents):
        out = real(self, batch, latents)
        calls.append(1)
        return LMOutput(out.loss * float("nan"), out.accuracy, out.n_tokens) if len(calls) in (3, 6) else out

    monkeypatch.setattr(UniCodeLM, "forward", forward)
    run = tmp_path / "run"
    res = train_lm(tiny_config("train_lm.max_nonfinite=2"), tokenizer_run, shapes_dir, run, progress=False)
    assert res.steps == 8 and len(calls) == 8
    skipped = _skipped(run)
    assert [(r["step"], r["skipped"]) for r in skipped] == [(3, "non-finite loss"), (6, "non-finite loss")]
    assert all(r["task"] in TASKS for r in skipped)
    logged = [r for r in _metrics(run) if "lr" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8] and logged[-1]["skipped_steps"] == 2
    losses = [v for r in logged for k, v in r.items() if k.startswith("loss_")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert _all_finite(load_file(run / "llm" / "model.safetensors"))
    assert _all_finite(load_file(run / "image_positions.safetensors"))
    assert _adam_steps(run / "checkpoints" / "step_0000008", "llm") == 6


# ------------------------------------------------------------------------------------ stage II resume
def _cli(*args):
    return [sys.executable, "-m", "unicodebook", *args]


def _timed(args):
    t = time.perf_counter()
    out = subprocess.run(args, check=False, capture_output=True, text=True)
    return out, time.perf_counter() - t


# the flat layout as one phase; the depth layout as a two-phase curriculum (killed in the middle of
# the first phase, the resumed run crosses into the second), trained with Muon
CURRICULUM = [
    "train_lm.image_layout=depth",
    "train_lm.depth_head.heads=2",
    "train_lm.optimizer=muon",
    "train_lm.phases=[{steps: 10, name: draw, tasks: {decompress: 0, instruct: 0, t2i: 1}, code_noise: 0.5}, "
    "{steps: 14, name: mix, lr: 1e-3, warmup_steps: 3, caption_dropout: 0.3}]",
]


@pytest.mark.parametrize("extra", [[], CURRICULUM], ids=["flat", "depth-phases"])
def test_stage2_resume_after_sigkill_matches_an_uninterrupted_run(tokenizer_run, shapes_dir, tmp_path, extra):
    steps = ["train_lm.steps=24", "train_lm.save_every=4", *extra]

    def args(run):
        return _cli(
            "train-lm",
            "--tokenizer",
            str(tokenizer_run),
            "--data",
            str(shapes_dir),
            "--out",
            str(run),
            *TINY_OVERRIDES,
            *steps,
        )

    ref = tmp_path / "ref"
    out, ref_s = _timed(args(ref))
    assert out.returncode == 0, out.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(args(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_0000008").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert "step_0000008" in done and "step_0000024" not in done, f"not killed mid-run: {done}"
    assert not (run / "llm").exists()

    out, resume_s = _timed(
        _cli("train-lm", "--tokenizer", str(tokenizer_run), "--data", str(shapes_dir), "--out", str(run), "--resume")
    )
    assert out.returncode == 0, out.stderr
    resumed_from = int(done[-1].split("_")[1])
    print(
        f"\nstage II, 24 steps: uninterrupted run {ref_s:.1f} s; resumed from step {resumed_from} in {resume_s:.1f} s "
        f"(wall seconds of each subprocess)"
    )
    for name in ("llm/model.safetensors", "image_positions.safetensors") + (
        ("depth_head.safetensors",) if extra else ()
    ):
        assert _same_tensors(load_file(ref / name), load_file(run / name)), f"{name} differs from the uninterrupted run"

    # the log reads as one run: every step once, the same losses
    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]

    logged = [r["step"] for r in _metrics(run)]
    assert logged == sorted(set(logged)) == list(range(2, 25, 2))
    assert strip(_metrics(run)) == strip(_metrics(ref))


# ------------------------------------------------------------------------------------ torn / foreign
def _cli_in_process(capsys, *args):
    code = cli_main(list(args))
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_keys(*keys):
    def damage(ckpt):
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k not in keys}))

    return damage


TORN = {  # damage → what the one error line says after "checkpoint PATH is torn or unreadable"
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), None),
    "truncated optimizer state": (lambda c: _truncate(c / "optimizers.safetensors"), None),
    "garbage state.json": (lambda c: (c / "state.json").write_text('{"version": 1, "kind": "tok'), None),
    "state.json not an object": (
        lambda c: (c / "state.json").write_text("[1, 2]"),
        "(state.json is not a JSON object)",
    ),
    "state.json without step": (_drop_keys("step"), "(state.json lacks step)"),
    "state.json without RNG": (_drop_keys("python_rng", "numpy_rng"), "(state.json lacks python_rng, numpy_rng)"),
    "state.json without optimizer": (_drop_keys("optimizers"), "(state.json lacks optimizers)"),
}


@pytest.mark.parametrize("damage", list(TORN))
def test_a_torn_stage1_checkpoint_is_refused_and_the_run_untouched(tokenizer_run, shapes_dir, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(tokenizer_run, run)
    ckpt = run / "checkpoints" / "step_0000010"
    harm, says = TORN[damage]
    harm(ckpt)
    before = (run / "model.safetensors").read_bytes(), (run / "metrics.jsonl").read_bytes()
    code, err = _cli_in_process(capsys, "train-tokenizer", "--data", str(shapes_dir), "--out", str(run), "--resume")
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith(f"error: checkpoint {ckpt} is torn or unreadable (")
    if says:
        assert line == f"error: checkpoint {ckpt} is torn or unreadable {says}"
    assert ((run / "model.safetensors").read_bytes(), (run / "metrics.jsonl").read_bytes()) == before


def test_a_torn_stage2_checkpoint_is_refused_by_the_cli(model_run, tokenizer_run, shapes_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_run, run)
    ckpt = run / "checkpoints" / "step_0000008"
    w = ckpt / "llm.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    before = (run / "llm" / "model.safetensors").read_bytes()
    out = subprocess.run(
        _cli("train-lm", "--tokenizer", str(tokenizer_run), "--data", str(shapes_dir), "--out", str(run), "--resume"),
        check=False,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert _one_error_line(out.stderr).startswith(f"error: checkpoint {ckpt} is torn or unreadable (")
    assert (run / "llm" / "model.safetensors").read_bytes() == before


def test_a_stage1_checkpoint_in_a_stage2_run_is_refused(model_run, tokenizer_run, shapes_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(model_run, run)
    foreign = run / "checkpoints" / "step_0000009"
    shutil.copytree(tokenizer_run / "checkpoints" / "step_0000010", foreign)
    before = (run / "llm" / "model.safetensors").read_bytes()
    code, err = _cli_in_process(
        capsys, "train-lm", "--tokenizer", str(tokenizer_run), "--data", str(shapes_dir), "--out", str(run), "--resume"
    )
    assert code == 2
    assert _one_error_line(err) == f"error: checkpoint {foreign} is not a lm checkpoint of this version"
    assert (run / "llm" / "model.safetensors").read_bytes() == before


def test_a_checkpoint_of_a_wider_autoencoder_is_refused(tokenizer_run, shapes_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tokenizer_run, run)
    wide = build_tokenizer(tiny_config("model.autoencoder.ch=16"))
    foreign = save_checkpoint(
        run, 11, {"model": wide}, {"model": torch.optim.AdamW(wide.parameters())}, {}, keep=0, kind="tokenizer"
    )
    before = (run / "model.safetensors").read_bytes()
    code, err = _cli_in_process(capsys, "train-tokenizer", "--data", str(shapes_dir), "--out", str(run), "--resume")
    assert code == 2
    assert _one_error_line(err) == (
        f"error: checkpoint {foreign} belongs to another model "
        f"(first mismatching key: model.encoder.conv_in.weight (shape (16, 3, 3, 3) != (8, 3, 3, 3)))"
    )
    assert (run / "model.safetensors").read_bytes() == before


# ------------------------------------------------------------------------------------ bf16
def test_stage1_trains_in_bf16_on_cpu(shapes_dir, tmp_path):
    run = tmp_path / "run"
    train_tokenizer(
        tiny_config(
            *NO_EXTRAS, "train_tokenizer.precision=bf16", "train_tokenizer.steps=3", "train_tokenizer.log_every=1"
        ),
        shapes_dir / "train",
        run,
        progress=False,
    )
    logged = [r for r in _metrics(run) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["psnr"]])).all() for r in logged)
    weights = load_file(run / "model.safetensors")
    assert _all_finite(weights)
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {
        torch.float32
    }  # autocast, fp32 master weights


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_autocasts_only_where_bf16_is_native(native, monkeypatch, caplog):
    """``auto`` is bf16 on hardware with bf16 kernels and fp32 elsewhere (emulated bf16 matmuls ran
    12× slower than fp32 on an AVX2 CPU); an explicit ``bf16`` is kept, with one warning there."""
    from unicodebook.train import engine as engine_mod

    monkeypatch.setattr(engine_mod, "native_bf16", lambda device: native)
    eng = engine_mod.Engine()
    with eng.autocast("auto"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == (torch.bfloat16 if native else torch.float32)
    with eng.autocast("fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with caplog.at_level("WARNING", logger="unicodebook.train"):
        for _ in range(3):
            with eng.autocast("bf16"):
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "native bf16" in r.getMessage()]
    assert warned == (
        []
        if native
        else [
            "precision bf16 on a CPU without native bf16 kernels: expect it to be "
            "several times slower than fp32 (precision=auto picks fp32 here)"
        ]
    )


def test_native_bf16_needs_the_cpu_instructions_not_only_onednn(monkeypatch):
    """oneDNN reports bf16 on any AVX-512 CPU; without AVX512-BF16 / AMX it emulates it, and the
    tiny stage II step ran 2.5× slower under bf16 autocast there: ``auto`` must pick fp32."""
    from unicodebook.utils import device as dev

    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "onednn_bf16", lambda d: True)
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx2", "avx512f", "avx512bw", "avx512vl"})
    assert dev.native_bf16(cpu) is False
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert dev.native_bf16(cpu) is True
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert dev.native_bf16(cpu) is True
    monkeypatch.setattr(dev, "cpu_flags", lambda: None)  # flags unreadable: oneDNN's word
    assert dev.native_bf16(cpu) is True
    monkeypatch.setattr(dev, "onednn_bf16", lambda d: False)
    assert dev.native_bf16(cpu) is False


def _val_images(shapes_dir, size):
    return torch.stack([load_image(p, size) for p in list_images(shapes_dir / "val" / "images")])


def test_bf16_encode_gives_the_fp32_codes_and_the_quantizer_sees_fp32(tokenizer_run, shapes_dir, monkeypatch):
    visual_tok = load_tokenizer(tokenizer_run).eval()
    images = _val_images(shapes_dir, visual_tok.image_size)
    fp32 = visual_tok.encode(images)

    seen, latent = [], []
    real_search = visual_tok.codebook.search
    monkeypatch.setattr(
        visual_tok.codebook, "search", lambda z, group=None: (seen.append(z.dtype), real_search(z, group))[1]
    )
    visual_tok.pre_quant.register_forward_hook(lambda m, i, o: latent.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = visual_tok.encode(images)
    assert latent == [torch.bfloat16]  # the conv encoder really ran in bf16 ...
    assert seen and set(seen) == {torch.float32}  # ... and the distance maths did not
    agree = (fp32 == bf16).float()
    per_layer = agree.reshape(-1, agree.shape[-1]).mean(0)
    psnr32, psnr16 = (float(psnr(visual_tok.decode(c), images).mean()) for c in (fp32, bf16))
    print(
        f"\nbf16 vs fp32 codes ({fp32.numel()} codes of {images.shape[0]} images): {agree.mean():.2%} agree; "
        f"per layer {', '.join(f'{v:.2%}' for v in per_layer)}; "
        f"PSNR of the decoded codes {psnr32:.3f} / {psnr16:.3f} dB"
    )
    # measured (10-step tokenizer, 24 val images): 95.6% overall, 98.6% on layer 0, the same PSNR to
    # 0.001 dB. The deeper RQ layers quantize ever smaller residuals of a latent that bf16 rounds
    # to ~3 digits, so a few borderline codes flip there; the first layer and the picture hold.
    assert agree.mean() >= 0.95 and per_layer[0] >= 0.98
    assert abs(psnr32 - psnr16) < 0.05


# ------------------------------------------------------------------------------------ gradient checkpointing
def _count_forward(module):
    """Count the runs of ``module.forward`` (a recomputation in backward included; forward
    hooks do not fire there)."""
    calls, real = [], module.forward

    def forward(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    module.forward = forward
    return calls


def test_stage1_gradient_checkpointing_gives_the_same_loss_and_gradients(tokenizer_run, shapes_dir):
    visual_tok = load_tokenizer(tokenizer_run).train()
    images = _val_images(shapes_dir, visual_tok.image_size)[:8]
    cfg = visual_tok.config.loss
    calls = _count_forward(visual_tok.encoder.mid[0])

    def loss_and_grads(on):
        visual_tok.set_gradient_checkpointing(on)
        visual_tok.zero_grad(set_to_none=True)
        calls.clear()
        out = visual_tok(images)
        loss = reconstruction_loss(out.recon.float(), images, cfg.l1, cfg.l2)[0] + out.commit_loss
        loss.backward()
        visual_tok.quantizer.pop_updates()
        return (
            loss.detach(),
            {n: p.grad.clone() for n, p in visual_tok.named_parameters() if p.grad is not None},
            len(calls),
        )

    loss0, g0, n0 = loss_and_grads(False)
    loss1, g1, n1 = loss_and_grads(True)
    assert (n0, n1) == (1, 2)  # with checkpointing the block really is recomputed in backward
    assert torch.allclose(loss0, loss1, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    worst = max(float((g0[k] - g1[k]).abs().max() / g0[k].abs().max().clamp_min(1e-12)) for k in g0)
    print(f"\nstage I gradient checkpointing: worst relative gradient difference {worst:.2e}")
    assert all(torch.allclose(g0[k], g1[k], rtol=1e-5, atol=1e-7) for k in g0)


def _lm_batch(model: UniCodeLM, shapes_dir):
    images = _val_images(shapes_dir, model.tokenizer.image_size)[:3]
    codes = model.tokenizer.encode(images)
    fmt = model.fmt
    samples = [fmt.decompression(codes[0]), fmt.decompression(codes[1]), fmt.text_to_image("a red circle", codes[2])]
    return collate(samples, fmt.pad_id), model.latents(codes[:2])


def test_stage2_gradient_checkpointing_gives_the_same_gradients(model_run, shapes_dir):
    model = load_model(model_run).train()
    batch, latents = _lm_batch(model, shapes_dir)
    calls = _count_forward(model.llm.model.layers[0].mlp)  # inside the checkpointed layer

    def grads():
        model.zero_grad(set_to_none=True)
        calls.clear()
        out = model(batch, latents)
        out.loss.backward()
        return (
            out.loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            len(calls),
        )

    loss0, g0, n0 = grads()
    enable_checkpointing(model.llm)
    loss1, g1, n1 = grads()
    assert (n0, n1) == (1, 2)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and any(k.startswith("image_positions.") for k in g0)
    assert all(torch.allclose(g0[k], g1[k], rtol=1e-5, atol=1e-7) for k in g0)


def test_stage2_gradient_checkpointing_switch_trains_to_the_same_weights(
    model_run, tokenizer_run, shapes_dir, tmp_path, monkeypatch
):
    from transformers.models.llama.modeling_llama import LlamaMLP

    real, calls = LlamaMLP.forward, []

    def forward(self, x):
        if torch.is_grad_enabled():  # training (a recompute included), not the final samples
            calls.append(1)
        return real(self, x)

    monkeypatch.setattr(LlamaMLP, "forward", forward)
    run = tmp_path / "run"
    train_lm(tiny_config("train_lm.gradient_checkpointing=true"), tokenizer_run, shapes_dir, run, progress=False)
    assert len(calls) == 2 * 8  # 1 layer, 8 steps: each step's forward and its recompute in backward
    for name in ("llm/model.safetensors", "image_positions.safetensors"):
        a, b = load_file(model_run / name), load_file(run / name)
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"\nstage II gradient checkpointing, 8 steps: {name} max |Δ| {worst:.2e}")
        assert worst <= 1e-5


# ------------------------------------------------------------------------------------ optimizer layout
def test_fsdp_optimizer_layout_converts_exactly_to_the_single_process_one():
    """Checkpoints hold optimizer state numbered as ``Optimizer.state_dict()`` numbers it; FSDP
    gathers it keyed by parameter name (torch.distributed.checkpoint). The two conversions must
    be exact inverses and agree with what torch itself produces for the same optimizer."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from unicodebook.train.engine import by_index, by_name

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)  # a frozen parameter is not in the optimizer
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": [p for _, p in trainable[:1]]}, {"params": [p for _, p in trainable[1:]], "lr": 0.1}]
    )
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    names = [n for n, _ in trainable]
    plain, named = opt.state_dict(), get_optimizer_state_dict(model, opt)

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return torch.equal(a, b) if torch.is_tensor(a) else a == b

    assert same(by_index(named), plain)
    assert same(by_name(plain, names), named)
