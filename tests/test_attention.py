"""Selective cross-attention capture on a tiny random SD UNet (cross-attention at 16×16 and 8×8)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from scenetok.attention import (  # noqa: E402
    AttentionStore,
    CaptureProcessor,
    available_sizes,
    capture_attention,
    cross_attention_layers,
    install_naive_capture,
    select_layers,
)

T = 6  # text tokens


@pytest.fixture(scope="session")
def attn_sd_path(tmp_path_factory):
    """Tiny random SD folder: 32 px images, VAE factor 2 -> 16×16 latents, cross-attention at 16 and 8."""
    from scenetok.testing import TinySDConfig, build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("attn") / "sd", TinySDConfig(resolution=32))


@pytest.fixture(scope="session")
def unet(attn_sd_path):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(attn_sd_path, subfolder="unet").eval()
    model.requires_grad_(False)
    return model


def _inputs(batch=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    enc = torch.randn(batch, T, 32, generator=g)
    t = torch.tensor([10, 500, 900][:batch] + [100] * max(0, batch - 3))
    return x, t, enc


def _sdpa_only(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    return all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


# ---------------------------------------------------------------------------------------------------- layers


def test_layer_sizes_latent16(unet):
    layers = cross_attention_layers(unet, 16)
    assert set(layers) <= set(unet.attn_processors)
    assert all(name.endswith("attn2.processor") for name in layers)
    assert sorted(layers.values()) == [8, 8, 8, 8, 16, 16, 16]  # down1, mid, up0 x2 at 8; down0, up1 x2 at 16
    assert layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == 16
    assert layers["mid_block.attentions.0.transformer_blocks.0.attn2.processor"] == 8
    assert layers["up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"] == 16
    assert available_sizes(unet, 16) == [8, 16]


@pytest.mark.parametrize("latent, sizes", [(12, [6, 12]), (11, [6, 11]), (32, [16, 32])])
def test_layer_sizes_match_a_real_forward(unet, latent, sizes):
    assert available_sizes(unet, latent) == sizes
    expected = cross_attention_layers(unet, latent)
    x, t, enc = _inputs(batch=1, size=latent)
    with torch.no_grad(), capture_attention(unet, list(expected)) as store:
        unet(x, t, enc)
    seen = {name: m.shape[1] for name, m in store.layer_maps().items()}
    assert seen == {name: side * side for name, side in expected.items()}


def test_select_layers(unet):
    all_cross = select_layers(unet, 16)
    assert len(all_cross) == 7
    at16 = select_layers(unet, 16, sizes=[16])
    assert len(at16) == 3 and all(cross_attention_layers(unet, 16)[n] == 16 for n in at16)
    down16 = select_layers(unet, 16, sizes=[16], blocks=("down",))
    assert down16 == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"]
    assert select_layers(unet, 16, sizes=[8], blocks=("mid",)) == [
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
    ]
    with pytest.raises(ValueError, match=r"available sides: \[8, 16\]"):
        select_layers(unet, 16, sizes=[4])
    with pytest.raises(ValueError, match="block"):
        select_layers(unet, 16, blocks=("left",))


# ---------------------------------------------------------------------------------------------------- capture


def test_only_selected_layers_get_capture_and_are_restored(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    before = unet.attn_processors
    layers = select_layers(unet, 16, sizes=[16])
    with capture_attention(unet, layers) as store:
        during = unet.attn_processors
        for name, proc in during.items():
            if name in layers:
                assert isinstance(proc, CaptureProcessor) and proc.store is store
            else:
                assert isinstance(proc, AttnProcessor2_0) and proc is before[name]
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before)


def test_restore_on_exception(unet):
    before = unet.attn_processors
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(unet, select_layers(unet, 16)):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[n] is before[n] for n in before)
    with pytest.raises(ValueError, match="unknown attention layer"):
        with capture_attention(unet, ["no.such.layer.processor"]):
            pass
    assert _sdpa_only(unet)


def test_outputs_unchanged_and_maps_shape_batch3(unet):
    x, t, enc = _inputs(batch=3)
    with torch.no_grad():
        ref = unet(x, t, enc).sample
        with capture_attention(unet, select_layers(unet, 16)) as store:
            out = unet(x, t, enc).sample
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert len(store) == 7
    for m in store.layer_maps().values():
        assert m.shape[0] == 3 and m.shape[2] == T and m.dtype == torch.float32
    for size in (16, 8, 5):
        maps = store.maps(size)
        assert maps.shape == (3, T, size, size)
        assert torch.allclose(maps.sum(dim=1), torch.ones(3, size, size), atol=1e-5)
    assert store.maps().shape == (3, T, 16, 16)  # default: largest recorded side
    # the maps of different batch elements differ (the batch dimension is kept, not averaged)
    assert not torch.allclose(store.maps(8)[0], store.maps(8)[1])
    store.reset()
    assert len(store) == 0
    with pytest.raises(RuntimeError, match="no cross-attention maps"):
        store.maps()


def test_maps_average_layers_of_one_size(unet):
    x, t, enc = _inputs(batch=2)
    layers = select_layers(unet, 16, sizes=[8])
    with torch.no_grad(), capture_attention(unet, layers) as store:
        unet(x, t, enc)
    by_hand = torch.stack([m.transpose(1, 2).reshape(2, T, 8, 8) for m in store.layer_maps().values()]).mean(0)
    assert torch.allclose(store.maps(8), by_hand, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision(unet, dtype):
    x, t, enc = _inputs(batch=2)
    with torch.no_grad():
        with capture_attention(unet, select_layers(unet, 16)) as store:
            ref = unet(x, t, enc).sample
            ref_maps = store.maps(8)
            with torch.autocast("cpu", dtype=dtype):
                out = unet(x, t, enc).sample
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1
    maps = store.maps(8)
    assert maps.dtype == torch.float32
    assert torch.allclose(maps.sum(dim=1), torch.ones(2, 8, 8), atol=1e-4)
    assert (maps - ref_maps).abs().max() < 0.02


def test_gradients_reach_text_embeddings_and_unet(unet):
    x, t, enc = _inputs(batch=2)
    enc = enc.clone().requires_grad_(True)
    layers = select_layers(unet, 16, sizes=[8])
    key = dict(unet.named_modules())[layers[0].rsplit(".processor", 1)[0]].to_k.weight
    key.requires_grad_(True)
    try:
        with capture_attention(unet, layers) as store:
            unet(x, t, enc)
            maps = store.maps(8)
            target = torch.zeros_like(maps[:, 2])
            target[:, :4] = 1.0
            loss = (maps[:, 2] / maps[:, 2].amax(dim=(-2, -1), keepdim=True) - target).square().mean()
            loss.backward()
    finally:
        key.requires_grad_(False)
    assert enc.grad is not None and enc.grad.abs().sum() > 0
    assert key.grad is not None and key.grad.abs().sum() > 0
    key.grad = None


def test_bf16_autocast_backward(unet):
    x, t, enc = _inputs(batch=2)
    enc = enc.clone().requires_grad_(True)
    with capture_attention(unet, select_layers(unet, 16, sizes=[8])) as store:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(x, t, enc).sample
        loss = pred.float().square().mean() + store.maps(8)[:, 1].sum()
        loss.backward()
    assert torch.isfinite(enc.grad).all() and enc.grad.abs().sum() > 0


def test_gradient_checkpointing_keeps_map_gradients(unet):
    x, t, enc = _inputs(batch=1)
    layers = select_layers(unet, 16, sizes=[16])
    grads = []
    model = copy.deepcopy(unet)
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        e = enc.clone().requires_grad_(True)
        with capture_attention(model, layers) as store:
            model(x, t, e)
            store.maps(16)[:, 1, :8].sum().backward()
        grads.append(e.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_attention_mask_excludes_tokens(unet):
    x, t, enc = _inputs(batch=2)
    keep = torch.ones(2, T)
    keep[:, -2:] = 0  # last two tokens are padding
    with torch.no_grad():
        ref = unet(x, t, enc, encoder_attention_mask=keep).sample
        with capture_attention(unet, select_layers(unet, 16)) as store:
            out = unet(x, t, enc, encoder_attention_mask=keep).sample
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    maps = store.maps(16)
    assert maps[:, -2:].abs().max() < 1e-6
    assert torch.allclose(maps.sum(dim=1), torch.ones(2, 16, 16), atol=1e-5)


def test_self_attention_layer_without_encoder_states(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    attn = dict(unet.named_modules())[name]
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    store = AttentionStore()
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, hidden)
        out = CaptureProcessor(store, name)(attn, hidden)
    assert torch.allclose(out, ref, atol=1e-5)
    assert store.layer_maps()[name].shape == (2, 16, 16)
    with pytest.raises(RuntimeError):  # self-attention records never enter the cross-attention maps
        store.maps()


def test_naive_capture_records_every_layer(unet):
    x, t, enc = _inputs(batch=2)
    n_layers = len(unet.attn_processors)
    before = unet.attn_processors
    with torch.no_grad():
        ref = unet(x, t, enc).sample
        store, restore = install_naive_capture(unet)
        try:
            out = unet(x, t, enc).sample
        finally:
            restore()
    assert len(store) == n_layers and n_layers == 14
    assert any(m.shape[1] == m.shape[2] == 256 for m in store.layer_maps().values())  # 16x16 self-attention
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert store.maps(8).shape == (2, T, 8, 8)
    assert all(unet.attn_processors[n] is before[n] for n in before)


# ---------------------------------------------------------------------------------------------------- peft


def test_capture_with_peft_lora(unet):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(unet)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    x, t, enc = _inputs(batch=2)
    layers = select_layers(model, 16, sizes=[16])
    assert layers == select_layers(unet, 16, sizes=[16])
    with torch.no_grad():
        ref = model(x, t, enc).sample
        base = unet(x, t, enc).sample
        with capture_attention(model, layers) as store:
            out = model(x, t, enc).sample
    assert not torch.allclose(ref, base, atol=1e-4)  # the LoRA layers change the output...
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)  # ...and still do under capture
    assert len(store) == 3

    wrapped = get_peft_model(copy.deepcopy(unet), LoraConfig(r=4, target_modules=["to_k", "to_v"]))
    assert select_layers(wrapped, 16, sizes=[16]) == layers
    with torch.no_grad(), capture_attention(wrapped, layers) as store:
        wrapped(x, t, enc)
    assert len(store) == 3 and store.maps(16).shape == (2, T, 16, 16)
    assert _sdpa_only(wrapped.get_base_model())
