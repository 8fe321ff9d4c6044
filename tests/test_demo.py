"""`unicodebook demo` at toy sizes: the report holds the metric table and its pictures."""

import re

import pytest
from conftest import TINY_OVERRIDES
from PIL import Image

from unicodebook.demo import run_demo


@pytest.mark.slow
def test_demo_writes_a_report_with_metrics_and_pictures(tmp_path):
    """The demo as shipped (depth layout), at toy sizes."""
    over = TINY_OVERRIDES + ["train_lm.image_layout=depth"]
    report = run_demo(tmp_path / "demo", over, n_train=64, n_val=16, n_test=16)
    text = report.read_text()
    psnr = float(re.search(r"\| PSNR \| ([0-9.]+) dB \|", text).group(1))
    assert psnr > 10
    for pic in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert Image.open(report.parent / pic).size[0] > 0, pic
    assert (tmp_path / "demo" / "eval_tokenizer_test.json").exists()
    # running it again resumes the finished run instead of retraining or failing
    assert "the depth head writing each position's 4 codes" in text
    assert run_demo(tmp_path / "demo", over, n_train=64, n_val=16, n_test=16) == report
