"""The depth layout: one LLM step per code position, a depth head writing its G codes against the
codebook rows, the LLM reading each written position back as the Ẑ it reads in an image."""

import pytest
import torch
from conftest import tiny_config

from unicodebook.errors import UnicodebookError
from unicodebook.lm.model import load_model
from unicodebook.quantize import position_embeddings
from unicodebook.train.stage2 import train_lm


@pytest.fixture(scope="module")
def model(depth_model_run):
    return load_model(depth_model_run)


def test_reading_and_writing_share_one_representation(model):
    """What the LLM reads for a position of an encoded image is that position's aggregate, which
    is also what it is fed back after writing the position: for RQ exactly Ẑ."""
    visual_tok = model.tokenizer
    codes = torch.randint(0, visual_tok.codebook.num_codes, (2, *visual_tok.grid_shape))
    torch.testing.assert_close(model.latents(codes), visual_tok.embed(codes))
    one = visual_tok.position_latents(codes.flatten(1, 2)[:, 5:6])
    torch.testing.assert_close(one[:, 0], visual_tok.embed(codes)[:, 5])
    gh, gw, g = visual_tok.grid_shape
    assert model.steps_per_image == gh * gw and model.codes_per_image == gh * gw * g


def test_hq_position_aggregate_is_the_mean_of_its_latent_cells():
    from unicodebook.quantize import UnifiedCodebook, build_quantizer
    from unicodebook.quantize.codebook import CodebookRule

    cb = UnifiedCodebook(torch.arange(64), 16, CodebookRule(mode="frozen", restart_every=0)).bind(
        torch.nn.Embedding(64, 16)
    )
    hq = build_quantizer("hq", cb, 2, 0.25, 0.0, 0.1).eval()
    codes = torch.randint(0, 64, (3, 2, 2, 10))  # a 4×4 latent: 2×2 positions of 1 top + 4 bottom codes × depth 2
    z = hq.codes_to_embeddings(codes)  # (3, 4, 4, 16)
    cells = z.reshape(3, 2, 2, 2, 2, 16).mean((2, 4))  # average each position's 2×2 cells
    torch.testing.assert_close(position_embeddings(hq, codes.flatten(1, 2)), cells.reshape(3, 4, 16))


def _slow_greedy(model, prompt: str) -> torch.Tensor:
    """Greedy depth decoding with no cache: the whole sequence recomputed for every position, and the
    depth head's training forward rerun for every code."""
    ids = model.fmt.t2i_prefix(prompt)
    table = model.llm.get_input_embeddings()
    rows = table.weight[model.code_token_ids]
    written = []
    with torch.no_grad():
        for t in range(model.fmt.positions):
            emb = table(torch.tensor([ids + [model.fmt.image_id] * t]))
            if t:
                lat = model.tokenizer.position_latents(torch.stack(written, 1))
                emb[0, len(ids) :] = lat[0] + model.image_positions.latents()[:t]
            h = model._hidden(emb, torch.ones(emb.shape[:2], dtype=torch.long)).last_hidden_state[:, -1]
            codes = rows.new_zeros(1, 0, dtype=torch.long)
            for _ in range(model.tokenizer.grid_shape[2]):  # the training forward, rerun for each code
                logits = model.depth_head(h, rows[codes], rows)[:, -1]
                codes = torch.cat([codes, logits.argmax(-1, keepdim=True)], 1)
            written.append(codes)
    return torch.stack(written, 1)[0]


