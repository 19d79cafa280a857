"""Bad and hostile inputs (issue 11): each is refused in one line that names the problem, with exit status 2
on the command line (or the project's own exception through the API), and changes nothing on disk.

Every case fails before any training and, except where a case says ``loads=True``, before any model
weights are loaded (a guard makes training and ``UNet2DConditionModel.from_pretrained`` fail the test).
The input and output folders are hashed before and after each case and must be byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import two_squares, write_scene_folder
from scenetok import api
from scenetok.bundle import verify_bundle
from scenetok.cli import main
from scenetok.errors import BundleError, ConfigError, ModelLoadError, PromptError, SceneError, ScenetokWarning
from scenetok.scene import Scene, load_scene

HUGE = "x" * 1_000_000  # the 10 MB concept name, at 1 MB (the same path, faster)
LONG_PROMPT = " ".join(["a photo"] * 50)  # ~100 tokens, few characters
MAX_MESSAGE = 1500  # a refusal is one short line (plus a hint), never the bad value printed back


# --------------------------------------------------------------------------------------------- fixtures


@dataclass
class World:
    root: Path  # everything below is shared by all cases and must never change
    sd: Path
    scene: Path
    bundle: Path
    photo: Path

    def scene_copy(self, dst: Path, *, drop=(), scene_json=None) -> Path:
        shutil.copytree(self.scene, dst)
        for name in drop:
            (dst / name).unlink()
        if scene_json is not None:
            (dst / "scene.json").write_text(scene_json if isinstance(scene_json, str) else json.dumps(scene_json))
        return dst

    def bundle_copy(self, dst: Path) -> Path:
        shutil.copytree(self.bundle, dst)
        return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd):
    from diffusers import UNet2DConditionModel

    from scenetok.bundle import BundleContent, HandleInfo, write_bundle

    root = tmp_path_factory.mktemp("bad-inputs")
    scene = write_scene_folder(root / "scene")
    img, _ = two_squares()
    photo = root / "photo.png"
    Image.fromarray(img).save(photo)
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd / "unet"))
    g = torch.Generator().manual_seed(1)
    handles = [HandleInfo("<asset0>", "red", "square", "square"), HandleInfo("<asset1>", "blue", "square", "square")]
    bundle = write_bundle(root / "bundle", BundleContent(
        method="break-a-scene", base_model=str(tiny_sd), handles=handles,
        embeddings={h.token: torch.randn(32, generator=g) for h in handles}, components={"unet": unet},
        config={}, resolution=32, input_hashes={},
    )).path
    return World(root=root, sd=Path(tiny_sd), scene=scene, bundle=bundle, photo=photo)


def _guard(monkeypatch):
    """Make training and weight loading fail the test: every case must be refused before them."""
    from diffusers import UNet2DConditionModel

    def no_training(*a, **k):
        raise AssertionError("training started for a bad input")

    def no_loading(cls, *a, **k):
        raise AssertionError("model weights loaded for a bad input")

    monkeypatch.setattr(api, "_train", no_training)
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(no_loading))


def tree_hash(root: Path) -> str:
    """Hash of a folder tree: names, kinds, file contents and link targets (links are not followed)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode())
            if p.is_symlink():
                h.update(b"L" + os.readlink(p).encode())
            elif p.is_file():
                h.update(b"F" + hashlib.sha256(p.read_bytes()).digest())
            else:
                h.update(b"D")
    return h.hexdigest()


def _cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own usage errors
        return int(e.code)


_IMMUTABLE: list[Path] = []


