"""The shipped toy-sd model: loads through the standard diffusers loader, generates, stays small; the
training code runs end to end on a tiny budget."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import pytest
import torch

from scenetok.toyworld.model import toy_sd_path

TOY = toy_sd_path()
# floors of test_shipped_draws_what_it_is_asked (measured on the shipped model: see the test)
# (toy-sd v1d: shape 0.81, texture 0.75, no extra 0.93, whole image 0.45)
SHAPE_FLOOR, TEXTURE_FLOOR, NO_EXTRA_FLOOR, ALL_OK_FLOOR = 0.7, 0.6, 0.8, 0.3
shipped = pytest.mark.skipif(not (TOY / "model_index.json").is_file(), reason="toy-sd not shipped yet")


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TOY))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@shipped
def test_shipped_folder_is_safetensors_and_small():
    files = [f for f in TOY.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    assert total <= 25 * 1024 * 1024, f"toy-sd is {total / 2**20:.1f} MiB, over the 25 MiB cap"
    names = {f.name for f in files}
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names), "pickle weights shipped"
    for sub in ("unet", "vae", "text_encoder"):
        assert list((TOY / sub).glob("*.safetensors")), sub
    index = json.loads((TOY / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert (TOY / "README.md").is_file(), "model card missing"


@shipped
def test_shipped_architecture(toy_pipe):
    from diffusers import DDIMScheduler

    unet, vae = toy_pipe.unet, toy_pipe.vae
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert all(p.dtype == torch.float32 for p in toy_pipe.text_encoder.parameters())
    assert isinstance(toy_pipe.scheduler, DDIMScheduler)
    # VAE down-samples by 4: 64 px -> 16×16×4 latents; scaling factor was measured, not left at 1
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 4
    assert vae.config.latent_channels == 4
    assert vae.config.scaling_factor != 1.0
    # cross-attention at 16×16 (the first down block) and at one more resolution
    res, cross = unet.config.sample_size, []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            cross.append(res)
        if block.downsamplers is not None:
            res //= 2
    assert unet.config.sample_size == 16
    assert 16 in cross and len(set(cross)) >= 2, cross
    # every caption word is a single token
    ids = toy_pipe.tokenizer("a photo of", add_special_tokens=False).input_ids
    assert len(ids) == 3


@shipped
def test_shipped_generates_64px(toy_pipe):
    g = torch.Generator().manual_seed(0)
    img = toy_pipe("a photo of a red circle on a blue background", height=64, width=64, num_inference_steps=4,
                   guidance_scale=5.0, generator=g, output_type="np").images[0]
    assert img.shape == (64, 64, 3)
    assert np.isfinite(img).all()
    assert img.std() > 0.01  # not a flat or blank image


@shipped
def test_shipped_draws_what_it_is_asked(toy_pipe):
    """The oracle on 40 unseen 1–2-object captions (a seed stream training never uses; DDIM 20, guidance 5).
    The model card's 200-caption scores are the reference; the floors sit about two binomial standard
    errors under them, so a model that lost its shapes, textures or binding fails here."""
    from scenetok.toyworld.train import evaluate_toy_sd

    res = evaluate_toy_sd(pipe=toy_pipe, n=40, seed=11, steps=20, guidance=5.0, batch=40)
    print({k: round(res[k], 3) for k in ("background", "color", "shape", "texture", "no_extra", "all_ok")})
    assert res["background"] >= 0.95 and res["color"] >= 0.9
    assert res["shape"] >= SHAPE_FLOOR and res["texture"] >= TEXTURE_FLOOR
    assert res["no_extra"] >= NO_EXTRA_FLOOR and res["all_ok"] >= ALL_OK_FLOOR


@shipped
def test_shipped_attention_maps_at_16(toy_pipe):
    """Hook the cross-attention of the first down block: its queries cover the 16×16 latent grid."""
    seen = []
    attn = [m for n, m in toy_pipe.unet.named_modules() if n.endswith("attn2")][0]
    h = attn.register_forward_hook(lambda mod, args, kwargs_out: seen.append(args[0].shape))
    try:
        toy_pipe("a photo of a star", height=64, width=64, num_inference_steps=1, guidance_scale=1.0,
                 output_type="latent")
    finally:
        h.remove()
    assert seen and seen[0][1] == 16 * 16


def test_train_tiny_budget(tmp_path, monkeypatch):
    """Two VAE steps and two UNet steps on a handful of renders produce a loadable pipeline."""
    pytest.importorskip("scenetok.toyworld.world")
    from diffusers import StableDiffusionPipeline

    from scenetok.toyworld.train import train_toy_sd

    out = train_toy_sd(tmp_path / "toy", seed=0, vae_steps=2, unet_steps=2, batch_size=2, vae_batch_size=2,
                       n_images=6, save_every_minutes=None, eval_every_minutes=None, log_every=1)
    info = json.loads((out / "training_info.json").read_text())
    assert info["vae_steps"] == 2 and info["unet_steps"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a photo of a square", height=64, width=64, num_inference_steps=2, output_type="np").images[0]
    assert img.shape == (64, 64, 3)


def test_main_rejects_bad_arguments(tmp_path):
    from scenetok.toyworld.train import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--unet-steps", "0"])


def _tiny_train(out, **kw):
    from scenetok.toyworld.train import train_toy_sd

    args = dict(seed=0, vae_steps=2, unet_steps=5, batch_size=2, vae_batch_size=2, n_images=6,
                save_every_minutes=None, eval_every_minutes=None, checkpoint_every_minutes=1e-9, log_every=1,
                progress=False)
    args.update(kw)
    return train_toy_sd(out, **args)


def test_log_lines_say_how_long_is_left(tmp_path, capsys):
    """--no-progress log lines give the time left at this process's speed; the last step has none left."""
    import re

    from scenetok.toyworld.train import _duration

    assert (_duration(42 * 60), _duration(4.4 * 3600), _duration(-3)) == ("42 min", "4.4 h", "0 min")
    _tiny_train(tmp_path / "run")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "unet step" in ln]
    assert len(lines) == 5
    assert all(re.search(r"about \d+ min left$", ln) for ln in lines), lines
    assert lines[-1].endswith("about 0 min left")


