"""Fidelity to the papers (issue 12): mask resizing, the blocks each method's attention loss reads, and the
other choices where the papers or their reference code decide."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scenetok.attention import available_sizes, select_layers
from scenetok.methods import get_method
from scenetok.training import method_config


def _disc_scene(size: int = 32):
    from scenetok.scene import Scene

    yy, xx = np.mgrid[:size, :size]
    a = (yy - 10.3) ** 2 + (xx - 9.7) ** 2 < 6.1 ** 2  # round edges: not aligned to any latent cell
    b = (yy - 22.4) ** 2 + (xx - 21.6) ** 2 < 7.3 ** 2
    img = np.full((size, size, 3), 128, np.uint8)
    img[a] = (220, 30, 30)
    img[b] = (30, 30, 220)
    return Scene.from_arrays(img, [a, b], names=["red", "blue"], class_words=["ball", "ball"])


@pytest.mark.parametrize("mode", ["nearest", "area"])
def test_latent_masks_are_binary_by_default_and_soft_with_area(tiny_sd, tmp_path, mode):
    from scenetok.training.batch import make_batch
    from scenetok.training.run import setup_run

    method = get_method("break-a-scene")
    cfg = method_config(method, None, [f"mask_resize={mode}", "union_sampling=false", "flip_p=0"])
    run = setup_run([_disc_scene()], method, cfg, str(tiny_sd), tmp_path, "cpu", progress=False)
    batch, _, _ = make_batch(run, cfg)
    values = torch.unique(batch.latent_mask)
    fractional = ((values > 0) & (values < 1)).sum().item()
    if mode == "nearest":
        assert fractional == 0 and set(values.tolist()) == {0.0, 1.0}
    else:
        assert fractional >= 2  # the disc edges give partly covered latent cells
    # the area covered stays about the same either way (binary masks are not eroded or dilated)
    full = batch.masks[0].amax(0).float().mean().item()
    assert batch.latent_mask.mean().item() == pytest.approx(full, abs=0.05)


@pytest.fixture(scope="module")
def toy_unet():
    from scenetok.config import toy_sd_path
    from scenetok.model import load_model

    return load_model(toy_sd_path()).unet  # latent 16: cross-attention at 16, 8 (down, up) and 4 (mid)


def test_break_a_scene_and_em_never_read_the_mid_block(toy_unet):
    for name in ("break-a-scene", "em-masks"):
        method = get_method(name)
        cfg = method_config(method)
        blocks = method.attention_blocks(cfg)
        assert blocks == ("down", "up")
        sizes = available_sizes(toy_unet, 16, blocks)
        assert sizes == [8, 16]
        side = method.attention_sizes(cfg, 16, sizes)
        assert side == [8]  # latent/4 = 4 exists only in the mid block: the nearest down/up side instead
        layers = select_layers(toy_unet, 16, sizes=side, blocks=blocks)
        assert layers and not any(k.startswith("mid_block") for k in layers)
        # the option restores every block, and then the mid block's 4x4 layer is the one read
        cfg = method_config(method, None, ["attn.blocks=[down, mid, up]"])
        all_sizes = available_sizes(toy_unet, 16, method.attention_blocks(cfg))
        assert method.attention_sizes(cfg, 16, all_sizes) == [4]


def test_disendiff_and_tl_read_every_block_at_their_sides(toy_unet):
    for name in ("disendiff", "textual-localization"):
        method = get_method(name)
        assert method.attention_blocks(method_config(method)) == ("down", "mid", "up")
    with pytest.raises(Exception, match="attn.blocks"):
        get_method("break-a-scene").attention_sizes(
            method_config(get_method("break-a-scene"), None, ["attn.blocks=[side]"]), 16, [4, 8, 16])


def _blob(n, cy, cx, sy, sx=None):
    yy, xx = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    sx = sy if sx is None else sx
    return torch.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2)


def test_background_mask_comes_from_its_own_map_by_default():
    """The EM paper estimates the background from its own token's attention (Fig. 2/3c): a background map
    that covers only the left half gives a mask in the left half; the complement option gives the rest of
    the image whatever the background map says."""
    from conftest import two_squares

    from scenetok.masks.attention import AttentionMaskConfig, maps_to_masks

    img, masks = two_squares(64)
    left = torch.zeros(8, 8)
    left[:, :4] = 1.0
    maps = torch.stack([_blob(8, 3.0, 2.0, 1.4), _blob(8, 4.5, 5.75, 1.8, 1.1), left])
    bg = [False, False, True]
    own, _ = maps_to_masks(img, maps, bg, AttentionMaskConfig(crf=False, background="attention"))
    comp, _ = maps_to_masks(img, maps, bg, AttentionMaskConfig(crf=False, background="complement"))
    from scenetok.methods.em_masks import EMMaskSettings

    assert EMMaskSettings().background == "attention"  # em-masks follows the paper
    assert own[2, :, 40:].mean() < 0.05 and own[2, :, :24].mean() > 0.5  # follows its own map
    np.testing.assert_array_equal(comp[2], ~(comp[0] | comp[1]))
    assert comp[2, :, 40:].mean() > 0.3
    with pytest.raises(Exception, match="masks.background"):
        AttentionMaskConfig(background="rest").validate()


def test_generate_shows_textual_localization_maps_as_its_fig5(tiny_sd, tmp_path):
    """A TL bundle's --attention maps are the latent/4 layers upsampled to 256 (the paper's Fig. 5: 16x16 at
    512 px); other methods keep the generic view (largest side <= latent/2, here 8x8)."""
    from conftest import two_squares

    from scenetok.generation import generate
    from scenetok.scene import Scene
    from scenetok.training import train

    img, masks = two_squares()
    scene = Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "cat"])
    fast = ["preview_every=0", "checkpoint_every=0", "prior.enabled=false"]
    tl = train(scene, tmp_path / "tl", method="textual-localization", model=str(tiny_sd), progress=False,
               overrides=fast + ["train.steps=1"])
    bas = train(scene, tmp_path / "bas", model=str(tiny_sd), progress=False,
                overrides=fast + ["phase1.steps=1", "phase2.steps=0"])
    got = generate(tl.path, "photo of a <asset0> square", n=1, steps=2, attention=True, progress=False)[0]
    heat = got.attention["<asset0>"]
    assert heat.shape == (256, 256) and heat.min() == 0.0 and heat.max() == pytest.approx(1.0)
    # bilinear upsampling of an 8x8 map (tiny-sd: latent 16, nearest side to 4 is 8): neighbours barely differ
    assert np.abs(np.diff(heat, axis=0)).max() < 0.2
    plain = generate(bas.path, "a photo of <asset0>", n=1, steps=2, attention=True, progress=False)[0]
    assert plain.attention["<asset0>"].shape == (8, 8)
