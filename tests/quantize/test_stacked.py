"""RQ / HQ stacking over the unified codebook: round trips, code grids, gradients."""

import pytest
import torch
from torch import nn

from unicodebook.quantize import CodebookRule, HierarchicalQuantizer, ResidualQuantizer, UnifiedCodebook


def _codebook(v=128, d=16, mode="dual"):
    emb = nn.Embedding(v, d)
    return UnifiedCodebook(torch.arange(v), d, CodebookRule(mode=mode, restart_every=0)).bind(emb)


@pytest.mark.parametrize("kind", ["rq", "hq"])
def test_codes_to_embeddings_equals_quantized_output_in_eval(kind):
    cb = _codebook()
    q = (ResidualQuantizer(cb, 3) if kind == "rq" else HierarchicalQuantizer(cb, 2)).train()
    q(torch.randn(4, 8, 8, 16))  # k-means init + one training pass
    q.pop_updates()
    q.eval()
    z = torch.randn(2, 8, 8, 16)
    out = q(z)
    assert torch.equal(q.codes_to_embeddings(out.codes), out.quantized)


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
    top, bottom = out.layer_codes
    assert top.shape == (3, 8, 8, 1) and bottom.shape == (3, 16, 16, 1)
    t, b = q.ungroup_codes(out.codes)
    assert torch.equal(t, top) and torch.equal(b, bottom)
    assert torch.equal(out.codes[0, 2, 3, 1:], bottom[0, 4:6, 6:8, 0].flatten())


@pytest.mark.parametrize("kind", ["rq", "hq"])
def test_straight_through_gradient_reaches_the_encoder_output(kind):
    cb = _codebook()
    q = (ResidualQuantizer(cb, 2) if kind == "rq" else HierarchicalQuantizer(cb, 1)).train()
    z = torch.randn(2, 4, 4, 16, requires_grad=True)
    out = q(z)
    (out.quantized.sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


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
