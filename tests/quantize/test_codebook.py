"""The unified codebook's three update rules, restarts, and distributed synchronisation."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from unicodebook.quantize import CodebookRule, ResidualQuantizer, UnifiedCodebook


def _llm_embedding(v=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = nn.Embedding(v, d)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(v, d, generator=g) * 0.02)
    return emb


def _codebook(mode, rows=range(16, 48), **kw):
    emb = _llm_embedding()
    rule = CodebookRule(mode=mode, restart_every=kw.pop("restart_every", 0), **kw)
    return UnifiedCodebook(torch.tensor(list(rows)), 16, rule).bind(emb), emb


def _train(cb, steps=20, seed=1, scale=1.0):
    """Drive the codebook with a quantizer over random features, as stage I would."""
    q = ResidualQuantizer(cb, depth=2).train()
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        z = torch.randn(8, 4, 4, 16, generator=g) * scale
        q(z)
        cb.update(*q.pop_updates(), progress=(step + 1) / steps, step=step)
    return q


def test_code_ids_are_llm_token_ids():
    cb, _ = _codebook("frozen", rows=[5, 9, 40])
    codes = torch.tensor([[0, 2], [1, 1]])
    assert cb.codes_to_token_ids(codes).tolist() == [[5, 40], [9, 9]]
    assert torch.equal(cb.token_ids_to_codes(torch.tensor([40, 5])), torch.tensor([2, 0]))
    with pytest.raises(ValueError):
        cb.token_ids_to_codes(torch.tensor([6]))


def test_frozen_keeps_llm_bit_identical_and_codebook_equal_to_it():
    cb, emb = _codebook("frozen")
    before = emb.weight.detach().clone()
    _train(cb)
    assert torch.equal(emb.weight, before)
    assert torch.equal(cb.embed, before[16:48])


def test_iterative_ends_equal_to_language_codebook_and_never_writes_llm():
    cb, emb = _codebook("iterative", align_start=0.3, align_end=0.6, restart_every=3, dead_threshold=0.5)
    before = emb.weight.detach().clone()
    q = ResidualQuantizer(cb, depth=2).train()
    g = torch.Generator().manual_seed(1)
    steps, mid_cos = 20, None
    for step in range(steps):
        q(torch.randn(8, 4, 4, 16, generator=g))
        cb.update(*q.pop_updates(), progress=(step + 1) / steps, step=step)
        if step == 4:  # before the pull starts: learned from data, each code at its token's norm
            mid_cos = cb.alignment()["cosine"]
            torch.testing.assert_close(cb.embed.norm(dim=1), before[16:48].norm(dim=1), rtol=1e-4, atol=1e-6)
        assert torch.equal(emb.weight, before)
    assert mid_cos < 0.99
    assert torch.equal(cb.embed, before[16:48])  # exactly C_L at the end of the ramp
    assert cb.alignment()["cosine"] == pytest.approx(1.0)


def test_iterative_ramp_is_linear_between_start_and_end():
    rule = CodebookRule(mode="iterative", align_start=0.2, align_end=0.6)
    assert [rule.language_weight(p) for p in (0.0, 0.2, 0.4, 0.6, 0.9)] == pytest.approx([0, 0, 0.5, 1, 1])


def test_dual_writes_its_codebook_into_the_llm_rows_only():
    cb, emb = _codebook("dual", dual_sync_every=5)
    before = emb.weight.detach().clone()
    _train(cb, steps=10)
    assert torch.equal(emb.weight[16:48], cb.embed)  # synced at step 9
    assert not torch.equal(emb.weight[16:48], before[16:48])
    assert torch.equal(emb.weight[:16], before[:16]) and torch.equal(emb.weight[48:], before[48:])


def test_dead_codes_are_restarted_from_batch_features():
    cb, _ = _codebook("dual", restart_every=2, dead_threshold=0.9, dual_sync_every=1000, ema_decay=0.5)
    cb.initialised.fill_(True)  # skip k-means: start from the LLM rows
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(256, 16, generator=g) * 5 + 20  # far from every code
    codes = cb.search(feats)[0]
    assert codes.unique().numel() <= 8  # collapse: everything on a few codes
    for step in range(1, 5):
        cb.update(feats, cb.search(feats)[0], progress=0.5, step=step, generator=torch.Generator().manual_seed(step))
    used = cb.search(feats)[0].unique().numel()
    assert used >= 24  # the dead codes now sit among the features and get used
    centre = feats.mean(0)
    assert (cb.embed - centre).norm(dim=1).max() < (feats - centre).norm(dim=1).max()  # all inside the cloud


def test_kmeans_init_starts_with_high_usage():
    cb, _ = _codebook("iterative")
    feats = torch.randn(1024, 16)
    assert not bool(cb.initialised)
    cb.kmeans_init(feats)
    assert cb.search(feats)[0].unique().numel() >= 30  # of 32 rows


def test_kmeans_init_on_a_plain_background_starts_every_code_apart():
    # a mostly plain picture: 90% of the features are the one background vector
    cb, _ = _codebook("iterative")
    background = torch.randn(1, 16).expand(920, 16)
    feats = torch.cat([background, torch.randn(104, 16)])[torch.randperm(1024)]
    cb.kmeans_init(feats)
    assert torch.unique(cb.embed, dim=0).shape[0] == 32  # no centroid drawn twice from the background


# ---------------------------------------------------------------- distributed EMA (2 gloo ranks)
def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cb, _ = _codebook("dual", restart_every=3, dead_threshold=0.3, dual_sync_every=1000)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for step in range(1, 7):
        feats = torch.randn(64, 16, generator=g) * (1 + rank)
        gen = torch.Generator().manual_seed(step * 10 + rank)  # different RNG per rank, on purpose
        cb.update(feats, cb.search(feats)[0], progress=0.5, step=step, generator=gen)
    torch.save({"embed": cb.embed, "count": cb.ema_count}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ema_statistics_and_restarts_are_synchronised_across_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0 = torch.load(os.path.join(tmp, "rank0.pt"))
        r1 = torch.load(os.path.join(tmp, "rank1.pt"))
    assert torch.equal(r0["embed"], r1["embed"])
    assert torch.equal(r0["count"], r1["count"])


def _halves():
    g = torch.Generator().manual_seed(5)
    return torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g) * 2


def _half_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cb, _ = _codebook("dual", restart_every=0, dual_sync_every=1000)
    for step in (1, 2):
        feats = _halves()[rank]  # each rank sees only its half of the global batch
        cb.update(feats, cb.search(feats)[0], progress=0.5, step=step)
    torch.save(
        {k: getattr(cb, k).clone() for k in ("ema_count", "ema_sum", "embed")}, os.path.join(out_dir, f"{rank}.pt")
    )
    dist.destroy_process_group()


def test_ema_update_on_two_ranks_equals_one_process_on_the_global_batch():
    """The all-reduced statistics are those of the concatenated batch: two gloo ranks with a
    half each end where one process with both halves ends."""
    one, _ = _codebook("dual", restart_every=0, dual_sync_every=1000)
    for step in (1, 2):
        both = torch.cat(_halves())
        one.update(both, one.search(both)[0], progress=0.5, step=step)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_half_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in (0, 1)]
    alone, _ = _codebook("dual", restart_every=0, dual_sync_every=1000)  # rank 0's half, no all-reduce
    for step in (1, 2):
        alone.update(_halves()[0], alone.search(_halves()[0])[0], progress=0.5, step=step)
    for r in ranks:
        for k in ("ema_count", "ema_sum", "embed"):
            torch.testing.assert_close(r[k], getattr(one, k))
    assert not torch.allclose(alone.ema_count, one.ema_count)  # the halves do differ
