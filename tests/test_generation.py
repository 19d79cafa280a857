"""Generation from a bundle on a tiny random Stable Diffusion: loading, prompts, seeds, attention, files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scenetok.bundle import BundleContent, HandleInfo, write_bundle  # noqa: E402
from scenetok.errors import BundleError, PromptError  # noqa: E402
from scenetok.errors import ConfigError  # noqa: E402
from scenetok.generation import Generated, check_prompt, generate, generate_many, load_pipeline  # noqa: E402

PROMPT = "a photo of <asset0> on <asset1> in the snow"
STEPS = 4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_sd):
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("gen")
    sd = tiny_sd
    unet = UNet2DConditionModel.from_pretrained(str(sd / "unet"))
    with torch.no_grad():  # a "fine-tuned" UNet: one weight visibly changed
        unet.conv_out.bias.add_(0.25)
    g = torch.Generator().manual_seed(1)
    handles = [HandleInfo("<asset0>", "creature", "toy", "bear"), HandleInfo("<asset1>", "bowl", "bowl", "bowl")]
    return write_bundle(root / "bundle", BundleContent(
        method="break-a-scene", base_model=str(sd), handles=handles,
        embeddings={h.token: torch.randn(32, generator=g) for h in handles}, components={"unet": unet},
        config={}, resolution=32, input_hashes={},
    ))


@pytest.fixture(scope="module")
def loaded(bundle):
    return load_pipeline(bundle, device="cpu")


def _arr(img):
    return np.asarray(img).astype(np.int16)


def test_load_pipeline(bundle, loaded):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    pipe, b = loaded
    assert b.path == bundle.path
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    changed = UNet2DConditionModel.from_pretrained(str(bundle.path / "weights" / "unet"))
    assert torch.equal(pipe.unet.conv_out.bias, changed.conv_out.bias)  # the bundle's UNet, not the base one
    w = pipe.text_encoder.get_input_embeddings().weight
    for token, vec in bundle.embeddings().items():
        assert torch.equal(w[pipe.tokenizer.convert_tokens_to_ids(token)], vec)


def test_missing_base_model_says_what_to_do(bundle, tmp_path):
    with pytest.raises(BundleError, match="not there") as e:
        load_pipeline(bundle, base_model=str(tmp_path / "gone"), device="cpu")
    assert "--base-model" in e.value.hint


def test_generate_sizes_and_per_image_seeds(loaded):
    out = generate(loaded, PROMPT, n=3, seed=5, steps=STEPS, batch_size=2, progress=False)
    assert [type(r) for r in out] == [Generated] * 3
    assert [r.seed for r in out] == [5, 6, 7]
    assert all(r.image.size == (32, 32) and r.prompt == PROMPT and r.attention is None for r in out)
    alone = generate(loaded, PROMPT, n=1, seed=7, steps=STEPS, progress=False)[0]
    np.testing.assert_array_equal(_arr(alone.image), _arr(out[2].image))  # image i alone with seed+i
    assert np.abs(_arr(out[0].image) - _arr(out[1].image)).max() > 0  # different seeds, different images
    big = generate(loaded, PROMPT, n=1, steps=2, height=48, width=48, progress=False)[0]
    assert big.image.size == (48, 48)


def test_unknown_handle_lists_known_ones(bundle, loaded):
    check_prompt(PROMPT, bundle)
    check_prompt("a photo of a cat", bundle)
    with pytest.raises(PromptError, match="<asset7>") as e:
        check_prompt("a photo of <asset7> and <asset0>", bundle)
    assert "<asset0> (creature)" in e.value.hint and "<asset1> (bowl)" in e.value.hint
    with pytest.raises(PromptError):
        generate(loaded, "a <asset2>", n=1, steps=1, progress=False)


def test_attention_maps_per_handle(loaded):
    pytest.importorskip("scenetok.attention")
    out = generate(loaded, "a photo of <asset1>", n=2, steps=STEPS, attention=True, progress=False)
    for r in out:
        assert set(r.attention) == {"<asset1>"}  # only the handles in the prompt
        heat = r.attention["<asset1>"]
        # 32 px → 16×16 latents; cross-attention at 16 and 8; the largest size ≤ latent/2 is 8
        assert heat.shape == (8, 8) and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() > heat.min()
    assert not np.array_equal(out[0].attention["<asset1>"], out[1].attention["<asset1>"])
    plain = generate(loaded, "a photo of <asset1>", n=1, seed=0, steps=STEPS, progress=False)[0]
    np.testing.assert_array_equal(_arr(plain.image), _arr(out[0].image))  # capturing does not change images


def test_generate_many_mixes_prompts_in_one_batch(loaded):
    """Several prompts in one batch: each image is the one a per-prompt generate() makes (same seed), and each
    row's attention holds the handles of its own prompt."""
    pytest.importorskip("scenetok.attention")
    a, b = "a photo of <asset0>", "a photo of <asset1> in the snow"
    mixed = generate_many(loaded, [(a, 3), (b, 3), (a, 4)], steps=STEPS, attention=True, batch_size=3,
                          progress=False)
    assert [(r.prompt, r.seed) for r in mixed] == [(a, 3), (b, 3), (a, 4)]
    assert set(mixed[0].attention) == {"<asset0>"} and set(mixed[1].attention) == {"<asset1>"}
    alone_a = generate(loaded, a, n=2, seed=3, steps=STEPS, attention=True, progress=False)
    alone_b = generate(loaded, b, n=1, seed=3, steps=STEPS, attention=True, progress=False)
    for got, want in ((mixed[0], alone_a[0]), (mixed[1], alone_b[0]), (mixed[2], alone_a[1])):
        assert np.abs(_arr(got.image) - _arr(want.image)).max() <= 2  # batched arithmetic: last bits only
        for tok, heat in want.attention.items():
            assert np.abs(got.attention[tok] - heat).max() < 1e-3
    # the same seed with another prompt gives another image (the rows are not mixed up)
    assert np.abs(_arr(mixed[0].image) - _arr(mixed[1].image)).max() > 10