def _immutable(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    _IMMUTABLE.append(path)
    return path


def _read_only_dir() -> Path:
    from scenetok.io import unwritable_reason

    if unwritable_reason("/sys") is None:
        pytest.skip("no read-only mount (/sys) here")
    return Path("/sys/scenetok-bad-input-test/out")


def _truncate(f: Path, keep: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def _pickle_only(folder: Path, stem: str) -> None:
    """Replace a component's safetensors by a pickle file (never unpickled: its content does not matter)."""
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save({"weight": torch.zeros(2)}, folder / f"{stem}.bin")


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    id: str
    make: Callable  # (world, tmp) -> argv (CLI) or a zero-argument callable (API)
    needles: tuple[str, ...]  # what the message must say (case-insensitive)
    error: type = None  # API cases: the exception type
    loads: bool = False  # the case may load model weights (it fails after loading the base model)


def _x(w: World, t: Path, scene: Path | None = None, *extra: str) -> list[str]:
    return ["extract", str(scene or w.scene), "-o", str(t / "out"), "--model", str(w.sd), "--quiet", *extra]


def _g(w: World, t: Path, prompt: str = "a photo of <asset0>", *extra: str, bundle: Path | None = None) -> list[str]:
    return ["generate", str(bundle or w.bundle), prompt, "-o", str(t / "imgs"), "--quiet", *extra]


def _symlink_loop(t: Path, name: str = "loop") -> Path:
    a, b = t / f"{name}-a", t / f"{name}-b"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def _scene_with_dir(w, t, name):
    s = w.scene_copy(t / "s", drop=[name] if (w.scene / name).exists() else [])
    (s / name).mkdir()
    return s


def _scene_with_loop_mask(w, t):
    s = w.scene_copy(t / "s", drop=["mask0.png"])
    (s / "mask0.png").symlink_to(s / "mask0.png")
    return s


def _scene_with_bytes(w, t, name, data=b"not an image at all"):
    s = w.scene_copy(t / "s")
    (s / name).write_bytes(data)
    return s


def _scene_masks(w, t, masks: dict[str, np.ndarray], drop=("mask0.png", "mask1.png")):
    s = w.scene_copy(t / "s", drop=drop)
    for name, m in masks.items():
        Image.fromarray(m).save(s / name)
    return s


_, _M = two_squares()
_ON = [(m * 255).astype(np.uint8) for m in _M]


def _nine_masks(w, t):
    s = w.scene_copy(t / "s", drop=["mask0.png", "mask1.png"])
    for i in range(9):
        m = np.zeros((64, 64), np.uint8)
        m[i * 7 : i * 7 + 6, :] = 255
        Image.fromarray(m).save(s / f"mask{i}.png")
    return s


def _base_copy(w, t, spoil) -> Path:
    sd = t / "sd"
    shutil.copytree(w.sd, sd)
    spoil(sd)
    return sd


def _bundle_spoiled(w, t, spoil) -> Path:
    b = w.bundle_copy(t / "b")
    spoil(b)
    return b


def _unet_file(b: Path) -> Path:
    return b / "weights" / "unet" / "diffusion_pytorch_model.safetensors"


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _seven_d_embedding(b: Path) -> None:
    """Replace <asset0>'s vector by a 7-d one and update the manifest's index, as if written that way."""
    from safetensors.torch import save_file

    from scenetok.io import sha256_file

    man = json.loads((b / "manifest.json").read_text())
    rel = next(h["file"] for h in man["handles"] if h["token"] == "<asset0>")
    save_file({"<asset0>": torch.zeros(7)}, str(b / rel))
    man["files"][rel] = {"bytes": (b / rel).stat().st_size, "sha256": sha256_file(b / rel)}
    (b / "manifest.json").write_text(json.dumps(man))


def _file(t: Path, name: str = "a-file") -> Path:
    f = t / name
    f.write_text("not a folder\n")
    return f


def _full_cfg_train(w, t):
    return lambda: api.train(w.scene, t / "out", model=str(w.sd), cfg={"phase1": {"lr": float("nan")}})


CASES = [
    # --- scene folders (extract) ---------------------------------------------------------------------
    Case("scene-missing", lambda w, t: _x(w, t, t / "nope"), ("does not exist",)),
    Case("scene-is-a-file", lambda w, t: _x(w, t, _file(t)), ("is a file", "not a scene folder")),
    Case("scene-symlink-loop", lambda w, t: _x(w, t, _symlink_loop(t)), ("symlink loop",)),
    Case("scene-broken-link", lambda w, t: (t.joinpath("dangling").symlink_to(t / "gone"), _x(w, t, t / "dangling"))[1],
         ("broken symbolic link",)),
    Case("mask0-is-a-directory", lambda w, t: _x(w, t, _scene_with_dir(w, t, "mask0.png")), ("mask0.png", "is a directory")),
    Case("img-is-a-directory", lambda w, t: _x(w, t, _scene_with_dir(w, t, "img.png")), ("img.png", "is a directory")),
    Case("mask-symlink-loop", lambda w, t: _x(w, t, _scene_with_loop_mask(w, t)), ("mask0.png", "symlink loop")),
    Case("image-damaged", lambda w, t: _x(w, t, _scene_with_bytes(w, t, "img.png")), ("img.png", "cannot read the image")),
    Case("image-empty-file", lambda w, t: _x(w, t, _scene_with_bytes(w, t, "img.png", b"")), ("img.png", "cannot read")),
    Case("mask-damaged", lambda w, t: _x(w, t, _scene_with_bytes(w, t, "mask1.png", b"\x89PNG garbage")),
         ("mask1.png", "cannot read the mask")),
    Case("no-masks", lambda w, t: _x(w, t, w.scene_copy(t / "s", drop=["mask0.png", "mask1.png"])), ("no mask files",)),
    Case("mask-gap", lambda w, t: _x(w, t, _scene_masks(w, t, {"mask0.png": _ON[0], "mask2.png": _ON[1]})),
         ("gap", "mask1.png")),
    Case("mask-all-black", lambda w, t: _x(w, t, _scene_masks(w, t, {"mask0.png": np.zeros((64, 64), np.uint8)})),
         ("all black",)),
    Case("mask-jpeg", lambda w, t: _x(w, t, _scene_with_bytes(w, t, "mask2.jpg", b"jpeg")), ("must be png",)),
    Case("mask-other-aspect", lambda w, t: _x(w, t, _scene_masks(w, t, {"mask0.png": np.full((64, 32), 255, np.uint8)})),
         ("aspect ratio",)),
    Case("too-many-masks", lambda w, t: _x(w, t, _nine_masks(w, t)), ("more than the limit",)),
    Case("scene-json-invalid", lambda w, t: _x(w, t, w.scene_copy(t / "s", scene_json="{oops")), ("invalid json",)),
    Case("scene-json-unknown-key", lambda w, t: _x(w, t, w.scene_copy(t / "s", scene_json={"concept": []})),
         ("unknown key", "concepts")),
    Case("concept-name-1MB", lambda w, t: _x(w, t, w.scene_copy(t / "s", scene_json={"concepts": [{"name": HUGE}, {}]})),
         ("the name", "longer than 64 characters")),
    Case("class-word-too-long", lambda w, t: _x(w, t, w.scene_copy(
        t / "s", scene_json={"concepts": [{"name": "a", "class_word": "w" * 65}, {"name": "b"}]})),
        ("class_word", "longer than 64")),
    Case("init-word-angle-brackets", lambda w, t: _x(w, t, w.scene_copy(
        t / "s", scene_json={"concepts": [{"name": "a", "init_word": "<asset1>"}, {"name": "b"}]})),
        ("init_word", "'<' or '>'")),
    Case("concept-name-not-text", lambda w, t: _x(w, t, w.scene_copy(
        t / "s", scene_json={"concepts": [{"name": 7}, {"name": "b"}]})), ("must be a string",)),
    Case("two-concepts-one-name", lambda w, t: _x(w, t, w.scene_copy(
        t / "s", scene_json={"concepts": [{"name": "cat"}, {"name": "Cat"}]})), ("two concepts are named",)),
    Case("concepts-1MB-name", lambda w, t: _x(w, t, w.scene, "--method", "disendiff", "--concepts", HUGE),
         ("longer than 64 characters",)),
    # --- extract options and settings -----------------------------------------------------------------
    Case("output-is-a-file", lambda w, t: ["extract", str(w.scene), "-o", str(_file(t)), "--model", str(w.sd)],
         ("is a file",)),
    Case("output-read-only", lambda w, t: ["extract", str(w.scene), "-o", str(_read_only_dir()), "--model", str(w.sd)],
         ("cannot write",)),
    Case("output-immutable", lambda w, t: ["extract", str(w.scene), "-o", str(_immutable(t / "frozen")),
                                           "--model", str(w.sd)], ("cannot write", "frozen")),
    Case("output-foreign-folder", lambda w, t: (_file(t / "mine" if t.joinpath("mine").mkdir() is None else t),
                                                ["extract", str(w.scene), "-o", str(t / "mine"), "--model", str(w.sd)])[1],
         ("not empty",)),
    Case("lr-nan", lambda w, t: _x(w, t, None, "--set", "phase1.lr=nan"), ("phase1.lr", "finite")),
    Case("lr-inf", lambda w, t: _x(w, t, None, "--set", "phase1.lr=inf"), ("phase1.lr", "finite")),
    Case("lr-yaml-inf", lambda w, t: _x(w, t, None, "--set", "phase2.lr=.inf"), ("phase2.lr", "finite")),
    Case("lr-zero", lambda w, t: _x(w, t, None, "--set", "phase1.lr=0"), ("phase1.lr", "> 0")),
    Case("lr-negative", lambda w, t: _x(w, t, None, "--set", "phase1.lr=-1e-4"), ("phase1.lr", "> 0")),
    Case("weight-nan", lambda w, t: _x(w, t, None, "--set", "prior.weight=nan"), ("prior.weight", "finite")),
    Case("weight-minus-inf", lambda w, t: _x(w, t, None, "--set", "attn.weight=-inf"), ("attn.weight", "finite")),
    Case("guidance-setting-inf", lambda w, t: _x(w, t, None, "--set", "prior.guidance=inf"), ("prior.guidance", "finite")),
    Case("steps-fraction", lambda w, t: _x(w, t, None, "--set", "phase1.steps=1.5"), ("phase1.steps", "integer")),
    Case("steps-negative", lambda w, t: _x(w, t, None, "--set", "phase1.steps=-3"), ("phase1.steps", ">= 0")),
    Case("steps-word", lambda w, t: _x(w, t, None, "--set", "phase1.steps=many"), ("phase1.steps", "number")),
    Case("unknown-setting", lambda w, t: _x(w, t, None, "--set", "phase1.stepz=3"), ("unknown setting", "phase1.stepz")),
    Case("set-without-equals", lambda w, t: _x(w, t, None, "--set", "phase1.steps"), ("key=value",)),
    Case("set-1MB-key", lambda w, t: _x(w, t, None, "--set", HUGE + "=1"), ("unknown setting",)),
    Case("config-missing", lambda w, t: _x(w, t, None, "--config", str(t / "nope.yaml")), ("does not exist",)),
    Case("config-bad-yaml", lambda w, t: (t.joinpath("c.yaml").write_text("phase1: [unclosed\n"),
                                          _x(w, t, None, "--config", str(t / "c.yaml")))[1], ("not valid yaml", "line 2")),
    Case("config-nan-lr", lambda w, t: (t.joinpath("c.yaml").write_text("phase1:\n  lr: .nan\n"),
                                        _x(w, t, None, "--config", str(t / "c.yaml")))[1], ("phase1.lr", "finite")),
    Case("config-a-list", lambda w, t: (t.joinpath("c.json").write_text("[1, 2]"),
                                        _x(w, t, None, "--config", str(t / "c.json")))[1], ("mapping",)),
    Case("unknown-method", lambda w, t: _x(w, t, None, "--method", "break-a-sceen"), ("break-a-sceen",)),
    Case("rank-zero", lambda w, t: _x(w, t, None, "--adapter", "lora", "--rank", "0"), ("--rank", "positive")),
    Case("base-model-pickle-only", lambda w, t: ["extract", str(w.scene), "-o", str(t / "out"), "--model",
                                                 str(_base_copy(w, t, lambda sd: _pickle_only(sd / "unet", "diffusion_pytorch_model")))],
         ("pickle", "diffusion_pytorch_model.bin", "never unpickles")),
    Case("base-model-truncated-unet", lambda w, t: ["extract", str(w.scene), "-o", str(t / "out"), "--model", str(
        _base_copy(w, t, lambda sd: _truncate(sd / "unet" / "diffusion_pytorch_model.safetensors")))],
        ("diffusion_pytorch_model.safetensors", "truncated")),
    # --- generate ---------------------------------------------------------------------------------------
    Case("bundle-missing", lambda w, t: _g(w, t, bundle=t / "nope"), ("does not exist",)),
    Case("bundle-not-a-bundle", lambda w, t: _g(w, t, bundle=w.scene), ("manifest.json is missing",)),
    Case("prompt-empty", lambda w, t: _g(w, t, ""), ("prompt is empty",)),
    Case("prompt-blank", lambda w, t: _g(w, t, "   \n"), ("prompt is empty",)),
    Case("prompt-10k-characters", lambda w, t: _g(w, t, "a" * 10_000), ("10000 characters", "limited to")),
    Case("prompt-1MB", lambda w, t: _g(w, t, HUGE), ("1000000 characters",)),
    Case("prompt-too-many-tokens", lambda w, t: _g(w, t, LONG_PROMPT), ("tokens long", "limit of 77")),
    Case("handle-past-token-limit", lambda w, t: _g(w, t, LONG_PROMPT + " <asset1>"), ("<asset1>", "cut off", "77")),
    Case("negative-too-long", lambda w, t: _g(w, t, "a photo of <asset0>", "--negative", LONG_PROMPT),
         ("negative prompt", "tokens long")),
    Case("unknown-handle", lambda w, t: _g(w, t, "a photo of <asset7>"), ("<asset7>", "<asset0>")),
    Case("guidance-nan", lambda w, t: _g(w, t, "a photo of <asset0>", "--guidance", "nan"), ("guidance", "finite")),
    Case("guidance-inf", lambda w, t: _g(w, t, "a photo of <asset0>", "--guidance", "inf"), ("guidance", "finite")),
    Case("guidance-word", lambda w, t: _g(w, t, "a photo of <asset0>", "--guidance", "lots"), ("--guidance",)),
    Case("n-zero", lambda w, t: _g(w, t, "a photo of <asset0>", "-n", "0"), ("-n must be at least 1",)),
    Case("steps-zero", lambda w, t: _g(w, t, "a photo of <asset0>", "--steps", "0"), ("steps must be at least 1",)),
    Case("size-not-multiple-of-8", lambda w, t: _g(w, t, "a photo of <asset0>", "--size", "30"), ("multiple of 8",)),
    Case("excite-negative", lambda w, t: _g(w, t, "a photo of <asset0>", "--excite", "-5"), ("excite", ">= 0")),
    Case("excite-steps-zero", lambda w, t: _g(w, t, "a photo of <asset0>", "--excite", "20", "--excite-steps", "0"),
         ("excite_steps", "(0, 1]")),
    Case("generate-output-is-a-file", lambda w, t: ["generate", str(w.bundle), "a photo of <asset0>", "-o", str(_file(t))],
         ("is a file",)),
    Case("generate-output-immutable", lambda w, t: ["generate", str(w.bundle), "a photo of <asset0>", "-o",
                                                    str(_immutable(t / "frozen"))], ("cannot write",)),
    Case("generate-truncated-unet", lambda w, t: _g(w, t, bundle=_bundle_spoiled(w, t, lambda b: _truncate(_unet_file(b)))),
         ("diffusion_pytorch_model.safetensors", "truncated")),
    Case("generate-pickle-unet", lambda w, t: _g(w, t, bundle=_bundle_spoiled(
        w, t, lambda b: _pickle_only(b / "weights" / "unet", "diffusion_pytorch_model"))), ("pickle", "never unpickles")),
    Case("generate-truncated-embedding", lambda w, t: _g(w, t, bundle=_bundle_spoiled(
        w, t, lambda b: _truncate(b / "embeddings" / "asset1.safetensors"))), ("asset1.safetensors", "truncated")),
    Case("generate-missing-indexed-file", lambda w, t: _g(w, t, bundle=_bundle_spoiled(
        w, t, lambda b: (b / "input.png").unlink() if (b / "input.png").exists() else (b / "README.md").unlink())),
        ("missing",)),
    Case("generate-7d-embedding", lambda w, t: _g(w, t, bundle=_bundle_spoiled(w, t, _seven_d_embedding)),
         ("bundle", "<asset0>", "7 values", "damaged"), loads=True),
    # --- info and eval ----------------------------------------------------------------------------------
    Case("info-truncated-unet", lambda w, t: ["info", str(_bundle_spoiled(w, t, lambda b: _truncate(_unet_file(b))))],
         ("diffusion_pytorch_model.safetensors", "truncated")),
    Case("info-verify-changed-byte", lambda w, t: ["info", "--verify", str(_bundle_spoiled(w, t, lambda b: _flip_byte(
        _unet_file(b))))], ("diffusion_pytorch_model.safetensors", "sha256")),
    Case("eval-truncated-unet", lambda w, t: ["eval", str(_bundle_spoiled(w, t, lambda b: _truncate(_unet_file(b)))),
                                              "-o", str(t / "ev")], ("diffusion_pytorch_model.safetensors", "truncated")),
    Case("eval-output-is-a-file", lambda w, t: ["eval", str(w.bundle), "-o", str(_file(t))], ("is a file",)),
    # --- masks ----------------------------------------------------------------------------------------
    Case("masks-image-damaged", lambda w, t: ["masks", str(_file(t, "photo.png")), "-o", str(t / "m"), "--mask",
                                              str(w.scene / "mask0.png")], ("photo.png", "cannot read")),
    Case("masks-mask-is-a-directory", lambda w, t: (t.joinpath("m0.png").mkdir(), [
        "masks", str(w.photo), "-o", str(t / "m"), "--mask", str(t / "m0.png")])[1], ("m0.png", "is a directory")),
    Case("masks-names-1MB", lambda w, t: ["masks", str(w.photo), "-o", str(t / "m"), "--mask", str(w.scene / "mask0.png"),
                                          "--names", HUGE], ("the name", "longer than 64")),
    Case("masks-output-immutable", lambda w, t: ["masks", str(w.photo), "-o", str(_immutable(t / "frozen") / "m"),
                                                 "--mask", str(w.scene / "mask0.png")], ("cannot write",)),
    # --- the Python API ---------------------------------------------------------------------------------
    Case("api-load-scene-none", lambda w, t: lambda: load_scene(None), ("folder path", "NoneType"), SceneError),
    Case("api-load-scene-int", lambda w, t: lambda: load_scene(42), ("folder path", "int"), SceneError),
    Case("api-extract-scene-int", lambda w, t: lambda: api.extract(42, t / "out", model=str(w.sd)),
         ("scene must be",), SceneError),
    Case("api-extract-overrides-string", lambda w, t: lambda: api.extract(w.scene, t / "out", model=str(w.sd),
                                                                         overrides="phase1.lr=nan"),
         ("phase1.lr", "finite"), ConfigError),
    Case("api-overrides-not-strings", lambda w, t: lambda: api.run_settings("break-a-scene", overrides=[("phase1.steps", 1)]),
         ("overrides must be",), ConfigError),
    Case("api-config-a-list", lambda w, t: lambda: api.run_settings("break-a-scene", config=["phase1.steps=1"]),
         ("config must be",), ConfigError),
    Case("api-train-partial-cfg-nan", _full_cfg_train, ("phase1.lr", "finite"), ConfigError),
    Case("api-train-cfg-unknown-key", lambda w, t: lambda: api.train(w.scene, t / "out", cfg={"phase1": {"stepz": 1}}),
         ("unknown setting", "phase1.stepz"), ConfigError),
    Case("api-train-scene-none", lambda w, t: lambda: api.train(None, t / "out"), ("scene must be",), SceneError),
    Case("api-train-method-int", lambda w, t: lambda: api.train(w.scene, t / "out", method=3), ("method must be",),
         ConfigError),
    Case("api-generate-prompt-none", lambda w, t: lambda: api.generate(w.bundle, None), ("prompt must be text",),
         PromptError),
    Case("api-generate-guidance-nan", lambda w, t: lambda: api.generate(w.bundle, "a <asset0>", guidance=float("nan")),
         ("guidance", "finite"), ConfigError),
    Case("api-generate-n-text", lambda w, t: lambda: api.generate(w.bundle, "a <asset0>", n="4"), ("n must be an integer",),
         ConfigError),
    Case("api-generate-bundle-none", lambda w, t: lambda: api.generate(None, "a <asset0>"), ("bundle must be",),
         ConfigError),
    Case("api-make-masks-output-file", lambda w, t, f=None: (f := _file(t)) and (
        lambda: api.make_masks(w.photo, f, files=[w.scene / "mask0.png"])), ("is a file",), ConfigError),
    Case("api-from-arrays-1MB-name", lambda w, t: lambda: Scene.from_arrays(*two_squares(), names=[HUGE, "b"]),
         ("longer than 64",), SceneError),
    Case("api-named-concepts-1MB", lambda w, t: lambda: Scene.from_arrays(two_squares()[0], []).with_named_concepts([HUGE]),
         ("longer than 64",), SceneError),
    Case("api-base-model-pickle-only", lambda w, t, sd=None: (sd := _base_copy(
        w, t, lambda sd: _pickle_only(sd / "text_encoder", "pytorch_model"))) and (lambda: api.load_model(sd)),
        ("pickle", "pytorch_model.bin"), ModelLoadError),
    Case("api-verify-changed-byte", lambda w, t, b=None: (b := _bundle_spoiled(w, t, lambda b: _flip_byte(_unet_file(b))))
         and (lambda: verify_bundle(b)), ("sha256",), BundleError),
]


def test_the_table_is_large_and_ids_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world, tmp_path, capsys, monkeypatch):
    t = tmp_path / "case"
    t.mkdir()
    if not case.loads:
        _guard(monkeypatch)
    try:
        job = case.make(world, t)
        before = (tree_hash(world.root), tree_hash(t))
        if isinstance(job, list):
            rc = _cli(job)
            err = capsys.readouterr().err
            assert rc == 2, err
            assert "Traceback" not in err
            assert err.startswith("error: ") or "usage:" in err, err[:500]
            msg = err
        else:
            with pytest.raises(case.error) as info:
                job()
            msg = str(info.value)
        assert len(msg) < MAX_MESSAGE, msg[:300]
        assert "BytesIO" not in msg
        for needle in case.needles:
            assert needle.lower() in msg.lower(), msg
        assert (tree_hash(world.root), tree_hash(t)) == before, "a refused input changed files on disk"
    finally:
        while _IMMUTABLE:
            subprocess.run(["chattr", "-i", str(_IMMUTABLE.pop())], check=False)


# ----------------------------------------------------------------------------------- accepted, with warnings


def _warned(fn) -> list[str]:
    with pytest.warns(ScenetokWarning) as record:
        fn()
    return [str(r.message) for r in record if issubclass(r.category, ScenetokWarning)]


def test_identical_masks_warn():
    img, masks = two_squares()
    msgs = _warned(lambda: Scene.from_arrays(img, [masks[0], masks[0].copy()]))
    assert any("identical" in m for m in msgs)


def test_all_white_mask_warns(world, tmp_path):
    s = world.scene_copy(tmp_path / "s", drop=["mask1.png"])
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(s / "mask0.png")
    msgs = _warned(lambda: load_scene(s))
    assert any("mask0.png covers 100%" in m for m in msgs)


def test_tiny_image_warns():
    msgs = _warned(lambda: Scene.from_arrays(np.zeros((1, 1, 3), np.uint8), [np.ones((1, 1), bool)]))
    assert any("only 1×1 pixels" in m for m in msgs)


def test_cli_prints_a_warning_as_one_line(world, tmp_path, monkeypatch):
    import warnings

    from scenetok import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    cli._one_line_warnings()
    cli._one_line_warnings()  # idempotent: main() may run many times in one process
    s = world.scene_copy(tmp_path / "s", drop=["mask1.png"])
    shutil.copy(s / "mask0.png", s / "mask1.png")
    msgs = _warned(lambda: load_scene(s))
    line = warnings.formatwarning(msgs[0], ScenetokWarning, "scene.py", 1)
    assert line.startswith("warning: ") and line.count("\n") == 1 and "mask0.png and mask1.png are identical" in line
    assert "UserWarning" in warnings.formatwarning("x", UserWarning, "f.py", 1)  # others keep the default format


# ---------------------------------------------------------------------------------- accepted API forms


def test_api_train_uses_the_toy_default_and_merges_a_partial_cfg(world, tmp_path, monkeypatch):
    from scenetok.config import default_model

    seen = {}
    monkeypatch.setattr(api, "_train", lambda scenes, out, **kw: seen.update(kw, scenes=scenes))
    api.train(world.scene, tmp_path / "out", cfg={"phase1": {"steps": 3}}, overrides="phase2.steps=1")
    assert seen["model"] == default_model()
    cfg = seen["cfg"]
    assert cfg["phase1"]["steps"] == 3 and cfg["phase2"]["steps"] == 1
    full = api.run_settings("break-a-scene")
    assert cfg["phase1"]["lr"] == full["phase1"]["lr"] and set(cfg) == set(full)
    assert isinstance(seen["scenes"], Scene)


def test_api_extract_defaults_to_the_toy_model(world, tmp_path, monkeypatch):
    from scenetok.config import default_model

    loaded = []
    monkeypatch.setattr(api, "load_model", lambda m: loaded.append(m) or m)
    monkeypatch.setattr(api, "_train", lambda *a, **k: None)
    api.extract(world.scene, tmp_path / "out", overrides="phase1.steps=1")
    assert loaded == [default_model()]


def test_override_string_is_one_override():
    assert api.run_settings("break-a-scene", overrides="phase1.steps=1")["phase1"]["steps"] == 1


def test_info_verify_passes_on_a_good_bundle(world, capsys):
    assert main(["info", "--verify", str(world.bundle)]) == 0
    assert "verified" in capsys.readouterr().out


def test_help_says_each_default_once(capsys):
    for cmd in (["extract"], ["generate"], ["masks"], ["eval"], ["demo"], ["benchmark", "toyworld"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert not re.search(r"\(default[^()]*\)\s*\(default:", text), cmd
        assert "(default: None)" not in text, cmd
        assert "a few minutes" not in text, cmd
