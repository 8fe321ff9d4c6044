"""Training checkpoints: weights, optimizer and RNG state in safetensors, written atomically.

Layout: ``RUN/checkpoints/step_0000500/{model,optimizers}.safetensors`` + ``state.json``. Each
checkpoint folder is built under a temporary name and renamed in one step, so a crash leaves
either the previous checkpoints or the new one, never a torn one; the last ``keep`` are kept.
No pickle anywhere: optimizer tensors are flattened into safetensors, the rest is JSON.

``state.json`` records each weight file's sha256: a file edited after the save is refused on
resume, by name. A write that fails (no space left) stops the run in one line, the earlier
checkpoints intact. :func:`run_lock` keeps a second process out of a run folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import UnicodebookError
from ..utils.distributed import launched_as_main
from ..utils.io import atomic_dir, atomic_save_tensors, first_state_mismatch

STATE_VERSION = 1


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    py = random.getstate()
    tensors = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()
    return tensors, {"python_rng": [py[0], list(py[1]), py[2]], "numpy_rng": _np_state()}


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, rank: int = 0) -> None:
    """Restore this rank's row of the saved per-rank RNG states (row 0 stands in for ranks a
    run with fewer processes did not have)."""

    def row(t: torch.Tensor) -> torch.Tensor:
        return t if t.ndim == 1 else t[rank if rank < t.shape[0] else 0]

    torch.set_rng_state(row(tensors["torch_rng"]))
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(row(tensors["cuda_rng"]))
    version, state, gauss = meta["python_rng"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    run: Path,
    step: int,
    modules: dict[str, torch.nn.Module | dict],
    optimizers: dict[str, torch.optim.Optimizer | dict],
    extra: dict,
    keep: int = 2,
    kind: str = "tokenizer",
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``RUN/checkpoints/step_XXXXXX`` atomically and prune to the last ``keep``.

    ``modules`` / ``optimizers`` map names to modules (or their full state dicts). Each module
    goes to ``<name>.safetensors``; optimizers (flattened) and the RNG states to
    ``optimizers.safetensors``; everything else to ``state.json``. ``rng``: the per-rank RNG
    states of a distributed run (rows, rank 0 first); by default this process's.
    """
    root = Path(run) / "checkpoints"
    dest = root / f"step_{step:07d}"
    opt_tensors, opt_meta = {}, {}
    for name, opt in optimizers.items():
        tensors, meta = _flatten_optimizer(opt if isinstance(opt, dict) else opt.state_dict())
        opt_tensors.update({f"{name}/{k}": v for k, v in tensors.items()})
        opt_meta[name] = meta
    rng_tensors, rng_meta = rng_state()
    rng_tensors.update(rng or {})
    with write_errors(run, f"checkpoint {dest}"), atomic_dir(dest) as tmp:
        for name, module in modules.items():
            atomic_save_tensors(
                module if isinstance(module, dict) else module.state_dict(), tmp / f"{name}.safetensors"
            )
        atomic_save_tensors({**opt_tensors, **rng_tensors}, tmp / "optimizers.safetensors")
        state = {
            "version": STATE_VERSION,
            "kind": kind,
            "step": step,
            "modules": sorted(modules),
            "optimizers": opt_meta,
            **rng_meta,
            **extra,
            "sha256": {p.name: file_sha256(p) for p in sorted(tmp.glob("*.safetensors"))},
        }
        (tmp / "state.json").write_text(json.dumps(state))
    for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def write_errors(run: Path, what: str) -> Iterator[None]:
    """An ``OSError`` while writing ``what`` (no space left, a read-only disk) becomes one line
    naming the last good checkpoint; the atomic writes have left the earlier ones as they were."""
    try:
        yield
    except OSError as e:
        ckpts = list_checkpoints(run)
        last = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        raise UnicodebookError(
            f"could not write {what} ({e.strerror or e}); {last} (make room, then --resume)"
        ) from None


