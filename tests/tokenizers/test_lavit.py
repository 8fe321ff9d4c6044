"""The LaVIT dynamic tokenizer: a merger causal among the kept patches that reads the dropped ones,
a cosine codebook on the sphere, a selector whose kept fraction is pulled to ρ, a variable number
of codes per image that is the same at every call (or sampled, reproducibly), ragged batches that
round-trip through the folder and stage II's code cache, a three-phase stage I from the CLI that
resumes exactly, stage II on it, and the official checkpoint's names."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES
from PIL import Image
from safetensors.torch import load_file

from unicodebook.config import LavitModelConfig, load_config
from unicodebook.errors import ConfigError, UnicodebookError
from unicodebook.tokenizers.base import PAD_CODE, load_tokenizer
from unicodebook.tokenizers.lavit import LavitTokenizer, build_tokenizer
from unicodebook.tokenizers.lavit.merger import TokenMerger
from unicodebook.tokenizers.lavit.quantizer import NormEMAQuantizer

LLM = [o for o in TINY_OVERRIDES if o.startswith(("llm.", "train_lm."))]
LAVIT_TINY = [  # 32 px in 8-px patches: 16 patches, ~5 kept
    "model.image_size=32",
    "model.vit.patch_size=8",
    "model.vit.width=32",
    "model.vit.layers=1",
    "model.vit.heads=2",
    "model.vit.embed_dim=16",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "model.merger.layers=1",
    "model.merger.heads=2",
    "model.detokenizer.layers=1",
    "model.detokenizer.heads=2",
    "model.num_codes=64",
    "model.code_dim=8",
    "model.decoder_ch=8",
    "model.restart_dead=5",
    "train_tokenizer.steps=30",
    "train_tokenizer.batch_size=16",
    "train_tokenizer.warmup_steps=2",
    "train_tokenizer.log_every=5",
    "train_tokenizer.save_every=10",
    "train_tokenizer.keep_last=3",
    "train_tokenizer.grid_every=0",
    "train_tokenizer.phases=[{name: vit, steps: 10}, {name: tokenizer, steps: 10}, {name: decoder, steps: 10}]",
]
RHO = 1 / 3


def lavit_config(*extra: str):
    return load_config("lavit-tiny", LLM + LAVIT_TINY + list(extra))


def _images(shapes_dir, split: str = "test", n: int = 24) -> torch.Tensor:
    from unicodebook.data.images import ImageFolder, resolve_image_folder

    ds = ImageFolder(resolve_image_folder(shapes_dir, split), 32, preload=False)
    return torch.stack([ds[i] for i in range(n)])


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lavit_run(shapes_dir, tmp_path_factory):
    """The preset from the CLI at tiny sizes: every phase, 30 steps."""
    from unicodebook.cli import main

    run = tmp_path_factory.mktemp("lavit") / "run"
    args = [
        "train-tokenizer",
        "--config",
        "lavit-tiny",
        "--data",
        str(shapes_dir),
        "--out",
        str(run),
        *LLM,
        *LAVIT_TINY,
    ]
    assert main(args) == 0
    return run


def test_the_merger_is_causal_among_the_kept_patches_and_reads_the_dropped_ones():
    torch.manual_seed(0)
    merger = TokenMerger(32, 2, 2, 4.0).eval()
    x, keep = torch.randn(2, 9, 32), torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1]] * 2, dtype=torch.float)
    out = merger(x, keep)
    later = x.clone()
    later[:, 6] += torch.randn(32)  # a kept patch: the kept ones before it do not see it
    again = merger(later, keep)
    assert torch.allclose(out[:, [0, 2, 3]], again[:, [0, 2, 3]], atol=1e-5)  # (up to the masked softmax's ε)
    assert not torch.allclose(out[:, [6, 8]], again[:, [6, 8]], atol=1e-3)
    dropped = x.clone()
    dropped[:, 7] += torch.randn(32)  # a dropped patch, after them all: every kept one reads it
    moved = (merger(dropped, keep) - out).abs().amax(-1)[0]
    assert bool((moved[keep[0].bool()] > 1e-3).all())


def test_the_codebook_stays_on_the_sphere_and_follows_its_features():
    torch.manual_seed(0)
    q = NormEMAQuantizer(8, 4, decay=0.5, kmeans_init=True).train()
    z = torch.randn(64, 4)
    zq, codes, loss = q(z, step=0)
    w = q.embedding.weight
    assert torch.allclose(w.norm(dim=-1), torch.ones(8), atol=1e-5) and bool(q.initialised)  # spherical k-means
    cos = torch.nn.functional.normalize(z, dim=-1) @ w.t()
    assert torch.equal(codes, q.lookup(z)) and torch.equal(q.lookup(z), cos.argmax(-1))  # the highest cosine
    before = float(q(z, step=1)[2])
    for step in range(2, 12):
        q(z, step=step)
    assert float(q(z, step=12)[2]) <= before and torch.allclose(
        q.embedding.weight.norm(dim=-1), torch.ones(8), atol=1e-5
    )
    assert not q.embedding.weight.requires_grad and zq.requires_grad is False  # EMA, not gradients


def test_the_kept_fraction_is_pulled_to_rho(lavit_run, shapes_dir, tmp_path):
    """From the fixture's ViT: the sampled keep fraction starts near ½ (an untrained selector) and
    ends near ρ = 1/3."""
    from unicodebook.train.lavit import train_lavit_tokenizer

    cfg = lavit_config(
        f"model.vit_path={lavit_run / 'vit'}",
        "train_tokenizer.steps=81",
        "train_tokenizer.lr=3e-3",
        "train_tokenizer.log_every=1",
        "train_tokenizer.save_every=0",
        "train_tokenizer.phases=[{name: tokenizer, steps: 80}, {name: decoder, steps: 1}]",
    )
    train_lavit_tokenizer(cfg, shapes_dir, tmp_path / "run", progress=False, val_split=None)
    kept = [r["keep_fraction"] for r in _rows(tmp_path / "run") if "keep_fraction" in r]
    first, last = sum(kept[:5]) / 5, sum(kept[-20:]) / 20
    assert abs(first - RHO) > 0.12, kept[:5]  # measured: 0.53 over the first 5 steps
    assert abs(last - RHO) < 0.05, kept[-20:]  # measured: 0.32 over the last 20


def test_the_centred_feature_term_makes_the_reconstruction_tell_an_images_patches_apart(
    lavit_run, shapes_dir, tmp_path
):
    """``loss.feature_detail``: 1 − cos of the reconstruction to the ViT's patch features, both
    less their image's mean patch. Logged whatever its weight; weighted, the de-tokenizer learns
    what differs between an image's patches, which the plain cosine leaves alone."""
    from unicodebook.train.lavit import train_lavit_tokenizer

    ends = {}
    for weight in (0.0, 2.0):
        cfg = lavit_config(
            f"model.vit_path={lavit_run / 'vit'}",
            "train_tokenizer.steps=61",
            "train_tokenizer.lr=3e-3",
            "train_tokenizer.log_every=1",
            "train_tokenizer.save_every=0",
            "train_tokenizer.phases=[{name: tokenizer, steps: 60}, {name: decoder, steps: 1}]",
            f"loss.feature_detail={weight}",
        )
        train_lavit_tokenizer(cfg, shapes_dir, tmp_path / str(weight), progress=False, val_split=None)
        detail = [r["feature_detail"] for r in _rows(tmp_path / str(weight)) if "feature_detail" in r]
        ends[weight] = sum(detail[-10:]) / 10
    assert ends[2.0] < ends[0.0] - 0.2, ends  # measured: 0.50 against 0.97 over the last 10 steps


