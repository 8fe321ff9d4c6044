"""The `unicodebook` command line: an end-to-end run, and one clear line for each bad input."""

import json
import subprocess
import sys

import pytest
from conftest import TINY_OVERRIDES, assert_report_counts
from PIL import Image

from unicodebook.cli import main


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """data shapes → train-tokenizer through the CLI, shared by the tests below."""
    root = tmp_path_factory.mktemp("cli")
    data, run = root / "data", root / "run"
    assert (
        main(
            [
                "data",
                "shapes",
                "--out",
                str(data),
                "--n-train",
                "64",
                "--n-val",
                "16",
                "--n-test",
                "16",
                "--seed",
                "3",
                "--size",
                "32",
            ]
        )
        == 0
    )
    assert (
        main(["train-tokenizer", "--data", str(data), "--out", str(run), *TINY_OVERRIDES, "train_tokenizer.steps=20"])
        == 0
    )
    return data, run


@pytest.mark.slow
def test_end_to_end_through_the_console_script(tmp_path):
    """The installed entry point, as a user runs it: data → stage I → tokenize → reconstruct → eval."""

    def sh(*args):
        p = subprocess.run([sys.executable, "-m", "unicodebook", *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout

    data, run = tmp_path / "data", tmp_path / "run"
    sh("data", "shapes", "--out", data, "--n-train", "64", "--n-val", "16", "--n-test", "16", "--size", "32")
    summary = json.loads(
        sh("train-tokenizer", "--config", "tiny", "--data", data, "--out", run, *TINY_OVERRIDES).splitlines()[-1]
    )
    assert summary["steps"] == 30 and summary["val"]["psnr"] > 10
    img = data / "test" / "images" / "000000.png"
    codes = json.loads(sh("tokenize", "--tokenizer", run, img))
    assert codes["shape"] == [8, 8, 4] and len(codes["token_ids"]) == 256
    assert all(128 <= t < 192 for t in codes["token_ids"])
    rec = json.loads(sh("reconstruct", "--tokenizer", run, img, "--out", tmp_path / "rec.png"))
    assert Image.open(tmp_path / "rec.png").size == (32, 32) and rec["psnr"] > 10
    ev = json.loads(sh("eval", "tokenizer", "--tokenizer", run, "--data", data, "--split", "test"))
    assert ev["n_images"] == 16 and {"psnr", "ssim", "usage", "perplexity"} <= ev.keys()
    assert len(ev["usage"]) == len(ev["perplexity"]) == 4

    # stage II on top, then the model answers, draws and is evaluated
    model = tmp_path / "model"
    res = json.loads(
        sh("train-lm", "--tokenizer", run, "--data", data, "--out", model, *TINY_OVERRIDES).splitlines()[-1]
    )
    assert res["steps"] == 8
    answer = sh("chat", "--model", model, "--image", img, "what colour is the object in the center?").strip()
    assert "<" not in answer  # text only, no markers or codes
    gen = json.loads(
        sh(
            "generate",
            "--model",
            model,
            "draw a small red circle at the top left",
            "--out",
            tmp_path / "g.png",
            "--n",
            "2",
            "--cfg",
            "2",
            "--top-k",
            "8",
            "--seed",
            "1",
        )
    )
    assert [Image.open(p).size for p in gen["images"]] == [(32, 32), (32, 32)]
    em = json.loads(
        sh(
            "eval",
            "model",
            "--model",
            model,
            "--data",
            data,
            "--split",
            "test",
            "--max-t2i",
            "8",
            "--pictures",
            tmp_path / "pictures",
        )
    )
    assert all(Image.open(tmp_path / "pictures" / f).size[0] > 0 for f in ("t2i_samples.png", "vqa_examples.png"))
    assert em["vqa_n"] >= 16 * 4  # 4-5 questions per test image
    assert set(em["vqa_by_type"]) <= {"colour", "shape", "count", "position", "existence"} and em["vqa_by_type"]
    assert em["description_n"] == 16 and em["t2i_n"] == 8  # one description per image, apart; --max-t2i
    assert {"t2i_accuracy", "decompression_code_accuracy"} <= set(em)
    assert_report_counts(em)


def test_tokenize_prints_the_codes_the_python_api_gives(trained, capsys):
    import torch

    from unicodebook import load_tokenizer
    from unicodebook.data.images import load_image

    data, run = trained
    img = data / "test" / "images" / "000001.png"
    _, a, _ = run_cli(capsys, "tokenize", "--tokenizer", run, img)
    _, b, _ = run_cli(capsys, "tokenize", "--tokenizer", run, img)
    assert a == b
    visual_tok = load_tokenizer(run)
    codes = visual_tok.encode(load_image(img)[None])[0]
    printed = json.loads(a)
    assert printed["codes"] == codes.tolist()
    assert printed["token_ids"] == visual_tok.token_ids(codes).flatten().tolist()
    # and decoding the printed codes gives the reconstruction the CLI writes
    assert torch.equal(visual_tok.decode(torch.tensor(printed["codes"])[None]), visual_tok.decode(codes[None]))


def test_tokenize_skips_a_bad_image_reports_it_and_exits_nonzero(trained, capsys, tmp_path):
    data, run = trained
    bad = tmp_path / "bad.png"
    bad.write_bytes((data / "test" / "images" / "000000.png").read_bytes()[:40])
    rc, out, err = run_cli(capsys, "tokenize", "--tokenizer", run, bad, data / "test" / "images" / "000000.png")
    assert rc == 1
    assert len(out.splitlines()) == 1  # the good image still gets its codes
    assert err.strip() == f"error: {bad}: corrupt or truncated image (header unreadable)"


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train-tokenizer", "--data", "{data}", "--out", "{tmp}/r", "model.codebok.mode=frozen"],
            "error: unknown config key 'model.codebok'",
        ),
        (
            ["train-tokenizer", "--data", "{tmp}/nowhere", "--out", "{tmp}/r"],
            "error: image folder '{tmp}/nowhere' does not exist",
        ),
        (
            ["train-tokenizer", "--data", "{tmp}/empty", "--out", "{tmp}/r"],
            "error: image folder '{tmp}/empty' holds no images",
        ),
        (
            ["reconstruct", "--tokenizer", "{run}", "{tmp}/notes.txt", "--out", "{tmp}/o.png"],
            "error: {tmp}/notes.txt: not an image file",
        ),
        (
            ["tokenize", "--tokenizer", "{tmp}", "{tmp}/notes.txt"],
            "error: {tmp}: not a tokenizer folder "
            "(no visual_tokenizer.json: not written, or torn before its save finished)",
        ),
        (
            ["eval", "tokenizer", "--tokenizer", "{run}", "--data", "{data}", "--split", "nosplit"],
            "error: '{data}' has no split 'nosplit' (its splits: train, val, test)",
        ),
        (
            ["train-tokenizer", "--config", "{tmp}/bad.yaml", "--data", "{data}", "--out", "{tmp}/r"],
            "error: {tmp}/bad.yaml: not valid YAML",
        ),
        (["data", "shapes", "--out", "{tmp}/d", "--size", "16"], "error: --size must be within 32..64, got 16"),
        # the suite hides any GPU (conftest), so a CUDA device is refused here as on a CPU machine
        (
            ["reconstruct", "--tokenizer", "{run}", "{tmp}/notes.txt", "--out", "{tmp}/o.png", "--device", "cuda"],
            "error: device 'cuda' asked for, but this machine has no CUDA GPU",
        ),
        (
            ["eval", "tokenizer", "--tokenizer", "{run}", "--data", "{data}", "--device", "tpu:0"],
            "error: unknown device 'tpu:0' (use auto, cpu, cuda or cuda:N)",
        ),
    ],
)
def test_bad_input_gets_one_error_line_and_exit_2(trained, capsys, tmp_path, args, message):
    data, run = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    fill = lambda s: s.format(data=data, run=run, tmp=tmp_path)  # noqa: E731
    rc, out, err = run_cli(capsys, *map(fill, args))
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(fill(message)), err
    assert not (tmp_path / "r" / "checkpoints").exists()  # nothing half-made


