"""Multi-vector handles (``num_vectors`` > 1): tokenizer entries, prompt expansion, attention maps over the
handle's vectors, training, the bundle files and generation from them.

`tiny_sd` (conftest) is a tiny random SD folder: 32 px images, text width 32.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scenetok.attention import AttentionStore  # noqa: E402
from scenetok.errors import ConfigError  # noqa: E402
from scenetok.model import token_ids  # noqa: E402
from scenetok.tokens import (  # noqa: E402
    add_handles,
    expand_handles,
    multi_vector_handles,
    token_positions,
    vector_tokens,
)
from conftest import load_tokenizer_and_text_encoder  # noqa: E402


def test_vector_tokens_follow_the_diffusers_naming():
    assert vector_tokens("<asset0>", 1) == ["<asset0>"]
    assert vector_tokens("<asset0>", 3) == ["<asset0>", "<asset0>_1", "<asset0>_2"]


def test_add_handles_with_three_vectors(tiny_sd):
    tok, te = load_tokenizer_and_text_encoder(tiny_sd)
    base = te.get_input_embeddings().weight.detach().clone()
    h = add_handles(tok, te, ["<asset0>", "<asset1>"], ["cat", "dog"], num_vectors=3)
    assert h.num_vectors == 3
    entries = ["<asset0>", "<asset0>_1", "<asset0>_2", "<asset1>", "<asset1>_1", "<asset1>_2"]
    ids = tok.convert_tokens_to_ids(entries)
    assert ids == list(range(ids[0], ids[0] + 6))
    assert h.ids == [ids[0], ids[3]]  # each handle's own id is its first vector's
    vec = h.vectors(te).detach()
    assert vec.shape == (6, base.shape[1])
    cat = tok("cat", add_special_tokens=False).input_ids[0]
    assert all(torch.equal(vec[j], base[cat]) for j in range(3))  # every vector starts from the init word
    d = h.as_dict(te)
    assert d["<asset1>"].shape == (3, base.shape[1])
    assert multi_vector_handles(tok) == {"<asset0>": "<asset0> <asset0>_1 <asset0>_2",
                                         "<asset1>": "<asset1> <asset1>_1 <asset1>_2"}


def test_prompt_expansion_is_idempotent_and_leaves_other_text(tiny_sd):
    tok, te = load_tokenizer_and_text_encoder(tiny_sd)
    assert expand_handles(tok, "a photo of <asset0>") == "a photo of <asset0>"  # no handles: unchanged
    add_handles(tok, te, ["<asset0>", "<asset1>"], ["cat", "dog"], num_vectors=2)
    once = expand_handles(tok, "<asset1> beside <asset0>, and <asset0>.")
    assert once == "<asset1> <asset1>_1 beside <asset0> <asset0>_1, and <asset0> <asset0>_1."
    assert expand_handles(tok, once) == once
    ids = token_ids(tok, ["a <asset0> and a <asset1>"], tensors=False)[0]
    a0, a01, a1, a11 = tok.convert_tokens_to_ids(["<asset0>", "<asset0>_1", "<asset1>", "<asset1>_1"])
    assert ids[ids.index(a0) + 1] == a01 and ids[ids.index(a1) + 1] == a11
    pos = token_positions(tok, ["a <asset0> and a <asset1>"], [a0, a1])[0]
    assert int(pos[1]) - int(pos[0]) == 4  # <asset0> <asset0>_1 and a <asset1>


def test_num_vectors_is_checked(tiny_sd):
    tok, te = load_tokenizer_and_text_encoder(tiny_sd)
    for bad in (0, 17, 2.5, True):
        with pytest.raises(ConfigError, match="num_vectors"):
            add_handles(tok, te, ["<asset0>"], ["cat"], num_vectors=bad)
    from scenetok.api import run_settings

    with pytest.raises(ConfigError, match="num_vectors"):
        run_settings("break-a-scene", overrides=["num_vectors=0"])


def test_token_maps_sum_over_the_span():
    store = AttentionStore()
    grid = torch.rand(2, 6, 4, 4)  # (B, tokens, 4, 4): what maps() returns for one 4x4 layer
    store.maps = lambda size, native=None: grid  # type: ignore[method-assign]
    pos = torch.tensor([[1, 4], [2, -1]])
    one = store.token_maps(pos, 4)
    two = store.token_maps(pos, 4, span=2)
    assert torch.equal(one[0, 0], grid[0, 1])
    assert torch.allclose(two[0, 0], grid[0, 1] + grid[0, 2])
    assert torch.allclose(two[1, 0], grid[1, 2] + grid[1, 3])
    assert torch.equal(two[1, 1], torch.zeros(4, 4))  # absent handle: zero map


def test_training_a_multi_vector_handle_round_trips_through_the_bundle(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from conftest import two_squares
    from scenetok.generation import generate, handle_positions, load_pipeline
    from scenetok.scene import Scene
    from scenetok.training import train

    img, masks = two_squares()
    scene = Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "square"])
    b = train(scene, tmp_path / "b", model=str(tiny_sd), progress=False,
              overrides=["phase1.steps=3", "phase1.lr=1e-1", "phase2.steps=0", "num_vectors=2", "preview_every=2",
                         "checkpoint_every=0"])
    emb = b.embeddings()
    assert emb["<asset0>"].shape == (2, 32) and emb["<asset1>"].shape == (2, 32)
    assert not torch.allclose(emb["<asset0>"][0], emb["<asset0>"][1])  # the two vectors learnt apart
    entry = next(e for e in b.manifest["handles"] if e["token"] == "<asset0>")
    assert entry["vectors"] == 2 and entry["dim"] == 32
    a1111 = load_file(str(b.embedding_file("<asset0>", "a1111")))
    assert a1111["emb_params"].shape == (2, 32)

    # plain diffusers reads the file as <asset0>, <asset0>_1 and expands the handle in a prompt itself
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(b.embedding_file("<asset0>")))
    w = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(["<asset0>", "<asset0>_1"])
    assert torch.equal(w[ids[0]], emb["<asset0>"][0]) and torch.equal(w[ids[1]], emb["<asset0>"][1])
    assert pipe.maybe_convert_prompt("a <asset0>", pipe.tokenizer) == "a <asset0> <asset0>_1"

    # scenetok's own generation: diffusers' prompt encoding (its own expansion) = scenetok's token_ids expansion
    pipe2, bundle = load_pipeline(b, device="cpu")
    pos = handle_positions(pipe2.tokenizer, "a photo of <asset0>", ["<asset0>"])
    assert len(pos["<asset0>"]) == 2 and pos["<asset0>"][1] == pos["<asset0>"][0] + 1
    with torch.no_grad():
        theirs = pipe2.encode_prompt("a photo of <asset0>", "cpu", 1, False)[0]
        ours = pipe2.text_encoder(token_ids(pipe2.tokenizer, "a photo of <asset0>"))[0]
        one = pipe2.text_encoder(pipe2.tokenizer("a photo of <asset0>", padding="max_length", max_length=77,
                                                 return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(theirs, ours)
    assert (theirs - one).abs().max() > 1e-3  # without the second vector the encoding differs
    out = generate((pipe2, bundle), "a photo of <asset0>", n=1, steps=2, seed=0, progress=False, attention=True)
    assert out[0].attention["<asset0>"].shape[0] > 0


def test_prompt_check_names_a_handle_whose_later_vectors_are_cut(tiny_sd):
    from scenetok.errors import PromptError
    from scenetok.generation import check_prompt_tokens

    tok, te = load_tokenizer_and_text_encoder(tiny_sd)
    add_handles(tok, te, ["<asset0>", "<asset1>"], ["cat", "dog"], num_vectors=3)
    limit = tok.model_max_length
    one = len(tok("a", add_special_tokens=False).input_ids)
    assert one == 1
    # the first vector of <asset1> is the last token the encoder reads (before the end token); its other
    # two vectors fall past the limit
    filler = " ".join(["a"] * (limit - 2 - 3 - 1))
    prompt = f"<asset0> {filler} <asset1>"
    ids = token_ids(tok, [prompt], tensors=False)[0]
    assert ids.index(tok.convert_tokens_to_ids("<asset1>")) == limit - 2
    with pytest.raises(PromptError) as err:
        check_prompt_tokens(tok, prompt, ["<asset0>", "<asset1>"])
    assert "<asset1> would be cut off" in str(err.value) and "<asset0>" not in str(err.value).split(";")[1]
    # two words shorter, every vector fits: no error
    check_prompt_tokens(tok, f"<asset0> {' '.join(['a'] * (limit - 2 - 3 - 3))} <asset1>", ["<asset0>", "<asset1>"])