def test_the_same_image_gives_the_same_codes_and_sampling_varies_but_a_seed_reproduces_it(lavit_run, shapes_dir):
    from unicodebook.tokenizers.seed.build import vit_config
    from unicodebook.tokenizers.vit import VisionTransformer

    visual_tok = load_tokenizer(lavit_run)
    images = _images(shapes_dir)
    codes = visual_tok.encode(images)
    assert torch.equal(visual_tok.encode(images), codes)  # deterministic at inference
    lengths = visual_tok.layout.lengths(codes)
    assert visual_tok.layout.length == 16 and int(lengths.min()) >= 1
    mc = dataclasses.replace(visual_tok.config.model, sample_at_inference=True, sample_seed=3)

    def sampling() -> LavitTokenizer:
        t = LavitTokenizer(mc, VisionTransformer(vit_config(mc)))
        t.load_state_dict(visual_tok.state_dict())
        return t.eval()

    sampled = sampling()
    a, b = sampled.encode(images), sampled.encode(images)
    assert not torch.equal(visual_tok.layout.lengths(a), visual_tok.layout.lengths(b))  # the count varies call to call
    assert torch.equal(sampling().encode(images), a)  # the same seed from the start: the same draws
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(sampled.encode(images, generator=g()), sampled.encode(images, generator=g()))


def _confident(run, folder) -> LavitTokenizer:
    """The run's tokenizer with a confident selector, saved in ``folder``: a 30-step selector keeps
    as many patches of every image (each p near ½, from weights of std 0.02); with random weights
    of std 1/√fan-in (the last layer's ×20) its decisions, and so the counts, depend on the image."""
    visual_tok = load_tokenizer(run)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in visual_tok.token_predictor.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
        visual_tok.token_predictor.out_conv[4].weight.mul_(20)
    visual_tok.save_frozen(folder)
    return visual_tok