def test_eval_counts_bad_images_and_exits_1(trained, capsys, tmp_path):
    import shutil

    data, run = trained
    split = tmp_path / "split"
    shutil.copytree(data / "test" / "images", split)
    (split / "zzz.png").write_text("not png")
    rc, out, err = run_cli(capsys, "eval", "tokenizer", "--tokenizer", run, "--data", split, "--split", "test")
    assert rc == 1
    res = json.loads(out)
    assert res["n_bad"] == 1 and res["n_images"] == 16
    assert "zzz.png" in err


@pytest.fixture(scope="module")
def trained_lm(trained, tmp_path_factory):
    """train-lm through the CLI on top of ``trained``."""
    data, run = trained
    model = tmp_path_factory.mktemp("cli_lm") / "model"
    assert main(["train-lm", "--tokenizer", str(run), "--data", str(data), "--out", str(model), *TINY_OVERRIDES]) == 0
    return model


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["chat", "--model", "{model}", "--image", "{tmp}/cut.png", "what colour is it?"],
            "error: {tmp}/cut.png: corrupt or truncated image",
        ),
        (["generate", "--model", "{model}", "{long}", "--out", "{tmp}/g.png"], "error: this input needs"),
        (
            ["chat", "--model", "{tmp}/nomodel", "--image", "{img}", "what?"],
            "error: {tmp}/nomodel: no bound text tokenizer (missing text_tokenizer)",
        ),
        (["generate", "--model", "{run}", "draw a circle", "--out", "{tmp}/g.png"], "error: {run}: not a model folder"),
        (
            ["train-lm", "--tokenizer", "{run}", "--data", "{tmp}/empty", "--out", "{tmp}/m"],
            "error: {tmp}/empty: neither instruct.json",
        ),
        (
            ["train-lm", "--tokenizer", "{tmp}/empty", "--data", "{data}", "--out", "{tmp}/m"],
            "error: {tmp}/empty: not a tokenizer folder",
        ),
        (
            [
                "train-lm",
                "--tokenizer",
                "{run}",
                "--data",
                "{data}",
                "--out",
                "{tmp}/m",
                "train_lm.init_from={tmp}/empty",
            ],
            "error: train_lm.init_from: {tmp}/empty: not a model folder",
        ),
        # a curriculum that cannot run is refused before any training starts
        (
            [
                "train-lm",
                "--tokenizer",
                "{run}",
                "--data",
                "{data}",
                "--out",
                "{tmp}/m",
                "train_lm.phases=[{{steps: 8, lr_max: 1}}]",
            ],
            "error: unknown config key 'train_lm.phases[0].lr_max'",
        ),
        (
            [
                "train-lm",
                "--tokenizer",
                "{run}",
                "--data",
                "{data}",
                "--out",
                "{tmp}/m",
                "train_lm.phases=[{{steps: 8, name: warm}}, {{steps: 0, name: cool}}]",
            ],
            "error: train_lm.phases[1]: phase 'cool' has 0 steps (each phase needs >= 1)",
        ),
        (
            [
                "train-lm",
                "--tokenizer",
                "{run}",
                "--data",
                "{data}",
                "--out",
                "{tmp}/m",
                "train_lm.phases=[{{steps: 3}}, {{steps: 3}}]",
            ],
            "error: train_lm: the phases' steps add up to 6, not to steps=8",
        ),
        (
            [
                "train-lm",
                "--tokenizer",
                "{run}",
                "--data",
                "{data}",
                "--out",
                "{tmp}/m",
                "train_lm.image_layout=depth",
                "train_lm.decompress_segments=2",
            ],
            "error: train_lm: decompress_segments > 1 is a flat-layout option",
        ),
        # the UniCode codebook is its stage I LLM's table: stage II cannot change that LLM
        (
            ["train-lm", "--tokenizer", "{run}", "--data", "{data}", "--out", "{tmp}/m", "llm.num_layers=8"],
            "error: the tokenizer in {run} is bound to its stage I LLM, so llm.* and model.* come from that run; "
            "this run asks for llm.num_layers=8 (stage I: 1): set them in stage I",
        ),
    ],
)
def test_stage2_bad_input_gets_one_error_line_and_exit_2(trained, trained_lm, capsys, tmp_path, args, message):
    import shutil

    data, run = trained
    img = data / "test" / "images" / "000000.png"
    (tmp_path / "empty").mkdir()
    (tmp_path / "cut.png").write_bytes(img.read_bytes()[:60])
    shutil.copytree(trained_lm, tmp_path / "nomodel")
    shutil.rmtree(tmp_path / "nomodel" / "text_tokenizer")
    long = "draw " + " and ".join(["a small red circle at the top left"] * 150)

    def fill(s):
        return s.format(data=data, run=run, tmp=tmp_path, model=trained_lm, img=img, long=long)

    rc, out, err = run_cli(capsys, *map(fill, args))
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(fill(message)), err
    if args[0] == "train-lm":
        assert not (tmp_path / "m" / "checkpoints").exists()  # refused before training


