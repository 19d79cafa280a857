"""Shared fixtures: a tiny random Stable Diffusion saved to disk and loaded via from_pretrained."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Path of a tiny random SD folder: 32 px images, 16×16 latents, cross-attention at 16 and 8."""
    from scenetok.testing import TinySDConfig, build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd", TinySDConfig(resolution=32))


def two_squares(size: int = 64):
    """An image with a red square (left) and a blue square (right) on grey, and their masks."""
    img = np.full((size, size, 3), 128, np.uint8)
    a = np.zeros((size, size), bool)
    b = np.zeros((size, size), bool)
    q = size // 8
    a[2 * q : 5 * q, 1 * q : 4 * q] = True
    b[3 * q : 7 * q, 5 * q : 7 * q + q // 2] = True
    img[a] = (220, 30, 30)
    img[b] = (30, 30, 220)
    return img, [a, b]


@pytest.fixture
def two_square_scene():
    from scenetok.scene import Scene

    img, masks = two_squares()
    return Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "square"])