def _weights(folder):
    from safetensors.torch import load_file

    return {f"{sub}.{k}": v for sub in ("unet", "text_encoder", "vae")
            for f in sorted((folder / sub).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_train_resume_after_interrupt_is_exact(tmp_path, monkeypatch):
    """Ctrl-C in the middle of UNet step 4, then --resume: the same weights, bit for bit, as a run that was
    never interrupted; the resumable state is removed once the model is saved."""
    from scenetok.toyworld import world
    from scenetok.toyworld.train import checkpoint_dir

    ref = _weights(_tiny_train(tmp_path / "ref"))

    real_caption = world.caption
    calls = {"n": 0}

    def flaky_caption(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 1:  # batch 2: the first caption of step 4
            raise KeyboardInterrupt
        return real_caption(*a, **k)

    monkeypatch.setattr(world, "caption", flaky_caption)
    with pytest.raises(KeyboardInterrupt):
        _tiny_train(tmp_path / "run")
    assert (checkpoint_dir(tmp_path / "run") / "checkpoint" / "state.json").is_file()
    state = json.loads((checkpoint_dir(tmp_path / "run") / "checkpoint" / "state.json").read_text())
    assert state["progress"]["step"] == 3
    with pytest.raises(FileExistsError, match="--resume"):
        _tiny_train(tmp_path / "run")
    monkeypatch.setattr(world, "caption", real_caption)
    # a resume with a setting that changes what is trained is refused, naming it, and the state is kept
    for kw, name in (({"lr": 1e-3}, "lr"), ({"batch_size": 3}, "batch_size"), ({"ema_decay": 0.9}, "ema_decay"),
                     ({"object_weights": {1: 1.0}}, "object_weights")):
        with pytest.raises(ValueError, match=f"with {name}=.*resume with the same setting"):
            _tiny_train(tmp_path / "run", resume=True, **kw)
    # the encoded latents were kept beside the state: the resumed run neither renders nor encodes the data set
    assert (checkpoint_dir(tmp_path / "run") / "latents.safetensors").is_file()
    from diffusers import AutoencoderKL

    real_encode, real_render = AutoencoderKL.encode, world.render
    counts = {"encode": 0, "render": 0}

    def counting_encode(self, *a, **k):
        counts["encode"] += 1
        return real_encode(self, *a, **k)

    def counting_render(*a, **k):
        counts["render"] += 1
        return real_render(*a, **k)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    monkeypatch.setattr(world, "render", counting_render)
    out = _tiny_train(tmp_path / "run", resume=True)
    assert counts["encode"] == 0 and counts["render"] == 6  # only the reconstruction check's scenes
    got = _weights(out)
    assert got.keys() == ref.keys()
    diff = max((got[k].float() - ref[k].float()).abs().max().item() for k in ref)
    assert diff == 0.0
    assert not checkpoint_dir(out).exists()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_finishes_the_step_and_writes_the_state(tmp_path, monkeypatch, signame):
    """A signal in the middle of UNet step 4 (with no periodic checkpoint due): the step is finished, the state
    written at step 4, the run stops as the signal asks, the handlers are given back, and --resume ends bit for
    bit where an uninterrupted run does."""
    import signal

    from scenetok.toyworld import world
    from scenetok.toyworld.train import checkpoint_dir

    ref = _weights(_tiny_train(tmp_path / "ref"))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    real_caption = world.caption
    calls = {"n": 0}

    def signalling_caption(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 1:  # the first caption of step 4
            signal.raise_signal(getattr(signal, signame))
        return real_caption(*a, **k)

    monkeypatch.setattr(world, "caption", signalling_caption)
    expected = KeyboardInterrupt if signame == "SIGINT" else SystemExit
    with pytest.raises(expected):
        _tiny_train(tmp_path / "run", checkpoint_every_minutes=60.0)
    assert {s: signal.getsignal(s) for s in before} == before
    state = json.loads((checkpoint_dir(tmp_path / "run") / "checkpoint" / "state.json").read_text())
    assert state["progress"]["step"] == 4  # the interrupted step was finished, not lost
    monkeypatch.setattr(world, "caption", real_caption)
    got = _weights(_tiny_train(tmp_path / "run", resume=True, checkpoint_every_minutes=60.0))
    assert max((got[k].float() - ref[k].float()).abs().max().item() for k in ref) == 0.0


def test_train_resume_ignores_latents_of_another_vae(tmp_path, monkeypatch, capsys):
    """A latent cache that another VAE made (or a torn file) is not used: the resumed run encodes again and
    still ends bit for bit where an uninterrupted run does."""
    from scenetok.toyworld import world
    from scenetok.toyworld.train import _cache_matches, _read_latent_cache, _write_latent_cache, checkpoint_dir

    ref = _weights(_tiny_train(tmp_path / "ref"))
    real_caption = world.caption
    calls = {"n": 0}

    def flaky_caption(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:
            raise KeyboardInterrupt
        return real_caption(*a, **k)

    monkeypatch.setattr(world, "caption", flaky_caption)
    with pytest.raises(KeyboardInterrupt):
        _tiny_train(tmp_path / "run")
    monkeypatch.setattr(world, "caption", real_caption)
    cache = checkpoint_dir(tmp_path / "run") / "latents.safetensors"
    mean, std = _read_latent_cache(cache)
    assert _cache_matches(cache, n=6, seed=0)
    _write_latent_cache(cache, mean + 1.0, std, n=6, seed=0, vae_digest="0" * 64)  # the right scenes, another VAE
    capsys.readouterr()
    out = _tiny_train(tmp_path / "run", resume=True)
    assert "made by another VAE" in capsys.readouterr().out
    got = _weights(out)
    assert max((got[k].float() - ref[k].float()).abs().max().item() for k in ref) == 0.0


def test_train_warm_start_keeps_vae_and_starts_from_the_given_weights(tmp_path):
    """--init-from: the VAE is taken as is and stage 2 starts from the given UNet/text encoder (with lr 0 the
    saved weights are the loaded ones, up to the UNet's fp16 storage); a fresh run's weights differ."""
    src = _tiny_train(tmp_path / "src", checkpoint_every_minutes=None)
    out = _tiny_train(tmp_path / "warm", init_from=src, seed=1, lr=0.0, checkpoint_every_minutes=None)
    a, b = _weights(src), _weights(out)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0.0
    info = json.loads((out / "training_info.json").read_text())
    assert info["init_from"]["path"] == str(src) and info["init_from"]["unet_steps"] == 5
    fresh = _weights(_tiny_train(tmp_path / "fresh", seed=1, lr=0.0, checkpoint_every_minutes=None))
    assert max((a[k].float() - fresh[k].float()).abs().max().item() for k in a if k.startswith("unet.")) > 1e-3


def test_train_warm_start_keeps_the_source_tokenizer(tmp_path):
    """A warm start learns on the ids its text encoder knows: when the source's tokenizer differs from the
    one a fresh model gets (the shipped v1d's splits some colour words into pieces), the source's tokenizer
    and embedding table are kept (before: a size mismatch on loading the text encoder)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    src = _tiny_train(tmp_path / "src", checkpoint_every_minutes=None)
    tok = CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
    te = CLIPTextModel.from_pretrained(str(src / "text_encoder"))
    tok.add_tokens(["zebrine", "quokka"])
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    tok.save_pretrained(str(src / "tokenizer"))
    te.save_pretrained(str(src / "text_encoder"))
    out = _tiny_train(tmp_path / "warm", init_from=src, seed=1, lr=0.0, checkpoint_every_minutes=None)
    got = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(got) == len(tok) and got("zebrine quokka").input_ids == tok("zebrine quokka").input_ids
    a, b = _weights(src), _weights(out)
    emb = [k for k in a if k.endswith("token_embedding.weight")]
    assert emb and all(a[k].shape == b[k].shape for k in emb)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0.0


def _cut_tokenizer(words_left_out):
    """A toy tokenizer that cuts the given words into pieces (as toy-sd v1d's cuts "triangle")."""
    from scenetok.toyworld.model import _build_tokenizer, toy_vocabulary

    return _build_tokenizer([w for w in toy_vocabulary() if w not in words_left_out])


def test_remap_token_embeddings_copies_rows_by_string_and_starts_cut_words_from_their_pieces():
    import torch

    from scenetok.toyworld.model import _build_tokenizer, toy_vocabulary
    from scenetok.toyworld.train import remap_token_embeddings

    cut, whole = _cut_tokenizer({"triangle", "green"}), _build_tokenizer(toy_vocabulary())
    assert len(cut("triangle", add_special_tokens=False).input_ids) > 1
    weight = torch.randn(len(cut), 8, generator=torch.Generator().manual_seed(0))
    table, split = remap_token_embeddings(weight, cut, whole)
    assert split == ["green", "triangle"] and table.shape == (len(whole), 8)
    tri = whole("triangle", add_special_tokens=False).input_ids
    assert len(tri) == 1
    pieces = cut("triangle", add_special_tokens=False).input_ids
    assert torch.allclose(table[tri[0]], weight[pieces].mean(0))
    # every other word, and the special tokens, keep their row: a caption without a cut word reads the same
    caption = "a photo of a red striped circle on a white background"
    a, b = cut(caption).input_ids, whole(caption).input_ids
    assert torch.equal(weight[a], table[b])


def test_train_warm_start_with_whole_words_retokenizes(tmp_path):
    """--whole-words: the warm start gets the fresh tokenizer (every caption word one token) and the source's
    rows re-indexed (with lr 0 the saved text encoder reads an uncut caption exactly as the source does, and a cut
    word's row is the mean of its pieces'); without --init-from it is refused."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from scenetok.toyworld.train import remap_token_embeddings

    src = _tiny_train(tmp_path / "src", checkpoint_every_minutes=None)
    cut, whole = _cut_tokenizer({"triangle"}), CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
    te = CLIPTextModel.from_pretrained(str(src / "text_encoder"))
    table, _ = remap_token_embeddings(te.get_input_embeddings().weight.detach(), whole, cut)
    te.resize_token_embeddings(len(cut), mean_resizing=False)
    with torch.no_grad():
        te.get_input_embeddings().weight.copy_(table)
    cut.save_pretrained(str(src / "tokenizer"))
    te.save_pretrained(str(src / "text_encoder"))
    out = _tiny_train(tmp_path / "warm", init_from=src, seed=1, lr=0.0, checkpoint_every_minutes=None,
                      whole_words=True)
    got_tok = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(got_tok("triangle", add_special_tokens=False).input_ids) == 1
    got_te = CLIPTextModel.from_pretrained(str(out / "text_encoder"))
    caption = "a photo of a red striped circle on a white background"
    with torch.no_grad():
        ref = te(cut(caption, return_tensors="pt").input_ids).last_hidden_state
        now = got_te(got_tok(caption, return_tensors="pt").input_ids).last_hidden_state
    assert torch.allclose(ref, now, atol=1e-5)
    pieces = cut("triangle", add_special_tokens=False).input_ids
    row = got_te.get_input_embeddings().weight[got_tok("triangle", add_special_tokens=False).input_ids[0]]
    assert torch.allclose(row, te.get_input_embeddings().weight[pieces].mean(0), atol=1e-6)
    info = json.loads((out / "training_info.json").read_text())
    assert info["whole_words"] is True and info["whole_words_split_in_source"] == ["triangle"]
    with pytest.raises(ValueError, match="needs init_from"):
        _tiny_train(tmp_path / "nope", whole_words=True)


def test_train_resume_without_state_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="start without --resume"):
        _tiny_train(tmp_path / "none", resume=True)


def test_train_periodic_oracle_scores_are_recorded(tmp_path):
    out = _tiny_train(tmp_path / "s", unet_steps=2, eval_every_minutes=1e-9, eval_n=2, checkpoint_every_minutes=None)
    info = json.loads((out / "training_info.json").read_text())
    assert [r["step"] for r in info["scores"]][-1] == 2
    assert all(0.0 <= r["background"] <= 1.0 and 0.0 <= r["shape"] <= 1.0 for r in info["scores"])


def test_arch_presets_build_their_latent_sizes():
    """v1 (shipped): ×4 VAE, 16×16 latents; v2: ×2 VAE, 32×32 latents with no cross-attention at 32×32."""
    from scenetok.toyworld.model import ARCHS, build_toy_sd

    for name, side, factor in (("v1", 16, 4), ("v2", 32, 2)):
        pipe = build_toy_sd(None, 0, ARCHS[name])
        assert pipe.unet.config.sample_size == side
        assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == factor
        with torch.no_grad():
            lat = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        assert lat.shape == (1, 4, side, side)
    assert ARCHS["v2"].unet_blocks[0] == "plain"


def test_min_snr_weights_cap_the_clean_timesteps():
    import torch

    from scenetok.losses import min_snr_weights

    acp = torch.tensor([0.0, 0.5, 5 / 6, 0.99])  # SNR 0, 1, 5, 99
    w = min_snr_weights(acp, 5.0)
    assert torch.allclose(w, torch.tensor([0.0, 0.5, 5 / 6, 5 / 100]), atol=1e-6)


def test_train_with_snr_gamma_changes_the_weights_and_is_recorded(tmp_path):
    plain = _weights(_tiny_train(tmp_path / "plain", checkpoint_every_minutes=None, snr_gamma=None))
    snr = _weights(_tiny_train(tmp_path / "snr", checkpoint_every_minutes=None, snr_gamma=5.0))
    assert max((plain[k].float() - snr[k].float()).abs().max().item() for k in plain if k.startswith("unet.")) > 0
    info = json.loads((tmp_path / "snr" / "training_info.json").read_text())
    assert info["snr_gamma"] == 5.0


def test_defaults_are_the_one_command_recipe(monkeypatch):
    """`scenetok toyworld train --out DIR` alone is the documented recipe (docs/toy-sd.md): the CLI and the
    Python function agree on it."""
    import inspect

    from scenetok.toyworld.train import main, train_toy_sd

    d = {k: v.default for k, v in inspect.signature(train_toy_sd).parameters.items()}
    assert (d["n_images"], d["unet_steps"], d["minutes"], d["snr_gamma"], d["bf16"], d["lr"]) == \
        (40000, 11000, None, 5.0, None, 3e-4)
    seen = {}
    # the stand-in keeps the real signature (functools.wraps): main() reads its defaults from it
    fake = functools.wraps(train_toy_sd)(lambda out_dir, **kw: seen.update(kw) or out_dir)
    monkeypatch.setattr("scenetok.toyworld.train.train_toy_sd", fake)
    assert main(["--out", "x"]) == 0
    for k in ("n_images", "unet_steps", "minutes", "snr_gamma", "bf16", "lr", "eval_every_minutes", "eval_n"):
        assert seen[k] == d[k], k


def test_cli_passes_every_option_to_the_trainer(monkeypatch):
    """`scenetok toyworld train --out DIR ...` reaches the trainer with its options in order (argparse's
    REMAINDER inside a sub-command used to reject a leading `--out`)."""
    from scenetok import cli

    seen = []
    monkeypatch.setattr("scenetok.toyworld.train.main", lambda argv, prog: seen.append((list(argv), prog)) or 0)
    assert cli.main(["toyworld", "train", "--out", "x", "--seed", "3"]) == 0
    assert cli.main(["toyworld", "train", "--bf16", "--out", "y"]) == 0
    assert seen == [(["--out", "x", "--seed", "3"], "scenetok toyworld train"),
                    (["--bf16", "--out", "y"], "scenetok toyworld train")]
    with pytest.raises(SystemExit):
        cli.main(["demo", "--no-such-option"])


def test_train_help_names_the_command_and_every_default(capsys):
    """`scenetok toyworld train --help` is headed by the command the user typed, and every option shows its
    default (the same values as train_toy_sd's)."""
    from scenetok.toyworld.train import main

    with pytest.raises(SystemExit):
        main(["--help"], prog="scenetok toyworld train")
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: scenetok toyworld train")
    for option, default in (("--seed", "0"), ("--unet-steps", "11000"), ("--batch-size", "32"), ("--lr", "0.0003"),
                            ("--threads", "2"), ("--snr-gamma", "5.0")):
        assert re.search(re.escape(option) + r" [A-Z_]+ .*?\(default: " + re.escape(default) + r"\)", text), option


def test_bf16_only_where_the_device_computes_it(monkeypatch):
    """bf16 autocast is the default only on devices with native bf16 math: on an AVX2-only CPU PyTorch
    emulates it (a 1024² matmul measured 140× slower than fp32), which would make the one-command recipe
    take ~100 times longer."""
    from scenetok.training.memory import computes_bf16

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": False, "amx_bf16": False})
    assert computes_bf16("cpu") is False
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": True})
    assert computes_bf16("cpu") is True
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert computes_bf16(torch.device("cpu")) is True
    assert computes_bf16("meta") is False


def test_bare_noun_captions():
    """bare_nouns names an object by its shape word alone with that probability; 0 leaves captions and the
    random stream exactly as before (earlier models stay reproducible)."""
    from scenetok.toyworld import world

    rng = np.random.default_rng(3)
    specs = [world.sample_scene(rng, n_objects=(1, 3)) for _ in range(200)]
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    assert [world.caption(s, a) for s in specs] == [world.caption(s, b, bare_nouns=0.0) for s in specs]
    assert a.bit_generator.state == b.bit_generator.state
    spec = world.SceneSpec((world.ObjectSpec("star", "red", "striped", 0.3, 0.3, 0.2),
                            world.ObjectSpec("circle", "blue", "plain", 0.7, 0.7, 0.2)), "white")
    text = world.caption(spec, np.random.default_rng(0), bare_nouns=1.0)
    assert sorted(text.removeprefix("a photo of ").removesuffix(" on a white background").split(" and ")) == \
        ["a circle", "a star"]
    rng = np.random.default_rng(1)
    words = [w for s in specs for w in world.caption_words(world.caption(s, rng, bare_nouns=0.3))]
    n_obj = sum(len(s.objects) for s in specs)
    n_colour = sum(w in world.COLORS for w in words)
    assert 0.6 < n_colour / n_obj < 0.8  # about 70 % of the objects keep their colour word


def test_object_weights_set_how_many_objects_a_training_scene_has(tmp_path):
    """--object-weights COUNT:WEIGHT,...: parsed strictly, the default draws the same scenes as before, other
    weights shift the object counts, and the run records them."""
    import collections

    from scenetok.toyworld.train import N_OBJECT_WEIGHTS, main, parse_object_weights, render_dataset

    assert parse_object_weights("1:0.15, 2:0.35,3:0.3,4:0.2") == {1: 0.15, 2: 0.35, 3: 0.3, 4: 0.2}
    for bad in ("1:0.5,5:0.5", "1:-1", "1:0.5,1:0.5", "2", "a:b", "1:0,2:0"):
        with pytest.raises(ValueError, match="object weights"):
            parse_object_weights(bad)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--object-weights", "0:1"])
    assert not (tmp_path / "x").exists()
    default = render_dataset(60, 0, specs_only=True)[1]
    assert render_dataset(60, 0, specs_only=True, object_weights=dict(N_OBJECT_WEIGHTS))[1] == default
    counts = collections.Counter(len(s.objects) for s in
                                 render_dataset(300, 0, specs_only=True, object_weights={3: 1.0, 4: 1.0})[1])
    assert set(counts) == {3, 4} and min(counts.values()) > 100
    _tiny_train(tmp_path / "run", checkpoint_every_minutes=None, object_weights={4: 1.0})
    assert json.loads((tmp_path / "run" / "training_info.json").read_text())["object_weights"] == "4:1"


def test_bare_nouns_reach_training(tmp_path):
    base = _weights(_tiny_train(tmp_path / "full", checkpoint_every_minutes=None))
    bare = _weights(_tiny_train(tmp_path / "bare", checkpoint_every_minutes=None, bare_nouns=1.0))
    assert json.loads((tmp_path / "bare" / "training_info.json").read_text())["bare_nouns"] == 1.0
    assert max((base[k].float() - bare[k].float()).abs().max().item() for k in base if k.startswith("unet.")) > 0
