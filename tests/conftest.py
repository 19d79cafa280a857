"""Shared fixtures: a tiny random Stable Diffusion saved to disk and loaded via from_pretrained."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from scenetok.testing import two_squares  # noqa: E402, F401  (tests import it from here)

torch.set_num_threads(2)


def load_tokenizer_and_text_encoder(path):
    """The CLIP tokenizer and text encoder of the SD folder ``path`` (e.g. the ``tiny_sd`` fixture's)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    return (CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Path of a tiny random SD folder: 32 px images, 16×16 latents, cross-attention at 16 and 8."""
    from scenetok.testing import TinySDConfig, build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd", TinySDConfig(resolution=32))


def write_scene_folder(folder, image: str = "img.png", mask: str = "mask{i}.png", n_masks: int = 2):
    """Write :func:`two_squares` as a scene folder (the photo and its first ``n_masks`` masks); returns it."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img, masks = two_squares()
    Image.fromarray(img).save(folder / image)
    for i, m in enumerate(masks[:n_masks]):
        Image.fromarray(m.astype("uint8") * 255).save(folder / mask.format(i=i))
    return folder


@pytest.fixture
def two_square_scene():
    from scenetok.scene import Scene

    img, masks = two_squares()
    return Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "square"])


@pytest.fixture
def interrupted_train(monkeypatch):
    """``interrupted_train(at, *args, signum=SIGINT, where="optimizer", **kwargs)``: :func:`scenetok.training.train`
    with a real signal (Ctrl-C by default) delivered during the ``at``-th step of this call — inside the
    optimizer's ``step`` just after the update is applied (``where="optimizer"``) or before the forward pass (``where="start"``). The run must
    finish that step, save a checkpoint at it and stop with :class:`TrainingInterrupted`, which is returned.
    Afterwards training runs normally again, so the test resumes with a plain ``train(..., resume=True)``."""
    import signal

    from scenetok.training import TrainingInterrupted, train
    from scenetok.training import trainer as trainer_mod

    def run(at: int, *args, signum=signal.SIGINT, where: str = "optimizer", **kwargs):
        real_step = trainer_mod._train_step
        calls = {"n": 0}

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] != at:
                return real_step(*a, **k)
            if where == "start":
                signal.raise_signal(signum)
                return real_step(*a, **k)
            opt = a[2]
            inner = opt.step

            def step_with_signal(*x, **y):
                result = inner(*x, **y)
                signal.raise_signal(signum)  # the update is applied, the step not yet finished
                return result

            opt.step = step_with_signal
            try:
                return real_step(*a, **k)
            finally:
                del opt.step

        monkeypatch.setattr(trainer_mod, "_train_step", flaky)
        try:
            with pytest.raises(TrainingInterrupted) as info:
                train(*args, **kwargs)
        finally:
            monkeypatch.setattr(trainer_mod, "_train_step", real_step)
        assert calls["n"] == at  # stopped right after the step that was interrupted
        return info.value

    return run


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """`scenetok.cli.main` sets torch's thread count for the process (--threads / the free CPUs); restore it
    after each test so results (bit-exact comparisons) do not depend on which CLI test ran before."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
