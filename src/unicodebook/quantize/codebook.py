"""The unified codebook: a visual codebook bound to rows of an LLM's input-embedding table.

Dimensions: V codebook rows (the exposed LLM rows), d LLM hidden size, N feature vectors.

Code index ``k`` stands for LLM token id ``token_ids[k]``. Three learning paradigms
(docs/design.md, "The unified codebook"):

* ``frozen``    — the codebook *is* the LLM rows and never changes; encoder/decoder adapt.
* ``dual``      — the visual codebook learns freely (EMA of assigned features, dead-code
                  restarts) and is copied into the LLM's rows on a schedule and at the end.
* ``iterative`` — UniCode's language-driven rule: EMA update from assigned features, each code
                  rescaled to its token's norm, then pulled towards the language codebook,
                  ``C ← (1−w)·C + w·C_L``, with ``w`` ramping linearly from 0 to 1 over
                  ``[align_start, align_end]`` of training; from ``align_end`` on ``C == C_L``
                  exactly. The LLM's embeddings are only read, never written.

Under ``torch.distributed`` every rank holds the same codebook, and the same one a single
process would hold on the global batch: EMA statistics are all-reduced, and k-means starts and
dead-code restarts draw from the features of all ranks (all-gathered, rank-major, which is the
global batch's order when each rank holds a contiguous slice of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..utils.distributed import all_reduce_, broadcast_, gather_rows
from .search import SEARCH_MODES, SearchIndex, nearest_code, nearest_code_certified, prefer_bf16

MODES = ("frozen", "dual", "iterative")


@dataclass
class CodebookRule:
    """Hyper-parameters of the update rule (the run config's ``model.codebook`` extends it)."""

    mode: Literal["frozen", "dual", "iterative"] = "iterative"
    ema_decay: float = 0.99
    rescale_to_token_norm: bool = True  # iterative: each code keeps its token's norm
    align_every: int = 1  # iterative: steps between pulls towards the language codebook
    align_start: float = 0.0  # fraction of training where the weight of C_L starts to ramp (0)
    align_end: float = 0.8  # ... and where it reaches 1 (codebook == LLM rows from then on)
    dual_sync_every: int = 100  # dual: steps between copies of the codebook into the LLM
    dead_threshold: float = 0.5  # a code whose EMA count falls below this is restarted
    restart_every: int = 50  # steps between dead-code restarts (0 = never)
    kmeans_init: bool = True  # dual/iterative: start the visual codebook from batch features
    chunk_size: int = 4096  # codebook rows scored per matmul in nearest-code search
    search: str = "auto"  # fp32 | bf16 (certified prefilter, same codes) | auto (bf16 for d ≥ 1024 where fast)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"codebook mode must be one of {MODES}, got {self.mode!r}")
        if self.search not in SEARCH_MODES:
            raise ValueError(f"codebook search must be one of {SEARCH_MODES}, got {self.search!r}")
        if not 0.0 <= self.align_start <= self.align_end <= 1.0:
            raise ValueError("codebook ramp needs 0 <= align_start <= align_end <= 1")

    def language_weight(self, progress: float) -> float:
        """Weight w of C_L in the iterative pull at training progress in [0, 1]."""
        if progress >= self.align_end:
            return 1.0
        if progress <= self.align_start:
            return 0.0
        return (progress - self.align_start) / max(self.align_end - self.align_start, 1e-12)


class UnifiedCodebook(nn.Module):
    """V×d visual codebook whose row k is tied to LLM token ``token_ids[k]``.

    The LLM embedding is held by reference (not a submodule), so the tokenizer's state dict
    holds only the visual codebook and its statistics.
    """

    def __init__(self, token_ids: Tensor, dim: int, rule: CodebookRule | None = None):
        super().__init__()
        token_ids = torch.as_tensor(token_ids, dtype=torch.long, device="cpu").flatten()  # checked on the host
        if token_ids.numel() == 0:
            raise ValueError("the codebook needs at least one LLM row")
        if torch.unique(token_ids).numel() != token_ids.numel():
            raise ValueError("codebook rows must be distinct token ids")
        self.rule = rule or CodebookRule()
        self.dim = dim
        v = token_ids.numel()
        self.register_buffer("token_ids", token_ids)
        self.register_buffer("embed", torch.zeros(v, dim))  # visual codebook C (V, d), fp32
        self.register_buffer("ema_count", torch.ones(v))  # (V,)
        self.register_buffer("ema_sum", torch.zeros(v, dim))  # (V, d)
        self.register_buffer("initialised", torch.tensor(False))
        self._llm: list[nn.Embedding] = []  # reference, not a registered submodule
        self._index: dict[
            tuple[int, int], tuple[tuple, SearchIndex]
        ] = {}  # search cache per row block, keyed by the codebook's version
        self.groups = 1  # equal blocks of rows, one per code layer (split_rows); 1: every layer searches all rows
        first = int(token_ids[0])
        contiguous = bool((token_ids == torch.arange(first, first + v, device="cpu")).all())
        self._slice = (first, first + v) if contiguous else None

    # ---------------------------------------------------------------- binding to the LLM
    @property
    def num_codes(self) -> int:
        return self.token_ids.numel()

    @property
    def mode(self) -> str:
        return self.rule.mode

    @property
    def llm_embedding(self) -> nn.Embedding:
        if not self._llm:
            raise RuntimeError("the codebook is not bound to an LLM embedding (call bind())")
        return self._llm[0]

    @property
    def is_bound(self) -> bool:
        return bool(self._llm)

    def bind(self, embedding: nn.Embedding, copy: bool = True) -> "UnifiedCodebook":
        """Tie this codebook to an LLM's input embedding (V_llm × d).

        With ``copy`` the visual codebook starts equal to the LLM rows (a fresh tokenizer);
        a loaded tokenizer binds with ``copy=False`` and keeps its trained codebook.
        """
        vocab, dim = embedding.weight.shape
        if dim != self.dim:
            raise ValueError(f"LLM hidden size {dim} != codebook dim {self.dim}")
        if int(self.token_ids.max()) >= vocab:
            raise ValueError(f"codebook row {int(self.token_ids.max())} is outside the LLM vocabulary ({vocab})")
        self._llm = [embedding]
        if copy:
            with torch.no_grad():
                rows = self.language_codebook()
                self.embed.copy_(rows)
                self.ema_sum.copy_(rows * self.ema_count[:, None])
        return self

    def language_codebook(self) -> Tensor:
        """C_L: the bound LLM rows (V, d) as fp32, detached (a view when rows are contiguous)."""
        w = self.llm_embedding.weight.detach()
        rows = w[self._slice[0] : self._slice[1]] if self._slice else w[self.token_ids.to(w.device)]
        return rows.float()

    @torch.no_grad()
    def write_to_llm(self) -> None:
        """dual: copy the visual codebook into the LLM's rows (in the LLM's dtype)."""
        w = self.llm_embedding.weight
        w[self.token_ids.to(w.device)] = self.embed.to(w.device, w.dtype)

    @torch.no_grad()
    def read_from_llm(self) -> None:
        """Copy the LLM rows into the visual codebook (dual's other direction; frozen)."""
        rows = self.language_codebook().to(self.embed.device)
        self.embed.copy_(rows)
        self.ema_sum.copy_(rows * self.ema_count[:, None])

    def split_rows(self, groups: int) -> "UnifiedCodebook":
        """Give each of ``groups`` code layers its own block of V/groups rows: layer l searches,
        starts and restarts only rows [l·V/groups, (l+1)·V/groups). A code still names one
        LLM row; it carries log2(V/groups) bits, the layer being known from its place."""
        if groups < 1 or self.num_codes % groups:
            raise ValueError(
                f"{self.num_codes} codebook rows do not split into {groups} equal blocks (one per code layer)"
            )
        self.groups = groups
        return self

    def group_rows(self, group: int | None) -> tuple[int, int]:
        """[lo, hi) of the rows layer ``group`` searches (all rows for None or an unsplit codebook)."""
        if group is None or self.groups == 1:
            return 0, self.num_codes
        size = self.num_codes // self.groups
        return group * size, (group + 1) * size

    # ---------------------------------------------------------------- lookup
    def codes_to_token_ids(self, codes: Tensor) -> Tensor:
        return self.token_ids[codes]

    def token_ids_to_codes(self, ids: Tensor) -> Tensor:
        """Inverse map; raises if an id is not a codebook row."""
        lut = torch.full((int(self.token_ids.max()) + 1,), -1, dtype=torch.long, device=ids.device)
        lut[self.token_ids.to(ids.device)] = torch.arange(self.num_codes, device=ids.device)
        if (ids < 0).any() or (ids >= lut.numel()).any() or (lut[ids.clamp(0, lut.numel() - 1)] < 0).any():
            raise ValueError("token id outside the codebook rows")
        return lut[ids]

    def lookup(self, codes: Tensor) -> Tensor:
        """codes (...,) long → embeddings (..., d)."""
        return self.embed[codes]

    def search(self, z: Tensor, group: int | None = None) -> tuple[Tensor, Tensor]:
        """z (N, d) → nearest code (N,) and squared distance (N,), among the rows of layer
        ``group`` (:meth:`group_rows`; all rows for None)."""
        lo, hi = self.group_rows(group)
        index = self.search_index(lo, hi)
        if index.lowp is not None:
            idx, dist2 = nearest_code_certified(z, index, self.rule.chunk_size)
        else:
            idx, dist2 = nearest_code(z, index.rows, self.rule.chunk_size, index.sqnorm)
        return (idx + lo if lo else idx), dist2

    def search_index(self, lo: int = 0, hi: int | None = None) -> SearchIndex:
        """Norms (and the bf16 copy) of rows [lo, hi), rebuilt only after the codebook changed
        (every in-place write bumps the tensor's version counter)."""
        hi = self.num_codes if hi is None else hi
        mode = self.rule.search
        bf16 = mode == "bf16" or (mode == "auto" and prefer_bf16(self.dim, self.embed.device))
        key = (self.embed.data_ptr(), self.embed._version, self.embed.device, bf16)
        cached = self._index.get((lo, hi))
        if cached is None or cached[0] != key:
            cached = self._index[(lo, hi)] = (key, SearchIndex.build(self.embed[lo:hi], bf16))
        return cached[1]

    # ---------------------------------------------------------------- learning
    @torch.no_grad()
    def update(
        self, features: Tensor, codes: Tensor, progress: float, step: int, generator: torch.Generator | None = None
    ) -> int:
        """One training-step update of the visual codebook.

        Args:
            features: (N, d) the vectors each code layer quantized (all layers stacked).
            codes: (N,) the code each of them was assigned.
            progress: step / total_steps in [0, 1] (drives the iterative ramp).
            step: global step (drives the sync and restart schedules).
            generator: RNG for restarts (seeded from the run seed and step for exact resume).

        Returns the number of dead codes restarted.
        """
        rule = self.rule
        if rule.mode == "frozen":
            return 0
        features = features.detach().float()
        w_lang = rule.language_weight(progress) if rule.mode == "iterative" else 0.0
        if rule.mode == "iterative" and w_lang >= 1.0:
            self.read_from_llm()  # end of the ramp: C == C_L exactly, no more EMA
            return 0
        # EMA of counts and sums of assigned features (all ranks see the global batch stats)
        counts = torch.bincount(codes, minlength=self.num_codes).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, features)
        all_reduce_(counts, sums)
        decay = rule.ema_decay
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + self.num_codes * 1e-5) * n
        self.embed.copy_(self.ema_sum / smoothed[:, None])
        restarted = 0
        if rule.restart_every and step % rule.restart_every == 0 and step > 0:
            restarted = self._restart_dead(features, codes, generator)
        if rule.mode == "iterative":
            self._align(w_lang, step)
        elif rule.mode == "dual" and (step + 1) % rule.dual_sync_every == 0:
            self.write_to_llm()
        return restarted

    def _align(self, w_lang: float, step: int) -> None:
        """iterative: rescale each code to its token's norm, then pull towards C_L."""
        lang = self.language_codebook().to(self.embed.device)
        if self.rule.rescale_to_token_norm:
            scale = lang.norm(dim=1) / self.embed.norm(dim=1).clamp_min(1e-12)
            self.embed.mul_(scale[:, None])
        if w_lang > 0 and step % self.rule.align_every == 0:
            self.embed.mul_(1 - w_lang).add_(lang, alpha=w_lang)
        self.ema_sum.copy_(self.embed * self.ema_count[:, None])  # keep EMA consistent

    def _restart_dead(self, features: Tensor, codes: Tensor, generator: torch.Generator | None) -> int:
        """Replace codes whose EMA count fell below the threshold by random features of the
        global batch (all ranks see the same dead set: the counts are all-reduced). A split
        codebook restarts each layer's rows from the features that layer quantized."""
        dead = self.ema_count < self.rule.dead_threshold
        if not bool(dead.any()):
            return 0
        features, codes = gather_rows(features), gather_rows(codes)
        restarted = 0
        for group in range(self.groups):
            lo, hi = self.group_rows(group)
            rows = dead.nonzero().flatten()
            rows = rows[(rows >= lo) & (rows < hi)]
            pool = features if self.groups == 1 else features[(codes >= lo) & (codes < hi)]
            if rows.numel() == 0 or pool.shape[0] == 0:
                continue
            pick = torch.randint(0, pool.shape[0], (rows.numel(),), generator=generator, device="cpu")
            new = pool[pick.to(pool.device)].clone()
            new += 0.01 * new.std() * torch.randn(new.shape, generator=generator, device="cpu").to(new.device)
            broadcast_(new)  # rank 0's choice for all ranks
            self.embed[rows] = new
            self.ema_count[rows] = 1.0
            self.ema_sum[rows] = new
            restarted += rows.numel()
        return restarted

    @torch.no_grad()
    def kmeans_init(
        self, features: Tensor, iters: int = 10, generator: torch.Generator | None = None, group: int | None = None
    ) -> None:
        """Start the visual codebook at k-means centroids of a batch of features (N, d): all rows,
        or those of layer ``group`` of a split codebook (the codebook counts as started once
        its last group is)."""
        if self.rule.mode == "frozen" or bool(self.initialised):
            self.initialised.fill_(True)
            return
        lo, hi = self.group_rows(group)
        k = hi - lo
        x = gather_rows(features.detach().float())
        # start from distinct rows: a plain background gives thousands of identical features, and
        # centroids drawn twice from them stay duplicates (empty) through every iteration
        distinct = torch.unique(x, dim=0)
        if distinct.shape[0] >= k:
            pick = torch.randperm(distinct.shape[0], generator=generator, device="cpu")[:k]
            cent = distinct[pick.to(x.device)].clone()
        else:
            pick = torch.randint(0, x.shape[0], (k,), generator=generator, device="cpu")
            cent = x[pick.to(x.device)].clone()
        for _ in range(iters):
            idx, _ = nearest_code(x, cent, self.rule.chunk_size)
            counts = torch.bincount(idx, minlength=k).float()
            sums = torch.zeros_like(cent).index_add_(0, idx, x)
            filled = counts > 0
            cent[filled] = sums[filled] / counts[filled, None]
        broadcast_(cent)
        if self.rule.mode == "iterative" and self.rule.rescale_to_token_norm and self.is_bound:
            lang = self.language_codebook()[lo:hi].to(cent.device)
            cent *= (lang.norm(dim=1) / cent.norm(dim=1).clamp_min(1e-12))[:, None]
        self.embed[lo:hi] = cent
        self.ema_count[lo:hi] = 1.0
        self.ema_sum[lo:hi] = cent
        if hi == self.num_codes:
            self.initialised.fill_(True)

    # ---------------------------------------------------------------- health
    @torch.no_grad()
    def alignment(self) -> dict:
        """Mean cosine between each visual code and its LLM row, and mean norm ratio."""
        lang = self.language_codebook().to(self.embed.device)
        cos = torch.nn.functional.cosine_similarity(self.embed, lang, dim=1)
        return {"cosine": float(cos.mean()), "max_abs_diff": float((self.embed - lang).abs().max())}
