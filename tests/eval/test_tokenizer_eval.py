"""Tokenizer evaluation on a shapes-world split: PSNR/SSIM, usage per layer, judge accuracy."""

import json

import torch
from conftest import tiny_config

from unicodebook.data.images import load_image
from unicodebook.data.shapes import Scene
from unicodebook.eval.tokenizer import _judge, _judge_summary, evaluate_tokenizer
from unicodebook.tokenizers.unicode import build_tokenizer


def test_judge_reads_ground_truth_images_as_their_scenes(shapes_dir):
    recs = [json.loads(line) for line in (shapes_dir / "test" / "scenes.jsonl").read_text().splitlines()]
    imgs = torch.stack([load_image(shapes_dir / "test" / r["image"]) for r in recs])
    judged = _judge(imgs, [Scene.from_dict(r["scene"]) for r in recs])
    assert all(ok for ok, _ in judged)
    assert _judge_summary(judged)["judge_accuracy"] == 1.0
    # a blank image is no scene at all
    assert not any(
        ok for ok, _ in _judge(torch.ones(len(recs), 3, 32, 32), [Scene.from_dict(r["scene"]) for r in recs])
    )


def test_eval_reports_per_layer_health_and_judge_accuracy(shapes_dir):
    visual_tok = build_tokenizer(tiny_config())
    res = evaluate_tokenizer(visual_tok, shapes_dir, split="test", progress=False)
    assert res["n_images"] == 24 and res["n_bad"] == 0
    assert len(res["usage"]) == len(res["perplexity"]) == len(res["layers"]) == 4
    assert res["judge_accuracy"] == 0.0 and "judge_accuracy_seen" in res  # an untrained decoder draws no scene
    assert all(1 <= p <= 64 for p in res["perplexity"])  # perplexity is bounded by the 64 exposed rows