def test_a_sharding_backend_accelerate_cannot_run_here_is_reported(trained, capsys, tmp_path, monkeypatch):
    """`accelerate launch` with an FSDP or DeepSpeed config on a machine without a GPU: Accelerate
    falls back to plain processes without a word; the run says so on one line and still trains."""
    data, run = trained
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets from the config
    rc, out, err = run_cli(
        capsys,
        "train-lm",
        "--tokenizer",
        run,
        "--data",
        data,
        "--out",
        tmp_path / "m",
        *TINY_OVERRIDES,
        "train_lm.steps=2",
        "train_lm.save_every=2",
    )
    assert rc == 0 and (tmp_path / "m" / "llm").is_dir()
    assert (
        "warning: the accelerate config asks for FSDP, which Accelerate runs on GPUs only; this run uses one process"
        in err.splitlines()
    )


def test_eval_model_skips_and_counts_malformed_lines(trained, trained_lm, capsys, tmp_path):
    import shutil

    data, _ = trained
    split = tmp_path / "d" / "test"
    shutil.copytree(data / "test", split, ignore=shutil.ignore_patterns(".codes"))
    lines = (split / "t2i.jsonl").read_text().splitlines()
    (split / "t2i.jsonl").write_text("\n".join(lines[:3] + ["{oops", '{"image": 3}'] + lines[3:]) + "\n")
    rc, out, err = run_cli(
        capsys, "eval", "model", "--model", trained_lm, "--data", tmp_path / "d", "--split", "test", "--max-t2i", "4"
    )
    assert rc == 1
    res = json.loads(out)
    assert res["bad_records"] == 2 and res["t2i_n"] == 4
    assert "skipping t2i.jsonl line 4: not valid JSON" in err and "line 5" in err