def test_generate_many_refuses_bad_requests(loaded):
    for bad in ([], "a photo of <asset0>", [("a photo", 1, 2)], [(3, 1)]):
        with pytest.raises(ConfigError, match="pairs"):
            generate_many(loaded, bad, steps=1, progress=False)
    with pytest.raises(ConfigError, match="seed"):
        generate_many(loaded, [("a photo of <asset0>", -1)], steps=1, progress=False)
    with pytest.raises(PromptError, match="<asset7>"):
        generate_many(loaded, [("a photo of <asset0>", 0), ("a <asset7>", 1)], steps=1, progress=False)


def test_out_dir_files(loaded, tmp_path):
    attention = True
    try:
        import scenetok.attention  # noqa: F401
    except ImportError:
        attention = False
    out = tmp_path / "images"
    generate(loaded, PROMPT, n=2, seed=3, steps=2, attention=attention, out_dir=out, progress=False)
    names = {p.name for p in out.iterdir()}
    expected = {"00_seed3.png", "01_seed4.png", "grid.png", "prompts.jsonl"}
    if attention:
        expected |= {f"{i:02d}_seed{s}_{h}.png" for i, s in ((0, 3), (1, 4)) for h in ("asset0", "asset1")}
    assert names == expected
    rows = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [3, 4] and rows[0]["prompt"] == PROMPT and rows[0]["file"] == "00_seed3.png"
    from PIL import Image

    with Image.open(out / "00_seed3.png") as im:
        assert im.size == (32, 32)
    generate(loaded, PROMPT, n=1, seed=9, steps=1, out_dir=out, progress=False)  # the log is appended to
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 3


