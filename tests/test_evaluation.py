"""scenetok.evaluation: prompt sets, each metric on tiny random models, segment choice, LPIPS, KID, the
`scenetok eval` command end to end, and the same run spread over two processes with torchrun."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from scenetok.errors import ConfigError, PromptError
from scenetok.evaluation import metrics, prompts
from scenetok.evaluation.segment import Segment, choose_segment, normalize_label

TOKENS3 = ["<asset0>", "<asset1>", "<asset2>"]


# ----------------------------------------------------------------------------------------------------
# prompt sets


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_prompt_set_is_templates_times_subsets(k):
    tokens = [f"<asset{i}>" for i in range(k)]
    ps = prompts.build_prompt_set(tokens, {t: "cat" for t in tokens}, n=3, seed=10)
    assert len(ps) == len(prompts.BAS_TEMPLATES) * (2 ** k - 1) == 10 * (2 ** k - 1)
    assert len({(p.prompt) for p in ps}) == len(ps)  # no duplicates
    subsets = list(dict.fromkeys(p.handles for p in ps))
    assert len(subsets) == 2 ** k - 1 and all(len([p for p in ps if p.handles == s]) == 10 for s in subsets)
    assert [p.index for p in ps] == list(range(len(ps)))
    seeds = [s for p in ps for s in p.seeds]
    assert seeds == list(range(10, 10 + 3 * len(ps)))  # sample i of prompt k: seed + k*n + i


def test_prompt_set_order_and_text():
    ps = prompts.build_prompt_set(TOKENS3, {"<asset0>": "cat", "<asset1>": "owl", "<asset2>": "teddy bear"}, n=1)
    assert [p.handles for p in ps[::10]] == [("<asset0>",), ("<asset1>",), ("<asset2>",), ("<asset0>", "<asset1>"),
                                             ("<asset0>", "<asset2>"), ("<asset1>", "<asset2>"), tuple(TOKENS3)]
    assert ps[0].prompt == "a photo of <asset0> at the beach"
    assert ps[-1].prompt == "a photo of <asset0> and <asset1> and <asset2> floating on top of water"
    assert ps[-1].class_prompt == "a photo of a cat and an owl and a teddy bear floating on top of water"
    assert ps[-1].removed_prompt == "a photo of and and floating on top of water"
    assert ps[-1].subset == "<asset0>+<asset1>+<asset2>"


def test_prompt_variants():
    cw = {"<asset0>": "cat", "<asset1>": "apple"}
    assert prompts.class_word_prompt("a photo of <asset0> at the beach", cw) == "a photo of a cat at the beach"
    assert prompts.class_word_prompt("<asset1> on the table", cw) == "an apple on the table"
    assert prompts.class_word_prompt("the <asset0>, sleeping", cw) == "the cat, sleeping"
    # modifier + class style: the handle goes, the class noun stays
    assert prompts.class_word_prompt("photo of a <asset0> cat and a <asset1> apple", cw) == "photo of a cat and a apple"
    assert prompts.class_word_prompt("a <asset9> thing", cw) == "a thing"
    assert prompts.identifier_removed_prompt("photo of a <asset0> cat, in snow") == "photo of a cat, in snow"
    assert prompts.identifier_removed_prompt("a <asset0> and <x>", ["<asset0>"]) == "a and <x>"


def test_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n\na photo of {tokens} in the snow\n<asset1> on a table\na photo of a dog\n")
    ps = prompts.build_prompt_set(TOKENS3[:2], {"<asset0>": "cat", "<asset1>": "dog"}, prompts_file=f, n=2)
    assert [p.prompt for p in ps] == ["a photo of <asset0> in the snow", "a photo of <asset1> in the snow",
                                      "a photo of <asset0> and <asset1> in the snow", "<asset1> on a table",
                                      "a photo of a dog"]
    assert [p.handles for p in ps][3:] == [("<asset1>",), ()]
    assert [p.source for p in ps] == ["file:3"] * 3 + ["file:4", "file:5"]
    assert ps[3].template is None and ps[0].template == "a photo of {tokens} in the snow"
    f.write_text("fine <asset0>\n<asset5> here\n")
    with pytest.raises(PromptError, match="line 2: <asset5>"):
        prompts.build_prompt_set(TOKENS3[:2], {}, prompts_file=f)
    f.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no prompt"):
        prompts.build_prompt_set(TOKENS3[:2], {}, prompts_file=f)
    with pytest.raises(ConfigError, match="unknown template set"):
        prompts.build_prompt_set(TOKENS3[:2], {}, templates="nope")


# ----------------------------------------------------------------------------------------------------
# KID


def test_kid_matches_hand_computed_mmd():
    # d = 1, k(a, b) = (a·b + 1)^3: k(0,1) = 1, k(2,3) = 343, cross: 1, 1, 27, 64 → 1 + 343 − 2·93/4 = 297.5
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(297.5)
    assert metrics.kid(x, y, subsets=5) == pytest.approx((297.5, 0.0))  # subset = whole set every time


def test_kid_same_set_near_zero_different_sets_larger():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 16))
    y = rng.normal(size=(120, 16))  # same distribution
    z = rng.normal(size=(120, 16)) + 1.0  # shifted
    same, _ = metrics.kid(x, x, subsets=20, subset_size=50)
    alike, _ = metrics.kid(x, y, subsets=20, subset_size=50)
    far, std = metrics.kid(x, z, subsets=20, subset_size=50)
    # ≈ 0 on the scale of a real difference (the unbiased estimate is slightly negative for a set against
    # itself: samples drawn into both subsets pair with themselves only in the cross term)
    assert far > 5.0 and std > 0
    assert abs(same) < 0.03 * far and abs(alike) < 0.03 * far
    assert metrics.kid(x, z, subsets=3, subset_size=50, seed=1) == metrics.kid(x, z, subsets=3, subset_size=50, seed=1)
    with pytest.raises(ValueError):
        metrics.kid(x[:1], z)


def test_masked_image_and_input_views():
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    m = np.zeros((4, 4), bool)
    m[1:3, 2] = True
    out = metrics.masked_image(img, m)
    assert (out[m] == img[m]).all() and (out[~m] == 128).all()
    big = metrics.masked_image(img, np.kron(m, np.ones((2, 2), bool)).astype(np.float32))  # resized mask
    assert (big == out).all()
    views = metrics.input_views(np.zeros((20, 30, 3), np.uint8) + 7, count=5, size=16, seed=3)
    assert len(views) == 5 and all(v.shape == (16, 16, 3) for v in views)


# ----------------------------------------------------------------------------------------------------
# tiny models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from scenetok import testing

    root = tmp_path_factory.mktemp("eval-models")
    return {
        "clip": testing.build_tiny_clip(root / "clip"),
        "dino": testing.build_tiny_dino(root / "dino"),
        "maskformer": testing.build_tiny_maskformer(root / "maskformer"),
        "lpips": testing.build_tiny_lpips(root / "lpips_alex.safetensors"),
    }


def _images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_clip_scores(tiny_models):
    clip = metrics.ClipScorer(str(tiny_models["clip"]), device="cpu")
    imgs = _images(3)
    e = clip.image_embeds(imgs)
    assert e.shape == (3, 16) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    again = clip.image_embeds([imgs[1]])  # alone instead of in a batch
    assert float(again[0] @ e[1]) == pytest.approx(1.0, abs=1e-5)  # identical images → CLIP-I 1.0
    assert float(metrics.cosine(e[0:1], e[1:2])) < 1.0 - 1e-6  # different images → below 1
    t = clip.text_embeds(["a photo of a cat at the beach", "a photo of at the beach", ""])
    clip_t = e @ t.T
    assert torch.isfinite(clip_t).all() and clip_t.abs().max() <= 1.0 + 1e-6
    assert not torch.allclose(t[0], t[1])


def test_dino_identity_of_identical_masked_images_is_one(tiny_models):
    dino = metrics.DinoScorer(str(tiny_models["dino"]), device="cpu")
    img = _images(1)[0]
    m = np.zeros((32, 32), bool)
    m[8:24, 4:20] = True
    a, b = dino.embeds([metrics.masked_image(img, m), metrics.masked_image(img.copy(), m.copy())])
    assert float(a @ b) == pytest.approx(1.0, abs=1e-5)
    other = dino.embeds([metrics.masked_image(img, ~m)])[0]
    assert -1.0 <= float(a @ other) < 1.0 - 1e-6
    raw = dino.raw([img])
    assert raw.shape == (1, 32) and not torch.allclose(raw.norm(dim=-1), torch.ones(1))  # KID features: unnormalized


def test_scorers_give_the_same_embeddings_in_any_batch_size(tiny_models):
    """Five images in batches of 2 (2 + 2 + 1) embed exactly as in one batch of 32, in the same order."""
    imgs = _images(5)
    for cls, key, fn in ((metrics.ClipScorer, "clip", "image_embeds"), (metrics.DinoScorer, "dino", "raw")):
        one = getattr(cls(str(tiny_models[key]), device="cpu"), fn)(imgs)
        small = getattr(cls(str(tiny_models[key]), device="cpu", batch_size=2), fn)(imgs)
        assert one.shape[0] == 5 and torch.allclose(one, small, atol=1e-5), key
        assert not torch.allclose(one[0], one[1])  # different images, so the order is checked too


def test_choose_segment_rules():
    def seg(label, x0):
        m = np.zeros((8, 8), bool)
        m[:, x0 : x0 + 2] = True
        return Segment(label, m)

    segs = [seg("dog", 0), seg("cat", 2), seg("dog", 4), Segment("cat", np.zeros((8, 8), bool)), seg("wall-other-merged", 6)]
    sim = {0: 0.2, 1: 0.9, 2: 0.5, 4: 0.3}
    calls = []

    def similarity(ids):
        calls.append(list(ids))
        return [sim[k] for k in ids]

    assert choose_segment(segs, "dog", similarity) == (2, "class", "dog", 0.5)  # best of the two dogs
    assert calls[-1] == [0, 2]
    assert choose_segment(segs, "Cat", similarity) == (1, "class", "cat", 0.9)  # the empty cat mask is skipped
    assert choose_segment(segs, "wall", similarity)[:2] == (4, "class")  # COCO suffixes ignored
    assert choose_segment(segs, "creature", similarity) == (1, "best", "cat", 0.9)  # no class: most similar
    assert calls[-1] == [0, 1, 2, 4]
    assert choose_segment([], "dog", similarity) == (None, "whole", None, None)
    assert normalize_label(" Teddy_Bear ") == "teddy bear"


def test_maskformer_segmenter(tiny_models, monkeypatch):
    from scenetok.evaluation.segment import MaskFormerSegmenter, make_segmenter

    sg = make_segmenter("maskformer", maskformer_model=str(tiny_models["maskformer"]), device="cpu")
    assert isinstance(sg, MaskFormerSegmenter)
    imgs = _images(3, size=40)
    out = sg.candidates(imgs)  # the real model and post-processing (random weights: maybe no segment)
    assert len(out) == 3 and all(isinstance(s, Segment) and s.mask.shape == (40, 40) for c in out for s in c)
    # a known panoptic result: the labels come from the model's id2label and the masks from the segment ids
    seg_map = torch.zeros(40, 40, dtype=torch.int32)
    seg_map[:, 20:] = 2
    seg_map[:10] = 3
    fake = [{"segmentation": seg_map, "segments_info": [{"id": 2, "label_id": 2, "score": 0.9},
                                                        {"id": 3, "label_id": 4, "score": 0.8}]}] * 3
    monkeypatch.setattr(sg.processor, "post_process_panoptic_segmentation", lambda *a, **k: fake[: len(imgs)])
    cands = sg.candidates(imgs)[0]
    assert [c.label for c in cands] == ["dog", "wall-other-merged"]
    assert cands[0].mask.sum() == 30 * 20 and cands[1].mask.sum() == 10 * 40
    k, source, label, _ = choose_segment(cands, "dog", lambda ids: [0.0] * len(ids))
    assert (k, source, label) == (0, "class", "dog")
    with pytest.raises(ConfigError, match="unknown segmenter"):
        make_segmenter("sam2")


def test_text_sam_segmenter_with_a_fake_from_text(monkeypatch):
    from scenetok.errors import ScenetokError
    from scenetok.evaluation.segment import TextSamSegmenter

    calls = []

    def from_text(image, queries, **kwargs):
        calls.append((list(queries), kwargs))
        if "ghost" in queries:
            raise ScenetokError("no box for 'ghost'")
        out = []
        for i, q in enumerate(queries):
            m = np.zeros(image.shape[:2], bool)
            m[:, i] = True
            out.append(types.SimpleNamespace(name=q, mask=m, score=0.5))
        return out

    monkeypatch.setitem(sys.modules, "scenetok.masks", types.SimpleNamespace(from_text=from_text))
    sg = TextSamSegmenter(detector="det-folder", sam="sam-folder", device="cpu")
    img = _images(1, size=8)[0]
    cands = sg.candidates([img, img], [["cat", "dog", "cat"], ["ghost", "dog"]])
    assert [c.label for c in cands[0]] == ["cat", "dog"] and cands[0][1].mask[:, 1].all()
    assert calls[0] == (["cat", "dog"], {"detector": "det-folder", "segmenter": "sam-folder", "device": "cpu"})
    # the joint call failed (ghost not found): each query alone, the missing one left out
    assert [c.label for c in cands[1]] == ["dog"] and [q for q, _ in calls[1:]] == [["ghost", "dog"], ["ghost"], ["dog"]]

    def broken(image, queries, **kwargs):
        from scenetok.errors import ModelLoadError

        raise ModelLoadError("cannot load the GroundingDINO model 'x'")

    monkeypatch.setitem(sys.modules, "scenetok.masks", types.SimpleNamespace(from_text=broken))
    with pytest.raises(ScenetokError, match="cannot load"):
        TextSamSegmenter().candidates([img], [["cat"]])
    monkeypatch.setitem(sys.modules, "scenetok.masks", types.SimpleNamespace())
    with pytest.raises(ConfigError, match="text-sam"):
        TextSamSegmenter()


def test_text_sam_segmenter_with_the_real_from_text(tmp_path):
    pytest.importorskip("scenetok.masks")
    from scenetok.testing import build_tiny_grounding_dino, build_tiny_sam
    from scenetok.evaluation.segment import make_segmenter

    gd = build_tiny_grounding_dino(tmp_path / "gd", box_logit=1.5)
    sam = build_tiny_sam(tmp_path / "sam", full_masks=True)
    sg = make_segmenter("text-sam", detector=str(gd), sam=str(sam), device="cpu")
    img = np.full((48, 48, 3), 120, np.uint8)
    cands = sg.candidates([img], [["cat", "dog"]])[0]
    assert [c.label for c in cands] == ["cat", "dog"]
    assert all(c.mask.shape == (48, 48) and c.mask.dtype == bool and c.mask.any() for c in cands)
    assert choose_segment(cands, "dog", lambda ids: [0.0] * len(ids))[:3] == (1, "class", "dog")


def test_lpips(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    from scenetok import testing
    from scenetok.evaluation.lpips import LPIPS

    lp = LPIPS.from_file(tiny_models["lpips"])
    assert lp.net == "alex"
    imgs = _images(3)
    assert torch.equal(lp.distance(imgs, imgs), torch.zeros(3))  # identical images: exactly 0
    ab, ba = lp.distance(imgs[:2], imgs[1:3]), lp.distance(imgs[1:3], imgs[:2])
    assert torch.allclose(ab, ba) and (ab > 0).all() and torch.isfinite(ab).all()
    assert lp.diversity([imgs[0]] * 3) == 0.0 and lp.diversity(imgs) > 0 and lp.diversity(imgs[:1]) is None
    # the plain key layout (features.i.*, linK.weight) gives the same network
    plain = {}
    for k, v in load_file(str(tiny_models["lpips"])).items():
        parts = k.split(".")
        plain[f"features.{parts[2]}.{parts[3]}" if k.startswith("net.") else f"{parts[0]}.weight"] = v
    save_file(plain, str(tmp_path / "plain.safetensors"))
    assert torch.allclose(LPIPS.from_file(tmp_path / "plain.safetensors").distance(imgs[:2], imgs[1:3]), ab)
    vgg = LPIPS.from_file(testing.build_tiny_lpips(tmp_path / "vgg.safetensors", net="vgg"))
    assert vgg.net == "vgg" and float(vgg.distance(imgs[:1], imgs[:1])[0]) == 0.0
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="does not hold LPIPS weights"):
        LPIPS.from_file(tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="does not exist"):
        LPIPS.from_file(tmp_path / "none.safetensors")


# ----------------------------------------------------------------------------------------------------
# the COCO scene set


def _rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


CATS = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "giraffe"},
        {"id": 4, "name": "person"}, {"id": 5, "name": "wall", "isthing": 0}, {"id": 6, "name": "teddy bear"}]


def _coco(tmp_path, images, cats=CATS):
    """Write images (random pixels) and a COCO file. ``images``: (width, height, [(cat, segmentation, extra)])."""
    from PIL import Image

    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    ims, anns = [], []
    rng = np.random.default_rng(0)
    for i, (w, h, segs) in enumerate(images, start=1):
        name = f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / name)
        ims.append({"id": i, "file_name": name, "width": w, "height": h})
        for cat, seg, extra in segs:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "segmentation": seg,
                         "iscrowd": 0, **extra})
    f = tmp_path / "instances.json"
    f.write_text(json.dumps({"images": ims, "annotations": anns, "categories": cats}))
    return f, img_dir


def _build(tmp_path, images, **kw):
    from scenetok.evaluation.coco import build_coco_scenes

    f, d = _coco(tmp_path, images)
    report = build_coco_scenes(f, d, tmp_path / "scenes", **kw)
    return {s["image_id"]: [c["name"] for c in s["concepts"]] for s in report["scenes"]}, report


def test_rle_and_polygon_decoding():
    from scenetok.evaluation.coco import (decode_rle, polygons_to_mask, rle_counts_to_string,
                                          rle_string_to_counts)

    # hand-encoded strings: one 5-bit group per small run; "O" = -1 relative to the run two before; "T3" = 100
    assert rle_string_to_counts("325") == [3, 2, 5]
    assert rle_string_to_counts("3252") == [3, 2, 5, 4]
    assert rle_string_to_counts("325O") == [3, 2, 5, 1]
    assert rle_string_to_counts("T3") == [100]
    rng = np.random.default_rng(1)
    counts = [int(c) for c in rng.integers(0, 3000, 40)]
    assert rle_string_to_counts(rle_counts_to_string(counts)) == counts
    # runs alternate off/on over column-major pixels
    m = decode_rle({"size": [2, 3], "counts": [1, 2, 3]})
    assert m.tolist() == [[False, True, False], [True, False, False]]
    assert (decode_rle({"size": [2, 3], "counts": rle_counts_to_string([1, 2, 3])}) == m).all()
    with pytest.raises(ValueError, match="sum"):
        decode_rle({"size": [2, 3], "counts": [1, 2]})
    # polygons: pixel centres inside; a rectangle gives exactly its area; parts are united
    sq = polygons_to_mask(_rect(2, 2, 6, 6), 10, 10)
    assert sq.sum() == 16 and sq[2:6, 2:6].all()
    tri = polygons_to_mask([[0, 0, 40, 0, 0, 40]], 40, 40)
    assert abs(int(tri.sum()) - 800) <= 40 and tri[0, 0] and not tri[39, 39]
    two = polygons_to_mask(_rect(0, 0, 2, 2) + _rect(5, 5, 7, 8), 10, 10)
    assert two.sum() == 4 + 6


def test_coco_rule_square_center_crop(tmp_path):
    # 100×60 → the centred 60×60 square, columns 20..80; the cat lies left of it in the second image
    inside = [(1, _rect(30, 0, 50, 60), {}), (2, _rect(55, 0, 75, 60), {})]
    outside = [(1, _rect(30, 0, 50, 60), {}), (2, _rect(0, 0, 20, 60), {})]
    got, _ = _build(tmp_path, [(100, 60, inside), (100, 60, outside)])
    assert got == {1: ["dog", "cat"]}
    from PIL import Image

    from scenetok.scene import load_scene

    sc = load_scene(tmp_path / "scenes" / "000000000001")
    with Image.open(tmp_path / "images" / "000001.png") as im:
        src = np.asarray(im.convert("RGB"))
    assert sc.size == 60 and (sc.image == src[:, 20:80]).all()
    assert sc.concepts[0].mask[:, 10:30].all() and sc.concepts[0].mask.sum() == 60 * 20  # dog: columns 30..50 - 20


def test_coco_rule_min_fraction(tmp_path):
    # 50×50 = 2500 px: the cat covers 14 % (350 px) in image 1 and 16 % (400 px) in image 2
    small = [(1, _rect(0, 0, 25, 30), {}), (2, _rect(30, 0, 44, 25), {})]
    large = [(1, _rect(0, 0, 25, 30), {}), (2, _rect(30, 0, 46, 25), {})]
    got, report = _build(tmp_path, [(50, 50, small), (50, 50, large)])
    assert got == {2: ["dog", "cat"]}
    scene = report["scenes"][0]
    assert [c["fraction"] for c in scene["concepts"]] == [0.3, 0.16]


def test_coco_rule_two_distinct_categories(tmp_path):
    two_dogs = [(1, _rect(0, 0, 20, 50), {}), (1, _rect(25, 0, 50, 50), {})]
    dogs_and_cat = [(1, _rect(0, 0, 15, 50), {}), (1, _rect(15, 0, 35, 50), {}), (2, _rect(35, 0, 50, 50), {})]
    got, report = _build(tmp_path, [(50, 50, two_dogs), (50, 50, dogs_and_cat)])
    assert got == {2: ["dog", "cat"]}  # one concept per category: the larger dog (40 %) and the cat
    assert report["scenes"][0]["concepts"][0]["fraction"] == 0.4


def test_coco_rule_excluded_classes(tmp_path):
    from scenetok.evaluation.coco import EXCLUDED_CLASSES

    assert set(EXCLUDED_CLASSES) == {"orange", "banana", "broccoli", "carrot", "zebra", "giraffe"}
    giraffe_dog = [(3, _rect(0, 0, 25, 50), {}), (1, _rect(25, 0, 50, 50), {})]
    giraffe_dog_cat = [(3, _rect(0, 0, 20, 50), {}), (1, _rect(20, 0, 35, 50), {}), (2, _rect(35, 0, 50, 50), {})]
    got, _ = _build(tmp_path, [(50, 50, giraffe_dog), (50, 50, giraffe_dog_cat)])
    assert got == {2: ["dog", "cat"]}  # the giraffe never becomes a concept


def test_coco_rule_things_only_no_crowds(tmp_path):
    from scenetok.evaluation.coco import rle_counts_to_string

    person = np.zeros((50, 50), bool)
    person[:, 25:] = True  # 50 %, more than the dog: listed first
    flat = person.T.reshape(-1)  # column-major
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    rle = {"size": [50, 50], "counts": rle_counts_to_string(runs if not flat[0] else [0] + runs)}
    dog = (1, _rect(0, 0, 20, 50), {})
    stuff = [dog, (5, _rect(20, 0, 50, 50), {})]  # a wall: not a thing
    crowd = [dog, (4, {"size": [50, 50], "counts": [1500, 1000]}, {"iscrowd": 1})]  # a crowd of people
    single = [dog, (4, rle, {})]  # one person, compressed RLE
    got, _ = _build(tmp_path, [(50, 50, stuff), (50, 50, crowd), (50, 50, single)])
    assert got == {3: ["person", "dog"]}
    from scenetok.scene import load_scene

    sc = load_scene(tmp_path / "scenes" / "000000000003")
    assert (sc.concepts[0].mask == person).all()


def test_coco_scene_folders_report_and_cli(tmp_path, capsys):
    from scenetok.cli import main
    from scenetok.scene import load_scene

    ok = [(6, _rect(0, 0, 24, 40), {}), (2, _rect(24, 0, 40, 40), {})]  # the larger concept first
    f, d = _coco(tmp_path, [(40, 40, ok), (40, 40, ok), (40, 40, ok)])
    (d / "000002.png").unlink()  # a missing image is skipped and counted
    assert main(["benchmark", "coco", "--annotations", str(f), "--images", str(d), "-o", str(tmp_path / "b"),
                 "--max-scenes", "1", "--quiet"]) == 0
    assert "1 scenes written" in capsys.readouterr().out
    report = json.loads((tmp_path / "b" / "scenes" / "coco_scenes.json").read_text())
    assert [s["image_id"] for s in report["scenes"]] == [1] and report["images_seen"] == 1
    sc = load_scene(tmp_path / "b" / "scenes" / "000000000001")
    assert [(c.name, c.class_word, c.init_word) for c in sc.concepts] == [("teddy bear",) * 3, ("cat",) * 3]
    from scenetok.evaluation.coco import build_coco_scenes

    rep = build_coco_scenes(f, d, tmp_path / "all", max_scenes=None)
    assert [s["image_id"] for s in rep["scenes"]] == [1, 3] and rep["rejected"]["no image file"] == 1
    with pytest.raises(ConfigError, match="does not exist"):
        build_coco_scenes(tmp_path / "nope.json", d, tmp_path / "x")


# ----------------------------------------------------------------------------------------------------
# scenetok eval, end to end, and the same work over two processes


@pytest.fixture(scope="module")
def trained_bundle(tiny_sd, tmp_path_factory):
    from conftest import two_squares

    from scenetok.scene import Scene
    from scenetok.training import train

    img, masks = two_squares()
    scene = Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "cat"])
    out = tmp_path_factory.mktemp("eval-bundle") / "bundle"
    return train(scene, out, model=str(tiny_sd), overrides=["phase1.steps=2", "phase2.steps=1", "preview_every=100"],
                 progress=False).path


def _model_args(m):
    return ["--clip-model", str(m["clip"]), "--dino-model", str(m["dino"]), "--maskformer-model", str(m["maskformer"])]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_command_end_to_end(trained_bundle, tiny_models, tmp_path, capsys):
    from scenetok.cli import main

    pf = tmp_path / "prompts.txt"
    pf.write_text("a photo of {tokens} in the snow\n")
    out = tmp_path / "eval"
    assert main(["eval", str(trained_bundle), "-o", str(out), "--prompts", str(pf), "-n", "2", "--steps", "2",
                 "--seed", "5", "--lpips-weights", str(tiny_models["lpips"]), "--kid-views", "8", "--quiet",
                 *_model_args(tiny_models)]) == 0
    assert "6 images" in capsys.readouterr().out
    for f in ("eval.json", "images.csv", "prompts.csv", "subsets.csv", "summary.csv", "index.html"):
        assert (out / f).is_file(), f
    res = json.loads((out / "eval.json").read_text())
    b = res["bundles"][0]
    assert b["reference"] == "bundle masks" and [h["class_word"] for h in b["handles"]] == ["square", "cat"]
    assert res["options"]["metrics"] == ["clip_t", "clip_i", "identity", "kid", "lpips"]
    assert [p["subset"] for p in b["prompts"]] == ["<asset0>", "<asset1>", "<asset0>+<asset1>"]
    assert b["prompts"][2]["class_prompt"] == "a photo of a square and a cat in the snow"
    assert b["prompts"][2]["removed_prompt"] == "a photo of and in the snow"
    rows = _read_csv(out / "images.csv")
    assert len(rows) == 3 * 2 and [int(r["seed"]) for r in rows] == [5, 6, 7, 8, 9, 10]
    for r in rows:
        assert (out / r["file"]).is_file()
        for m in ("prompt_similarity", "clip_t", "clip_i", "identity"):
            assert -1.0 <= float(r[m]) <= 1.0, (m, r[m])
    both = rows[-1]  # per-handle columns; the mean over the prompt's handles
    per = [float(both["identity[<asset0>]"]), float(both["identity[<asset1>]"])]
    assert float(both["identity"]) == pytest.approx(sum(per) / 2, abs=1e-5)
    assert rows[0]["clip_i[<asset1>]"] == "" and both["segment[<asset0>]"].split(":")[0] in ("class", "best", "whole")
    s = b["summary"]
    assert s["images"] == 6 and math.isfinite(s["kid"]) and s["kid_std"] >= 0 and s["lpips_diversity"] > 0
    assert [x["images"] for x in b["subsets"]] == [2, 2, 2] and all(math.isfinite(x["kid"]) for x in b["subsets"])
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "a photo of &lt;asset0&gt; and &lt;asset1&gt; in the snow" in page
    # the masked reference of a handle scores CLIP-I 1.0 against itself
    from scenetok.evaluation.options import _Plan
    from scenetok.evaluation.references import _references
    from scenetok.evaluation.scoring import _reference_embeds
    from scenetok.bundle import read_bundle

    plan = _Plan(0, "b", read_bundle(trained_bundle), [])
    refs = _references(plan, 32)
    clip = metrics.ClipScorer(str(tiny_models["clip"]), device="cpu")
    emb = _reference_embeds(plan, "clip", 128, clip.image_embeds)
    again = clip.image_embeds([metrics.masked_image(refs["image"], refs["masks"]["<asset1>"])])[0]
    assert float(emb["<asset1>"] @ again) == pytest.approx(1.0, abs=1e-5)


def test_eval_errors(trained_bundle, tmp_path, capsys):
    from scenetok.cli import main

    assert main(["eval", str(trained_bundle), "-o", str(tmp_path / "x"), "--metrics", "clip_t,fid"]) == 2
    assert "unknown metric(s) fid" in capsys.readouterr().err
    assert main(["eval", str(trained_bundle), "-o", str(tmp_path / "x"), "--metrics", "lpips"]) == 2
    assert "--lpips-weights" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_two_processes_give_the_single_process_results(trained_bundle, tiny_models, tmp_path):
    """torchrun with 2 CPU processes over 2 bundles × 2 prompts: same files as one process."""
    from scenetok.evaluation import evaluate_bundles

    pf = tmp_path / "prompts.txt"
    pf.write_text("a photo of <asset0> in the snow\n<asset1> and <asset0> on a table\n")
    common = dict(prompts=str(pf), n=2, steps=2, kid_views=8, metrics="clip_t,clip_i,identity,kid",
                  clip_model=str(tiny_models["clip"]), dino_model=str(tiny_models["dino"]),
                  maskformer_model=str(tiny_models["maskformer"]), device="cpu", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): same arithmetic, same bits
    try:
        single = evaluate_bundles([trained_bundle, trained_bundle], tmp_path / "one", **common)
    finally:
        torch.set_num_threads(threads)
    assert [s["bundle"] for s in single["summary"]] == ["bundle", "bundle-1"]

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "scenetok.cli", "eval", str(trained_bundle), str(trained_bundle), "-o", str(tmp_path / "two"),
           "--prompts", str(pf), "-n", "2", "--steps", "2", "--kid-views", "8", "--metrics", common["metrics"],
           "--device", "cpu", "--quiet", *_model_args(tiny_models)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert not (two / ".partial").exists()
    for name in ("bundle", "bundle-1"):
        for f in ("images.csv", "prompts.csv"):
            assert (two / name / f).read_bytes() == (tmp_path / "one" / name / f).read_bytes(), (name, f)
        a = _read_csv(two / name / "images.csv")
        assert len(a) == 4 and (two / name / a[-1]["file"]).read_bytes() == (tmp_path / "one" / name / a[-1]["file"]).read_bytes()
    for f in ("images.csv", "summary.csv"):  # summary: the KID computed after merging
        assert (two / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
    assert [r["bundle"] for r in _read_csv(two / "images.csv")] == ["bundle"] * 4 + ["bundle-1"] * 4
    overview = json.loads((two / "eval.json").read_text())
    assert overview["processes"] == 2 and overview["shares"] == [[0, 2], [2, 4]]  # one bundle each


def test_work_shares_and_tables():
    from scenetok.evaluation import tables
    from scenetok.evaluation.distributed import share

    assert [list(share(5, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(share(2, r, 3)) for r in range(3)] == [[0], [1], []]
    assert sorted(i for r in range(4) for i in share(11, r, 4)) == list(range(11))
    rows = [{"m": "a", "x": 1.0, "ok": True}, {"m": "b", "x": None, "ok": False}, {"m": "a", "x": 3.0, "ok": False},
            {"m": "b", "x": float("nan")}]
    g = tables.group_mean(rows, ["m"], ["x", "ok"], count="runs")
    assert g == [{"m": "a", "runs": 2, "x": 2.0, "ok": 0.5}, {"m": "b", "runs": 2, "x": None, "ok": 0.0}]
    assert tables.to_csv(g) == "m,runs,x,ok\na,2,2.0,0.5\nb,2,,0.0\n"
    assert tables.markdown_table(g, digits=2).splitlines()[2] == "| a | 2 | 2.00 | 0.50 |"


def test_references_from_a_scene_replace_the_bundle_masks(trained_bundle):
    from conftest import two_squares

    from scenetok.bundle import read_bundle
    from scenetok.evaluation.options import _Plan
    from scenetok.evaluation.references import _load_reference_scene, _references
    from scenetok.scene import Scene

    b = read_bundle(trained_bundle)
    own = _references(_Plan(0, "b", b, []), 32)
    assert own["kind"] == "bundle masks" and set(own["masks"]) == {"<asset0>", "<asset1>"}
    img, masks = two_squares()
    swapped = Scene.from_arrays(img, masks[::-1])  # the masks in the other order
    refs = _references(_Plan(0, "b", b, [], scene=_load_reference_scene(swapped, b)), 32)
    assert refs["kind"].startswith("scene")
    assert (refs["masks"]["<asset0>"] == own["masks"]["<asset1>"]).all()
    with pytest.raises(ConfigError, match="has 1 concepts but bundle"):
        _load_reference_scene(Scene.from_arrays(img, masks[:1]), b)


# ----------------------------------------------------------------------------------------------------
# the papers' protocols, and prompts in the form the bundle's method trained


@pytest.mark.parametrize("k", [1, 2, 3])
def test_paper_protocols_count_their_prompts(k):
    tokens = [f"<asset{i}>" for i in range(k)]
    cw = {t: "cat" for t in tokens}
    dd = prompts.build_prompt_set(tokens, cw, protocol="disendiff", n=2)
    tl = prompts.build_prompt_set(tokens, cw, protocol="tl", n=1)
    combined = 10 if k > 1 else 0
    assert len(dd) == combined + 10 * k and len(tl) == combined + 10 * k  # 2 concepts: 30 (DisenDiff), 30 (TL)
    assert sum(p.handles == tuple(tokens) for p in dd) == (10 if k > 1 else 10)
    assert all(len(p.handles) in (1, k) for p in dd)
    bas = prompts.build_prompt_set(tokens, cw, protocol="bas", n=1)
    assert len(bas) == 10 * (2 ** k - 1)


def test_protocol_numbers_become_the_options_unless_given():
    from scenetok.evaluation.options import EvalOptions

    o = EvalOptions(protocol="disendiff")
    assert (o.n, o.steps, o.guidance) == (16, 50, 6.0)
    o = EvalOptions(protocol="tl", n=3)
    assert (o.n, o.steps, o.guidance) == (3, 50, 7.5)  # TL's paper gives no step count or guidance
    assert (EvalOptions().n, EvalOptions().guidance) == (4, 7.5)
    with pytest.raises(Exception, match="--protocol and --prompts"):
        EvalOptions(protocol="tl", prompts="x.txt")


def test_method_joiner_gives_each_method_its_trained_form():
    phrase = {"<asset0>": "cat", "<asset1>": "dog"}
    for name, want in (("disendiff", "a photo of <asset0> cat and <asset1> dog in the snow"),
                       ("textual-localization", "a photo of a <asset0> cat and a <asset1> dog in the snow"),
                       ("break-a-scene", "a photo of <asset0> and <asset1> in the snow")):
        from scenetok.methods import get_method

        m = get_method(name)
        tokens, words = list(phrase), list(phrase.values())
        join = lambda hs, m=m: m.token_phrase(tokens, [tokens.index(h) for h in hs], m.defaults(), words)  # noqa: E731
        ps = prompts.build_prompt_set(tokens, phrase, templates=["a photo of {tokens} in the snow"], join=join, n=1)
        assert ps[-1].prompt == want, name
        assert ps[-1].class_prompt.replace(" an ", " a ") in ("a photo of a cat and a dog in the snow",), name


def test_eval_of_a_disendiff_bundle_asks_for_the_class_nouns(tiny_sd, tiny_models, tmp_path):
    from conftest import two_squares

    from scenetok.cli import main
    from scenetok.scene import Scene
    from scenetok.training import train

    img, masks = two_squares()
    scene = Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "cat"])
    bundle = train(scene, tmp_path / "dd", method="disendiff", model=str(tiny_sd), progress=False,
                   overrides=["train.steps=1", "batch_size=1", "grad_accum=1", "prior.enabled=false",
                              "preview_every=0", "checkpoint_every=0"]).path
    out = tmp_path / "eval"
    assert main(["eval", str(bundle), "-o", str(out), "--protocol", "disendiff", "-n", "1", "--steps", "1",
                 "--metrics", "clip_t", "--quiet", *_model_args(tiny_models)]) == 0
    res = json.loads((out / "eval.json").read_text())
    ps = res["bundles"][0]["prompts"]
    assert len(ps) == 30 and res["options"]["protocol"] == "disendiff" and res["options"]["guidance"] == 6.0
    noun = {"<asset0>": "square", "<asset1>": "cat"}
    for p in ps:
        for h in p["handles"]:
            assert f"{h} {noun[h]}" in p["prompt"], p["prompt"]  # the trained form: handle, then its class noun
            assert f" {noun[h]}" in p["class_prompt"] and "<" not in p["class_prompt"]
