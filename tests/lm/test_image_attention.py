"""``image_attention: bidirectional``: the Ẑ slots of the image the LLM reads see each other
(a prefix-LM over the image); everything else, the images it writes included, stays causal."""

import json

import pytest
import torch

from unicodebook.errors import UnicodebookError
from unicodebook.lm.model import UniCodeLM, image_block_mask, load_model
from unicodebook.lm.sequence import collate

QUESTIONS = ["what colour is the object in the center?", "how many objects are there?", "is there a red circle?"]


@pytest.fixture(scope="module")
def model(model_run):
    m = load_model(model_run)
    m.image_attention = "bidirectional"
    return m


def _batch(model, questions):
    samples = [
        model.fmt.conversation([{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": "red"}])
        for q in questions
    ]
    return collate(samples, model.fmt.pad_id)


def test_a_one_slot_block_is_the_causal_mask(model):
    batch = _batch(model, QUESTIONS)
    codes = torch.randint(0, model.tokenizer.codebook.num_codes, (len(QUESTIONS), *model.tokenizer.grid_shape))
    with torch.no_grad():
        emb = model.embed_inputs(batch.input_ids, batch.image_at, model.latents(codes))
        causal = model.llm(inputs_embeds=emb, attention_mask=batch.attention_mask).logits
        one = model.llm(
            inputs_embeds=emb, attention_mask=image_block_mask(batch.attention_mask, batch.image_at, 1, model.llm)
        ).logits
    keep = batch.attention_mask.bool()
    assert torch.allclose(causal[keep], one[keep], atol=1e-5)


def test_the_first_slot_sees_the_last_and_the_text_before_the_image_sees_neither(model):
    batch = _batch(model, QUESTIONS[:1])
    at = int(batch.image_at[0])
    codes = torch.randint(0, model.tokenizer.codebook.num_codes, (2, *model.tokenizer.grid_shape))
    codes[1, :-1] = codes[0, :-1]  # the two images differ in their last row of positions only
    z = model.latents(codes)
    assert not torch.equal(z[0, -1], z[1, -1]) and torch.equal(z[0, 0], z[1, 0])
    out = {}
    for attention in ("causal", "bidirectional"):
        model.image_attention = attention
        with torch.no_grad():
            h = [
                model._hidden(
                    model.embed_inputs(batch.input_ids, batch.image_at, z[i : i + 1]),
                    model.attention_mask(batch.attention_mask, batch.image_at),
                ).last_hidden_state[0]
                for i in range(2)
            ]
        out[attention] = h
    model.image_attention = "bidirectional"
    causal, bi = out["causal"], out["bidirectional"]
    assert torch.allclose(causal[0][at], causal[1][at])  # causal: slot 0 cannot see the last row
    assert not torch.allclose(bi[0][at], bi[1][at], atol=1e-4)  # bidirectional: it does
    assert torch.allclose(bi[0][:at], bi[1][:at])  # the prompt before the image sees neither


def test_batched_cached_answers_equal_one_at_a_time_recomputed_ones(model):
    """Left-padded prefill with the block mask + KV-cached decoding (the eval path) answers as a
    cache-free greedy loop over the full 4-D mask does, one question at a time."""
    torch.manual_seed(0)
    codes = torch.randint(0, model.tokenizer.codebook.num_codes, (len(QUESTIONS), *model.tokenizer.grid_shape))
    batched = model.answer(codes, QUESTIONS, max_new_tokens=3)
    allowed = model.text_allowed
    for i, q in enumerate(QUESTIONS):
        ids, at = model.fmt.prompt(q)
        z = model.latents(codes[i : i + 1])
        words = []
        with torch.no_grad():
            for _ in range(3):
                x = torch.tensor([ids])
                mask = model.attention_mask(torch.ones_like(x), torch.tensor([at]))
                logits = model.llm(
                    inputs_embeds=model.embed_inputs(x, torch.tensor([at]), z), attention_mask=mask
                ).logits[0, -1]
                nxt = int(logits.masked_fill(~allowed, float("-inf")).argmax())
                if nxt == model.fmt.eos_id:
                    break
                words.append(nxt)
                ids.append(nxt)
        assert batched[i] == model.text_tok.decode(words, skip_special_tokens=True).strip()


def test_the_setting_is_saved_with_the_model_and_checked(tmp_path, tokenizer_run, shapes_dir):
    from tests.conftest import TINY_OVERRIDES
    from unicodebook.train.stage2 import train_lm_from_files

    out = tmp_path / "bi"
    train_lm_from_files(
        None,
        TINY_OVERRIDES + ["train_lm.steps=4", "train_lm.image_attention=bidirectional"],
        tokenizer_run,
        shapes_dir,
        out,
    )
    assert json.loads((out / "model.json").read_text())["image_attention"] == "bidirectional"
    assert load_model(out).image_attention == "bidirectional"
    m = load_model(out)
    with pytest.raises(UnicodebookError, match="image attention 'sideways' is not one of causal, bidirectional"):
        UniCodeLM(m.llm, m.tokenizer, m.text_tok, image_attention="sideways")
    m.llm.config._attn_implementation = "flash_attention_2"
    with pytest.raises(
        UnicodebookError,
        match="^image attention 'bidirectional' needs a 4-D attention mask, which "
        "the LLM's 'flash_attention_2' attention does not take",
    ):
        UniCodeLM(m.llm, m.tokenizer, m.text_tok, image_attention="bidirectional")
    with pytest.raises(UnicodebookError, match="^understanding_input 'pixels' is not one of codes, features$"):
        UniCodeLM(m.llm, m.tokenizer, m.text_tok, understanding_input="pixels")
    with pytest.raises(
        UnicodebookError,
        match="^understanding_input 'features' is for a tokenizer read through its codes; "
        "the unicode tokenizer is read as latents already$",
    ):
        UniCodeLM(m.llm, m.tokenizer, m.text_tok, understanding_input="features")
