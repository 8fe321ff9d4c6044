"""The multimodal LLM: Ẑ spliced at the image slots, constrained decoding with a KV cache that
always yields a decodable image, and a model folder that round-trips."""

import shutil

import pytest
import torch

from unicodebook.errors import UnicodebookError
from unicodebook.lm.model import load_model


@pytest.fixture(scope="module")
def model(model_run):
    return load_model(model_run)


def test_latents_replace_exactly_the_image_slots(model):
    assert model.image_positions is not None  # on by default; the Ẑ content itself is never transformed
    codes = torch.randint(0, model.tokenizer.codebook.num_codes, (2, *model.tokenizer.grid_shape))
    ids, at = model.fmt.prompt("what colour is the object in the center?")
    input_ids = torch.tensor([ids, ids])
    image_at = torch.tensor([at, -1])
    z = model.latents(codes[:1])
    emb = model.embed_inputs(input_ids, image_at, z)
    plain = model.llm.get_input_embeddings()(input_ids)
    n = model.tokenizer.num_latents
    assert torch.allclose(emb[0, at : at + n], z[0] + model.image_positions.latents())  # Ẑ plus where each slot sits
    assert torch.equal(emb[0, :at], plain[0, :at]) and torch.equal(emb[0, at + n :], plain[0, at + n :])
    assert torch.equal(emb[1], plain[1])


def test_sampling_settings_do_what_they_say(model):
    """Greedy is top-1 sampling; a seed repeats a sample and another seed changes it; guidance
    changes what the prompt alone would give; every result decodes to an image of the run's size."""
    prompts = [
        "draw a small red circle at the top left",
        "draw a large blue square in the center and a small green triangle at the top",
    ]

    def draw(cfg_scale, temperature, top_k, seed=0):
        return model.generate_codes(prompts, cfg_scale, temperature, top_k, torch.Generator().manual_seed(seed))

    greedy = draw(1.0, 0.0, 0)
    assert torch.equal(draw(1.0, 1.0, 1, seed=3), greedy)
    sampled = draw(1.0, 1.0, 0, seed=1)
    assert torch.equal(draw(1.0, 1.0, 0, seed=1), sampled) and not torch.equal(draw(1.0, 1.0, 0, seed=2), sampled)
    assert not torch.equal(draw(3.0, 0.0, 0), greedy)
    size = model.tokenizer.image_size
    assert tuple(model.tokenizer.decode(sampled).shape) == (2, 3, size, size)


def test_kv_cache_decoding_matches_full_recomputation(model):
    """Greedy constrained decoding with the cache gives the codes a cache-free loop gives."""
    prompt = "draw a small red circle at the top left"
    fast = model.generate_codes([prompt], cfg_scale=1.0, temperature=0.0).flatten()
    ids = model.fmt.t2i_prefix(prompt)
    start = len(ids)
    slow = []
    with torch.no_grad():
        for _ in range(12):
            x = torch.tensor([ids])
            emb = model.embed_inputs(
                x, torch.tensor([-1]), None, torch.tensor([start]), torch.tensor([len(ids) - start])
            )
            logits = model.llm(inputs_embeds=emb).logits[0, -1]
            k = int(logits[model.code_token_ids].argmax())
            slow.append(k)
            ids.append(int(model.code_token_ids[k]))
    assert fast[:12].tolist() == slow


def test_answers_use_text_tokens_only(model, monkeypatch):
    """On the raw ids the decoder chose (decoding with skip_special_tokens would hide markers)."""
    decoded: list[list[int]] = []
    decode = model.text_tok.decode

    def record(ids, **kw):
        decoded.append(list(ids))
        return decode(ids, **kw)

    monkeypatch.setattr(model.text_tok, "decode", record)
    codes = torch.randint(0, model.tokenizer.codebook.num_codes, (3, *model.tokenizer.grid_shape))
    model.answer(codes, ["what colour is the object in the center?"] * 3, max_new_tokens=4)
    chosen = {i for ids in decoded for i in ids}
    assert len(decoded) == 3 and chosen
    markers = set(model.text_tok.convert_tokens_to_ids(["<img>", "</img>", "<image>"]))
    assert chosen.isdisjoint(model.code_token_ids.tolist()) and chosen.isdisjoint(markers)


def test_seeded_generation_is_reproducible(model):
    a = model.generate_image("draw a small red circle at the top left", n=2, seed=3)
    b = model.generate_image("draw a small red circle at the top left", n=2, seed=3)
    assert torch.equal(a, b)


def test_model_folder_without_a_bound_tokenizer_is_refused(model_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_run, broken)
    shutil.rmtree(broken / "text_tokenizer")
    with pytest.raises(UnicodebookError, match=r"no bound text tokenizer \(missing text_tokenizer\)"):
        load_model(broken)
    with pytest.raises(UnicodebookError, match="not a model folder"):
        load_model(tmp_path)


def test_a_prompt_longer_than_the_context_is_refused(model):
    long = "draw " + " and ".join(["a small red circle at the top left"] * 200)
    with pytest.raises(UnicodebookError, match="needs .* positions but the model's context is"):
        model.generate_codes([long], 1.0, 0.0, 0)


def test_decoding_kernels_compute_the_same_linear_and_leave_the_model_as_it_was():
    from torch import nn

    from unicodebook.lm.model import decoding_kernels

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 96), nn.Linear(96, 32, bias=False))
    for rows in (1, 2, 16, 100):  # 100 rows: the plain F.linear path
        x = torch.randn(rows, 1, 48)
        ref = net(x)
        with decoding_kernels(net):
            got = net(x)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # a column-major input (what W·xᵀ returns when transposed back, carried through an elementwise
    # op such as SiLU(gate)·up) gives the same result and a row-major output, so the layout that
    # sends MKL down its 3× slower path never reaches the next layer
    x = torch.randn(48, 4).t()[:, None]
    with decoding_kernels(net):
        hidden = net[0](x)
        got = net[1](hidden * 2)
    torch.testing.assert_close(got, net[1](net[0](x) * 2), rtol=1e-5, atol=1e-6)
    assert hidden.is_contiguous() and got.is_contiguous()
    assert all("forward" not in layer.__dict__ for layer in net)  # the patch is gone


def test_the_kv_cache_goes_by_the_name_the_llm_forward_takes():
    """Current transformers take the cache as ``cache`` (``past_key_values`` is deprecated there);
    older releases and other causal LMs as ``past_key_values``: decoding uses whichever exists."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unicodebook.lm.llm import cache_argument, kv_cache

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return {"past_key_values": past_key_values}

    assert cache_argument(OldStyle()) == "past_key_values"
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    name = cache_argument(llm)
    first = llm(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    cache = kv_cache(first)
    step = llm(input_ids=torch.tensor([[4]]), use_cache=True, **{name: cache})
    full = llm(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-5)  # the cache was taken, not ignored
