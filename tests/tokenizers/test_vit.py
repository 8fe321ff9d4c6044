"""The stage-0 ViT: timm's parameter names, our folder (timm's hub format) round-trips, a timm
folder and a transformers ViT folder load onto it with the same outputs, bad folders are one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from unicodebook.errors import UnicodebookError
from unicodebook.tokenizers.vit import ViTConfig, VisionTransformer, load_local_vit, save_vit

SMALL = ViTConfig(image_size=16, patch_size=4, width=32, layers=2, heads=2, embed_dim=8)


def test_shapes_and_the_final_norm():
    vit = VisionTransformer(SMALL).eval()
    x = torch.rand(3, 3, 16, 16)
    assert vit.patch_features(x).shape == (3, 16, 32) and vit.embedding(x).shape == (3, 8)
    raw, normed = vit.patch_features(x, normed=False), vit.patch_features(x)
    torch.testing.assert_close(vit.norm(raw), normed)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 16, 16\)"):
        vit.patch_features(torch.rand(1, 3, 8, 8))


def test_our_folder_round_trips(tmp_path):
    vit = VisionTransformer(SMALL).eval()
    save_vit(vit, tmp_path / "vit")
    again = load_local_vit(tmp_path / "vit")
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(again.embedding(x), vit.embedding(x)) and again.config == SMALL


def test_a_timm_classifier_folder_loads_without_its_head(tmp_path):
    ref = VisionTransformer(ViTConfig(image_size=16, patch_size=4, width=32, layers=2, heads=2, embed_dim=0,
                                      mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])).eval()
    state = dict(ref.state_dict())
    state["head.weight"], state["head.bias"] = torch.randn(10, 32), torch.randn(10)  # a 10-class classifier
    folder = tmp_path / "timm"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_custom", "num_classes": 10, "num_features": 32, "global_pool": "token",
        "model_args": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "pretrained_cfg": {"input_size": [3, 16, 16], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    vit = load_local_vit(folder)
    x = torch.rand(2, 3, 16, 16)
    assert not hasattr(vit, "head") and torch.equal(vit.patch_features(x), ref.patch_features(x))


def test_a_transformers_vit_gives_the_same_hidden_states(tmp_path):
    from transformers import ViTConfig as HFConfig
    from transformers import ViTModel

    torch.manual_seed(0)
    hf = ViTModel(HFConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=12, patch_size=4, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True),
                  add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_local_vit(tmp_path / "hf")
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        want = hf(pixel_values=(x - 0.5) / 0.5).last_hidden_state
    torch.testing.assert_close(ours.forward_tokens(x), want, atol=1e-5, rtol=1e-5)


def test_bad_folders_are_one_line_errors(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "nowhere", "does not exist")
    small = VisionTransformer(ViTConfig(image_size=32, patch_size=4, width=32, layers=1, heads=2))
    save_vit(small, tmp_path / "v32")
    meta = json.loads((tmp_path / "v32" / "config.json").read_text())
    meta["unicodebook"]["image_size"] = 64  # a 64-px config over the weights of a 32-px model
    (tmp_path / "v32" / "config.json").write_text(json.dumps(meta))
    cases["shape"] = (tmp_path / "v32", r"pos_embed has shape \(1, 65, 32\), the config wants \(1, 257, 32\)")
    save_vit(small, tmp_path / "garbage")
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    cases["garbage"] = (tmp_path / "garbage", "corrupt or truncated")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases["format"] = (tmp_path / "other", "neither timm's")
    for folder, message in cases.values():
        with pytest.raises(UnicodebookError, match=message) as e:
            load_local_vit(folder)
        assert "\n" not in str(e.value)
