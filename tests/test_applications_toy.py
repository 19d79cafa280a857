"""Variations and local editing on the shipped toy model, scored by the toy-world oracle.

One short Break-A-Scene run (the toy recipe of tests/test_break_a_scene_toy.py, ~11 s) learns a red
striped star (<asset0>) and a blue square (<asset1>) on gray. Measured on the development machine
(20 DDIM steps, guidance 5): an edit of the lower-right region of a beige photo holding a green circle
put an object of the requested handle's colour inside the region in 16/16 seeds for each handle, and the
oracle read the beige background and the green circle outside the region in 16/16; "a photo of <asset0>
and <asset1>" showed both colours in 7/8 seeds. The assertions leave room below those figures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from scenetok import api
from scenetok.errors import PromptError, SceneError, ScenetokError
from scenetok.toyworld import oracle, world

# the demo's training settings before their re-tune on toy-sd v1d (cheaper; these tests check colours only). On toy-sd v1c this
# bundle's variations draw both objects in 8/8 images; with the 80 + 20 steps this file used on toy-sd v1, in
# 0/8 (the red star is missing)
TOY = ["phase1.steps=120", "phase1.lr=5e-3", "phase2.steps=60", "phase2.lr=2e-5", "preview_every=1000",
       "checkpoint_every=0"]
COLOURS = {"<asset0>": "red", "<asset1>": "blue"}
STEPS = 15


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory):
    from scenetok.scene import Scene
    from scenetok.toyworld.model import toy_sd_path
    from scenetok.training import train

    spec = world.SceneSpec((world.ObjectSpec("star", "red", "striped", 0.30, 0.33, 0.40),
                            world.ObjectSpec("square", "blue", "plain", 0.70, 0.68, 0.34)), "gray")
    image, masks = world.render(spec, size=64)
    scene = Scene.from_arrays(image, list(masks), names=["star", "square"], class_words=["star", "square"],
                              init_words=["star", "square"])
    return train(scene, tmp_path_factory.mktemp("toy") / "bundle", method="break-a-scene", model=str(toy_sd_path()),
                 progress=False, overrides=TOY)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A beige photo with a green circle at the upper left, and a region mask of the lower right."""
    from scenetok.io import atomic_write_png

    root = tmp_path_factory.mktemp("photo")
    spec = world.SceneSpec((world.ObjectSpec("circle", "green", "plain", 0.3, 0.3, 0.3),), "beige")
    image, _ = world.render(spec, size=64)
    mask = np.zeros((64, 64), np.uint8)
    mask[30:62, 30:62] = 255
    atomic_write_png(root / "photo.png", image)
    atomic_write_png(root / "region.png", mask)
    return {"dir": root, "image": image, "mask": mask > 0}


def _kept_outside(image: np.ndarray, region: np.ndarray) -> bool:
    """The oracle reads the photo's beige background and its green circle outside the edited region."""
    bg, found = oracle.analyze(image)
    outside = [(f.color, f.shape) for f in found if not (f.mask & region).any()]
    return bg == "beige" and outside == [("green", "circle")]


def _inside(image: np.ndarray, region: np.ndarray, colour: str) -> bool:
    _, found = oracle.analyze(image)
    return any(f.color == colour and (f.mask & region).sum() >= 0.8 * f.mask.sum() for f in found)


@pytest.mark.parametrize("token", ["<asset0>", "<asset1>"])
def test_edit_draws_the_handle_inside_and_keeps_the_outside(toy_bundle, photo, token):
    n = 6
    out = api.edit(toy_bundle, photo["dir"] / "photo.png", [photo["dir"] / "region.png"], [f"a photo of {token}"],
                   n=n, steps=STEPS, guidance=5.0, device="cpu", progress=False)
    hits = 0
    for r in out:
        a = np.asarray(r.image)
        assert r.region.sum() < 0.45 * r.region.size  # the dilated region: the 32×32 square plus a 4-px feather
        assert r.region[photo["mask"]].all()
        assert np.abs(a.astype(int) - photo["image"])[~r.region].max() <= 2  # every pixel outside, within 2/255
        assert _kept_outside(a, r.region)
        hits += _inside(a, r.region, COLOURS[token])
    assert hits >= n - 2, f"{token}: the handle's object inside the region in {hits}/{n} seeds"


