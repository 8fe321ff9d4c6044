"""The stage-0 ViT: timm's parameter names and forward (checked against a plain re-implementation),
our folder (timm's hub format) round-trips, timm and transformers folders load onto it with their
outputs, and every bad folder is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from unicodebook.errors import UnicodebookError
from unicodebook.tokenizers.vit import Block, VisionTransformer, ViTConfig, load_local_vit, save_vit

SMALL = ViTConfig(image_size=16, patch_size=4, width=32, layers=2, heads=2, embed_dim=8)
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def reference_tokens(state: dict, images, heads: int, patch: int, mean, std):
    """timm's ViT forward written out from a state dict, with explicit softmax attention → (B, 1+N, W)."""

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)

    def lin(t, name):
        return F.linear(t, state[f"{name}.weight"], state[f"{name}.bias"])

    def split(t):  # (B, n, W) → (B, heads, n, W / heads)
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + state["pos_embed"]
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        b = f"blocks.{i}."
        q, k, v = map(split, lin(ln(x, b + "norm1"), b + "attn.qkv").chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        x = x + lin(a.transpose(1, 2).flatten(2), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
        i += 1
    return ln(x, "norm")


def timm_state(width: int, depth: int, patch: int, positions: int, hidden: int, classes: int) -> dict:
    """A random state dict under timm's ``VisionTransformer`` key names, with a classifier head."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=0.1, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    state = {
        "cls_token": r(1, 1, width),
        "pos_embed": r(1, positions, width),
        "patch_embed.proj.weight": r(width, 3, patch, patch),
        "patch_embed.proj.bias": r(width),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {
            b + "norm1.weight": r(width, shift=1.0),
            b + "norm1.bias": r(width),
            b + "attn.qkv.weight": r(3 * width, width, scale=width**-0.5),
            b + "attn.qkv.bias": r(3 * width),
            b + "attn.proj.weight": r(width, width, scale=width**-0.5),
            b + "attn.proj.bias": r(width),
            b + "norm2.weight": r(width, shift=1.0),
            b + "norm2.bias": r(width),
            b + "mlp.fc1.weight": r(hidden, width, scale=width**-0.5),
            b + "mlp.fc1.bias": r(hidden),
            b + "mlp.fc2.weight": r(width, hidden, scale=hidden**-0.5),
            b + "mlp.fc2.bias": r(width),
        }
    return state | {
        "norm.weight": r(width, shift=1.0),
        "norm.bias": r(width),
        "head.weight": r(classes, width),
        "head.bias": r(classes),
    }


def write_folder(folder: Path, config: dict, state: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if state is not None:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_config_refuses_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="patch size 5 does not divide image size 16"):
        ViTConfig(image_size=16, patch_size=5)
    with pytest.raises(ValueError, match="3 heads do not divide width 32"):
        ViTConfig(width=32, heads=3)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        ViTConfig(std=[0.5, 0.0, 0.5])


def test_shapes_and_the_final_norm():
    torch.manual_seed(0)
    vit = VisionTransformer(SMALL).eval()
    x = torch.rand(3, 3, 16, 16)
    assert vit.num_patches == 16 and vit.forward_tokens(x).shape == (3, 17, 32)
    assert vit.patch_features(x).shape == (3, 16, 32) and vit.embedding(x).shape == (3, 8)
    raw, normed = vit.forward_tokens(x, normed=False), vit.forward_tokens(x)
    assert not torch.allclose(raw, normed)
    torch.testing.assert_close(vit.norm(raw), normed)  # exactly the final LayerNorm apart
    torch.testing.assert_close(vit.embedding(x), vit.head(normed[:, 0]))  # the class token, not L2-normalised
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 16, 16\), got \(1, 3, 8, 8\)"):
        vit.patch_features(torch.rand(1, 3, 8, 8))

    pooled = VisionTransformer(
        ViTConfig(image_size=16, patch_size=4, width=32, layers=1, heads=2, embed_dim=0, class_token=False)
    ).eval()
    assert not hasattr(pooled, "cls_token") and pooled.pos_embed.shape == (1, 16, 32)
    assert pooled.forward_tokens(x).shape == (3, 16, 32) and pooled.embed_dim == 32
    torch.testing.assert_close(pooled.embedding(x), pooled.patch_features(x).mean(1))


def test_parameter_names_and_forward_are_timms():
    torch.manual_seed(0)
    vit = VisionTransformer(SMALL).eval()
    state = vit.state_dict()
    names = set(timm_state(32, 2, 4, 17, 128, 8)) - {"head.bias"}  # our head is a bias-free projection
    assert set(state) == names and state["blocks.1.mlp.fc1.weight"].shape == (128, 32)
    assert Block(24, 2, 2.7).mlp.fc1.out_features == 64  # timm's int(24 · 2.7 = 64.8), not rounded
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(
        vit.forward_tokens(x), reference_tokens(state, x, 2, 4, SMALL.mean, SMALL.std), atol=1e-5, rtol=1e-5
    )


def test_our_folder_round_trips(tmp_path):
    torch.manual_seed(0)
    for cfg in (
        SMALL,
        ViTConfig(
            image_size=12,
            patch_size=4,
            width=24,
            layers=1,
            heads=3,
            mlp_ratio=2.5,
            embed_dim=0,
            mean=IMAGENET[0],
            std=IMAGENET[1],
            class_token=False,
        ),
    ):
        vit = VisionTransformer(cfg).eval()
        save_vit(vit, tmp_path / "vit")  # the second one over the first
        again = load_local_vit(tmp_path / "vit")
        x = torch.rand(2, 3, cfg.image_size, cfg.image_size)
        assert again.config == cfg and not again.training
        assert torch.equal(again.forward_tokens(x), vit.forward_tokens(x))
        assert torch.equal(again.embedding(x), vit.embedding(x))
    meta = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert meta["architecture"] == "vit_custom" and meta["num_classes"] == 0 and meta["num_features"] == 24
    assert meta["model_args"] | {"fc_norm": False, "global_pool": "avg"} == {
        "img_size": 12,
        "patch_size": 4,
        "embed_dim": 24,
        "depth": 1,
        "num_heads": 3,
        "mlp_ratio": 2.5,
        "class_token": False,
        "global_pool": "avg",
        "fc_norm": False,
    }
    assert meta["pretrained_cfg"]["input_size"] == [3, 12, 12] and meta["pretrained_cfg"]["mean"] == IMAGENET[0]
    assert meta["unicodebook"] == {"embed_dim": 0, "mean": IMAGENET[0], "std": IMAGENET[1]}
    assert sorted(p.name for p in (tmp_path / "vit").iterdir()) == ["config.json", "model.safetensors"]


def test_a_timm_classifier_folder_loads_without_its_head(tmp_path):
    state = timm_state(width=32, depth=2, patch=4, positions=17, hidden=64, classes=10)
    folder = write_folder(
        tmp_path / "timm",
        {  # as timm's save_for_hf writes a created-with-kwargs model
            "architecture": "vit_tiny_patch16_224",
            "num_classes": 10,
            "num_features": 32,
            "global_pool": "token",
            "model_args": {
                "img_size": 16,
                "patch_size": 4,
                "embed_dim": 32,
                "depth": 2,
                "num_heads": 2,
                "mlp_ratio": 2.0,
            },
            "pretrained_cfg": {
                "tag": "test",
                "custom_load": False,
                "input_size": [3, 16, 16],
                "fixed_input_size": True,
                "interpolation": "bicubic",
                "crop_pct": 0.9,
                "crop_mode": "center",
                "mean": IMAGENET[0],
                "std": IMAGENET[1],
                "num_classes": 10,
                "pool_size": None,
                "first_conv": "patch_embed.proj",
                "classifier": "head",
            },
        },
        state,
    )
    vit = load_local_vit(folder)
    c = vit.config
    assert (c.image_size, c.patch_size, c.width, c.layers, c.heads, c.mlp_ratio) == (16, 4, 32, 2, 2, 2.0)
    assert not hasattr(vit, "head") and c.embed_dim == 0 and (c.mean, c.std) == IMAGENET
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    want = reference_tokens(state, x, heads=2, patch=4, mean=IMAGENET[0], std=IMAGENET[1])
    torch.testing.assert_close(vit.patch_features(x), want[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vit.embedding(x), want[:, 0], atol=1e-5, rtol=1e-5)  # the class token, no head


def test_a_named_timm_architecture_takes_its_sizes_from_the_name(tmp_path):
    state = timm_state(width=192, depth=12, patch=16, positions=197, hidden=768, classes=1000)
    folder = write_folder(
        tmp_path / "tiny",
        {  # timm's legacy single-dict config.json, no model_args
            "architecture": "vit_tiny_patch16_224",
            "num_classes": 1000,
            "num_features": 192,
            "input_size": [3, 224, 224],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
        },
        state,
    )
    c = load_local_vit(folder).config
    assert (c.image_size, c.patch_size, c.width, c.layers, c.heads, c.embed_dim) == (224, 16, 192, 12, 3, 0)
    assert c.std == [0.25] * 3


def _hf_model(kind: str):
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification, ViTModel

    torch.manual_seed(0)
    cfg = HFConfig(
        hidden_size=28,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=61,
        image_size=12,
        patch_size=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        num_labels=3,
    )
    if kind == "classifier":
        model = ViTForImageClassification(cfg).eval()
        return model, model.vit
    model = ViTModel(cfg).eval()
    return model, model


@pytest.mark.parametrize("kind", ["model", "classifier", "in-memory names"])
def test_a_transformers_vit_gives_the_same_hidden_states(tmp_path, kind):
    from transformers import ViTImageProcessorPil

    model, backbone = _hf_model(kind)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    ViTImageProcessorPil(image_mean=IMAGENET[0], image_std=IMAGENET[1]).save_pretrained(folder)
    if kind == "in-memory names":  # transformers ≥ 5 names (layers.{i}.attention.q_proj, …), as a raw state dict
        save_file(model.state_dict(), folder / "model.safetensors")
    ours = load_local_vit(folder)
    c = ours.config
    assert (c.width, c.layers, c.heads, c.embed_dim, c.mean, c.std) == (28, 2, 2, 0, *IMAGENET)
    assert ours.blocks[0].mlp.fc1.out_features == 61  # 61 / 28 · 28 rounds down: the ratio is stored one ulp up
    x = torch.rand(2, 3, 12, 12)
    pixels = (x - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = backbone(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(ours.forward_tokens(x, normed=True), want, atol=1e-5, rtol=1e-5)


def _bad_folders(root: Path) -> dict:
    """name → (folder, what its one error line says)."""
    torch.manual_seed(0)
    (root / "noconf").mkdir()
    cases = {
        "missing": (root / "nowhere", "does not exist"),
        "a file": (write_folder(root / "f", {}) / "config.json", "is not a folder"),
        "no config": (root / "noconf", r"not a ViT folder \(no config.json\)"),
    }
    (root / "garbled").mkdir()
    (root / "garbled" / "config.json").write_bytes(b"\xff{not json")
    cases["unreadable config"] = (root / "garbled", "config.json is unreadable")
    cases["unknown format"] = (
        write_folder(root / "bert", {"model_type": "bert"}),
        r"neither timm's .*\(model_type 'bert', not 'vit'\)$",
    )
    cases["unknown architecture"] = (
        write_folder(root / "resnet", {"architecture": "resnet50", "num_classes": 0}),
        "'resnet50' is not a plain timm ViT name .* lack embed_dim, depth",
    )

    small = VisionTransformer(ViTConfig(image_size=32, patch_size=4, width=32, layers=1, heads=2))
    save_vit(small, root / "v32")
    meta = json.loads((root / "v32" / "config.json").read_text())
    (root / "v32" / "model.safetensors").rename(root / "weights.safetensors")

    def variant(name: str, state: dict | None = None, **args) -> Path:
        m = json.loads(json.dumps(meta))
        m["model_args"] |= args
        write_folder(root / name, m)
        (root / name / "model.safetensors").write_bytes((root / "weights.safetensors").read_bytes())
        if state is not None:
            save_file(state, root / name / "model.safetensors")
        return root / name

    weights = small.state_dict()
    cases["64-px config, 32-px weights"] = (
        variant("v64", img_size=64),
        r"pos_embed has shape \(1, 65, 32\), the "
        r"config wants \(1, 257, 32\) \(weights made for 32 px images, .*not "
        r"interpolated\)$",
    )
    cases["another width"] = (
        variant("wide", state=weights | {"blocks.0.attn.qkv.weight": torch.zeros(384, 128)}),
        r"blocks.0.attn.qkv.weight has shape \(384, 128\), the config wants \(96, 32\)$",
    )
    cases["missing key"] = (
        variant("lack", state={k: v for k, v in weights.items() if k != "norm.bias"}),
        "the weights lack norm.bias$",
    )
    cases["unexpected key"] = (
        variant("extra", state=weights | {"fc_norm.weight": torch.ones(32)}),
        "unexpected weight fc_norm.weight",
    )
    cases["no weights"] = (variant("empty"), "no model.safetensors$")
    (root / "empty" / "model.safetensors").unlink()
    cases["garbage weights"] = (variant("garbage"), "model.safetensors is corrupt or truncated")
    (root / "garbage" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    cases["bad model_args"] = (variant("args", img_size=[32, 16]), r"does not describe a ViT \(image size \[32, 16\]")
    cases["another activation"] = (variant("quick", act_layer="quick_gelu"), "act_layer 'quick_gelu' is not our exact")

    model, _ = _hf_model("model")
    model.save_pretrained(root / "hf")
    save_file({k: v for k, v in model.state_dict().items() if "layers.1." not in k}, root / "hf" / "model.safetensors")
    cases["transformers ViT, a layer short"] = (root / "hf", r"the weights lack layers.1.attention.q_proj.weight")
    extra = dict(model.state_dict()) | {"embeddings.mask_token": torch.zeros(1, 1, 28)}
    save_file(
        extra,
        write_folder(root / "masked", json.loads((root / "hf" / "config.json").read_text())) / "model.safetensors",
    )
    cases["transformers ViT, a mask token"] = (root / "masked", "unexpected weight embeddings.mask_token")
    tanh = json.loads((root / "hf" / "config.json").read_text()) | {"hidden_act": "gelu_new"}
    cases["transformers ViT, tanh GELU"] = (write_folder(root / "tanh", tanh), "hidden_act 'gelu_new': only an RGB")
    return cases


def test_bad_folders_are_one_line_errors(tmp_path):
    for name, (folder, message) in _bad_folders(tmp_path).items():
        with pytest.raises(UnicodebookError, match=message) as e:
            load_local_vit(folder)
        assert "\n" not in str(e.value), name
