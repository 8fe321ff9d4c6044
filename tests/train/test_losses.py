"""Tests for unicodebook.train.losses (LPIPS, PatchGAN, hinge/adaptive GAN weights)."""

import pytest
import torch
from safetensors.torch import save_file

from unicodebook.train.losses import (
    LPIPS,
    PatchDiscriminator,
    VGG16Features,
    adaptive_gan_weight,
    disc_layers_for_size,
    hinge_d_loss,
    hinge_g_loss,
    min_disc_input_size,
)

VGG_CONV_IDX = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(0)
    m = LPIPS()
    for lin in m.lins:  # random positive lin weights, like trained LPIPS (clamped >= 0)
        lin.model[1].weight.uniform_(0.0, 0.1)
    return m


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)


def _random_weight_files(tmp_path, model):
    """Save the model's weights in torchvision / official-lpips key layouts, both formats."""
    vgg = {f"features.{k}": v.clone() for k, v in model.net.features.state_dict().items()}
    lin = {f"lin{i}.model.1.weight": lin.model[1].weight.clone() for i, lin in enumerate(model.lins)}
    paths = {
        "st": (tmp_path / "vgg.safetensors", tmp_path / "lin.safetensors"),
        "pt": (tmp_path / "vgg.pth", tmp_path / "lin.pth"),
    }
    save_file(vgg, str(paths["st"][0]))
    save_file(lin, str(paths["st"][1]))
    # .pth variant: full torchvision checkpoint (classifier keys ignored) + "module." prefix on lin
    full_vgg = dict(vgg, **{"classifier.0.weight": torch.zeros(4, 4), "classifier.0.bias": torch.zeros(4)})
    torch.save(full_vgg, paths["pt"][0])
    torch.save({f"module.{k}": v for k, v in lin.items()}, paths["pt"][1])
    return paths, vgg, lin


def test_vgg_layout_and_taps():
    vgg = VGG16Features()
    keys = set(vgg.state_dict())
    assert keys == {f"features.{i}.{p}" for i in VGG_CONV_IDX for p in ("weight", "bias")}
    feats = vgg(torch.rand(1, 3, 32, 32))
    shapes = [tuple(f.shape) for f in feats]
    assert shapes == [(1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4), (1, 512, 2, 2)]
    assert all((f >= 0).all() for f in feats)  # ReLU taps