@pytest.mark.parametrize("width,guided", [(0, False), (16, True)])
def test_cached_depth_head_scores_as_its_training_forward(width, guided):
    """Decoding one code at a time with the head's key/value cache and the code rows folded into its
    width gives the logits of the training forward over the whole prefix, guided or not."""
    from unicodebook.lm.depth import DepthHead
    from unicodebook.lm.model import small_batch_linear

    torch.manual_seed(0)
    head = DepthHead(32, 4, layers=2, heads=4, width=width).eval()
    rows, hidden = torch.randn(50, 32), torch.randn(6 if guided else 3, 32)
    target = torch.randint(0, 50, (3, 4))
    seen = []

    def pick(logits):  # teacher forcing: record the logits, return the target code
        seen.append(logits)
        return target[:, len(seen) - 1]

    for linear in (torch.nn.functional.linear, small_batch_linear):
        seen.clear()
        codes = head.decoder(rows, linear).sample(hidden, pick, 3 if guided else 0, cfg_scale=2.0)
        assert torch.equal(codes, target)
        with torch.no_grad():
            full = head(hidden, rows[torch.cat([target, target]) if guided else target][:, :3], rows)
        if guided:
            full = full[3:] + 2.0 * (full[:3] - full[3:])
        torch.testing.assert_close(torch.stack(seen, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decoder", ["compiled", "transformers"])
def test_kv_cached_depth_decoding_equals_full_recomputation(model, decoder, monkeypatch):
    if decoder == "transformers":  # the generic step: the LLM's own forward with the cache
        from unicodebook.lm import model as model_mod

        monkeypatch.setattr(model_mod, "cpu_decoder_unsupported", lambda llm, n: "forced off")
    prompt = "draw a small red circle at the top left"
    fast = model.generate_codes([prompt], cfg_scale=1.0, temperature=0.0)[0].flatten(0, 1)
    slow = _slow_greedy(model, prompt)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("cfg_scale,temperature,top_k", [(1.0, 0.0, 0), (3.0, 1.0, 5), (1.25, 0.0, 0)])
def test_every_generated_depth_image_is_code_rows_and_decodes(model, cfg_scale, temperature, top_k):
    prompts = ["draw a small red circle at the top left", "draw a large blue square in the center"]
    codes = model.generate_codes(prompts, cfg_scale, temperature, top_k, torch.Generator().manual_seed(0))
    assert tuple(codes.shape) == (2, *model.tokenizer.grid_shape)
    assert int(codes.min()) >= 0 and int(codes.max()) < model.tokenizer.codebook.num_codes  # only code rows
    images = model.tokenizer.decode(codes)
    assert tuple(images.shape) == (2, 3, model.tokenizer.image_size, model.tokenizer.image_size)
    a = model.generate_image(prompts[0], n=2, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, seed=4)
    assert torch.equal(
        a, model.generate_image(prompts[0], n=2, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, seed=4)
    )


def test_depth_decompression_reads_z_and_learns_to_copy_it(model, tokenizer_run, shapes_dir, tmp_path):
    """Decompression: Ẑ in, then the written slots, each position's G codes out through the head.
    120 steps of decompression alone raise the teacher-forced code accuracy of the test split above
    the 8-step mixed model's."""
    from unicodebook.eval.model import evaluate_model

    codes = torch.randint(0, model.tokenizer.codebook.num_codes, (1, *model.tokenizer.grid_shape))
    s = model.fmt.decompression(codes[0])
    assert s.input_ids.count(model.fmt.image_id) == 2 * model.fmt.positions  # Ẑ read, then the written slots
    assert torch.equal(s.codes, codes[0].flatten(0, 1))

    def accuracy(m):
        return evaluate_model(
            m, shapes_dir, split="test", max_t2i=0, max_vqa=1, max_describe=1, max_decompress=24, progress=False
        )["decompression_code_accuracy"]

    cfg = tiny_config(
        "train_lm.image_layout=depth",
        "train_lm.depth_head.heads=2",
        "train_lm.steps=120",
        "train_lm.lr=5e-3",
        "train_lm.tasks.instruct=0",
        "train_lm.tasks.t2i=0",
        "train_lm.save_every=0",
    )
    train_lm(cfg, tokenizer_run, shapes_dir, tmp_path / "run", progress=False)
    before, after = accuracy(model), accuracy(load_model(tmp_path / "run"))
    assert after > before + 0.05, (before, after)  # measured: 0.393 → 0.498


def test_depth_training_lowers_the_text_to_image_loss(tokenizer_run, shapes_dir, tmp_path):
    cfg = tiny_config(
        "train_lm.image_layout=depth",
        "train_lm.depth_head.heads=2",
        "train_lm.steps=30",
        "train_lm.lr=3e-3",
        "train_lm.tasks.decompress=0",
        "train_lm.tasks.instruct=0",
        "train_lm.save_every=0",
    )
    train_lm(cfg, tokenizer_run, shapes_dir, tmp_path / "run", progress=False)
    import json

    m = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["loss_t2i"] < 0.7 * m[0]["loss_t2i"]


def test_a_depth_head_needs_codes_in_depth(tokenizer_run, shapes_dir, tmp_path):
    from unicodebook.train.stage1 import train_tokenizer

    flat_tok = tmp_path / "tok1"
    train_tokenizer(
        tiny_config("model.quantizer.depth=1", "train_tokenizer.steps=2"), shapes_dir, flat_tok, progress=False
    )
    with pytest.raises(
        UnicodebookError,
        match=r"a depth head needs several codes per position; this tokenizer's grid "
        r"8×8×1 has 1",
    ):
        train_lm(tiny_config("train_lm.image_layout=depth"), flat_tok, shapes_dir, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_from_a_model_of_the_other_layout_is_refused(depth_model_run, tokenizer_run, shapes_dir, tmp_path):
    with pytest.raises(UnicodebookError, match="writes images in the depth layout, this run flat"):
        train_lm(
            tiny_config(f"train_lm.init_from={depth_model_run}"),
            tokenizer_run,
            shapes_dir,
            tmp_path / "r",
            progress=False,
        )


def test_under_code_noise_the_depth_head_reads_the_true_codes_before_each_code(model):
    """Noisy teacher forcing corrupts what the LLM reads back of each written position, not the
    depth head's prefix within a position: the head learns the conditional it samples from."""
    from unicodebook.lm.sequence import collate, corrupt_codes

    codes = torch.randint(0, model.tokenizer.codebook.num_codes, (2, *model.tokenizer.grid_shape))
    prompts = ["draw a small red circle at the top left", "draw a large blue square in the center"]
    clean = collate([model.fmt.text_to_image(p, c) for p, c in zip(prompts, codes)], model.fmt.pad_id)
    noisy = corrupt_codes(clean, model.code_token_ids, 1.0, torch.Generator().manual_seed(0))
    assert not torch.equal(noisy.codes_in, noisy.codes)
    seen = []
    hook = model.depth_head.register_forward_pre_hook(lambda mod, args: seen.append([a.detach() for a in args]))
    try:
        with torch.no_grad():
            model(clean, None), model(noisy, None)
    finally:
        hook.remove()
    table, g = model.llm.get_input_embeddings(), model.tokenizer.grid_shape[2]
    true_prefix = table(model.code_token_ids[clean.codes[..., : g - 1]]).flatten(0, 1)
    (clean_h, clean_prefix, _), (noisy_h, noisy_prefix, _) = seen
    torch.testing.assert_close(clean_prefix, true_prefix)
    torch.testing.assert_close(noisy_prefix, true_prefix)
    n = model.tokenizer.grid_shape[0] * model.tokenizer.grid_shape[1]
    first = torch.arange(0, 2 * n, n)  # the first position of each image is read before any code
    torch.testing.assert_close(noisy_h[first], clean_h[first])
    assert (noisy_h - clean_h).abs().amax(-1).gt(1e-4).float().mean() > 0.9  # the LLM read the noisy ones
