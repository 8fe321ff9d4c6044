"""The SEED tokenizer: a causal Q-Former (output i sees queries ≤ i only), 32 codes per image that
round-trip through its folder, a four-phase stage I that resumes exactly, and stage II on it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import SEED_TINY, TINY_OVERRIDES
from safetensors.torch import load_file

from unicodebook.config import load_config
from unicodebook.errors import ConfigError, UnicodebookError
from unicodebook.tokenizers.base import load_tokenizer
from unicodebook.tokenizers.seed import SeedTokenizer, build_tokenizer
from unicodebook.tokenizers.seed.qformer import QFormer

LLM = [o for o in TINY_OVERRIDES if o.startswith(("llm.", "train_lm."))]


def seed_config(*extra: str):
    return load_config("seed-tiny", LLM + SEED_TINY + list(extra))


@pytest.fixture(scope="module")
def seed_run(shapes_dir, tmp_path_factory):
    from unicodebook.train.seed import train_seed_tokenizer

    run = tmp_path_factory.mktemp("seed") / "run"
    train_seed_tokenizer(seed_config(), shapes_dir, run, progress=False)
    return run


def test_the_qformer_is_causal_among_its_queries():
    torch.manual_seed(0)
    q = QFormer(32, 2, 2, kv_dim=16, cross_every=2).eval()
    queries, patches = torch.randn(2, 6, 32), torch.randn(2, 9, 16)
    out = q(queries, patches)
    changed = queries.clone()
    changed[:, 3] += torch.randn(32)  # (a constant shift would vanish in the first LayerNorm)
    again = q(changed, patches)
    assert torch.allclose(out[:, :3], again[:, :3], atol=1e-6)  # the queries before 3 do not see it
    assert not torch.allclose(out[:, 3:], again[:, 3:], atol=1e-3)
    both = QFormer(32, 2, 2, kv_dim=16, causal=False).eval()
    assert not torch.allclose(both(queries, patches)[:, :3], both(changed, patches)[:, :3], atol=1e-3)


def test_codes_round_trip_through_the_folder(seed_run, shapes_dir):
    visual_tok = load_tokenizer(seed_run)
    assert isinstance(visual_tok, SeedTokenizer) and visual_tok.layout.length == 8 and visual_tok.layout.fixed
    from unicodebook.data.images import ImageFolder, resolve_image_folder

    ds = ImageFolder(resolve_image_folder(shapes_dir, "test"), 32, preload=False)
    images = torch.stack([ds[i] for i in range(6)])
    codes = visual_tok.encode(images)
    assert codes.shape == (6, 8) and int(codes.min()) >= 0 and int(codes.max()) < 64
    out = visual_tok.decode(codes)
    assert out.shape == (6, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1
    again = load_tokenizer(seed_run)
    assert torch.equal(again.encode(images), codes) and torch.equal(again.decode(codes), out)


def test_each_phase_trains_only_its_own_modules_and_logs_its_loss(seed_run):
    rows = [json.loads(line) for line in (seed_run / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in rows if "phase" in r]
    assert phases[0] == "vit" and phases[-1] == "decoder" and set(phases) == {"vit", "qformer", "vq", "decoder"}
    for name in ("vit", "qformer", "vq", "decoder"):
        assert any(f"loss_{name}" in r for r in rows)
    # the ViT stops changing after its phase: the phase-vit checkpoint's ViT is the final one's
    mid = load_file(seed_run / "checkpoints" / "step_0000020" / "model.safetensors")
    end = load_file(seed_run / "model.safetensors")
    vit = [k for k in end if k.startswith("visual_encoder.")]
    assert vit and all(torch.equal(mid[k], end[k]) for k in vit)
    qf = [k for k in end if k.startswith("Qformer.")]
    assert all(torch.equal(mid[k], end[k]) for k in qf)  # step 20 ends the qformer phase
    assert not all(torch.equal(mid[k], end[k]) for k in end if k.startswith("pixel_decoder."))
    from unicodebook.tokenizers.vit import load_local_vit  # stage 0 as a folder of its own

    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(
        load_local_vit(seed_run / "vit").embedding(x), load_tokenizer(seed_run).visual_encoder.embedding(x)
    )


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(seed_run, shapes_dir, tmp_path):
    from unicodebook.train.seed import train_seed_tokenizer

    copy = tmp_path / "run"
    shutil.copytree(seed_run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_0000040")
    train_seed_tokenizer(seed_config(), shapes_dir, copy, resume=True, progress=False)
    a, b = load_file(seed_run / "model.safetensors"), load_file(copy / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_contrastive_phase_learns_to_match_captions(shapes_dir, tmp_path):
    from unicodebook.train.seed import train_seed_tokenizer

    cfg = seed_config(
        "train_tokenizer.steps=105",
        "train_tokenizer.lr=3e-3",
        "train_tokenizer.save_every=0",
        "train_tokenizer.phases=[{name: vit, steps: 90}, {name: qformer, steps: 5}, {name: vq, steps: 5}, "
        "{name: decoder, steps: 5}]",
    )
    train_seed_tokenizer(cfg, shapes_dir, tmp_path / "run", progress=False, val_split=None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vit = [(r["loss_vit"], r["contrastive_acc"]) for r in rows if "loss_vit" in r]
    assert vit[-1][0] < 0.75 * vit[0][0] and vit[-1][1] > 3 / 16  # chance: 1 in 16


def test_bad_seed_configs_are_one_line_errors(shapes_dir, tmp_path):
    from unicodebook.train.seed import train_seed_tokenizer

    with pytest.raises(ConfigError, match=r"^unknown config key 'model.autoencoder'"):
        seed_config("model.autoencoder.ch=8")  # a UniCode override given to a SEED config
    with pytest.raises(ConfigError, match=r"model.family: 'nope' is not one of unicode, seed"):
        load_config("tiny", ["model.family=nope"])
    with pytest.raises(ConfigError, match=r"decoder_mult has 2 levels; the pixel decoder upsamples ×4: 3 levels$"):
        seed_config("model.decoder_mult=[1,2]")
    bad = seed_config(
        "train_tokenizer.steps=20", "train_tokenizer.phases=[{name: vq, steps: 10}, {name: decoder, steps: 10}]"
    )
    with pytest.raises(
        UnicodebookError, match=r"phases named vit, qformer, vq, decoder in that order .*got vq, decoder$"
    ):
        train_seed_tokenizer(bad, shapes_dir, tmp_path / "r", progress=False)


def test_stage2_reads_and_writes_through_seed_codes(seed_run, shapes_dir, tmp_path):
    from unicodebook.lm.model import load_model
    from unicodebook.train.stage2 import train_lm

    train_lm(seed_config(), seed_run, shapes_dir, tmp_path / "lm", progress=False)
    model = load_model(tmp_path / "lm")
    assert model.reads_codes and model.tokenizer.family == "seed"
    codes = model.generate_codes(
        ["draw a small red circle"] * 2, cfg_scale=1.0, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert codes.shape == (2, 8) and int(codes.min()) >= 0
    ids = model.code_token_ids
    assert model.text_tok.convert_ids_to_tokens(ids[:2].tolist()) == ["<img_00000>", "<img_00001>"]
    assert model.tokenizer.decode(codes).shape == (2, 3, 32, 32)


def test_a_fresh_tokenizer_from_a_local_vit_takes_its_sizes(tmp_path):
    from unicodebook.tokenizers.vit import VisionTransformer, ViTConfig, save_vit

    vit = VisionTransformer(ViTConfig(image_size=32, patch_size=4, width=24, layers=1, heads=2, embed_dim=12))
    save_vit(vit, tmp_path / "vit")
    visual_tok = build_tokenizer(seed_config(f"model.vit_path={tmp_path / 'vit'}"))
    assert visual_tok.config.model.vit.width == 24 and visual_tok.config.model.vit.patch_size == 4
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(visual_tok.visual_encoder.patch_features(x), vit.patch_features(x))
    with pytest.raises(UnicodebookError, match="takes 32 px images, the model 64"):
        build_tokenizer(seed_config(f"model.vit_path={tmp_path / 'vit'}", "model.image_size=64"))


def _official_state() -> dict:
    """The official SEED tokenizer checkpoint's keys and shapes (EVA-g ViT, 39 blocks; BERT-base
    Q-Former, 32 queries, cross-attention every 2nd layer; 8192 × 32 codebook; 4 + 4 de-tokenizer
    blocks; a one-query reverse Q-Former; 1024-d generation embedding), written out from the
    official modules' definitions, on the meta device."""
    m = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    s = {
        "visual_encoder.patch_embed.proj.weight": m(1408, 3, 14, 14),
        "visual_encoder.patch_embed.proj.bias": m(1408),
        "visual_encoder.cls_token": m(1, 1, 1408),
        "visual_encoder.pos_embed": m(1, 257, 1408),
        "ln_vision.weight": m(1408),
        "ln_vision.bias": m(1408),
        "query_tokens": m(1, 32, 768),
        "encode_task_layer.0.weight": m(768, 768),
        "encode_task_layer.0.bias": m(768),
        "encode_task_layer.2.weight": m(32, 768),
        "encode_task_layer.2.bias": m(32),
        "quantize.embedding.weight": m(8192, 32),
        "decode_task_layer.0.weight": m(32, 32),
        "decode_task_layer.0.bias": m(32),
        "decode_task_layer.2.weight": m(768, 32),
        "decode_task_layer.2.bias": m(768),
        "pos_embed": m(1, 32, 768),
        "pos_embed_image": m(1, 32, 768),
        "reverse_tokens": m(1, 1, 768),
        "distill_image_proj.weight": m(1024, 768),
        "distill_image_proj.bias": m(1024),
        "vision_proj.weight": m(256, 768),
        "vision_proj.bias": m(256),
        # BLIP-2's text side, which we do not have
        "text_proj.weight": m(256, 768),
        "temp": m(),
        "Qformer.cls.predictions.bias": m(30523),
        "Qformer.bert.embeddings.position_ids": m(1, 512),
    }
    for i in range(39):
        b = f"visual_encoder.blocks.{i}."
        s.update(
            {
                b + "norm1.weight": m(1408),
                b + "norm1.bias": m(1408),
                b + "attn.qkv.weight": m(4224, 1408),
                b + "attn.q_bias": m(1408),
                b + "attn.v_bias": m(1408),
                b + "attn.proj.weight": m(1408, 1408),
                b + "attn.proj.bias": m(1408),
                b + "norm2.weight": m(1408),
                b + "norm2.bias": m(1408),
                b + "mlp.fc1.weight": m(6144, 1408),
                b + "mlp.fc1.bias": m(6144),
                b + "mlp.fc2.weight": m(1408, 6144),
                b + "mlp.fc2.bias": m(1408),
            }
        )
    for name, kv in (("Qformer", 1408), ("Reverse_Qformer", 768)):
        s[f"{name}.bert.embeddings.LayerNorm.weight"] = m(768)
        s[f"{name}.bert.embeddings.LayerNorm.bias"] = m(768)
        for i in range(12):
            b = f"{name}.bert.encoder.layer.{i}."
            parts = [("attention", 768)] + ([("crossattention", kv)] if i % 2 == 0 else [])
            for att, width in parts:
                for proj, d_in in (("query", 768), ("key", width), ("value", width)):
                    s[f"{b}{att}.self.{proj}.weight"], s[f"{b}{att}.self.{proj}.bias"] = m(768, d_in), m(768)
                s[f"{b}{att}.output.dense.weight"], s[f"{b}{att}.output.dense.bias"] = m(768, 768), m(768)
                s[f"{b}{att}.output.LayerNorm.weight"], s[f"{b}{att}.output.LayerNorm.bias"] = m(768), m(768)
            s.update(
                {
                    b + "intermediate_query.dense.weight": m(3072, 768),
                    b + "intermediate_query.dense.bias": m(3072),
                    b + "output_query.dense.weight": m(768, 3072),
                    b + "output_query.dense.bias": m(768),
                    b + "output_query.LayerNorm.weight": m(768),
                    b + "output_query.LayerNorm.bias": m(768),
                }
            )
    for name in ("blocks", "blocks_image"):
        for i in range(4):
            b = f"{name}.{i}."
            s.update(
                {
                    b + "norm1.weight": m(768),
                    b + "norm1.bias": m(768),
                    b + "attn.qkv.weight": m(2304, 768),
                    b + "attn.qkv.bias": m(2304),
                    b + "attn.proj.weight": m(768, 768),
                    b + "attn.proj.bias": m(768),
                    b + "norm2.weight": m(768),
                    b + "norm2.bias": m(768),
                    b + "mlp.fc1.weight": m(3072, 768),
                    b + "mlp.fc1.bias": m(3072),
                    b + "mlp.fc2.weight": m(768, 3072),
                    b + "mlp.fc2.bias": m(768),
                }
            )
    return s


