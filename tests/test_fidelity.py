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


def test_mask_margin_grows_the_masked_loss_region_by_whole_latent_pixels(tiny_sd, tmp_path):
    from scenetok.errors import ConfigError
    from scenetok.training.batch import grow_masks, make_batch
    from scenetok.training.run import setup_run

    m = torch.zeros(1, 2, 8, 8)
    m[0, 0, 3, 3] = 1.0
    m[0, 1, 0, 7] = 0.5
    g = grow_masks(m, 1)
    assert g[0, 0].sum().item() == 9 and g[0, 0, 2:5, 2:5].min().item() == 1.0  # a 3x3 square around the pixel
    assert g[0, 1].sum().item() == pytest.approx(0.5 * 4)  # clipped at the corner, soft value kept
    method = get_method("break-a-scene")
    areas = []
    for margin in (0, 1, 2):
        cfg = method_config(method, None, [f"mask_margin={margin}", "union_sampling=false", "flip_p=0"])
        run = setup_run([_disc_scene()], method, cfg, str(tiny_sd), tmp_path / str(margin), "cpu", progress=False)
        batch, _, _ = make_batch(run, cfg)
        areas.append(batch.latent_mask.sum().item())
        assert set(torch.unique(batch.latent_mask).tolist()) <= {0.0, 1.0}
    assert areas[0] < areas[1] < areas[2]
    with pytest.raises(ConfigError, match="mask_margin"):
        method_config(method, None, ["mask_margin=-1"])


def test_mask_margin_never_grows_into_an_object_the_prompt_does_not_name(tiny_sd, tmp_path):
    from scenetok.scene import Scene
    from scenetok.training.batch import make_batch
    from scenetok.training.run import setup_run

    img = np.full((32, 32, 3), 128, np.uint8)
    a = np.zeros((32, 32), bool)
    b = np.zeros((32, 32), bool)
    a[8:24, 4:16] = True
    b[8:24, 16:28] = True  # touching a along x = 16
    img[a], img[b] = (220, 30, 30), (30, 30, 220)
    scene = Scene.from_arrays(img, [a, b], names=["red", "blue"], class_words=["box", "box"])
    method = get_method("break-a-scene")
    cfg = method_config(method, None, ["mask_margin=1", "flip_p=0", "batch_size=16"])
    run = setup_run([scene], method, cfg, str(tiny_sd), tmp_path, "cpu", progress=False)
    batch, _, _ = make_batch(run, cfg)
    lat = batch.latent_mask[:, 0]
    side = lat.shape[-1]
    cells = [torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(m).float()[None], side)[0] > 0 for m in (a, b)]
    seen = set()
    for row, chosen in enumerate(batch.chosen):
        seen.add(tuple(sorted(chosen)))
        if len(chosen) == 1:
            own, other = cells[chosen[0]], cells[1 - chosen[0]]
            assert lat[row][other & ~own].max().item() == 0.0  # the neighbour is not learnt by this handle
            assert lat[row].sum().item() > own.sum().item()  # but the outline on the free sides is
        else:
            both = cells[0] | cells[1]
            assert lat[row][both].min().item() > 0 and (lat[row] > 0).sum().item() > both.sum().item()
    assert (0,) in seen or (1,) in seen


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


# ----------------------------------------------------------------------------------------------------
# Custom Diffusion's random rescale; the loss reductions of the Custom Diffusion code


def test_region_loss_is_the_channel_sum_per_counted_cell():
    from scenetok.losses import masked_diffusion_loss, region_diffusion_loss

    pred = torch.zeros(2, 4, 3, 3)
    target = torch.zeros(2, 4, 3, 3)
    target[0, :, 0, 0] = 1.0  # image 0: error 1 in every channel of cell (0, 0)
    target[1, 0] = 2.0  # image 1: error 4 in channel 0 of every cell
    region = torch.zeros(2, 1, 3, 3)
    region[0, 0, 0, :2] = 1.0  # two counted cells, one with the error
    region[1] = 1.0
    # image 0: (4 channels x 1) / 2 cells = 2; image 1: 9 cells x 4 / 9 = 4; mean 3 — and / 4 channels as a mean
    assert region_diffusion_loss(pred, target, region, channel_sum=True).item() == pytest.approx(3.0)
    assert region_diffusion_loss(pred, target, region).item() == pytest.approx(0.75)
    # without a region the mean form is the plain MSE
    assert region_diffusion_loss(pred, target).item() == pytest.approx(masked_diffusion_loss(pred, target).item())


