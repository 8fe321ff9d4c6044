"""Fixtures of the compiled-kernel tests (lm/cpu_kernel.py, lm/cpu_decoder.py)."""

from __future__ import annotations

import pytest

from unicodebook.lm import cpu_kernel


@pytest.fixture
def own_kernel_cache(tmp_path_factory, monkeypatch):
    """Kernels built into this session's temporary cache, and loaded afresh by each test."""
    monkeypatch.setenv("UNICODEBOOK_CACHE", str(tmp_path_factory.getbasetemp() / "unicodebook-cache"))
    cpu_kernel._load.cache_clear()
    yield
    cpu_kernel._load.cache_clear()
