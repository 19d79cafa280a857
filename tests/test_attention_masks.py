"""The attention → dense-CRF mask source (scenetok.masks.attention, scenetok.masks.crf)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import two_squares
from scenetok.masks.crf import CUTLER, CRFParams, dense_crf, have_pydensecrf, iou, refine_masks, unary_from_masks


def _noisy(masks: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (masks.astype(np.float32) + rng.normal(0.0, sigma, masks.shape)) >= 0.5


# ----------------------------------------------------------------------------------------------------
# dense CRF on hand-made inputs


def test_unary_is_the_softmax_of_the_mask_stack():
    m = np.zeros((2, 3, 3), bool)
    m[0, 0, 0] = True
    m[1, 0, 0] = True
    m[1, 2, 2] = True
    p = unary_from_masks(m, background=True)
    assert p.shape == (3, 3, 3)
    e = math.e
    # one mask on: e / (e + 2) for it, 1 / (e + 2) for the two others
    assert p[2, 2, 2].item() == pytest.approx(e / (e + 2))
    assert p[0, 2, 2].item() == pytest.approx(1 / (e + 2))
    # two masks on: background 1/(2e+1), each mask e/(2e+1); nothing on: background e/(e+2)
    assert p[0, 0, 0].item() == pytest.approx(1 / (2 * e + 1))
    assert p[1, 0, 0].item() == pytest.approx(e / (2 * e + 1))
    assert p[0, 1, 1].item() == pytest.approx(e / (e + 2))
    torch.testing.assert_close(p.sum(0), torch.ones(3, 3))


def test_crf_cleans_noisy_squares_exactly():
    img, masks = two_squares(64)
    truth = np.stack(masks)
    rough = _noisy(truth, 0.6)
    assert min(iou(rough[k], truth[k]) for k in range(2)) < 0.45  # the input is really noisy
    out = refine_masks(img, rough, backend="torch")
    assert out.dtype == bool and out.shape == truth.shape
    np.testing.assert_array_equal(out, truth)


def test_crf_without_pairwise_terms_is_the_unary_argmax():
    img, masks = two_squares(32)
    rough = _noisy(np.stack(masks), 0.5, seed=3)
    params = CRFParams(gaussian_weight=0.0, bilateral_weight=0.0)
    q = dense_crf(img, unary_from_masks(rough), params=params)
    torch.testing.assert_close(q, unary_from_masks(rough))


def test_downsampled_crf_matches_the_full_resolution_crf():
    """A blocky (8×8) mask shifted by 2 px on a 64 px image. The CRF run at 16 px (``max_side``) with
    joint-bilateral upsampling gives nearly the masks of the exact CRF at 64 px, keeps the red square's
    edges exactly where a bilinear upsampling blurs them, and improves on the input for both squares."""
    img, masks = two_squares(64)
    truth = np.stack(masks)
    small = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(truth).float()[None], 8)[0]
    blocky = torch.nn.functional.interpolate(small[None], size=(64, 64), mode="nearest")[0].numpy() >= 0.5
    rough = np.roll(blocky, 2, axis=2)
    full = refine_masks(img, rough, max_side=0)
    low = refine_masks(img, rough, max_side=16)
    bilinear = refine_masks(img, rough, max_side=16, upsample="bilinear")
    assert min(iou(low[k], full[k]) for k in range(2)) >= 0.99
    assert iou(low[0], truth[0]) == 1.0 > iou(bilinear[0], truth[0])
    assert all(iou(low[k], truth[k]) > iou(rough[k], truth[k]) + 0.1 for k in range(2))


def test_crf_params_scale_with_the_image_side():
    half = CUTLER.scaled(240)
    assert half.bilateral_sxy == pytest.approx(25.0) and half.gaussian_sxy == pytest.approx(1.5)
    assert half.bilateral_srgb == CUTLER.bilateral_srgb and half.reference_side == 0
    assert half.scaled(10) is half  # already in pixels


@pytest.mark.skipif(not have_pydensecrf(), reason="pydensecrf2 not installed (pip install 'scenetok[crf]')")
def test_torch_and_pydensecrf_backends_agree():
    img, masks = two_squares(64)
    rough = _noisy(np.stack(masks), 0.6, seed=1)
    probs = unary_from_masks(rough)
    a = dense_crf(img, probs, backend="torch")
    b = dense_crf(img, probs, backend="pydensecrf")
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.argmax(0).numpy(), b.argmax(0).numpy())
    assert (a - b).abs().max().item() < 1e-3


def test_crf_rejects_bad_inputs():
    img, masks = two_squares(32)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(img.astype(np.float32), unary_from_masks(np.stack(masks)))
    with pytest.raises(ValueError, match="probs"):
        dense_crf(img, torch.ones(2, 16, 16) / 2)
    with pytest.raises(ValueError, match="backend"):
        dense_crf(img, unary_from_masks(np.stack(masks)), backend="opencv")


# ----------------------------------------------------------------------------------------------------
# maps → masks without a model


def _blob(size: int, cy: float, cx: float, ry: float, rx: float | None = None) -> torch.Tensor:
    rx = ry if rx is None else rx
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return torch.exp(-((y - cy) ** 2 / (2 * ry**2) + (x - cx) ** 2 / (2 * rx**2)))


def test_maps_to_masks_recovers_the_squares_and_the_background():
    """Coarse 8×8 "attention" blobs roughly on each square (+ a flat map for the background token):
    thresholding alone gets the squares wrong; the CRF with the soft unary recovers them exactly, and with
    the paper's binary unary it still improves on thresholding."""
    from scenetok.masks.attention import AttentionMaskConfig, maps_to_masks

    img, masks = two_squares(64)
    truth = np.stack(masks)
    maps = torch.stack([_blob(8, 3.0, 2.0, 1.4), _blob(8, 4.5, 5.75, 1.8, 1.1), torch.full((8, 8), 0.3)])
    bg = [False, False, True]
    soft, scores = maps_to_masks(img, maps, bg, AttentionMaskConfig(unary="soft", background="complement"))
    assert soft.shape == (3, 64, 64) and soft.dtype == bool
    np.testing.assert_array_equal(soft[:2], truth)
    np.testing.assert_array_equal(soft[2], ~truth.any(0))
    assert np.all(scores > 0) and np.all(scores <= 1)
    plain, _ = maps_to_masks(img, maps, bg, AttentionMaskConfig(crf=False, background="complement"))
    binary, _ = maps_to_masks(img, maps, bg, AttentionMaskConfig(unary="binary", background="complement"))
    for k in range(2):
        assert iou(binary[k], truth[k]) > iou(plain[k], truth[k]) + 0.1 and iou(plain[k], truth[k]) < 0.85


