"""``unicodebook`` command line: each subcommand is a typed function.

User errors (bad files, configs, checkpoints) print one ``error: …`` line and exit 2; a batch
command that skipped bad items reports each on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path

from .errors import TrainingStopped, UnicodebookError

EXIT_USER_ERROR = 2
EXIT_PARTIAL = 1
EXIT_SIGTERM = 128 + 15  # the shell's code for a process ended by SIGTERM


# ------------------------------------------------------------------------------ subcommands
def _device(name: str):
    from .utils.device import resolve_device

    return resolve_device(name)


def cmd_data_shapes(out: Path, n_train: int, n_val: int, n_test: int, size: int | None, seed: int) -> int:
    from .data.shapes import DEFAULT_SIZE, write_dataset

    size = DEFAULT_SIZE if size is None else size
    if not 32 <= size <= 64:
        raise UnicodebookError(f"--size must be within 32..64, got {size}")
    meta = write_dataset(Path(out), n_train=n_train, n_val=n_val, n_test=n_test, size=size, seed=seed, progress=True)
    print(json.dumps({"out": str(out), "counts": meta["counts"], "size": meta["size"], "seed": meta["seed"]}))
    return 0


def cmd_data_photos(out: Path, n_train: int, n_val: int, n_test: int, size: int, seed: int) -> int:
    from .data.photos import write_photo_set

    meta = write_photo_set(Path(out), size=size, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    print(json.dumps({"out": str(out), "counts": meta["counts"], "size": meta["size"], "photos": meta["photos"]}))
    return 0


def cmd_data_shards(src: Path, out: Path, per_shard: int) -> int:
    from .data.shards import FolderSamples, write_shards

    samples = FolderSamples(Path(src))
    paths = write_shards(samples, Path(out), samples_per_shard=per_shard)
    print(
        json.dumps({"out": str(out), "shards": len(paths), "samples": samples.n_samples, "skipped": samples.n_skipped})
    )
    return EXIT_PARTIAL if samples.n_skipped else 0


def cmd_train_tokenizer(config: str | None, data: Path, out: Path, resume: bool, overrides: list[str]) -> int:
    from .train.stage1 import train_tokenizer_from_files

    res = train_tokenizer_from_files(config, overrides, data, out, resume=resume)
    summary = {
        "run": str(res.run),
        "steps": res.steps,
        "seconds": round(res.seconds, 1),
        "train": {k: res.final.get(k) for k in ("loss", "psnr", "usage")},
    }
    if res.val:
        summary["val"] = {k: res.val[k] for k in ("psnr", "ssim", "usage", "usage_all", "perplexity")}
    if res.main:  # one report per distributed run
        print(json.dumps(summary))
    return 0


def cmd_tokenize(tokenizer: Path, images: list[Path], device: str = "auto") -> int:
    import torch

    from .data.images import load_image
    from .errors import BadImageError
    from .tokenizers.base import PAD_CODE, limits_of, load_tokenizer, odd_size_of

    visual_tok = load_tokenizer(tokenizer, device=_device(device))
    bad = 0
    for path in images:
        try:
            x = load_image(path, visual_tok.image_size, odd_size_of(visual_tok), **limits_of(visual_tok))
        except BadImageError as e:
            print(f"error: {e}", file=sys.stderr)
            bad += 1
            continue
        with torch.no_grad():
            codes = visual_tok.encode(x[None])[0].cpu()
        codes = codes[codes != PAD_CODE] if not visual_tok.layout.fixed else codes  # a variable layout: its own length
        line = {"image": str(path), "shape": list(codes.shape), "codes": codes.tolist()}
        if hasattr(visual_tok, "token_ids"):  # codes that are LLM token ids (UniCode)
            line["token_ids"] = visual_tok.token_ids(codes).flatten().tolist()
        print(json.dumps(line))
    return EXIT_PARTIAL if bad else 0


def cmd_reconstruct(tokenizer: Path, image: Path, out: Path, device: str = "auto") -> int:
    import torch

    from .data.images import load_image, tensor_to_pil
    from .eval.metrics import psnr
    from .tokenizers.base import limits_of, load_tokenizer, odd_size_of

    visual_tok = load_tokenizer(tokenizer, device=_device(device))
    x = load_image(image, visual_tok.image_size, odd_size_of(visual_tok), **limits_of(visual_tok))
    with torch.no_grad():
        recon = visual_tok.decode(visual_tok.encode(x[None])).cpu()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_pil(recon[0]).save(out)
    print(
        json.dumps(
            {
                "image": str(image),
                "out": str(out),
                "psnr": round(float(psnr(recon, x[None])[0]), 3),
                "codes_per_image": visual_tok.layout.length,
            }
        )
    )
    return 0


def cmd_eval_tokenizer(tokenizer: Path, data: Path, split: str, device: str = "auto") -> int:
    from .eval.tokenizer import evaluate_tokenizer
    from .tokenizers.base import load_tokenizer

    visual_tok = load_tokenizer(tokenizer, device=_device(device))
    res = evaluate_tokenizer(visual_tok, data, split=split)
    print(json.dumps(res))
    return EXIT_PARTIAL if res["n_bad"] else 0


def cmd_train_lm(config: str | None, tokenizer: Path, data: Path, out: Path, resume: bool, overrides: list[str]) -> int:
    from .train.stage2 import train_lm_from_files

    res = train_lm_from_files(config, overrides, tokenizer, data, out, resume=resume)
    if res.main:  # one report per distributed run
        print(
            json.dumps(
                {
                    "run": str(res.run),
                    "steps": res.steps,
                    "seconds": round(res.seconds, 1),
                    "train": {k: round(v, 4) for k, v in res.final.items() if k.startswith(("loss_", "acc_"))},
                }
            )
        )
    return 0


def cmd_chat(
    model_dir: Path, image: Path, question: str | None, max_new_tokens: int | None, device: str = "auto"
) -> int:
    from .data.images import image_limits, load_image
    from .lm.model import load_model

    model = load_model(model_dir, device=_device(device))
    x = load_image(image, model.tokenizer.image_size, model.config.data.odd_size, **image_limits(model.config.data))
    n = max_new_tokens or model.config.generate.max_new_tokens
    if question is None:
        return _chat_loop(model, x, n)
    print(model.chat(x, question, max_new_tokens=n))
    return 0


def _chat_loop(model, image, max_new_tokens: int) -> int:
    """Questions from stdin, one a line, each answer streamed as it is decoded (tokens/s on
    stderr); ``/image PATH`` reads another image, ``/quit`` (or end of input) ends."""
    import time

    from .data.images import image_limits, load_image
    from .errors import BadImageError

    def encode(x):  # the image's codes, and its features where the model reads them
        codes, features = model.encode(x[None])
        return codes[0], None if features is None else features[0]

    codes, features = encode(image)
    print("ask about the image; /image PATH reads another, /quit ends", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/image"):
            try:
                codes, features = encode(
                    load_image(
                        line[len("/image") :].strip(),
                        model.tokenizer.image_size,
                        model.config.data.odd_size,
                        **image_limits(model.config.data),
                    )
                )
                print("image loaded", file=sys.stderr)
            except BadImageError as e:
                print(f"error: {e}", file=sys.stderr)  # the loop goes on with the image it had
            continue
        t0 = time.perf_counter()
        answer = model.stream_answer(codes, line, max_new_tokens, features=features)
        while True:
            try:
                print(next(answer), end="", flush=True)
            except StopIteration as done:
                tokens = done.value
                break
        print(flush=True)
        seconds = time.perf_counter() - t0
        print(f"{tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


def cmd_generate(
    model_dir: Path,
    prompt: str,
    out: Path,
    n: int,
    cfg: float | None,
    temperature: float | None,
    top_k: int | None,
    seed: int,
    device: str = "auto",
) -> int:
    import torch

    from .data.images import tensor_to_pil
    from .lm.model import load_model

    if n < 1:
        raise UnicodebookError(f"--n must be >= 1, got {n}")
    model = load_model(model_dir, device=_device(device))
    gen_cfg = model.config.generate
    # generate_image's steps, with a progress bar over the code steps on stderr (stdout stays JSON);
    # the codes are kept: a variable-length image cut at the maximum is reported
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        codes = model.generate_codes(
            [prompt] * n,
            gen_cfg.cfg_scale if cfg is None else cfg,
            gen_cfg.temperature if temperature is None else temperature,
            gen_cfg.top_k if top_k is None else top_k,
            gen,
            progress=sys.stderr.isatty(),
        )
        images = model.tokenizer.decode(codes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(n)]
    for img, path in zip(images, paths):
        tensor_to_pil(img).save(path)
    report = {"prompt": prompt, "images": [str(p) for p in paths], "codes_per_image": model.codes_per_image}
    layout = model.tokenizer.layout
    if not layout.fixed:  # a variable-length image ends at </img>, or is cut at the layout's maximum
        lengths = layout.lengths(codes).tolist()
        cut = [k == layout.length for k in lengths]
        report.update(codes=lengths, ended_at_max=cut)
        for path, c in zip(paths, cut):
            if c:
                print(
                    f"warning: {path}: no </img> within {layout.length} codes; decoded the {layout.length} written",
                    file=sys.stderr,
                )
    print(json.dumps(report))
    return 0


def cmd_serve(model_dir: Path, host: str, port: int, device: str = "auto", max_draw_batch: int = 16) -> int:
    try:
        from .serve.limits import Limits
        from .serve.run import serve
    except ImportError as e:
        raise UnicodebookError(
            f"serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'unicodebook[serve]'"
        ) from None
    if max_draw_batch < 1:
        raise UnicodebookError(f"--max-draw-batch must be at least 1, got {max_draw_batch}")
    return serve(model_dir, host, port, device=_device(device), limits=Limits(max_draw_batch=max_draw_batch))


def cmd_eval_model(
    model_dir: Path,
    data: Path,
    split: str,
    max_t2i: int | None,
    max_vqa: int | None,
    device: str = "auto",
    pictures: Path | None = None,
) -> int:
    from .eval.model import evaluate_model
    from .lm.model import load_model

    if pictures is not None:  # before the model loads: a bad folder fails at once, not after the evaluation
        if pictures.exists() and not pictures.is_dir():
            raise UnicodebookError(f"--pictures {pictures}: exists and is not a folder")
        pictures.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir, device=_device(device))
    res = evaluate_model(model, data, split=split, max_t2i=max_t2i, max_vqa=max_vqa, pictures=pictures)
    print(json.dumps(res))
    return EXIT_PARTIAL if res["bad_records"] or res["bad_images"] else 0


def cmd_demo(out: Path, overrides: list[str], full: bool = False, config: str | None = None) -> int:
    from .demo import FULL, run_demo

    if full and config:
        raise UnicodebookError("demo: --full is the tiny_full preset; give either --full or --config")
    report = run_demo(Path(out), overrides, **(FULL if full else {"preset": config} if config else {}))
    print(f"report: {report}")
    return 0


# ------------------------------------------------------------------------------ parser
def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one) | cpu | cuda | cuda:N")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unicodebook", description="Unified-codebook multimodal LLMs (UniCode).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="make datasets").add_subparsers(dest="dataset", required=True)
    s = d.add_parser("shapes", help="write the procedural shapes world")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n-train", type=int, default=2000)
    s.add_argument("--n-val", type=int, default=200)
    s.add_argument("--n-test", type=int, default=500)
    s.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in px (default 36: the tiny preset's, where the "
        "3×3 object grid falls on whole 4 px code cells)",
    )
    s.add_argument("--seed", type=int, default=0)
    ph = d.add_parser(
        "photos",
        help="cut natural-photo crops from the photographs installed packages ship "
        "(scikit-image's, matplotlib's); each split from other photos",
    )
    ph.add_argument("--out", type=Path, required=True)
    ph.add_argument("--n-train", type=int, default=20_000)
    ph.add_argument("--n-val", type=int, default=500)
    ph.add_argument("--n-test", type=int, default=2000)
    ph.add_argument("--size", type=int, default=36, help="crop side in px")
    ph.add_argument("--seed", type=int, default=0)
    sh = d.add_parser("shards", help="pack an image folder or a stage II split into WebDataset tar shards")
    sh.add_argument(
        "--src", type=Path, required=True, help="an image folder, or a split with instruct.json / t2i.jsonl"
    )
    sh.add_argument(
        "--out", type=Path, required=True, help="folder for shard-000000.tar, ... (must hold no shards yet)"
    )
    sh.add_argument("--per-shard", type=int, default=1000, help="samples per shard")

    t = sub.add_parser("train-tokenizer", help="stage I: train the visual tokenizer")
    t.add_argument(
        "--config", default=None, help="YAML path or preset name (default: tiny, or the run's own on --resume)"
    )
    t.add_argument("--data", type=Path, required=True, help="shapes-world root or an image folder")
    t.add_argument("--out", type=Path, required=True, help="run folder (becomes a tokenizer folder)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.codebook.mode=frozen")

    k = sub.add_parser("tokenize", help="print the codes of images as JSON lines")
    k.add_argument("--tokenizer", type=Path, required=True)
    k.add_argument("images", type=Path, nargs="+")
    _device_arg(k)

    r = sub.add_parser("reconstruct", help="encode and decode one image")
    r.add_argument("--tokenizer", type=Path, required=True)
    r.add_argument("image", type=Path)
    r.add_argument("--out", type=Path, required=True)
    _device_arg(r)

    e = sub.add_parser("eval", help="evaluate").add_subparsers(dest="what", required=True)
    et = e.add_parser("tokenizer", help="PSNR, SSIM, codebook usage and perplexity per layer")
    et.add_argument("--tokenizer", type=Path, required=True)
    et.add_argument("--data", type=Path, required=True)
    et.add_argument("--split", default="test")
    _device_arg(et)

    lm = sub.add_parser("train-lm", help="stage II: teach the LLM to read and write images")
    lm.add_argument(
        "--config",
        default=None,
        help="YAML path or preset (default: the tokenizer run's config, or the run's own on --resume)",
    )
    lm.add_argument("--tokenizer", type=Path, required=True, help="stage I run folder")
    lm.add_argument(
        "--data", type=Path, required=True, help="shapes-world root or a folder with instruct.json / t2i.jsonl"
    )
    lm.add_argument("--out", type=Path, required=True, help="run folder (becomes a model folder)")
    lm.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    lm.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train_lm.tasks.decompress=0")

    c = sub.add_parser("chat", help="answer a question about an image")
    c.add_argument("--model", type=Path, required=True, help="stage II run folder")
    c.add_argument("--image", type=Path, required=True)
    c.add_argument("--max-new-tokens", type=int, default=None)
    c.add_argument(
        "question",
        nargs="?",
        default=None,
        help="the question (none: ask questions one a line from stdin, answers streamed)",
    )
    _device_arg(c)

    gn = sub.add_parser("generate", help="draw an image from a prompt")
    gn.add_argument("--model", type=Path, required=True, help="stage II run folder")
    gn.add_argument("prompt")
    gn.add_argument("--out", type=Path, required=True, help="PNG path (with --n K: OUT_0.png … OUT_{K-1}.png)")
    gn.add_argument("--n", type=int, default=1, help="images to sample")
    gn.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1: none)")
    gn.add_argument("--temperature", type=float, default=None, help="0: greedy")
    gn.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest codes (0: all)")
    gn.add_argument("--seed", type=int, default=0)
    _device_arg(gn)

    sv = sub.add_parser("serve", help="serve a model over HTTP: OpenAI's chat and image API, and a web page at /")
    sv.add_argument("--model", type=Path, required=True, help="stage II run folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000, help="0: a free port (the printed URL has it)")
    sv.add_argument(
        "--max-draw-batch",
        type=int,
        default=16,
        help="images one model call may draw for greedy requests waiting together (1: no batching)",
    )
    _device_arg(sv)

    em = e.add_parser("model", help="VQA, judged text-to-image and decompression accuracy of a stage II model")
    em.add_argument("--model", type=Path, required=True)
    em.add_argument("--data", type=Path, required=True)
    em.add_argument("--split", default="test")
    em.add_argument("--max-t2i", type=int, default=None, help="evaluate only the first N text-to-image prompts")
    em.add_argument("--max-vqa", type=int, default=None, help="evaluate only the first N questions")
    em.add_argument(
        "--pictures",
        type=Path,
        default=None,
        help="write t2i_samples.png (8 seen and 8 held-out prompts, judged) and vqa_examples.png here",
    )
    _device_arg(em)

    m = sub.add_parser("demo", help="the whole pipeline on the shapes world, with a report")
    m.add_argument("--out", type=Path, default=Path("demo_out"))
    m.add_argument(
        "--full",
        action="store_true",
        help="the full stage II recipe (preset tiny_full: one run of three phases, ~50 min on 2 cores) "
        "on 20,000 training images instead of the demo's 2,000",
    )
    m.add_argument(
        "--config",
        default=None,
        help="a preset or YAML path for both stages instead of tiny (e.g. seed-tiny: the SEED tokenizer)",
    )
    m.add_argument("overrides", nargs="*", help="dotted config overrides for the runs")
    return p


def dispatch(args: argparse.Namespace) -> int:
    c = args.command
    if c == "data" and args.dataset == "shards":
        return cmd_data_shards(args.src, args.out, args.per_shard)
    if c == "data" and args.dataset == "photos":
        return cmd_data_photos(args.out, args.n_train, args.n_val, args.n_test, args.size, args.seed)
    if c == "data":
        return cmd_data_shapes(args.out, args.n_train, args.n_val, args.n_test, args.size, args.seed)
    if c == "train-tokenizer":
        return cmd_train_tokenizer(args.config, args.data, args.out, args.resume, args.overrides)
    if c == "tokenize":
        return cmd_tokenize(args.tokenizer, args.images, args.device)
    if c == "reconstruct":
        return cmd_reconstruct(args.tokenizer, args.image, args.out, args.device)
    if c == "train-lm":
        return cmd_train_lm(args.config, args.tokenizer, args.data, args.out, args.resume, args.overrides)
    if c == "chat":
        return cmd_chat(args.model, args.image, args.question, args.max_new_tokens, args.device)
    if c == "generate":
        return cmd_generate(
            args.model, args.prompt, args.out, args.n, args.cfg, args.temperature, args.top_k, args.seed, args.device
        )
    if c == "serve":
        return cmd_serve(args.model, args.host, args.port, args.device, args.max_draw_batch)
    if c == "eval" and args.what == "model":
        return cmd_eval_model(args.model, args.data, args.split, args.max_t2i, args.max_vqa, args.device, args.pictures)
    if c == "eval":
        return cmd_eval_tokenizer(args.tokenizer, args.data, args.split, args.device)
    if c == "demo":
        return cmd_demo(args.out, args.overrides, args.full, args.config)
    raise AssertionError(c)  # pragma: no cover


@contextlib.contextmanager
def _cli_output():
    """Library reports (e.g. skipped bad images) become plain ``warning: …`` lines on stderr
    while a command runs; the logger is restored afterwards (main() may be called in-process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("unicodebook")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torch")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _cli_output():
            return dispatch(args)
    except TrainingStopped as e:  # SIGTERM: a checkpoint was saved, the run goes on with --resume
        print(str(e), file=sys.stderr)
        return EXIT_SIGTERM
    except UnicodebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; checkpoints already written are intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
