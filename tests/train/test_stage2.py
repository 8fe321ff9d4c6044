"""Stage II training: the loss falls, a resumed run ends where an uninterrupted one does, bad
records are skipped and counted, and a real Hugging Face model from a local folder works."""

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from unicodebook.errors import UnicodebookError
from unicodebook.lm.model import load_model
from unicodebook.train.stage2 import train_lm


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_instruction_loss_falls(tokenizer_run, shapes_dir, tmp_path):
    cfg = tiny_config(
        "train_lm.steps=30",
        "train_lm.lr=3e-3",
        "train_lm.tasks.decompress=0",
        "train_lm.tasks.t2i=0",
        "train_lm.save_every=0",
    )
    train_lm(cfg, tokenizer_run, shapes_dir, tmp_path / "run", progress=False)
    m = _metrics(tmp_path / "run")
    assert m[-1]["loss_instruct"] < 0.7 * m[0]["loss_instruct"]
    assert m[-1]["acc_instruct"] > m[0]["acc_instruct"]


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(model_run, tokenizer_run, shapes_dir, tmp_path):
    """Drop the final checkpoint of an 8-step run and resume from step 4: same weights, same log."""
    copy = tmp_path / "run"
    shutil.copytree(model_run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_0000008")
    shutil.rmtree(copy / "llm")
    train_lm(tiny_config(), tokenizer_run, shapes_dir, copy, resume=True, progress=False)
    a, b = load_file(model_run / "llm" / "model.safetensors"), load_file(copy / "llm" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]  # noqa: E731
    assert strip(_metrics(copy)) == strip(_metrics(model_run))


def test_sampling_during_training_writes_grids_and_leaves_training_unchanged(
    model_run, tokenizer_run, shapes_dir, tmp_path
):
    """Preview grids every 2 steps (decoding in inference mode, seeded apart from training):
    the same final weights as the run that never sampled."""
    run = tmp_path / "run"
    train_lm(tiny_config("train_lm.sample_every=2"), tokenizer_run, shapes_dir, run, progress=False)
    assert sorted(p.name for p in (run / "samples").glob("t2i_*.png")) == [
        "t2i_0000002.png",
        "t2i_0000004.png",
        "t2i_0000006.png",
        "t2i_final.png",
    ]  # the last step: final
    a, b = load_file(model_run / "llm" / "model.safetensors"), load_file(run / "llm" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_malformed_records_are_skipped_and_counted(tokenizer_run, shapes_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir / "train", data / "train", ignore=shutil.ignore_patterns(".codes"))
    lines = (data / "train" / "t2i.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    lines[2] = json.dumps({"image": "images/000001.png"})  # no caption
    (data / "train" / "t2i.jsonl").write_text("\n".join(lines) + "\n")
    (data / "train" / "images" / "000000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    train_lm(tiny_config("train_lm.steps=2"), tokenizer_run, data, tmp_path / "run", progress=False)
    last = _metrics(tmp_path / "run")[-1]
    assert last["bad_images"] == 1
    # the two malformed lines, and every record of the unreadable image 0 (its conversation too)
    broken = "images/000000.png"
    of_0 = sum(json.loads(line)["image"] == broken for i, line in enumerate(lines) if i not in (1, 2))
    of_0 += sum(c["image"] == broken for c in json.loads((data / "train" / "instruct.json").read_text()))
    assert last["bad_records"] == 2 + of_0


@pytest.mark.slow
def test_a_local_hugging_face_llama_works_end_to_end(shapes_dir, tmp_path):
    """save_pretrained a tiny random LlamaForCausalLM and its tokenizer, bind the codebook to it,
    run stages I and II, and generate an image."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unicodebook.lm.text import train_word_tokenizer
    from unicodebook.train.stage1 import train_tokenizer

    texts = [json.loads(line)["caption"] for line in (shapes_dir / "train" / "captions.jsonl").read_text().splitlines()]
    texts += ["USER: ASSISTANT: what colour shape is how many objects are there where yes no zero one two three ?"]
    hf_tok = train_word_tokenizer(texts, max_vocab=200)
    # a tokenizer without the image markers, as a real model's would be
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(w for w in hf_tok.get_vocab() if w not in ("<image>", "<img>", "</img>"))}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    folder = tmp_path / "hf-llama"
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(plain),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=plain.bos_token_id,
            eos_token_id=plain.eos_token_id,
            pad_token_id=plain.pad_token_id,
        )
    )
    llm.save_pretrained(folder)
    plain.save_pretrained(folder)

    cfg = tiny_config(
        f"llm.name={folder}", "model.codebook.row_offset=0", "model.codebook.num_rows=32", "train_tokenizer.steps=6"
    )
    train_tokenizer(cfg, shapes_dir, tmp_path / "stage1", progress=False)
    train_lm(cfg, tmp_path / "stage1", shapes_dir, tmp_path / "stage2", progress=False)
    model = load_model(tmp_path / "stage2")
    assert model.llm.get_input_embeddings().weight.shape[0] == len(plain) + 3  # the three markers were added
    assert model.text_tok.convert_tokens_to_ids("<img>") == len(plain) + 1
    image = model.generate_image("draw a small red circle at the top left", seed=0)
    assert tuple(image.shape) == (1, 3, 32, 32)
    assert isinstance(model.chat(image[0], "what colour is the object at the top left?"), str)


def test_lora_trains_adapters_only_and_saves_a_merged_model(tokenizer_run, shapes_dir, tmp_path):
    cfg = tiny_config("train_lm.steps=3", "train_lm.lora.enabled=true", "train_lm.lora.r=4", "train_lm.save_every=0")
    train_lm(cfg, tokenizer_run, shapes_dir, tmp_path / "run", progress=False)
    ckpt = load_file(next((tmp_path / "run" / "checkpoints").iterdir()) / "llm.safetensors")
    assert any("lora_A" in k for k in ckpt)
    base = load_model(tmp_path / "run")  # the merged folder loads as a plain model
    assert not any("lora" in k for k in base.llm.state_dict())
    # the frozen base weights did not move: merged = base + B·A, and only the adapted projections differ
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tokenizer_run / "llm")
    merged = base.llm.state_dict()
    for k, v in original.state_dict().items():
        if k in merged and "proj" not in k and merged[k].shape == v.shape:
            assert torch.equal(merged[k], v), k


def test_a_run_started_from_another_begins_with_its_weights_and_text_tokenizer(
    model_run, tokenizer_run, shapes_dir, tmp_path
):
    """``train_lm.init_from`` (a curriculum: one task mix, then another). With lr 0 nothing moves,
    so the new run saves the start model's LLM and image positions bit for bit, and its text
    tokenizer."""
    run = tmp_path / "run"
    train_lm(
        tiny_config("train_lm.steps=2", "train_lm.lr=0", f"train_lm.init_from={model_run}"),
        tokenizer_run,
        shapes_dir,
        run,
        progress=False,
    )
    for part in ("llm/model.safetensors", "image_positions.safetensors"):
        a, b = load_file(model_run / part), load_file(run / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert (run / "text_tokenizer" / "tokenizer.json").read_text() == (
        model_run / "text_tokenizer" / "tokenizer.json"
    ).read_text()


def test_a_start_model_on_another_visual_tokenizer_is_refused(model_run, tokenizer_run, shapes_dir, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other"
    shutil.copytree(model_run, other)
    vt = load_file(other / "visual_tokenizer" / "model.safetensors")
    k = next(k for k, v in vt.items() if v.is_floating_point())
    vt[k] = vt[k] + 1
    save_file(vt, other / "visual_tokenizer" / "model.safetensors")
    with pytest.raises(
        UnicodebookError, match=r"^train_lm.init_from: .*other was trained on another visual tokenizer than this run's$"
    ):
        train_lm(
            tiny_config("train_lm.steps=1", f"train_lm.init_from={other}"),
            tokenizer_run,
            shapes_dir,
            tmp_path / "run",
            progress=False,
        )


def test_phases_declared_in_the_config_set_each_steps_tasks_and_learning_rate(tokenizer_run, shapes_dir, tmp_path):
    """Two phases in one run: the first draws only (its own warm-up and cosine from lr 1e-3), the
    second only reads (from 5e-4); the log shows each step under its phase's settings."""
    from unicodebook.train.stage1 import lr_at

    cfg = tiny_config(
        "train_lm.log_every=1",
        "train_lm.save_every=0",
        "train_lm.phases=[{steps: 4, name: draw, lr: 1e-3, warmup_steps: 2,"
        " tasks: {decompress: 0, instruct: 0, t2i: 1}},"
        " {steps: 4, name: read, lr: 5e-4, warmup_steps: 1, tasks: {decompress: 0, instruct: 1, t2i: 0}}]",
    )
    train_lm(cfg, tokenizer_run, shapes_dir, tmp_path / "run", progress=False)
    rows = (
        _metrics(tmp_path / "run")[:-1] if "seconds" in _metrics(tmp_path / "run")[-1] else _metrics(tmp_path / "run")
    )
    rows = [r for r in rows if "step" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all("loss_t2i" in r and "loss_instruct" not in r for r in rows[:4])
    assert all("loss_instruct" in r and "loss_t2i" not in r for r in rows[4:])
    first, second = (p for _, p in cfg.train_lm.phase_list())
    want = [lr_at(s, first) for s in range(4)] + [lr_at(s, second) for s in range(4)]
    assert [r["lr"] for r in rows] == pytest.approx(want)
    assert rows[0]["lr"] == pytest.approx(5e-4) and rows[4]["lr"] == pytest.approx(5e-4)  # each warms up anew
