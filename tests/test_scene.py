"""Scene loading: folder layout, mode conversion, square policy, mask reading, validation errors, round trip."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scenetok.errors import SceneError
from scenetok.scene import MAX_CONCEPTS, Concept, Scene, load_scene, save_scene

REAL_CREATURE = Path("/work/shared/scenes-real/creature")


# ------------------------------------------------------------------------------------------ helpers


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def write_scene(folder: Path, image=None, masks=(), meta=None, image_name="img.png", **save_kw) -> Path:
    """A scene folder: ``image`` (array or PIL) as ``image_name``, masks (arrays or PIL) as mask{i}.png."""
    folder.mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.full((32, 32, 3), 100, np.uint8)
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    im.save(folder / image_name, **save_kw)
    for i, m in enumerate(masks):
        mi = m if isinstance(m, Image.Image) else Image.fromarray(m.astype(np.uint8) * 255 if m.dtype == bool else m)
        mi.save(folder / f"mask{i}.png")
    if meta is not None:
        (folder / "scene.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return folder


def two_masks(s=32):
    return [box(s, s, 4, 14, 4, 14), box(s, s, 16, 28, 18, 30)]


def expect_error(fn, *parts, hint=None) -> SceneError:
    with pytest.raises(SceneError) as info:
        fn()
    err = info.value
    for p in parts:
        assert p in err.message, (p, err.message)
    assert err.hint, err.message
    if hint is not None:
        assert hint in err.hint, (hint, err.hint)
    return err


# ----------------------------------------------------------------------------------- basic loading


@pytest.mark.skipif(not REAL_CREATURE.is_dir(), reason="shared real scene not present")
def test_real_creature_scene():
    scene = load_scene(REAL_CREATURE)
    assert len(scene.concepts) == 3
    assert scene.size == 512 and scene.image.shape == (512, 512, 3) and scene.image.dtype == np.uint8
    assert scene.masks().shape == (3, 512, 512)
    assert all(c.mask.any() for c in scene.concepts)
    assert set(scene.input_hashes) == {"img.jpg", "mask0.png", "mask1.png", "mask2.png"}


def test_defaults_handles_and_hashes(tmp_path):
    folder = write_scene(tmp_path / "s", masks=two_masks())
    scene = load_scene(folder)
    assert [c.name for c in scene.concepts] == ["concept0", "concept1"]
    assert all(c.class_word == "object" and c.init_word == "object" and not c.is_background for c in scene.concepts)
    assert scene.handles == ["<asset0>", "<asset1>"]
    assert scene.source == str(folder)
    assert np.array_equal(scene.masks(), np.stack(two_masks()))
    assert scene.input_hashes == {n: hashlib.sha256((folder / n).read_bytes()).hexdigest()
                                  for n in ["img.png", "mask0.png", "mask1.png"]}


def test_scene_json_names_and_word_defaults(tmp_path):
    meta = {"concepts": [{"name": "Creature"}, {"name": "red bowl", "init_word": "bowl"},
                         {"name": "x", "class_word": "toy", "init_word": "teddy"}]}
    masks = two_masks() + [box(32, 32, 0, 3, 20, 32)]
    folder = write_scene(tmp_path / "s", masks=masks, meta=meta)
    scene = load_scene(folder)
    got = [(c.name, c.class_word, c.init_word) for c in scene.concepts]
    assert got == [("Creature", "creature", "creature"), ("red bowl", "object", "bowl"), ("x", "toy", "teddy")]
    assert "scene.json" in scene.input_hashes


def test_masks_optional_when_not_required(tmp_path):
    folder = write_scene(tmp_path / "s", masks=[])
    scene = load_scene(folder, require_masks=False, background=True)
    assert scene.concepts == [] and scene.masks().shape == (0, 32, 32) and scene.handles == []


# ----------------------------------------------------------------------------------- validation


def test_path_errors(tmp_path):
    expect_error(lambda: load_scene(tmp_path / "nope"), "nope", "does not exist")
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    expect_error(lambda: load_scene(f), "is a file", hint="folder")


def test_no_image(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    expect_error(lambda: load_scene(folder), "no image file", "empty")
    write_scene(folder, masks=two_masks(), image_name="photo.jpg")
    expect_error(lambda: load_scene(folder), "no image file", "photo.jpg", hint="img.jpg")


def test_several_images(tmp_path):
    folder = write_scene(tmp_path / "s", masks=two_masks())
    Image.new("RGB", (32, 32)).save(folder / "img.jpg")
    expect_error(lambda: load_scene(folder), "several image files", "img.jpg", "img.png", hint="exactly one")


def test_corrupt_image_and_mask(tmp_path):
    folder = write_scene(tmp_path / "s", masks=two_masks())
    good = (folder / "img.png").read_bytes()
    (folder / "img.png").write_bytes(good[:60])
    expect_error(lambda: load_scene(folder), "img.png", "cannot read the image")
    (folder / "img.png").write_bytes(good)
    (folder / "mask1.png").write_bytes(b"not a png at all")
    expect_error(lambda: load_scene(folder), "mask1.png", "cannot read the mask")


def test_no_masks_required(tmp_path):
    folder = write_scene(tmp_path / "s", masks=[])
    err = expect_error(lambda: load_scene(folder), "no mask files")
    assert "--auto-masks" in err.hint and "em-masks" in err.hint


def test_mask_numbering_gap_and_format(tmp_path):
    folder = write_scene(tmp_path / "s", masks=two_masks())
    (folder / "mask1.png").rename(folder / "mask2.png")
    expect_error(lambda: load_scene(folder), "gap", "mask1.png", hint="contiguously")
    (folder / "mask2.png").rename(folder / "mask1.jpg")
    expect_error(lambda: load_scene(folder), "must be PNG", "mask1.jpg")


def test_mask_count_differs_from_scene_json(tmp_path):
    folder = write_scene(tmp_path / "s", masks=two_masks(), meta={"concepts": [{"name": "a"}]})
    expect_error(lambda: load_scene(folder), "scene.json", "declares 1 concepts", "2 mask files")


def test_all_black_and_too_faint_masks(tmp_path):
    masks = two_masks()
    masks[1] = np.zeros((32, 32), bool)
    folder = write_scene(tmp_path / "a", masks=masks)
    expect_error(lambda: load_scene(folder), "mask1.png", "all black")
    faint = np.zeros((32, 32), np.uint8)
    faint[4:20, 4:20] = 100
    folder = write_scene(tmp_path / "b", masks=[faint])
    expect_error(lambda: load_scene(folder), "mask0.png", "half intensity")


def test_tiny_mask_reports_fraction(tmp_path):
    folder = write_scene(tmp_path / "s", masks=[box(32, 32, 0, 2, 0, 2)])  # 4 / 1024 = 0.39 %
    err = expect_error(lambda: load_scene(folder), "mask0.png", "0.391%", hint="dilate")
    assert "0.500%" in err.message
    assert len(load_scene(folder, min_mask_fraction=0.001).concepts) == 1


def test_mask_aspect_mismatch(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    folder = write_scene(tmp_path / "s", image=img, masks=[box(20, 30, 0, 10, 0, 10)])
    expect_error(lambda: load_scene(folder), "mask0.png", "30×20", "40×20", "aspect")


def test_too_many_concepts(tmp_path):
    masks = [box(32, 32, 0, 4, 4 * i, 4 * i + 4) for i in range(8)]
    folder = write_scene(tmp_path / "s", masks=masks)
    assert len(load_scene(folder).concepts) == 8
    err = expect_error(lambda: load_scene(folder, background=True), "9 concepts", "limit of 8")
    assert "4" in err.hint and "8" in err.hint
    expect_error(lambda: load_scene(folder, max_concepts=4), "limit of 4")
    expect_error(lambda: load_scene(folder, max_concepts=MAX_CONCEPTS + 1), "max_concepts")


def test_duplicate_names(tmp_path):
    folder = write_scene(tmp_path / "a", masks=two_masks(), meta={"concepts": [{"name": "bowl"}, {"name": "Bowl"}]})
    expect_error(lambda: load_scene(folder), "two concepts are named", "mask0.png", "mask1.png")
    folder = write_scene(tmp_path / "b", masks=two_masks(),
                         meta={"concepts": [{"name": "background"}, {"name": "cup"}]})
    assert load_scene(folder).concepts[0].name == "background"
    expect_error(lambda: load_scene(folder, background=True), "two concepts are named 'background'")


@pytest.mark.parametrize("name", ["", "   ", "<asset0>", "a>b"])
def test_bad_names(tmp_path, name):
    folder = write_scene(tmp_path / "s", masks=two_masks()[:1], meta={"concepts": [{"name": name}]})
    expect_error(lambda: load_scene(folder), "scene.json", "concept 0")


def test_scene_json_syntax_error_has_line_and_column(tmp_path):
    folder = write_scene(tmp_path / "s", masks=two_masks(), meta='{"concepts": [\n  {"name": "a"},,\n]}')
    expect_error(lambda: load_scene(folder), "scene.json", "invalid JSON", "line 2", "column")


def test_scene_json_unknown_keys(tmp_path):
    folder = write_scene(tmp_path / "a", masks=two_masks(), meta={"concepts": [{}, {}], "backgroud": True})
    expect_error(lambda: load_scene(folder), "scene.json", "'backgroud'", "did you mean 'background'",
                 hint="concepts, background")
    folder = write_scene(tmp_path / "b", masks=two_masks(), meta={"concepts": [{"name": "a", "word": "x"}, {}]})
    expect_error(lambda: load_scene(folder), "concepts[0]", "'word'", hint="name, class_word, init_word")


@pytest.mark.parametrize("meta, parts", [
    ([1, 2], ["top level", "a list"]),
    ({"concepts": {"name": "a"}}, ['"concepts" must be a list']),
    ({"concepts": ["a", "b"]}, ["concepts[0] must be an object"]),
    ({"concepts": [{"name": 3}, {}]}, ["concepts[0].name must be a string", "a number"]),
    ({"background": "yes"}, ['"background" must be true or false', "a string"]),
])
def test_scene_json_wrong_types(tmp_path, meta, parts):
    folder = write_scene(tmp_path / "s", masks=two_masks(), meta=meta)
    expect_error(lambda: load_scene(folder), "scene.json", *parts)


def test_bad_options(tmp_path):
    folder = write_scene(tmp_path / "s", masks=two_masks())
    expect_error(lambda: load_scene(folder, policy="stretch"), "policy", hint="crop")
    expect_error(lambda: load_scene(folder, min_mask_fraction=1.5), "min_mask_fraction")


# ----------------------------------------------------------------------------------- image modes


def load_image(tmp_path, im, name="img.png", **save_kw):
    w, h = im.size
    folder = write_scene(tmp_path / "s", image=im, masks=[box(h, w, 0, h, 0, w // 2)], image_name=name, **save_kw)
    return load_scene(folder, policy="pad").image


def test_rgba_is_composited_over_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :4] = (255, 0, 0, 128)   # half-transparent red
    a[:, 4:] = (0, 0, 255, 0)     # fully transparent
    img = load_image(tmp_path, Image.fromarray(a, "RGBA"))
    assert tuple(img[0, 0]) == (255, 127, 127)
    assert tuple(img[0, 7]) == (255, 255, 255)


def test_grey_and_la_modes(tmp_path):
    g = np.tile(np.array([0, 64, 200, 255], np.uint8), (4, 1))
    img = load_image(tmp_path / "l", Image.fromarray(g, "L"))
    assert np.array_equal(img[..., 0], g) and np.array_equal(img[..., 1], g) and np.array_equal(img[..., 2], g)
    la = np.stack([g, np.full_like(g, 0)], axis=2)
    la[:, :2, 1] = 255
    img = load_image(tmp_path / "la", Image.fromarray(la, "LA"))
    assert img[0, :, 0].tolist() == [0, 64, 255, 255]


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    for x in range(2):
        for y in range(4):
            p.putpixel((x, y), 0)
    p.info["transparency"] = 0
    img = load_image(tmp_path, p)
    assert tuple(img[0, 0]) == (255, 255, 255)  # transparent index over white
    assert tuple(img[0, 3]) == (10, 200, 30)


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    scene = Scene.from_arrays(cmyk, [box(8, 8, 0, 8, 0, 4)])
    assert tuple(scene.image[0, 0]) == (255, 0, 0)
    img = load_image(tmp_path, Image.new("CMYK", (16, 16), (0, 0, 255, 0)), name="img.jpg", quality=100)
    assert np.abs(img.astype(int) - (255, 255, 0)).max() <= 3  # yellow, through a CMYK JPEG


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257 * 10, 32896, 65535]], np.uint16).repeat(4, axis=0)
    im = Image.fromarray(v)
    assert im.mode.startswith("I;16")
    img = load_image(tmp_path, im)
    assert img[0, :, 0].tolist() == [0, 10, 128, 255]


def test_int32_and_float_modes():
    mask = [box(4, 4, 0, 4, 0, 2)]
    i16 = Image.fromarray(np.array([[0, 1000, 65535, 32896]] * 4, np.int32))
    assert i16.mode == "I"
    assert Scene.from_arrays(i16, mask).image[0, :, 0].tolist() == [0, 4, 255, 128]
    i8 = Image.fromarray(np.array([[0, 10, 255, 128]] * 4, np.int32))
    assert Scene.from_arrays(i8, mask).image[0, :, 0].tolist() == [0, 10, 255, 128]
    f = Image.fromarray(np.array([[0, 0.5, 1.0, 0.25]] * 4, np.float32))
    assert f.mode == "F"
    assert Scene.from_arrays(f, mask).image[0, :, 0].tolist() == [0, 128, 255, 64]


def test_array_inputs():
    mask = [box(4, 4, 0, 4, 0, 2)]
    u16 = np.full((4, 4, 3), 257 * 7, np.uint16)
    assert Scene.from_arrays(u16, mask).image.max() == 7
    fl = np.full((4, 4), 0.5)
    assert Scene.from_arrays(fl, mask).image[0, 0].tolist() == [128, 128, 128]
    rgba = np.zeros((4, 4, 4), np.uint8)
    assert Scene.from_arrays(rgba, mask).image[0, 0].tolist() == [255, 255, 255]
    expect_error(lambda: Scene.from_arrays(fl * 255, mask), "[0, 1]")
    expect_error(lambda: Scene.from_arrays(np.zeros((4, 4, 2), np.uint8), mask), "shape")


def test_exif_orientation_is_applied(tmp_path):
    raw = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide × 20 tall: left red, right blue
    raw[:, :20] = (255, 0, 0)
    raw[:, 20:] = (0, 0, 255)
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": displayed 20 wide × 40 tall, red on top
    folder = tmp_path / "s"
    mask = box(40, 20, 0, 20, 0, 20)  # drawn on the displayed image: the red (top) half
    write_scene(folder, image=im, masks=[mask], image_name="img.jpg", exif=exif.tobytes(), quality=95)
    scene = load_scene(folder, policy="pad")
    assert scene.size == 40
    img = scene.image.astype(int)
    assert np.abs(img[5, 20] - (255, 0, 0)).max() < 40   # top: red
    assert np.abs(img[35, 20] - (0, 0, 255)).max() < 40  # bottom: blue
    assert scene.concepts[0].mask[5, 20] and not scene.concepts[0].mask[35, 20]
    assert load_scene(folder, policy="crop").size == 20


# ------------------------------------------------------------------------------------ geometry


def test_crop_and_pad_geometry(tmp_path):
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :, 1] = np.arange(80, dtype=np.uint8)[None, :]  # green encodes the column
    img[:, :, 2] = np.arange(40, dtype=np.uint8)[:, None]  # blue encodes the row
    mask = box(40, 80, 10, 20, 50, 60)
    folder = write_scene(tmp_path / "s", image=img, masks=[mask])

    crop = load_scene(folder, policy="crop")
    assert crop.size == 40
    assert crop.image[0, 0, 1] == 20 and crop.image[0, 39, 1] == 59  # columns 20..59 kept
    assert np.array_equal(crop.concepts[0].mask, box(40, 40, 10, 20, 30, 40))

    pad = load_scene(folder, policy="pad")
    assert pad.size == 80
    assert np.array_equal(pad.concepts[0].mask, box(80, 80, 30, 40, 50, 60))
    assert np.array_equal(pad.image[20:60], img)
    assert np.array_equal(pad.image[0], img[0]) and np.array_equal(pad.image[79], img[39])  # edge replicated


def test_mask_outside_centre_crop(tmp_path):
    folder = write_scene(tmp_path / "s", image=np.zeros((20, 60, 3), np.uint8), masks=[box(20, 60, 0, 20, 0, 15)])
    expect_error(lambda: load_scene(folder), "mask0.png", "outside the centre crop", hint="pad")
    assert load_scene(folder, policy="pad").concepts[0].mask.sum() == 20 * 15


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_smaller_and_larger_masks_are_resized(tmp_path, factor):
    h, w = 20, 40
    mh, mw = int(h * factor), int(w * factor)
    small = box(mh, mw, 0, mh // 2, 0, mw // 4)  # the top-left quarter-width, half-height block
    folder = write_scene(tmp_path / "s", image=np.zeros((h, w, 3), np.uint8), masks=[small])
    scene = load_scene(folder, policy="pad")
    assert np.array_equal(scene.concepts[0].mask, box(40, 40, 10, 20, 0, 10))


def test_mask_aspect_within_tolerance(tmp_path):
    folder = write_scene(tmp_path / "s", image=np.zeros((200, 300, 3), np.uint8), masks=[box(200, 301, 0, 200, 0, 150)])
    m = load_scene(folder).concepts[0].mask
    assert m.shape == (200, 200) and m[:, :99].all() and not m[:, 102:].any()


# ------------------------------------------------------------------------------------ mask reading


def test_alpha_mask_wins_when_alpha_varies(tmp_path):
    rgba = np.full((32, 32, 4), 255, np.uint8)  # white colour everywhere
    rgba[..., 3] = 0
    rgba[4:14, 4:14, 3] = 255
    folder = write_scene(tmp_path / "a", masks=[Image.fromarray(rgba, "RGBA")])
    assert np.array_equal(load_scene(folder).concepts[0].mask, box(32, 32, 4, 14, 4, 14))


def test_brightness_mask_when_alpha_constant(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[4:14, 4:14, :3] = 255
    rgba[20:30, 20:30, 0] = 255  # a red stroke on black also counts
    folder = write_scene(tmp_path / "a", masks=[Image.fromarray(rgba, "RGBA")])
    mask = load_scene(folder).concepts[0].mask
    assert np.array_equal(mask, box(32, 32, 4, 14, 4, 14) | box(32, 32, 20, 30, 20, 30))


def test_soft_edges_threshold_at_half(tmp_path):
    soft = np.zeros((32, 32), np.uint8)
    soft[:, 8:16] = 128
    soft[:, 16:24] = 127
    soft[:, 24:] = 255
    folder = write_scene(tmp_path / "a", masks=[soft])
    m = load_scene(folder).concepts[0].mask
    assert m[:, 8:16].all() and not m[:, 16:24].any() and m[:, 24:].all() and not m[:, :8].any()
    soft16 = np.zeros((32, 32), np.uint16)
    soft16[:, :8] = 32768
    soft16[:, 8:16] = 32767
    folder = write_scene(tmp_path / "b", masks=[Image.fromarray(soft16)])
    m = load_scene(folder).concepts[0].mask
    assert m[:, :8].all() and not m[:, 8:].any()


def test_zero_one_masks_are_binary(tmp_path):
    folder = write_scene(tmp_path / "a", masks=[box(32, 32, 4, 14, 4, 14).astype(np.uint8)])  # values 0/1
    assert load_scene(folder).concepts[0].mask.sum() == 100
    scene = Scene.from_arrays(np.zeros((32, 32, 3), np.uint8), [box(32, 32, 0, 8, 0, 8).astype(np.int64)])
    assert scene.concepts[0].mask.sum() == 64


# ------------------------------------------------------------------------------------ background


def test_background_is_the_complement(tmp_path):
    folder = write_scene(tmp_path / "s", masks=two_masks(), meta={"concepts": [{}, {}], "background": True})
    scene = load_scene(folder)
    bg = scene.concepts[-1]
    assert len(scene.concepts) == 3 and bg.is_background
    assert (bg.name, bg.class_word, bg.init_word) == ("background", "background", "background")
    assert np.array_equal(bg.mask, ~(two_masks()[0] | two_masks()[1]))
    assert scene.handles[-1] == "<asset2>"
    assert len(load_scene(folder, background=False).concepts) == 2  # the argument overrides scene.json


def test_background_too_small(tmp_path):
    folder = write_scene(tmp_path / "s", masks=[box(32, 32, 0, 32, 0, 32)])
    expect_error(lambda: load_scene(folder, background=True), "background", "0.000%", hint="background")


# ------------------------------------------------------------------------------------ from_arrays


def test_from_arrays_validation():
    img = np.zeros((32, 32, 3), np.uint8)
    masks = two_masks()
    expect_error(lambda: Scene.from_arrays(img, masks, names=["a"]), "1 names for 2 masks")
    expect_error(lambda: Scene.from_arrays(img, masks, names=["a", "A"]), "two concepts are named")
    expect_error(lambda: Scene.from_arrays(img, [masks[0], np.zeros((32, 32), bool)]), "mask 1 (array)", "all black")
    expect_error(lambda: Scene.from_arrays(img, [box(32, 16, 0, 8, 0, 8)]), "mask 0 (array)", "16×32", "32×32")
    expect_error(lambda: Scene.from_arrays(img, [box(32, 32, 0, 32, 0, 4)] * 9), "limit of 8")
    expect_error(lambda: Scene.from_arrays(img, masks, names=["ok", "<x>"]), "'<' or '>'")


def test_from_arrays_inputs_and_defaults():
    img = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    stacked = np.stack(two_masks()).astype(np.float32)
    scene = Scene.from_arrays(img, stacked, names=["creature", None], class_words=[None, "cup"], background=True)
    assert [(c.name, c.class_word, c.init_word) for c in scene.concepts] == [
        ("creature", "creature", "creature"), ("concept1", "cup", "cup"), ("background", "background", "background")]
    assert scene.source == "<arrays>" and scene.input_hashes == {}
    pil_mask = Image.fromarray(two_masks()[0].astype(np.uint8) * 255)
    assert np.array_equal(Scene.from_arrays(img, [pil_mask]).concepts[0].mask, two_masks()[0])


def test_scene_constructor_checks_shapes():
    with pytest.raises(SceneError):
        Scene(image=np.zeros((4, 5, 3), np.uint8), concepts=[])
    with pytest.raises(SceneError):
        Scene(image=np.zeros((4, 4, 3), np.uint8), concepts=[Concept("a", np.zeros((3, 3), bool), "a", "a")])


# ------------------------------------------------------------------------------------ resized


def test_resized_shapes_and_mask_threshold():
    img = np.zeros((64, 64, 3), np.uint8)
    img[...] = (10, 200, 30)
    half = np.zeros((64, 64), bool)
    half[0:2, 0:2] = [[True, True], [False, False]]   # 2 of 4 → kept
    half[0:2, 2:4] = [[True, False], [False, False]]  # 1 of 4 → dropped
    half[10:20, 10:20] = True
    line = np.zeros((64, 64), bool)
    line[:, 40] = True                                # 1 px wide: 1/4 coverage at 16 px, kept by the fallback
    scene = Scene.from_arrays(img, [half, line], min_mask_fraction=0.0)
    r = scene.resized(32)
    assert r.size == 32 and r.image.shape == (32, 32, 3) and r.masks().shape == (2, 32, 32)
    assert np.abs(r.image.astype(int) - (10, 200, 30)).max() <= 1
    m = r.concepts[0].mask
    assert m[0, 0] and not m[0, 1] and m[5:10, 5:10].all() and m.sum() == 26
    assert r.resized(16).concepts[1].mask.any()
    assert r.handles == scene.handles and r.source == scene.source
    up = scene.resized(128)
    assert up.masks().shape == (2, 128, 128) and up.concepts[0].mask[20:40, 20:40].all()
    same = scene.resized(64)
    assert np.array_equal(same.masks(), scene.masks()) and same.image is not scene.image
    expect_error(lambda: scene.resized(0), "resolution")


# ------------------------------------------------------------------------------------ round trip


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    scene = Scene.from_arrays(img, two_masks(), names=["red cup", "Dog"], init_words=["cup", None], background=True)
    out = save_scene(scene, tmp_path / "saved")
    assert out == tmp_path / "saved"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert Image.open(out / "mask0.png").mode == "L"
    back = load_scene(out)
    assert np.array_equal(back.image, scene.image)
    assert np.array_equal(back.masks(), scene.masks())
    strip = lambda s: [(c.name, c.class_word, c.init_word, c.is_background) for c in s.concepts]  # noqa: E731
    assert strip(back) == strip(scene)


def test_save_replaces_a_previous_scene(tmp_path):
    folder = write_scene(tmp_path / "s", masks=two_masks() + [box(32, 32, 0, 4, 28, 32)], image_name="img.jpg")
    scene = Scene.from_arrays(np.zeros((32, 32, 3), np.uint8), two_masks()[:1], names=["one"])
    save_scene(scene, folder)
    back = load_scene(folder)
    assert [c.name for c in back.concepts] == ["one"] and set(back.input_hashes) == {"img.png", "mask0.png",
                                                                                     "scene.json"}
