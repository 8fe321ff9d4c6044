"""Tests for unicodebook.eval.metrics."""

import math

import numpy as np
import pytest
import torch

from unicodebook.eval.metrics import CodeUsage, psnr, ssim

# ---------------------------------------------------------------- numpy reference SSIM


def _np_gauss(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(r**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def _np_filter_valid(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    k = w.shape[0]
    h, wd = img.shape
    out = np.empty((h - k + 1, wd - k + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = np.sum(img[i : i + k, j : j + k] * w)
    return out


def _np_ssim(x: np.ndarray, y: np.ndarray, data_range=1.0, size=11, sigma=1.5) -> float:
    """SSIM of two (C, H, W) images: Gaussian window, 'valid', mean over positions then channels."""
    w = _np_gauss(size, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for a, b in zip(x, y):
        mx, my = _np_filter_valid(a, w), _np_filter_valid(b, w)
        sxx = _np_filter_valid(a * a, w) - mx**2
        syy = _np_filter_valid(b * b, w) - my**2
        sxy = _np_filter_valid(a * b, w) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        vals.append(m.mean())
    return float(np.mean(vals))


@pytest.fixture
def imgs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1)
    return x, y


def test_ssim_matches_numpy_reference(imgs):
    x, y = imgs
    got = ssim(x.double(), y.double())
    ref = [_np_ssim(a.numpy(), b.numpy()) for a, b in zip(x.double(), y.double())]
    assert got.shape == (2,)
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(ssim(x, y).double(), got, atol=1e-4)  # float32 path


def test_ssim_data_range_and_small_window():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64) * 255
    y = (x + 20 * torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64)).clamp(0, 255)
    got = ssim(x, y, data_range=255.0, win_size=7)
    ref = _np_ssim(x[0].numpy(), y[0].numpy(), data_range=255.0, size=7)
    assert got.item() == pytest.approx(ref, abs=1e-10)
    # image smaller than the window: window shrinks to the largest odd size that fits
    small = ssim(x[..., :8, :8], y[..., :8, :8], data_range=255.0)
    assert small.item() == pytest.approx(_np_ssim(x[0, :, :8, :8].numpy(), y[0, :, :8, :8].numpy(), 255.0, 7))


def test_ssim_properties(imgs):
    x, _ = imgs
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=g)
    vals = [ssim(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.1, 0.3)]
    assert 1.0 > vals[0] > vals[1] > vals[2]


def test_psnr_known_value():
    x = torch.full((3, 3, 8, 8), 0.5)
    y = x.clone()
    y[0] += 0.1  # mse 0.01 -> 20 dB
    y[1] += 0.01  # mse 1e-4 -> 40 dB
    p = psnr(x, y)
    assert p.shape == (3,)
    assert p[0].item() == pytest.approx(20.0, abs=1e-4)
    assert p[1].item() == pytest.approx(40.0, abs=1e-3)
    assert math.isinf(p[2].item())
    assert psnr(x * 255, y * 255, data_range=255.0)[0].item() == pytest.approx(20.0, abs=1e-4)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(2, 3, 8, 8))


# ---------------------------------------------------------------- codebook stats


def codebook_stats(codes, num_codes: int) -> dict:
    """The statistics of one batch of codes, (N,) or (N, D), in one update."""
    return CodeUsage(num_codes, 1 if codes.dim() == 1 else codes.shape[1]).update(codes).stats()


def test_codebook_stats_1d():
    codes = torch.tensor([0, 1, 2, 3] * 5)
    s = codebook_stats(codes, num_codes=16)
    assert s["usage"] == [0.25]
    assert s["perplexity"][0] == pytest.approx(4.0)
    assert s["usage_all"] == 0.25
    assert s["perplexity_all"] == pytest.approx(4.0)
    # a single code -> perplexity 1
    assert codebook_stats(torch.zeros(10, dtype=torch.long), 8)["perplexity"] == [pytest.approx(1.0)]


def test_codebook_stats_2d_union():
    layer0 = torch.tensor([0, 1, 0, 1])
    layer1 = torch.tensor([2, 3, 4, 5])
    s = codebook_stats(torch.stack([layer0, layer1], dim=1), num_codes=10)
    assert s["usage"] == [0.2, 0.4]
    assert s["perplexity"] == [pytest.approx(2.0), pytest.approx(4.0)]
    assert s["usage_all"] == pytest.approx(0.6)
    # pooled: 0,1 twice each, 2..5 once each over 8 codes
    p = np.array([2, 2, 1, 1, 1, 1]) / 8
    assert s["perplexity_all"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))


def test_code_usage_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 50, (1000, 3), generator=g)
    acc = CodeUsage(num_codes=64, depth=3)
    for chunk in codes.view(10, 10, 10, 3):  # (..., D) batches
        acc.update(chunk)
    assert acc.stats() == codebook_stats(codes, 64)
    assert int(acc.counts.sum()) == 3000
    acc.reset()
    assert acc.stats()["usage_all"] == 0.0


def test_code_usage_depth1_any_shape_and_range_check():
    acc = CodeUsage(8).update(torch.tensor([[0, 1], [2, 3]]))
    assert acc.stats()["usage"] == [0.5]
    with pytest.raises(ValueError):
        acc.update(torch.tensor([8]))
    with pytest.raises(ValueError):
        acc.update(torch.tensor([-1]))
    with pytest.raises(ValueError):
        CodeUsage(8, depth=2).update(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        acc.update(torch.zeros(3))  # float codes
