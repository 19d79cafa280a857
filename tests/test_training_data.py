"""Shared training parts every method uses: training sources (multi-scene, collages), mask-free concepts,
partial (cross-attention K/V) training, the start-token K/V detach, ablation switches, prior prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import two_squares
from scenetok.errors import ScenetokError
from scenetok.methods import Method, Phase, get_method, union_sample
from scenetok.methods.break_a_scene import BreakAScene
from scenetok.scene import Scene
from scenetok.training import train
from scenetok.training.data import collage_items, scene_items


def _rows(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _steps(out):
    return [r for r in _rows(out) if not r.get("preview") and not r.get("event")]


def _one_square_scene(colour=(30, 200, 30), name="green"):
    img = np.full((64, 64, 3), 90, np.uint8)
    m = np.zeros((64, 64), bool)
    m[10:40, 20:50] = True
    img[m] = colour
    return Scene.from_arrays(img, [m], names=[name], class_words=["square"])


# ---------------------------------------------------------------------------------------------- sources


def test_scene_items_number_concepts_across_scenes(two_square_scene):
    other = _one_square_scene()
    items = scene_items([two_square_scene, other])
    assert [it.present for it in items] == [[0, 1], [2]]
    assert items[0].masks.shape == (3, 64, 64)
    assert items[0].masks[2].sum() == 0 and items[1].masks[:2].sum() == 0
    assert np.array_equal(items[1].masks[2] > 0, other.concepts[0].mask)


def test_collages_paste_only_their_subset():
    img, masks = two_squares()
    scene = Scene.from_arrays(img, masks, names=["red", "blue"], background=True)
    items = collage_items(scene, 40, np.random.default_rng(0))
    assert {tuple(it.present) for it in items} == {(0,), (1,), (0, 1)}  # every non-empty subset, never background
    for it in items:
        on = np.zeros((64, 64), bool)
        for c in it.present:
            assert np.array_equal(it.masks[c] > 0, masks[c])
            assert np.array_equal(it.image[masks[c]], img[masks[c]])  # pasted pixels are the scene's
            on |= masks[c]
        for c in set(range(3)) - set(it.present):
            assert it.masks[c].sum() == 0
        bg = it.image[~on]
        assert (bg == bg[0]).all()  # one solid colour elsewhere
    colours = {tuple(it.image[0, 0]) for it in items}
    assert len(colours) > 30  # a new random colour per collage


def test_union_sample_draws_from_present_only():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        c = union_sample(rng, [2, 5, 7])
        assert set(c) <= {2, 5, 7} and len(set(c)) == len(c)
        seen.add(len(c))
    assert seen == {1, 2, 3}


# ------------------------------------------------------------------------------------ mask-free concepts


def test_named_concepts_have_placeholder_masks(two_square_scene):
    sc = two_square_scene.with_named_concepts(["kitty:cat", "dog"])
    assert [c.name for c in sc.concepts] == ["kitty", "dog"]
    assert [c.class_word for c in sc.concepts] == ["cat", "dog"]
    assert not sc.masks_known and all(c.mask.all() for c in sc.concepts)
    with pytest.raises(ScenetokError, match="named"):
        sc.with_named_concepts(["cat", "Cat"])


def test_mask_method_refuses_word_only_concepts(tiny_sd, two_square_scene, tmp_path):
    sc = two_square_scene.with_named_concepts(["cat", "dog"])
    with pytest.raises(ScenetokError, match="needs a mask per concept"):
        train(sc, tmp_path / "x", model=str(tiny_sd), overrides=["phase1.steps=1", "phase2.steps=0"],
              progress=False)


def test_two_scenes_train_one_handle_per_concept(tiny_sd, two_square_scene, tmp_path):
    out = tmp_path / "multi"
    bundle = train([two_square_scene, _one_square_scene()], out, model=str(tiny_sd), progress=False,
                   overrides=["phase1.steps=4", "phase2.steps=0", "preview_every=100"])
    assert bundle.tokens == ["<asset0>", "<asset1>", "<asset2>"]
    masks, names = bundle.masks()
    assert names == ["red", "blue", "green"] and masks.shape[0] == 3
    assert bundle.manifest["extra"]["scenes"] == 2
    assert bundle.mask_scenes() == [0, 0, 1]
    inputs = bundle.input_images()
    assert len(inputs) == 2 and (out / "inputs" / "scene1.png").is_file()
    second = np.asarray(inputs[1])
    r, g, b = second[masks[2] > 0.5].mean(axis=0)  # scene 1's mask lies on scene 1's green object
    assert g > 150 and r < 80 and b < 80


# ------------------------------------------------------------------------------ K/V training, detach


class _KVMethod(BreakAScene):
    """Break-A-Scene's losses with Custom Diffusion's parameter set (for testing the shared parts)."""

    name = "test-kv"

    def defaults(self):
        d = super().defaults()
        d["detach_start_token_kv"] = True
        return d

    def phases(self, cfg):
        return [Phase("kv", cfg["phase1"]["steps"], cfg["phase1"]["lr"], ("handles", "unet_kv"))]


def test_kv_training_changes_only_cross_attention_kv(tiny_sd, two_square_scene, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from scenetok.generation import load_pipeline

    from scenetok.model import load_model

    out = tmp_path / "kv"
    model = load_model(tiny_sd)  # trained in place: after the run it holds every weight the run changed
    bundle = train(two_square_scene, out, method=_KVMethod(), model=model, progress=False,
                   overrides=["phase1.steps=3", "phase1.lr=1e-2", "preview_every=100", "checkpoint_every=0"])
    assert bundle.manifest["components"] == []
    entry = bundle.manifest["partial_components"]["unet"]
    assert entry["groups"] == ["unet_kv"]
    saved = load_file(str(out / entry["file"]))
    assert saved and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in saved)
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    assert all(not torch.equal(saved[k], base[k]) for k in saved)  # every K/V moved
    trained = model.unet.state_dict()
    assert sorted(k for k in base if not torch.equal(trained[k], base[k])) == sorted(saved)  # and nothing else
    pipe, _ = load_pipeline(bundle, device="cpu")
    loaded = pipe.unet.state_dict()
    for k, v in base.items():
        if k in saved:
            assert torch.equal(loaded[k], saved[k])
        else:
            assert torch.equal(loaded[k], v), k  # everything else is the base model (as the run left it)


def test_detach_start_token_kv_blocks_only_position_zero(tiny_sd):
    from diffusers import UNet2DConditionModel

    from scenetok.params import detach_start_token_kv

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    torch.manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 16, 16)
    enc = torch.randn(1, 6, unet.config.cross_attention_dim, requires_grad=True)
    unet(x, 10, enc).sample.square().sum().backward()
    assert enc.grad[0, 0].abs().sum() > 0
    enc.grad = None
    with detach_start_token_kv(unet):
        unet(x, 10, enc).sample.square().sum().backward()
    assert torch.all(enc.grad[0, 0] == 0) and enc.grad[0, 1:].abs().sum() > 0
    enc.grad = None
    unet(x, 10, enc).sample.square().sum().backward()  # hooks removed on exit
    assert enc.grad[0, 0].abs().sum() > 0


# ------------------------------------------------------------------------------------- ablation switches


def test_break_a_scene_switches_map_to_settings():
    from scenetok.cli import build_parser, switch_overrides

    args = build_parser().parse_args(["extract", "s", "-o", "o", "--no-phase1", "--no-attn-loss",
                                      "--no-masked-loss", "--no-union-sampling"])
    assert switch_overrides("break-a-scene", args) == ["phase1.steps=0", "masked_loss=false", "attn.weight=0",
                                                       "union_sampling=false"]


def test_no_attn_switch_removes_only_its_term(tiny_sd, two_square_scene, tmp_path):
    common = ["phase1.steps=2", "phase2.steps=0", "preview_every=100"]
    train(two_square_scene, tmp_path / "on", model=str(tiny_sd), overrides=common, progress=False)
    train(two_square_scene, tmp_path / "off", model=str(tiny_sd), overrides=common + ["attn.weight=0"],
          progress=False)
    on, off = _steps(tmp_path / "on"), _steps(tmp_path / "off")
    assert all(r["attn"] > 0 for r in on) and all("attn" not in r for r in off)
    # the first step starts from the same state with the same random numbers: same diffusion term
    assert on[0]["diffusion"] == pytest.approx(off[0]["diffusion"], rel=1e-6)


def test_no_phase1_switch_skips_phase1(tiny_sd, two_square_scene, tmp_path):
    train(two_square_scene, tmp_path / "x", model=str(tiny_sd), progress=False,
          overrides=["phase1.steps=0", "phase2.steps=2", "preview_every=100"])
    assert [r["phase"] for r in _steps(tmp_path / "x")] == ["phase2", "phase2"]


def test_masked_loss_switch_and_union_sampling_switch():
    from scenetok.methods.base import Batch, Outputs
    from scenetok.training import method_config

    m = get_method("break-a-scene")
    pred = torch.zeros(1, 4, 4, 4)
    target = torch.ones(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1  # half the latent
    batch = Batch(prompts=["p"], chosen=[[0]], valid=torch.ones(1, 1, dtype=torch.bool),
                  positions=torch.zeros(1, 1, dtype=torch.long), masks=torch.ones(1, 1, 8, 8), latent_mask=mask,
                  timesteps=torch.zeros(1), n_instance=1)
    out = Outputs(pred=pred, target=target)
    on = method_config(m, None, ["attn.weight=0"])
    off = method_config(m, None, ["attn.weight=0", "masked_loss=false"])
    assert float(m.losses(batch, out, on)["diffusion"]) == pytest.approx(0.5)  # only the masked half counts
    assert float(m.losses(batch, out, off)["diffusion"]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    union_on = method_config(m)
    union_off = method_config(m, None, ["union_sampling=false"])
    sizes_on = {len(m.sample_concepts(rng, [0, 1, 2], union_on)) for _ in range(100)}
    sizes_off = {tuple(m.sample_concepts(rng, [0, 1, 2], union_off)) for _ in range(100)}
    assert sizes_on == {1, 2, 3} and sizes_off == {(0, 1, 2)}


# ------------------------------------------------------------------------------------------ prior prompts


def test_prior_prompts_joint_and_per_class():
    from scenetok.training import method_config

    m: Method = get_method("break-a-scene")
    joint = method_config(m)
    per = method_config(m, None, ["prior.mode=per_class"])
    assert m.prior_prompts(["cat", "dog", "cat"], joint) == ["a photo of a cat and a dog"]
    assert m.prior_prompts(["cat", "dog"], per) == ["a photo of a cat", "a photo of a dog"]
    given = method_config(m, None, ["prior.prompt=a photo of pets"])
    assert m.prior_prompts(["cat"], given) == ["a photo of pets"]


def test_token_joiner_writes_an_article_before_every_handle():
    from scenetok.errors import ConfigError
    from scenetok.training import method_config

    bas: Method = get_method("break-a-scene")
    plain = method_config(bas)
    assert bas.prompt(["<a0>", "<a1>", "<a2>"], [0, 2], plain) == "a photo of <a0> and <a2>"
    toy = method_config(bas, None, ["prompt_template=a photo of a {tokens}", "token_joiner=' and a '"])
    assert bas.prompt(["<a0>", "<a1>", "<a2>"], [0, 2], toy) == "a photo of a <a0> and a <a2>"
    assert bas.token_phrase(["<a0>", "<a1>"], [0, 1], toy) == "<a0> and a <a1>"
    dd: Method = get_method("disendiff")
    assert dd.prompt(["<a0>", "<a1>"], [0, 1], method_config(dd, None, ["token_joiner=' and a '"]),
                     ["cat", "dog"]) == "photo of a <a0> cat and a <a1> dog"
    with pytest.raises(ConfigError, match="token_joiner"):
        method_config(bas, None, ["token_joiner=' '"])
