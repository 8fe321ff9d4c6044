"""Which device inference runs on (``auto`` is the GPU when there is one, else the CPU), and what it
computes natively."""

from __future__ import annotations

import torch

from ..errors import UnicodebookError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → a usable device, or one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UnicodebookError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UnicodebookError(f"device '{name}' asked for, but this machine has no CUDA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UnicodebookError(
                f"device '{name}' asked for, but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif dev.type != "cpu":
        raise UnicodebookError(f"device '{name}' is not supported (use auto, cpu, cuda or cuda:N)")
    return dev


def onednn_bf16(device: torch.device) -> bool:
    """Whether oneDNN takes bf16 matmuls on ``device``'s fast path: a CUDA GPU with bf16, a CPU
    with AVX512-BF16/AMX — and also a plain AVX-512 CPU, where oneDNN converts (its large
    matmuls still gain; the code search's bf16 prefilter uses this)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 (not emulated), a CPU with
    AVX512-BF16 or AMX instructions. oneDNN also reports bf16 on a plain AVX-512 CPU (an Intel
    Xeon without AVX512-BF16), where the tiny preset's stage II step ran 2.5× slower under bf16
    autocast than in fp32 (1.38 against 0.53 s, measured): there, and wherever the flags cannot be
    read but oneDNN says no, this is False."""
    if not onednn_bf16(device):
        return False
    if device.type != "cpu":
        return True
    flags = cpu_flags()
    return flags is None or bool(flags & BF16_FLAGS)
