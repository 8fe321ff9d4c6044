"""Streaming of WebDataset-format tar shards, for corpora that fit neither on disk nor in memory.

Format (the WebDataset convention)
----------------------------------
A shard is a plain ``.tar``. A *sample* is a run of consecutive members sharing a *key*: the
member name up to the first dot of its basename (``dir/000042.png`` and ``dir/000042.json``
form the sample ``dir/000042``); the rest of the basename is the *extension*:

* ``png`` / ``jpg`` / ``jpeg`` / ``webp`` -- the image bytes (other formats Pillow reads,
  :data:`~unicodebook.data.images.IMAGE_EXTS`, are accepted too),
* ``json`` -- a LLaVA conversation, ``[{"from": "human", "value": "<image>\\n..."}, ...]``,
* ``txt`` -- a caption (UTF-8),
* ``held_out`` -- optional, ignored when reading.

:func:`write_shards` writes shards (each to a temporary name, then renamed); given a
:class:`FolderSamples` it packs an image folder or a stage II split (``instruct.json`` / ``t2i.jsonl``, see
:mod:`~unicodebook.data.multimodal`), :func:`list_shards` resolves a folder, a file or a brace
pattern (``dir/shard-{000000..000011}.tar``), and :class:`ShardStream` reads them.

Why not the ``webdataset`` package
----------------------------------
We read tars ourselves (``tarfile``) because training needs two things it does not give us:

* **exact resume** -- a run restarted after ``k`` steps continues with exactly the batches it
  would have seen, across ranks and DataLoader workers, without decoding what it skips;
* **bad-sample counts that cross the DataLoader worker boundary** -- every batch carries the
  number of samples skipped to make it, so the trainer (in the main process) can count them.

Batches, epochs and resume (the exact rules)
--------------------------------------------
* Epoch ``e`` visits every shard once, in a permutation drawn from a ``torch.Generator`` seeded
  by ``(seed, e)``. Rank ``r`` of ``world`` takes ``order[r::world]``; in a DataLoader with
  ``W`` workers, worker *role* ``j`` takes ``mine[j::W]`` of those (``num_workers=0``: ``W=1``).
* Each worker reads its shards in that order, epoch after epoch, as one endless run of
  *sample slots*. A slot is a sample of a shard, or -- for a shard that cannot be read to its
  end (truncated, corrupt) -- one slot standing for the sample being read when it failed and
  everything after it.
* **A batch is the next** ``batch_size`` **slots**. Bad slots (undecodable image, malformed
  json, missing image, an unreadable shard) are logged, counted and dropped, so a batch may be
  short -- even empty, shape ``(0, 3, H, W)`` -- and carries its count: the stream yields
  ``(batch, n_bad)`` with ``len(batch) + n_bad == batch_size``. Batches run over shard and
  epoch ends; the stream never ends (there is no ``__len__``).
* torch's DataLoader returns worker outputs round-robin, starting with worker 0. The rank's
  batch ``b`` is therefore made by role ``b % W``. Resuming at ``start_batch = k``, worker
  ``w`` plays role ``(w + k) % W`` (so the first batch returned, from worker 0, is batch
  ``k``) and skips the batches that role had made: those ``b < k`` with ``b % W == role``.
  Skipping a batch is skipping ``batch_size`` slots: tar headers are walked, no member is read
  and nothing is decoded.

Exact resume needs the same shards, ``batch_size``, ``seed``, ``world`` and ``num_workers``
(and the DataLoader's default in-order delivery).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import BadImageError, UnicodebookError
from ..utils.io import atomic_open
from .images import IMAGE_EXTS, SPLITS, list_images, pil_to_tensor
from .multimodal import read_records

log = logging.getLogger("unicodebook.data")

# Image extensions in order of preference when a sample holds more than one.
SHARD_IMAGE_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp") + tuple(
    e.lstrip(".") for e in IMAGE_EXTS if e.lstrip(".") not in ("png", "jpg", "jpeg", "webp")
)

_END_OF_ARCHIVE = b"\0" * 1024  # two zero blocks close every well-formed tar


class BadSampleError(UnicodebookError):
    """A sample of a shard that cannot be used (malformed json, missing image, wrong type)."""


# ------------------------------------------------------------------------------ writing
def _member_bytes(key: str, ext: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise UnicodebookError(f"sample '{key}': member '{ext}' must be bytes or str, got {type(value).__name__}")


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or "." in key.rsplit("/", 1)[-1] or key.endswith("/"):
        raise UnicodebookError(f"sample key {key!r} must be a non-empty string with no '.' in its last part")
    return key


def write_shards(
    samples: Iterable[dict], out_dir: str | Path, samples_per_shard: int = 1000, prefix: str = "shard"
) -> list[Path]:
    """Write ``samples`` as tar shards ``out_dir/{prefix}-{i:06d}.tar``; return their paths.

    Each sample is a dict with ``"__key__"`` and extension → bytes (a ``str`` is written as
    UTF-8), e.g. ``{"__key__": "000042", "png": b"...", "txt": b"a red circle"}``. Each shard
    is written to a temporary name and renamed once complete, so a crash never leaves a
    half-written ``.tar``. Samples are read lazily: a corpus larger than memory is fine.
    A folder that already holds ``{prefix}-*.tar`` is refused (no mixing with stale shards).
    """
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise UnicodebookError(f"samples per shard must be >= 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UnicodebookError(f"'{out_dir}' is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob(f"{prefix}-*.tar"))
    if stale:
        raise UnicodebookError(
            f"'{out_dir}' already holds {len(stale)} shards ({stale[0].name}, ...); write to an empty folder"
        )
    paths: list[Path] = []
    it = iter(samples)
    while True:
        chunk = list(itertools.islice(it, samples_per_shard))
        if not chunk:
            break
        paths.append(_write_one_shard(chunk, out_dir / f"{prefix}-{len(paths):06d}.tar"))
    if not paths:
        raise UnicodebookError(f"no samples to write to '{out_dir}'")
    return paths


def _write_one_shard(chunk: list[dict], path: Path) -> Path:
    with atomic_open(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        prev = None
        for sample in chunk:
            if not isinstance(sample, dict):
                raise UnicodebookError(f"a sample must be a dict, got {type(sample).__name__}")
            key = _check_key(sample.get("__key__"))
            if key == prev:
                raise UnicodebookError(f"two consecutive samples share the key '{key}' (they would merge)")
            prev = key
            for ext, value in sample.items():
                if ext.startswith("__"):
                    continue
                data = _member_bytes(key, ext, value)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tf.addfile(info, io.BytesIO(data))
    return path


class FolderSamples:
    """The samples of a folder, for :func:`write_shards`; read lazily (raw image bytes).

    * a stage II folder (``instruct.json`` and/or ``t2i.jsonl``, e.g. a shapes split): one
      sample per conversation (image + ``json``, key ``conv_{n:06d}``) and one per caption
      (image + ``txt`` [+ ``held_out``], key ``cap_{n:06d}``), ``n`` being the record's index
      in :func:`~unicodebook.data.multimodal.read_records`; samples of one image are adjacent;
    * any other folder: its images (recursive, sorted), key ``img_{n:06d}``.

    Images are referenced by path relative to the folder and copied byte for byte, not
    re-encoded. After iteration, ``n_samples`` says how many samples were produced and
    ``n_skipped`` how many records were skipped (malformed, or image file missing).
    """

    def __init__(self, src: str | Path):
        src = Path(src)
        if not src.is_dir():
            raise UnicodebookError(f"folder '{src}' does not exist" if not src.exists() else f"'{src}' is not a folder")
        if any((src / s).is_dir() for s in SPLITS) and not _is_records_folder(src):
            raise UnicodebookError(f"'{src}' is a dataset root with splits; pack one split (e.g. {src / 'train'})")
        self.src = src
        self.n_samples = 0
        self.n_skipped = 0
        self._records = read_records(src) if _is_records_folder(src) else None
        self._images = None if self._records is not None else list_images(src)

    def __iter__(self) -> Iterator[dict]:
        self.n_samples = 0
        self.n_skipped = self._records.bad if self._records is not None else 0
        for sample in self._plain() if self._records is None else self._stage2():
            self.n_samples += 1
            yield sample

    def _plain(self) -> Iterator[dict]:
        for n, path in enumerate(self._images):
            try:
                data = path.read_bytes()
            except OSError as e:
                log.warning("skipping image %s: %s", path.relative_to(self.src), e.strerror or e)
                self.n_skipped += 1
                continue
            yield {"__key__": f"img_{n:06d}", path.suffix.lower().lstrip("."): data}

    def _stage2(self) -> Iterator[dict]:
        by_image: dict[str, list[tuple[str, int]]] = {}
        for n, conv in enumerate(self._records.conversations):
            by_image.setdefault(conv.image, []).append(("conv", n))
        for n, cap in enumerate(self._records.captions):
            by_image.setdefault(cap.image, []).append(("cap", n))
        for rel, uses in by_image.items():
            path = self.src / rel
            ext = path.suffix.lower().lstrip(".")
            try:
                if not path.resolve().is_relative_to(self.src.resolve()):
                    data, why = None, f"outside the dataset folder {self.src}"
                else:
                    data = path.read_bytes() if ext in SHARD_IMAGE_EXTS else None
                    why = None if data is not None else f"not an image file name ({', '.join(IMAGE_EXTS)})"
            except OSError as e:
                data, why = None, e.strerror or str(e)
            if data is None:
                log.warning("skipping %d record(s) of image %s: %s", len(uses), rel, why)
                self.n_skipped += len(uses)
                continue
            for kind, n in uses:
                if kind == "conv":
                    turns = self._records.conversations[n].turns
                    yield {"__key__": f"conv_{n:06d}", ext: data, "json": json.dumps(turns).encode()}
                else:
                    cap = self._records.captions[n]
                    sample = {"__key__": f"cap_{n:06d}", ext: data, "txt": cap.caption.encode()}
                    if cap.held_out:
                        sample["held_out"] = b"true"
                    yield sample


def _is_records_folder(src: Path) -> bool:
    return (src / "instruct.json").exists() or (src / "t2i.jsonl").exists()


# ------------------------------------------------------------------------------ listing
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` → ``a-000.tar a-001.tar a-002.tar``; ``{x,y}`` lists alternatives.

    Several braces multiply out, left to right. A range's width is that of its first end when
    it is zero-padded (``{000..011}``); ranges count up only.
    """
    m = _BRACE.search(pattern)
    if m is None:
        if "{" in pattern or "}" in pattern:
            raise UnicodebookError(f"unbalanced or nested braces in '{pattern}'")
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if lo > hi:
            raise UnicodebookError(f"brace range {{{body}}} in '{pattern}' counts down; write it low..high")
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        choices = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise UnicodebookError(f"brace {{{body}}} in '{pattern}' is neither a range {{a..b}} nor a list {{x,y}}")
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def list_shards(spec: str | Path) -> list[Path]:
    """The shards named by ``spec``: a folder (its ``*.tar``, sorted), one ``.tar`` file, or a
    brace pattern such as ``dir/shard-{000000..000011}.tar`` (every name must exist)."""
    text = str(spec)
    if "{" in text or "}" in text:
        paths = [Path(p) for p in expand_braces(text)]
        missing = [p for p in paths if not p.is_file()]
        if len(missing) == len(paths):
            raise UnicodebookError(f"no shard matches '{text}'")
        if missing:
            raise UnicodebookError(
                f"{len(missing)} of the {len(paths)} shards named by '{text}' do not exist (first: {missing[0]})"
            )
        return paths
    path = Path(text)
    if path.is_dir():
        tars = sorted(p for p in path.glob("*.tar") if p.is_file() and not p.name.startswith("."))
        if not tars:
            raise UnicodebookError(f"no shard matches '{text}': the folder holds no .tar files")
        return tars
    if path.is_file():
        if path.suffix != ".tar":
            raise UnicodebookError(f"'{path}' is not a .tar shard")
        return [path]
    raise UnicodebookError(f"no shard matches '{text}': no such file or folder")


