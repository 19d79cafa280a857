"""SDXL on a tiny random SDXL built in code (two text encoders, pooled embedding + size ids as added
conditioning, cross-attention at latent/2 and latent/4 only): family detection, handles in both encoders,
every method trains and generates, SDXL embedding files load in diffusers, SDXL LoRAs in both namings,
bundles refuse the other family, the low-memory preset."""

from __future__ import annotations

import json

import pytest
import torch

from scenetok.errors import BundleError

PROMPT = "a photo of <asset0> and <asset1>"
FAST = ["preview_every=0", "checkpoint_every=0", "batch_size=1", "grad_accum=1", "collage.num_images=3", "prior.num_images=1", "prior.steps=2"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A tiny random SDXL folder: 32 px images, 16×16 latents, cross-attention at 8 and 4 (two layers at 4)."""
    from scenetok.testing import TinySDXLConfig, build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", TinySDXLConfig(resolution=32))


@pytest.fixture(scope="module")
def scene():
    from conftest import two_squares
    from scenetok.scene import Scene

    img, masks = two_squares()
    return Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "square"])


def _one_step_each(method: str) -> list[str]:
    """One step for every phase (every ``*.steps`` setting but the prior images'), the EM masks cheap."""
    from scenetok.config import flatten
    from scenetok.methods import get_method
    from scenetok.training.settings import method_config

    cfg = flatten(method_config(get_method(method)))
    out = [f"{k}=1" for k, v in cfg.items() if k.endswith(".steps") and not k.startswith("prior.") and v > 0]
    return out + (["masks.timesteps=2", "masks.batch_size=2"] if "masks.timesteps" in cfg else [])


def _train(scene, out, model, method, extra=()):
    from scenetok.training import train

    return train(scene, out, method=method, model=str(model), device="cpu", progress=False,
                 overrides=_one_step_each(method) + FAST + [f"prior.cache_dir={out.parent / 'prior'}", *extra])


@pytest.fixture(scope="module")
def bas_bundle(tiny_sdxl, scene, tmp_path_factory):
    return _train(scene, tmp_path_factory.mktemp("bas") / "bundle", tiny_sdxl, "break-a-scene")


# ----------------------------------------------------------------------------------------------------
# the family


def test_family_is_detected_from_the_checkpoint(tiny_sdxl, tiny_sd):
    from scenetok.model import StableDiffusion, StableDiffusionXL, family_of, load_model

    assert family_of(tiny_sdxl) is StableDiffusionXL
    assert family_of(tiny_sd) is StableDiffusion
    m = load_model(tiny_sdxl)
    assert m.family is StableDiffusionXL and m.text_encoder_2 is not None
    assert [c for c, _, _ in m.text_encoders] == ["text_encoder", "text_encoder_2"]
    assert m.native_resolution == 32  # the UNet's sample size × VAE factor (1024 for a real SDXL)


def test_prompt_encoding_and_added_conditioning_are_what_the_unet_expects(tiny_sdxl):
    from scenetok.model import load_model

    m = load_model(tiny_sdxl)
    ids = m.token_ids(["a photo of a cat", "a dog"])
    assert ids.shape == (2, 2, 77)  # one row per tokenizer
    assert ids[0, 1, -1] != ids[0, 0, -1]  # the second tokenizer pads with "!", the first with end-of-text
    with torch.no_grad():
        text = m.encode_prompt(ids)
        assert text.shape == (2, 77, 32 + 48)  # penultimate hidden states of both encoders, concatenated
        assert m.pooled_prompt.shape == (2, 16)
        extra = m.extra_conditioning(2, 24)
        assert extra["added_cond_kwargs"]["time_ids"].tolist() == [[24, 24, 0, 0, 24, 24]] * 2
        noisy, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
        expected = m.unet(noisy, t, text, added_cond_kwargs={
            "text_embeds": m.pooled_prompt, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}).sample
        assert torch.allclose(m.predict(noisy, t, text), expected)


def test_each_handle_gets_a_row_in_both_encoders_from_its_init_word(tiny_sdxl, scene, tmp_path):
    from scenetok.methods import get_method
    from scenetok.tokens import word_ids
    from scenetok.training.run import setup_run
    from scenetok.training.settings import method_config

    method = get_method("break-a-scene")
    run = setup_run([scene], method, method_config(method), str(tiny_sdxl), tmp_path, "cpu", progress=False)
    m = run.model
    for _, tok, te in m.text_encoders:
        vecs = run.handles.vectors(te)
        base = run.handles.module(te).base.weight
        for k, concept in enumerate(run.concepts):
            want = base[word_ids(tok, concept.init_word)].float().mean(0)
            assert torch.allclose(vecs[k], want)
    assert run.handles.vectors(m.text_encoder).shape[1] == 32
    assert run.handles.vectors(m.text_encoder_2).shape[1] == 48


def test_attention_layers_follow_sdxls_layout(tiny_sdxl):
    """Cross-attention only at latent/2 and latent/4; each method's choice (docs/methods.md)."""
    from scenetok.attention import available_sizes
    from scenetok.methods import get_method
    from scenetok.model import load_model
    from scenetok.training.settings import method_config

    unet = load_model(tiny_sdxl).unet
    assert available_sizes(unet, 16) == [4, 8]
    chosen = {}
    for name in ("break-a-scene", "disendiff", "textual-localization", "em-masks"):
        method = get_method(name)
        chosen[name] = method.attention_sizes(method_config(method), 16, [4, 8])
    assert chosen["break-a-scene"] == [4]  # latent/4: SDXL's 32×32 level at 1024 px (10 layers)
    assert set(chosen["disendiff"]) <= {4, 8} and chosen["disendiff"]
    assert set(chosen["textual-localization"]) <= {4, 8} and chosen["textual-localization"]


# ----------------------------------------------------------------------------------------------------
# every method trains and generates


@pytest.mark.parametrize("method", ["em-masks", "disendiff", "textual-localization", "ti-m", "db-m", "cd-m"])
def test_every_method_trains_and_generates_on_sdxl(method, tiny_sdxl, scene, tmp_path):
    from scenetok.generation import generate

    b = _train(scene, tmp_path / "bundle", tiny_sdxl, method)
    assert b.family == "sdxl"
    assert b.embeddings(1)["<asset0>"].shape == (32,) and b.embeddings(2)["<asset0>"].shape == (48,)
    rows = [json.loads(x) for x in (b.path / "train_log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    images = generate(b.path, PROMPT, n=1, steps=2, progress=False)
    assert images[0].image.size == (32, 32)


def test_break_a_scene_bundle_generates_with_attention_varies_and_edits(bas_bundle, tmp_path):
    import numpy as np

    from scenetok import api

    assert set(bas_bundle.manifest["components"]) == {"unet", "text_encoder", "text_encoder_2"}
    out = api.generate(bas_bundle.path, PROMPT, n=1, steps=2, attention=True, progress=False)
    assert set(out[0].attention) == {"<asset0>", "<asset1>"}
    assert len(api.variations(bas_bundle.path, n=1, steps=2, progress=False)) == 1
    photo = np.full((32, 32, 3), 128, np.uint8)
    edited = api.edit(bas_bundle.path, photo, ["rect:4,4,20,20"], ["a photo of <asset0>"], steps=2, progress=False)
    assert edited[0].image.shape if hasattr(edited[0].image, "shape") else edited[0].image.size


# ----------------------------------------------------------------------------------------------------
# export


def test_sdxl_embedding_files_load_in_diffusers_for_both_encoders(bas_bundle, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    for tok in bas_bundle.tokens:
        state = load_file(str(bas_bundle.embedding_file(tok, "a1111")))
        assert set(state) == {"clip_l", "clip_g"}  # what A1111 and ComfyUI read for SDXL
        assert state["clip_l"].shape == (1, 32) and state["clip_g"].shape == (1, 48)
        pipe.load_textual_inversion(state["clip_l"], token=tok, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=tok, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        for tokenizer, te, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                   (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
            row = te.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tok)]
            assert torch.equal(row.detach(), state[key][0])
    # the per-encoder diffusers files hold the same rows
    assert torch.equal(bas_bundle.embeddings(2)["<asset0>"],
                       load_file(str(bas_bundle.embedding_file("<asset0>", "a1111")))["clip_g"][0])


def test_sdxl_lora_bundle_in_diffusers_and_kohya_naming(tiny_sdxl, scene, tmp_path):
    from safetensors.torch import load_file

    from scenetok.generation import generate, load_pipeline

    b = _train(scene, tmp_path / "lora", tiny_sdxl, "break-a-scene", ["adapter.type=lora"])
    entry = b.lora()
    assert set(entry["components"]) == {"unet", "text_encoder", "text_encoder_2"}
    diffusers_keys = set(load_file(str(entry["file"])))
    assert any(k.startswith("unet.") for k in diffusers_keys)
    assert any(k.startswith("text_encoder_2.") for k in diffusers_keys)
    kohya = load_file(str(entry["kohya_file"]))
    prefixes = {k.split("_")[1] for k in kohya}
    assert {"unet", "te1", "te2"} <= prefixes
    unet_keys = [k for k in kohya if k.startswith("lora_unet_")]
    assert unet_keys and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                           "lora_unet_output_blocks_")) for k in unet_keys)
    # down_blocks.1.attentions.0 is input_blocks.3.1 with one layer per block (SDXL's two: input_blocks.4.1)
    assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k.") for k in unet_keys)
    pipe, _ = load_pipeline(b)
    assert "scenetok" in pipe.get_list_adapters().get("unet", [])
    assert generate((pipe, b), PROMPT, n=1, steps=2, progress=False)[0].image.size == (32, 32)
    # diffusers reads the kohya (SGM-named) file onto the same modules as its own file
    from diffusers import StableDiffusionXLPipeline

    outs = []
    for f in (entry["file"], entry["kohya_file"], None):
        p = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
        with torch.no_grad():
            if f is not None:
                p.load_lora_weights(str(f.parent), weight_name=f.name)
            torch.manual_seed(0)
            x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 80)
            cond = {"text_embeds": torch.randn(1, 16), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
            outs.append(p.unet(x, torch.tensor([500]), ctx, added_cond_kwargs=cond).sample)
            ids = p.tokenizer("a photo", return_tensors="pt").input_ids
            outs.append(p.text_encoder_2(ids).text_embeds)
    assert torch.allclose(outs[0], outs[2], atol=1e-5) and torch.allclose(outs[1], outs[3], atol=1e-5)
    assert not torch.equal(outs[0], outs[4]) and not torch.equal(outs[1], outs[5])  # the LoRA is applied


def test_sgm_names_of_sdxl_unet_modules():
    from scenetok.lora import sgm_unet_module

    assert sgm_unet_module("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_q") == \
        "input_blocks.8.1.transformer_blocks.9.attn2.to_q"
    assert sgm_unet_module("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0") == \
        "middle_block.1.transformer_blocks.0.attn1.to_out.0"
    assert sgm_unet_module("up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_v") == \
        "output_blocks.2.1.transformer_blocks.0.attn2.to_v"
    assert sgm_unet_module("up_blocks.1.attentions.0.proj_in") == "output_blocks.3.1.proj_in"


# ----------------------------------------------------------------------------------------------------
# the other family refuses


def test_a_bundle_refuses_a_base_model_of_the_other_family(bas_bundle, tiny_sd, tiny_sdxl, scene, tmp_path):
    from scenetok.generation import load_pipeline
    from scenetok.training import train

    with pytest.raises(BundleError) as e:
        load_pipeline(bas_bundle, base_model=str(tiny_sd))
    assert "Stable Diffusion XL" in str(e.value) and "Stable Diffusion 1/2" in str(e.value)
    sd = train(scene, tmp_path / "sd", method="ti-m", model=str(tiny_sd), device="cpu", progress=False,
               overrides=["train.steps=1", "collage.num_images=2", "preview_every=0", "checkpoint_every=0"])
    assert sd.family == "sd"
    with pytest.raises(BundleError) as e:
        load_pipeline(sd, base_model=str(tiny_sdxl))
    assert "Stable Diffusion XL" in str(e.value) and "Stable Diffusion 1/2" in str(e.value)


# ----------------------------------------------------------------------------------------------------
# memory=low


def test_low_memory_preset_holds_frozen_weights_in_half_and_trained_ones_in_fp32(tiny_sdxl, scene, tmp_path):
    from scenetok.methods import get_method
    from scenetok.training.run import setup_run
    from scenetok.training.settings import method_config

    method = get_method("cd-m")  # trains the handles and the cross-attention K/V only
    cfg = method_config(method, None, ["memory=low", "collage.num_images=2", "prior.enabled=false"])
    run = setup_run([scene], method, cfg, str(tiny_sdxl), tmp_path, "cpu", progress=False)
    m = run.model
    assert cfg["gradient_checkpointing"] and cfg["mixed_precision"] == "bf16"
    assert m.vae.device.type == "cpu"
    kv = [n for n, p in m.unet.named_parameters() if p.dtype == torch.float32]
    assert kv and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in kv)
    for _, _, te in m.text_encoders:
        assert te.get_input_embeddings().vectors.dtype == torch.float32
        assert te.get_input_embeddings().base.weight.dtype == torch.bfloat16
    assert cfg["optim"]["step_in_backward"]  # the K/V projections are stepped in the backward pass
    with run.accelerator.autocast():  # no cached half-precision copy of each trained weight
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()


@pytest.mark.parametrize("method,extra", [("break-a-scene", ["adapter.type=lora"]),
                                          ("disendiff", [])])
def test_low_memory_runs_train_and_generate(method, extra, tiny_sdxl, scene, tmp_path):
    from scenetok.generation import generate

    b = _train(scene, tmp_path / "low", tiny_sdxl, method, ["memory=low", *extra])
    assert b.config["memory"] == "low" and b.config["gradient_checkpointing"]
    assert b.config["optim"]["step_in_backward"]  # (with LoRA it is on but applies to no phase)
    for comp, folder in b.component_dirs().items():  # fine-tuned weights are saved in fp32
        from safetensors.torch import load_file

        f = next(folder.glob("*.safetensors"))
        assert {v.dtype for v in load_file(str(f)).values()} == {torch.float32}, comp
    assert generate(b.path, PROMPT, n=1, steps=2, progress=False)[0].image.size == (32, 32)


def test_low_memory_full_weights_step_in_backward_matches_the_ordinary_step(tiny_sdxl, scene, tmp_path):
    """Break-A-Scene phase 2 on full weights under memory=low (checkpointing, bf16 autocast, both text encoders
    trained): stepping each tensor in the backward pass gives the ordinary step's weights bit for bit."""
    from safetensors.torch import load_file

    def weights(bundle):
        return {f"{f.relative_to(bundle.path)}:{k}": v for f in sorted(bundle.path.rglob("*.safetensors"))
                for k, v in load_file(str(f)).items()}

    sets = ["memory=low", "optim.grad_clip=0", "phase2.steps=2", "prior.enabled=false"]
    sib = _train(scene, tmp_path / "sib", tiny_sdxl, "break-a-scene", sets)
    plain = _train(scene, tmp_path / "plain", tiny_sdxl, "break-a-scene", sets + ["optim.step_in_backward=false"])
    assert sib.config["optim"]["step_in_backward"] and not plain.config["optim"]["step_in_backward"]
    a, b = weights(sib), weights(plain)
    assert a.keys() == b.keys() and any("text_encoder_2" in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_eval_scores_an_sdxl_bundle(bas_bundle, tmp_path):
    from scenetok.evaluation import evaluate_bundle
    from scenetok.testing import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    pf = tmp_path / "prompts.txt"
    pf.write_text("a photo of <asset0> in the snow\n")
    result = evaluate_bundle(bas_bundle, tmp_path / "eval", prompts=str(pf), n=1, steps=2, metrics="clip_t,clip_i",
                             clip_model=str(clip), device="cpu", progress=False)
    assert result is not None and (tmp_path / "eval").is_dir()


def test_inpainting_model_of_sdxl_gets_both_handle_rows(bas_bundle, tmp_path):
    import numpy as np

    from scenetok import api
    from scenetok.testing import TinySDXLConfig, build_tiny_sdxl

    model = build_tiny_sdxl(tmp_path / "inpaint", TinySDXLConfig(resolution=32, inpaint=True, seed=1))
    photo = np.full((32, 32, 3), 128, np.uint8)
    out = api.edit(bas_bundle.path, photo, ["rect:4,4,20,20"], ["a photo of <asset0>"], steps=2,
                   inpaint_model=str(model), progress=False)
    assert len(out) == 1
    from scenetok.generation.inpaint import load_inpaint_pipeline

    pipe, _, _ = load_inpaint_pipeline(bas_bundle, str(model), device="cpu")
    row = pipe.text_encoder_2.get_input_embeddings().weight[pipe.tokenizer_2.convert_tokens_to_ids("<asset0>")]
    assert torch.equal(row.detach(), bas_bundle.embeddings(2)["<asset0>"])


def test_sdxl_run_resumes_exactly(tiny_sdxl, scene, tmp_path, interrupted_train):
    from safetensors.torch import load_file

    from scenetok.training import train

    args = dict(method="break-a-scene", model=str(tiny_sdxl), device="cpu", progress=False,
                overrides=["phase1.steps=2", "phase2.steps=1", "checkpoint_every=1", "preview_every=0"])
    straight = train(scene, tmp_path / "a", **args)
    interrupted_train(2, scene, tmp_path / "b", **args)
    resumed = train(scene, tmp_path / "b", resume=True, **args)
    for form in ("diffusers", "diffusers_2"):
        f1, f2 = straight.embedding_file("<asset0>", form), resumed.embedding_file("<asset0>", form)
        assert torch.equal(load_file(str(f1))["<asset0>"], load_file(str(f2))["<asset0>"])