@pytest.mark.parametrize("variant", ["cd", "cd-ldm"])
def test_random_rescale_follows_the_custom_diffusion_recipe(variant):
    from scenetok.training.data import random_rescale

    size, factor = 64, 8
    img = np.full((size, size, 3), 200, np.uint8)
    mask = np.zeros((1, size, size), np.float32)
    mask[0, 16:48, 16:48] = 1.0
    rng = np.random.default_rng(0)
    seen = {"small": 0, "large": 0, "same": 0}
    for _ in range(300):
        r = random_rescale(img, mask, rng, factor, variant)
        assert r.image.shape == (3, size, size) and r.masks.shape == (1, size, size) and r.valid.shape == (8, 8)
        assert size // 3 <= r.scale < int(1.4 * size)
        if r.scale > size:
            seen["large"] += 1
            assert r.prefix in ("zoomed in ", "close up ") and r.valid.all() and r.image.min() > 0.5
        elif r.scale < size:
            seen["small"] += 1
            if variant == "cd-ldm":
                assert r.scale < 0.6 * size and r.scale % 2 == 0
            assert r.prefix == ("" if r.scale >= 0.6 * size else r.prefix) and 0 < r.valid.mean() < 1
            if r.scale < 0.6 * size:
                assert r.prefix in ("a far away ", "very small ")
            # grey canvas (0 in [-1, 1]) around the placed image, the image inside the counted cells
            inside = torch.from_numpy(np.kron(r.valid, np.ones((factor, factor)))).bool()
            if r.scale >= 4 * factor:  # (smaller: the fallback counts every cell the image touches)
                assert r.image[:, inside].min() > 0.5
            assert (r.image.abs() < 1e-6).any()
            assert 0 < r.masks.sum() < mask.sum()  # the mask moved and shrank with the image
        else:
            seen["same"] += 1  # the LDM code keeps the image; the diffusers script still drops the border cells
            assert r.prefix == "" and (r.valid.all() if variant == "cd-ldm" else r.valid.mean() == 36 / 64)
    assert seen["large"] > 60 and seen["small"] > 60  # about 1/3 enlarged, the rest shrunk (or kept)
    if variant == "cd-ldm":
        assert seen["same"] > 30  # [0.6 S, S] keeps the image as it is in the LDM code


def test_rescale_runs_in_training_and_prefixes_the_prompts(tiny_sd, tmp_path):
    from conftest import two_squares

    from scenetok.scene import Scene
    from scenetok.training import train

    img, masks = two_squares()
    scene = Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "cat"])
    seen = []

    from scenetok.methods.disendiff import DisenDiff

    class Spy(DisenDiff):
        def losses(self, batch, out, cfg):
            seen.append((list(batch.prompts), batch.loss_region, batch.class_positions))
            terms = super().losses(batch, out, cfg)
            assert "prior" in terms  # the reference's channel-summed prior term, not the trainer's mean
            return terms

    train(scene, tmp_path / "dd", method=Spy(), model=str(tiny_sd), progress=False,
          overrides=["train.steps=12", "batch_size=1", "grad_accum=1", "prior.num_images=2", "prior.steps=2",
                     f"prior.cache_dir={tmp_path / 'cache'}", "preview_every=0", "checkpoint_every=0"])
    prompts = [p[0][0] for p in seen]
    assert any(p.split(" photo of")[0] in ("a far away", "very small", "zoomed in", "close up") for p in prompts)
    assert all(r is not None and r.shape == (1, 1, 16, 16) for _, r, _ in seen)
    assert all(cp[0][0] and cp[0][1] for _, _, cp in seen)  # class nouns found after any prefix