LOCK = ".lock"


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Hold ``RUN/.lock`` (an exclusive ``flock``; the holder's pid inside) while a run writes
    its folder, so a second process is refused rather than interleaved. The system releases the
    lock when its holder exits, however it ends: a lock file left by a dead process is taken
    over. The other ranks of a distributed run (``RANK`` > 0) share the main process's lock."""
    if not launched_as_main():
        yield
        return
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UnicodebookError(
                f"{run} is in use by another training process (pid {f.read().strip() or '?'}, "
                f"{run / LOCK}); wait for it to end or choose another --out"
            ) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield  # closing the file releases the lock


def check_resume(run: Path, cfg, resume: bool) -> list[Path]:
    """The checkpoints a run resumes from; refuses resuming nothing, overwriting a run, or
    resuming with a config other than the run's ``config.yaml``."""
    from ..config import config_to_dict, read_yaml

    ckpts = list_checkpoints(run)
    if resume and not ckpts:
        raise UnicodebookError(f"{run}: nothing to resume (no checkpoints/step_*)")
    if not resume and ckpts:
        raise UnicodebookError(f"{run} already holds a run; pass --resume or choose another --out")
    if resume and read_yaml(Path(run) / "config.yaml") != config_to_dict(cfg):
        raise UnicodebookError(f"{run}: --resume with a config that differs from the run's config.yaml")
    return ckpts


def list_checkpoints(run: Path) -> list[Path]:
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.json").exists()
    )


def load_checkpoint(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer | None],
    kind: str = "tokenizer",
    rank: int = 0,
) -> dict:
    """Restore modules, optimizers and RNG from a checkpoint folder; refuse torn or foreign ones.

    Everything is read and checked before anything is loaded, so a refused checkpoint leaves
    the models untouched. An optimizer given as ``None`` is not loaded: its state dict is
    returned under ``state["optimizer_states"][name]`` (for optimizers that can only take it
    once the model is wrapped, as under FSDP).
    """
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict):
            raise UnicodebookError(f"checkpoint {path} is torn or unreadable (state.json is not a JSON object)")
        if state.get("version") != STATE_VERSION or state.get("kind") != kind:
            raise UnicodebookError(f"checkpoint {path} is not a {kind} checkpoint of this version")
        if sorted(modules) != state.get("modules"):
            raise UnicodebookError(f"checkpoint {path} holds {state.get('modules')}, this run needs {sorted(modules)}")
        lacks = [k for k in ("step", "optimizers", "python_rng", "numpy_rng") if k not in state]
        lacks = lacks or [f"optimizers.{n}" for n in optimizers if n not in state["optimizers"]]
        if lacks:
            raise UnicodebookError(f"checkpoint {path} is torn or unreadable (state.json lacks {', '.join(lacks)})")
        weights = {name: load_file(path / f"{name}.safetensors") for name in modules}
        opt = load_file(path / "optimizers.safetensors")
        for name, digest in state.get("sha256", {}).items():  # loads, yet edited? (older: none recorded)
            if file_sha256(path / name) != digest:
                raise UnicodebookError(
                    f"checkpoint {path}: {name} was changed after it was saved (its sha256 is not "
                    "the one state.json recorded); restore it or remove this checkpoint"
                )
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise UnicodebookError(f"checkpoint {path} is torn or unreadable ({str(e).splitlines()[0]})") from None
    for name, module in modules.items():
        bad = first_state_mismatch(module, weights[name])
        if bad:
            raise UnicodebookError(f"checkpoint {path} belongs to another model (first mismatching key: {name}.{bad})")
    for name, module in modules.items():
        module.load_state_dict(weights[name])
    state["optimizer_states"] = {}
    for name, optimizer in optimizers.items():
        prefix = f"{name}/"
        tensors = {k[len(prefix) :]: v for k, v in opt.items() if k.startswith(prefix)}
        sd = _unflatten_optimizer(tensors, state["optimizers"][name])
        if optimizer is None:
            state["optimizer_states"][name] = sd
        else:
            optimizer.load_state_dict(sd)
    set_rng_state({k: opt[k] for k in ("torch_rng", "cuda_rng") if k in opt}, state, rank)
    return state
