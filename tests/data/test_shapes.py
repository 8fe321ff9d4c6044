"""Tests for the shapes world (unicodebook.data.shapes): rendering, text, judge, dataset."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unicodebook.data import shapes as S
from unicodebook.data.shapes import (
    BACKGROUND,
    COLOURS,
    DESCRIBE,
    HELD_OUT,
    INSTRUCT_TYPES,
    POSITIONS,
    QA_TYPES,
    SHAPES,
    SIZES,
    VOCAB_WORDS,
    Obj,
    Scene,
    caption,
    judge,
    judgeable,
    matches_prompt,
    object_extent,
    parse_objects,
    qa_pairs,
    render,
    render_array,
    sample_scene,
    score,
    t2i_prompt,
    write_dataset,
)


def _judged_scene(image) -> Scene:
    """The judge's reading of an image as a Scene (0 or more objects)."""
    return Scene(tuple(Obj.from_dict(d) for d in judge(image)))


def _box_blur3(a: np.ndarray) -> np.ndarray:
    p = np.pad(a.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = a.shape[:2]
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def _degrade(a: np.ndarray, rng: np.random.Generator, sigma: float = 8.0) -> np.ndarray:
    """3x3 box blur + Gaussian noise (sigma in grey levels), back to uint8."""
    return np.clip(np.round(_box_blur3(a) + rng.normal(0.0, sigma, a.shape)), 0, 255).astype(np.uint8)


def _rate(scenes: list[Scene], images: list[np.ndarray]) -> float:
    return float(np.mean([score(im, sc)["all_correct"] for sc, im in zip(scenes, images)]))


# ----------------------------------------------------------------------------- world


def test_palette_well_separated() -> None:
    cols = {k: np.array(v, float) for k, v in COLOURS.items()}
    assert len(cols) >= 6
    for a, b in itertools.combinations(cols, 2):
        assert np.linalg.norm(cols[a] - cols[b]) >= 75, (a, b)
    for c, v in cols.items():
        assert np.linalg.norm(v - np.array(BACKGROUND, float)) >= 200, c


def test_extents_and_layout_all_sizes() -> None:
    """At every size 32-64: sizes distinct, objects inside their cell, >= 2 px between neighbours."""
    for s in range(32, 65):
        ext = [object_extent(z, s) for z in SIZES]
        assert ext == sorted(set(ext)), (s, ext)
        assert ext[0] >= 5
        for cell in range(9):
            top, left, n = S._object_box(Obj("square", "red", "large", POSITIONS[cell]), s)
            assert 0 <= top and top + n <= s and 0 <= left and left + n <= s
            r, c = divmod(cell, 3)
            cy, cx = top + n / 2, left + n / 2
            assert int(cy // (s / 3)) == r and int(cx // (s / 3)) == c
        # gap between two large objects in neighbouring cells
        t0, l0, n = S._object_box(Obj("square", "red", "large", "top left"), s)
        _, l1, _ = S._object_box(Obj("square", "red", "large", "top"), s)
        assert l1 - (l0 + n) >= 2, s
    assert [object_extent(z, 32) for z in SIZES] == [5, 7, 9]


def test_render_pure_palette_and_deterministic() -> None:
    rng = random.Random(0)
    allowed = {tuple(v) for v in COLOURS.values()} | {tuple(BACKGROUND)}
    for size in (32, 45, 64):
        for _ in range(20):
            sc = sample_scene(rng)
            im = render(sc, size)
            assert im.mode == "RGB" and im.size == (size, size)
            a = np.asarray(im)
            assert {tuple(p) for p in a.reshape(-1, 3)} <= allowed
            assert np.array_equal(a, render_array(sc, size))
            # each object is drawn in its own colour, nothing else
            for o in sc.objects:
                top, left, n = S._object_box(o, size)
                assert (a[top : top + n, left : left + n] == COLOURS[o.colour]).all(-1).any()


def test_shapes_have_expected_fill_ratio() -> None:
    for n in (5, 7, 9, 13, 17):
        assert S._shape_mask("square", n).mean() == 1.0
        assert 0.7 < S._shape_mask("circle", n).mean() < 0.9
        tri = S._shape_mask("triangle", n)
        assert 0.45 < tri.mean() < 0.55
        assert tri[0].sum() == 1 and tri[-1].sum() == n  # apex on top, base at the bottom


@pytest.mark.parametrize("make_rng", [lambda: random.Random(3), lambda: np.random.default_rng(3)])
def test_sample_scene_constraints(make_rng) -> None:
    rng = make_rng()
    counts = set()
    for _ in range(500):
        sc = sample_scene(rng)
        assert 1 <= len(sc) <= 3
        cells = [o.cell for o in sc.objects]
        assert len(set(cells)) == len(cells) and cells == sorted(cells)
        counts.add(len(sc))
    assert counts == {1, 2, 3}
    for _ in range(200):
        assert not sample_scene(rng, held_out="exclude").held_out
        assert sample_scene(rng, 2, held_out="require").held_out
        assert len(sample_scene(rng, 2)) == 2
    with pytest.raises(ValueError):
        Scene((Obj("circle", "red", "small", "top"), Obj("square", "blue", "large", "top")))


def test_held_out_set() -> None:
    assert len(HELD_OUT) == 3
    assert {s for _, s in HELD_OUT} == set(SHAPES)
    assert len({c for c, _ in HELD_OUT}) == 3


def test_scene_roundtrip() -> None:
    rng = random.Random(1)
    for _ in range(50):
        sc = sample_scene(rng)
        assert Scene.from_dict(json.loads(json.dumps(sc.to_dict()))) == sc
        for o in sc.objects:
            assert Obj.from_dict(o.to_dict()) == o


# ----------------------------------------------------------------------------- text


def _words(text: str) -> list[str]:
    return text.replace("?", " ").replace(",", " ").split()


def test_text_closed_vocabulary_and_parse() -> None:
    rng = random.Random(2)
    vocab = set(VOCAB_WORDS)
    for _ in range(300):
        sc = sample_scene(rng)
        cap = caption(sc)
        assert set(_words(cap)) <= vocab
        assert set(_words(t2i_prompt(sc))) <= vocab
        assert t2i_prompt(sc).startswith("draw ")
        assert parse_objects(cap) == [o.to_dict() for o in sc.objects]
        assert parse_objects(t2i_prompt(sc)) == [o.to_dict() for o in sc.objects]
        assert judgeable(t2i_prompt(sc))
        for qa in qa_pairs(sc, rng):
            assert set(_words(qa["question"])) <= vocab
            assert set(_words(qa["answer"])) <= vocab
            assert qa["question"].endswith("?")
            assert len(qa["answer"].split()) <= 2
    sc = Scene((Obj("circle", "red", "small", "top left"), Obj("square", "blue", "large", "center")))
    assert caption(sc) == "a small red circle at the top left and a large blue square in the center"
    assert t2i_prompt(sc) == "draw " + caption(sc)


def _answer(question: str, objs: list[dict[str, str]]) -> str | None:
    """Answer a shapes-world question from a list of (judged) objects, independently of qa_pairs."""
    q = question.rstrip("?")
    num = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

    def by_pos(pos: str) -> dict[str, str]:
        (o,) = [o for o in objs if o["position"] == pos]
        return o

    def unique(**attrs: str) -> dict[str, str]:
        found = [o for o in objs if all(o[k] == v for k, v in attrs.items())]
        assert len(found) == 1, (question, objs)
        return found[0]

    pos_re = "|".join(sorted(POSITIONS, key=len, reverse=True))
    if m := re.fullmatch(rf"what colour is the object (?:at|on|in) the ({pos_re})", q):
        return by_pos(m[1])["colour"]
    if m := re.fullmatch(rf"what shape is the object (?:at|on|in) the ({pos_re})", q):
        return by_pos(m[1])["shape"]
    if m := re.fullmatch(r"what shape is the (\w+) object", q):
        return unique(colour=m[1])["shape"]
    if q == "how many objects are there":
        return num[len(objs)]
    if m := re.fullmatch(r"how many (\w+) objects are there", q):
        return num[sum(o["colour"] == m[1] for o in objs)]
    if m := re.fullmatch(r"how many (\w+)s are there", q):
        return num[sum(o["shape"] == m[1] for o in objs)]
    if m := re.fullmatch(r"where is the (\w+) (\w+) (\w+)", q):
        return unique(size=m[1], colour=m[2], shape=m[3])["position"]
    if m := re.fullmatch(r"where is the (\w+) object", q):
        return unique(colour=m[1])["position"]
    if m := re.fullmatch(r"where is the (\w+) (\w+)", q):
        return unique(colour=m[1], shape=m[2])["position"]
    if m := re.fullmatch(r"where is the (\w+)", q):
        return unique(shape=m[1])["position"]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)", q):
        return "yes" if any(o["colour"] == m[1] and o["shape"] == m[2] for o in objs) else "no"
    return None


def test_qa_pairs_consistent_with_judge() -> None:
    rng = random.Random(4)
    types_seen: dict[str, set[str]] = {t: set() for t in QA_TYPES}
    for _ in range(300):
        sc = sample_scene(rng)
        judged = judge(render(sc))
        qas = qa_pairs(sc, rng)
        assert [q["type"] for q in qas].count("colour") == 1
        assert {q["type"] for q in qas} <= set(QA_TYPES)
        for qa in qas:
            assert _answer(qa["question"], judged) == qa["answer"], qa
            types_seen[qa["type"]].add(qa["answer"])
    assert types_seen["existence"] == {"yes", "no"}
    assert types_seen["colour"] == set(COLOURS)
    assert types_seen["shape"] == set(SHAPES)


def test_qa_pairs_deterministic() -> None:
    sc = sample_scene(random.Random(5))
    assert qa_pairs(sc, random.Random(9)) == qa_pairs(sc, random.Random(9))
    assert qa_pairs(sc, np.random.default_rng(9)) == qa_pairs(sc, np.random.default_rng(9))


# ----------------------------------------------------------------------------- judge


def test_judge_exact_32px() -> None:
    rng = random.Random(10)
    scenes = [sample_scene(rng) for _ in range(600)]
    rate = _rate(scenes, [render_array(sc, 32) for sc in scenes])
    print(f"judge 32px clean: {rate:.4f} of {len(scenes)} scenes fully right")
    assert rate >= 0.99


def test_judge_exact_64px() -> None:
    rng = random.Random(11)
    scenes = [sample_scene(rng) for _ in range(200)]
    rate = _rate(scenes, [render(sc, 64) for sc in scenes])  # PIL input
    print(f"judge 64px clean: {rate:.4f} of {len(scenes)} scenes fully right")
    assert rate >= 0.99


def test_judge_all_sizes() -> None:
    rng = random.Random(12)
    scenes, images = [], []
    for s in range(32, 65):
        for _ in range(8):
            scenes.append(sample_scene(rng))
            images.append(render_array(scenes[-1], s))
    rate = _rate(scenes, images)
    print(f"judge 32-64px clean: {rate:.4f} of {len(scenes)} scenes fully right")
    assert rate >= 0.99


@pytest.mark.parametrize("size,n,seed", [(32, 500, 13), (64, 150, 14)])
def test_judge_robust_blur_noise(size: int, n: int, seed: int) -> None:
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    rate = _rate(scenes, [_degrade(render_array(sc, size), nrng) for sc in scenes])
    print(f"judge {size}px box3 blur + noise sigma 8: {rate:.4f} of {len(scenes)} scenes fully right")
    assert rate >= 0.95


def test_judge_edge_cases() -> None:
    assert judge(np.full((32, 32, 3), 255, np.uint8)) == []
    assert judge(np.zeros((32, 32, 3), np.uint8)) == []  # black is far from every palette colour
    sc = Scene((Obj("triangle", "green", "large", "bottom right"),))
    # non-square input is resized to square first
    wide = render(sc, 48).resize((64, 48), Image.Resampling.NEAREST)
    assert judge(wide) == [o.to_dict() for o in sc.objects]
    assert _judged_scene(render(sc)) == sc


def test_judge_same_colour_neighbours_after_blur() -> None:
    """Large same-colour objects in neighbouring cells stay separate after blur."""
    objs = [Obj(s, "blue", "large", p) for s, p in zip(("square", "triangle", "square"), POSITIONS[3:6])]
    sc = Scene(tuple(objs))
    for size in (32, 36, 43, 64):
        blurred = np.round(_box_blur3(render_array(sc, size))).astype(np.uint8)
        assert judge(blurred) == [o.to_dict() for o in sc.objects], size


def test_a_caption_of_another_world_is_not_judged() -> None:
    # it parses to one object without attributes, which any drawn object would match
    assert parse_objects("a teal bar running across") == [{}]
    assert not judgeable("a teal bar running across") and not judgeable("draw something")
    assert judgeable("draw a red circle") and not judgeable("draw a red circle and a blue one")


def test_score_and_matches_prompt() -> None:
    sc = Scene((Obj("circle", "red", "small", "top left"), Obj("square", "blue", "large", "center")))
    im = render(sc)
    r = score(im, sc)
    assert r["all_correct"] and r["count"] and r["shape"] and r["colour"] and r["size"] and r["position"]
    other = Scene((Obj("circle", "red", "medium", "top left"), Obj("square", "blue", "large", "center")))
    r = score(im, other)
    assert not r["all_correct"] and not r["size"] and r["shape"] and r["colour"] and r["count"]
    assert matches_prompt(im, sc)
    assert matches_prompt(im, t2i_prompt(sc))
    assert matches_prompt(im, [{"colour": "blue", "shape": "square"}])
    assert matches_prompt(im, [sc.objects[0]])
    assert not matches_prompt(im, [{"colour": "blue", "shape": "circle"}])
    assert not matches_prompt(im, t2i_prompt(other))
    # two named objects need two distinct matches
    assert not matches_prompt(im, [{"shape": "circle"}, {"shape": "circle"}])
    assert matches_prompt(im, [{"shape": "circle"}, {"shape": "square"}])


# ----------------------------------------------------------------------------- dataset


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    out = tmp_path_factory.mktemp("shapes")
    t0 = time.perf_counter()
    meta = write_dataset(out, progress=False)  # default sizes: 2000 / 200 / 500 at 36 px
    return out, meta, time.perf_counter() - t0


def test_write_dataset_layout(dataset: tuple[Path, dict, float]) -> None:
    out, meta, seconds = dataset
    print(f"write_dataset default (2700 images, 36px): {seconds:.2f}s")
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert meta["counts"] == {"train": 2000, "val": 200, "test": 500}
    assert meta["size"] == 36 and meta["seed"] == 0 and meta["version"] == 2
    assert meta["background"] == [255, 255, 255]
    assert meta["held_out"] == [list(p) for p in HELD_OUT]
    assert set(meta["colours"]) == set(COLOURS) and meta["positions"] == list(POSITIONS)
    for split, n in meta["counts"].items():
        d = out / split
        assert len(list((d / "images").glob("*.png"))) == n
        scenes = [json.loads(line) for line in (d / "scenes.jsonl").read_text().splitlines()]
        caps = [json.loads(line) for line in (d / "captions.jsonl").read_text().splitlines()]
        assert len(scenes) == len(caps) == n
        for s_row, c_row in zip(scenes, caps):
            assert s_row["image"] == c_row["image"] and (d / s_row["image"]).is_file()
            assert c_row["caption"] == caption(Scene.from_dict(s_row["scene"]))
        with Image.open(d / scenes[0]["image"]) as im:
            assert im.size == (36, 36) and im.mode == "RGB"


def test_write_dataset_held_out(dataset: tuple[Path, dict, float]) -> None:
    out, _, _ = dataset
    for split in ("train", "val", "test"):
        d = out / split
        scenes = {
            r["image"]: Scene.from_dict(r["scene"])
            for r in map(json.loads, (d / "scenes.jsonl").read_text().splitlines())
        }
        t2i = [json.loads(line) for line in (d / "t2i.jsonl").read_text().splitlines()]
        assert len(t2i) > (0.45 if split == "train" else 0.5) * len(scenes)  # train: 2/3 × ~3/4 without a held-out pair
        for r in t2i:
            sc = scenes[r["image"]]
            assert 1 <= len(sc) <= 2
            assert r["caption"] == t2i_prompt(sc)
            assert r["held_out"] == sc.held_out
            named = {(o["colour"], o["shape"]) for o in parse_objects(r["caption"])}
            assert r["held_out"] == bool(named & set(HELD_OUT))
        n_held = sum(r["held_out"] for r in t2i)
        if split == "train":
            # no held-out pair in any train t2i target; only scenes that are not t2i targets hold them
            assert n_held == 0
            text = (d / "t2i.jsonl").read_text()
            for c, s in HELD_OUT:
                assert f"{c} {s}" not in text
            t2i_images = {r["image"] for r in t2i}
            with_held = [im for im, sc in scenes.items() if sc.held_out]
            assert with_held and not set(with_held) & t2i_images
            # the understanding tasks see held-out pairs alone and in company, not only among three
            assert {len(scenes[im]) for im in with_held} == {1, 2, 3}
            # every 1-2 object scene without one is a t2i target
            assert t2i_images == {im for im, sc in scenes.items() if len(sc) <= 2 and not sc.held_out}
        else:
            assert 0.4 * len(t2i) <= n_held <= 0.6 * len(t2i), (split, n_held, len(t2i))
            assert n_held < len(t2i)
            # every held-out pair is represented in test
            if split == "test":
                named = {(o.colour, o.shape) for r in t2i for o in scenes[r["image"]].objects}
                assert set(HELD_OUT) <= named


def test_write_dataset_instruct_llava(dataset: tuple[Path, dict, float]) -> None:
    out, _, _ = dataset
    for split in ("train", "test"):
        d = out / split
        data = json.loads((d / "instruct.json").read_text())
        scenes = [json.loads(line) for line in (d / "scenes.jsonl").read_text().splitlines()]
        assert len(data) == len(scenes)
        ids = set()
        for rec, s_row in zip(data, scenes):
            assert set(rec) == {"id", "image", "conversations"}
            assert rec["image"] == s_row["image"]
            ids.add(rec["id"])
            conv = rec["conversations"]
            assert len(conv) >= 2 and len(conv) % 2 == 0
            assert conv[0]["value"].startswith("<image>\n")
            for i, turn in enumerate(conv):
                assert turn["from"] == ("human" if i % 2 == 0 else "gpt")
                assert isinstance(turn["value"], str) and turn["value"]
                if turn["from"] == "human":
                    assert turn["type"] in INSTRUCT_TYPES
                    if i > 0:
                        assert "<image>" not in turn["value"]
        assert len(ids) == len(data)
        # answers agree with the judge on the written images
        for rec in data[:150]:
            judged = judge(Image.open(d / rec["image"]))
            conv = rec["conversations"]
            types = [q["type"] for q in conv[::2]]
            assert types.count("caption") == 1 and set(types) - {"caption"} <= set(QA_TYPES)
            for q, a in zip(conv[::2], conv[1::2]):
                question = q["value"].removeprefix("<image>\n")
                if q["type"] == "caption":  # the description names every object the judge finds
                    assert question == DESCRIBE and parse_objects(a["value"]) == judged, rec["id"]
                else:
                    assert _answer(question, judged) == a["value"], (rec["id"], question)


def test_write_dataset_t2i_images_match_prompts(dataset: tuple[Path, dict, float]) -> None:
    out, _, _ = dataset
    t2i = [json.loads(line) for line in (out / "test" / "t2i.jsonl").read_text().splitlines()]
    for r in t2i[:100]:
        assert matches_prompt(Image.open(out / "test" / r["image"]), r["caption"])


def test_write_dataset_deterministic(tmp_path: Path) -> None:
    kw = dict(n_train=40, n_val=10, n_test=30, size=32, progress=False)
    write_dataset(tmp_path / "a", seed=7, **kw)
    write_dataset(tmp_path / "b", seed=7, **kw)
    write_dataset(tmp_path / "c", seed=8, **kw)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db
    assert set(da) == set(dc)
    for name in ("train/scenes.jsonl", "test/t2i.jsonl", "val/instruct.json", "train/images/000000.png"):
        assert da[name] != dc[name], name
    # splits draw from independent streams: train and test differ under the same seed
    a = tmp_path / "a"
    assert (a / "train/scenes.jsonl").read_text().splitlines()[:10] != (
        a / "test/scenes.jsonl"
    ).read_text().splitlines()[:10]


def test_write_dataset_other_size(tmp_path: Path) -> None:
    meta = write_dataset(tmp_path, n_train=10, n_val=5, n_test=10, size=48, progress=False)
    assert meta["size"] == 48
    rows = [json.loads(line) for line in (tmp_path / "val" / "scenes.jsonl").read_text().splitlines()]
    for r in rows:
        im = Image.open(tmp_path / "val" / r["image"])
        assert im.size == (48, 48)
        assert _judged_scene(im) == Scene.from_dict(r["scene"])