def test_lpips_identity_noise_and_frozen(lpips_model, images):
    x, noise = images
    d0 = lpips_model(x, x)
    assert d0.shape == (2,)
    assert torch.allclose(d0, torch.zeros(2), atol=1e-6)
    ds = [lpips_model(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.1, 0.4)]
    assert 0 < ds[0] < ds[1] < ds[2]
    assert all(not p.requires_grad for p in lpips_model.parameters())
    lpips_model.train()
    assert not lpips_model.training and not lpips_model.net.training
    # gradients flow to the input
    y = x.clone().requires_grad_(True)
    lpips_model(x + 0.1 * noise, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_from_pretrained_safetensors_and_torch_identical(tmp_path, lpips_model, images):
    paths, _, _ = _random_weight_files(tmp_path, lpips_model)
    x, noise = images
    y = (x + 0.2 * noise).clamp(0, 1)
    a = LPIPS.from_pretrained(*paths["st"])
    b = LPIPS.from_pretrained(*paths["pt"])
    da, db, ref = a(x, y), b(x, y), lpips_model(x, y)
    assert torch.equal(da, db)
    assert torch.allclose(da, ref, atol=1e-6)
    assert all(not p.requires_grad for p in b.parameters()) and not b.training


def test_from_pretrained_errors(tmp_path, lpips_model):
    paths, vgg, lin = _random_weight_files(tmp_path, lpips_model)
    bad = dict(vgg)
    bad["features.5.weight"] = torch.zeros(128, 64, 1, 1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad\.safetensors: key features\.5\.weight \(shape \(") as ei:
        LPIPS.from_pretrained(tmp_path / "bad.safetensors", paths["st"][1])
    assert "\n" not in str(ei.value)

    with pytest.raises(ValueError, match=r"nope\.pth.*not found"):
        LPIPS.from_pretrained(paths["st"][0], tmp_path / "nope.pth")

    torch.save({k: v for k, v in lin.items() if not k.startswith("lin3")}, tmp_path / "lin_missing.pt")
    with pytest.raises(ValueError, match=r"lin_missing\.pt: key lin3\.model\.1\.weight \(missing\)$"):
        LPIPS.from_pretrained(paths["st"][0], tmp_path / "lin_missing.pt")

    torch.save(dict(lin, extra=torch.zeros(1)), tmp_path / "lin_extra.pt")
    with pytest.raises(ValueError, match=r"key extra \(unexpected\)$"):
        LPIPS.from_pretrained(paths["st"][0], tmp_path / "lin_extra.pt")


class _NotATensor:
    pass


def test_from_pretrained_refuses_arbitrary_pickles(tmp_path, lpips_model):
    paths, _, _ = _random_weight_files(tmp_path, lpips_model)
    torch.save({"lin0.model.1.weight": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: cannot read weights"):
        LPIPS.from_pretrained(paths["st"][0], tmp_path / "evil.pt")


# ---------------------------------------------------------------- discriminator


def test_patch_discriminator_shapes():
    torch.manual_seed(0)
    assert disc_layers_for_size(32) == 2 and disc_layers_for_size(256) == 3 and disc_layers_for_size(16) == 1
    d = PatchDiscriminator(ndf=16, n_layers=disc_layers_for_size(32))
    assert d(torch.rand(1, 3, 32, 32)).shape == (1, 1, 6, 6)  # group norm: batch 1 ok in train mode
    d3 = PatchDiscriminator(ndf=8)  # default n_layers=3
    assert d3(torch.rand(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert d3(torch.rand(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    db = PatchDiscriminator(ndf=8, n_layers=2, norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in db.modules())
    assert db(torch.rand(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="needs inputs >= 24px"):
        d3(torch.rand(1, 3, 16, 16))
    assert min_disc_input_size(3) == 24
    d3(torch.rand(1, 3, 24, 24))  # exactly the minimum works
    with pytest.raises(ValueError):
        PatchDiscriminator(norm="layer")


def test_hinge_losses_values():
    real = torch.tensor([2.0, 0.0, -1.0])
    fake = torch.tensor([-2.0, 0.5])
    # real: relu(1 - r) = [0, 1, 2] -> 1 ; fake: relu(1 + f) = [0, 1.5] -> 0.75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (1.0 + 0.75))
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)


def test_adaptive_gan_weight_balances_the_two_gradients():
    torch.manual_seed(0)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 8, 8)
    out = last(h)
    nll = (out - torch.rand_like(out)).abs().mean()
    g = -out.mean() * 3.0
    w = adaptive_gan_weight(nll, g, last.weight)
    gn = torch.autograd.grad(nll, last.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last.weight, retain_graph=True)[0].norm()
    assert w.item() == pytest.approx((gn / (gg + 1e-4)).item(), rel=1e-5)
    assert not w.requires_grad
    assert adaptive_gan_weight(nll, g * 1e-12, last.weight, max=10.0).item() == 10.0
    (nll + w * g).backward()  # graph retained, still usable


def test_discriminator_learns_real_vs_noise():
    torch.manual_seed(0)
    d = PatchDiscriminator(ndf=16, n_layers=2)
    opt = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.9))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")

    def real_batch():  # smooth gradient images with random orientation/colour
        a = torch.rand(4, 3, 1, 1)
        b = torch.rand(4, 3, 1, 1)
        return (a * xx + (1 - a) * yy) * b + (1 - b) * 0.5

    losses = []
    for _ in range(30):
        loss = hinge_d_loss(d(real_batch()), d(torch.rand(4, 3, 32, 32)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert end < 0.5 * start, losses


def test_from_pretrained_corrupt_file(tmp_path, lpips_model):
    paths, _, _ = _random_weight_files(tmp_path, lpips_model)
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    for name in ("junk.safetensors", "junk.pth"):
        with pytest.raises(ValueError, match=rf"{name}: cannot read weights") as ei:
            LPIPS.from_pretrained(tmp_path / name, paths["st"][1])
        assert "\n" not in str(ei.value)
