"""The distributed engine both training stages run on: Hugging Face Accelerate.

One process or many — DDP, FSDP or DeepSpeed, as the user's ``accelerate config`` says — the
recipes see the same small surface:

* ``prepare(model, optimizer)`` wraps them for the chosen backend;
* ``shard(indices)`` gives this rank its contiguous slice of a *global* batch, so a run on
  W ranks trains on exactly the batches a single process would (gradients are averaged by the
  backend; the codebook's statistics are all-reduced by the quantizer itself);
* ``backward``, ``clip_and_check`` (the non-finite guard), ``state_dict``/``optimizer_state``
  (full, unsharded tensors on the main process for checkpoints), ``barrier``.

Launch: ``torchrun --nproc_per_node N -m unicodebook …`` or ``accelerate launch …``; on a
machine without CUDA the processes form a gloo group on the CPU. Mixed precision is the run
config's (``precision``), applied by the recipes with ``torch.autocast``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading

import torch
import torch.distributed as dist

from ..errors import TrainingStopped, UnicodebookError
from ..utils.device import native_bf16
from ..utils.distributed import gather_rows

log = logging.getLogger("unicodebook.train")


class NonFiniteError(UnicodebookError):
    """Too many non-finite steps in a row: the run stops, its last checkpoint intact."""


def backend_asked_for() -> str | None:
    """The sharding backend ``accelerate launch`` was configured with (its environment), if any."""
    for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(env, "false").lower() == "true":
            return name
    return None


class Engine:
    """This process's place in the run, and the backend's wrappers."""

    def __init__(self, find_unused_parameters: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        ddp = DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=find_unused_parameters)
        # without CUDA, Accelerate must be told it is on the CPU to form a gloo group under torchrun
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.device = self.acc.device
        self.is_main = self.acc.is_main_process
        self.native_bf16 = native_bf16(self.device)  # asked once: autocast() runs every step
        self._warned_bf16 = False
        asked = backend_asked_for()
        if asked and asked.upper() != self.acc.distributed_type.name and self.is_main:
            # Accelerate only turns these on for GPU (and similar) processes; on the CPU it
            # silently falls back to DDP or one process: say so rather than leave it unnoticed
            kind = self.acc.distributed_type.name
            kind = {"NO": "one process", "MULTI_CPU": f"DDP over {self.world} CPU processes"}.get(kind, kind)
            log.warning(
                "the accelerate config asks for %s, which Accelerate runs on GPUs only; this run uses %s", asked, kind
            )

    # ---------------------------------------------------------------- data
    def local_batch_size(self, global_batch: int) -> int:
        if global_batch % self.world:
            raise UnicodebookError(f"batch_size {global_batch} does not split evenly over {self.world} processes")
        return global_batch // self.world

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of a global batch (rank 0 first)."""
        n = self.local_batch_size(len(items))
        return items[self.rank * n : (self.rank + 1) * n]

    # ---------------------------------------------------------------- precision
    def autocast(self, precision: str):
        """``torch.autocast`` for a run's ``precision`` (fp32 / bf16 / auto) on this device."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.uses_bf16(precision))

    def uses_bf16(self, precision: str) -> bool:
        """Whether ``precision`` autocasts to bf16 here. ``auto`` does only where the device has
        native bf16 kernels; an explicit ``bf16`` on a CPU without them is kept, with one warning:
        emulated bf16 matmuls run several times slower than fp32 (8× on an AVX2 CPU, measured)."""
        if precision == "auto":
            return self.native_bf16
        if precision == "bf16" and not self.native_bf16 and not self._warned_bf16:
            self._warned_bf16 = True
            if self.is_main:
                log.warning(
                    "precision bf16 on a %s without native bf16 kernels: expect it to be several times "
                    "slower than fp32 (precision=auto picks fp32 here)",
                    self.device.type.upper(),
                )
        return precision == "bf16"

    # ---------------------------------------------------------------- model
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        return self.acc.prepare(model, optimizer)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.acc.unwrap_model(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def clip_and_check(self, loss: torch.Tensor, params: list[torch.nn.Parameter], max_norm: float) -> str | None:
        """Clip gradients (``max_norm`` > 0) and say why this step must be skipped, if it must:
        a non-finite loss on any rank or a non-finite gradient norm. Every rank agrees."""
        norm = self.acc.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        bad = torch.tensor(
            [
                0.0 if torch.isfinite(loss.detach()).all() else 1.0,
                0.0 if torch.isfinite(torch.as_tensor(norm)).all() else 1.0,
            ],
            device=self.device,
        )
        if self.world > 1:
            dist.all_reduce(bad)
        if bad[0] > 0:
            return "non-finite loss"
        if bad[1] > 0:
            return "non-finite gradient"
        return None

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full (unsharded) state dict of a prepared model, on the main process."""
        return self.acc.get_state_dict(model)

    @property
    def shards_parameters(self) -> bool:
        """FSDP: each rank holds a shard of every parameter, so the module can only run inside
        the wrapped model's forward, and state dicts must be gathered."""
        return self.acc.distributed_type.name == "FSDP"

    def optimizer_state(self, model: torch.nn.Module, optimizer) -> dict:
        """The full optimizer state in the single-process layout: parameters numbered in the
        order the optimizer was built with. Under FSDP it is gathered to the main process (the
        other ranks get ``{}``), so a checkpoint resumes under any backend or world size."""
        if not self.shards_parameters:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return by_index(full) if full.get("param_groups") else {}

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, state: dict, names: list[str]) -> None:
        """Load a single-process-layout state (see :meth:`optimizer_state`) into a *prepared*
        optimizer. ``names``: the parameters' names in the order the optimizer was built with."""
        if not self.shards_parameters:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            model, optimizer, by_name(state, names), options=StateDictOptions(full_state_dict=True)
        )

    # ---------------------------------------------------------------- sync
    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(…) from every rank → (world, …), on every rank."""
        return gather_rows(t[None])

    @torch.no_grad()
    def max_diff_from_main(self, *tensors: torch.Tensor) -> float:
        """Largest |difference| between this process's tensors and the main process's, over
        all ranks (0.0: every rank holds the same values)."""
        worst = torch.zeros((), dtype=torch.float64, device=self.device)
        for t in tensors:
            ref = t.detach().clone()
            dist.broadcast(ref, src=0)
            worst = torch.maximum(worst, (t.detach() - ref).abs().max().double())
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return float(worst)

    def mean_over_ranks(self, value: torch.Tensor | float) -> float:
        """The mean over ranks of a scalar (for logging)."""
        return self.sum(float(value.detach()) if torch.is_tensor(value) else float(value)) / self.world

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)


def by_index(state: dict) -> dict:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's layout) →
    keyed by position in the optimizer's parameter order (``Optimizer.state_dict()``'s)."""
    ids = {name: i for i, name in enumerate(n for group in state["param_groups"] for n in group["params"])}
    return {
        "state": {ids[name]: st for name, st in state["state"].items()},
        "param_groups": [{**group, "params": [ids[n] for n in group["params"]]} for group in state["param_groups"]],
    }