def test_edits_chain_region_after_region(toy_bundle, photo, tmp_path):
    left = np.zeros((64, 64), bool)
    left[36:60, 2:26] = True
    out = api.edit(toy_bundle, photo["image"], [left, photo["dir"] / "region.png"],
                   ["a photo of <asset0>", "a photo of <asset1>"], n=2, seed=4, steps=STEPS, guidance=5.0,
                   device="cpu", out_dir=tmp_path / "e", progress=False)
    for r in out:
        first, final = np.asarray(r.stages[0]), np.asarray(r.image)
        assert np.array_equal(first[~photo["mask"] & ~r.region], final[~photo["mask"] & ~r.region])
        assert np.array_equal(final[~r.region], photo["image"][~r.region])
        assert _inside(final, left, "red") or _inside(final, photo["mask"], "blue")
    names = {p.name for p in (tmp_path / "e").iterdir()}
    assert names == {"edit_00_seed4_step1.png", "edit_00_seed4.png", "edit_01_seed5_step1.png", "edit_01_seed5.png",
                     "edit_sheet.png", "edits.jsonl"}
    rows = [json.loads(x) for x in (tmp_path / "e" / "edits.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [4, 5] and rows[0]["regions"][1]["prompt"] == "a photo of <asset1>"
    again = api.edit(toy_bundle, photo["image"], [left, photo["dir"] / "region.png"],
                     ["a photo of <asset0>", "a photo of <asset1>"], n=1, seed=5, steps=STEPS, guidance=5.0,
                     device="cpu", progress=False)
    assert np.array_equal(np.asarray(again[0].image), np.asarray(out[1].image))  # same seed, same edit


def test_variations_show_every_handle_in_new_layouts(toy_bundle, tmp_path):
    n = 6
    out = api.variations(toy_bundle, n=n, steps=STEPS, guidance=5.0, device="cpu", out_dir=tmp_path / "v",
                         progress=False)
    found_all, positions = 0, []
    for g in out:
        _, found = oracle.analyze(np.asarray(g.image))
        colours = {f.color for f in found}
        found_all += {"red", "blue"} <= colours
        reds = [f for f in found if f.color == "red"]
        if reds:
            positions.append(np.argwhere(max(reds, key=lambda f: f.area).mask).mean(0))
    assert found_all >= n - 2, f"both handles in {found_all}/{n} variations"
    positions = np.array(positions)
    spread = np.linalg.norm(positions - positions.mean(0), axis=1).mean()
    assert spread > 6.0, f"the red object stays put (mean distance from its mean position {spread:.1f} px)"
    rows = [json.loads(x) for x in (tmp_path / "v" / "variations.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == list(range(n)) and rows[0]["prompt"] == "a photo of <asset0> and <asset1>"
    assert (tmp_path / "v" / "contact_sheet.png").is_file()


# ------------------------------------------------------------------------------------------- bad input


def test_bad_regions_get_one_line_errors_and_write_nothing(toy_bundle, photo, tmp_path, capsys):
    from scenetok.cli import main
    from scenetok.io import atomic_write_png

    d = photo["dir"]
    atomic_write_png(tmp_path / "empty.png", np.zeros((64, 64), np.uint8))
    atomic_write_png(tmp_path / "full.png", np.full((64, 64), 255, np.uint8))
    atomic_write_png(tmp_path / "wide.png", np.full((32, 64), 255, np.uint8))
    big = np.zeros((128, 128), np.uint8)
    big[60:124, 60:124] = 255
    atomic_write_png(tmp_path / "big.png", big)
    out = tmp_path / "out"
    cases = [
        (["--mask", str(tmp_path / "empty.png"), "--prompt", "a photo of <asset0>"], "is empty"),
        (["--mask", str(tmp_path / "full.png"), "--prompt", "a photo of <asset0>"], "covers the whole photo"),
        (["--mask", str(tmp_path / "wide.png"), "--prompt", "a photo of <asset0>"], "wide.png"),
        (["--mask", str(d / "region.png"), "--prompt", "a photo of <asset5>"], "<asset5>"),
        (["--mask", "rect:10,10,5,20", "--prompt", "a photo of <asset0>"], "is empty"),
    ]
    for extra, words in cases:
        argv = ["edit", str(toy_bundle.path), "--image", str(d / "photo.png"), "-o", str(out), "--steps", "2",
                "--quiet", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("error: ") and words in err[0], (words, err)
        assert len(err) <= 2
        assert not out.exists()  # nothing written
    with pytest.raises(ScenetokError, match="1 --mask but 0 --prompt"):
        api.edit(toy_bundle, d / "photo.png", [d / "region.png"], [], progress=False)
    with pytest.raises(PromptError):
        api.edit(toy_bundle, d / "photo.png", [d / "region.png"], ["<asset9> on a beach"], progress=False)
    with pytest.raises(SceneError, match="aspect"):
        api.edit(toy_bundle, d / "photo.png", [tmp_path / "wide.png"], ["a photo of <asset0>"], progress=False)
    # a mask of the photo's aspect ratio at another size is resized to the photo
    r = api.edit(toy_bundle, d / "photo.png", [tmp_path / "big.png"], ["a photo of <asset0>"], steps=2,
                 device="cpu", progress=False)[0]
    assert r.region[30:62, 30:62].all() and not r.region[:24, :24].any()
