"""Where a training stage's batches come from: a folder (map-style, preloaded or read on
access) or WebDataset tar shards (streamed). Both give each rank, at every step, its slice of
the global batch as ``(images (b, 3, S, S), n_bad)`` from any starting step, so a resumed or
distributed run sees exactly the data an uninterrupted single process would (folders), or
a fixed function of (seed, rank, step) (shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..errors import UnicodebookError
from .images import ImageFolder, collate_images, image_limits, is_split_root, resolve_image_folder


def is_shard_spec(data: str | Path) -> bool:
    """Tar shards: a ``.tar`` file, a ``{a..b}`` pattern, or a folder holding ``*.tar`` only."""
    s = str(data)
    if s.endswith(".tar") or ("{" in s and ".." in s):
        return True
    p = Path(data)
    return p.is_dir() and any(p.glob("*.tar")) and not is_split_root(p) and not (p / "images").is_dir()


class ResumableBatches(torch.utils.data.Sampler):
    """Batches of indices in an order fixed by (seed, epoch), starting at any global step.

    Each yields this rank's contiguous slice (``shard``) of the global batch, so W ranks
    together train on exactly the batches one process would.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        total_steps: int | None = None,
        shard=lambda batch: batch,
    ):
        if n == 0:
            raise UnicodebookError("no training images")
        self.n, self.bs, self.seed = n, min(batch_size, n), seed
        self.per_epoch = max(1, n // self.bs)  # drop the ragged last batch
        self.start, self.total, self.shard = start_step, total_steps, shard

    def __iter__(self):
        step = self.start
        while self.total is None or step < self.total:
            epoch, k = divmod(step, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=g)
            yield self.shard(order[k * self.bs : (k + 1) * self.bs].tolist())
            step += 1

    def __len__(self) -> int:
        return (self.total or 0) - self.start


class FolderImages:
    """An image folder (or a dataset root's ``train`` split), sharded by :class:`ResumableBatches`."""

    def __init__(self, data: Path, cfg, engine, progress: bool):
        from .photos import check_crop_size

        check_crop_size(data, cfg.model.image_size)
        self.cfg, self.engine = cfg, engine
        self.val_root = data if is_split_root(data) else None
        self.dataset = ImageFolder(
            resolve_image_folder(data, "train"),
            cfg.model.image_size,
            cfg.data.odd_size,
            preload=cfg.data.preload,
            progress=progress,
            limits=image_limits(cfg.data),
        )
        self.bad_at_start = len(self.dataset.bad)

    def batches(self, start: int, steps: int) -> Iterator[tuple[torch.Tensor, int]]:
        tc = self.cfg.train_tokenizer
        self.engine.local_batch_size(min(tc.batch_size, len(self.dataset)))  # fail early on an uneven split
        sampler = ResumableBatches(len(self.dataset), tc.batch_size, tc.seed, start, steps, shard=self.engine.shard)
        return iter(
            torch.utils.data.DataLoader(
                self.dataset, batch_sampler=sampler, collate_fn=collate_images, num_workers=self.cfg.data.num_workers
            )
        )

    def fixed(self, n: int) -> torch.Tensor:
        """The first ``n`` readable images (for reconstruction grids)."""
        return torch.stack([x for x in (self.dataset[i] for i in range(min(n, len(self.dataset)))) if x is not None])


class ShardImages:
    """WebDataset tar shards, streamed: each rank reads its own shards (and each loader worker
    its own share of those), ``batch_size / world`` samples per step, for ever."""

    val_root = None
    bad_at_start = 0

    def __init__(self, data, cfg, engine):
        from .shards import list_shards

        self.cfg, self.engine = cfg, engine
        self.shards = list_shards(data)

    def _stream(self, start: int):
        from .shards import ShardStream, decode_image

        tc, dc = self.cfg.train_tokenizer, self.cfg.data
        stream = ShardStream(
            self.shards,
            self.engine.local_batch_size(tc.batch_size),
            decode_image(self.cfg.model.image_size, dc.odd_size),
            rank=self.engine.rank,
            world=self.engine.world,
            seed=tc.seed,
            start_batch=start,
        )
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=dc.num_workers)

    def batches(self, start: int, steps: int) -> Iterator[tuple[torch.Tensor, int]]:
        for i, item in enumerate(self._stream(start)):
            if start + i >= steps:
                return
            yield item

    def fixed(self, n: int) -> torch.Tensor:
        for i, (images, _) in enumerate(self._stream(0)):
            if images.numel():
                return images[:n]
            if i >= 100:
                break
        raise UnicodebookError(f"no readable image in the first 100 batches of {self.shards[0].parent}")


def image_source(data: str | Path, cfg, engine, progress: bool = False):
    """Stage I's training images: :class:`ShardImages` for tar shards, else :class:`FolderImages`."""
    if is_shard_spec(data):
        return ShardImages(data, cfg, engine)
    return FolderImages(Path(data), cfg, engine, progress)


class ShardRecords:
    """Stage II's records streamed from tar shards: each rank gets, per step, a dict batch
    ``{"image", "conversation", "caption", "key"}`` of ``batch_size / world`` slots."""

    def __init__(self, data, image_size: int, odd_size: str, engine, seed: int, num_workers: int):
        from .shards import list_shards

        self.shards = list_shards(data)
        self.size, self.odd_size, self.engine, self.seed, self.workers = image_size, odd_size, engine, seed, num_workers

    def batches(self, batch_size: int, start: int) -> Iterator[tuple[dict, int]]:
        from .shards import ShardStream, decode_record

        stream = ShardStream(
            self.shards,
            self.engine.local_batch_size(batch_size),
            decode_record(self.size, self.odd_size),
            rank=self.engine.rank,
            world=self.engine.world,
            seed=self.seed,
            start_batch=start,
        )
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.workers))

    def texts(self, limit: int = 20_000) -> tuple[list[str], list[str]]:
        """Conversation turns and captions of the first ``limit`` samples (one process, epoch
        0), for training a word-level text tokenizer."""
        from .shards import ShardStream, count_samples, decode_record

        n = min(limit, count_samples(self.shards))
        stream = ShardStream(self.shards, 256, decode_record(self.size, self.odd_size), seed=self.seed)
        turns: list[str] = []
        captions: list[str] = []
        for read, (batch, _) in enumerate(stream, start=1):
            turns += [t["value"] for c in batch["conversation"] if c for t in c]
            captions += [c for c in batch["caption"] if c]
            if read * 256 >= n:
                break
        return turns, captions
