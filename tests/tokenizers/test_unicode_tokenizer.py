"""The UniCode tokenizer: interface, round trips, self-describing folders, LLM binding."""

import json

import pytest
import torch
from conftest import tiny_config

from unicodebook.errors import UnicodebookError
from unicodebook.lm.llm import input_embedding
from unicodebook.tokenizers.unicode import build_tokenizer, load_tokenizer, save_tokenizer


@pytest.mark.parametrize("kind,grid", [("rq", (8, 8, 4)), ("hq", (4, 4, 10))])
def test_encode_embed_decode_interface(kind, grid):
    visual_tok = build_tokenizer(
        tiny_config(f"model.quantizer.kind={kind}", "model.quantizer.depth=" + ("4" if kind == "rq" else "2"))
    )
    visual_tok.train()
    visual_tok(torch.rand(4, 3, 32, 32))  # k-means init
    visual_tok.eval()
    x = torch.rand(3, 3, 32, 32)
    codes = visual_tok.encode(x)
    assert codes.shape == (3, *grid) and codes.dtype == torch.long
    assert visual_tok.embed(codes).shape == (3, 64, 32)  # (B, h·w, d): what the LLM reads
    assert visual_tok.decode(codes).shape == (3, 3, 32, 32)
    # decode(encode(x)) is exactly the eval forward pass
    assert torch.equal(visual_tok.decode(codes), visual_tok(x).recon.clamp(0, 1))
    ids = visual_tok.token_ids(codes)
    assert int(ids.min()) >= 128 and int(ids.max()) < 192  # codes are LLM token ids of the exposed rows


def _one_object_everywhere(size: int) -> torch.Tensor:
    """The same large yellow square alone in each of the 9 grid cells, (9, 3, size, size) in [0, 1]."""
    import numpy as np

    from unicodebook.data.shapes import POSITIONS, Obj, Scene, render_array

    scenes = [Scene(objects=(Obj("square", "yellow", "large", p),)) for p in POSITIONS]
    return torch.from_numpy(np.stack([render_array(s, size) for s in scenes])).permute(0, 3, 1, 2).float() / 255


