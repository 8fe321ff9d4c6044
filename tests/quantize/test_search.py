import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unicodebook.quantize.search import brute_force_nearest, nearest_code


@pytest.mark.parametrize("n,v,d,chunk", [(257, 1000, 64, 128), (64, 33, 16, 7), (100, 512, 128, 8192)])
def test_nearest_code_equals_brute_force(n, v, d, chunk):
    g = torch.Generator().manual_seed(n + v)
    z, cb = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    idx, dist = nearest_code(z, cb, chunk_size=chunk)
    assert torch.equal(idx, brute_force_nearest(z, cb))
    torch.testing.assert_close(dist, (z - cb[idx]).pow(2).sum(1), rtol=1e-4, atol=1e-4)


def test_nearest_code_accumulates_in_fp32_for_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(200, 64, generator=g), torch.randn(300, 64, generator=g)
    idx, _ = nearest_code(z.bfloat16(), cb.bfloat16(), chunk_size=64)
    ref = brute_force_nearest(z.bfloat16().float(), cb.bfloat16().float())
    assert (idx == ref).float().mean() > 0.99


class _Sizes(TorchDispatchMode):
    """Records the number of elements of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_llm_scale_search_never_materialises_n_by_v_by_d():
    """V=32000, d=4096 (LLaMA) on the meta device: no temporary beyond N×chunk."""
    n, v, d, chunk = 1024, 32000, 4096, 4096
    z = torch.empty(n, d, device="meta")
    cb = torch.empty(v, d, device="meta")
    with _Sizes() as probe:
        idx, dist = nearest_code(z, cb, chunk_size=chunk)
    assert idx.shape == (n,) and dist.shape == (n,)
    assert probe.largest <= max(n * chunk, chunk * d, n * d)
    assert probe.largest < n * v  # not even the N×V score matrix
