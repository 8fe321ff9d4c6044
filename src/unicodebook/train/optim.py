"""The optimizers the training recipes build (``optimizer: adamw | muon`` in a stage's config).

* ``adamw``: AdamW over every trainable parameter.
* ``muon``: :class:`torch.optim.Muon` for the hidden layers' weight matrices (every
  ``nn.Linear`` weight and attention input projection, the LM head excepted), AdamW for the rest
  (embedding and position tables, the LM head, norms, biases), as Muon's authors prescribe. Muon's
  step is scaled to AdamW's update size (``adjust_lr_fn="match_rms_adamw"``), so one learning rate
  and one schedule serve both halves.

Both are one :class:`torch.optim.Optimizer` to the loop: one ``param_groups`` list (the schedule
sets every group's lr), one ``state`` and the standard ``state_dict`` / ``load_state_dict``, so
checkpoints, exact resume and the accelerate (DDP) wrapper are the same for both. Under FSDP,
whose shards are not whole matrices, stage II refuses ``muon``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def build_optimizer(model: nn.Module, kind: str, lr: float, betas, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``kind`` over ``model``'s trainable parameters (``adamw``: in
    ``named_parameters`` order; ``muon``: the hidden matrices first)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if kind == "muon":
        hidden = hidden_matrices(model)
        return MuonWithAdamW(
            [p for p in params if id(p) in hidden],
            [p for p in params if id(p) not in hidden],
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
        )
    raise ValueError(f"unknown optimizer '{kind}' (adamw, muon)")


def hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the hidden layers' weight matrices: ``nn.Linear`` weights and the input projections
    of ``nn.MultiheadAttention``, not an LLM's output head (it scores the vocabulary, like an
    embedding table)."""
    heads = set()
    for m in model.modules():
        get = getattr(m, "get_output_embeddings", None)
        out = get() if callable(get) else None
        if out is not None:
            heads.add(id(out.weight))
    found = set()
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.ndim == 2:
            found.add(id(m.weight))
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            found.add(id(m.in_proj_weight))
    return found - heads


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon over ``matrices``, AdamW over ``others``: one optimizer whose first groups are
    Muon's. The inner optimizers share this one's group dicts and state, so the schedule,
    ``state_dict`` and ``load_state_dict`` see a single optimizer."""

    def __init__(
        self,
        matrices: Iterable[nn.Parameter],
        others: Iterable[nn.Parameter],
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        momentum: float = 0.95,
    ):
        matrices, others = list(matrices), list(others)
        self.inner: list[torch.optim.Optimizer] = []  # an empty side gets none (torch refuses it)
        if matrices:
            self.inner.append(
                torch.optim.Muon(
                    matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw"
                )
            )
        if others:
            self.inner.append(torch.optim.AdamW(others, lr=lr, betas=betas, weight_decay=weight_decay))
        super().__init__([g for opt in self.inner for g in opt.param_groups], {})
        self._share()

    def _share(self) -> None:
        at = 0
        for opt in self.inner:
            n = len(opt.param_groups)
            opt.param_groups, at = self.param_groups[at : at + n], at + n
            opt.state = self.state  # disjoint parameters: one dict serves both

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces the group dicts and the state
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.inner:
            opt.step()
        return loss