def test_make_scheduler_keeps_the_base_schedule_and_refuses_unknown_names():
    from diffusers import DDIMScheduler

    from scenetok.errors import ConfigError
    from scenetok.generation.pipeline import check_sampler, make_scheduler

    base = DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                         beta_schedule="scaled_linear").config
    dpm = make_scheduler("dpm", base)
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler"
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert dpm.config.prediction_type == "v_prediction" and dpm.config.rescale_betas_zero_snr
    assert dpm.config.timestep_spacing == "trailing"
    for bad in ("nope", ["dpm"], None):
        with pytest.raises(ConfigError, match="unknown"):
            check_sampler(bad)
    with pytest.raises(ConfigError, match="unknown scheduler"):
        make_scheduler("base", base)


def test_excite_changes_only_prompts_with_handles_and_is_checked(loaded):
    two = "a photo of <asset0> and <asset1>"
    base = generate(loaded, two, n=2, steps=STEPS, progress=False)
    excited = generate(loaded, two, n=2, steps=STEPS, progress=False, excite=500.0, excite_steps=1.0)
    assert max(np.abs(_arr(a.image) - _arr(b.image)).max() for a, b in zip(base, excited)) > 5
    again = generate(loaded, two, n=2, steps=STEPS, progress=False, excite=0.0)
    for a, b in zip(base, again):  # off is exactly the plain sampler
        np.testing.assert_array_equal(_arr(a.image), _arr(b.image))
    plain = "a photo in the snow"  # no handle: nothing to excite, the same image
    np.testing.assert_array_equal(_arr(generate(loaded, plain, n=1, steps=STEPS, progress=False)[0].image),
                                  _arr(generate(loaded, plain, n=1, steps=STEPS, progress=False, excite=20.0)[0].image))
    with_maps = generate(loaded, two, n=1, steps=STEPS, progress=False, excite=500.0, excite_steps=1.0, attention=True)[0]
    assert set(with_maps.attention) == {"<asset0>", "<asset1>"}
    assert np.abs(_arr(with_maps.image) - _arr(excited[0].image)).max() <= 2  # the maps do not change the nudges
    for bad in ({"excite": -1.0}, {"excite": float("nan")}, {"excite": 1.0, "excite_steps": 0.0},
                {"excite": 1.0, "excite_steps": 1.5}):
        with pytest.raises(ConfigError, match="excite"):
            generate(loaded, two, n=1, steps=1, progress=False, **bad)


def test_excite_step_raises_the_weakest_handles_peak(loaded):
    """One nudge of the latents lowers the loss it follows (the weakest handle's shortfall), on a fixed noise level."""
    from scenetok.generation.excite import Exciter, handle_peaks
    from scenetok.generation.pipeline import _vector_positions
    from scenetok.model import token_ids

    pipe, bundle = loaded
    prompt = "a photo of <asset0> and <asset1>"
    ids = token_ids(pipe.tokenizer, prompt, tensors=False)[0]
    end = ids.index(pipe.tokenizer.eos_token_id, 1)
    rows = [_vector_positions(pipe.tokenizer, ids, bundle.tokens)]
    assert sorted(rows[0]) == ["<asset0>", "<asset1>"]
    pipe.scheduler.set_timesteps(10)
    emb, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ex = Exciter(pipe, rows, [end], scale=5.0, fraction=1.0, steps=10, cfg=False, latent=16)
    assert ex.side == 16
    moved = ex(pipe, 2, None, {"latents": lat, "prompt_embeds": emb})["latents"]
    ex(pipe, 2, None, {"latents": moved, "prompt_embeds": emb})
    assert ex.losses[1] < ex.losses[0] - 1e-4, ex.losses
    assert not torch.equal(moved, lat)
    # the peaks: a map that puts all of one word's attention on one cell peaks near 1 there after smoothing
    maps = torch.full((1, 8, 4, 4), -1.0)
    maps[0, 3, 1, 2] = 1.0
    (peaks,) = handle_peaks(maps, [{"<h>": [3], "<g>": [4]}], [7])
    assert peaks[0] > 0.5 and peaks[1] < 0.2
