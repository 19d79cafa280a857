"""The web app's handlers without a browser: upload limits, names that cannot escape the workspace, masks
collected from several sources into one scene, settings forms from the method registry, the worker
(queue, cancel, resume), progress read from a run, generation with prompt and seed, bundles listed,
zipped and loaded; errors in the CLI's words. The page itself: tests/test_ui_browser.py."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from scenetok.errors import ScenetokError
from scenetok.methods import available_methods, get_method
from scenetok.ui.handlers import App, form_choices, settings_form
from scenetok.ui.jobs import CANCELLED, DONE, FAILED, STOPPED, Job, Worker
from scenetok.ui.workspace import Limits, UploadError, Workspace, safe_name

FAST = {"phase1.steps": 2, "phase2.steps": 2, "preview_every": 2, "checkpoint_every": 1}


@pytest.fixture
def files(tmp_path):
    from conftest import two_squares

    img, masks = two_squares()
    out = {"photo": tmp_path / "photo.png", "m1": tmp_path / "blue.png", "empty": tmp_path / "empty.png"}
    Image.fromarray(img).save(out["photo"])
    Image.fromarray(masks[1].astype(np.uint8) * 255).save(out["m1"])
    Image.fromarray(np.zeros(masks[0].shape, np.uint8)).save(out["empty"])
    out["red_layer"] = np.dstack([np.zeros(masks[0].shape + (3,), np.uint8), masks[0].astype(np.uint8) * 255])
    return out


@pytest.fixture
def app(tmp_path, tiny_sd):
    return App(Workspace(tmp_path / "ws", Limits(max_bytes=200_000, max_pixels=300 * 300)), model=str(tiny_sd))


def _scene(app, files, name="my scene"):
    app.set_photo(name, files["photo"])
    app.add_painted(name, [files["red_layer"]], "red")
    app.add_files(name, [files["m1"]], ["blue"])
    return app.build_scene(name)


@pytest.mark.parametrize("text,expected", [("../../etc/passwd", "etc-passwd"), ("my scene", "my-scene"),
                                           ("/abs/path", "abs-path"), ("..", None), ("a\x00b", "a-b"),
                                           ("x.partial", "x-partial"), ("ünï cödé", "n-c-d"), ("", None)])
def test_names_never_leave_their_folder(tmp_path, text, expected):
    if expected is None:
        with pytest.raises(ScenetokError, match="no letters or digits"):
            safe_name(text)
        return
    assert safe_name(text) == expected
    ws = Workspace(tmp_path)
    assert ws.scene(text).parent == ws.root / "scenes"


def test_a_link_out_of_the_workspace_is_refused(tmp_path):
    ws = Workspace(tmp_path / "ws")
    (tmp_path / "elsewhere").mkdir()
    (ws.root / "bundles" / "b").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ScenetokError, match="outside the workspace"):
        ws.bundle("b")


def test_uploads_are_images_within_the_limits(app, files, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (280, 280, 3), dtype=np.uint8)).save(big)
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((10, 9001), np.uint8)).save(wide)
    pick = tmp_path / "model.png"  # a pickle dressed as a PNG
    pick.write_bytes(pickle.dumps({"x": 1}))
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (8, 8)).save(gif)
    cases = [(big, "uploads are limited to 195 KB"), (wide, "uploads are limited to 0.1 megapixels"),
             (pick, "is not an image"), (gif, "is a GIF image")]
    for path, message in cases:
        with pytest.raises(UploadError, match=message) as e:
            app.set_photo("s", path)
        assert e.value.report().startswith("error: photo ")
        assert not (app.ws.uploads("s") / "photo.png").exists()
    with pytest.raises(UploadError, match="is not an image"):
        app.set_photo("s", files["photo"]) and app.add_files("s", [pick])


def test_masks_from_brush_and_file_make_one_scene(app, files):
    preview = _scene(app, files)
    scene = app.ws.scene("my scene")
    assert preview == scene / "preview.png" and preview.is_file()
    meta = json.loads((scene / "scene.json").read_text())
    assert [c["name"] for c in meta["concepts"]] == ["red", "blue"]
    m0 = np.asarray(Image.open(scene / "mask0.png")) > 0
    assert m0.sum() == files["red_layer"][..., 3].astype(bool).sum()
    # class and init words from the table; an empty painting is refused
    app.rename_masks("my scene", [["red", "square", "box"], ["blue", "", ""]])
    app.build_scene("my scene", background=True)
    meta = json.loads((scene / "scene.json").read_text())
    assert meta["concepts"][0]["class_word"] == "square" and meta["concepts"][0]["init_word"] == "box"
    assert meta["background"] is True
    with pytest.raises(ScenetokError, match="nothing is painted"):
        app.add_painted("my scene", [np.zeros_like(files["red_layer"])])


def test_a_bad_mask_gets_the_clis_error(app, files, tmp_path):
    from scenetok import api

    app.set_photo("s", files["photo"])
    app.add_files("s", [files["empty"]], ["nothing"])
    with pytest.raises(ScenetokError) as ui_err:
        app.build_scene("s")
    with pytest.raises(ScenetokError) as api_err:  # what `scenetok masks --mask` says about the same file
        api.make_masks(str(files["photo"]), tmp_path / "cli-scene", files=[str(files["empty"])], names=["nothing"])
    assert type(ui_err.value) is type(api_err.value)
    assert ui_err.value.report().replace(str(app.ws.uploads("s") / "masks" / "00.png"), "F") == \
        api_err.value.report().replace(str(files["empty"]), "F")
    assert not app.ws.scene("s").exists()
    app.remove_mask("s", 0)
    assert app.build_scene("s").name == "img.png"  # a photo-only scene, for the mask-free methods


@pytest.mark.parametrize("method", available_methods())
def test_every_methods_form_comes_from_the_registry(method):
    m = get_method(method)
    fields = {f.key: f for f in settings_form(method)}
    assert {f"--{s}" for s in [*m.switches, *m.options]} | set(m.setting_helps()) <= set(fields)
    for f in fields.values():
        assert f.kind in {"bool", "int", "float", "text", "list", "choice"}
    # the form's defaults change nothing; a change becomes one override, a switch its flag
    untouched = {k: f.default for k, f in fields.items() if not f.switch}
    assert form_choices(method, untouched) == ([], [], {})
    key = next(k for k, f in fields.items() if f.kind == "int" and k.endswith("steps"))
    overrides, _, _ = form_choices(method, {key: 3.0})
    assert overrides == [f"{key}=3"]
    if m.switches:
        flag = next(iter(m.switches))
        assert form_choices(method, {f"--{flag}": True})[1] == [flag]


def test_train_watch_generate_zip_and_load(app, files, tmp_path):
    _scene(app, files)
    with pytest.raises(ScenetokError, match="phase1.steps"):
        app.start_training("my scene", "b", "break-a-scene", {"phase1.steps": -1})
    job = app.start_training("my scene", "b", "break-a-scene", FAST)
    assert app.worker.wait(300) and job.status == DONE, job.message
    info = app.progress("b")
    assert info["step"] == info["total"] == 4 and info["phase"] == "phase2"
    assert {t for _, _, t in info["loss"]} >= {"diffusion", "loss"}
    assert [c for _, c in info["previews"]] == ["step 0", "step 2", "step 4"]
    with pytest.raises(ScenetokError, match="already holds a bundle"):
        app.start_training("my scene", "b", "break-a-scene", FAST)

    assert app.handles("b") == [("<asset0>", "red"), ("<asset1>", "blue")]
    new = app.generate("b", "a photo of <asset0>", n=2, seed=5, steps=2)
    assert [c for _, c in new] == ["seed 6 · a photo of <asset0>", "seed 5 · a photo of <asset0>"]
    assert [c for _, c in app.attention_maps(new[0][0])] == ["<asset0>"]
    with pytest.raises(ScenetokError, match="<asset7>"):
        app.generate("b", "a photo of <asset7>", n=1, steps=2)

    [listed] = app.bundles()
    assert listed["name"] == "b" and listed["method"] == "break-a-scene" and listed["thumbnail"].is_file()
    names = zipfile.ZipFile(app.zip_bundle("b")).namelist()
    assert "b/manifest.json" in names and "b/embeddings/asset0.safetensors" in names
    other = App(Workspace(tmp_path / "ws2"), model=app.model, worker=app.worker)
    assert other.load_bundle(str(app.ws.bundle("b")), "../copy") == "copy"
    assert other.handles("copy") == app.handles("b")
    with pytest.raises(ScenetokError, match="already has a bundle"):
        other.load_bundle(str(app.ws.bundle("b")), "copy")
    with pytest.raises(ScenetokError, match="not a scenetok bundle"):
        other.load_bundle(str(tmp_path))


def test_cancel_then_resume_from_the_page(app, files):
    _scene(app, files)
    gate = __import__("threading").Event()
    blocker = app.worker.submit(Job(name="blocker", kind="test", work=lambda job: gate.wait(60) and "ok"))
    job = app.start_training("my scene", "b", "break-a-scene", FAST)
    queued = app.start_training("my scene", "c", "break-a-scene", FAST)
    assert [r[3] for r in app.queue_rows()] == ["running", "queued", "queued"]
    with pytest.raises(ScenetokError, match="already queued"):
        app.start_training("my scene", "c", "break-a-scene", FAST)
    app.cancel(queued.id)
    assert queued.status == CANCELLED
    job.cancel.set()  # cancel asked before its first step: it stops after step 1 with a checkpoint
    gate.set()
    assert app.worker.wait(300) and blocker.status == DONE
    assert job.status == STOPPED and "after step 1/4" in job.message and "Resume" in job.message
    assert app.ws.unfinished() == ["b"] and not app.ws.bundle("b").exists()
    assert app.progress("b")["step"] == 1
    again = app.resume("b")
    assert app.worker.wait(300) and again.status == DONE, again.message
    assert app.ws.bundle("b").is_dir() and app.ws.unfinished() == []
    assert not app.ws.bundle("c").exists() and app.progress("c")["folder"] is None


def test_a_stopping_server_checkpoints_the_running_training(app, files):
    _scene(app, files)
    started = __import__("threading").Event()
    real = app._train

    def slow_start(job, rec, resume):
        started.set()
        job.cancel.wait(60)  # the run starts once the shutdown has asked it to stop
        return real(job, rec, resume)

    app._train = slow_start
    job = app.start_training("my scene", "b", "break-a-scene", FAST)
    later = app.start_training("my scene", "c", "break-a-scene", FAST)
    assert started.wait(60)
    assert app.worker.shutdown(300) is job
    assert job.status == STOPPED and later.status == CANCELLED
    assert app.ws.unfinished() == ["b"]  # Resume continues it after a restart


def test_worker_reports_errors_in_one_line():
    w = Worker()

    def user_error(job):
        raise ScenetokError("bad thing", hint="do this")

    def bug(job):
        raise KeyError("x")

    def disk_full(job):
        raise OSError(28, "No space left on device", "/w/bundles/b.partial/x")

    a, b, c = (w.submit(Job(n, "t", f)) for n, f in [("a", user_error), ("b", bug), ("c", disk_full)])
    assert w.wait(30)
    assert a.status == FAILED and a.message == "error: bad thing\nhint: do this"
    assert b.status == FAILED and "Traceback" not in b.message and "KeyError" in b.message
    assert c.status == FAILED and c.message == ("error: No space left on device: /w/bundles/b.partial/x\n"
                                                "hint: free some disk space; nothing written before was changed")


def test_the_page_builds_and_errors_keep_the_outputs(app):
    gr = pytest.importorskip("gradio")
    from scenetok.ui.app import build, guarded

    demo = build(app)
    assert isinstance(demo, gr.Blocks)

    @guarded(3)
    def fails():
        raise ScenetokError("no such thing", hint="try that")

    out = fails()
    assert len(out) == 3 and out[2] == "error: no such thing\nhint: try that"
    assert all(isinstance(o, type(gr.skip())) for o in out[:2])


def test_the_ui_command_listens_on_localhost_by_default():
    from scenetok.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.workspace) == ("127.0.0.1", 7860, "scenetok-workspace")
    args = build_parser().parse_args(["ui", "--host", "0.0.0.0", "--port", "8000", "--workspace", "w"])
    assert (args.host, args.port, args.workspace) == ("0.0.0.0", 8000, "w")


def test_sam_boxes_and_clicks_join_the_collected_masks(tmp_path, files):
    from scenetok.testing import build_tiny_sam

    sam = str(build_tiny_sam(tmp_path / "sam", full_masks=True))  # every prompt: the whole image, then clipped
    app = App(Workspace(tmp_path / "ws"), sam_model=sam, device="cpu")
    app.set_photo("s", files["photo"])
    app.add_painted("s", [files["red_layer"]], "red")
    items = app.add_segmented("s", boxes=["36,36,56,56", ""], names=["blue"])
    assert [(i["name"], i["source"]) for i in items] == [("red", "brush"), ("blue", "boxes")]
    mask = np.asarray(Image.open(items[1]["file"])) > 0
    ys, xs = np.nonzero(mask)
    assert np.abs(np.array([xs.min(), ys.min(), xs.max(), ys.max()]) - [36, 36, 55, 55]).max() <= 1  # the box
    items = app.add_segmented("s", points=["10,10+12,12"])
    assert items[-1]["source"] == "points" and len(items) == 3
    with pytest.raises(ScenetokError, match="the box"):
        app.add_segmented("s", boxes=["1,2,3"])


def test_a_mask_free_method_takes_words_on_a_photo_only_scene(app, files):
    app.set_photo("words", files["photo"])
    app.build_scene("words")  # no masks: the photo alone
    wrong = app.start_training("words", "bas", "break-a-scene", FAST)  # a mask method: the scene loader's error
    values = {"em.steps": 2, "em.every": 1, "joint.steps": 1, "masks.timesteps": 2, "masks.batch_size": 2,
              "masks.crf.enabled": False,
              "preview_every": 0, "checkpoint_every": 0}
    job = app.start_training("words", "em", "em-masks", values, concepts="red, blue")
    assert app.worker.wait(300) and job.status == DONE, job.message
    assert wrong.status == FAILED and wrong.message.startswith("error: ") and "mask" in wrong.message
    assert [n for _, n in app.handles("em")] == ["red", "blue"]
