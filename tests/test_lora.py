"""LoRA adapters (``--adapter lora``): only adapters train, bundles load with ``load_lora_weights``, the
kohya export follows kohya's key names and gives the same model, resume and bf16 work."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from scenetok.training import run_dir
from scenetok.errors import ConfigError
from scenetok.training import load_model, train
from scenetok.training import trainer as trainer_mod

# Break-A-Scene with LoRA: phase 1 (handles) then phase 2 (LoRA on UNet + text encoder); alpha != rank so
# that a loader that ignored alpha would give a different model
BAS_LORA = ["phase1.steps=1", "phase2.steps=2", "adapter.type=lora", "adapter.rank=2", "adapter.alpha=6",
            "adapter.lr=1e-2", "preview_every=100", "checkpoint_every=0"]
KOHYA_KEY = re.compile(r"^lora_(unet|te)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _steps(out):
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("preview") and not r.get("event")]


@pytest.fixture(scope="module")
def bas_lora(tiny_sd, tmp_path_factory):
    """One Break-A-Scene + LoRA run; returns (trained Model, bundle)."""
    from conftest import two_squares
    from scenetok.scene import Scene

    img, masks = two_squares()
    scene = Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "square"])
    model = load_model(str(tiny_sd))
    bundle = train(scene, tmp_path_factory.mktemp("lora") / "bas", model=model, overrides=BAS_LORA, progress=False)
    return model, bundle


def _fixed_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    enc = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700]), enc


def test_only_adapters_change_base_weights_bit_identical(bas_lora, tiny_sd):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    model, bundle = bas_lora
    base_unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    base_te = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").state_dict()
    lora_b = 0
    for name, p in model.unet.named_parameters():
        if ".lora_" in name:
            lora_b += int(".lora_B." in name and p.abs().sum() > 0)
            continue
        assert torch.equal(p.detach(), base_unet[name.replace(".base_layer", "")]), name
    assert lora_b > 0  # the adapters did learn
    for name, p in model.text_encoder.named_parameters():
        if ".lora_" in name or "vectors" in name:
            continue
        key = name.replace(".base_layer", "").replace("token_embedding.base.", "token_embedding.")
        ref = base_te[key]
        assert torch.equal(p.detach()[: ref.shape[0]], ref), name  # handle rows appended after the vocabulary
    # the bundle holds no full weights, only the LoRA
    assert bundle.manifest["components"] == [] and bundle.manifest["partial_components"] == {}
    lora = bundle.manifest["lora"]
    assert lora["components"] == ["text_encoder", "unet"] and lora["rank"] == 2 and lora["alpha"] == 6.0
    assert not (bundle.path / "weights" / "unet").exists()
    # the attention loss (capture processors on LoRA layers) kept working in phase 2
    assert all(r["attn"] > 0 for r in _steps(bundle.path) if r["phase"] == "phase2")


def test_bundle_lora_reproduces_trained_model(bas_lora):
    from scenetok.generation import load_pipeline

    model, bundle = bas_lora
    pipe, _ = load_pipeline(bundle, device="cpu")
    x, t, enc = _fixed_inputs(model.unet)
    model.unet.eval()
    with torch.no_grad():
        want = model.unet(x, t, enc).sample
        got = pipe.unet(x, t, enc).sample
        plain = type(pipe.unet).from_pretrained(bundle.base_model, subfolder="unet")(x, t, enc).sample
    assert (want - plain).abs().max() > 1e-3  # the LoRA matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    prompt = "a photo of <asset0> and <asset1>"
    ids = model.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, pipe.tokenizer([prompt], padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids)
    model.text_encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], model.text_encoder(ids)[0], atol=1e-5, rtol=1e-5)


def test_diffusers_file_loads_with_load_lora_weights(bas_lora):
    from diffusers import StableDiffusionPipeline

    model, bundle = bas_lora
    pipe = StableDiffusionPipeline.from_pretrained(bundle.base_model)
    pipe.load_lora_weights(str(bundle.path / "weights" / "lora"))  # the folder alone is enough
    x, t, enc = _fixed_inputs(model.unet, 1)
    model.unet.eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, enc).sample, model.unet(x, t, enc).sample, atol=1e-5, rtol=1e-5)


def test_kohya_export_keys_and_equivalence(bas_lora):
    from diffusers import StableDiffusionPipeline

    _, bundle = bas_lora
    lora = bundle.lora()
    kohya = load_file(str(lora["kohya_file"]))
    assert kohya and all(KOHYA_KEY.match(k) for k in kohya), [k for k in kohya if not KOHYA_KEY.match(k)][:3]
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    for mod in modules:  # every module has its down, up and alpha
        down, up = kohya[f"{mod}.lora_down.weight"], kohya[f"{mod}.lora_up.weight"]
        assert down.shape[0] == 2 and up.shape[1] == 2  # rank
        assert float(kohya[f"{mod}.alpha"]) == 6.0
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in modules
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert len(modules) == len(load_file(str(lora["file"]))) // 2

    def outputs(weight_file):
        pipe = StableDiffusionPipeline.from_pretrained(bundle.base_model)
        pipe.load_lora_weights(str(weight_file.parent), weight_name=weight_file.name)
        x, t, enc = _fixed_inputs(pipe.unet, 2)
        ids = torch.arange(1, 78)[None] % 200
        with torch.no_grad():
            return pipe.unet(x, t, enc).sample, pipe.text_encoder(ids)[0]

    u_diff, te_diff = outputs(lora["file"])
    u_kohya, te_kohya = outputs(lora["kohya_file"])
    torch.testing.assert_close(u_kohya, u_diff, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(te_kohya, te_diff, atol=1e-5, rtol=1e-5)


def test_to_kohya_on_hand_made_state():
    from scenetok.lora import to_kohya

    a, b = torch.ones(3, 5), torch.zeros(7, 3)
    out = to_kohya({"unet": {"mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": a,
                             "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": b},
                    "text_encoder": {"encoder.layers.1.self_attn.v_proj.lora_A.weight": a}}, alpha=1.5)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert set(out) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha",
                        "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight",
                        "lora_te_text_model_encoder_layers_1_self_attn_v_proj.alpha"}
    assert out[f"{name}.lora_down.weight"] is a or torch.equal(out[f"{name}.lora_down.weight"], a)
    assert float(out[f"{name}.alpha"]) == 1.5
    with pytest.raises(ValueError, match="not a peft LoRA key"):
        to_kohya({"unet": {"x.weight": a}}, alpha=1.0)


def test_resume_with_lora_gives_same_weights(bas_lora, tiny_sd, two_square_scene, tmp_path, monkeypatch,
                                             interrupted_train):
    _, ref = bas_lora  # the same run without interruption (checkpoints and previews do not change the weights)
    monkeypatch.setattr(trainer_mod, "write_preview", lambda *a, **k: None)
    common = BAS_LORA[:-1] + ["checkpoint_every=1"]
    out = tmp_path / "run"
    # inside phase 2, after one LoRA step
    interrupted_train(2, two_square_scene, out, model=str(tiny_sd), overrides=common, progress=False)
    saved = load_file(str(run_dir(out) / "checkpoint" / "trainable.safetensors"))
    assert any(k.startswith("lora.unet.") for k in saved) and any(k.startswith("lora.text_encoder.") for k in saved)
    assert not any(k.startswith(("unet.", "text_encoder.")) for k in saved)  # adapters only
    train(two_square_scene, out, model=str(tiny_sd), resume=True, progress=False)
    for rel in ("weights/lora/pytorch_lora_weights.safetensors", "embeddings/asset0.safetensors",
                "embeddings/asset1.safetensors"):
        a, b = load_file(str(ref.path / rel)), load_file(str(out / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


def test_lora_bf16_custom_diffusion_kv_only(tiny_sd, two_square_scene, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "write_preview", lambda *a, **k: None)  # bf16 kernels are slow on CPU
    out = tmp_path / "bf16"
    bundle = train(two_square_scene, out, method="cd-m", model=str(tiny_sd), progress=False,
                   overrides=["train.steps=2", "collage.num_images=2", "prior.enabled=false", "mixed_precision=bf16",
                              "adapter.type=lora", "adapter.lr=1e-2", "preview_every=100"])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _steps(out))
    lora = bundle.lora()
    assert lora["components"] == ["unet"]
    keys = load_file(str(lora["file"]))
    assert keys and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in keys)  # cross-attention K/V only
    assert all(v.dtype == torch.float32 for v in keys.values())
    assert any(v.abs().sum() > 0 for k, v in keys.items() if "lora.up" in k or "lora_B" in k)
    from scenetok.generation import generate

    images = generate(bundle.path, "a photo of <asset0>", n=1, steps=2, progress=False)
    assert images[0].image.size == (32, 32)


def test_adapter_options_and_errors(tiny_sd, two_square_scene, tmp_path):
    from scenetok.cli import adapter_overrides, build_parser
    from scenetok.methods import get_method
    from scenetok.training import method_config

    args = build_parser().parse_args(["extract", "s", "-o", "o", "--adapter", "lora", "--rank", "8"])
    assert adapter_overrides(args) == ["adapter.type=lora", "adapter.rank=8"]
    cfg = method_config(get_method("db-m"), None, adapter_overrides(args))
    assert cfg["adapter"]["type"] == "lora" and cfg["adapter"]["rank"] == 8
    assert adapter_overrides(build_parser().parse_args(["extract", "s", "-o", "o"])) == []
    with pytest.raises(ConfigError, match="adapter.rank"):
        method_config(get_method("db-m"), None, ["adapter.rank=0"])
    with pytest.raises(ConfigError, match="adapter.type"):
        method_config(get_method("db-m"), None, ["adapter.type=dora"])
    with pytest.raises(ConfigError, match="nothing to adapt"):  # ti-m trains only handles
        train(two_square_scene, tmp_path / "ti", method="ti-m", model=str(tiny_sd), progress=False,
              overrides=["train.steps=1", "collage.num_images=2", "adapter.type=lora"])


def test_incompatible_peft_is_named_as_such():
    """transformers' PEFT integration can refuse the installed peft (transformers 5.24 with peft 0.21):
    that must not be reported as 'no module matches'."""
    import types

    from scenetok.lora import add_lora

    def refuse(*a, **k):
        raise ValueError("The version of PEFT you are using is not compatible, please use a version >= 0.22.0")

    te = types.SimpleNamespace(add_adapter=refuse)
    acfg = {"rank": 4, "alpha": 0, "dropout": 0.0, "targets": [], "text_encoder_targets": ["q_proj"]}
    with pytest.raises(ConfigError, match="do not work together") as info:
        add_lora(None, te, ("text_encoder",), acfg)
    assert "transformers<5.24" in info.value.hint