# ------------------------------------------------------------------------------ reading tars
@dataclass
class _Slot:
    """One sample slot of a shard: members (None when skipped) or the error that ended the shard."""

    shard: Path
    key: str
    members: dict[str, bytes] | None = None
    error: str | None = None


class _CorruptShard(Exception):
    pass


def _split_name(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _read_shard(path: Path, skip: int = 0) -> Iterator[_Slot]:
    """The sample slots of one shard, in order. The first ``skip`` slots come without members
    (their data is neither read nor decoded) but are found by the very same walk, so a slot
    count never depends on ``skip``. A shard that cannot be read to its end ends with one
    slot carrying the error (the sample being assembled when it failed is dropped)."""
    index, key, members = 0, None, {}
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tf:
            while (m := tf.next()) is not None:
                if not m.isfile():
                    continue
                k, ext = _split_name(m.name)
                if k != key:
                    if key is not None:
                        yield _Slot(path, key, members if index >= skip else None)
                        index += 1
                    key, members = k, {}
                if m.offset_data + m.size > size:
                    raise _CorruptShard(f"truncated: member {m.name} runs past the end of the file")
                if index >= skip:
                    f = tf.extractfile(m)
                    members[ext] = f.read() if f is not None else b""
            tf.fileobj.seek(tf.offset)
            if tf.fileobj.read(len(_END_OF_ARCHIVE)) != _END_OF_ARCHIVE:
                raise _CorruptShard("truncated or corrupt: no end-of-archive marker after the last readable member")
    except (tarfile.TarError, OSError, _CorruptShard) as e:
        reason = str(e) if isinstance(e, _CorruptShard) else f"unreadable tar ({e})"
        yield _Slot(path, key or "(shard)", None, reason)
        return
    if key is not None:
        yield _Slot(path, key, members if index >= skip else None)


def count_samples(shards: str | Path | Sequence[str | Path]) -> int:
    """Sample slots in ``shards`` (one epoch's worth), walking tar headers only (no data read).

    A shard that cannot be read to its end counts its readable samples plus one.
    """
    paths = _as_paths(shards)
    return sum(1 for p in paths for _ in _read_shard(p, skip=1 << 62))


def _as_paths(shards: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(shards, (str, Path)):
        return list_shards(shards)
    paths = [Path(p) for p in shards]
    if not paths:
        raise UnicodebookError("no shards given")
    return paths


# ------------------------------------------------------------------------------ decoding
def _image_member(sample: dict) -> tuple[str, bytes]:
    for ext in SHARD_IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    raise BadSampleError(f"no image member ({'/'.join(SHARD_IMAGE_EXTS[:4])})")


def decode_image_bytes(
    data: bytes, size: int | None = None, odd_size: str = "resize", name: str = "image"
) -> torch.Tensor:
    """Image bytes → (3, size, size) float in [0, 1]; :class:`BadImageError` if they cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return pil_to_tensor(img, size=size, odd_size=odd_size, name=name)
    except UnidentifiedImageError:
        raise BadImageError(f"{name}: not an image, or a corrupt one (header unreadable)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImageError(f"{name}: corrupt or truncated image ({detail})") from None


class ImageDecoder:
    """Decode a sample's image to (3, size, size); batches stack to (B, 3, size, size)."""

    def __init__(self, size: int, odd_size: str = "resize"):
        self.size, self.odd_size = size, odd_size

    def __call__(self, sample: dict) -> torch.Tensor:
        ext, data = _image_member(sample)
        return decode_image_bytes(data, self.size, self.odd_size, name=f"{sample.get('__key__')}.{ext}")

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(items) if items else torch.empty(0, 3, self.size, self.size)


@dataclass
class StreamRecord:
    """A decoded sample: its image, and its conversation and/or caption (None when absent)."""

    image: torch.Tensor  # (3, S, S) float in [0, 1]
    conversation: list[dict] | None  # [{"from": str, "value": str, ...}, ...]
    caption: str | None
    key: str = ""  # the sample's key in its shard


def _parse_conversation(data: bytes) -> list[dict]:
    try:
        turns = json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise BadSampleError(f"json member is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(turns, list) or not turns:
        raise BadSampleError("json member is not a list of conversation turns")
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise BadSampleError("json member: a turn is not {'from': str, 'value': str}")
    return turns


class RecordDecoder(ImageDecoder):
    """Decode a sample to a :class:`StreamRecord`; batches collate to a dict of lists (see :meth:`collate`)."""

    def __call__(self, sample: dict) -> StreamRecord:
        conv = _parse_conversation(sample["json"]) if "json" in sample else None
        caption = None
        if "txt" in sample:
            try:
                caption = sample["txt"].decode("utf-8").strip()
            except UnicodeDecodeError:
                raise BadSampleError("txt member is not UTF-8 text") from None
        return StreamRecord(super().__call__(sample), conv, caption, str(sample.get("__key__", "")))

    def collate(self, items: list[StreamRecord]) -> dict[str, Any]:  # type: ignore[override]
        """``{"image": (B, 3, S, S), "conversation": [...], "caption": [...], "key": [...]}``."""
        return {
            "image": super().collate([r.image for r in items]),
            "conversation": [r.conversation for r in items],
            "caption": [r.caption for r in items],
            "key": [r.key for r in items],
        }


def decode_image(size: int, odd_size: str = "resize") -> ImageDecoder:
    """A ``decode`` for :class:`ShardStream`: the sample's image as (3, size, size) in [0, 1]."""
    return ImageDecoder(size, odd_size)


def decode_record(size: int, odd_size: str = "resize") -> RecordDecoder:
    """A ``decode`` for :class:`ShardStream`: a :class:`StreamRecord` (image + conversation / caption).

    A ``json`` member that is not a list of ``{"from": str, "value": str}`` turns, or a ``txt``
    that is not UTF-8, makes the sample bad.
    """
    return RecordDecoder(size, odd_size)


def stack_items(items: list[torch.Tensor]) -> torch.Tensor:
    """The default collate for a plain ``decode`` function: stack tensors (none: an empty tensor)."""
    return torch.stack(items) if items else torch.empty(0)


# ------------------------------------------------------------------------------ streaming
def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"unicodebook.shards:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ShardStream(torch.utils.data.IterableDataset):
    """Endless, deterministic per-rank batches ``(batch, n_bad)`` read from tar shards.

    Args:
        shards: shard paths, or a spec for :func:`list_shards` (folder, file, brace pattern).
        batch_size: sample slots per batch; a batch holds that many samples minus ``n_bad``.
        decode: ``sample dict → item``; the dict maps extensions to bytes, plus ``"__key__"``
            and ``"__url__"`` (the shard path). It signals a bad sample by raising
            :class:`~unicodebook.errors.UnicodebookError` (e.g. :class:`BadImageError`,
            :class:`BadSampleError`); other exceptions are bugs and propagate.
            See :func:`decode_image` and :func:`decode_record`.
        rank, world: this process's rank among ``world`` (each reads its own shards).
        seed: seeds each epoch's shard permutation.
        start_batch: rank batches already consumed (resume); see the module docstring.
        collate: ``list of items → batch``; default ``decode.collate`` if it has one, else
            :func:`stack_items`.

    Use it directly, or in ``DataLoader(stream, batch_size=None, num_workers=W)`` (which
    hands back ``[batch, n_bad]``). Each bad sample is logged once (logger
    ``unicodebook.data``, with shard and key) and counted, never raised. A worker that reads a
    whole epoch without a single usable sample raises :class:`UnicodebookError` rather than
    spin on empty batches.
    """

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        batch_size: int,
        decode: Callable[[dict], Any],
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        start_batch: int = 0,
        collate: Callable[[list], Any] | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise UnicodebookError(f"batch size must be >= 1, got {batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise UnicodebookError(f"rank must be within 0..{world - 1} (world {world}), got {rank}")
        if start_batch < 0:
            raise UnicodebookError(f"start_batch must be >= 0, got {start_batch}")
        self.shards = _as_paths(shards)
        self.batch_size, self.decode = batch_size, decode
        self.rank, self.world, self.seed, self.start_batch = rank, world, seed, start_batch
        self.collate = collate or getattr(decode, "collate", None) or stack_items
        self._check_enough(num_workers=1)

    def _check_enough(self, num_workers: int) -> None:
        need = self.world * num_workers
        if len(self.shards) < need:
            raise UnicodebookError(
                f"{len(self.shards)} shards are too few for {self.world} ranks × {num_workers} DataLoader "
                f"workers: needs at least {need} (world × num_workers; write smaller shards, or use fewer workers)"
            )

    def shards_for(self, epoch: int, role: int = 0, num_workers: int = 1) -> list[Path]:
        """The shards that worker role ``role`` of ``num_workers`` on this rank reads in ``epoch``, in order."""
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        order = [self.shards[i] for i in torch.randperm(len(self.shards), generator=g).tolist()]
        return order[self.rank :: self.world][role::num_workers]

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        self._check_enough(num_workers)
        role = (worker + self.start_batch) % num_workers
        skip_batches = max(0, -(-(self.start_batch - role) // num_workers))  # #{b < start_batch: b % W == role}
        return self._batches(role, num_workers, skip=skip_batches * self.batch_size)

    def _batches(self, role: int, num_workers: int, skip: int) -> Iterator[tuple[Any, int]]:
        """This worker's endless batches; the first ``skip`` slots are passed over, undecoded."""
        items: list[Any] = []
        n_read = n_bad = 0
        for epoch in itertools.count():
            shards = self.shards_for(epoch, role, num_workers)
            whole_epoch_read = skip == 0
            n_slots = n_good = 0
            for path in shards:
                for slot in _read_shard(path, skip):
                    n_slots += 1
                    if skip > 0:
                        skip -= 1
                        continue
                    item = self._decode(slot)
                    n_read += 1
                    if item is None:
                        n_bad += 1
                    else:
                        items.append(item)
                        n_good += 1
                    if n_read == self.batch_size:
                        yield self.collate(items), n_bad
                        items, n_read, n_bad = [], 0, 0
            names = ", ".join(p.name for p in shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
            if n_slots == 0:
                raise UnicodebookError(f"shards {names} hold no samples")
            if whole_epoch_read and n_good == 0:
                raise UnicodebookError(f"no sample of shards {names} could be used (see the warnings)")

    def _decode(self, slot: _Slot) -> Any | None:
        """The decoded item, or None for a bad sample (logged once, with shard and key)."""
        reason = slot.error
        if reason is None:
            sample = {"__key__": slot.key, "__url__": str(slot.shard), **slot.members}
            try:
                return self.decode(sample)
            except UnicodebookError as e:
                reason = str(e)
        log.warning("skipping bad sample '%s' of shard %s: %s", slot.key, slot.shard.name, reason)
        return None