def test_circular_padding_gives_an_object_the_same_codes_in_every_cell():
    # 36 px, 4 px per code: a grid cell is 3×3 codes, so moving an object one cell is a shift by whole codes
    x = _one_object_everywhere(36)
    blocks = {}
    for padding in ("zeros", "circular"):
        visual_tok = build_tokenizer(tiny_config("model.image_size=36", f"model.autoencoder.padding={padding}")).eval()
        codes = visual_tok.encode(x)  # (9, 9, 9, D)
        blocks[padding] = {
            tuple(codes[i, 3 * (i // 3) : 3 * (i // 3) + 3, 3 * (i % 3) : 3 * (i % 3) + 3].flatten().tolist())
            for i in range(9)
        }
        if padding == "circular":  # and the decoder draws the same object back in every cell
            out = visual_tok.decode(codes)
            first = out[0, :, 0:12, 0:12]
            for i in range(9):
                r, c = 12 * (i // 3), 12 * (i % 3)
                torch.testing.assert_close(out[i, :, r : r + 12, c : c + 12], first, atol=1e-5, rtol=0)
    assert len(blocks["circular"]) == 1
    assert len(blocks["zeros"]) > 1  # the default: the border shows through in the codes


def test_embed_rejects_codes_of_the_wrong_shape_or_range():
    visual_tok = build_tokenizer(tiny_config())
    with pytest.raises(ValueError, match="expected codes"):
        visual_tok.embed(torch.zeros(1, 4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="long indices"):
        visual_tok.embed(torch.full((1, 8, 8, 4), 64, dtype=torch.long))
    with pytest.raises(ValueError, match="expected images"):
        visual_tok.encode(torch.rand(1, 3, 16, 16))


def test_save_load_round_trip_gives_identical_codes_and_images(tmp_path):
    visual_tok = build_tokenizer(tiny_config("model.codebook.mode=dual"))
    visual_tok.train()
    visual_tok(torch.rand(8, 3, 32, 32))
    visual_tok.codebook.update(*visual_tok.quantizer.pop_updates(), progress=0.5, step=1)
    visual_tok.codebook.write_to_llm()
    visual_tok.eval()
    save_tokenizer(visual_tok, tmp_path / "tok")
    names = {p.name for p in (tmp_path / "tok").iterdir()}
    assert {"config.yaml", "model.safetensors", "binding.json", "llm"} <= names
    loaded = load_tokenizer(tmp_path / "tok")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(x), visual_tok.encode(x))
    assert torch.equal(loaded.decode(visual_tok.encode(x)), visual_tok.decode(visual_tok.encode(x)))
    # the dual-mode rows written into the LLM came back with it
    assert torch.equal(input_embedding(loaded.llm).weight[128:192], visual_tok.codebook.embed)


def test_hf_llm_from_a_local_folder_binds_and_is_fingerprinted(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    hf.save_pretrained(tmp_path / "llm")
    cfg = tiny_config(f"llm.name={tmp_path / 'llm'}", "model.codebook.mode=frozen", "model.codebook.rows=[3,7,250,299]")
    visual_tok = build_tokenizer(cfg)
    emb = input_embedding(visual_tok.llm).weight
    assert torch.equal(visual_tok.codebook.embed, emb[[3, 7, 250, 299]].float())
    save_tokenizer(visual_tok, tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "binding.json").read_text())["llm"] == str((tmp_path / "llm").resolve())
    assert torch.equal(load_tokenizer(tmp_path / "tok").codebook.embed, visual_tok.codebook.embed)

    # another model saved where the first one was: the binding refuses it
    torch.manual_seed(1)
    LlamaForCausalLM(hf.config).save_pretrained(tmp_path / "llm")
    with pytest.raises(UnicodebookError, match="do not match the ones this tokenizer was bound to"):
        load_tokenizer(tmp_path / "tok")


def test_loading_a_checkpoint_of_another_model_is_refused(tmp_path):
    a = build_tokenizer(tiny_config())
    save_tokenizer(a, tmp_path / "a")
    b = build_tokenizer(tiny_config("model.autoencoder.ch=16"))
    save_tokenizer(b, tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(UnicodebookError, match="does not match its config"):
        load_tokenizer(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(UnicodebookError, match="corrupt or truncated"):
        load_tokenizer(tmp_path / "a")
    with pytest.raises(UnicodebookError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)


def test_7b_preset_builds_on_the_meta_device():
    from unicodebook.config import load_config

    cfg = load_config("7b", ["llm.name=builtin"])
    with torch.device("meta"):
        visual_tok = build_tokenizer(cfg)
    assert tuple(visual_tok.codebook.embed.shape) == (32000, 4096)
    assert visual_tok.grid_shape == (8, 8, 5) and visual_tok.codes_per_image == 320  # HQ 8×8 top + 16×16 bottom
    with torch.device("meta"):
        out = visual_tok.eval()(torch.empty(2, 3, 256, 256))
    assert out.recon.shape == (2, 3, 256, 256) and out.codes.shape == (2, 8, 8, 5)


def test_photos_256_preset_builds_on_the_meta_device():
    from unicodebook.config import load_config

    cfg = load_config("photos-256", ["llm.name=builtin"])
    with torch.device("meta"):
        visual_tok = build_tokenizer(cfg)
    assert tuple(visual_tok.codebook.embed.shape) == (32000, 4096)
    assert visual_tok.grid_shape == (16, 16, 4) and visual_tok.codes_per_image == 1024  # RQ 16×16, 4 layers
    assert [visual_tok.codebook.group_rows(g) for g in range(4)] == [
        (0, 8000),
        (8000, 16000),
        (16000, 24000),
        (24000, 32000),
    ]
    with torch.device("meta"):
        out = visual_tok.eval()(torch.empty(1, 3, 256, 256))
    assert out.recon.shape == (1, 3, 256, 256) and out.codes.shape == (1, 16, 16, 4)
