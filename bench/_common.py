"""Shared pieces of the benchmarks: the machine, peak-memory probes, reference rates, tables.

Benchmarks are scripts run by hand (``python bench/NAME.py``), never timed tests. Each compares
against a baseline measured in the same run and prints a Markdown table; ``--json`` writes the
raw figures too.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine(device: str = "cpu") -> str:
    """One line naming the hardware the figures were measured on."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str = "cpu", repeat: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class PeakMemory:
    """Extra peak memory (bytes) of the code run inside the block, above what was live before it.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (``VmHWM``, reset
    through ``/proc/self/clear_refs``); run it in a fresh process started with
    ``MALLOC_MMAP_THRESHOLD_`` set (see :func:`worker_env`) so freed blocks leave the RSS at once.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
            self.start = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _status_kb("VmHWM") * 1024 - self.start


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def worker_env() -> dict:
    """Environment for a measuring child process: big blocks are mmapped and returned on free."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def read_bandwidth(device: str = "cpu", mbytes: int = 1024, repeat: int = 5) -> float:
    """GB/s of reading a large fp32 buffer once (a sum), the bound for batch-1 decoding."""
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    sec = timeit(lambda: x.sum(), device, repeat=repeat, warmup=2)
    return x.numel() * 4 / sec / 1e9


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))
