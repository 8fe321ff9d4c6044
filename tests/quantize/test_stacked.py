"""RQ / HQ stacking over the unified codebook: round trips, code grids, gradients."""

import pytest
import torch
from torch import nn

from unicodebook.quantize import CodebookRule, HierarchicalQuantizer, ResidualQuantizer, UnifiedCodebook


def _codebook(v=128, d=16, mode="dual"):
    emb = nn.Embedding(v, d)
    return UnifiedCodebook(torch.arange(v), d, CodebookRule(mode=mode, restart_every=0)).bind(emb)


def _trained(q):
    q.train()(torch.randn(4, 8, 8, 16))  # k-means start + one training pass
    q.pop_updates()
    return q.eval()


def test_rq_codes_are_the_greedy_nearest_rows_of_each_residual():
    """Against an independent reference: layer l's code is the float64 nearest row to what
    layers < l left, and Ẑ is the sum of the chosen rows."""
    cb = _codebook()
    q = _trained(ResidualQuantizer(cb, 3))
    z = torch.randn(2, 8, 8, 16)
    out = q(z)
    rows = cb.embed.detach().double()
    residual, total = z.reshape(-1, 16).double(), 0
    for layer in range(3):
        want = torch.cdist(residual, rows).argmin(1)
        assert torch.equal(out.codes[..., layer].reshape(-1), want)
        residual, total = residual - rows[want], total + rows[want]
    torch.testing.assert_close(out.quantized.reshape(-1, 16).double(), total, rtol=1e-5, atol=1e-5)


def test_hq_codes_to_embeddings_regroups_what_the_forward_pass_fused():
    q = _trained(HierarchicalQuantizer(_codebook(), 2))
    out = q(torch.randn(2, 8, 8, 16))
    assert torch.equal(q.codes_to_embeddings(out.codes), out.quantized)
    swapped = out.codes.clone()
    swapped[..., 2:] = swapped[..., 2:].flip(-1)  # the same codes, the bottom block in another order
    assert not torch.allclose(q.codes_to_embeddings(swapped), out.quantized)


def test_rq_code_grid_and_residual_refinement():
    cb = _codebook(v=256)
    cb.kmeans_init(torch.randn(4096, 16))
    z = torch.randn(2, 4, 4, 16)
    errs = []
    for depth in (1, 2, 4):
        out = ResidualQuantizer(cb, depth).eval()(z)
        assert out.codes.shape == (2, 4, 4, depth)
        errs.append(float((out.quantized - z).pow(2).mean()))
    assert errs[0] > errs[1] > errs[2]  # each extra layer quantizes the residual further


def test_hq_groups_one_top_and_four_bottom_codes_per_top_position():
    q = HierarchicalQuantizer(_codebook(), depth=1).eval()
    out = q(torch.randn(3, 16, 16, 16))
    assert out.codes.shape == (3, 8, 8, 5)  # 8×8 top + 16×16 bottom = 320 codes
    top, bottom = q.ungroup_codes(out.codes)
    assert top.shape == (3, 8, 8, 1) and bottom.shape == (3, 16, 16, 1)
    assert torch.equal(q.group_codes(top, bottom), out.codes)
    # a top cell's bottom codes are the 2×2 latent block under it, row by row
    assert torch.equal(out.codes[0, 2, 3, 1:], bottom[0, 4:6, 6:8, 0].flatten())


def test_hq_code_layers_count_each_level_as_it_occurs():
    q = HierarchicalQuantizer(_codebook(), depth=2).eval()
    codes = q(torch.randn(2, 8, 8, 16)).codes
    top, bottom = q.ungroup_codes(codes)
    cols = q.code_layers(codes)
    assert q.layer_names == ["top 0", "top 1", "bottom 0", "bottom 1"] and cols.shape == (2 * 8 * 8, 4)
    count = lambda c: torch.bincount(c.flatten(), minlength=128)  # noqa: E731
    for layer in range(2):  # a top code covers 4 latent cells: its counts are scaled, not changed in shape
        assert torch.equal(count(cols[:, layer]), 4 * count(top[..., layer]))
        assert torch.equal(count(cols[:, 2 + layer]), count(bottom[..., layer]))


def test_rq_straight_through_passes_the_gradient_unchanged_to_the_encoder_output():
    q = ResidualQuantizer(_codebook(), 2).train()
    z = torch.randn(2, 4, 4, 16, requires_grad=True)
    weights = torch.randn(2, 4, 4, 16)
    (q(z).quantized * weights).sum().backward()
    assert torch.equal(z.grad, weights)  # d Ẑ / d z = identity in training
    z.grad = None
    q(z).loss.backward()  # the commitment term pulls z towards its codes
    assert z.grad.abs().sum() > 0


