"""Stage I's dihedral augmentation: the eight symmetries, drawn as a function of (seed, step)."""

import pytest
import torch

from unicodebook.data.augment import augment_batch, dihedral


def test_the_eight_choices_are_the_eight_distinct_symmetries_of_the_square():
    img = torch.rand(1, 3, 6, 6)
    outs = [dihedral(img, torch.tensor([t]))[0] for t in range(8)]
    assert torch.equal(outs[0], img[0])  # choice 0 is the identity
    assert len({o.numpy().tobytes() for o in outs}) == 8
    for o in outs:  # each only moves pixels: every (r, g, b) triple survives, none is made up
        assert torch.equal(o.flatten(1).T.sort(0).values, img[0].flatten(1).T.sort(0).values)
    assert torch.equal(outs[4], img[0].transpose(-1, -2))  # a mirror, not a turn


def test_choices_depend_on_seed_and_step_only_and_shard_like_the_global_batch():
    images = torch.rand(8, 3, 5, 5)
    a = augment_batch(images, "dihedral", seed=3, step=17)
    assert torch.equal(a, augment_batch(images, "dihedral", seed=3, step=17))  # a resumed step: the same
    assert not torch.equal(a, augment_batch(images, "dihedral", seed=3, step=18))
    # two ranks with four images each augment exactly as one process with all eight
    halves = [augment_batch(images[r * 4 : (r + 1) * 4], "dihedral", 3, 17, first=r * 4, total=8) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), a)
    assert augment_batch(images, "none", 3, 17) is images


def test_non_square_images_and_captioned_recipes_are_refused(shapes_dir, tmp_path):
    from unicodebook.config import load_config
    from unicodebook.errors import UnicodebookError
    from unicodebook.train.stage1 import train_tokenizer

    with pytest.raises(ValueError, match=r"needs square images, got \(4, 6\)"):
        augment_batch(torch.rand(2, 3, 4, 6), "dihedral", 0, 0)
    cfg = load_config("seed-tiny", ["train_tokenizer.augment=dihedral"])
    with pytest.raises(
        UnicodebookError,
        match=r"flips images their captions describe; the SEED recipe trains on "
        r"captions, so it takes augment=none$",
    ):
        train_tokenizer(cfg, shapes_dir, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything is written
