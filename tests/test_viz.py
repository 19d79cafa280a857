"""Pictures: heat-map overlays, mask overlays, grids, the loss plot."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from scenetok import viz


def _image(h=40, w=60):
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_colormap_range_and_ends():
    c = viz.colormap(np.array([0.0, 0.5, 1.0, -3.0, 7.0]))
    assert c.shape == (5, 3) and c.dtype == np.uint8
    assert tuple(c[0]) == (0, 0, 128) and tuple(c[2]) == (128, 0, 0)  # dark blue → dark red
    assert tuple(c[3]) == tuple(c[0]) and tuple(c[4]) == tuple(c[2])  # clipped


def test_overlay_heatmap_size_and_placement():
    img = _image()
    heat = np.zeros((4, 6), dtype=np.float32)
    heat[:, 3:] = 1.0  # right half hot
    out = viz.overlay_heatmap(img, heat, alpha=1.0)
    assert out.size == (60, 40) and out.mode == "RGB"
    a = np.asarray(out).astype(int)
    assert a[:, :20, 2].mean() > a[:, :20, 0].mean()  # cold side blue
    assert a[:, 45:, 0].mean() > a[:, 45:, 2].mean()  # hot side red
    # torch input, PIL input, un-normalized values, alpha=0 keeps the image
    out2 = viz.overlay_heatmap(Image.fromarray(img), torch.tensor(heat) * 50, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(out2), img)


def test_mask_overlay_colours_inside_masks_only():
    img = np.full((32, 48, 3), 128, dtype=np.uint8)
    masks = np.zeros((2, 16, 24), dtype=bool)  # other size than the image: resized
    masks[0, :8] = True
    masks[1, 8:, 12:] = True
    out = viz.mask_overlay(img, masks, ["cat", "bowl"])
    assert out.size == (48, 32)
    a = np.asarray(out).astype(int)
    assert np.abs(a[2, 2] - 128).sum() > 30  # inside mask 0: coloured
    assert np.abs(a[30, 2] - 128).sum() == 0  # outside every mask: untouched
    assert not np.array_equal(a[2, 2], a[30, 46])  # different masks, different colours


def test_grid_sizes():
    tiles = [Image.new("RGB", (30, 20), (i * 40, 0, 0)) for i in range(5)]
    g = viz.grid(tiles, pad=2)
    assert g.size == (3 * 32 + 2, 2 * 22 + 2)  # ceil(sqrt(5)) = 3 columns, 2 rows
    g = viz.grid(tiles, cols=5, pad=0)
    assert g.size == (150, 20)
    assert g.getpixel((35, 10)) == (40, 0, 0)
    labelled = viz.grid(tiles, labels=[f"<asset{i}> a long name" for i in range(5)], cols=5, pad=0)
    assert labelled.width == 150 and labelled.height > 20
    mixed = viz.grid([Image.new("RGB", (10, 10)), Image.new("RGB", (20, 16))], cols=2, pad=0)
    assert mixed.size == (40, 16)
    with pytest.raises(ValueError):
        viz.grid(tiles, labels=["one"])


def test_loss_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    rows = [{"global_step": i + 1, "phase": "p1", "lr": 1e-3, "loss": 1.0 / (i + 1), "attn": 0.1} for i in range(40)]
    rows.append({"global_step": 40, "preview": True, "attn_iou": {"<asset0>": 0.3}})
    path = viz.loss_plot(rows, tmp_path / "loss.png")
    assert path == tmp_path / "loss.png"
    with Image.open(path) as im:
        assert im.width > 100 and im.height > 100
    assert viz.loss_plot([], tmp_path / "empty.png") is None and not (tmp_path / "empty.png").exists()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # matplotlib missing: skip silently
    assert viz.loss_plot(rows, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_overlay_heatmap_spreads_small_probabilities_for_display():
    """Attention probabilities are small (spread over 77 tokens): the overlay must still show where the map
    is high, not paint everything in the coldest colour."""
    img = np.full((32, 32, 3), 128, dtype=np.uint8)
    heat = np.full((8, 8), 0.001, dtype=np.float32)
    heat[:, 4:] = 0.004
    a = np.asarray(viz.overlay_heatmap(img, heat, alpha=1.0)).astype(int)
    assert a[:, 24:, 0].mean() > a[:, 24:, 2].mean() + 100  # high side red
    assert a[:, :8, 2].mean() > a[:, :8, 0].mean() + 100  # low side blue
    raw = np.asarray(viz.overlay_heatmap(img, heat, alpha=1.0, normalize=False)).astype(int)
    assert np.abs(raw[:, 24:] - raw[:, :8]).mean() < 10  # as-is: both sides the same cold colour
