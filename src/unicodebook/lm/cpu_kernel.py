"""Compiled fp32 kernels for token-by-token decoding on a CPU: a streaming few-row linear layer
and, built on it, a whole Llama-family decoder layer (used by :mod:`.cpu_decoder`).

Decoding one token reads every weight of the LLM once for one to a few dozen rows, so the
step is bound by how fast the weights stream from memory. The BLAS paths PyTorch offers for
such shapes stream them at 30–70 % of a plain read on the 2-core machines this project runs on
(bench/README.md); ``csrc/decode.c`` (AVX2 or AVX-512 with FMA, OpenMP) reaches 80–90 %.

The C file is compiled on first use with the system C compiler into the user cache
(``$UNICODEBOOK_CACHE`` or ``~/.cache/unicodebook``), written atomically, and loaded with
ctypes; it links against the OpenMP runtime PyTorch has already loaded, so both share one
thread pool. Where that cannot happen — no compiler, not x86-64 with AVX2, ``UNICODEBOOK_CPU_KERNEL=0``
— :func:`small_linear_kernel` returns ``None`` and decoding keeps PyTorch's kernels; the maths
is the same either way (up to fp32 summation order).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-lm"]
ISA_FLAGS = {"avx2": [], "avx512": ["-mavx512f", "-DUB_AVX512"]}  # the linear kernel's vector width


def cache_dir() -> Path:
    root = (
        os.environ.get("UNICODEBOOK_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unicodebook"
    )
    return Path(root) / "kernels"


def isa() -> str:
    """``avx512`` where PyTorch's own dispatch uses AVX-512, else ``avx2``;
    ``UNICODEBOOK_CPU_KERNEL=avx2`` keeps the AVX2 build on any CPU."""
    if os.environ.get("UNICODEBOOK_CPU_KERNEL", "") == "avx2":
        return "avx2"
    return "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2"


def _unavailable_reason() -> str | None:
    if os.environ.get("UNICODEBOOK_CPU_KERNEL", "1") == "0":
        return "switched off by UNICODEBOOK_CPU_KERNEL=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 ({torch.backends.cpu.get_cpu_capability()})"
    return None


def build(out_dir: Path | None = None, compiler: str | None = None, target: str | None = None) -> Path:
    """Compile ``csrc/decode.c`` (once per source, compiler and ``target``: ``avx2`` or
    ``avx512``, by default :func:`isa`) and return the library path.

    Raises ``RuntimeError`` with the compiler's message when it cannot be built.
    """
    cc = compiler or os.environ.get("CC") or "cc"
    target = target or isa()
    flags = FLAGS + ISA_FLAGS[target]
    tag = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"decode-{target}-{tag}.so"
    if lib.exists():  # built before: no compiler needed now
        return lib
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler: {cc!r} not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if res.returncode != 0:
            lines = res.stderr.strip().splitlines()
            first_error = next(
                (ln for ln in lines if "error" in ln), lines[-1] if lines else f"exit status {res.returncode}"
            )
            raise RuntimeError(f"{cc} failed: {first_error}")
        os.replace(tmp, lib)  # atomic: a concurrent build or an interrupted one never leaves half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load(path: Path):
    """The built library at ``path`` with its two functions' signatures declared."""
    lib = ctypes.CDLL(str(path))
    lib.small_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.decode_layer.argtypes = [ctypes.c_void_p] * 7 + [
        ctypes.c_long,
        ctypes.c_void_p,
        ctypes.c_float,
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    lib.small_linear.restype = lib.decode_layer.restype = None
    return lib


@lru_cache(maxsize=1)
def _load():
    reason = _unavailable_reason()
    if reason is None:
        try:
            return load(build())
        except (OSError, RuntimeError) as e:
            reason = str(e)
    log.info("decoding uses PyTorch's linear kernels: %s", reason)
    return None


def small_linear_kernel():
    """The compiled linear kernel, or ``None`` where it is unavailable (see the module docstring)."""
    lib = _load()
    return None if lib is None else lib.small_linear


def decode_layer_kernel():
    """The compiled decoder layer (``decode_layer`` in ``csrc/decode.c``), or ``None``."""
    lib = _load()
    return None if lib is None else lib.decode_layer


def unsupported(x: Tensor, weight: Tensor, bias: Tensor | None) -> str | None:
    """Why the kernel cannot compute ``F.linear(x, weight, bias)``, or ``None`` when it can.
    Callers with a fallback (decoding) ask this; :func:`small_linear` raises it."""
    if x.shape[-1] != weight.shape[-1]:
        return f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match"
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return "fp32 CPU tensors only"
    if not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return "weight and bias must be contiguous"
    return None


def small_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, kernel=None) -> Tensor:
    """``F.linear(x, weight, bias)`` for fp32 CPU tensors through the streaming kernel.

    x (..., K), weight (O, K) contiguous, bias (O,) contiguous or None → (..., O). Raises
    ``ValueError`` for what :func:`unsupported` names, ``RuntimeError`` without the kernel.
    """
    kernel = kernel or small_linear_kernel()
    if kernel is None:
        raise RuntimeError("the streaming CPU kernel is not available here")
    reason = unsupported(x, weight, bias)
    if reason is not None:
        raise ValueError(f"small_linear: {reason}")
    return run_kernel(kernel, x, weight, bias)


def run_kernel(kernel, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The call itself, for callers that have checked :func:`unsupported` already (decoding's hot path)."""
    out_features, k = weight.shape
    rows = x.numel() // k
    xc = x.reshape(rows, k).contiguous()
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32)
    kernel(
        weight.data_ptr(),
        xc.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        y.data_ptr(),
        rows,
        out_features,
        k,
        torch.get_num_threads(),
    )
    return y