def test_data_shards_packs_a_split_and_reports_the_counts(shapes_dir, capsys, tmp_path):
    from unicodebook.data.multimodal import read_records
    from unicodebook.data.shards import count_samples

    rc, out, err = run_cli(
        capsys, "data", "shards", "--src", shapes_dir / "val", "--out", tmp_path / "sh", "--per-shard", "10"
    )
    assert rc == 0, err
    rec = read_records(shapes_dir / "val")
    n = len(rec.conversations) + len(rec.captions)
    res = json.loads(out)
    assert res["samples"] == n == count_samples(tmp_path / "sh") and res["skipped"] == 0
    assert res["shards"] == len(list((tmp_path / "sh").glob("shard-*.tar"))) == -(-n // 10)


def test_data_shards_on_a_missing_folder_is_one_error_line(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "data", "shards", "--src", tmp_path / "nowhere", "--out", tmp_path / "sh")
    assert rc == 2 and not out
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"error: folder '{tmp_path}/nowhere' does not exist"]
    assert not (tmp_path / "sh").exists()


def test_eval_model_refuses_a_pictures_path_that_is_a_file(trained_lm, capsys, tmp_path):
    taken = tmp_path / "report.png"
    taken.write_bytes(b"keep me")
    rc, out, err = run_cli(capsys, "eval", "model", "--model", trained_lm, "--data", tmp_path, "--pictures", taken)
    assert rc != 0 and out == ""
    assert err.strip().splitlines() == [f"error: --pictures {taken}: exists and is not a folder"]
    assert taken.read_bytes() == b"keep me"
