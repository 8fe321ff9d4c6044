"""The compiled Llama-family decoding step (lm/cpu_decoder.py) against transformers' own step."""

from __future__ import annotations

import shutil

import pytest
import torch

from unicodebook.lm.cpu_decoder import CPUDecoder, unsupported
from unicodebook.lm.llm import cache_argument, kv_cache

needs_kernel = pytest.mark.skipif(
    shutil.which("cc") is None or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="needs a C compiler and an AVX2 CPU",
)

pytestmark = pytest.mark.usefixtures("own_kernel_cache")


def tiny(family: str, **over):
    """A random 2-layer model of ``family``: grouped-query heads, head_dim 16, an MLP width and a
    vocabulary that are not multiples of the kernel's tiles."""
    import transformers

    kw = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=90,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=500.0,
        tie_word_embeddings=False,
    )
    kw.update(over)
    config = getattr(transformers, f"{family}Config")(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # random biases and norm weights, so a wrong index or order shows
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


def prefill(model, lengths=(5, 9, 2)):
    """A left-padded batch of prompts of different lengths through transformers."""
    g = torch.Generator().manual_seed(1)
    n = max(lengths)
    ids = torch.randint(3, 100, (len(lengths), n), generator=g)
    mask = torch.zeros_like(ids)
    for i, m in enumerate(lengths):
        mask[i, n - m :] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    return out.logits[:, -1], kv_cache(out), mask, pos[:, -1] + 1


@needs_kernel
@pytest.mark.parametrize(
    "family,over",
    [
        ("Llama", {}),
        ("Qwen2", {}),
        ("Mistral", {"sliding_window": None}),
        ("Llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
        ("Llama", {"head_dim": 40}),
        ("Llama", {"head_dim": 72}),
        ("Llama", {"head_dim": 12}),
    ],
)
@torch.inference_mode()
def test_each_step_gives_transformers_logits(family, over):
    """Left padding, grouped-query heads, biases, the model's rotary tables and head sizes that
    take each of attention's vector paths (16: eight floats at a time; 40: a block of 32, then 8;
    72: a block of 64, then 8; 12: not a multiple of 8): the
    logits of every step match transformers' own decoding (its KV cache, its masks) to fp32
    rounding."""
    model = tiny(family, **over)
    assert unsupported(model, 64) is None
    _, cache, mask, pos = prefill(model)
    steps = 7
    ours = CPUDecoder(model, cache, mask, pos, steps)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        visual_tok = torch.randint(3, 100, (mask.shape[0], 1), generator=g)
        mask = torch.cat([mask, torch.ones_like(visual_tok)], 1)
        out = model(
            input_ids=visual_tok,
            attention_mask=mask,
            position_ids=pos[:, None],
            use_cache=True,
            **{cache_argument(model): cache},
        )
        cache, pos = kv_cache(out), pos + 1
        got = ours.step(model.get_input_embeddings()(visual_tok))
        torch.testing.assert_close(got, out.logits[:, -1], atol=2e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="made for 16 positions"):
        ours.step(model.get_input_embeddings()(visual_tok))


@needs_kernel
@torch.inference_mode()
def test_decodes_in_the_buffers_reserve_cache_made():
    """After the model's prefill (``reserve_cache``) the decoder writes into the cache's own
    reserved buffers instead of a second copy of the whole cache, and still gives
    transformers' logits."""
    from unicodebook.lm.cache import reserve_cache

    model = tiny("Llama")
    steps = 4
    _, reserved, mask, pos = prefill(model)
    reserved = reserve_cache(reserved, steps)
    ours = CPUDecoder(model, reserved, mask, pos, steps)
    for i, layer in enumerate(reserved.layers):
        k, v = layer.reserved()
        assert ours.k[i].data_ptr() == k.data_ptr() and ours.v[i].data_ptr() == v.data_ptr()
    _, cache, mask, pos = prefill(model)  # transformers' own, separate
    for visual_tok in torch.tensor([[7, 8, 9], [10, 11, 12], [3, 4, 5], [60, 61, 62]]):
        visual_tok = visual_tok[:, None]
        mask = torch.cat([mask, torch.ones_like(visual_tok)], 1)
        out = model(
            input_ids=visual_tok,
            attention_mask=mask,
            position_ids=pos[:, None],
            use_cache=True,
            **{cache_argument(model): cache},
        )
        cache, pos = kv_cache(out), pos + 1
        torch.testing.assert_close(
            ours.step(model.get_input_embeddings()(visual_tok)), out.logits[:, -1], atol=2e-5, rtol=1e-4
        )


@needs_kernel
@torch.inference_mode()
def test_logits_restricted_to_rows_are_those_rows():
    """Image generation only reads the code ids' logits: a contiguous run (a view of the output
    layer) or any index set (a gathered copy) gives exactly those columns of the full logits."""
    model = tiny("Llama")
    emb = model.get_input_embeddings()(torch.tensor([[7], [8], [9]]))
    _, cache, mask, pos = prefill(model)
    full = CPUDecoder(model, cache, mask, pos, 1).step(emb)
    for rows in (torch.arange(40, 72), torch.tensor([3, 99, 50, 4])):
        _, cache, mask, pos = prefill(model)
        torch.testing.assert_close(
            CPUDecoder(model, cache, mask, pos, 1, out_rows=rows).step(emb), full[:, rows], atol=1e-6, rtol=1e-6
        )


@needs_kernel
def test_what_it_cannot_decode_is_named():
    model = tiny("Llama")
    with torch.inference_mode():
        assert unsupported(model, 64) is None
    assert unsupported(model, 64) == "autograd is on (the kernels have no backward)"
    with torch.inference_mode():
        assert (
            unsupported(tiny("Mistral", sliding_window=8), 64)
            == "layer 0: a sliding window of 8 positions (decoding reaches 64)"
        )
        assert unsupported(tiny("Mistral", sliding_window=8), 8) is None
        assert unsupported(tiny("Llama", hidden_act="gelu"), 64) == "only SiLU MLPs without tensor-parallel slicing"
        assert unsupported(model.to(torch.bfloat16), 64) == "fp32 weights on the CPU only"
        assert (
            unsupported(tiny("Gemma", head_dim=16), 64)
            == "GemmaForCausalLM is not one of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
        )
        from peft import LoraConfig, get_peft_model

        lora = get_peft_model(tiny("Llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).base_model.model
        assert (
            unsupported(lora, 64)
            == "layer 0: its projections are not plain contiguous nn.Linear (LoRA, quantized or fused)"
        )


def test_without_the_kernels_decoding_keeps_transformers(monkeypatch):
    monkeypatch.setenv("UNICODEBOOK_CPU_KERNEL", "0")
    with torch.inference_mode():
        assert unsupported(tiny("Llama"), 64) == "the compiled CPU kernels are not available"


@needs_kernel
def test_generation_and_answers_match_the_transformers_step(model_run, monkeypatch):
    """The model's own decoding loops (codes with CFG, text answers) emit the same tokens through
    the compiled step as through transformers' forward."""
    from unicodebook.lm import model as lm_model
    from unicodebook.lm.model import load_model

    model = load_model(model_run)
    made = []
    real = lm_model.CPUDecoder
    monkeypatch.setattr(lm_model, "CPUDecoder", lambda *a, **k: made.append(1) or real(*a, **k))
    prompts = ["a red circle", "a blue square on the left of a green triangle"]
    codes = model.generate_codes(prompts, 3.0, 0.0, 0)
    answers = model.answer(codes, ["what colour is the shape?", "what shape is it?"], max_new_tokens=4)
    assert len(made) == 2
    monkeypatch.setattr(lm_model, "cpu_decoder_unsupported", lambda *a: "off")
    assert torch.equal(model.generate_codes(prompts, 3.0, 0.0, 0), codes)
    assert model.answer(codes, ["what colour is the shape?", "what shape is it?"], max_new_tokens=4) == answers
    assert len(made) == 2
