"""The streaming CPU kernel for decoding's few-row linear layers (lm/cpu_kernel.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from unicodebook.lm import cpu_kernel
from unicodebook.lm.cpu_kernel import build, small_linear, small_linear_kernel

needs_kernel = pytest.mark.skipif(
    shutil.which("cc") is None or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="needs a C compiler and an AVX2 CPU",
)

pytestmark = pytest.mark.usefixtures("own_kernel_cache")


TARGETS = ["avx2"] + (["avx512"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])


@pytest.fixture(scope="module", params=TARGETS)
def kernel(request, tmp_path_factory):
    """The linear kernel of each build this CPU runs (AVX2, and AVX-512 where it has it)."""
    return cpu_kernel.load(build(tmp_path_factory.mktemp("kernels"), target=request.param)).small_linear


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 16, 17])
@pytest.mark.parametrize("out_features,in_features", [(96, 48), (13, 21), (5, 3), (8, 1024), (9, 40)])
def test_kernel_computes_f_linear(kernel, rows, out_features, in_features):
    """Every tile and tail: output rows not a multiple of 4, K not a multiple of the vector
    width, 1–17 rows (every remainder of both builds' row tiles)."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g)
    x = torch.randn(rows, 1, in_features, generator=g)
    for bias in (b, None):
        got = small_linear(x, w, bias, kernel)
        assert got.shape == (rows, 1, out_features)
        assert_fp32_dot_product(got, x, w, bias)
    # a strided input (a transposed view) is read correctly
    xt = torch.randn(in_features, rows, generator=g).t()
    assert_fp32_dot_product(small_linear(xt, w, b, kernel), xt, w, b)


def assert_fp32_dot_product(got, x, w, b):
    """Within fp32's worst-case summation error of the exact product, whatever the order:
    |err| ≤ (K + 1)·u·(|x|·|w|ᵀ + |b|), u = 2⁻²⁴."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    err = (got.double() - exact).abs()
    assert bool((err <= (w.shape[1] + 1) * 2.0**-24 * scale + 1e-30).all()), float((err / scale).max())


@needs_kernel
def test_the_library_is_built_once_and_atomically(tmp_path):
    lib = build(tmp_path)
    assert lib.exists() and lib.parent == tmp_path
    mtime = lib.stat().st_mtime_ns
    assert build(tmp_path) == lib and lib.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary file left behind


@needs_kernel
def test_the_build_follows_the_cpu_and_can_be_held_to_avx2(tmp_path, monkeypatch):
    expected = "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2"
    assert cpu_kernel.isa() == expected
    assert build(tmp_path).name.startswith(f"decode-{expected}-")
    monkeypatch.setenv("UNICODEBOOK_CPU_KERNEL", "avx2")
    assert build(tmp_path).name.startswith("decode-avx2-")


def test_without_a_compiler_decoding_keeps_pytorchs_kernels(tmp_path, monkeypatch, caplog):
    with pytest.raises(RuntimeError, match="no C compiler: 'no-such-cc' not found"):
        build(tmp_path, compiler="no-such-cc")
    with pytest.raises(RuntimeError, match="^false failed: exit status 1$"):
        build(tmp_path, compiler="false")  # a compiler that fails without a word
    broken = tmp_path / "bin" / "broken-cc"
    broken.parent.mkdir()
    broken.write_text(
        "#!/bin/sh\necho 'In file included from x.c:1:' >&2\necho 'x.c:9: error: no AVX2 here' >&2\n"
        "echo 'compilation terminated.' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"broken-cc failed: x\.c:9: error: no AVX2 here$"):
        build(out, compiler=str(broken))  # the compiler's first error line, not its last word
    assert list(out.iterdir()) == []  # a failed build leaves nothing behind
    monkeypatch.setenv("CC", "no-such-cc")
    with caplog.at_level("INFO", logger="unicodebook.lm.cpu_kernel"):
        assert small_linear_kernel() is None
    assert "decoding uses PyTorch's linear kernels: no C compiler" in caplog.text


def test_an_unwritable_cache_falls_back_with_the_reason(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("UNICODEBOOK_CACHE", str(blocker))  # the kernels folder cannot be made under a file
    with caplog.at_level("INFO", logger="unicodebook.lm.cpu_kernel"):
        assert small_linear_kernel() is None
    assert "decoding uses PyTorch's linear kernels" in caplog.text


def test_the_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("UNICODEBOOK_CPU_KERNEL", "0")
    assert small_linear_kernel() is None


@needs_kernel
def test_small_linear_refuses_what_it_cannot_compute():
    kernel = small_linear_kernel()
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"x \(2, 15\) and weight \(8, 16\) do not match"):
        small_linear(torch.randn(2, 15), w, None, kernel)
    with pytest.raises(ValueError, match="fp32 CPU tensors only"):
        small_linear(torch.randn(2, 16, dtype=torch.float64), w.double(), None, kernel)
    with pytest.raises(ValueError, match="must be contiguous"):
        small_linear(torch.randn(2, 16), torch.randn(16, 8).t(), None, kernel)


@needs_kernel
def test_decoding_with_the_kernel_emits_the_codes_pytorchs_kernels_emit(model_run, monkeypatch):
    from unicodebook.lm import model as lm_model
    from unicodebook.lm.model import decoding_kernels, load_model

    model = load_model(model_run)
    # the linear path of transformers' own step (any LLM the compiled decoder does not take)
    monkeypatch.setattr(lm_model, "cpu_decoder_unsupported", lambda *a: "not this test")
    calls = []
    real = lm_model.run_kernel
    monkeypatch.setattr(lm_model, "run_kernel", lambda *a: calls.append(1) or real(*a))
    prompts = ["a red circle", "a blue square on the left of a green triangle"]
    with_kernel = model.generate_codes(prompts, 3.0, 0.0, 0)
    assert len(calls) > 0  # the kernel did the decoding's linear layers
    monkeypatch.setattr(lm_model, "small_linear_kernel", lambda: None)
    assert torch.equal(model.generate_codes(prompts, 3.0, 0.0, 0), with_kernel)
    # under autograd the kernel is never used (it has no backward)
    calls.clear()
    monkeypatch.setattr(lm_model, "small_linear_kernel", cpu_kernel.small_linear_kernel)
    lin = torch.nn.Linear(16, 8)
    with decoding_kernels(lin):
        lin(torch.randn(2, 16)).sum().backward()
    assert calls == [] and lin.weight.grad is not None
    # what the kernel cannot take (a non-contiguous bias, fp64) falls back instead of failing
    lin = torch.nn.Linear(16, 8)
    lin.bias = torch.nn.Parameter(torch.randn(8, 2)[:, 0])
    assert not lin.bias.is_contiguous()
    x = torch.randn(2, 16)
    with torch.no_grad():
        ref = lin(x)
        with decoding_kernels(lin):
            got = lin(x)
        lin64 = torch.nn.Linear(16, 8).double()
        with decoding_kernels(lin64):
            got64 = lin64(x.double())
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got64, torch.nn.functional.linear(x.double(), lin64.weight, lin64.bias))
    assert calls == []


@needs_kernel
def test_a_built_library_is_used_without_a_compiler(tmp_path, monkeypatch):
    lib = build(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # cc is no longer found
    assert build(tmp_path) == lib
    with pytest.raises(RuntimeError, match="no C compiler: 'cc' not found"):
        build(tmp_path / "fresh")