def test_a_concept_is_never_left_empty():
    from scenetok.masks.attention import AttentionMaskConfig, maps_to_masks

    img, _ = two_squares(32)
    maps = torch.stack([_blob(8, 3.0, 2.0, 1.5), torch.zeros(8, 8)])  # the second map is flat: nothing above 0.5
    out, _ = maps_to_masks(img, maps, config=AttentionMaskConfig(min_fraction=0.05))
    assert out[0].any()
    assert out[1].sum() >= math.ceil(0.05 * 32 * 32)


def test_mask_config_validation():
    from scenetok.errors import ConfigError
    from scenetok.masks.attention import AttentionMaskConfig

    cfg = AttentionMaskConfig.from_dict({"t_range": [0.1, 0.9], "layers": [2, 4],
                                         "crf": {"enabled": False, "backend": "pydensecrf", "iterations": 5}})
    assert cfg.t_range == (0.1, 0.9) and cfg.layers == (2, 4) and cfg.crf is False
    assert cfg.crf_backend == "pydensecrf" and cfg.crf_params == {"iterations": 5}
    for bad in ({"t_range": [0.8, 0.2]}, {"t_range": [0.5]}, {"threshold": 1.5}, {"unary": "hard"}, {"layers": "some"},
                {"crf": {"sigma": 3}}):
        with pytest.raises(ConfigError):
            AttentionMaskConfig.from_dict(bad).validate()
    with pytest.raises(ConfigError, match="unknown mask option"):
        AttentionMaskConfig.from_dict({"thresold": 0.4})