def param_names(model: torch.nn.Module, optimizer) -> list[str]:
    """The names of ``optimizer``'s parameters in its own order (its groups', which need not be
    ``named_parameters()``'s: Muon puts the matrices first): the ``names`` :func:`by_name` takes."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def by_name(state: dict, names: list[str]) -> dict:
    """The inverse of :func:`by_index`; ``names[i]`` is the name of parameter ``i``."""
    return {
        "state": {names[i]: st for i, st in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }


class NonFiniteGuard:
    """Counts skipped steps; ``limit`` in a row raise :class:`NonFiniteError`, naming the run's
    last checkpoint."""

    def __init__(self, limit: int, stage: str, run):
        self.limit, self.stage, self.run = limit, stage, run
        self.in_row = self.total = 0

    def record(self, why: str | None, step: int) -> None:
        if why is None:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        log.warning("%s step %d skipped: %s (%d in a row)", self.stage, step, why, self.in_row)
        if self.in_row >= self.limit:
            from .checkpoint import list_checkpoints

            ckpts = list_checkpoints(self.run)
            last = str(ckpts[-1]) if ckpts else "(none yet)"
            raise NonFiniteError(
                f"{self.stage} stopped at step {step}: {self.in_row} steps in a row had a {why}; "
                f"the last good checkpoint is {last} (lower the learning rate and --resume)"
            )


class StopOnSigterm:
    """While a training loop runs, SIGTERM asks it to stop: the loop saves a checkpoint at the end
    of the step and raises :class:`TrainingStopped`. The ranks of a distributed run agree (the
    request is summed), so they stop at the same step. Outside the loop SIGTERM does what it did."""

    def __init__(self, engine: Engine):
        self.engine, self.asked, self._old = engine, False, None

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._old = signal.signal(signal.SIGTERM, self._ask)
        return self

    def _ask(self, signum, frame) -> None:
        self.asked = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def requested(self) -> bool:
        return self.engine.sum(float(self.asked)) > 0

    def stop(self, stage: str, step: int, steps: int, run) -> TrainingStopped:
        return TrainingStopped(
            f"{stage} stopped by SIGTERM at step {step} of {steps}: checkpoint "
            f"{run}/checkpoints/step_{step:07d} written; continue with --resume"
        )


def save_training_checkpoint(
    engine: Engine,
    run,
    step: int,
    modules: dict,
    optimizers: dict,
    extra: dict,
    keep: int,
    kind: str,
    model: torch.nn.Module | None = None,
):
    """Collective: every rank contributes its RNG state (and, under FSDP, its shards); the
    main process writes the checkpoint (atomically); all ranks wait for it. A write the main
    process fails (no space left, say) stops every rank with one error line, none waiting on a
    collective the main process never reaches."""
    from .checkpoint import save_checkpoint

    rng = {"torch_rng": engine.gather(torch.get_rng_state().to(engine.device)).cpu()}
    if engine.device.type == "cuda":
        rng["cuda_rng"] = engine.gather(torch.cuda.get_rng_state().to(engine.device)).cpu()
    opts = {name: engine.optimizer_state(model, opt) for name, opt in optimizers.items()}
    path, failed = None, None
    if engine.is_main:
        try:
            path = save_checkpoint(run, step, modules, opts, extra, keep=keep, kind=kind, rng=rng)
        except UnicodebookError as e:
            failed = e
    if engine.sum(float(failed is not None)) > 0:  # every rank learns whether the write failed
        raise failed or UnicodebookError(
            f"the main process could not write checkpoint step {step} of {run} "
            f"(its error line says why); this rank stops with it"
        )
    engine.barrier()
    return path
