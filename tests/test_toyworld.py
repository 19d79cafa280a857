"""The toy world renderer: determinism, exact masks, occlusion, captions, held-out combinations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scenetok.toyworld import world
from scenetok.toyworld.world import ObjectSpec, SceneSpec


def _one(shape, color="red", texture="plain", cx=0.5, cy=0.5, size=0.4, bg="gray"):
    return SceneSpec((ObjectSpec(shape, color, texture, cx, cy, size),), bg)


def test_palettes_are_large_and_distinct():
    assert len(world.SHAPES) >= 6 and len(world.COLORS) >= 8 and len(world.BACKGROUNDS) >= 8
    inks = [np.array(c, float) for c in world.COLORS.values()]
    inks += [np.array(world.shade(c), float) for c in world.COLORS]
    for bg in world.BACKGROUNDS.values():
        # no object colour or dark shade comes close to a background: objects never vanish
        assert min(np.linalg.norm(np.array(bg, float) - ink) for ink in inks) > 40
    cols = [np.array(c, float) for c in world.COLORS.values()]
    assert min(np.linalg.norm(a - b) for i, a in enumerate(cols) for b in cols[i + 1 :]) > 80


def test_same_seed_same_scene_same_pixels():
    a = world.sample_scene(np.random.default_rng(123))
    b = world.sample_scene(np.random.default_rng(123))
    assert a == b
    ia, ma = world.render(a)
    ib, mb = world.render(b)
    assert ia.dtype == np.uint8 and ia.shape == (64, 64, 3)
    assert ma.dtype == bool and ma.shape == (len(a.objects), 64, 64)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(ma, mb)
    assert world.sample_scene(np.random.default_rng(124)) != a


@pytest.mark.parametrize(
    "shape,area",
    [
        ("circle", math.pi),
        ("ring", math.pi * (1 - 0.5**2)),
        ("square", (2 * 0.82) ** 2),
        ("triangle", 2.0),
        ("cross", 2 * (2 * 0.68) - 0.68**2),
    ],
)
def test_single_object_mask_matches_analytic_area(shape, area):
    size = 0.4
    r = size / 2 * 128
    _, masks = world.render(_one(shape, size=size), size=128)
    assert masks.shape == (1, 128, 128)
    # pixel quantisation of straight edges costs up to a few per cent at this size
    assert abs(masks[0].sum() - area * r * r) / (area * r * r) < 0.05


def test_mask_agrees_with_image():
    spec = _one("square", color="blue", size=0.4)
    img, masks = world.render(spec)
    ys, xs = np.nonzero(masks[0])
    core = np.zeros_like(masks[0])
    core[ys.min() + 1 : ys.max(), xs.min() + 1 : xs.max()] = True
    assert (img[core] == world.COLORS["blue"]).all()
    assert (img[~masks[0]] != np.array(world.COLORS["blue"])).any(axis=-1).all()
    # textured: every masked pixel is the colour, its shade, or an anti-aliased mix of the two/background
    spec = _one("circle", color="green", texture="striped", size=0.45)
    img, masks = world.render(spec, size=64)
    full = np.array(world.COLORS["green"])
    dark = np.array(world.shade("green"))
    from scipy import ndimage

    inner = ndimage.binary_erosion(masks[0])
    px = img[inner].astype(float)
    seg = full - dark
    t = np.clip(((px - dark) @ seg) / (seg @ seg), 0, 1)
    dist = np.linalg.norm(px - (dark + t[:, None] * seg), axis=1)
    assert dist.max() < 2.5  # only the colour, its shade and mixes of the two inside the mask
    assert (t > 0.95).mean() > 0.2 and (t < 0.05).mean() > 0.2  # both bands present


def test_occlusion_later_object_wins_and_masks_are_disjoint():
    a = ObjectSpec("square", "red", "plain", 0.4, 0.5, 0.4)
    b = ObjectSpec("circle", "blue", "dotted", 0.6, 0.5, 0.4)
    _, (ma,) = world.render(SceneSpec((a,), "white"))
    _, (mb,) = world.render(SceneSpec((b,), "white"))
    img, masks = world.render(SceneSpec((a, b), "white"))
    assert not (masks[0] & masks[1]).any()
    np.testing.assert_array_equal(masks[1], mb)  # the top object is whole
    overlap = ma & mb
    assert overlap.sum() > 50
    assert not masks[0][overlap].any()  # the bottom object loses the overlap ...
    assert not (masks[0] & ~ma).any()
    # ... and only that (up to pixels on the occluding edge whose visible coverage drops below half)
    assert (ma & ~mb & ~masks[0]).sum() <= 4
    # reversed order: the square is on top
    _, masks2 = world.render(SceneSpec((b, a), "white"))
    np.testing.assert_array_equal(masks2[1], ma)


def test_render_at_other_sizes_is_consistent():
    spec = world.sample_scene(np.random.default_rng(5), n_objects=2)
    img, masks = world.render(spec, size=128, supersample=2)
    assert img.shape == (128, 128, 3) and masks.shape == (2, 128, 128)
    _, small = world.render(spec, size=64)
    for big, sm in zip(masks, small):
        assert abs(big.mean() - sm.mean()) < 0.01


def test_sampled_scenes_respect_the_rules():
    rng = np.random.default_rng(0)
    for _ in range(150):
        spec = world.sample_scene(rng)
        assert 1 <= len(spec.objects) <= 4
        colors = [o.color for o in spec.objects]
        assert len(set(colors)) == len(colors)
        for o in spec.objects:
            assert world.SIZE_RANGE[0] <= o.size <= world.SIZE_RANGE[1]
            assert o.size / 2 <= o.cx <= 1 - o.size / 2 and o.size / 2 <= o.cy <= 1 - o.size / 2
        _, masks = world.render(spec)
        assert masks.mean(axis=(1, 2)).min() > 0.025  # every object clearly visible
    for k in (1, 3):
        assert len(world.sample_scene(rng, n_objects=k).objects) == k
    for _ in range(30):
        spec = world.sample_scene(rng, n_objects=3, overlap=False)
        _, masks = world.render(spec)
        full = [world.render(SceneSpec((o,), spec.background))[1][0] for o in spec.objects]
        for m, f in zip(masks, full):
            np.testing.assert_array_equal(m, f)  # nothing occluded


def test_held_out_combinations_are_never_sampled():
    assert len(world.HELD_OUT) >= 6
    for color, shape, texture in world.HELD_OUT:
        assert color in world.COLORS and shape in world.SHAPES and texture in world.TEXTURES
    assert {c for c, _, _ in world.HELD_OUT} == set(world.COLORS)  # every colour is held out once ...
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(2000):
        for o in world.sample_scene(rng, allow_held_out=False).objects:
            seen.add((o.color, o.shape, o.texture))
    assert not seen & world.HELD_OUT
    assert {c for c, _, _ in seen} == set(world.COLORS)  # ... and still seen in other combinations
    assert {s for _, s, _ in seen} == set(world.SHAPES)
    rng = np.random.default_rng(8)
    allowed = {
        (o.color, o.shape, o.texture)
        for _ in range(2000)
        for o in world.sample_scene(rng, allow_held_out=True).objects
    }
    assert allowed & world.HELD_OUT


def test_captions():
    a = ObjectSpec("star", "red", "striped", 0.3, 0.3, 0.3)
    b = ObjectSpec("circle", "blue", "plain", 0.7, 0.7, 0.3)
    c = ObjectSpec("ring", "orange", "dotted", 0.3, 0.7, 0.3)
    assert world.object_phrase(a) == "red striped star"
    assert world.object_phrase(b) == "blue circle"
    assert world.caption(SceneSpec((a, b), "white")) == (
        "a photo of a red striped star and a blue circle on a white background"
    )
    assert world.caption(SceneSpec((a, b, c), "olive")) == (
        "a photo of a red striped star, a blue circle and an orange dotted ring on an olive background"
    )
    assert world.caption(SceneSpec((c,), "black")) == "a photo of an orange dotted ring on a black background"
    # with an rng the mention order varies, but the content does not
    texts = {world.caption(SceneSpec((a, b, c), "gray"), np.random.default_rng(i)) for i in range(20)}
    assert len(texts) > 1
    for t in texts:
        for phrase in ("red striped star", "blue circle", "orange dotted ring", "on a gray background"):
            assert phrase in t


def test_vocabulary_covers_every_caption_word():
    vocab = set(world.vocabulary())
    rng = np.random.default_rng(3)
    words = set()
    for _ in range(500):
        spec = world.sample_scene(rng, allow_held_out=True)
        words.update(world.caption_words(world.caption(spec, rng)))
    assert words <= vocab
    assert set(world.COLORS) | set(world.SHAPES) | set(world.BACKGROUNDS) <= vocab


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="unknown shape"):
        ObjectSpec("hexagon", "red", "plain", 0.5, 0.5, 0.3)
    with pytest.raises(ValueError, match="unknown colour"):
        ObjectSpec("circle", "mauve", "plain", 0.5, 0.5, 0.3)
    with pytest.raises(ValueError, match="unknown background"):
        SceneSpec((), "plaid")
    with pytest.raises(ValueError, match="n_objects"):
        world.sample_scene(np.random.default_rng(0), n_objects=0)
