"""The collective operations the library's own modules call under ``torch.distributed``.

Each is a no-op (or the identity) in a single process, so a module can call it
unconditionally. The training loop's own synchronisation goes through
:class:`~unicodebook.train.engine.Engine`, which builds on these.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import Tensor


def initialised() -> bool:
    """Whether a process group is running (torchrun, accelerate launch)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialised() else 1


def launched_as_main() -> bool:
    """Whether this process is rank 0 of its launch, read from the launcher's ``RANK`` (so it
    can be asked before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def all_reduce_(*tensors: Tensor) -> None:
    """Sum each tensor over the ranks, in place."""
    if initialised():
        for t in tensors:
            dist.all_reduce(t)


def mean_with_grad(t: Tensor) -> Tensor:
    """The mean of ``t`` over the ranks, differentiable (each rank's gradient flows back)."""
    world = world_size()
    return t if world == 1 else dist_nn.all_reduce(t) / world


def broadcast_(t: Tensor) -> None:
    """Overwrite ``t`` with rank 0's, in place."""
    if initialised():
        dist.broadcast(t, src=0)


def gather_rows(t: Tensor) -> Tensor:
    """Concatenate ``t`` (N, ...) of every rank along dim 0, rank 0 first (ranks' N must agree)."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