def test_a_ragged_batch_round_trips_through_the_folder_and_the_code_cache(lavit_run, shapes_dir, tmp_path):
    from unicodebook.data.images import split_folder
    from unicodebook.data.multimodal import cached_codes, read_records

    visual_tok = _confident(lavit_run, tmp_path / "copy")
    assert isinstance(visual_tok, LavitTokenizer) and not visual_tok.layout.fixed and visual_tok.reads == "codes"
    images = _images(shapes_dir)
    codes = visual_tok.encode(images)
    lengths = visual_tok.layout.lengths(codes)
    assert len(set(lengths.tolist())) >= 3, lengths  # ragged
    for row, n in zip(codes, lengths):  # codes first, then padding only
        assert bool((row[:n] >= 0).all() and (row[:n] < 64).all()) and bool((row[n:] == PAD_CODE).all())
    out = visual_tok.decode(codes)
    assert out.shape == (24, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1
    again = load_tokenizer(tmp_path / "copy")
    assert torch.equal(again.encode(images), codes) and torch.equal(again.decode(codes), out)

    folder = split_folder(shapes_dir, "train")
    paths = sorted({c.image for c in read_records(folder).captions})[:24]
    from unicodebook.data.images import load_image

    want = visual_tok.layout.lengths(visual_tok.encode(torch.stack([load_image(folder / p, 32) for p in paths])))
    cache = cached_codes(visual_tok, folder, paths, fallback=tmp_path, progress=False)
    back = cached_codes(again, folder, paths, fallback=tmp_path, progress=False)  # read back from disk
    assert torch.equal(cache.codes, back.codes) and torch.equal(cache.lengths, want)
    assert len(set(cache.lengths.tolist())) >= 2

    # the same weights set to sample: its own cache, never the deterministic codes read back
    again.sample_at_inference = True
    sampled = cached_codes(again, folder, paths, fallback=tmp_path, progress=False)
    assert not torch.equal(sampled.codes, cache.codes)
    again.inference_rule = "threshold" if visual_tok.inference_rule == "expected" else "expected"
    again.sample_at_inference = False
    other_rule = cached_codes(again, folder, paths, fallback=tmp_path, progress=False)
    fresh = again.encode(torch.stack([load_image(folder / p, 32) for p in paths]))
    assert torch.equal(other_rule.codes.long(), fresh)


def test_every_phase_trains_only_its_own_modules_and_the_cli_reads_the_folder(lavit_run, shapes_dir, tmp_path, capsys):
    from unicodebook.cli import main
    from unicodebook.tokenizers.vit import load_local_vit

    rows = _rows(lavit_run)
    assert {r["phase"] for r in rows if "phase" in r} == {"vit", "tokenizer", "decoder"}
    assert all(any(f"loss_{n}" in r for r in rows) for n in ("vit", "tokenizer", "decoder"))
    assert any(r.get("restarted_codes", 0) > 0 for r in rows)  # dead codes restarted (every 5 steps)
    mid = load_file(lavit_run / "checkpoints" / "step_0000020" / "model.safetensors")  # the end of phase tokenizer
    end = load_file(lavit_run / "model.safetensors")
    pixel = [k for k in end if k.startswith("pixel_decoder.")]
    assert not all(torch.equal(mid[k], end[k]) for k in pixel)  # the decoder phase trained it ...
    assert all(torch.equal(mid[k], end[k]) for k in end if k not in pixel)  # ... and only it
    first = load_file(lavit_run / "checkpoints" / "step_0000010" / "model.safetensors")  # the end of phase vit
    assert all(torch.equal(first[k], end[k]) for k in end if k.startswith("encoder."))
    assert not all(torch.equal(first[k], end[k]) for k in end if k.startswith("causal_encoder."))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(load_local_vit(lavit_run / "vit").embedding(x), load_tokenizer(lavit_run).encoder.embedding(x))

    capsys.readouterr()
    image = sorted((shapes_dir / "test" / "images").iterdir())[0]
    assert main(["tokenize", "--tokenizer", str(lavit_run), str(image)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from unicodebook.data.images import load_image

    want = load_tokenizer(lavit_run).encode(load_image(image, 32)[None])[0]
    assert line["codes"] == want[want != PAD_CODE].tolist() and line["shape"] == [int((want != PAD_CODE).sum())]
    assert main(["reconstruct", "--tokenizer", str(lavit_run), str(image), "--out", str(tmp_path / "r.png")]) == 0
    assert json.loads(capsys.readouterr().out)["psnr"] > 5 and (tmp_path / "r.png").is_file()


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(lavit_run, shapes_dir, tmp_path):
    from unicodebook.train.lavit import train_lavit_tokenizer

    copy = tmp_path / "run"
    shutil.copytree(lavit_run, copy)
    for step in ("step_0000030", "step_0000020"):  # back to the end of phase vit
        shutil.rmtree(copy / "checkpoints" / step, ignore_errors=True)
    train_lavit_tokenizer(lavit_config(), shapes_dir, copy, resume=True, progress=False)
    a, b = load_file(lavit_run / "model.safetensors"), load_file(copy / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_lavit_configs_and_folders_are_one_line_errors(lavit_run, shapes_dir, tmp_path, capsys):
    from unicodebook.cli import main
    from unicodebook.train.lavit import train_lavit_tokenizer

    for ratio in ("0", "1.5", "-0.2"):
        with pytest.raises(ConfigError, match=rf"^model: keep_ratio {float(ratio)} is not in \(0, 1\]$"):
            lavit_config(f"model.keep_ratio={ratio}")
    assert lavit_config("model.keep_ratio=1").model.keep_ratio == 1.0
    with pytest.raises(ConfigError, match=r"model.keep_ratio_over: 'pixel' is not one of image, batch"):
        lavit_config("model.keep_ratio_over=pixel")
    for other, key in (
        ("model.qformer.queries=8", "model.qformer"),
        ("model.recon_blocks=1", "model.recon_blocks"),
        ("model.autoencoder.ch=8", "model.autoencoder"),
        ("model.codebook.mode=frozen", "model.codebook"),
    ):
        with pytest.raises(ConfigError, match=rf"^unknown config key '{key}' \(known: "):  # SEED's, UniCode's
            lavit_config(other)
    with pytest.raises(ConfigError, match=r"model.family: 'nope' is not one of unicode, seed, lavit"):
        load_config("tiny", ["model.family=nope"])
    with pytest.raises(ConfigError, match=r"^model: min_tokens 17 is not in \[1, 16\] \(the image's patches\)$"):
        lavit_config("model.min_tokens=17")
    bad = lavit_config(
        "train_tokenizer.steps=20", "train_tokenizer.phases=[{name: vit, steps: 10}, {name: vq, steps: 10}]"
    )
    with pytest.raises(
        UnicodebookError,
        match=r"^a LaVIT run declares train_tokenizer.phases named vit, tokenizer, "
        r"decoder in that order .*got vit, vq$",
    ):
        train_lavit_tokenizer(bad, shapes_dir, tmp_path / "r", progress=False)

    torn = tmp_path / "torn"
    shutil.copytree(lavit_run, torn, ignore=shutil.ignore_patterns("checkpoints", "vit"))
    (torn / "model.safetensors").unlink()
    with pytest.raises(UnicodebookError, match=r"not a LaVIT tokenizer folder \(missing model.safetensors\)$"):
        load_tokenizer(torn)
    image = next((shapes_dir / "test" / "images").iterdir())
    capsys.readouterr()
    assert main(["tokenize", "--tokenizer", str(torn), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {torn}: not a LaVIT tokenizer folder (missing model.safetensors)"


def test_stage2_writes_images_of_variable_length_that_end_at_img_end(lavit_run, shapes_dir, tmp_path, capsys):
    """All code logits and </img>'s made equal (the final norm zeroed): lengths spread between the
    minimum and the maximum, each image its codes then padding, and they decode."""
    from unicodebook.lm.model import load_model
    from unicodebook.train.stage2 import train_lm

    train_lm(lavit_config(), lavit_run, shapes_dir, tmp_path / "lm", progress=False)
    meta = json.loads((tmp_path / "lm" / "model.json").read_text())
    assert meta["family"] == "lavit" and meta["reads"] == "codes" and meta["min_codes_per_image"] == 1
    model = load_model(tmp_path / "lm")
    assert model.reads_codes and model.tokenizer.family == "lavit"
    assert model.text_tok.convert_ids_to_tokens(model.code_token_ids[:2].tolist()) == ["<img_00000>", "<img_00001>"]
    with torch.no_grad():
        model.llm.model.norm.weight.zero_()
    codes = model.generate_codes(
        ["draw a small red circle"] * 48, cfg_scale=1.0, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    lengths = model.tokenizer.layout.lengths(codes)
    assert codes.shape == (48, 16) and int(lengths.min()) >= 1 and int(lengths.max()) == 16
    assert int((lengths < 16).sum()) >= 3  # </img> ends some before the maximum (1 in 65 a step)
    for row, n in zip(codes, lengths):
        assert bool((row[:n] >= 0).all() and (row[:n] < 64).all()) and bool((row[n:] == PAD_CODE).all())
    assert model.tokenizer.decode(codes).shape == (48, 3, 32, 32)
    # the evaluation counts how the drawn images ended: sampled, some at </img> inside the range
    from unicodebook.eval.model import evaluate_model

    r = evaluate_model(
        model,
        shapes_dir,
        max_t2i=24,
        max_vqa=4,
        max_describe=2,
        max_decompress=2,
        cfg_scale=1.0,
        temperature=1.0,
        progress=False,
    )
    assert 0 < r["t2i_ended_in_range"] < 1 and 1 <= r["t2i_codes_mean"] < 16

    # greedy with every logit equal picks the first code at each step, never </img>: the image is
    # cut at the maximum, still decoded and saved, and the command's reply says so
    from safetensors.torch import save_file

    from unicodebook.cli import main

    weights = tmp_path / "lm" / "llm" / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"].zero_()
    save_file(state, weights, metadata={"format": "pt"})
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "lm"),
                "draw a small red circle",
                "--out",
                str(tmp_path / "g.png"),
                "--temperature",
                "0",
                "--cfg",
                "1",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    reply = json.loads(out)
    assert reply["codes"] == [16] and reply["ended_at_max"] == [True]
    assert err.strip() == f"warning: {tmp_path / 'g.png'}: no </img> within 16 codes; decoded the 16 written"
    assert Image.open(tmp_path / "g.png").size == (32, 32)


OFFICIAL = [
    "model.image_size=224",
    "model.vit.patch_size=14",
    "model.vit.width=1408",
    "model.vit.layers=40",
    "model.vit.heads=16",
    f"model.vit.mlp_ratio={6144 / 1408}",
    "model.vit.embed_dim=0",
    "model.merger.layers=12",
    "model.merger.heads=16",
    "model.merger.mlp_ratio=4.3637",
    "model.detokenizer.layers=12",
    "model.detokenizer.heads=16",
    "model.detokenizer.mlp_ratio=4.3637",
    "model.num_codes=16384",
    "model.code_dim=32",
    "model.token_pos_embed=0",
]  # the official merger has no position table (the preset's is ours)


def _official_state() -> tuple[dict, dict, dict]:
    """The official LaVIT tokenizer's three files, keys and shapes (``tokenizer_encoder.bin``:
    selector, 12-block merger at width 1408, 16384 × 32 codebook, the 4096-d ``vit_proj``;
    ``tokenizer_decoder.bin``: the 12-block ``VQDecoder`` with its ``unet_proj``;
    ``eva_vitg_psz14.bin``: EVA-CLIP-g, 40 blocks, its 1024-d head), written out from the official
    modules' definitions, on the meta device."""
    m = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    w = 1408
    lin = lambda name, o, i: {f"{name}.weight": m(o, i), f"{name}.bias": m(o)}  # noqa: E731
    ln = lambda name: {f"{name}.weight": m(w), f"{name}.bias": m(w)}  # noqa: E731
    enc = {
        **ln("token_predictor.in_conv.0"),
        **lin("token_predictor.in_conv.1", w, w),
        **lin("token_predictor.out_conv.0", 704, w),
        **lin("token_predictor.out_conv.2", 352, 704),
        **lin("token_predictor.out_conv.4", 2, 352),
        **ln("causal_encoder.ln_vision"),
        **ln("causal_encoder.norm"),
        **lin("encode_task_layer.0", w, w),
        **lin("encode_task_layer.2", 32, w),
        "quantize.embedding.weight": m(16384, 32),
        **lin("vit_proj", 4096, w),
    }
    for i in range(12):
        b = f"causal_encoder.blocks.{i}."
        enc |= {
            **ln(b + "norm0"),
            **ln(b + "norm1"),
            **ln(b + "norm2"),
            **lin(b + "token_causal_attn.qkv", 3 * w, w),
            **lin(b + "token_causal_attn.proj", w, w),
            **lin(b + "mlp.fc1", 6144, w),
            **lin(b + "mlp.fc2", w, 6144),
        }
        enc |= {
            k: v for p in ("query", "key", "value", "proj") for k, v in lin(b + f"token_cross_attn.{p}", w, w).items()
        }
    dec = {
        **lin("in_proj", w, 32),
        "pos_embed": m(1, 256, w),
        "query_embed": m(1, 256, w),
        **ln("norm"),
        **lin("decode_task_layer.0", w, w),
        **lin("decode_task_layer.2", w, w),
        **lin("unet_proj", 768, w),
    }
    for i in range(12):
        b = f"blocks.{i}."
        dec |= {
            **ln(b + "norm0"),
            **ln(b + "norm1"),
            **ln(b + "norm2"),
            **lin(b + "self_attn.qkv", 3 * w, w),
            **lin(b + "self_attn.proj", w, w),
            **lin(b + "mlp.fc1", 6144, w),
            **lin(b + "mlp.fc2", w, 6144),
        }
        dec |= {k: v for p in ("query", "key", "value", "proj") for k, v in lin(b + f"cross_attn.{p}", w, w).items()}
    vit = {
        "cls_token": m(1, 1, w),
        "pos_embed": m(1, 257, w),
        "patch_embed.proj.weight": m(w, 3, 14, 14),
        "patch_embed.proj.bias": m(w),
        **ln("norm"),
        **lin("head", 1024, w),
    }
    for i in range(40):
        b = f"blocks.{i}."
        vit |= {
            **ln(b + "norm1"),
            **ln(b + "norm2"),
            b + "attn.qkv.weight": m(3 * w, w),
            b + "attn.q_bias": m(w),
            b + "attn.v_bias": m(w),
            **lin(b + "attn.proj", w, w),
            **lin(b + "mlp.fc1", 6144, w),
            **lin(b + "mlp.fc2", w, 6144),
        }
    return enc, dec, vit


def test_an_official_checkpoint_maps_onto_ours_by_name_on_the_meta_device():
    from unicodebook.tokenizers.lavit.official import load_mapped, understanding_projector

    with torch.device("meta"):
        visual_tok = build_tokenizer(load_config("lavit-tiny", OFFICIAL))
    enc, dec, vit = _official_state()
    report = load_mapped(visual_tok, enc, dec, vit)
    assert report["left_out"] == [
        "encoder.head.bias",
        "encoder.head.weight",
        "tokenizer_decoder.unet_proj.bias",
        "tokenizer_decoder.unet_proj.weight",
        "vit_proj.bias",
        "vit_proj.weight",
    ]
    assert {k.split(".")[0] for k in report["missing"]} == {"pixel_decoder", "quantize"}
    assert [k for k in report["missing"] if k.startswith("quantize.")] == ["quantize.initialised", "quantize.last_used"]
    assert report["loaded"] == len(enc) + len(dec) + len(vit) - 6 - 40  # q_bias and v_bias: one qkv.bias per block
    # vit_proj is the stage II model's: a features reader at LLaMA-7B's width takes it as it is
    with torch.device("meta"):
        proj = torch.nn.Linear(visual_tok.feature_dim, 4096)
    proj.load_state_dict(understanding_projector(enc), assign=True)
    assert proj.weight.shape == (4096, 1408)
    with pytest.raises(UnicodebookError, match="^the checkpoint has no vit_proj.weight and vit_proj.bias"):
        understanding_projector({k: v for k, v in enc.items() if not k.startswith("vit_proj.")})
    enc["quantize.embedding.weight"] = torch.empty(8192, 32, device="meta")
    with pytest.raises(
        UnicodebookError,
        match=r"quantize.embedding.weight has shape \(8192, 32\), this tokenizer's "
        r"\(16384, 32\)",
    ):
        load_mapped(visual_tok, enc, dec, vit)


def test_the_diffusion_pixel_decoder_decodes_the_same_pixels_after_a_folder_round_trip(tmp_path):
    pytest.importorskip("diffusers")
    from unicodebook.tokenizers.lavit import save_tokenizer

    cfg = lavit_config(
        "model.image_size=36",
        "model.vit.patch_size=6",
        "model.pixel_decoder=diffusion",
        "model.diffusion.channels=[8,16]",
        "model.diffusion.steps=2",
    )
    visual_tok = build_tokenizer(cfg).eval()
    codes = torch.randint(0, 64, (3, 36), generator=torch.Generator().manual_seed(0))
    codes[0, 5:], codes[1, 12:] = PAD_CODE, PAD_CODE  # ragged
    out = visual_tok.decode(codes)
    assert out.shape == (3, 3, 36, 36) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(visual_tok.decode(codes), out)
    save_tokenizer(visual_tok, tmp_path / "tok")
    assert torch.equal(load_tokenizer(tmp_path / "tok").decode(codes), out)
    with pytest.raises(ValueError, match="PAD_CODE only after its last one"):
        visual_tok.decode(torch.cat([codes[:, :1], torch.full((3, 1), PAD_CODE), codes[:, 2:]], 1))


def test_the_spatial_pixel_decoder_draws_each_feature_where_its_patch_is_and_round_trips_the_folder(tmp_path):
    from unicodebook.tokenizers.lavit import save_tokenizer
    from unicodebook.tokenizers.lavit.model import SpatialPixelDecoder

    # 36 px in 6-px patches: the 6×6 features resized to the conv decoder's 9×9 latent, then ×4
    cfg = lavit_config(
        "model.image_size=36", "model.vit.patch_size=6", "model.pixel_reader=spatial", "model.token_pos_embed=1.0"
    )
    visual_tok = build_tokenizer(cfg).eval()
    assert isinstance(visual_tok.pixel_decoder, SpatialPixelDecoder) and visual_tok.token_pos_embed.shape == (1, 36, 32)
    feats = torch.randn(2, 36, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = visual_tok.pixel_decoder(feats)
        moved = feats.clone()
        moved[:, 0] += 3.0  # the top-left patch's feature only
        diff = (visual_tok.pixel_decoder(moved) - out).abs().mean((0, 1))  # (36, 36)
    assert out.shape == (2, 3, 36, 36) and not torch.allclose(out[0], out[1])  # depends on its input
    # ... most where the patch is (the group norms carry a little everywhere): 8× at this seed
    assert float(diff[:12, :12].mean()) > 4 * float(diff[24:, 24:].mean())

    images = torch.rand(3, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    codes = visual_tok.encode(images)
    pixels = visual_tok.decode(codes)
    save_tokenizer(visual_tok, tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert torch.equal(back.encode(images), codes) and torch.equal(back.decode(codes), pixels)


def test_the_position_table_gives_an_images_tokens_their_patches_positions():
    cfg = lavit_config("model.token_pos_embed=1.0")
    visual_tok = build_tokenizer(cfg).eval()
    features = torch.zeros(1, 16, 32)  # every patch the same: without positions every merged token is too
    keep = torch.zeros(1, 16)
    keep[0, [0, 5, 10]] = 1.0
    with torch.no_grad():
        visual_tok.token_pos_embed.normal_()
        tokens, mask = visual_tok.merge(features, keep)
        visual_tok.token_pos_embed.zero_()
        same, _ = visual_tok.merge(features, keep)
    assert mask.all() and tokens.shape == (1, 3, 32)
    assert torch.allclose(same[0, 0], same[0, 1], atol=1e-5)  # the collapse: identical tokens
    assert not torch.allclose(tokens[0, 0], tokens[0, 1], atol=1e-3)
    # folders written before these options load as they were: SEED's reader, no table
    assert LavitModelConfig().pixel_reader == "queries" and LavitModelConfig().token_pos_embed == 0


def test_a_folder_written_before_the_new_options_loads_with_the_query_reader_and_no_table(tmp_path):
    from unicodebook.tokenizers.lavit import save_tokenizer
    from unicodebook.tokenizers.seed.model import PixelDecoder

    cfg = lavit_config("model.pixel_reader=queries", "model.token_pos_embed=0")
    visual_tok = build_tokenizer(cfg).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    codes = visual_tok.encode(images)
    save_tokenizer(visual_tok, tmp_path / "tok")
    config = tmp_path / "tok" / "config.yaml"
    lines = config.read_text().splitlines(keepends=True)
    old = [line for line in lines if not line.strip().startswith(("pixel_reader:", "token_pos_embed:"))]
    assert len(old) == len(lines) - 2
    config.write_text("".join(old))  # as the folders written before these options
    back = load_tokenizer(tmp_path / "tok")
    assert isinstance(back.pixel_decoder, PixelDecoder) and back.token_pos_embed is None
    assert torch.equal(back.encode(images), codes) and torch.equal(back.decode(codes), visual_tok.decode(codes))


def test_stage2_can_read_the_continuous_merger_features_in_the_codes_places(
    lavit_run, shapes_dir, tmp_path, capsys, monkeypatch
):
    """``understanding_input: features`` (the official way): the merged tokens of exactly the kept
    patches the codes stand for, cached beside them, sit through ``vit_proj`` at the image's code
    slots (the text around them untouched); the projector is trained, saved and read back; chat,
    the batched and streamed answers, the CLI's chat loop, the server, the lmms-eval plugin and the
    evaluation all read them; asking without them is one clear error."""
    from unicodebook.data.images import load_image, split_folder
    from unicodebook.data.multimodal import cached_codes, read_records
    from unicodebook.eval.model import evaluate_model
    from unicodebook.lm.model import load_model
    from unicodebook.train.stage2 import train_lm

    visual_tok = load_tokenizer(lavit_run)
    images = _images(shapes_dir, n=8)
    codes, features = visual_tok.encode_features(images)
    assert torch.equal(codes, visual_tok.encode(images)) and features.shape == (8, 16, visual_tok.feature_dim)
    n = visual_tok.layout.lengths(codes)
    for f, k in zip(features, n):  # a feature for each code, zeros after the image's end
        assert bool((f[:k].abs().sum(-1) > 0).all()) and bool((f[k:] == 0).all())

    folder = split_folder(shapes_dir, "train")
    paths = sorted({c.image for c in read_records(folder).captions})[:8]
    cache = cached_codes(visual_tok, folder, paths, fallback=tmp_path, progress=False, features=True)
    plain = cached_codes(visual_tok, folder, paths, fallback=tmp_path, progress=False)
    want = visual_tok.encode_features(torch.stack([load_image(folder / p, 32) for p in paths]))[1]
    assert torch.equal(cache.codes, plain.codes) and plain.features is None
    torch.testing.assert_close(cache.features.float(), want, atol=2e-3, rtol=1e-3)  # float16 on disk

    cfg = lavit_config("train_lm.tasks.t2i=1", "train_lm.steps=12")  # the preset reads the features
    train_lm(cfg, lavit_run, shapes_dir, tmp_path / "lm", progress=False)
    rows = _rows(tmp_path / "lm")
    first = next(r["loss_instruct"] for r in rows if "loss_instruct" in r)
    assert rows[-1]["loss_instruct"] < first  # reading the features, the answers' loss falls
    assert json.loads((tmp_path / "lm" / "model.json").read_text())["understanding_input"] == "features"
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "serve"))
    from _serving import chat_body, data_url, talking_copy

    talk = talking_copy(tmp_path / "lm", tmp_path / "talk")  # answers of several tokens, not ''
    model = load_model(talk)
    assert model.reads_features and model.reads_codes
    saved = load_file(talk / "vit_proj.safetensors")
    assert torch.equal(model.vit_proj.weight, saved["weight"]) and float(saved["weight"].std()) > 0

    codes, features = model.encode(images)
    ids, at = model.fmt.prompt("what colour is the object at the top?", codes=codes[0])
    k = int(n[0])
    assert ids[at - 1] == model.fmt.start_id and ids[at + k] == model.fmt.end_id
    x = torch.tensor([ids])
    with torch.no_grad():
        emb = model.embed_inputs(x, torch.tensor([at]), features[:1], image_len=torch.tensor([k]))
        tokens = model.llm.get_input_embeddings()(x)
        slots = model.vit_proj(features[0, :k]) + model.image_positions.codes(torch.arange(k))
    torch.testing.assert_close(emb[0, at : at + k], slots)
    assert torch.equal(emb[0, :at], tokens[0, :at]) and torch.equal(emb[0, at + k :], tokens[0, at + k :])

    question = "what colour is the object at the top?"
    batched = model.answer(codes[:3], [question] * 3, max_new_tokens=4, features=features[:3])
    assert [model.chat(images[i], question, max_new_tokens=4) for i in range(3)] == batched
    assert all(batched)  # the comparisons are not '' == ''
    assert "".join(model.stream_answer(codes[0], question, 4, features=features[0])) == batched[0]

    # every entry point that encodes an image reads its features too: the same answers
    from fastapi.testclient import TestClient

    from unicodebook.cli import main
    from unicodebook.eval.lmms_plugin import Request, answer_requests
    from unicodebook.serve import create_app

    paths = [shapes_dir / "test" / "images" / f"{i:06d}.png" for i in range(2)]
    n_new = model.config.generate.max_new_tokens
    want = [model.chat(load_image(p, 32), question, max_new_tokens=n_new) for p in paths]
    assert all(want)
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{question}\n/image {paths[1]}\n{question}\n"))
    assert main(["chat", "--model", str(talk), "--image", str(paths[0])]) == 0
    assert capsys.readouterr().out.splitlines() == want
    with TestClient(create_app(model, "model")) as client:
        res = client.post("/v1/chat/completions", json=chat_body(data_url(paths[1]), question, max_tokens=n_new))
    assert res.json()["choices"][0]["message"]["content"] == want[1]
    requests = [Request(question, [Image.open(p).convert("RGB")], {"max_new_tokens": n_new}) for p in paths]
    assert answer_requests(model, requests, batch_size=2) == want

    with pytest.raises(UnicodebookError) as e:
        model.answer(codes[:1], [question], max_new_tokens=4)
    assert str(e.value) == (
        "this model reads the tokenizer's continuous features (understanding_input: features): "
        "pass them beside the codes (model.encode(images) gives both)"
    )
    r = evaluate_model(model, shapes_dir, max_t2i=2, max_vqa=8, max_describe=2, progress=False)
    assert r["vqa_n"] == 8 and 0 <= r["vqa_accuracy"] <= 1
