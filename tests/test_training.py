"""End-to-end training on the tiny random SD: bundle contents, resume, reproducibility, ablations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scenetok.training import run_dir, train

FAST = ["phase1.steps=3", "phase2.steps=2", "checkpoint_every=2", "preview_every=2"]


def _rows(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _final_weights(out):
    emb = {p.name: load_file(str(p)) for p in sorted((out / "embeddings").glob("*.safetensors"))}
    unet = load_file(str(next((out / "weights" / "unet").glob("*.safetensors"))))
    return emb, unet


def test_two_phase_run_writes_complete_bundle(tiny_sd, two_square_scene, tmp_path):
    out = tmp_path / "bundle"
    bundle = train(two_square_scene, out, model=str(tiny_sd), overrides=FAST, progress=False)
    assert [h.token for h in bundle.handles] == ["<asset0>", "<asset1>"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "break-a-scene" and man["hyperparameters"]["phase1"]["steps"] == 3
    for f in ["README.md", "embeddings/asset0.safetensors", "embeddings/a1111/asset1.safetensors", "loss.png",
              "train_log.jsonl", "input.png", "masks/mask0.png", "masks/mask1.png"]:
        assert (out / f).is_file(), f
    assert (out / "weights" / "unet").is_dir() and (out / "weights" / "text_encoder").is_dir()
    assert not (out / "weights" / "vae").exists()
    assert not (out / "checkpoint").exists()  # removed after success
    previews = sorted(p.name for p in (out / "previews").glob("*.png"))
    assert previews == ["step_00000.png", "step_00002.png", "step_00004.png", "step_00005.png"]
    steps = [r for r in _rows(out) if not r.get("preview")]
    assert [r["global_step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["phase"] for r in steps] == ["phase1"] * 3 + ["phase2"] * 2
    assert all("diffusion" in r and "attn" in r and r["attn"] > 0 for r in steps)
    ious = [r for r in _rows(out) if r.get("preview")]
    assert set(ious[-1]["attn_iou"]) == {"<asset0>", "<asset1>"}


def test_phase1_changes_only_handles_and_phase2_changes_unet(tiny_sd, two_square_scene, tmp_path):
    from diffusers import UNet2DConditionModel

    from scenetok.model import load_model

    out = tmp_path / "p1"
    model = load_model(tiny_sd)  # trained in place: its weights after the run are the run's weights
    unet_before = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    te_before = {k: v.detach().clone() for k, v in model.text_encoder.state_dict().items()}
    vocab = len(model.tokenizer)
    train(two_square_scene, out, model=model, overrides=["phase1.steps=2", "phase2.steps=0"], progress=False)
    assert not (out / "weights").exists() or not any((out / "weights").iterdir())
    unet_after = model.unet.state_dict()
    assert unet_after.keys() == unet_before.keys()
    assert all(torch.equal(unet_after[k], unet_before[k]) for k in unet_before)  # bit for bit
    # and no weight gradient was even computed: phase 1 leaves every UNet and text-encoder weight frozen
    # (the backward pass only carries activation gradients down to the handle rows)
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert not any(p.requires_grad for n, p in model.text_encoder.named_parameters() if "token_embedding" not in n)
    te_after = {k: v for k, v in model.text_encoder.state_dict().items() if "token_embedding" not in k}
    assert te_after.keys() == {k for k in te_before if "token_embedding" not in k}
    assert all(torch.equal(te_after[k], te_before[k]) for k in te_after)  # bit for bit
    # the vocabulary rows of the token embedding too (the handles' rows are appended after them)
    emb_before = next(v for k, v in te_before.items() if "token_embedding" in k)
    emb_after = model.text_encoder.get_input_embeddings().weight
    assert emb_after.shape[0] == vocab + 2 and torch.equal(emb_after[:vocab], emb_before[:vocab])
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    out2 = tmp_path / "p2"
    train(two_square_scene, out2, model=str(tiny_sd), overrides=["phase1.steps=0", "phase2.steps=2",
                                                                  "phase2.lr=1e-3"], progress=False)
    tuned = load_file(str(next((out2 / "weights" / "unet").glob("*.safetensors"))))
    assert any(not torch.equal(base[k], tuned[k]) for k in base)


def test_seeded_runs_reproducible(tiny_sd, two_square_scene, tmp_path):
    a = train(two_square_scene, tmp_path / "a", model=str(tiny_sd), overrides=FAST, progress=False)
    b = train(two_square_scene, tmp_path / "b", model=str(tiny_sd), overrides=FAST, progress=False)
    ea, ua = _final_weights(a.path)
    eb, ub = _final_weights(b.path)
    for k in ea:
        for t in ea[k]:
            assert torch.equal(ea[k][t], eb[k][t])
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    c = train(two_square_scene, tmp_path / "c", model=str(tiny_sd), overrides=FAST + ["seed=1"], progress=False)
    ec, _ = _final_weights(c.path)
    assert not torch.equal(ea["asset0.safetensors"]["<asset0>"], ec["asset0.safetensors"]["<asset0>"])


@pytest.mark.parametrize("extra", [[], ["optim.step_in_backward=true"]], ids=["step", "step_in_backward"])
@pytest.mark.parametrize("stop_at", [3, 4])  # at the phase boundary and inside phase 2
def test_resume_gives_same_weights(tiny_sd, two_square_scene, tmp_path, interrupted_train, stop_at, extra):
    # step_in_backward: phase 2's per-tensor optimizers are saved and restored (with per-tensor clipping at 1.0)
    sets = FAST[:2] + ["checkpoint_every=1", "preview_every=100", *extra]
    ref = train(two_square_scene, tmp_path / "ref", model=str(tiny_sd), overrides=sets, progress=False)
    out = tmp_path / "run"
    interrupted_train(stop_at, two_square_scene, out, model=str(tiny_sd), overrides=sets, progress=False)
    assert (run_dir(out) / "checkpoint" / "state.json").is_file()
    assert json.loads((run_dir(out) / "checkpoint" / "state.json").read_text())["progress"]["global"] == stop_at
    train(two_square_scene, out, model=str(tiny_sd), resume=True, progress=False)
    e1, u1 = _final_weights(ref.path)
    e2, u2 = _final_weights(out)
    for k in e1:
        for t in e1[k]:
            assert torch.equal(e1[k][t], e2[k][t]), k
    assert all(torch.equal(u1[k], u2[k]) for k in u1)
    steps = [r["global_step"] for r in _rows(out) if not r.get("preview")]
    assert steps == [1, 2, 3, 4, 5]


def test_no_attention_term_when_weight_zero(tiny_sd, two_square_scene, tmp_path):
    train(two_square_scene, tmp_path / "x", model=str(tiny_sd),
          overrides=["phase1.steps=2", "phase2.steps=0", "attn.weight=0"], progress=False)
    steps = [r for r in _rows(tmp_path / "x") if not r.get("preview")]
    assert all("attn" not in r for r in steps) and all(r["diffusion"] > 0 for r in steps)


def test_batch2_bf16_accum_and_prior_folder(tiny_sd, two_square_scene, tmp_path):
    from PIL import Image

    prior = tmp_path / "prior"
    prior.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(prior / f"{i}.png")
    out = tmp_path / "bf16"
    train(two_square_scene, out, model=str(tiny_sd), progress=False,
          overrides=["phase1.steps=2", "phase2.steps=1", "batch_size=2", "grad_accum=2", "mixed_precision=bf16",
                     "prior.enabled=true", f"prior.images_dir={prior}", "prior.batch_size=2"])
    steps = [r for r in _rows(out) if not r.get("preview")]
    assert len(steps) == 3
    assert all(np.isfinite(r["loss"]) and r["prior"] > 0 and r["attn"] > 0 for r in steps)


def test_refuses_existing_non_bundle_folder(tiny_sd, two_square_scene, tmp_path):
    from scenetok.errors import BundleError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("do not delete")
    with pytest.raises(BundleError):
        train(two_square_scene, out, model=str(tiny_sd), overrides=FAST, progress=False)
    assert (out / "precious.txt").read_text() == "do not delete"


def test_overwrite_refuses_a_folder_that_is_not_a_bundle(tiny_sd, two_square_scene, tmp_path):
    """--overwrite replaces only a bundle: a user's folder is left exactly as it was."""
    from scenetok.errors import BundleError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    (out / "train_log.jsonl").write_text('{"global_step": 99}\n')
    with pytest.raises(BundleError, match="not a scenetok bundle"):
        train(two_square_scene, out, model=str(tiny_sd), overrides=["phase1.steps=1", "phase2.steps=0"],
              overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt", "train_log.jsonl"]
    assert (out / "train_log.jsonl").read_text() == '{"global_step": 99}\n'


def test_compile_setting_compiles_the_unet_once(tiny_sd, two_square_scene, tmp_path, monkeypatch):
    """compile=true hands the UNet to torch.compile (here recorded, not run: a CPU compile takes minutes) and
    the run still writes its bundle; the default leaves it alone."""
    from diffusers import UNet2DConditionModel

    calls = []
    monkeypatch.setattr(UNet2DConditionModel, "compile", lambda self, *a, **k: calls.append(type(self).__name__),
                        raising=False)
    train(two_square_scene, tmp_path / "plain", model=str(tiny_sd), overrides=["phase1.steps=1", "phase2.steps=0"],
          progress=False)
    assert calls == []
    train(two_square_scene, tmp_path / "compiled", model=str(tiny_sd),
          overrides=["phase1.steps=1", "phase2.steps=0", "compile=true"], progress=False)
    assert calls == ["UNet2DConditionModel"]
    assert (tmp_path / "compiled" / "manifest.json").is_file()


def test_snr_weighted_outputs_weigh_each_rows_squared_error():
    """_snr_weighted scales pred and target by sqrt(w) per row, so the plain masked MSE of the scaled pair is
    the mean of w_i × each row's own masked MSE, for ε- and v-prediction alike; gamma 0 leaves them as they are."""
    from diffusers import DDPMScheduler

    from scenetok.losses import masked_diffusion_loss, min_snr_weights
    from scenetok.training.trainer import _snr_weighted

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    mask = (torch.rand(4, 1, 8, 8, generator=g) > 0.5).float()
    t = torch.tensor([5, 200, 600, 990])
    for kind in ("epsilon", "v_prediction"):
        sch = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
        p, q = _snr_weighted(sch, t, pred, target, 5.0)
        w = min_snr_weights(sch.alphas_cumprod[t], 5.0, kind)
        rows = torch.stack([masked_diffusion_loss(pred[i:i + 1], target[i:i + 1], mask[i:i + 1]) for i in range(4)])
        assert torch.allclose(masked_diffusion_loss(p, q, mask), (w * rows).mean(), rtol=1e-5)
        assert w.max() <= 1.0 + 1e-6 and w[0] < 0.2  # the nearly clean timestep is capped hard
    p, q = _snr_weighted(DDPMScheduler(), t, pred, target, 0.0)
    assert p is pred and q is target


def test_min_snr_weights_epsilon_prediction():
    from scenetok.losses import min_snr_weights

    acp = torch.tensor([0.0, 0.5, 5 / 6, 0.99])  # SNR 0, 1, 5, 99
    w = min_snr_weights(acp, 5.0, "epsilon")
    assert torch.allclose(w, torch.tensor([0.0, 1.0, 1.0, 5 / 99]), atol=1e-6)


def test_snr_gamma_setting_changes_training_and_is_checked(tiny_sd, two_square_scene, tmp_path):
    from scenetok.errors import ConfigError

    # ε-prediction: weight 1 wherever SNR <= γ; a small γ (0.02) weighs nearly every row well below 1
    sets = ["phase1.steps=3", "phase2.steps=1", "attn.weight=0", "checkpoint_every=0", "preview_every=0"]
    a = train(two_square_scene, tmp_path / "a", model=str(tiny_sd), overrides=sets, progress=False)
    b = train(two_square_scene, tmp_path / "b", model=str(tiny_sd), overrides=sets + ["snr_gamma=0.02"], progress=False)
    da = [r["diffusion"] for r in _rows(a.path) if "diffusion" in r]
    db = [r["diffusion"] for r in _rows(b.path) if "diffusion" in r]
    assert len(da) == len(db) == 4 and db[0] < 0.9 * da[0]  # same model and noise at step 1: weights < 1
    ea, _ = _final_weights(a.path)
    eb, _ = _final_weights(b.path)
    assert not torch.equal(ea["asset0.safetensors"]["<asset0>"], eb["asset0.safetensors"]["<asset0>"])
    with pytest.raises(ConfigError, match="snr_gamma"):
        train(two_square_scene, tmp_path / "c", model=str(tiny_sd), overrides=sets + ["snr_gamma=-1"], progress=False)


def test_timestep_range_limits_the_drawn_noise_levels(tiny_sd, two_square_scene, tmp_path, monkeypatch):
    from scenetok.errors import ConfigError
    from scenetok.methods.break_a_scene import BreakAScene
    from scenetok.training.trainer import timestep_bounds

    assert timestep_bounds({}, 1000) == (0, 1000)  # the papers: every timestep, the same randint call as before
    assert timestep_bounds({"timestep_min": 0.2, "timestep_max": 0.8}, 1000) == (200, 800)
    assert timestep_bounds({"timestep_min": 0.9999, "timestep_max": 1.0}, 1000) == (999, 1000)  # never empty
    seen = []
    losses = BreakAScene.losses

    def spy(self, batch, out, cfg):
        seen.extend(batch.timesteps.tolist())
        return losses(self, batch, out, cfg)

    monkeypatch.setattr(BreakAScene, "losses", spy)
    sets = ["phase1.steps=6", "phase2.steps=2", "batch_size=2", "checkpoint_every=0", "preview_every=0"]
    train(two_square_scene, tmp_path / "a", model=str(tiny_sd), overrides=sets + ["timestep_min=0.6", "timestep_max=0.7"],
          progress=False)
    assert len(seen) >= 16 and all(600 <= t < 700 for t in seen), seen
    assert len(set(seen)) > 4  # still drawn, not fixed
    for bad in (["timestep_min=0.5", "timestep_max=0.5"], ["timestep_max=1.5"], ["timestep_min=-0.1"]):
        with pytest.raises(ConfigError, match="timestep_min and timestep_max"):
            train(two_square_scene, tmp_path / "b", model=str(tiny_sd), overrides=sets + bad, progress=False)


def test_handle_norm_cap_keeps_handles_as_long_as_words(tiny_sd, two_square_scene, tmp_path):
    from scenetok.errors import ConfigError

    sets = ["phase1.steps=6", "phase1.lr=0.05", "phase2.steps=0", "checkpoint_every=0", "preview_every=0"]
    free = train(two_square_scene, tmp_path / "a", model=str(tiny_sd), overrides=sets, progress=False)
    capped = train(two_square_scene, tmp_path / "b", model=str(tiny_sd), overrides=sets + ["optim.handle_norm_cap=1.0"],
                   progress=False)
    from transformers import CLIPTextModel

    words = CLIPTextModel.from_pretrained(str(tiny_sd), subfolder="text_encoder").get_input_embeddings().weight
    mean = float(words.norm(dim=-1).mean())
    def norms(out):
        return [float(v.norm()) for p in sorted((out / "embeddings").glob("*.safetensors")) for v in load_file(str(p)).values()]

    na, nb = norms(free.path), norms(capped.path)
    assert max(na) > 1.5 * mean  # at this rate the handles grow well beyond a word
    assert max(nb) <= mean * 1.001 and min(nb) > 0.5 * mean, (nb, mean)
    with pytest.raises(ConfigError, match="handle_norm_cap"):
        train(two_square_scene, tmp_path / "c", model=str(tiny_sd), overrides=sets + ["optim.handle_norm_cap=-1"],
              progress=False)


def test_handles_lr_scale_moves_the_handles_at_their_own_rate(tiny_sd, two_square_scene, tmp_path):
    """One joint step (handles + UNet + text encoder): AdamW's first step moves a tensor by about its learning
    rate, so with optim.handles_lr_scale=10 the handles move ~10x as far and the UNet exactly as far."""
    from conftest import load_tokenizer_and_text_encoder
    from scenetok.errors import ConfigError
    from scenetok.tokens import add_handles

    sets = ["phase1.steps=0", "phase2.steps=1", "phase2.lr=1e-4", "attn.weight=0", "checkpoint_every=0",
            "preview_every=0"]
    a = train(two_square_scene, tmp_path / "a", model=str(tiny_sd), overrides=sets, progress=False)
    b = train(two_square_scene, tmp_path / "b", model=str(tiny_sd), overrides=sets + ["optim.handles_lr_scale=10"],
              progress=False)
    tok, te = load_tokenizer_and_text_encoder(tiny_sd)
    init = [h["init_word"] for h in json.loads((a.path / "manifest.json").read_text())["handles"]]
    start = add_handles(tok, te, ["<asset0>", "<asset1>"], init).as_dict(te)
    (ea, ua), (eb, ub) = _final_weights(a.path), _final_weights(b.path)
    for i, name in enumerate(["<asset0>", "<asset1>"]):
        da = (ea[f"asset{i}.safetensors"][name] - start[name]).abs().max().item()
        db = (eb[f"asset{i}.safetensors"][name] - start[name]).abs().max().item()
        assert 0.9e-4 < da < 1.2e-4 and 9.0 < db / da < 11.0, (da, db)
    assert ua.keys() == ub.keys() and all(torch.allclose(ua[k], ub[k], atol=1e-7) for k in ua)
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="handles_lr_scale"):
            train(two_square_scene, tmp_path / f"c{bad}", model=str(tiny_sd),
                  overrides=sets + [f"optim.handles_lr_scale={bad}"], progress=False)


