"""The optimizers of stage II: Muon takes the hidden layers' matrices and AdamW the tables, the
combined optimizer resumes exactly from its state dict, and it is refused where it cannot work.
(The tiny preset trains with Muon, so every stage II test of the suite trains with it too.)"""

import copy

import pytest
import torch
from conftest import tiny_config
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from unicodebook.config import load_config
from unicodebook.errors import ConfigError
from unicodebook.train.engine import by_index, by_name, param_names
from unicodebook.train.optim import MuonWithAdamW, build_optimizer, hidden_matrices
from unicodebook.train.stage2 import train_lm


class _Model(nn.Module):
    """A small Llama and a depth-head-like block beside it, as stage II trains them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
        self.llm = LlamaForCausalLM(cfg)
        self.block = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.pos = nn.Parameter(torch.randn(4, 32) * 0.02)

    def loss(self, ids):
        h = self.llm.model(input_ids=ids).last_hidden_state
        h = self.block(h + self.pos[: h.shape[1]].sum(0))
        return nn.functional.cross_entropy(self.llm.lm_head(h)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_muon_takes_the_hidden_matrices_and_adamw_the_tables_norms_and_head():
    m = _Model()
    names = {id(p): n for n, p in m.named_parameters()}
    muon = sorted(names[i] for i in hidden_matrices(m))
    assert "llm.model.layers.0.self_attn.q_proj.weight" in muon
    assert "llm.model.layers.1.mlp.down_proj.weight" in muon
    assert "block.self_attn.in_proj_weight" in muon and "block.linear1.weight" in muon
    for other in ("llm.model.embed_tokens.weight", "llm.lm_head.weight", "pos", "llm.model.norm.weight"):
        assert other not in muon
    assert all(p.ndim == 2 for n, p in m.named_parameters() if n in muon)
    opt = build_optimizer(m, "muon", 1e-3, [0.9, 0.95], 0.0)
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in m.parameters())  # every parameter once
    assert {id(p) for p in opt.param_groups[0]["params"]} == hidden_matrices(m)


def test_a_muon_state_keyed_by_name_goes_back_to_the_right_parameters():
    """The by-name layout an FSDP resume loads: each state entry must land on the parameter it
    was saved for, although Muon orders its parameters matrices first, not as named_parameters."""
    m = _Model()
    opt = build_optimizer(m, "muon", 1e-3, [0.9, 0.95], 0.0)
    m.loss(torch.randint(0, 64, (2, 4))).backward()
    opt.step()
    names = param_names(m, opt)
    assert names != [n for n, _ in m.named_parameters()]  # the case the old order got wrong
    state = opt.state_dict()
    keyed = by_name(state, names)
    params = dict(m.named_parameters())
    for name, st in keyed["state"].items():
        assert st["momentum_buffer" if "momentum_buffer" in st else "exp_avg"].shape == params[name].shape
    back = by_index(keyed)
    assert back["param_groups"] == state["param_groups"]
    assert back["state"].keys() == state["state"].keys()


def _steps(model, opt, batches):
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = model.loss(ids)
        loss.backward()
        opt.step()
    return float(loss.detach())


def test_muon_resumes_exactly_from_its_state_dict_and_its_loss_falls():
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 64, (4, 12), generator=gen)
    batches = [base.roll(i, 1) for i in range(12)]
    ref = _Model()
    opt = build_optimizer(ref, "muon", 3e-3, [0.9, 0.95], 0.01)
    with torch.no_grad():
        first = float(ref.loss(batches[0]))
    last = _steps(ref, opt, batches)
    assert last < 0.8 * first

    half = _Model()
    opt = build_optimizer(half, "muon", 3e-3, [0.9, 0.95], 0.01)
    _steps(half, opt, batches[:6])
    saved_weights, saved_state = copy.deepcopy(half.state_dict()), copy.deepcopy(opt.state_dict())

    resumed = _Model()
    resumed.load_state_dict(saved_weights)
    opt = build_optimizer(resumed, "muon", 3e-3, [0.9, 0.95], 0.01)
    assert isinstance(opt, MuonWithAdamW)
    opt.load_state_dict(saved_state)
    for group in opt.param_groups:  # the loop's schedule writes the lr into every group
        group["lr"] = 3e-3
    _steps(resumed, opt, batches[6:])
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{n} differs after resume"


def test_one_sided_parameter_lists_build_and_step():
    m = _Model()
    only = [m.llm.model.layers[0].mlp.up_proj.weight]
    for matrices, others in ((only, []), ([], [m.pos])):
        opt = MuonWithAdamW(matrices, others, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        p = (matrices or others)[0]
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        opt.step()
        assert not torch.equal(before, p.detach())


def test_an_unknown_optimizer_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"^train_lm.optimizer: 'sgd' is not one of adamw, muon$"):
        load_config("tiny", ["train_lm.optimizer=sgd"])


def test_muon_under_fsdp_is_refused_before_training(tokenizer_run, shapes_dir, tmp_path, monkeypatch):
    from unicodebook.errors import UnicodebookError
    from unicodebook.train.engine import Engine

    monkeypatch.setattr(Engine, "shards_parameters", property(lambda self: True))
    cfg = tiny_config("train_lm.steps=2", "train_lm.optimizer=muon", "train_lm.save_every=0")
    with pytest.raises(UnicodebookError, match="optimizer=muon needs whole weight matrices, and FSDP shards them"):
        train_lm(cfg, tokenizer_run, shapes_dir, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
