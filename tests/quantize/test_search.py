import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unicodebook.quantize.codebook import CodebookRule, UnifiedCodebook
from unicodebook.quantize.search import SearchIndex, nearest_code, nearest_code_certified


def brute_force_nearest(z, codebook):
    """The reference: every exact distance, in float64, at once."""
    return torch.cdist(z.double(), codebook.double()).argmin(dim=1)


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


# ------------------------------------------------------------------ certified bf16 prefilter


@pytest.mark.parametrize(
    "n,v,d,chunk,scale", [(257, 1000, 64, 128, 1.0), (64, 33, 16, 7, 1e-3), (300, 2048, 1024, 512, 30.0)]
)
def test_certified_bf16_search_returns_the_exact_nearest_code(n, v, d, chunk, scale):
    g = torch.Generator().manual_seed(n + v)
    z, cb = scale * torch.randn(n, d, generator=g), scale * torch.randn(v, d, generator=g)
    idx, dist = nearest_code_certified(z, SearchIndex.build(cb, bf16=True), chunk_size=chunk)
    assert torch.equal(idx, brute_force_nearest(z, cb))
    torch.testing.assert_close(dist, (z - cb[idx]).pow(2).sum(1), rtol=1e-4, atol=1e-4 * scale**2)


def test_certified_search_resolves_what_bf16_cannot_tell_apart():
    """Codes 3% apart: bf16 (relative error 0.4% per element) confuses them; fp32 rescoring decides."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 256, generator=g)
    cb = base + 3e-2 * torch.randn(500, 256, generator=g)
    z = base + 3e-2 * torch.randn(200, 256, generator=g)
    lossy = (
        (z.bfloat16().float() @ cb.bfloat16().float().t()).mul(-2).add(cb.bfloat16().float().pow(2).sum(1)).argmin(1)
    )
    exact = brute_force_nearest(z, cb)
    assert torch.equal(nearest_code(z, cb)[0], exact)  # fp32 resolves them
    assert (lossy != exact).float().mean() > 0.1  # bf16 alone gets many of them wrong
    idx, _ = nearest_code_certified(z, SearchIndex.build(cb, bf16=True), chunk_size=128)
    assert torch.equal(idx, exact)


def test_certified_search_breaks_ties_like_argmin_and_survives_non_finite_queries():
    cb = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    cb = torch.cat([cb, cb])  # every code twice: the lower index must win
    z = torch.cat([cb[:10] + 1e-3, torch.full((1, 32), float("nan"))])
    idx, _ = nearest_code_certified(z, SearchIndex.build(cb, bf16=True), chunk_size=16)
    assert torch.equal(idx[:10], torch.arange(10))
    assert 0 <= int(idx[10]) < 128


def test_certified_search_keeps_memory_per_block():
    n, v, d, chunk = 512, 8192, 256, 1024
    g = torch.Generator().manual_seed(3)
    z, cb = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    index = SearchIndex.build(cb, bf16=True)
    with _Sizes() as probe:
        nearest_code_certified(z, index, chunk_size=chunk, rescore_block=256)
    assert probe.largest <= max(n * chunk, n * d, 256 * d)


def test_codebook_search_follows_in_place_updates():
    """The cached bf16 index is rebuilt when the codebook changes; answers equal the fp32 search."""
    g = torch.Generator().manual_seed(4)
    cb = UnifiedCodebook(torch.arange(300), 1024, CodebookRule(mode="dual", search="bf16", restart_every=0))
    cb.embed.copy_(torch.randn(300, 1024, generator=g))
    feats = torch.randn(400, 1024, generator=g)
    before = cb.search(feats)[0]
    assert torch.equal(before, nearest_code(feats, cb.embed)[0])
    cb.embed[:] = feats[:300]  # an in-place write, as the EMA update and restarts do
    after = cb.search(feats)[0]
    assert torch.equal(after[:300], torch.arange(300))
    assert torch.equal(after, nearest_code(feats, cb.embed)[0])


def test_unknown_search_mode_is_refused():
    with pytest.raises(ValueError, match="codebook search must be one of"):
        CodebookRule(search="int8")
