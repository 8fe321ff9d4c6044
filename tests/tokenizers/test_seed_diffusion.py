"""SEED's optional diffusion pixel decoder (``model.pixel_decoder=diffusion``, diffusers): it learns
(its denoising loss falls), samples deterministically in [0, 1], takes a user's local UNet or says in
one line why not, round-trips through a tokenizer folder, and a toy SEED run trains it from the CLI."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from test_seed import LLM, SEED_TINY  # noqa: E402

from unicodebook.cli import main  # noqa: E402
from unicodebook.config import DiffusionConfig, load_config  # noqa: E402
from unicodebook.errors import ConfigError, UnicodebookError  # noqa: E402
from unicodebook.tokenizers.base import load_tokenizer  # noqa: E402
from unicodebook.tokenizers.seed import build_tokenizer, save_tokenizer  # noqa: E402
from unicodebook.tokenizers.seed.diffusion import DiffusionDecoder, local_unet, new_unet  # noqa: E402

DIFFUSION = [
    "model.image_size=36",
    "model.vit.patch_size=6",
    "model.pixel_decoder=diffusion",
    "model.diffusion.channels=[8,16]",
    "model.diffusion.steps=2",
]


def diffusion_config(*extra: str):
    return load_config("seed-tiny", LLM + SEED_TINY + DIFFUSION + list(extra))


def tiny_decoder(cond_dim: int = 16, cond_dropout: float = 0.1) -> DiffusionDecoder:
    torch.manual_seed(0)
    return DiffusionDecoder(new_unet(DiffusionConfig(channels=[8, 16]), 36), cond_dim, 4, 1000, cond_dropout)


def blobs(n: int) -> torch.Tensor:
    """n fixed 36-px images: a coloured square on a grey ground, each at its own place."""
    x = torch.full((n, 3, 36, 36), 0.5)
    for i in range(n):
        x[i, :, 4 + 6 * i : 16 + 6 * i, 6 + 5 * i : 18 + 5 * i] = torch.tensor([1.0, 0.2 * i, 0.0])[:, None, None]
    return x


def test_the_diffusion_loss_falls_when_a_tiny_decoder_trains_on_fixed_images():
    dec = tiny_decoder()
    images, cond = blobs(4), torch.randn(4, 16, generator=torch.Generator().manual_seed(1))

    def held() -> float:  # the loss at 16 fixed (image, timestep, noise) draws
        with torch.no_grad():
            return float(dec.loss(images.repeat(4, 1, 1, 1), cond.repeat(4, 1), torch.Generator().manual_seed(7)))

    before = held()
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    for step in range(20):
        loss = dec.loss(images, cond, torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held()
    assert after < 0.6 * before, (before, after)  # measured: 1.10 → 0.46


def test_the_diffusion_options_are_config_keys_checked_in_one_line():
    cfg = diffusion_config()
    assert cfg.model.pixel_decoder == "diffusion" and cfg.model.diffusion.channels == [8, 16]
    assert load_config("seed-tiny", LLM + SEED_TINY).model.pixel_decoder == "conv"  # the default
    for extra, want in (
        ("model.diffusion.nope=1", r"^unknown config key 'model.diffusion.nope' \(known: channels, "),
        ("model.pixel_decoder=unclip", r"^model.pixel_decoder: 'unclip' is not one of conv, diffusion$"),
        (
            "model.diffusion.channels=[8,16,32,64]",
            r"^model: diffusion.channels: 4 blocks halve the image 3 times, which image_size 36 does not "
            r"allow$",
        ),
    ):
        with pytest.raises(ConfigError, match=want):
            load_config("seed-tiny", LLM + SEED_TINY + DIFFUSION + [extra])


def test_sampling_is_deterministic_given_a_generator_and_lands_in_the_decoders_range():
    dec = tiny_decoder().eval()
    cond = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))

    def draw(seed: int, guidance: float = 1.0) -> torch.Tensor:
        return dec.sample(cond, 3, guidance, torch.Generator().manual_seed(seed))

    a = draw(0)
    assert a.shape == (2, 3, 36, 36) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, draw(0)) and not torch.equal(a, draw(1))
    guided = draw(0, guidance=3.0)  # classifier-free guidance: deterministic too, and it changes the picture
    assert torch.equal(guided, draw(0, guidance=3.0)) and not torch.equal(guided, a)


def test_a_local_unet_loads_and_one_of_the_wrong_size_is_one_error_line(tmp_path):
    from diffusers import UNet2DConditionModel

    mine = new_unet(DiffusionConfig(channels=[8, 16]), 36)
    mine.save_pretrained(tmp_path / "ok")
    loaded = local_unet(tmp_path / "ok", 36)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in mine.state_dict().items())
    visual_tok = build_tokenizer(diffusion_config(f"model.diffusion.unet_path={tmp_path / 'ok'}"))
    assert all(torch.equal(v, visual_tok.pixel_decoder.unet.state_dict()[k]) for k, v in mine.state_dict().items())

    UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=1,
    ).save_pretrained(tmp_path / "big")
    want = (
        f"model.diffusion.unet_path: {tmp_path / 'big'} is a UNet for 64 px images with 4 channels; "
        f"the model draws 36 px RGB"
    )
    with pytest.raises(UnicodebookError) as e:
        local_unet(tmp_path / "big", 36)
    assert str(e.value) == want


def test_without_diffusers_the_decoder_asks_for_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed: its import fails
    with pytest.raises(
        UnicodebookError,
        match=r"^model.pixel_decoder diffusion needs diffusers: "
        r"pip install 'unicodebook\[diffusion\]'$",
    ):
        build_tokenizer(diffusion_config())


def test_a_diffusion_seed_tokenizer_decodes_the_same_pixels_after_its_folder_round_trip(tmp_path):
    visual_tok = build_tokenizer(diffusion_config()).eval()
    codes = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    out = visual_tok.decode(codes)
    assert out.shape == (3, 3, 36, 36) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(visual_tok.decode(codes), out)  # decode samples from a fixed seed ...
    assert (
        visual_tok.decode(codes[1:2]) - out[1:2]
    ).abs().max() < 1e-2  # ... each image's: alone as in a batch (batched float sums drift; other noise differs by ~1)
    save_tokenizer(visual_tok, tmp_path / "tok")
    assert (tmp_path / "tok" / "pixel_unet" / "config.json").is_file()
    assert [p.name for p in (tmp_path / "tok").rglob("*.safetensors")] == ["model.safetensors"]  # the UNet's inside
    assert any(k.startswith("pixel_decoder.unet.") for k in load_file(tmp_path / "tok" / "model.safetensors"))
    assert torch.equal(load_tokenizer(tmp_path / "tok").decode(codes), out)


def test_a_toy_seed_run_trains_its_diffusion_decoder_from_the_cli_and_reconstructs(shapes_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "train-tokenizer",
        "--config",
        "seed-tiny",
        "--data",
        str(shapes_dir),
        *LLM,
        *SEED_TINY,
        *DIFFUSION,
        "train_tokenizer.steps=12",
        "train_tokenizer.batch_size=8",
        "train_tokenizer.save_every=6",
        "train_tokenizer.log_every=2",
        "train_tokenizer.phases=[{name: vit, steps: 2}, {name: qformer, steps: 2}, "
        "{name: vq, steps: 2}, {name: decoder, steps: 6}]",
    ]
    assert main([*args, "--out", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["diffusion"] for r in rows if r.get("phase") == "decoder"]
    assert len(logged) == 3 and all(math.isfinite(v) and v > 0 for v in logged)
    mid = load_file(run / "checkpoints" / "step_0000006" / "model.safetensors")  # the end of phase vq
    end = load_file(run / "model.safetensors")
    unet = [k for k in end if k.startswith("pixel_decoder.")]
    assert not all(torch.equal(mid[k], end[k]) for k in unet)  # the decoder phase trained it ...
    assert all(torch.equal(mid[k], end[k]) for k in end if not k.startswith("pixel_decoder."))  # ... and only it
    again = tmp_path / "again"  # resumed from the end of phase vq, it ends with the same weights
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoints" / "step_0000012")
    assert main([*args, "--out", str(again), "--resume"]) == 0
    resumed = load_file(again / "model.safetensors")
    assert resumed.keys() == end.keys() and all(torch.equal(resumed[k], end[k]) for k in end)
    capsys.readouterr()

    image = sorted((shapes_dir / "test" / "images").iterdir())[0]
    outs = []
    for name in ("a.png", "b.png"):
        assert main(["reconstruct", "--tokenizer", str(run), str(image), "--out", str(tmp_path / name)]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert math.isfinite(outs[0]["psnr"]) and outs[0]["codes_per_image"] == 8
    from PIL import Image

    assert Image.open(tmp_path / "a.png").size == (36, 36)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # the same picture each time


def test_a_wrong_local_unet_stops_the_cli_run_with_one_error_line(shapes_dir, tmp_path, capsys):
    new_unet(DiffusionConfig(channels=[8, 16]), 32).save_pretrained(tmp_path / "unet32")
    args = [
        "train-tokenizer",
        "--config",
        "seed-tiny",
        "--data",
        str(shapes_dir),
        "--out",
        str(tmp_path / "r"),
        *LLM,
        *SEED_TINY,
        *DIFFUSION,
        f"model.diffusion.unet_path={tmp_path / 'unet32'}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: model.diffusion.unet_path: {tmp_path / 'unet32'} is a UNet for 32 px images with 3 "
        f"channels; the model draws 36 px RGB"
    )
    assert not (tmp_path / "r" / "model.safetensors").exists()
