"""The command line: help, errors as one line with exit status 2, and the extract → generate → info path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from scenetok.cli import main
from conftest import write_scene_folder

FAST = ["--set", "phase1.steps=2", "--set", "phase2.steps=1", "--set", "preview_every=100"]


def _scene_dir(path, n_masks=2, scene_json=None):
    write_scene_folder(path, n_masks=n_masks)
    if scene_json is not None:
        (path / "scene.json").write_text(json.dumps(scene_json))
    return path


def _err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_help_lists_commands_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["extract", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ["--method", "--model", "--set", "--config", "--resume", "--overwrite", "--background", "default:"]:
        assert opt in out


def test_benchmark_help_states_the_toy_step_count(capsys):
    from scenetok.toyworld.settings import TOY_STEPS

    with pytest.raises(SystemExit):
        main(["benchmark", "toyworld", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"TOY_STEPS, {TOY_STEPS})" in out  # the help must not go stale when the toy settings change


def test_extract_generate_info(tiny_sd, tmp_path, capsys):
    scene = _scene_dir(tmp_path / "scene")
    out = tmp_path / "bundle"
    assert main(["extract", str(scene), "--model", str(tiny_sd), "-o", str(out), "--quiet", *FAST]) == 0
    assert (out / "manifest.json").is_file()
    imgs = tmp_path / "imgs"
    assert main(["generate", str(out), "a photo of <asset0> and <asset1> in the snow", "-n", "2", "--seed", "0",
                 "--steps", "2", "-o", str(imgs), "--quiet"]) == 0
    assert len(list(imgs.glob("*_seed*.png"))) >= 2
    rows = [json.loads(x) for x in (imgs / "prompts.jsonl").read_text().splitlines()]
    assert {r["scheduler"] for r in rows} == {"DPMSolverMultistepScheduler"}  # the default sampler
    # --sampler ddim: recorded per image, appended after the first images
    assert main(["generate", str(out), "a photo of <asset0>", "-n", "1", "--steps", "3", "--sampler", "ddim",
                 "-o", str(imgs), "--quiet"]) == 0
    rows = [json.loads(x) for x in (imgs / "prompts.jsonl").read_text().splitlines()]
    assert rows[-1]["scheduler"] == "DDIMScheduler" and rows[-1]["file"].startswith("02_")
    with pytest.raises(SystemExit):
        main(["generate", str(out), "a photo of <asset0>", "--sampler", "nope", "-o", str(imgs)])
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "<asset0>" in info and "break-a-scene" in info
    # an existing bundle is not silently replaced
    assert main(["extract", str(scene), "--model", str(tiny_sd), "-o", str(out), "--quiet", *FAST]) == 2
    assert "--overwrite" in _err(capsys)


def test_unknown_handle_in_prompt(tiny_sd, tmp_path, capsys):
    scene = _scene_dir(tmp_path / "scene")
    out = tmp_path / "bundle"
    main(["extract", str(scene), "--model", str(tiny_sd), "-o", str(out), "--quiet", *FAST])
    capsys.readouterr()
    assert main(["generate", str(out), "a photo of <asset7>", "-o", str(tmp_path / "i")]) == 2
    err = _err(capsys)
    assert "<asset7>" in err and "<asset0>" in err and "<asset1>" in err


def test_newer_manifest_refused(tiny_sd, tmp_path, capsys):
    scene = _scene_dir(tmp_path / "scene")
    out = tmp_path / "bundle"
    main(["extract", str(scene), "--model", str(tiny_sd), "-o", str(out), "--quiet", *FAST])
    man = json.loads((out / "manifest.json").read_text())
    man["manifest_version"] = 999
    (out / "manifest.json").write_text(json.dumps(man))
    capsys.readouterr()
    assert main(["info", str(out)]) == 2
    assert "newer" in _err(capsys)


@pytest.mark.parametrize(
    "case",
    ["missing_image", "no_masks", "count_mismatch", "unknown_method", "not_a_bundle", "bad_set", "missing_scene"],
)
def test_bad_input_one_line_error(tiny_sd, tmp_path, capsys, case):
    scene = tmp_path / "scene"
    args = ["--model", str(tiny_sd), "-o", str(tmp_path / "out"), "--quiet", *FAST]
    if case == "missing_image":
        _scene_dir(scene)
        (scene / "img.png").unlink()
    elif case == "no_masks":
        _scene_dir(scene, n_masks=0)
    elif case == "count_mismatch":
        _scene_dir(scene, scene_json={"concepts": [{"name": "a"}, {"name": "b"}, {"name": "c"}]})
    elif case == "unknown_method":
        _scene_dir(scene)
        args += ["--method", "nope"]
    elif case == "not_a_bundle":
        _scene_dir(scene)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("mine")
    elif case == "bad_set":
        _scene_dir(scene)
        args += ["--set", "phase1.stepz=2"]
    assert main(["extract", str(scene), *args]) == 2
    err = _err(capsys)
    assert err.startswith("error: ")
    if case == "not_a_bundle":
        assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_extract_without_model_says_it_uses_the_shipped_toy_model(tmp_path, capsys):
    from scenetok.toyworld import world
    from scenetok.toyworld.model import toy_sd_path

    if not (toy_sd_path() / "model_index.json").is_file():
        pytest.skip("toy-sd not shipped")
    spec = world.SceneSpec((world.ObjectSpec("circle", "red", "plain", 0.3, 0.3, 0.35),
                            world.ObjectSpec("square", "blue", "plain", 0.7, 0.7, 0.3)), "gray")
    img, masks = world.render(spec, size=64)
    scene = tmp_path / "scene"
    scene.mkdir()
    Image.fromarray(img).save(scene / "img.png")
    for i, m in enumerate(masks):
        Image.fromarray((m * 255).astype(np.uint8)).save(scene / f"mask{i}.png")
    assert main(["extract", str(scene), "-o", str(tmp_path / "b"), "--set", "phase1.steps=1", "--set",
                 "phase2.steps=0", "--set", "preview_every=0", "--set", "checkpoint_every=0"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "shipped toy model" in ln]
    assert len(lines) == 1 and "--model" in lines[0]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "toy-sd" in json.dumps(manifest)
