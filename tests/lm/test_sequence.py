"""Stage II sequences: where Ẑ goes, which tokens carry loss, and the code order."""

import torch

from unicodebook.lm.sequence import IGNORE, SequenceFormat, collate, corrupt_codes
from unicodebook.lm.text import train_word_tokenizer
from unicodebook.tokenizers.base import CodeLayout

TEXTS = [
    "USER: what colour is the object at the top left ? ASSISTANT:",
    "red",
    "draw a small red circle at the top left",
]


def make_format(grid=(2, 2, 3), offset=100):
    text_tok = train_word_tokenizer(TEXTS, max_vocab=100)
    n = grid[0] * grid[1]
    token_ids = torch.arange(offset, offset + 16)
    return SequenceFormat(text_tok, token_ids, CodeLayout(grid[0] * grid[1] * grid[2], grid), n), text_tok


def test_conversation_labels_only_the_assistant_turns_and_places_the_image_slots():
    fmt, text_tok = make_format()
    turns = [
        {"from": "human", "value": "<image>\nwhat colour is the object at the top left?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "what colour is the object at the top left?"},
        {"from": "gpt", "value": "red"},
    ]
    s = fmt.conversation(turns)
    assert s.input_ids[s.image_at : s.image_at + fmt.num_latents] == [fmt.image_id] * fmt.num_latents
    assert s.input_ids.count(fmt.image_id) == fmt.num_latents
    labelled = [i for i, lab in zip(s.input_ids, s.labels) if lab != IGNORE]
    assert text_tok.decode(labelled) == "red </s> red </s>"
    assert all(lab in (IGNORE, i) for i, lab in zip(s.input_ids, s.labels))


def test_code_order_round_trips_and_is_position_major():
    fmt, _ = make_format()
    codes = torch.arange(12).reshape(2, 2, 3)
    ids = fmt.codes_to_ids(codes)
    assert ids[:3] == [100, 101, 102]  # position (0, 0), depth 0..2 first
    back = torch.tensor(ids) - 100
    assert torch.equal(fmt.ids_to_codes(back[None])[0], codes)


def test_decompression_segments_cover_every_code_once():
    fmt, _ = make_format()
    codes = torch.randint(0, 16, (2, 2, 3))
    all_ids = fmt.codes_to_ids(codes)
    full = fmt.decompression(codes)
    assert [lab for lab in full.labels if lab != IGNORE] == [fmt.start_id] + all_ids + [fmt.end_id, fmt.eos_id]
    got = []
    for seg in range(3):
        s = fmt.decompression(codes, segments=3, segment=seg)
        got += [lab for lab in s.labels if lab != IGNORE and lab not in (fmt.start_id, fmt.end_id, fmt.eos_id)]
        assert s.input_ids[s.image_at : s.image_at + fmt.num_latents] == [fmt.image_id] * fmt.num_latents
    assert got == all_ids


def test_text_to_image_labels_the_image_and_dropout_leaves_no_caption():
    fmt, text_tok = make_format()
    codes = torch.randint(0, 16, (2, 2, 3))
    s = fmt.text_to_image("draw a small red circle at the top left", codes)
    start = s.input_ids.index(fmt.start_id)
    assert text_tok.decode(s.input_ids[1:start]) == "draw a small red circle at the top left"
    assert s.labels[:start] == [IGNORE] * start and s.labels[start:] == s.input_ids[start:]
    u = fmt.text_to_image(None, codes)
    assert u.input_ids[:2] == [text_tok.bos_token_id, fmt.start_id]
    b = collate([s, u], pad_id=0)
    assert b.attention_mask.sum(1).tolist() == [len(s.input_ids), len(u.input_ids)]
    assert (b.labels[1, len(u.input_ids) :] == IGNORE).all()


def test_code_noise_touches_only_the_code_inputs_and_keeps_the_targets():
    fmt, _ = make_format(grid=(4, 4, 4), offset=100)
    torch.manual_seed(0)
    samples = [
        fmt.text_to_image("draw a small red circle at the top left", torch.randint(0, 16, (4, 4, 4))),
        fmt.decompression(torch.randint(0, 16, (4, 4, 4))),
        fmt.conversation(
            [
                {"from": "human", "value": "<image>\nwhat colour is the object at the top left?"},
                {"from": "gpt", "value": "red"},
            ]
        ),
    ]
    clean = collate(samples, pad_id=0)
    noisy = corrupt_codes(clean, fmt.code_token_ids, 0.5, torch.Generator().manual_seed(1))
    changed = noisy.input_ids != clean.input_ids
    assert torch.equal(noisy.labels, clean.labels)  # the targets stay the true codes
    for row in range(3):
        at, n = int(clean.codes_at[row]), int(clean.n_codes[row])
        outside = torch.ones_like(changed[row])
        if at >= 0:
            outside[at : at + n] = False
            assert 0.3 < changed[row, at : at + n].float().mean() < 0.7  # about half of the 64 codes
            assert ((noisy.input_ids[row, at : at + n] >= 100) & (noisy.input_ids[row, at : at + n] < 116)).all()
        assert not changed[row][outside].any()  # text, markers, Ẑ slots and padding untouched
    assert corrupt_codes(clean, fmt.code_token_ids, 0.0, torch.Generator()) is clean