def test_init_fit_steps_starts_a_multi_piece_handle_from_a_fitted_vector(tiny_sd, tmp_path):
    """init_fit_steps > 0: the handle whose init word is several pieces ("zebra" in the tiny vocabulary) starts
    from a fitted vector, not the mean of its pieces, and the training log says how well it was fitted; the
    one-piece word's handle starts from its word's row as before. Bad values are refused by name."""
    from conftest import load_tokenizer_and_text_encoder, two_squares
    from scenetok.errors import ConfigError
    from scenetok.scene import Scene
    from scenetok.tokens import add_handles

    img, masks = two_squares()
    scene = Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "square"],
                              init_words=["zebra", "cat"])
    sets = ["phase1.steps=1", "phase1.lr=1e-9", "phase2.steps=0", "checkpoint_every=0", "preview_every=0",
            "attn.weight=0"]
    fit = sets + ["init_fit_steps=60", "init_fit_templates=a photo of a {} | a red {} and a cat"]
    out = train(scene, tmp_path / "a", model=str(tiny_sd), overrides=fit, progress=False)
    events = [json.loads(x) for x in (out.path / "train_log.jsonl").read_text().splitlines() if "init_fit" in x]
    assert len(events) == 1
    report = events[0]["init_fit"]
    assert set(report) == {"<asset0>", "<asset0>:start"} and report["<asset0>"] < report["<asset0>:start"]
    tok, te = load_tokenizer_and_text_encoder(tiny_sd)
    mean_start = add_handles(tok, te, ["<asset0>", "<asset1>"], ["zebra", "cat"]).as_dict(te)
    final = {p.name: load_file(str(p)) for p in sorted((out.path / "embeddings").glob("*.safetensors"))}
    a0, a1 = final["asset0.safetensors"]["<asset0>"], final["asset1.safetensors"]["<asset1>"]
    assert (a0 - mean_start["<asset0>"]).abs().max() > 1e-3  # far more than one step at lr 1e-9 moves it
    assert (a1 - mean_start["<asset1>"]).abs().max() < 1e-6
    for bad, name in (("init_fit_steps=-1", "init_fit_steps"), ("init_fit_templates=a photo", "init_fit_templates"),
                      ("init_fit_templates=a {} {}", "init_fit_templates")):
        with pytest.raises(ConfigError, match=name):
            train(scene, tmp_path / "bad", model=str(tiny_sd), overrides=sets + [bad], progress=False)


