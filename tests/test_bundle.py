"""The bundle format: write/read round trip, textual-inversion forms, changed components, validation.

`tiny_sd` (conftest) is a tiny random SD folder: 32 px images, text width 32.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scenetok.bundle import (  # noqa: E402
    MANIFEST_VERSION,
    BundleContent,
    HandleInfo,
    check_output_dir,
    is_bundle,
    read_bundle,
    write_bundle,
)
from scenetok.errors import BundleError  # noqa: E402
from scenetok.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_text  # noqa: E402

HANDLES = [
    HandleInfo(token="<asset0>", name="creature", class_word="toy", init_word="bear"),
    HandleInfo(token="<asset1>", name="bowl", class_word="bowl", init_word="bowl"),
    HandleInfo(token="<asset2>", name="background", class_word="beach", init_word="beach", is_background=True),
]


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)


def _embeddings(dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {h.token: torch.randn(dim, generator=g) for h in HANDLES}


def _write(out, tiny_sd, **kw):
    args = dict(
        method="break-a-scene", base_model=str(tiny_sd), handles=HANDLES, embeddings=_embeddings(),
        config={"phase1": {"steps": 10, "lr": 5e-4}, "seed": 0}, resolution=32,
        input_hashes={"img.png": "0" * 64},
    )
    args.update(kw)
    overwrite = args.pop("overwrite", False)
    return write_bundle(out, BundleContent(**args), overwrite=overwrite)


def _norm(text_encoder):
    # transformers 5 flattened CLIPTextModel (no .text_model); 4.x has it
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm.weight


def _all_files(root):
    return [p for p in root.rglob("*")]


def test_round_trip(tmp_path, tiny_sd):
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    masks = np.zeros((3, 32, 32), dtype=bool)
    masks[0, :16] = True
    masks[1, 16:, :16] = True
    masks[2] = ~(masks[0] | masks[1])
    emb = _embeddings()
    written = _write(tmp_path / "b", tiny_sd, embeddings=emb, image=image, masks=masks,
                     mask_names=[h.name for h in HANDLES], extra={"note": "hi"})
    b = read_bundle(tmp_path / "b")
    assert b.handles == HANDLES == written.handles
    got = b.embeddings()
    assert list(got) == [h.token for h in HANDLES]
    for t in emb:
        assert got[t].shape == (32,)
        assert torch.equal(got[t], emb[t])
    assert b.method == "break-a-scene" and b.base_model == str(tiny_sd) and b.resolution == 32
    assert b.config == {"phase1": {"steps": 10, "lr": 5e-4}, "seed": 0}
    assert b.component_dirs() == {}
    man = b.manifest
    assert man["manifest_version"] == MANIFEST_VERSION
    assert man["input_hashes"] == {"img.png": "0" * 64}
    assert man["extra"] == {"note": "hi"}
    assert set(man["files"]) >= {"embeddings/asset0.safetensors", "embeddings/a1111/asset2.safetensors",
                                 "input.png", "masks/mask1.png", "README.md"}
    assert not (tmp_path / "b" / "weights").exists()  # nothing but embeddings changed: no weights at all
    np.testing.assert_array_equal(np.asarray(b.input_image()), image)
    m, names = b.masks()
    np.testing.assert_array_equal(m >= 0.5, masks)
    assert names == ["creature", "bowl", "background"]
    card = (tmp_path / "b" / "README.md").read_text()
    for h in HANDLES:
        assert h.token in card and h.name in card
    assert "load_textual_inversion" in card and "AUTOMATIC1111" in card and str(tiny_sd) in card
    assert is_bundle(tmp_path / "b") and not is_bundle(tmp_path)


def test_textual_inversion_forms_load_bit_identical(tmp_path, tiny_sd):
    from safetensors.torch import load_file

    emb = _embeddings(seed=3)
    b = _write(tmp_path / "b", tiny_sd, embeddings=emb)
    f = b.embedding_file("<asset0>")
    f_a1111 = b.embedding_file("<asset0>", form="a1111")
    assert list(load_file(str(f))) == ["<asset0>"]
    a1111 = load_file(str(f_a1111))
    assert list(a1111) == ["emb_params"] and a1111["emb_params"].shape == (1, 32)

    pipe = _pipe(tiny_sd)
    pipe.load_textual_inversion(str(f))  # token from the file's single key
    tid = pipe.tokenizer.convert_tokens_to_ids("<asset0>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid], emb["<asset0>"])

    pipe = _pipe(tiny_sd)
    pipe.load_textual_inversion(str(f_a1111), token="<asset0>")
    tid = pipe.tokenizer.convert_tokens_to_ids("<asset0>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid], emb["<asset0>"])


@pytest.mark.parametrize("detached", [False, True], ids=["handle-embedding", "plain-embedding"])
def test_changed_text_encoder_saved_without_handle_rows(tmp_path, tiny_sd, detached):
    from transformers import CLIPTextModel

    from scenetok.generation import load_pipeline
    from scenetok.tokens import add_handles

    pipe = _pipe(tiny_sd)
    base_vocab = len(pipe.tokenizer)
    base_rows = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    handles = add_handles(pipe.tokenizer, pipe.text_encoder, [h.token for h in HANDLES],
                          [h.init_word for h in HANDLES])
    with torch.no_grad():  # "training": move the handles and one text-encoder weight
        handles.vectors(pipe.text_encoder).add_(1.0)
        _norm(pipe.text_encoder).mul_(2.0)
    emb = handles.as_dict(pipe.text_encoder)
    if detached:  # what the trainer does before saving
        handles.detach(pipe.text_encoder)
    b = _write(tmp_path / "b", tiny_sd, embeddings=emb, components={"text_encoder": pipe.text_encoder},
               text_encoder_vocab_size=base_vocab)
    assert b.component_dirs() == {"text_encoder": tmp_path / "b" / "weights" / "text_encoder"}
    assert json.loads((tmp_path / "b" / "weights/text_encoder/config.json").read_text())["vocab_size"] == base_vocab
    te = CLIPTextModel.from_pretrained(str(tmp_path / "b" / "weights" / "text_encoder"))
    assert torch.equal(te.get_input_embeddings().weight, base_rows)  # the base rows, nothing else
    assert torch.equal(_norm(te), _norm(pipe.text_encoder))
    assert not list((tmp_path / "b" / "weights").glob("unet*")) and not (tmp_path / "b" / "weights" / "vae").exists()
    # the original module is untouched by saving
    assert pipe.text_encoder.config.vocab_size == base_vocab + len(HANDLES)

    loaded, _ = load_pipeline(b, device="cpu")
    w = loaded.text_encoder.get_input_embeddings().weight
    assert torch.equal(w[:base_vocab], base_rows)
    for t, v in emb.items():
        assert torch.equal(w[loaded.tokenizer.convert_tokens_to_ids(t)], v)
    assert torch.equal(_norm(loaded.text_encoder),
                       _norm(pipe.text_encoder))


def test_changed_unet_saved_and_overwrite_drops_stale_weights(tmp_path, tiny_sd):
    pipe = _pipe(tiny_sd)
    b = _write(tmp_path / "b", tiny_sd, components={"unet": pipe.unet})
    assert (tmp_path / "b" / "weights" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert b.manifest["components"] == ["unet"]
    (tmp_path / "b" / "previews").mkdir()
    (tmp_path / "b" / "previews" / "step_00000.png").write_bytes(b"png")  # a trainer file
    b2 = _write(tmp_path / "b", tiny_sd, overwrite=True)
    assert b2.manifest["components"] == [] and not (tmp_path / "b" / "weights").exists()
    assert (tmp_path / "b" / "previews" / "step_00000.png").read_bytes() == b"png"
    assert "previews/step_00000.png" in b2.manifest["files"]


def test_newer_manifest_version_is_refused(tmp_path, tiny_sd):
    _write(tmp_path / "b", tiny_sd)
    mfile = tmp_path / "b" / "manifest.json"
    man = json.loads(mfile.read_text())
    man["manifest_version"] = MANIFEST_VERSION + 1
    mfile.write_text(json.dumps(man))
    with pytest.raises(BundleError, match="newer scenetok") as e:
        read_bundle(tmp_path / "b")
    assert "upgrade" in e.value.hint


def test_missing_or_damaged_bundles(tmp_path, tiny_sd):
    with pytest.raises(BundleError, match="does not exist") as e:
        read_bundle(tmp_path / "nope")
    assert e.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json is missing") as e:
        read_bundle(tmp_path / "empty")
    assert "scenetok extract" in e.value.hint
    _write(tmp_path / "b", tiny_sd)
    (tmp_path / "b" / "embeddings" / "asset1.safetensors").unlink()
    with pytest.raises(BundleError, match="asset1.safetensors"):
        read_bundle(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(tmp_path / "b")


def test_output_dir_checks(tmp_path, tiny_sd):
    check_output_dir(tmp_path / "new", overwrite=False)  # missing: fine
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", overwrite=False)  # empty: fine
    other = tmp_path / "other"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(BundleError, match="not a scenetok bundle") as e:
        check_output_dir(other, overwrite=False)
    assert "--overwrite" not in e.value.hint  # a folder scenetok did not write is never replaced
    with pytest.raises(BundleError, match="not a scenetok bundle"):
        _write(other, tiny_sd)
    with pytest.raises(BundleError, match="not a scenetok bundle"):
        check_output_dir(other, overwrite=True)
    _write(tmp_path / "b", tiny_sd)
    with pytest.raises(BundleError, match="already holds a bundle") as e:
        check_output_dir(tmp_path / "b", overwrite=False)
    assert "--overwrite" in e.value.hint
    check_output_dir(tmp_path / "b", overwrite=True)
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="notes.txt"):
        check_output_dir(tmp_path / "b", overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BundleError, match="is a file"):
        check_output_dir(tmp_path / "afile", overwrite=True)


def test_atomic_writes_leave_no_temp_files(tmp_path, tiny_sd, monkeypatch):
    pipe = _pipe(tiny_sd)
    _write(tmp_path / "b", tiny_sd, components={"unet": pipe.unet},
           image=np.zeros((32, 32, 3), np.uint8), masks=np.ones((3, 32, 32), bool))
    leftovers = [p for p in _all_files(tmp_path / "b") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []

    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    atomic_save_safetensors({"x": torch.ones(2)}, tmp_path / "t.safetensors")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "f.txt", "t.safetensors"]


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """mkstemp creates 0600 files; what we write must get the mode the umask gives an ordinary file."""
    import os

    old = os.umask(0o022)
    try:
        p = atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert (p.stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        q = atomic_write_bytes(tmp_path / "b.bin", b"x")
        assert (q.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