OFFICIAL = [
    "model.image_size=224",
    "model.vit.patch_size=14",
    "model.vit.width=1408",
    "model.vit.layers=39",
    "model.vit.heads=16",
    f"model.vit.mlp_ratio={6144 / 1408}",
    "model.vit.embed_dim=0",
    "model.qformer.queries=32",
    "model.qformer.width=768",
    "model.qformer.layers=12",
    "model.qformer.heads=12",
    "model.num_codes=8192",
    "model.code_dim=32",
    "model.recon_blocks=4",
    "model.gen_blocks=4",
    "model.reverse_layers=12",
    "model.generation_dim=1024",
    "model.contrastive_dim=256",
]


def test_an_official_checkpoint_maps_onto_ours_by_name_on_the_meta_device():
    from unicodebook.tokenizers.seed.official import load_mapped

    with torch.device("meta"):
        visual_tok = build_tokenizer(load_config("seed-tiny", OFFICIAL))
    report = load_mapped(visual_tok, _official_state())
    assert report["left_out"] == [
        "Qformer.bert.embeddings.position_ids",
        "Qformer.cls.predictions.bias",
        "temp",
        "text_proj.weight",
    ]
    missing = {k.split(".")[0] if not k.startswith("visual_encoder.") else k for k in report["missing"]}
    assert missing == {"pixel_decoder", "quantize", "visual_encoder.norm.weight", "visual_encoder.norm.bias"}
    assert all(
        k.startswith("quantize.") is False or k in ("quantize.initialised", "quantize.last_used")
        for k in report["missing"]
    )
    assert report["loaded"] == len(_official_state()) - 4 - 39  # q_bias and v_bias become one qkv.bias per block
    bad = _official_state()
    bad["quantize.embedding.weight"] = torch.empty(16384, 32, device="meta")
    with pytest.raises(
        UnicodebookError,
        match=r"quantize.embedding.weight has shape \(16384, 32\), this tokenizer's "
        r"\(8192, 32\)",
    ):
        load_mapped(visual_tok, bad)


