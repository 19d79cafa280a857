"""Nothing lost: the old bundle survives every failure, --overwrite replaces only scenetok's own output,
Ctrl-C / SIGTERM / SIGKILL followed by --resume give the uninterrupted run's bits, a non-finite loss stops
the run with the last good checkpoint kept."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scenetok.errors import BundleError, ConfigError
from scenetok.training import TrainingDiverged, run_dir, train
from scenetok.training import trainer as trainer_mod

FAST = ["phase1.steps=2", "phase2.steps=2", "preview_every=0", "checkpoint_every=1"]


def tree_hash(folder: Path) -> str:
    """One hash of every file name and content under ``folder``."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.relative_to(folder).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def weights(out: Path) -> dict[str, torch.Tensor]:
    files = sorted((out / "embeddings").glob("*.safetensors")) + sorted((out / "weights").rglob("*.safetensors"))
    return {f"{f.relative_to(out)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tiny_sd, tmp_path_factory):
    """An uninterrupted run of FAST (checkpoints do not change the weights)."""
    from conftest import two_squares

    from scenetok.scene import Scene

    img, masks = two_squares()
    scene = Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "square"])
    out = tmp_path_factory.mktemp("ref") / "bundle"
    train(scene, out, model=str(tiny_sd), overrides=FAST, progress=False)
    return out


# ---------------------------------------------------------------------------------------------- outputs
def test_a_failed_overwrite_keeps_the_old_bundle(reference, tiny_sd, two_square_scene, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(reference, out)
    before = tree_hash(out)
    real = trainer_mod._train_step

    def boom(run, phase, opt, store, gs):
        if gs == 3:
            raise OSError(28, "No space left on device")
        return real(run, phase, opt, store, gs)

    monkeypatch.setattr(trainer_mod, "_train_step", boom)
    with pytest.raises(OSError):
        train(two_square_scene, out, model=str(tiny_sd), overrides=FAST + ["seed=5"], overwrite=True, progress=False)
    assert tree_hash(out) == before  # the old bundle, untouched
    assert (run_dir(out) / "checkpoint" / "state.json").is_file()  # and the new run can be resumed
    # a failure while writing the new bundle at the very end: still the old bundle
    monkeypatch.setattr(trainer_mod, "_train_step", real)

    def disk_full(run):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer_mod, "write_run_bundle", disk_full)
    with pytest.raises(OSError):
        train(two_square_scene, out, model=str(tiny_sd), resume=True, progress=False)
    assert tree_hash(out) == before
    monkeypatch.undo()
    # the run finishes: the new bundle replaces the old one, the run folder is gone
    train(two_square_scene, out, model=str(tiny_sd), resume=True, progress=False)
    assert tree_hash(out) != before and not run_dir(out).exists() and not same_weights(out, reference)


def test_overwrite_never_replaces_foreign_files_or_inputs(reference, tiny_sd, two_square_scene, tmp_path):
    import shutil

    from scenetok.scene import load_scene, save_scene

    out = tmp_path / "bundle"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")
    before = tree_hash(out)
    with pytest.raises(BundleError, match="notes.txt"):
        train(two_square_scene, out, model=str(tiny_sd), overrides=FAST, overwrite=True, progress=False)
    assert tree_hash(out) == before and not run_dir(out).exists()

    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"not really a jpeg")
    before = tree_hash(other)
    with pytest.raises(BundleError, match="not a scenetok bundle"):
        train(two_square_scene, other, model=str(tiny_sd), overrides=FAST, overwrite=True, progress=False)
    assert tree_hash(other) == before

    scene_dir = save_scene(two_square_scene, tmp_path / "scene")
    before = tree_hash(scene_dir)
    with pytest.raises(BundleError, match="holds the input"):
        train(load_scene(scene_dir), scene_dir, model=str(tiny_sd), overrides=FAST, overwrite=True, progress=False)
    with pytest.raises(BundleError, match="holds the input"):
        train(load_scene(scene_dir), tmp_path, model=str(tiny_sd), overrides=FAST, overwrite=True, progress=False)
    assert tree_hash(scene_dir) == before

    with pytest.raises(BundleError, match="already holds a bundle"):
        train(two_square_scene, reference, model=str(tiny_sd), overrides=FAST, progress=False)


# -------------------------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("at,where,signum", [(1, "optimizer", signal.SIGINT), (2, "optimizer", signal.SIGINT),
                                              (3, "start", signal.SIGTERM)])
