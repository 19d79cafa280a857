"""Applications on a tiny random SD: community LoRAs (load, stack, scale, remove, refuse), inpainting with a
9-channel UNet (what of a bundle transfers, end to end), prompt forms of variations, output-file safety."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scenetok import api
from scenetok.bundle import BundleContent, HandleInfo, write_bundle
from scenetok.errors import BundleError, ConfigError, ScenetokError
from scenetok.generation import load_pipeline
from scenetok.generation.loras import add_lora, check_lora_fits, lora_scales, read_lora_layers, remove_lora

PROMPT = "a photo of <asset0> on <asset1>"


def _image(pipe, prompt=PROMPT, seed=0):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=3, height=32, width=32, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


def _peft_state(base, seed=0, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A random LoRA (B ≠ 0) for the UNet at ``base``, in peft's key form."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(str(base / "unet"))
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False),
                     adapter_name="x")
    return {k: v * 3 for k, v in get_peft_model_state_dict(unet, adapter_name="x").items()}


def _save_diffusers(state, path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    StableDiffusionPipeline.save_lora_weights(str(path.parent), unet_lora_layers=convert_state_dict_to_diffusers(state),
                                              weight_name=path.name)
    return path


def _save_kohya(state, path):
    from scenetok.io import atomic_save_safetensors
    from scenetok.lora import to_kohya

    return atomic_save_safetensors(to_kohya({"unet": state}, 4.0), path)


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory):
    from scenetok.testing import TinySDConfig, build_tiny_sd

    root = tmp_path_factory.mktemp("loras")
    state = _peft_state(tiny_sd)
    other = build_tiny_sd(root / "other-sd", TinySDConfig(resolution=32, text_hidden=48))
    return {"diffusers": _save_diffusers(state, root / "style.safetensors"),
            "kohya": _save_kohya(state, root / "style_kohya.safetensors"),
            "other": _save_diffusers(_peft_state(other), root / "other_base.safetensors")}


@pytest.fixture(scope="module")
def bundle(tiny_sd, tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    handles = [HandleInfo("<asset0>", "creature", "toy", "bear"), HandleInfo("<asset1>", "bowl", "bowl", "bowl")]
    return write_bundle(tmp_path_factory.mktemp("app") / "bundle", BundleContent(
        method="break-a-scene", base_model=str(tiny_sd), handles=handles,
        embeddings={h.token: torch.randn(32, generator=g) for h in handles}, config={}, resolution=32,
        input_hashes={}))


# ---------------------------------------------------------------------------------------------- LoRA


def test_lora_layout_is_read_in_both_namings(loras):
    fmt_d, layers_d = read_lora_layers(loras["diffusers"])
    fmt_k, layers_k = read_lora_layers(loras["kohya"])
    assert (fmt_d, fmt_k) == ("diffusers", "kohya")
    assert len(layers_d) == len(layers_k) > 0  # every adapted layer, once
    assert all(ly.down[0] == 4 and ly.up[1] == 4 for ly in layers_d + layers_k)


def test_lora_changes_the_image_and_removing_it_restores_it_bit_for_bit(bundle, loras):
    pipe, _ = load_pipeline(bundle, device="cpu")
    plain = _image(pipe)
    name = add_lora(pipe, loras["diffusers"], 1.0)
    styled = _image(pipe)
    assert np.abs(styled - plain).max() > 0.02  # the LoRA changes the output
    half = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert half.scaling[name] == pytest.approx(1.0)
    pipe.set_adapters([name], [0.5])
    assert half.scaling[name] == pytest.approx(0.5)  # weights are peft's scaling, set explicitly
    pipe.set_adapters([name], [1.0])
    k = add_lora(pipe, loras["kohya"], 0.0)  # the same adapters in kohya naming, stacked at weight 0
    assert lora_scales(pipe) == {name: 1.0, k: 0.0} and k != name
    np.testing.assert_array_equal(_image(pipe), styled)  # a weight-0 adapter adds exactly nothing
    remove_lora(pipe, name)
    pipe.set_adapters([k], [1.0])
    np.testing.assert_allclose(_image(pipe), styled, atol=2e-3)  # kohya file = diffusers file
    remove_lora(pipe, k)
    np.testing.assert_array_equal(_image(pipe), plain)  # bundle-only image, bit for bit


def test_lora_stacks_with_the_bundles_own_adapter(tiny_sd, loras, tmp_path):
    from conftest import two_squares
    from scenetok.lora import ADAPTER_NAME
    from scenetok.scene import Scene
    from scenetok.training import train

    img, masks = two_squares()
    scene = Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "square"])
    b = train(scene, tmp_path / "bas", model=str(tiny_sd), progress=False,
              overrides=["phase1.steps=1", "phase2.steps=2", "adapter.type=lora", "adapter.rank=2", "adapter.lr=1e-2",
                         "preview_every=100", "checkpoint_every=0"])
    pipe, _ = load_pipeline(b, device="cpu")
    own = _image(pipe)
    name = add_lora(pipe, loras["diffusers"], 0.7)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    assert set(layer.lora_A) == {ADAPTER_NAME, name}
    assert set(pipe.get_active_adapters()) == {ADAPTER_NAME, name}
    assert layer.scaling[name] == pytest.approx(0.7) and layer.scaling[ADAPTER_NAME] == pytest.approx(1.0)
    assert np.abs(_image(pipe) - own).max() > 0.01
    remove_lora(pipe, name)
    np.testing.assert_array_equal(_image(pipe), own)  # the bundle's own LoRA still on, at 1.0


def test_lora_for_another_base_model_fails_clearly(bundle, loras, tmp_path):
    pipe, _ = load_pipeline(bundle, device="cpu")
    with pytest.raises(ConfigError, match="made for another base model") as e:
        check_lora_fits(pipe, loras["other"])
    assert "32 → 32" in e.value.message and "48 → 32" in e.value.message and "attn2.to_k" in e.value.message
    assert pipe.get_list_adapters() == {}  # nothing was loaded
    (tmp_path / "style.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a .safetensors file"):
        read_lora_layers(tmp_path / "style.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_lora_layers(tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="does not exist"):
        read_lora_layers(tmp_path / "missing.safetensors")


def test_generate_with_lora_from_the_cli(bundle, loras, tmp_path, capsys):
    from scenetok.cli import main

    common = ["generate", str(bundle.path), PROMPT, "-n", "1", "--steps", "2", "--quiet"]
    assert main(common + ["-o", str(tmp_path / "plain")]) == 0
    assert main(common + ["-o", str(tmp_path / "lora"), "--lora", str(loras["kohya"]), "--lora-scale", "0.8"]) == 0
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "plain" / "00_seed0.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "lora" / "00_seed0.png")).astype(int)
    assert np.abs(a - b).max() > 0
    assert main(common + ["-o", str(tmp_path / "x"), "--lora", str(loras["other"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: LoRA other_base.safetensors was made for another base model")
    assert not (tmp_path / "x").exists()  # nothing written


# ------------------------------------------------------------------------------------ variations prompts


def test_variation_prompt_follows_the_methods_training_form(bundle, tiny_sd, tmp_path):
    from scenetok.errors import PromptError
    from scenetok.generation.variations import variation_prompt

    assert variation_prompt(bundle) == "a photo of <asset0> and <asset1>"
    assert variation_prompt(bundle, "1") == "a photo of <asset1>"
    assert variation_prompt(bundle, [1, 0], suffix="in the snow") == "a photo of <asset1> and <asset0> in the snow"
    with pytest.raises(PromptError, match="no handle number 5"):
        variation_prompt(bundle, "5")
    with pytest.raises(ConfigError, match="no background handle"):
        variation_prompt(bundle, background=True)
    handles = [HandleInfo("<asset0>", "cat", "cat", "cat"), HandleInfo("<asset1>", "dog", "dog", "dog"),
               HandleInfo("<asset2>", "background", "background", "background", is_background=True)]
    dd = write_bundle(tmp_path / "dd", BundleContent(
        method="disendiff", base_model=str(tiny_sd), handles=handles,
        embeddings={h.token: torch.zeros(32) for h in handles}, config={"prompt_template": "photo of a {tokens}"},
        resolution=32, input_hashes={}))
    assert variation_prompt(dd) == "photo of a <asset0> cat and <asset1> dog"
    assert variation_prompt(dd, background=True) == "photo of a <asset0> cat and <asset1> dog and <asset2> background"


def test_variations_never_replace_files(bundle, tmp_path):
    out = tmp_path / "v"
    first = api.variations(bundle, n=2, steps=2, out_dir=out, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00_seed0.png", "01_seed1.png", "contact_sheet.png", "variations.jsonl"]
    before = (out / "00_seed0.png").read_bytes()
    with pytest.raises(ScenetokError, match="already holds 00_seed0.png"):
        api.variations(bundle, n=2, seed=0, steps=3, out_dir=out, progress=False)
    assert (out / "00_seed0.png").read_bytes() == before
    again = api.variations(bundle, n=1, seed=1, steps=2, progress=False)  # image 1 alone, from its seed
    # the same picture; batch 1 vs 2 may round one uint8 step apart on a CPU BLAS (another seed differs everywhere)
    diff = np.abs(np.asarray(again[0].image).astype(int) - np.asarray(first[1].image).astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.01
    # --overwrite replaces this command's own earlier files (keeping the record of the others) ...
    api.variations(bundle, n=1, seed=0, steps=3, out_dir=out, overwrite=True, progress=False)
    rows = [json.loads(x) for x in (out / "variations.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == ["00_seed0.png", "01_seed1.png"]
    assert (out / "00_seed0.png").read_bytes() != before
    # ... but never a file someone else put there
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "00_seed0.png").write_bytes(b"my own picture")
    with pytest.raises(ScenetokError, match="did not write"):
        api.variations(bundle, n=1, seed=0, steps=2, out_dir=mine, overwrite=True, progress=False)
    assert (mine / "00_seed0.png").read_bytes() == b"my own picture"


# --------------------------------------------------------------------------------------------- inpainting


@pytest.fixture(scope="module")
def inpaint_model(tiny_sd, tmp_path_factory):
    """The tiny SD with a 9-channel UNet (random conv_in; every other tensor of the base UNet plus 0.01)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    base = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    cfg = dict(base.unet.config)
    cfg["in_channels"] = 9
    unet = UNet2DConditionModel.from_config(cfg)
    state = {k: (v + 0.01 if k != "conv_in.weight" else unet.state_dict()[k]) for k, v in base.unet.state_dict().items()}
    unet.load_state_dict(state)
    pipe = StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=unet, scheduler=base.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    path = tmp_path_factory.mktemp("inpaint") / "tiny-inpaint"
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def finetuned_bundle(tiny_sd, tmp_path_factory):
    """A bundle whose UNet changed in one cross-attention K (transferable) and in conv_in (4 channels: not)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd / "unet"))
    with torch.no_grad():
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.add_(0.5)
        unet.conv_in.weight.mul_(1.5)
    g = torch.Generator().manual_seed(2)
    handles = [HandleInfo("<asset0>", "creature", "toy", "bear"), HandleInfo("<asset1>", "bowl", "bowl", "bowl")]
    return write_bundle(tmp_path_factory.mktemp("ft") / "bundle", BundleContent(
        method="break-a-scene", base_model=str(tiny_sd), handles=handles,
        embeddings={h.token: torch.randn(32, generator=g) for h in handles}, components={"unet": unet},
        config={}, resolution=32, input_hashes={}))


def test_inpaint_transfers_deltas_and_names_what_cannot(finetuned_bundle, inpaint_model):
    from diffusers import UNet2DConditionModel

    from scenetok.generation.inpaint import load_inpaint_pipeline

    with pytest.warns(UserWarning, match="cannot transfer"):
        pipe, _, report = load_inpaint_pipeline(finetuned_bundle, str(inpaint_model), device="cpu")
    assert report.dropped == ["unet conv_in.weight: shape (32, 4, 3, 3) here, (32, 9, 3, 3) in the inpainting model"]
    assert any("1 fine-tuned tensor" in a for a in report.applied)
    raw = UNet2DConditionModel.from_pretrained(str(inpaint_model / "unet"))
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    got, want = pipe.unet.state_dict()[k], raw.state_dict()[k] + 0.5
    assert torch.allclose(got, want, atol=1e-6)  # inpainting weights + the bundle's delta
    w = pipe.text_encoder.get_input_embeddings().weight
    emb = finetuned_bundle.embeddings()
    assert torch.equal(w[pipe.tokenizer.convert_tokens_to_ids("<asset1>")], emb["<asset1>"])
    with pytest.raises(BundleError, match="cannot transfer"):
        load_inpaint_pipeline(finetuned_bundle, str(inpaint_model), device="cpu", strict=True)
    with pytest.raises(ConfigError, match="not an inpainting model"):
        load_inpaint_pipeline(finetuned_bundle, str(finetuned_bundle.base_model), device="cpu")


def test_inpaint_end_to_end_keeps_the_outside(bundle, inpaint_model, tmp_path):
    from scenetok.io import atomic_write_png

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    atomic_write_png(tmp_path / "photo.png", photo)
    out = api.edit(bundle, tmp_path / "photo.png", ["rect:4,4,20,20"], ["a photo of <asset0>"], n=2, steps=3,
                   inpaint_model=str(inpaint_model), device="cpu", out_dir=tmp_path / "o", progress=False)
    assert len(out) == 2 and out[0].image.size == (40, 40)
    for r in out:
        a = np.asarray(r.image)
        assert np.array_equal(a[~r.region], photo[~r.region])
        assert np.abs(a[4:20, 4:20].astype(int) - photo[4:20, 4:20]).mean() > 5  # the region was redrawn
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"edit_00_seed0.png", "edit_01_seed1.png", "edit_sheet.png",
                                                            "edits.jsonl"}


# ------------------------------------------------------------------------------------------ blended edit


def test_blended_edit_of_a_non_square_photo_keeps_size_and_outside(bundle, tmp_path):
    from scenetok.generation.edit import latent_stride, working_size

    rng = np.random.default_rng(1)
    photo = rng.integers(0, 255, (36, 52, 3), dtype=np.uint8)
    region = np.zeros((36, 52), bool)
    region[10:20, 30:44] = True
    out = api.edit(bundle, photo, [region], ["a photo of <asset1>"], n=1, steps=3, dilate=2, device="cpu",
                   progress=False)[0]
    a = np.asarray(out.image)
    assert a.shape == photo.shape
    assert np.array_equal(a[~out.region], photo[~out.region])
    assert out.region[region].all() and out.region.mean() < 0.3
    pipe, _ = load_pipeline(bundle, device="cpu")
    vae, multiple = latent_stride(pipe)
    assert (vae, multiple) == (2, 4)  # tiny SD: 2× VAE, UNet with two levels
    assert working_size((36, 52), 32, multiple) == (32, 48)  # shorter side 32, aspect kept, multiples of 4


def test_region_from_a_sam_box(bundle, tmp_path):
    from scenetok.generation.edit import region_mask
    from scenetok.testing import build_tiny_sam

    sam = build_tiny_sam(tmp_path / "sam", full_masks=True)
    photo = np.full((64, 64, 3), 128, np.uint8)
    mask, label = region_mask("box:16,20,40,44", photo, sam_model=str(sam), device="cpu")
    assert label == "box:16,20,40,44"
    ys, xs = np.nonzero(mask)
    # SAM (every pixel on) clipped to the box grown by the box margin
    assert 10 <= xs.min() <= 16 and 40 <= xs.max() <= 46 and 14 <= ys.min() <= 20 and 44 <= ys.max() <= 50
    rect, _ = region_mask("rect:16,20,40,44", photo)
    assert rect.sum() == 24 * 24 and rect[20:44, 16:40].all()
    with pytest.raises(ConfigError, match="cannot read the box"):
        region_mask("box:1,2,3", photo, sam_model=str(sam))
