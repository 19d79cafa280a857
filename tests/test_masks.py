"""scenetok.masks: hygiene on hand-made masks (exact results), user files, SAM from boxes and clicks,
text → GroundingDINO → SAM, scene folders, and the `masks` / `extract --auto-masks` commands.

SAM and GroundingDINO are tiny random models built by scenetok.testing, saved to disk and loaded by
path through the real loaders. ``full_masks`` SAM answers every prompt with the whole image, so what
the tests see is exactly scenetok's own post-processing (box clipping, hygiene)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import two_squares
from scenetok.cli import main
from scenetok.errors import SceneError
from scenetok.masks import (ConceptMask, Hygiene, MaskError, clean_masks, clear_model_cache, from_boxes, from_files,
                            from_points, from_text, load_sam, make_masks, parse_queries, save_masks, to_scene)
from scenetok.masks.core import parse_box, parse_clicks
from scenetok.masks.hygiene import dilate, fill_holes, remove_islands, resolve_overlaps
from scenetok.masks.sam import box_region
from scenetok.scene import load_scene

FAST = ["--set", "phase1.steps=2", "--set", "phase2.steps=1", "--set", "preview_every=100"]
OFF = Hygiene(max_hole=0, min_island=0, overlap="keep", min_fraction=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from scenetok.testing import build_tiny_grounding_dino, build_tiny_sam

    root = tmp_path_factory.mktemp("seg-models")
    return {
        "sam_full": str(build_tiny_sam(root / "sam-full", full_masks=True)),
        "sam": str(build_tiny_sam(root / "sam-random", seed=1)),
        "gd": str(build_tiny_grounding_dino(root / "gd", box_logit=1.0)),
    }


def grid(rows: list[str]) -> np.ndarray:
    """A bool mask from strings: '#' on, '.' off."""
    return np.array([[ch == "#" for ch in r] for r in rows], bool)


def rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ------------------------------------------------------------------------------------------ hygiene


def test_fill_holes_fills_only_small_enclosed_holes():
    m = grid(["#######.",
              "#.#...#.",
              "###...#.",
              "#.#...#.",
              "#######.",
              "........"])
    # holes: (1,1) 1 px, (3,1) 1 px, the 3×3 block 9 px; the right column touches the border (not a hole)
    out = fill_holes(m, max_area=2)
    expected = m.copy()
    expected[1, 1] = expected[3, 1] = True
    assert (out == expected).all()
    assert fill_holes(m, max_area=10)[1:4, 3:6].all() and not fill_holes(m, max_area=10)[:, 7].any()
    assert fill_holes(m, max_area=9)[1:4, 3:6].sum() == 0  # "smaller than": 9 is not below 9
    assert (fill_holes(m, 0) == m).all()


def test_remove_islands_is_8_connected_and_keeps_largest():
    m = grid(["###.....",
              "###.....",
              "###.....",
              "...#..##",
              "........"])
    # the pixel at (3,3) touches the block diagonally: it belongs to it (8-connectivity)
    out = remove_islands(m, min_area=3)
    expected = m.copy()
    expected[3, 6:8] = False
    assert (out == expected).all()
    # every part below the limit: the largest still stays
    only = remove_islands(m, min_area=100)
    assert only.sum() == 10 and not only[3, 6:].any()


def test_dilate_is_euclidean_and_respects_allowed():
    m = np.zeros((7, 7), bool)
    m[3, 3] = True
    one = dilate(m, 1)
    assert one.sum() == 5 and one[2, 3] and one[3, 2] and not one[2, 2]  # diagonal is √2 away
    two = dilate(m, 2)
    assert two.sum() == 13  # distance ≤ 2: 1 + 4 + 4 (diagonals √2) + 4 (distance 2)
    allowed = np.ones((7, 7), bool)
    allowed[:, :3] = False
    assert dilate(m, 2, allowed=allowed).sum() == 13 - 4  # columns 1 and 2 lose 1 + 3 pixels
    assert (dilate(np.zeros((4, 4), bool), 3) == 0).all()


def test_overlap_rules():
    a = rect(6, 8, 0, 0, 4, 4)  # 16 px
    b = rect(6, 8, 2, 2, 8, 4)  # 12 px, overlaps a on [2:4, 2:4]
    sa, sb = resolve_overlaps([a, b], [0.9, 0.5], rule="smaller")
    assert (sb == b).all() and (sa == (a & ~b)).all() and sa.sum() == 12
    ha, hb = resolve_overlaps([a, b], [0.9, 0.5], rule="score")
    assert (ha == a).all() and hb.sum() == 8
    ka, kb = resolve_overlaps([a, b], rule="keep")
    assert (ka == a).all() and (kb == b).all()
    # equal sizes, no scores: the earlier concept wins
    c = rect(6, 8, 2, 0, 6, 4)
    ea, ec = resolve_overlaps([a, c], rule="smaller")
    assert (ea == a).all() and ec.sum() == 8
    # equal sizes, scores decide before order
    ea, ec = resolve_overlaps([a, c], [0.1, 0.2], rule="smaller")
    assert (ec == c).all() and ea.sum() == 8


def test_clean_masks_loosens_into_free_space_only():
    a = rect(3, 9, 0, 0, 3, 3)  # columns 0-2: 9 px
    b = rect(3, 9, 4, 0, 6, 3)  # columns 4-5: 6 px; column 3 is free and 1 px from both
    h = Hygiene(max_hole=0, min_island=0, dilate=1, min_fraction=0.01)
    ca, cb = clean_masks([ConceptMask("a", a), ConceptMask("b", b)], h)
    assert (ca.mask == a).all()  # a's ring (column 3) is contested: b is smaller and takes it
    assert (cb.mask == rect(3, 9, 3, 0, 7, 3)).all()
    # with "keep" both grow freely and overlap on column 3
    ka, kb = clean_masks([ConceptMask("a", a), ConceptMask("b", b)], h.with_(overlap="keep"))
    assert (ka.mask == rect(3, 9, 0, 0, 4, 3)).all() and (kb.mask == rect(3, 9, 3, 0, 7, 3)).all()


def test_clean_masks_full_pipeline_exact():
    m = np.zeros((10, 10), bool)
    m[1:6, 1:6] = True
    m[3, 3] = False  # a 1-px hole
    m[8, 8] = True  # a 1-px island
    (c,) = clean_masks([ConceptMask("x", m, source="file")], Hygiene(max_hole=2, min_island=2, min_fraction=0.1))
    assert (c.mask == rect(10, 10, 1, 1, 6, 6)).all()
    # fractions: 0.002 of 100 px = 0.2 px, so nothing is small enough to change
    (d,) = clean_masks([ConceptMask("x", m)], Hygiene(min_fraction=0.1))
    assert (d.mask == m).all()


def test_refusal_names_the_concept_and_the_remedy():
    full = np.ones((100, 100), bool)
    speck = np.zeros((100, 100), bool)
    speck[5, 5] = True
    with pytest.raises(MaskError) as e:
        clean_masks([ConceptMask("bowl", full, source="text"), ConceptMask("stone", np.zeros((100, 100), bool),
                                                                          source="text"),
                     ConceptMask("shell", speck, source="box")], Hygiene(overlap="keep"))
    msg = e.value.message
    assert "'stone' was not found" in msg and "'shell' was barely found" in msg and "0.01%" in msg
    assert "'bowl'" not in msg
    assert "--box-threshold" in e.value.hint and "--box" in e.value.hint and "x0,y0,x1,y1" in e.value.hint
    # a concept swallowed by a smaller overlapping one
    inner = rect(100, 100, 10, 10, 60, 60)
    with pytest.raises(MaskError) as e:
        clean_masks([ConceptMask("table", inner), ConceptMask("cup", rect(100, 100, 0, 0, 70, 70))][::-1]
                    + [ConceptMask("lid", rect(100, 100, 0, 0, 70, 70))])
    assert "'lid' lost its pixels to the overlapping concepts 'table', 'cup'" in e.value.message


@pytest.mark.parametrize("kw", [{"dilate": -1}, {"overlap": "biggest"}, {"min_fraction": 1.5}, {"max_hole": -2}])
def test_hygiene_settings_validated(kw):
    with pytest.raises(MaskError):
        Hygiene(**kw)


# ------------------------------------------------------------------------------------------ files


def test_from_files_reads_like_the_scene_loader(tmp_path):
    a = np.zeros((20, 40), np.uint8)
    a[2:10, 4:20] = 255
    a[5, 10] = 0  # a 1-px hole: the default hygiene fills holes below 0.2 % of 800 px = 1.6 px
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[10:18, 22:38, 3] = 255  # alpha mask
    Image.fromarray(a).save(tmp_path / "mask0.png")
    Image.fromarray(rgba).save(tmp_path / "mask1.png")
    got = from_files(tmp_path, ["creature", "bowl"])
    assert [c.name for c in got] == ["creature", "bowl"] and all(c.source == "file" for c in got)
    assert (got[0].mask == rect(20, 40, 4, 2, 20, 10)).all()
    assert (got[1].mask == rect(20, 40, 22, 10, 38, 18)).all()
    # fitted to a photo of twice the size (same aspect ratio)
    img = np.zeros((40, 80, 3), np.uint8)
    big = from_files([tmp_path / "mask0.png"], image=img, hygiene=None)
    assert big[0].mask.shape == (40, 80) and big[0].mask.sum() == 4 * (8 * 16 - 1)
    with pytest.raises(SceneError, match="aspect ratio"):
        from_files([tmp_path / "mask0.png"], image=np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(MaskError, match="2 names for 1 masks"):
        from_files([tmp_path / "mask0.png"], ["a", "b"])


# ------------------------------------------------------------------------------------------ SAM


def test_from_boxes_full_mask_sam_gives_the_box_regions(models):
    img = np.full((48, 80, 3), 90, np.uint8)  # not square: masks come back at 48×80
    got = from_boxes(img, [(5, 5, 30, 40), (40.4, 10, 75, 30)], ["creature", "bowl"], model=models["sam_full"],
                     device="cpu", box_margin=0, hygiene=None)
    assert [c.name for c in got] == ["creature", "bowl"] and all(c.source == "box" for c in got)
    assert got[0].mask.shape == (48, 80)
    assert (got[0].mask == rect(48, 80, 5, 5, 30, 40)).all()
    assert (got[1].mask == rect(48, 80, 40, 10, 75, 30)).all()  # pixel 40's centre 40.5 ≥ 40.4
    assert got[1].box == (40.4, 10.0, 75.0, 30.0) and isinstance(got[0].score, float)
    # default margin 5 %: a 20-px box grows by 1 px on each side; parts outside the image are cut
    (c,) = from_boxes(img, [(-10, 10, 30, 30)], model=models["sam_full"], device="cpu", hygiene=None)
    assert c.box == (0.0, 10.0, 30.0, 30.0)
    assert (c.mask == rect(48, 80, 0, 9, 32, 31)).all()  # margins 1.5 px (x) and 1 px (y)


def test_from_boxes_random_sam_shapes_and_cache(models):
    clear_model_cache()
    first = load_sam(models["sam"], "cpu")
    assert load_sam(models["sam"], "cpu") is first
    img = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    got = from_boxes(img, [(0, 0, 35, 50), (35, 0, 70, 50)], model=models["sam"], device="cpu", hygiene=OFF)
    assert [c.name for c in got] == ["concept0", "concept1"]
    for c, x0 in zip(got, (0, 35)):
        assert c.mask.shape == (50, 70) and c.mask.dtype == bool
        outside = ~box_region((x0, 0, x0 + 35, 50), (50, 70), 0.05)
        assert not c.mask[outside].any()
    clear_model_cache()
    assert load_sam(models["sam"], "cpu") is not first


def test_from_points_groups_and_refusal(models, tmp_path):
    img = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    got = from_points(img, [(10, 10), [(50, 20), (55, 25), (5, 35, 0)]], ["a", "b"], model=models["sam"],
                      device="cpu", hygiene=OFF)
    assert [c.name for c in got] == ["a", "b"] and all(c.mask.shape == (40, 60) for c in got)
    assert all(c.source == "points" and isinstance(c.score, float) for c in got)
    # the full-mask SAM gives both concepts the whole image: equal areas, so the higher score keeps it all
    raw = from_points(img, [(10, 10), (50, 20)], ["cat", "dog"], model=models["sam_full"], device="cpu", hygiene=None)
    assert all(c.mask.all() for c in raw)
    winner, loser = sorted(raw, key=lambda c: -c.score)
    with pytest.raises(MaskError) as e:
        from_points(img, [(10, 10), (50, 20)], ["cat", "dog"], model=models["sam_full"], device="cpu")
    assert f"'{loser.name}' lost its pixels to the overlapping concept '{winner.name}'" in e.value.message
    assert "0.00% of the image left" in e.value.message


@pytest.mark.parametrize("boxes,match", [([(30, 5, 10, 20)], "reversed"), ([(100, 100, 120, 130)], "outside"),
                                          ([(1, 2, 3)], "four numbers")])
def test_bad_boxes(models, boxes, match):
    with pytest.raises(MaskError, match=match):
        from_boxes(np.zeros((40, 60, 3), np.uint8), boxes, model=models["sam_full"], device="cpu")


def test_bad_points_and_missing_model(models, tmp_path):
    img = np.zeros((40, 60, 3), np.uint8)
    with pytest.raises(MaskError, match="outside the 60×40 image"):
        from_points(img, [(61, 5)], model=models["sam_full"], device="cpu")
    with pytest.raises(MaskError, match="only clicks off the object"):
        from_points(img, [[(5, 5, 0)]], model=models["sam_full"], device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaskError) as e:
        from_boxes(img, [(0, 0, 10, 10)], model=str(tmp_path / "empty"), device="cpu")
    assert "cannot load the SAM model" in e.value.message and "--sam-model" in e.value.hint


def test_concept_mask_coerces_to_bool():
    c = ConceptMask("x", np.array([[0.2, 0.5], [0.7, 0.0]]))
    assert c.mask.dtype == bool and c.mask.tolist() == [[False, True], [True, False]] and c.fraction == 0.5
    assert ConceptMask("y", np.array([[0, 3]], np.uint8)).mask.tolist() == [[False, True]]


def test_cli_value_parsers():
    assert parse_box("10, 20,200,240") == (10.0, 20.0, 200.0, 240.0)
    assert parse_clicks("120,80+130,95+40,40,0") == [(120.0, 80.0), (130.0, 95.0), (40.0, 40.0, 0.0)]
    with pytest.raises(MaskError, match="not 4"):
        parse_box("1,2,3")
    with pytest.raises(MaskError, match="cannot read"):
        parse_clicks("1,x")


# ------------------------------------------------------------------------------------------ text


def test_parse_queries():
    assert parse_queries("creature. bowl. stone.") == ["creature", "bowl", "stone"]
    assert parse_queries("plush  bear, bowl ;shell") == ["plush bear", "bowl", "shell"]
    with pytest.raises(MaskError, match="no text query"):
        parse_queries(" . , ")


def test_from_text_plumbing(models):
    img = np.full((48, 80, 3), 120, np.uint8)
    got = from_text(img, ["creature", "bowl", "stone"], detector=models["gd"], segmenter=models["sam_full"],
                    device="cpu", hygiene=None)
    assert [c.name for c in got] == ["creature", "bowl", "stone"] and all(c.source == "text" for c in got)
    boxes = [c.box for c in got]
    assert len(set(boxes)) == 3  # one box per query, never shared
    for c in got:
        x0, y0, x1, y1 = c.box
        assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 48 and 0 < c.score <= 1
        assert (c.mask == box_region(c.box, (48, 80), 0.05)).all()  # full-mask SAM clipped to the box
    cleaned = from_text(img, "creature. bowl. stone.", detector=models["gd"], segmenter=models["sam_full"],
                        device="cpu")
    scene = to_scene(img, cleaned, policy="pad")
    assert [c.name for c in scene.concepts] == ["creature", "bowl", "stone"] and scene.size == 80


def test_from_text_nothing_found_is_a_clear_error(models):
    img = np.full((48, 80, 3), 120, np.uint8)
    with pytest.raises(MaskError) as e:
        from_text(img, "creature. bowl.", detector=models["gd"], segmenter=models["sam_full"], device="cpu",
                  box_threshold=1.0)
    msg, hint = e.value.message, e.value.hint
    assert "found no box for 'creature'" in msg and "'bowl'" in msg and "box threshold 1" in msg
    assert "--box-threshold" in hint and "--box" in hint and "other words" in hint
    with pytest.raises(MaskError, match="two concepts are named 'Bowl'"):
        from_text(img, "bowl. Bowl.", detector=models["gd"], segmenter=models["sam_full"], device="cpu")


# ------------------------------------------------------------------------------------------ scene folders


def test_save_masks_writes_a_loadable_scene_with_preview(tmp_path):
    img = np.zeros((40, 60, 3), np.uint8)
    cms = [ConceptMask("plush bear", rect(40, 60, 5, 5, 25, 30), 0.8, "box", (5, 5, 25, 30)),
           ConceptMask("bowl", rect(40, 60, 30, 10, 55, 35), None, "file")]
    out = save_masks(img, cms, tmp_path / "scene", background=True)
    assert Image.open(out.path / "img.png").size == (60, 40)  # the photo as it is, not cropped
    assert Image.open(out.preview).size == (60, 40)
    meta = json.loads((out.path / "scene.json").read_text())
    assert meta["background"] is True and [c["name"] for c in meta["concepts"]] == ["plush bear", "bowl"]
    assert meta["concepts"][0]["class_word"] == "bear"
    info = json.loads((out.path / "masks.json").read_text())
    assert info["concepts"][0]["score"] == 0.8 and info["concepts"][1]["source"] == "file"
    scene = load_scene(out.path, policy="pad")
    assert [c.name for c in scene.concepts] == ["plush bear", "bowl", "background"]
    assert scene.concepts[0].mask.sum() == 20 * 25
    with pytest.raises(MaskError, match="already holds a scene"):
        save_masks(img, cms, tmp_path / "scene")
    # a mask outside the centre square is named; with policy "pad" it is fine
    with pytest.raises(MaskError, match="concept 'left': the mask lies entirely outside the centre crop") as e:
        to_scene(img, [ConceptMask("left", rect(40, 60, 0, 0, 8, 40))])
    assert "--policy pad" in e.value.hint
    assert to_scene(img, [ConceptMask("left", rect(40, 60, 0, 0, 8, 40))], policy="pad").size == 60
    # a mask the loader would refuse is refused before anything is written
    with pytest.raises(SceneError):
        save_masks(img, [ConceptMask("dot", rect(40, 60, 0, 0, 1, 1))], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_make_masks_needs_exactly_one_source(tmp_path):
    with pytest.raises(MaskError, match="exactly one mask source"):
        make_masks(np.zeros((8, 8, 3), np.uint8), tmp_path / "s")
    with pytest.raises(MaskError, match="got text, boxes"):
        make_masks(np.zeros((8, 8, 3), np.uint8), tmp_path / "s", text="a", boxes=[(0, 0, 4, 4)])


# ------------------------------------------------------------------------------------------ command line


def _photo(path: Path) -> Path:
    img, _ = two_squares()
    Image.fromarray(img).save(path)
    return path


def test_cli_masks_from_boxes_then_extract(models, tiny_sd, tmp_path, capsys):
    photo = _photo(tmp_path / "photo.png")
    scene = tmp_path / "scene"
    # two_squares: red [16:40, 8:32], blue [24:56, 40:60]
    assert main(["masks", str(photo), "--box", "8,16,32,40", "--box", "40,24,60,56", "--names", "red, blue",
                 "--sam-model", models["sam_full"], "--device", "cpu", "--dilate", "1", "-o", str(scene)]) == 0
    out = capsys.readouterr().out
    assert "mask0.png  red" in out and "preview" in out
    loaded = load_scene(scene)
    assert [c.name for c in loaded.concepts] == ["red", "blue"]
    # boxes 24×24 and 20×32, each grown by 5 % (1.2 / 1 / 1.6 px), then by the 1-px dilation into free space
    red = loaded.concepts[0].mask
    assert red[15:41, 7:33].all() and red[14, 20] and red[20, 6] and not red[14, 6]  # Euclidean: no corners
    assert red.sum() == 26 * 26 + 4 * 26 and not red[:, 36:].any()
    bundle = tmp_path / "bundle"
    assert main(["extract", str(scene), "--model", str(tiny_sd), "-o", str(bundle), "--quiet", *FAST]) == 0
    man = json.loads((bundle / "manifest.json").read_text())
    assert [h["name"] for h in man["handles"]] == ["red", "blue"]


def test_cli_masks_text_not_found(models, tmp_path, capsys):
    photo = _photo(tmp_path / "photo.png")
    rc = main(["masks", str(photo), "--text", "creature. bowl.", "--box-threshold", "1.0", "--device", "cpu",
               "--detector-model", models["gd"], "--sam-model", models["sam_full"], "-o", str(tmp_path / "s")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "'creature'" in err and "hint:" in err and "--box-threshold" in err
    assert not (tmp_path / "s").exists()


def test_cli_extract_auto_masks(models, tiny_sd, tmp_path, capsys):
    photo = _photo(tmp_path / "photo.png")
    bundle = tmp_path / "bundle"
    args = ["extract", str(photo), "--auto-masks", "creature, bowl", "--model", str(tiny_sd), "--device", "cpu",
            "--sam-model", models["sam_full"], "--detector-model", models["gd"], "-o", str(bundle), "--quiet", *FAST]
    assert main(args) == 0
    scene_dir = tmp_path / "bundle-scene"
    meta = json.loads((scene_dir / "scene.json").read_text())
    assert [c["name"] for c in meta["concepts"]] == ["creature", "bowl"] and (scene_dir / "preview.png").is_file()
    man = json.loads((bundle / "manifest.json").read_text())
    assert [h["name"] for h in man["handles"]] == ["creature", "bowl"]
    capsys.readouterr()
    # an image without --auto-masks, and an existing bundle, are clear errors
    assert main(["extract", str(photo), "--model", str(tiny_sd), "-o", str(tmp_path / "b2"), "--quiet"]) == 2
    assert "--auto-masks" in capsys.readouterr().err
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ real photos

REAL = Path("/work/shared/scenes-real")


@pytest.mark.skipif(not REAL.is_dir(), reason="the shared real scenes are not here")
def test_real_scene_masks_through_files_and_preview(tmp_path):
    """The hand-drawn masks of a real scene pass the hygiene (which changes them only slightly) and
    round-trip through save_masks / load_scene."""
    folder = REAL / "creature"
    cms = from_files(folder, ["creature", "bowl", "stone"], image=folder / "img.jpg")
    raw = from_files(folder, ["creature", "bowl", "stone"], image=folder / "img.jpg", hygiene=None)
    for c, r in zip(cms, raw):
        changed = float((c.mask != r.mask).mean())
        assert changed < 0.01, (c.name, changed)
    out = save_masks(folder / "img.jpg", cms, tmp_path / "creature")
    scene = load_scene(out.path)
    assert [c.name for c in scene.concepts] == ["creature", "bowl", "stone"]
    assert Image.open(out.preview).size == (512, 512)


def test_mask_sources_register_themselves():
    from scenetok.masks import mask_sources
    from scenetok.masks.hygiene import Hygiene

    sources = mask_sources()
    assert {s.name: s.option for s in sources.values()} == {"text": "text", "box": "boxes", "points": "points",
                                                             "file": "files"}
    img = np.zeros((20, 20, 3), np.uint8)
    a = np.zeros((20, 20), bool)
    a[2:9, 3:12] = True
    concepts, info = sources["file"].make(img, [a], ["thing"], {"hygiene": Hygiene()})
    assert info == {"source": "file"} and [c.name for c in concepts] == ["thing"]
    assert int(concepts[0].mask.sum()) == 63
