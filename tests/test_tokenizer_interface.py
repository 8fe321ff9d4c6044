"""The visual-tokenizer interface, pinned by a family that is nothing like UniCode: 1-D codes of
variable length, read by the LLM as tokens, with rows of its own appended to the LLM
(``fake_family.py``). Stage II must train, save, load, resume and generate with it through the
interface alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fake_family
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from unicodebook.data.images import ImageFolder, resolve_image_folder, split_folder
from unicodebook.data.multimodal import cached_codes, read_records
from unicodebook.errors import UnicodebookError
from unicodebook.lm.llm import build_builtin_llm
from unicodebook.lm.model import load_model
from unicodebook.lm.sequence import collate
from unicodebook.lm.text import ensure_markers, train_word_tokenizer
from unicodebook.tokenizers.base import PAD_CODE, CodeLayout, load_tokenizer, register_family, write_family
from unicodebook.train.stage2 import train_lm

register_family(fake_family.FAMILY, "fake_family")
FAKE = ("train_lm.tasks.decompress=0",)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake") / "tok"
    fake_family.CellTokenizer(image_size=32, cells=4, min_length=2).save(folder)
    return folder


@pytest.fixture(scope="module")
def fake_lm(fake_run, shapes_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("fake_lm") / "run"
    train_lm(tiny_config(*FAKE), fake_run, shapes_dir, run, progress=False)
    return run


def _train_images(shapes_dir, n=48):
    ds = ImageFolder(resolve_image_folder(shapes_dir, "train"), 32, preload=False)
    return torch.stack([ds[i] for i in range(n)])


def test_a_folder_is_loaded_by_the_family_it_names(fake_run, tokenizer_run, tmp_path):
    assert isinstance(load_tokenizer(fake_run), fake_family.CellTokenizer)
    assert load_tokenizer(tokenizer_run).family == "unicode"
    write_family(tmp_path / "other", "nope")
    with pytest.raises(UnicodebookError, match=r"visual tokenizer family 'nope' is not known \(known: .*fake-cells"):
        load_tokenizer(tmp_path / "other")
    (tmp_path / "torn").mkdir()
    with pytest.raises(UnicodebookError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path / "torn")
    (tmp_path / "torn" / "visual_tokenizer.json").write_text("{")
    with pytest.raises(UnicodebookError, match="visual_tokenizer.json is unreadable"):
        load_tokenizer(tmp_path / "torn")


def test_layouts_say_what_a_code_tensor_holds():
    grid = CodeLayout(36, (3, 3, 4))
    assert grid.fixed and grid.positions == 9 and grid.depth == 4 and grid.shape == (3, 3, 4)
    ragged = CodeLayout(16, min_length=2)
    assert not ragged.fixed and ragged.shortest == 2 and ragged.shape == (16,)
    codes = torch.tensor([[3, 1, PAD_CODE, PAD_CODE] + [PAD_CODE] * 12, [5] * 16])
    assert ragged.lengths(codes).tolist() == [2, 16]
    for bad in (
        dict(length=36, grid=(3, 3, 3)),
        dict(length=8, min_length=9),
        dict(length=36, grid=(3, 3, 4), min_length=2),
    ):
        with pytest.raises(ValueError):
            CodeLayout(**bad)


def test_ragged_codes_round_trip_through_the_cache_and_the_sequences(fake_run, shapes_dir, tmp_path):
    visual_tok = load_tokenizer(fake_run)
    images = _train_images(shapes_dir)
    codes = visual_tok.encode(images)
    lengths = visual_tok.layout.lengths(codes)
    assert len(set(lengths.tolist())) >= 3 and int(lengths.min()) >= 2  # really ragged, never below the minimum
    assert torch.equal(visual_tok.encode(visual_tok.decode(codes)), codes)  # exact on its own output

    folder = split_folder(shapes_dir, "train")
    recs = read_records(folder)
    paths = sorted({c.image for c in recs.captions})[:24]
    cache = cached_codes(visual_tok, folder, paths, fallback=tmp_path, progress=False)
    again = cached_codes(visual_tok, folder, paths, fallback=tmp_path, progress=False)  # read back from disk
    assert torch.equal(cache.codes, again.codes) and torch.equal(cache.lengths, again.lengths)
    assert len(set(cache.lengths.tolist())) >= 2

    model = load_model_like(visual_tok)
    fmt = model.fmt
    samples, want = [], []
    for p in paths[:8]:
        c = cache.codes[cache.index[p]].long()
        ids = fmt.codes_to_ids(c)
        assert len(ids) == int((c != PAD_CODE).sum())
        s = fmt.text_to_image("draw a small red circle at the top", c)
        assert (
            s.input_ids[s.codes_at : s.codes_at + s.n_codes] == ids
            and s.input_ids[s.codes_at + s.n_codes] == fmt.end_id
        )
        q = fmt.conversation(
            [{"from": "human", "value": "<image>\nwhat is there?"}, {"from": "gpt", "value": "red"}], c
        )
        assert q.input_ids[q.image_at - 1] == fmt.start_id and q.input_ids[q.image_at : q.image_at + q.image_len] == ids
        assert q.input_ids[q.image_at + q.image_len] == fmt.end_id
        samples.append(s)
        want.append(len(ids))
    batch = collate(samples, 0)
    assert batch.n_codes.tolist() == want and batch.input_ids.shape[1] == max(len(s.input_ids) for s in samples)


def load_model_like(visual_tok):
    """A model on a fresh tiny LLM, for the sequence checks (no training)."""
    from unicodebook.lm.model import UniCodeLM

    llm = build_builtin_llm(tiny_config().llm)
    text = train_word_tokenizer(["USER: what is there ? ASSISTANT: red", "draw a small red circle at the top"], 200)
    ensure_markers(text, llm)
    return UniCodeLM(llm, visual_tok, text)


def test_attaching_appends_code_rows_and_leaves_the_text_rows_untouched(fake_run):
    visual_tok = load_tokenizer(fake_run)
    llm = build_builtin_llm(tiny_config().llm)
    text = train_word_tokenizer(["USER: what is there ? ASSISTANT: red"], 200)
    ensure_markers(text, llm)
    vocab = dict(text.get_vocab())
    before = llm.get_input_embeddings().weight.detach().clone()
    ids = visual_tok.attach(llm, text)
    assert ids.tolist() == list(range(len(vocab), len(vocab) + 8))  # new tokens after the text's own
    assert text.convert_ids_to_tokens(ids.tolist())[:2] == ["<cell_00000>", "<cell_00001>"]
    assert all(text.convert_tokens_to_ids(t) == i for t, i in vocab.items())  # text ids unchanged
    assert torch.equal(llm.get_input_embeddings().weight, before)  # the LLM had spare rows: nothing moved
    assert torch.equal(visual_tok.attach(llm, text), ids) and len(text) == len(vocab) + 8  # idempotent

    text = train_word_tokenizer(["USER: what is there ? ASSISTANT: red"], 200)
    small = build_builtin_llm(tiny_config(f"llm.vocab_size={len(text)}").llm)  # no spare rows: the LLM grows by 8
    ensure_markers(text, small)
    before = small.get_input_embeddings().weight.detach().clone()
    ids = visual_tok.attach(small, text)
    after = small.get_input_embeddings().weight
    assert after.shape[0] == len(text) == len(before) + 8 and ids.tolist() == list(range(len(before), len(before) + 8))
    assert torch.equal(after[: len(before)], before) and small.get_output_embeddings().weight.shape[0] == len(after)


def test_a_family_without_a_task_refuses_it_in_one_line(fake_run, shapes_dir, tmp_path):
    with pytest.raises(
        UnicodebookError,
        match=r"the fake-cells tokenizer offers no 'decompress' task .*"
        r"set train_lm.tasks.decompress=0",
    ):
        train_lm(tiny_config(), fake_run, shapes_dir, tmp_path / "run", progress=False)


def test_stage2_trains_saves_and_loads_through_the_interface(fake_lm, fake_run):
    meta = json.loads((fake_lm / "model.json").read_text())
    assert meta["family"] == "fake-cells" and meta["reads"] == "codes" and meta["min_codes_per_image"] == 2
    assert fake_family.tag(fake_lm / "visual_tokenizer")["family"] == "fake-cells"
    rows = [json.loads(line) for line in (fake_lm / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_instruct", "loss_t2i"} <= {k for r in rows for k in r}
    model = load_model(fake_lm)
    assert isinstance(model.tokenizer, fake_family.CellTokenizer) and model.reads_codes
    codes = load_tokenizer(fake_run).encode(torch.rand(3, 3, 32, 32))
    answers = model.answer(codes, ["what colour is the object at the top?"] * 3, max_new_tokens=4)
    assert all("<cell_" not in a for a in answers)  # the code rows are never part of an answer


def test_variable_length_generation_ends_at_img_end_between_the_minimum_and_the_maximum(fake_lm):
    """All code logits and </img>'s made equal (the final norm zeroed): sampling picks </img> at
    random, so lengths spread — but never below the minimum, and the maximum ends an image."""
    model = load_model(fake_lm)
    with torch.no_grad():
        model.llm.model.norm.weight.zero_()
    codes = model.generate_codes(
        ["draw a small red circle"] * 64, cfg_scale=1.0, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    lengths = model.tokenizer.layout.lengths(codes)
    assert codes.shape == (64, 16) and int(lengths.min()) == 2 and int(lengths.max()) == 16
    assert len(set(lengths.tolist())) > 5
    for row, n in zip(codes, lengths):  # codes, then padding only
        assert bool((row[:n] >= 0).all() and (row[:n] < 8).all()) and bool((row[n:] == PAD_CODE).all())
    images = model.tokenizer.decode(codes)
    assert images.shape == (64, 3, 32, 32)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(fake_lm, fake_run, shapes_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(fake_lm, copy)
    shutil.rmtree(copy / "checkpoints" / "step_0000008")
    shutil.rmtree(copy / "llm")
    train_lm(tiny_config(*FAKE), fake_run, shapes_dir, copy, resume=True, progress=False)
    a, b = load_file(fake_lm / "llm" / "model.safetensors"), load_file(copy / "llm" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_command_takes_a_folder_of_another_family(fake_run, fake_lm, shapes_dir, tmp_path, capsys):
    from PIL import Image

    from unicodebook.cli import main

    image = sorted((shapes_dir / "test" / "images").iterdir())[0]

    def cli(*args):
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert rc == 0, err
        return out.strip().splitlines()[-1] if out.strip() else ""

    line = json.loads(cli("tokenize", "--tokenizer", fake_run, image))
    from unicodebook.data.images import load_image

    want = load_tokenizer(fake_run).encode(load_image(image, 32)[None])[0]
    assert line["codes"] == want[want != PAD_CODE].tolist() and "token_ids" not in line  # its own length, no LLM ids
    assert json.loads(cli("reconstruct", "--tokenizer", fake_run, image, "--out", tmp_path / "r.png"))["psnr"] > 5
    ev = json.loads(cli("eval", "tokenizer", "--tokenizer", fake_run, "--data", shapes_dir, "--split", "test"))
    assert ev["layers"] == ["codes"] and ev["num_codes"] == 8 and 2 <= ev["codes_per_image_mean"] < 16
    assert "codebook_mode" not in ev  # UniCode's own health figures stay UniCode's
    assert "<cell_" not in cli("chat", "--model", fake_lm, "--image", image, "what colour is the object at the top?")
    cli("generate", "--model", fake_lm, "draw a small red circle", "--out", tmp_path / "g.png", "--temperature", "1")
    assert Image.open(tmp_path / "g.png").size == (32, 32)
    res = json.loads(cli("eval", "model", "--model", fake_lm, "--data", shapes_dir, "--max-vqa", 8, "--max-t2i", 4))
    assert res["vqa_n"] == 8 and res["t2i_n"] == 4 and "decompression_code_accuracy" not in res


def test_a_trained_model_ends_each_drawing_where_its_images_end(fake_run, shapes_dir, tmp_path):
    """Text-to-image only, on eight captioned images of different lengths: the loss falls and greedy
    generation ends every drawing at </img> after as many codes as the image it learnt has."""
    src = split_folder(shapes_dir, "train")
    visual_tok = load_tokenizer(fake_run)
    pairs, seen = [], set()
    from unicodebook.data.images import load_image
    from unicodebook.data.multimodal import read_pairs

    for p in read_pairs(src / "t2i.jsonl")[0]:
        n = int(visual_tok.layout.lengths(visual_tok.encode(load_image(src / p.image, 32)[None]))[0])
        if n not in seen and p.caption not in {q.caption for q in pairs}:
            seen.add(n)
            pairs.append(p)
        if len(pairs) == 6:
            break
    data = tmp_path / "data"
    data.mkdir()
    for p in pairs:
        (data / Path(p.image).parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / p.image, data / p.image)
    (data / "t2i.jsonl").write_text("".join(json.dumps({"image": p.image, "caption": p.caption}) + "\n" for p in pairs))
    cfg = tiny_config(
        *FAKE,
        "train_lm.tasks.instruct=0",
        "train_lm.steps=120",
        "train_lm.batch_size=6",
        "train_lm.lr=5e-3",
        "train_lm.warmup_steps=10",
        "train_lm.save_every=0",
        "train_lm.log_every=10",
        "train_lm.caption_dropout=0",
    )
    train_lm(cfg, fake_run, data, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_t2i"] for r in rows if "loss_t2i" in r]
    assert losses[-1] < 0.2 * losses[0]
    model = load_model(tmp_path / "run")
    codes = model.generate_codes([p.caption for p in pairs], cfg_scale=1.0, temperature=0.0)
    want = torch.cat([visual_tok.encode(load_image(data / p.image, 32)[None]) for p in pairs])
    assert model.tokenizer.layout.lengths(codes).tolist() == visual_tok.layout.lengths(want).tolist()
    assert len(set(visual_tok.layout.lengths(want).tolist())) == len(pairs) >= 4
