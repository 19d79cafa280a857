"""The toy-world oracle: attribute accuracy on clean and distorted renders, leakage, backgrounds, identity."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from scenetok.toyworld import oracle, world
from scenetok.toyworld.world import ObjectSpec, SceneSpec

ATTRS = ("color", "shape", "texture")


def _accuracy(n: int, seed: int, distorted: bool) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    drng = np.random.default_rng(seed + 1)
    ok, tot = Counter(), Counter()
    for _ in range(n):
        spec = world.sample_scene(rng, allow_held_out=True)
        img, _ = world.render(spec)
        if distorted:
            img = oracle.distort(img, drng)
        j = oracle.judge(img, list(spec.objects), spec.background)
        tot["background"] += 1
        ok["background"] += bool(j.background_ok)
        tot["extra"] += 1
        ok["extra"] += not j.extra
        for m in j.matches:
            for a in ATTRS:
                tot[a] += 1
                ok[a] += bool(m[f"{a}_ok"])
    return {k: ok[k] / tot[k] for k in tot}


def test_clean_renders_are_read_exactly():
    acc = _accuracy(150, seed=11, distorted=False)
    assert min(acc.values()) >= 0.99, acc


def test_distorted_renders_are_read_well():
    # gaussian noise σ=8/255, blur σ=0.8 px, colour jitter ±6 %, JPEG q=85
    acc = _accuracy(90, seed=12, distorted=True)
    assert min(acc.values()) >= 0.95, acc


def test_found_masks_match_the_true_masks():
    spec = world.sample_scene(np.random.default_rng(3), n_objects=3)
    img, masks = world.render(spec)
    _, found = oracle.analyze(img)
    assert len(found) == 3
    for obj, mask in zip(spec.objects, masks):
        (f,) = [f for f in found if f.color == obj.color]
        iou = (f.mask & mask).sum() / (f.mask | mask).sum()
        assert iou > 0.9
        assert f.area == pytest.approx(mask.mean(), abs=0.01)


def test_leakage_is_reported_as_extra():
    a = ObjectSpec("star", "red", "striped", 0.3, 0.3, 0.35)
    b = ObjectSpec("circle", "blue", "plain", 0.7, 0.7, 0.35)
    img, _ = world.render(SceneSpec((a, b), "white"))
    j = oracle.judge(img, [a], "white")
    assert j.matches[0]["ok"] and j.background_ok
    assert len(j.extra) == 1 and j.objects[j.extra[0]].color == "blue"
    assert not j.all_ok
    j2 = oracle.judge(img, [a, b], "white")
    assert j2.extra == [] and j2.all_ok
    d = j2.as_dict()
    json.dumps(d)  # JSON-ready
    assert d["all_ok"] and len(d["objects"]) == 2


def test_missing_and_wrong_objects():
    a = ObjectSpec("square", "green", "dotted", 0.5, 0.5, 0.4)
    img, _ = world.render(SceneSpec((a,), "beige"))
    j = oracle.judge(img, [{"color": "green", "shape": "triangle"}, {"color": "pink"}], "navy")
    green, pink = j.matches
    assert green["color_ok"] and not green["shape_ok"] and green["texture_ok"] is None and not green["ok"]
    assert pink["found"] is None and not pink["ok"]
    assert j.background == "beige" and j.background_ok is False
    # don't-care fields
    j = oracle.judge(img, [{"shape": "square"}])
    assert j.matches[0]["ok"] and j.matches[0]["color_ok"] is None and j.background_ok is None
    with pytest.raises(ValueError, match="unknown shape"):
        oracle.judge(img, [{"shape": "hexagon"}])


@pytest.mark.parametrize("pattern", world.BG_PATTERNS)
def test_every_background_is_recognised(pattern):
    obj = ObjectSpec("ring", "yellow", "plain", 0.45, 0.55, 0.4)
    for bg in world.BACKGROUNDS:
        img, _ = world.render(SceneSpec((obj,), bg, pattern))
        name, found = oracle.analyze(img)
        assert name == bg
        assert [(f.color, f.shape, f.texture) for f in found] == [("yellow", "ring", "plain")]


def test_identity_score():
    concept = ObjectSpec("cross", "purple", "striped", 0.5, 0.5, 0.4)
    img, _ = world.render(SceneSpec((concept,), "gray"))
    assert oracle.identity_score(img, concept) == 1.0
    assert oracle.identity_score(img, {"color": "purple", "shape": "cross", "texture": "striped"}) == 1.0
    other_colour = ObjectSpec("cross", "orange", "striped", 0.5, 0.5, 0.4)
    img2, _ = world.render(SceneSpec((other_colour,), "gray"))
    assert oracle.identity_score(img2, concept) == pytest.approx(0.6)  # shape 0.4 + texture 0.2
    other_shape = ObjectSpec("circle", "purple", "striped", 0.5, 0.5, 0.4)
    img3, _ = world.render(SceneSpec((other_shape,), "gray"))
    assert oracle.identity_score(img3, concept) == pytest.approx(0.6)  # colour 0.4 + texture 0.2
    empty, _ = world.render(SceneSpec((), "gray"))
    assert oracle.identity_score(empty, concept) == 0.0


def test_any_resolution_and_input_type():
    spec = world.sample_scene(np.random.default_rng(9), n_objects=2)
    img64, _ = world.render(spec, size=64)
    img256, _ = world.render(spec, size=256, supersample=2)
    from PIL import Image

    n64, f64 = oracle.analyze(img64)
    for image in (img256, Image.fromarray(img256), img256.astype(np.float32) / 255.0):
        n, f = oracle.analyze(image)
        assert n == n64
        attrs = sorted((o.color, o.shape, o.texture) for o in f)
        assert attrs == sorted((o.color, o.shape, o.texture) for o in f64)
        assert all(o.mask.shape == (256, 256) for o in f)
    with pytest.raises(ValueError, match="RGB"):
        oracle.analyze(np.zeros((4, 5, 6, 7)))


def test_stored_shape_table_matches_the_features():
    names, means, sds = oracle._shape_table()
    assert names == list(world.SHAPES)
    _, masks = world.render(SceneSpec((ObjectSpec("star", "red", "plain", 0.5, 0.5, 0.4),), "gray"))
    f = oracle.shape_features(masks[0])
    assert means.shape == sds.shape == (len(names), len(f))


def test_texture_on_generated_images_agrees_with_a_human():
    """48 single-object toy-sd generations (tests/data/oracle-generated, 16 from each texture the oracle read
    when they were drawn), their texture labelled by eye. On 2026-12-03 the oracle agreed on 45 of 48; its
    misses were plain objects read as textured (two small ones, one shaded). Generated images, not renders:
    this is the reading every benchmark score rests on."""
    from pathlib import Path

    from PIL import Image

    folder = Path(__file__).parent / "data" / "oracle-generated"
    rows = json.loads((folder / "labels.json").read_text())["images"]
    assert len(rows) == 48
    hits = Counter()
    for r in rows:
        _, found = oracle.analyze(np.asarray(Image.open(folder / r["file"]).convert("RGB")))
        assert len(found) == 1, r["file"]
        hits[r["texture"], found[0].texture == r["texture"]] += 1
    agree = sum(v for (_, ok), v in hits.items() if ok) / len(rows)
    assert agree >= 0.9, hits
    for tex in world.TEXTURES:  # every texture, not just the overall share
        n = hits[tex, True] + hits[tex, False]
        assert hits[tex, True] / n >= 0.8, (tex, hits)
