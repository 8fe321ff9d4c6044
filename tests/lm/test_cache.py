"""The in-place KV cache of our decoding loops gives the default cache's logits, past its
reservation too, and leaves caches it does not know alone."""

import pytest
import torch

from unicodebook.lm.cache import DynamicLayer, reserve_cache
from unicodebook.lm.llm import cache_argument, kv_cache

pytestmark = pytest.mark.skipif(DynamicLayer is None, reason="this transformers has no cache layers")


def _llm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    ).eval()


@pytest.mark.parametrize("extra", [6, 3])  # 3: the last steps go past the reservation
def test_reserved_cache_decodes_as_the_default_cache(extra):
    llm = _llm()
    name = cache_argument(llm)
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # left padding, as our decoding batches
    steps = torch.randint(12, 40, (6, 2))
    logits = {}
    with torch.no_grad():
        for reserved in (False, True):
            m = mask.clone()
            out = llm(input_ids=ids, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp_min(0), use_cache=True)
            cache = kv_cache(out)
            if reserved:
                cache = reserve_cache(cache, extra)
                assert all(type(layer) is not DynamicLayer for layer in cache.layers)
            pos = m.sum(-1)
            got = []
            for visual_tok in steps:
                m = torch.cat([m, m.new_ones(2, 1)], 1)
                out = llm(
                    input_ids=visual_tok[:, None],
                    attention_mask=m,
                    position_ids=pos[:, None],
                    use_cache=True,
                    **{name: cache},
                )
                cache, pos = kv_cache(out), pos + 1
                got.append(out.logits[:, -1])
            logits[reserved] = torch.stack(got)
            assert cache.get_seq_length() == 4 + len(steps)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-6)


def test_caches_of_other_kinds_are_left_alone():
    assert reserve_cache(None, 8) is None
    legacy = ((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)),)  # the tuples of older releases
    assert reserve_cache(legacy, 8) is legacy
