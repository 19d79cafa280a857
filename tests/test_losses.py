"""Loss terms and map operations on tiny hand-made tensors with hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch

from scenetok.losses import (
    bas_attention_loss,
    gaussian_smooth,
    masked_diffusion_loss,
    minmax_normalize,
    resize_masks,
    soft_iou,
)


# ---------------------------------------------------------------------------------------------------- resize


def test_resize_masks_area_is_covered_fraction():
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[:2, :2] = True  # top-left 2x2 block fully covered
    m[0, 2] = True  # one pixel of the top-right block
    out = resize_masks(m, 2)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[1.0, 0.25], [0.0, 0.0]]))


def test_resize_masks_nearest_stays_binary_and_keeps_leading_dims():
    m = torch.zeros(2, 3, 8, 8)
    m[1, 2, 4:, 4:] = 1.0
    out = resize_masks(m, 4, mode="nearest")
    assert out.shape == (2, 3, 4, 4)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    expected = torch.zeros(4, 4)
    expected[2:, 2:] = 1.0
    assert torch.equal(out[1, 2], expected)
    assert out[0].sum() == 0


def test_resize_masks_upsample_and_bad_mode():
    m = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    out = resize_masks(m, 4)
    assert out.shape == (4, 4)
    assert torch.allclose(out[:2, :2], torch.ones(2, 2)) and torch.allclose(out[2:, 2:], torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="mode"):
        resize_masks(m, 4, mode="bicubic")


# ---------------------------------------------------------------------------------------------------- masked loss


def test_masked_diffusion_loss_hand_value():
    pred = torch.ones(1, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # (B, h, w): 1 pixel x 2 channels of 8 elements
    assert masked_diffusion_loss(pred, target, mask).item() == pytest.approx(0.25)
    assert masked_diffusion_loss(pred, target, mask[:, None]).item() == pytest.approx(0.25)
    # soft mask value 0.5 -> error (1*0.5)^2 = 0.25 on 2 of 8 elements
    assert masked_diffusion_loss(pred, target, mask * 0.5).item() == pytest.approx(0.0625)


def test_masked_diffusion_loss_ones_mask_equals_mse():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    plain = torch.nn.functional.mse_loss(pred, target)
    assert torch.allclose(masked_diffusion_loss(pred, target), plain)
    assert torch.allclose(masked_diffusion_loss(pred, target, torch.ones(2, 1, 8, 8)), plain)


def test_masked_diffusion_loss_ignores_excluded_pixels():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1.0
    base = masked_diffusion_loss(pred, target, mask)
    changed = pred.clone()
    changed[:, :, 4:] += 100.0  # only excluded pixels change
    assert torch.allclose(masked_diffusion_loss(changed, target, mask), base)
    assert masked_diffusion_loss(pred, target, torch.zeros(2, 8, 8)).item() == 0.0


def test_masked_diffusion_loss_bf16_in_fp32():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    target = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).bfloat16()
    out = masked_diffusion_loss(pred, target, mask)
    assert out.dtype == torch.float32
    ref = ((pred.double() - target.double()) * mask.double()).square().mean()
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)


def test_masked_diffusion_loss_bad_mask_shape():
    with pytest.raises(ValueError, match="latent size"):
        masked_diffusion_loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.ones(1, 1, 4, 4))


# ---------------------------------------------------------------------------------------------------- BaS loss


def test_bas_attention_loss_hand_value():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 2.0]]]])  # (1, 2, 2, 2)
    masks = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]]]])
    # token 0: map/max = [.25, .5, .75, 1]; minus mask = [.25, .5, -.25, 0]; squares sum .375; mean .09375
    # token 1: map/max = [0, 0, 0, 1] equals its mask -> 0
    assert bas_attention_loss(maps, masks).item() == pytest.approx(0.09375)
    # second batch element with error 1 everywhere on token 1 only: mean over b of (.09375, 1)
    maps2 = torch.cat([maps, torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[5.0, 5.0], [5.0, 5.0]]]])])
    masks2 = torch.cat([masks, torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])])
    assert bas_attention_loss(maps2, masks2).item() == pytest.approx((0.09375 + 1.0) / 2)


def test_bas_attention_loss_valid_skips_terms():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    masks = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    assert bas_attention_loss(maps, masks).item() == pytest.approx(0.09375 + 1.0)
    valid = torch.tensor([[True, False]])
    assert bas_attention_loss(maps, masks, valid).item() == pytest.approx(0.09375)
    assert bas_attention_loss(maps, masks, torch.tensor([[False, False]])).item() == 0.0


def test_bas_attention_loss_scale_invariant_and_zero_map_guard():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 2, 4, 4, generator=g)
    masks = (torch.rand(3, 2, 4, 4, generator=g) > 0.5).float()
    a = bas_attention_loss(maps, masks)
    b = bas_attention_loss(maps * 37.5, masks)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    zero = torch.zeros(1, 1, 2, 2, requires_grad=True)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    out = bas_attention_loss(zero, mask)
    assert out.item() == pytest.approx(0.25)  # map/eps = 0 everywhere; mean of mask^2
    out.backward()
    assert torch.isfinite(zero.grad).all()


def test_bas_attention_loss_bf16_matches_fp32():
    g = torch.Generator().manual_seed(4)
    maps = torch.rand(2, 3, 8, 8, generator=g).bfloat16()
    masks = torch.rand(2, 3, 8, 8, generator=g)
    out = bas_attention_loss(maps, masks)
    assert out.dtype == torch.float32
    ref = bas_attention_loss(maps.double(), masks.double())
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_bas_attention_loss_shape_errors():
    with pytest.raises(ValueError):
        bas_attention_loss(torch.rand(1, 2, 4, 4), torch.rand(1, 2, 2, 2))
    with pytest.raises(ValueError):
        bas_attention_loss(torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4), torch.ones(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------- building blocks


def test_minmax_normalize_hand_value():
    x = torch.tensor([[[1.0, 3.0], [5.0, 9.0]]])
    assert torch.allclose(minmax_normalize(x), torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]), atol=1e-6)
    assert torch.allclose(minmax_normalize(torch.full((2, 2), 4.0)), torch.zeros(2, 2))  # constant -> 0
    # other dims: normalise each row separately
    assert torch.allclose(minmax_normalize(x, dims=-1), torch.tensor([[[0.0, 1.0], [0.0, 1.0]]]), atol=1e-6)


def _g(sigma):
    side = math.exp(-1.0 / (2 * sigma**2))
    z = 1.0 + 2.0 * side
    return 1.0 / z, side / z  # centre and side weight of the 1-D kernel


def test_gaussian_smooth_delta_centre_and_reflect_padding():
    c, s = _g(0.5)  # c = 0.786986, s = 0.106507
    assert c == pytest.approx(0.786986, abs=1e-6)
    x = torch.zeros(1, 5, 5)
    x[0, 2, 2] = 1.0
    out = gaussian_smooth(x, 3, 0.5)
    expected = torch.tensor([[s * s, s * c, s * s], [s * c, c * c, s * c], [s * s, s * c, s * s]])
    assert torch.allclose(out[0, 1:4, 1:4], expected, atol=1e-6)
    assert out[0, 0].abs().max() == 0 and out.sum().item() == pytest.approx(1.0, abs=1e-6)
    # delta in the corner: reflect padding mirrors about the edge pixel (row -1 reads row 1), so the
    # corner keeps only the centre weight (replicate padding would give (c+s)^2 there)
    x = torch.zeros(3, 3)
    x[0, 0] = 1.0
    out = gaussian_smooth(x, 3, 0.5)
    assert out[0, 0].item() == pytest.approx(c * c, abs=1e-6)
    assert out[1, 0].item() == pytest.approx(s * c, abs=1e-6)
    assert out[1, 1].item() == pytest.approx(s * s, abs=1e-6)
    assert out[2, 2].item() == pytest.approx(0.0, abs=1e-7)


def test_gaussian_smooth_keeps_constants_and_shape():
    x = torch.full((2, 3, 5, 4), 0.7)
    out = gaussian_smooth(x, 5, 1.3)
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-6)
    with pytest.raises(ValueError):
        gaussian_smooth(x, 4)


def test_soft_iou_hand_value():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert soft_iou(a, b).item() == pytest.approx(2.0 / 3.0)  # (1+1) / (3-1+1)
    assert soft_iou(b, b).item() == pytest.approx(1.0)
    batch = torch.stack([a, b])
    assert soft_iou(batch, torch.stack([b, b])).shape == (2,)