def test_signal_then_resume_is_exact(reference, tiny_sd, two_square_scene, tmp_path, interrupted_train, at, where,
                                     signum):
    """The signal lands inside the optimizer update (the case that used to resume 4e-6 off) or before the
    forward pass; at the phase boundary (step 2) and inside each phase."""
    out = tmp_path / "run"
    exc = interrupted_train(at, two_square_scene, out, model=str(tiny_sd), overrides=FAST[:3] + ["checkpoint_every=0"],
                            progress=False, where=where, signum=signum)
    assert f"after step {at}/4" in exc.message and "--resume" in exc.hint
    state = json.loads((run_dir(out) / "checkpoint" / "state.json").read_text())
    assert state["progress"]["global"] == at and not out.exists()
    train(two_square_scene, out, model=str(tiny_sd), resume=True, progress=False)
    assert same_weights(out, reference)


def test_cancel_from_a_worker_thread_then_resume_is_exact(reference, tiny_sd, two_square_scene, tmp_path):
    """A web app's worker thread gets no signal handlers: ``should_stop`` stops the run at a step boundary
    with a checkpoint, like Ctrl-C, and the resumed run ends with the uninterrupted run's weights."""
    import threading

    from scenetok import api
    from scenetok.training import TrainingInterrupted

    out, asked, result = tmp_path / "run", [], {}
    cancel = threading.Event()

    def should_stop():
        asked.append(1)
        if len(asked) == 3:
            cancel.set()
        return cancel.is_set()

    def work():
        try:
            api.train(two_square_scene, out, model=str(tiny_sd), overrides=FAST[:3] + ["checkpoint_every=0"],
                      progress=False, should_stop=should_stop)
        except TrainingInterrupted as e:
            result["exc"] = e

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    exc = result["exc"]
    assert "stopped by a cancel request after step 3/4" in exc.message
    state = json.loads((run_dir(out) / "checkpoint" / "state.json").read_text())
    assert state["progress"]["global"] == 3 and not out.exists()
    train(two_square_scene, out, model=str(tiny_sd), resume=True, progress=False)
    assert same_weights(out, reference)