def test_lr_schedule_decays_each_phase_from_its_rate_to_lr_final(tiny_sd, two_square_scene, tmp_path):
    """optim.lr_schedule=linear / cosine: each phase starts at its own rate and ends at lr_final times it (the log
    rows say which rate each step used); constant (the default) keeps it; bad values are refused by name."""
    from scenetok.errors import ConfigError
    from scenetok.training.trainer import lr_factor

    assert [lr_factor({"lr_schedule": "linear", "lr_final": 0.2}, s, 5) for s in range(5)] == \
        pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert [lr_factor({"lr_schedule": "cosine"}, s, 3) for s in range(3)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_factor({}, 3, 10) == 1.0 and lr_factor({"lr_schedule": "cosine"}, 0, 1) == 1.0

    sets = ["phase1.steps=3", "phase1.lr=1e-3", "phase2.steps=2", "phase2.lr=1e-5", "checkpoint_every=0",
            "preview_every=0", "attn.weight=0"]
    out = train(two_square_scene, tmp_path / "a", model=str(tiny_sd), progress=False,
                overrides=sets + ["optim.lr_schedule=linear", "optim.lr_final=0.5"])
    rows = [json.loads(x) for x in (out.path / "train_log.jsonl").read_text().splitlines()]
    lrs = [(r["phase"], r["lr"]) for r in rows if "lr" in r]
    assert [p for p, _ in lrs] == ["phase1"] * 3 + ["phase2"] * 2
    assert [lr for _, lr in lrs] == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 1e-5, 0.5e-5])
    # the optimizer uses the rate: a 2-step phase decaying linearly to 0 takes no second step, so its handles end
    # where a 1-step phase leaves them
    one = ["phase1.lr=1e-2", "phase2.steps=0", "checkpoint_every=0", "preview_every=0", "attn.weight=0"]
    b = train(two_square_scene, tmp_path / "b", model=str(tiny_sd), progress=False, overrides=one + ["phase1.steps=1"])
    c = train(two_square_scene, tmp_path / "c", model=str(tiny_sd), progress=False,
              overrides=one + ["phase1.steps=2", "optim.lr_schedule=linear"])
    d = train(two_square_scene, tmp_path / "d", model=str(tiny_sd), progress=False, overrides=one + ["phase1.steps=2"])
    emb = lambda out: {p.name: load_file(str(p)) for p in sorted((out.path / "embeddings").glob("*.safetensors"))}  # noqa: E731
    eb, ec, ed = emb(b), emb(c), emb(d)
    assert all(torch.equal(eb[f][k], ec[f][k]) for f in eb for k in eb[f])
    assert any(not torch.equal(eb[f][k], ed[f][k]) for f in eb for k in eb[f])  # a constant rate does move on
    for bad, name in (("optim.lr_schedule=step", "lr_schedule"), ("optim.lr_final=2", "lr_final")):
        with pytest.raises(ConfigError, match=name):
            train(two_square_scene, tmp_path / "bad", model=str(tiny_sd), overrides=sets + [bad], progress=False)
