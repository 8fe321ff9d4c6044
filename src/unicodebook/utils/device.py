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
            raise UnicodebookError(f"device '{name}' asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise UnicodebookError(f"device '{name}' is not supported (use auto, cpu, cuda or cuda:N)")
    return dev


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a CUDA GPU with bf16 (not emulated),
    a CPU on oneDNN's AVX512-BF16/AMX path. Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
