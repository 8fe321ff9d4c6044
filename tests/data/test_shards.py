"""Tar shards (WebDataset format): packing, listing, and an endless stream with exact resume.

Every test reads small shards made on the fly; the shard order depends on fixed seeds only.
"""

import io
import itertools
import logging
import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from unicodebook.data.images import list_images, load_image
from unicodebook.data.multimodal import read_records
from unicodebook.data.shards import (
    FolderSamples,
    ShardStream,
    count_samples,
    decode_image,
    decode_record,
    expand_braces,
    list_shards,
    write_shards,
)
from unicodebook.errors import UnicodebookError


def _png(colour, size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _simple(n: int) -> list[dict]:
    return [{"__key__": f"s{i:02d}", "png": _png((10 * i, 0, 0)), "txt": f"caption {i}"} for i in range(n)]


@pytest.fixture(scope="module")
def packed(shapes_dir, tmp_path_factory):
    """The val split of the shapes world (24 images: conversations + captions) in shards of 8."""
    split = shapes_dir / "val"
    paths = write_shards(FolderSamples(split), tmp_path_factory.mktemp("shards"), samples_per_shard=8)
    return split, paths, read_records(split)


def _all_keys(rec) -> set[str]:
    return {f"conv_{i:06d}" for i in range(len(rec.conversations))} | {f"cap_{i:06d}" for i in range(len(rec.captions))}


def test_a_packed_split_reads_back_every_sample_once_with_its_texts(packed):
    split, paths, rec = packed
    n = count_samples(paths)
    assert n == len(rec.conversations) + len(rec.captions) and len(paths) == -(-n // 8)
    batch, n_bad = next(iter(ShardStream(paths, n, decode_record(32))))  # one batch = all of epoch 0
    assert n_bad == 0 and batch["image"].shape == (n, 3, 32, 32)
    assert sorted(batch["key"]) == sorted(_all_keys(rec))
    for key, image, conv, cap in zip(batch["key"], batch["image"], batch["conversation"], batch["caption"]):
        kind, i = key.split("_")
        if kind == "conv":
            r = rec.conversations[int(i)]
            assert conv == r.turns and cap is None
        else:
            r = rec.captions[int(i)]
            assert cap == r.caption and conv is None
        assert torch.equal(image, load_image(split / r.image, 32))


def test_a_plain_image_folder_packs_its_image_bytes_unchanged(shapes_dir, tmp_path):
    files = list_images(shapes_dir / "test" / "images")
    paths = write_shards(FolderSamples(shapes_dir / "test" / "images"), tmp_path / "sh", samples_per_shard=10)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not [p for p in (tmp_path / "sh").iterdir() if p.suffix != ".tar"]  # no temporary files left
    with tarfile.open(paths[0]) as tf:
        assert tf.getnames()[:2] == ["img_000000.png", "img_000001.png"]
        assert tf.extractfile("img_000001.png").read() == files[1].read_bytes()
    images, n_bad = next(iter(ShardStream(tmp_path / "sh", len(files), decode_image(32))))
    want = torch.stack([load_image(f, 32) for f in files])
    assert n_bad == 0 and images.shape == want.shape
    assert sorted(map(tuple, images.flatten(1).tolist())) == sorted(map(tuple, want.flatten(1).tolist()))
    with pytest.raises(UnicodebookError, match="already holds 3 shards"):
        write_shards(FolderSamples(shapes_dir / "test" / "images"), tmp_path / "sh", 1000)


def test_two_ranks_read_disjoint_shards_that_cover_every_sample(packed):
    _, paths, rec = packed
    keys = []
    for rank in (0, 1):
        mine = ShardStream(paths, 1, decode_record(32), rank=rank, world=2, seed=5).shards_for(epoch=0)
        stream = ShardStream(paths, count_samples(mine), decode_record(32), rank=rank, world=2, seed=5)
        batch, n_bad = next(iter(stream))
        assert n_bad == 0
        keys.append(set(batch["key"]))
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] == _all_keys(rec)


def _take(stream: ShardStream, n: int, workers: int) -> list:
    return list(itertools.islice(DataLoader(stream, batch_size=None, num_workers=workers), n))


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_at_batch_k_continues_with_exactly_the_same_batches(packed, workers):
    _, paths, rec = packed
    full = _take(ShardStream(paths, 3, decode_record(32), seed=1), 20, workers)
    resumed = _take(ShardStream(paths, 3, decode_record(32), seed=1, start_batch=3), 17, workers)
    # 60 samples read: more than one epoch for every worker, with batches across shard ends
    assert set().union(*(b["key"] for b, _ in full)) == _all_keys(rec)
    assert len(resumed) == 17
    for (a, bad_a), (b, bad_b) in zip(full[3:], resumed):
        assert a["key"] == b["key"] and a["caption"] == b["caption"] and a["conversation"] == b["conversation"]
        assert torch.equal(a["image"], b["image"]) and bad_a == bad_b == 0


def test_bad_samples_and_a_truncated_shard_are_skipped_counted_and_logged(tmp_path, caplog):
    good_conv = b'[{"from": "human", "value": "<image>\\nwhat?"}, {"from": "gpt", "value": "red"}]'
    samples = _simple(12)
    samples[1]["png"] = samples[1]["png"][:40]  # corrupt image
    samples[3]["txt"] = b"\xff\xfe not utf-8"  # wrong type
    samples[4]["json"] = good_conv
    samples[5]["json"] = b'{"from": "human", "value": "not a list"}'  # malformed conversation
    samples[6] = {"__key__": "s06", "json": good_conv}  # no image member
    paths = write_shards(samples, tmp_path / "sh", samples_per_shard=4)
    with tarfile.open(paths[2]) as tf:
        cut = tf.getmember("s10.png").offset_data + 20
    paths[2].write_bytes(paths[2].read_bytes()[:cut])  # truncated inside s10's image
    planted = {"s01", "s03", "s05", "s06", "s10"}

    n = count_samples(paths)
    assert n == 4 + 4 + 3  # the truncated shard: s08, s09, then one slot for the rest
    with caplog.at_level(logging.WARNING, logger="unicodebook.data"):
        batches = list(itertools.islice(iter(ShardStream(paths, 1, decode_record(16))), n))
    assert sum(n_bad for _, n_bad in batches) == len(planted)
    got = {k for b, _ in batches for k in b["key"]}
    assert got == {f"s{i:02d}" for i in range(10)} - planted
    empty = [b for b, n_bad in batches if n_bad]
    assert all(b["image"].shape == (0, 3, 16, 16) and b["key"] == [] for b in empty)  # steps stay aligned
    warned = [r.getMessage() for r in caplog.records if r.name == "unicodebook.data"]
    assert len(warned) == len(planted)
    for key, shard in [
        ("s01", "shard-000000.tar"),
        ("s03", "shard-000000.tar"),
        ("s05", "shard-000001.tar"),
        ("s06", "shard-000001.tar"),
        ("s10", "shard-000002.tar"),
    ]:
        assert any(f"'{key}' of shard {shard}" in m for m in warned), warned
    assert any("truncated" in m for m in warned)


def test_shards_are_listed_from_a_brace_pattern_a_folder_or_a_file(tmp_path):
    paths = write_shards(_simple(3), tmp_path / "sh", samples_per_shard=1)
    assert list_shards(f"{tmp_path}/sh/shard-{{000000..000002}}.tar") == paths == list_shards(tmp_path / "sh")
    assert list_shards(paths[1]) == [paths[1]]
    assert expand_braces("a-{08..10}-{x,y}") == ["a-08-x", "a-08-y", "a-09-x", "a-09-y", "a-10-x", "a-10-y"]
    (tmp_path / "empty").mkdir()
    for spec, message in [
        (f"{tmp_path}/sh/other-{{000000..000002}}.tar", "no shard matches"),
        (f"{tmp_path}/sh/shard-{{000000..000003}}.tar", "1 of the 4 shards named by .* do not exist"),
        (tmp_path / "empty", "no shard matches .* holds no .tar files"),
        (tmp_path / "nowhere", "no shard matches .* no such file or folder"),
    ]:
        with pytest.raises(UnicodebookError, match=message):
            list_shards(spec)


def test_fewer_shards_than_ranks_times_workers_is_a_clear_error(tmp_path):
    paths = write_shards(_simple(3), tmp_path / "sh", samples_per_shard=1)
    with pytest.raises(UnicodebookError, match="3 shards are too few .* needs at least 4"):
        ShardStream(paths, 2, decode_image(16), world=4)
    stream = ShardStream(paths, 2, decode_image(16), rank=0, world=2)  # enough for 2 ranks ...
    with pytest.raises(UnicodebookError, match="needs at least 4"):  # ... but not with 2 workers each
        next(iter(DataLoader(stream, batch_size=None, num_workers=2)))