# ----------------------------------------------------------------------------------------------------
# on the tiny random SD


@pytest.fixture(scope="module")
def tiny_model(tiny_sd):
    from scenetok.model import load_model

    return load_model(str(tiny_sd))


def test_mask_layers(tiny_model):
    from scenetok.attention import cross_attention_layers
    from scenetok.masks.attention import mask_layers

    sides = cross_attention_layers(tiny_model.unet, 16)  # 16 and 8 in the down/up blocks, 8 in the mid block
    assert sorted(set(sides.values())) == [8, 16]
    layers, size = mask_layers(tiny_model.unet, 16, "all")
    assert size == 16 and layers == list(sides)
    layers8, size8 = mask_layers(tiny_model.unet, 16, (2,))
    assert size8 == 8 and layers8 == [n for n, s in sides.items() if s == 8]
    layers16, size16 = mask_layers(tiny_model.unet, 16, (1,))
    assert size16 == 16 and layers16 == [n for n, s in sides.items() if s == 16]
    assert mask_layers(tiny_model.unet, 16, (4,))[1] == 8  # the side nearest 16 / 4


def test_token_attention_averages_probabilities(tiny_model):
    """Maps of every prompt position sum to 1 at every pixel (softmax over tokens, averaged)."""
    from scenetok.masks.attention import mask_layers, token_attention

    m = tiny_model
    ids = m.tokenizer(["a photo of red and blue"], padding="max_length", max_length=m.tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    enc = m.text_encoder(ids)[0]
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    layers, size = mask_layers(m.unet, 16, "all")
    maps = token_attention(m.unet, m.scheduler, lat, enc, [[i] for i in range(ids.shape[1])], layers=layers,
                           size=size, timesteps=5, batch_size=2)
    assert maps.shape == (ids.shape[1], 16, 16)
    torch.testing.assert_close(maps.sum(0), torch.ones(16, 16), atol=1e-4, rtol=0)
    # several positions for one concept: their mean
    pair = token_attention(m.unet, m.scheduler, lat, enc, [[4, 6]], layers=layers, size=size, timesteps=5,
                           batch_size=2)
    torch.testing.assert_close(pair[0], (maps[4] + maps[6]) / 2, atol=1e-5, rtol=1e-4)


def test_word_positions_in_prompt(tiny_model):
    from scenetok.errors import ConfigError
    from scenetok.masks.attention import word_token_positions

    tok = tiny_model.tokenizer
    pos = word_token_positions(tok, "a photo of red and zebra and red", ["red", "zebra", "red"])
    assert pos[0] == [4] and pos[2] == [len(pos[1]) + 7]
    assert len(pos[1]) > 1 and pos[1] == list(range(6, 6 + len(pos[1])))  # "zebra" is several byte pieces
    with pytest.raises(ConfigError, match="not in the prompt"):
        word_token_positions(tok, "a photo of red", ["blue"])


def test_attention_masks_on_the_tiny_model(tiny_sd, tiny_model):
    from diffusers import StableDiffusionPipeline

    from scenetok.masks import attention_masks

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    img, _ = two_squares(48)
    img = np.concatenate([img, img[:, :16]], axis=1)  # 48 × 64: not square
    out = attention_masks(pipe, img, ["red", "zebra", "background"], timesteps=4, batch_size=4, seed=0)
    assert [c.name for c in out] == ["red", "zebra", "background"]
    for c in out:
        assert c.mask.dtype == bool and c.mask.shape == (48, 64) and c.mask.any()
        assert c.source == "attention" and 0.0 <= c.score <= 1.0
    objects = out[0].mask | out[1].mask
    assert not (out[0].mask & out[1].mask).any()
    np.testing.assert_array_equal(out[2].mask, ~objects)
    # a pipeline or the trainer's model parts; the batch size changes nothing (the seed fixes timesteps and
    # noise)
    again = attention_masks(tiny_model, img, ["red", "zebra", "background"], timesteps=4, batch_size=2, seed=0)
    for a, b in zip(out, again):
        np.testing.assert_array_equal(a.mask, b.mask)