@pytest.mark.slow
def test_the_demo_runs_on_seed_and_its_report_says_so(tmp_path):
    from PIL import Image

    from unicodebook.demo import run_demo

    report = run_demo(tmp_path / "demo", LLM + SEED_TINY, n_train=64, n_val=16, n_test=16, preset="seed-tiny")
    text = report.read_text()
    assert (
        "`seed-tiny` preset: a seed tokenizer (8 codes per image) over 64 codes, read and written as new rows" in text
    )
    assert "images enter as their code tokens and leave as `<img>` + 8 code ids + `</img>`" in text
    assert "mean cosine" not in text  # a UniCode figure: SEED's codebook is its own
    assert "decompression" not in text and "nan" not in text  # SEED has no decompression task: no empty row
    vqa = json.loads((tmp_path / "demo" / "eval_model_test.json").read_text())
    assert f"{vqa['vqa_n']} questions) | {vqa['vqa_accuracy']:.1%} |" in text and vqa["vqa_n"] > 0
    for pic in ("reconstructions_test.png", "t2i_samples.png", "vqa_examples.png"):
        assert Image.open(tmp_path / "demo" / pic).size[0] > 0


def test_a_torn_seed_folder_and_an_unfit_vit_are_one_error_line(seed_run, shapes_dir, tmp_path, capsys):
    from unicodebook.cli import main
    from unicodebook.tokenizers.vit import VisionTransformer, ViTConfig, save_vit

    torn = tmp_path / "torn"
    shutil.copytree(seed_run, torn, ignore=shutil.ignore_patterns("checkpoints", "vit"))
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    image = next((shapes_dir / "test" / "images").iterdir())
    assert main(["tokenize", "--tokenizer", str(torn), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {torn}/model.safetensors is corrupt or truncated (") and "\n" not in err

    save_vit(VisionTransformer(ViTConfig(image_size=64, patch_size=8, width=32, layers=1, heads=2)), tmp_path / "vit64")
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
        f"model.vit_path={tmp_path / 'vit64'}",
        "train_tokenizer.steps=30",
        "train_tokenizer.phases=[{name: qformer, steps: 10}, {name: vq, steps: 10}, {name: decoder, steps: 10}]",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: model.vit_path: {tmp_path / 'vit64'} takes 64 px images, the model 32"
    assert not (tmp_path / "r" / "model.safetensors").exists()