def test_sigkill_then_resume_is_exact(reference, tiny_sd, tmp_path):
    """A real SIGKILL in step 3 (checkpoints by time, every step here): --resume ends with the same bits."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # the reference's thread count
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import two_squares
        from scenetok.scene import Scene
        from scenetok.training import train
        from scenetok.training import trainer as t
        real = t._train_step
        def step(run, phase, opt, store, gs):
            if gs == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(run, phase, opt, store, gs)
        t._train_step = step
        img, masks = two_squares()
        scene = Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "square"])
        train(scene, {str(out)!r}, model={str(tiny_sd)!r}, progress=False,
              overrides={FAST[:3] + ["checkpoint_every=0", "checkpoint_minutes=1e-9"]!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((run_dir(out) / "checkpoint" / "state.json").read_text())
    assert state["progress"]["global"] == 2 and not out.exists()
    from conftest import two_squares

    from scenetok.scene import Scene

    img, masks = two_squares()
    scene = Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "square"])
    threads = torch.get_num_threads()
    assert json.loads((run_dir(out) / "run_config.json").read_text())["cpu_threads"] == threads
    torch.set_num_threads(threads + 1)  # resumed with another count: the run goes back to its own
    try:
        train(scene, out, model=str(tiny_sd), resume=True, progress=False)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)
    assert same_weights(out, reference)


def test_resume_hints_lead_somewhere(tiny_sd, two_square_scene, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = trainer_mod._train_step

    def killed(*a, **k):
        raise KeyboardInterrupt  # "Ctrl-C twice": stops at once, before any checkpoint

    monkeypatch.setattr(trainer_mod, "_train_step", killed)
    with pytest.raises(trainer_mod.TrainingInterrupted, match="no checkpoint"):
        train(two_square_scene, out, model=str(tiny_sd), overrides=FAST[:3] + ["checkpoint_every=0"], progress=False)
    monkeypatch.setattr(trainer_mod, "_train_step", real)
    with pytest.raises(BundleError, match="before its first checkpoint") as info:
        train(two_square_scene, out, model=str(tiny_sd), resume=True, progress=False)
    assert "without --resume" in info.value.hint
    # ... and starting again without --resume is accepted (the unfinished run was scenetok's own)
    monkeypatch.setattr(trainer_mod, "_train_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(trainer_mod.TrainingInterrupted):
        train(two_square_scene, out, model=str(tiny_sd), overrides=FAST[:3] + ["checkpoint_every=0"], progress=False)


def test_unfinished_run_with_a_checkpoint_is_not_discarded_silently(tiny_sd, two_square_scene, tmp_path,
                                                                   interrupted_train):
    out = tmp_path / "run"
    interrupted_train(1, two_square_scene, out, model=str(tiny_sd), overrides=FAST, progress=False)
    before = tree_hash(run_dir(out))
    with pytest.raises(BundleError, match="checkpoint at step 1") as info:
        train(two_square_scene, out, model=str(tiny_sd), overrides=FAST, progress=False)
    assert "--resume" in info.value.hint and "--overwrite" in info.value.hint
    assert tree_hash(run_dir(out)) == before


# --------------------------------------------------------------------------------------- non-finite loss
def test_non_finite_loss_stops_at_once_and_keeps_the_last_checkpoint(tiny_sd, two_square_scene, tmp_path,
                                                                     monkeypatch):
    from scenetok.methods.break_a_scene import BreakAScene

    real = BreakAScene.losses
    calls = {"n": 0}

    def nan_at_3(self, batch, out, cfg):
        calls["n"] += 1
        terms = real(self, batch, out, cfg)
        if calls["n"] == 3:
            terms["diffusion"] = terms["diffusion"] * float("nan")
        return terms

    monkeypatch.setattr(BreakAScene, "losses", nan_at_3)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="not finite at step 3") as info:
        train(two_square_scene, out, model=str(tiny_sd), overrides=FAST, progress=False)
    assert "step 2" in info.value.message and "lr" in info.value.hint
    state = json.loads((run_dir(out) / "checkpoint" / "state.json").read_text())
    assert state["progress"]["global"] == 2 and not out.exists()
    saved = load_file(str(run_dir(out) / "checkpoint" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_learning_rate_is_refused(value):
    from scenetok.methods import get_method
    from scenetok.training import method_config

    with pytest.raises(ConfigError, match="phase1.lr must be a finite number"):
        method_config(get_method("break-a-scene"), None, [f"phase1.lr={value}"])


# ------------------------------------------------------------------------------------- masks, generate, demo
def _photo_folder(tmp_path: Path) -> Path:
    from conftest import write_scene_folder

    folder = write_scene_folder(tmp_path / "holiday", image="photo.jpg", mask="my_mask{i}.png")
    (folder / "notes.txt").write_text("taken in June")
    return folder


def test_masks_overwrite_never_deletes_user_files(tmp_path):
    from scenetok.cli import main

    photos = _photo_folder(tmp_path)
    args = [str(photos / "photo.jpg"), "--mask", str(photos / "my_mask0.png"), "--mask", str(photos / "my_mask1.png")]
    before = tree_hash(photos)
    # -o = the photo's own folder, even with --overwrite: refused, nothing touched
    assert main(["masks", *args, "-o", str(photos), "--overwrite"]) == 2
    assert tree_hash(photos) == before
    # -o = a folder of other files, with --overwrite: refused
    other = tmp_path / "docs"
    other.mkdir()
    (other / "cv.pdf").write_bytes(b"%PDF")
    assert main(["masks", *args, "-o", str(other), "--overwrite"]) == 2
    assert sorted(p.name for p in other.iterdir()) == ["cv.pdf"]
    # its own earlier output: replaced with --overwrite only
    scene = tmp_path / "scene"
    assert main(["masks", *args, "-o", str(scene)]) == 0
    first = tree_hash(scene)
    assert main(["masks", *args, "-o", str(scene)]) == 2 and tree_hash(scene) == first
    assert main(["masks", *args, "--names", "a,b", "-o", str(scene), "--overwrite"]) == 0
    assert tree_hash(scene) != first and sorted(p.name for p in scene.iterdir()) == [
        "img.png", "mask0.png", "mask1.png", "masks.json", "preview.png", "scene.json"]
    (scene / "my-fix.png").write_bytes(b"x")  # a file the user added: now never replaced
    assert main(["masks", *args, "-o", str(scene), "--overwrite"]) == 2 and (scene / "my-fix.png").exists()


def test_generate_twice_into_one_folder_adds_images(reference, tmp_path):
    from scenetok import api

    out = tmp_path / "images"
    api.generate(reference, "a photo of <asset0>", n=2, steps=2, out_dir=out, progress=False)
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "prompts.jsonl"}
    api.generate(reference, "a photo of <asset1>", n=2, steps=2, out_dir=out, progress=False)
    for name, data in first.items():
        assert (out / name).read_bytes() == data, name  # nothing replaced
    rows = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["00_seed0.png", "01_seed1.png", "02_seed0.png", "03_seed1.png"]
    assert [r["prompt"] for r in rows] == ["a photo of <asset0>"] * 2 + ["a photo of <asset1>"] * 2
    assert (out / "grid.png").is_file() and (out / "grid_02.png").is_file()


def test_demo_replaces_only_an_earlier_demo(tmp_path):
    from scenetok.errors import ScenetokError
    from scenetok.toyworld.demo import _check_demo_output

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my own report")
    (mine / "thesis.tex").write_text("…")
    with pytest.raises(ScenetokError, match="thesis.tex"):
        _check_demo_output(mine, overwrite=True)
    earlier = tmp_path / "demo"
    (earlier / "images").mkdir(parents=True)
    (earlier / "report.html").write_text("<html>")
    _check_demo_output(earlier, overwrite=True)
    with pytest.raises(ScenetokError, match="earlier demo"):
        _check_demo_output(earlier, overwrite=False)


# ---------------------------------------------------------------------------------------- hub, threads
@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_id_without_network_fails_at_once(monkeypatch, offline):
    import time

    from huggingface_hub import constants

    from scenetok.errors import ModelLoadError
    from scenetok.model import load_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t = time.time()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as info:
        load_model("someone/no-such-model")
    assert time.time() - t < 10
    assert ("offline mode" if offline else "cannot be reached") in info.value.message
    assert "--local-dir" in info.value.hint
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/folder")


def test_threads_follow_the_free_cpus(monkeypatch):
    from scenetok import config

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(config, "available_cpus", lambda: 4)
    monkeypatch.setattr(config, "_busy_cpus_now", lambda: 1.2)
    monkeypatch.setattr(config.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert config.choose_threads() == (3, "4 CPUs, 1.2 busy now")  # one core busy elsewhere, measured now
    monkeypatch.setattr(config, "_busy_cpus_now", lambda: 9.0)
    assert config.choose_threads()[0] == 1  # never below one
    # where /proc/stat cannot be read, the 1-minute load average stands in
    monkeypatch.setattr(config, "_busy_cpus_now", lambda: None)
    monkeypatch.setattr(config.os, "getloadavg", lambda: (2.2, 0.0, 0.0))
    assert config.choose_threads() == (2, "4 CPUs, 2.2 load average")
    assert config.choose_threads(2) == (2, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert config.choose_threads()[0] == 2
    with pytest.raises(ConfigError):
        config.choose_threads(0)


def test_busy_cpus_are_read_from_two_proc_stat_snapshots():
    from scenetok.config import busy_cpus_between

    #        user nice system idle iowait irq softirq steal
    before = ("cpu  300 0 100 800 0 0 0 0\n"
              "cpu0 100 0 50 300 0 0 0 0\ncpu1 200 0 50 500 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0\nintr 5 0\n")
    # in 100 jiffies per CPU: cpu0 fully busy (user 80 + system 20), cpu1 idle (idle 90 + iowait 10), cpu2 half
    after = ("cpu  480 0 120 990 10 0 0 0\n"
             "cpu0 180 0 70 300 0 0 0 0\ncpu1 200 0 50 590 10 0 0 0\ncpu2 50 0 0 50 0 0 0 0\nintr 9 0\n")
    assert busy_cpus_between(before, after, {0, 1}) == pytest.approx(1.0)  # one of two cores busy
    assert busy_cpus_between(before, after, {1}) == pytest.approx(0.0)  # iowait is not busy
    assert busy_cpus_between(before, after, {0, 2}) == pytest.approx(1.5)
    assert busy_cpus_between(before, after) == pytest.approx(3 * 150 / 300)  # every cpuN line
    assert busy_cpus_between(before, before, {0}) is None  # no time passed
    assert busy_cpus_between("intr 1\n", after, {0}) is None  # nothing to read
    assert busy_cpus_between(before, after, {7}) is None  # a CPU /proc/stat does not list


def test_disk_full_on_the_command_line_is_one_line_with_a_resume_hint(reference, tiny_sd, tmp_path, monkeypatch,
                                                                        capsys):
    """ENOSPC in the middle of `scenetok extract`: one error line, a hint that says how to continue, status 2."""
    from scenetok.cli import main
    from scenetok.scene import save_scene

    scene_dir = tmp_path / "scene"
    from conftest import two_squares

    from scenetok.scene import Scene

    img, masks = two_squares()
    save_scene(Scene.from_arrays(img, masks, names=["red", "blue"]), scene_dir)
    real = trainer_mod._train_step

    def full(run, phase, opt, store, gs):
        if gs == 3:
            raise OSError(28, "No space left on device", str(run.out_dir / "train_log.jsonl"))
        return real(run, phase, opt, store, gs)

    monkeypatch.setattr(trainer_mod, "_train_step", full)
    out = tmp_path / "bundle"
    rc = main(["extract", str(scene_dir), "-o", str(out), "--model", str(tiny_sd), "--quiet", *sum(
        (["--set", o] for o in FAST), [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 2 and "Traceback" not in "".join(err)
    assert err[0].startswith("error: No space left on device") and "--resume" in err[1]