def test_hq_gradient_reaches_the_encoder_output_through_both_levels():
    q = HierarchicalQuantizer(_codebook(), 1).train()
    z = torch.randn(2, 4, 4, 16, requires_grad=True)
    q(z).quantized.sum().backward()
    assert z.grad.abs().sum() > 0 and q.down.weight.grad.abs().sum() > 0  # bottom path and top path


def test_hq_rejects_odd_latent():
    q = HierarchicalQuantizer(_codebook(), depth=1)
    with pytest.raises(ValueError, match="even latent"):
        q(torch.randn(1, 5, 5, 16))


def test_usage_entropy_term_spreads_codes_over_a_frozen_codebook():
    """With the codebook fixed (frozen / end of the iterative ramp) only the encoder can raise usage."""
    torch.manual_seed(0)
    cb = _codebook(v=64, mode="frozen")
    with torch.no_grad():
        cb.embed.copy_(torch.randn(64, 16) * 0.1)
    x = torch.randn(512, 8)
    base = torch.randn(16) * 0.1  # a collapsed encoder: every input lands near one point
    enc = nn.Linear(8, 16)
    with torch.no_grad():
        enc.weight.mul_(0.01)
        enc.bias.copy_(base)
    q = ResidualQuantizer(cb, depth=1, entropy_weight=1.0).train()
    used_before = q(enc(x).reshape(8, 8, 8, 16)).codes.unique().numel()
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    for _ in range(100):
        loss = q.usage_entropy_loss(enc(x).reshape(8, 8, 8, 16), q(enc(x).reshape(8, 8, 8, 16)).codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.pop_updates()
    used_after = q(enc(x).reshape(8, 8, 8, 16)).codes.unique().numel()
    assert used_before <= 8 and used_after >= 48


def test_usage_entropy_term_is_off_for_a_dual_codebook_that_follows_the_data():
    cb = _codebook(mode="dual")
    q = ResidualQuantizer(cb, depth=1, entropy_weight=1.0).train()
    assert q(torch.randn(2, 4, 4, 16)).usage_loss is None
    cb.rule.mode = "frozen"
    assert q(torch.randn(2, 4, 4, 16)).usage_loss is not None


def test_split_rows_give_each_layer_its_own_block_and_round_trip():
    cb = _codebook(v=128)
    q = ResidualQuantizer(cb, 4, layer_rows="split").train()
    q(torch.randn(4, 8, 8, 16))  # residual k-means start + one training pass
    q.pop_updates()
    q.eval()
    z = torch.randn(2, 8, 8, 16)
    out = q(z)
    for layer in range(4):  # layer l writes only rows [32·l, 32·(l+1))
        col = out.codes[..., layer]
        assert int(col.min()) >= 32 * layer and int(col.max()) < 32 * (layer + 1)
    assert torch.equal(q.codes_to_embeddings(out.codes), out.quantized)


def test_split_rows_started_by_residual_kmeans_beat_one_shared_table_at_depth():
    # equal bits, 6 a code: shared (every layer searches the same 64 rows, started on the raw
    # features) or split (64 rows a layer, each block started on what the layers before it left)
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(2, 4096, 16, generator=g).unbind(0)
    err = {}
    for rows, v in (("shared", 64), ("split", 256)):
        q = ResidualQuantizer(_codebook(v=v), 4, layer_rows=rows).train()
        q(train.reshape(16, 16, 16, 16))
        q.pop_updates()
        err[rows] = float((q.eval()(test.reshape(16, 16, 16, 16)).quantized.reshape(-1, 16) - test).pow(2).mean())
    assert err["split"] < 0.9 * err["shared"]


def test_split_rows_restart_a_dead_row_from_its_own_layer():
    emb = nn.Embedding(8, 4)
    cb = UnifiedCodebook(torch.arange(8), 4, CodebookRule(mode="dual", restart_every=1, dead_threshold=0.5)).bind(emb)
    cb.split_rows(2)
    cb.initialised.fill_(True)
    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(64, 4, generator=g) * 10, torch.randn(64, 4, generator=g) * 0.01
    codes = torch.cat([torch.zeros(64, dtype=torch.long), torch.full((64,), 4)])  # rows 0 and 4 alone used
    cb.ema_count.fill_(0.0)
    assert cb.update(torch.cat([big, small]), codes, progress=0.5, step=1, generator=g) == 6
    assert cb.embed[5:8].norm(dim=1).max() < 0.2  # layer 1's rows restart among layer 1's small residuals
    assert cb.embed[1:4].norm(dim=1).min() > 1.0  # layer 0's among its large features


def test_split_rows_refuse_what_cannot_split():
    with pytest.raises(ValueError, match="do not split into 3 equal blocks"):
        ResidualQuantizer(_codebook(v=128), 3, layer_rows="split")
    from unicodebook.quantize.stacked import build_quantizer

    with pytest.raises(ValueError, match="needs the rq quantizer"):
        build_quantizer("hq", _codebook(v=128), 2, 0.25, layer_rows="split")
