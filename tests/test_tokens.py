import torch

from conftest import load_tokenizer_and_text_encoder

from scenetok.tokens import add_handles, token_positions, word_ids


def test_init_from_single_and_multi_piece_words(tiny_sd):
    tok, te = load_tokenizer_and_text_encoder(tiny_sd)
    base = te.get_input_embeddings().weight.detach().clone()
    cat_ids = word_ids(tok, "cat")
    multi = word_ids(tok, "zebra")  # not in the tiny vocabulary: several byte pieces
    assert len(cat_ids) == 1 and len(multi) > 1
    h = add_handles(tok, te, ["<asset0>", "<asset1>"], ["cat", "zebra"])
    vec = h.vectors(te).detach()
    assert torch.equal(vec[0], base[cat_ids[0]])
    assert torch.allclose(vec[1], base[multi].mean(0))
    assert tok.convert_tokens_to_ids("<asset1>") == h.ids[1]
    assert tok.tokenize("a <asset0> cat") == ["a</w>", "<asset0>", "cat</w>"]


def test_other_rows_bit_identical_after_training_steps(tiny_sd):
    tok, te = load_tokenizer_and_text_encoder(tiny_sd)
    before = te.get_input_embeddings().weight.detach().clone()
    h = add_handles(tok, te, ["<asset0>"], ["dog"])
    te.requires_grad_(False)
    vec = h.vectors(te)
    vec.requires_grad_(True)
    opt = torch.optim.AdamW([vec], lr=1e-1, weight_decay=1e-2)
    ids = tok(["a photo of <asset0>"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    start = vec.detach().clone()
    for _ in range(3):
        out = te(ids)[0]
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = h.module(te).base.weight.detach()
    n = before.shape[0]
    assert torch.equal(after[:n], before)  # every original row exactly unchanged
    assert not torch.equal(vec.detach(), start)  # the handle moved
    h.detach(te)
    assert torch.equal(te.get_input_embeddings().weight[h.ids[0]], vec.detach()[0])
    assert torch.equal(te.get_input_embeddings().weight[:n], before)


def test_handle_embedding_matches_plain_lookup(tiny_sd):
    tok, te = load_tokenizer_and_text_encoder(tiny_sd)
    h = add_handles(tok, te, ["<asset0>", "<asset1>"], ["red", "blue"])
    ids = tok(["a <asset1> and <asset0>"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        wrapped = te(ids)[0]
        h.detach(te)
        plain = te(ids)[0]
    assert torch.allclose(wrapped, plain)


def test_token_positions_found_by_tokenizing(tiny_sd):
    tok, te = load_tokenizer_and_text_encoder(tiny_sd)
    h = add_handles(tok, te, ["<asset0>", "<asset1>"], ["red", "blue"])
    pos = token_positions(tok, ["a photo of <asset1>", "zebra <asset0> and <asset1>"], h.ids)
    assert pos[0].tolist() == [-1, 4]
    n_zebra = len(word_ids(tok, "zebra"))
    assert pos[1].tolist() == [1 + n_zebra, 3 + n_zebra]


def test_word_positions_multi_piece_and_after():
    from transformers import CLIPTokenizer

    from scenetok.tokens import word_positions
    from scenetok.toyworld.model import toy_sd_path

    tok = CLIPTokenizer.from_pretrained(str(toy_sd_path()), subfolder="tokenizer")
    tok.add_tokens(["<asset0>", "<asset1>"])
    prompt = "a photo of a <asset0> circle and <asset1> hedgehog"
    ids = tok(prompt).input_ids
    pieces = tok("hedgehog", add_special_tokens=False).input_ids
    assert len(pieces) > 1  # not a toy-world word: byte-level pieces
    (pos,) = word_positions(tok, [prompt], "hedgehog")
    assert [ids[i] for i in pos] == pieces and pos[0] == ids.index(tok.convert_tokens_to_ids("<asset1>")) + 1
    two = "a photo of a <asset0> circle and <asset1> circle"
    h1 = tok(two).input_ids.index(tok.convert_tokens_to_ids("<asset1>"))
    assert word_positions(tok, [two], "circle") == [[6]]
    assert word_positions(tok, [two], "circle", after=[h1]) == [[h1 + 1]]
    assert word_positions(tok, ["a photo of a square"], "circle") == [[]]


def test_written_tokenizer_keeps_every_word_one_piece(tmp_path):
    """Words whose merge paths cross (an earlier word's merges fire first) still come out whole: with merges
    built from each word's characters alone, "triangle" after "and" was tri an g l e."""
    from transformers import CLIPTokenizer

    from scenetok.tokens import write_clip_tokenizer
    from scenetok.toyworld.model import toy_vocabulary

    words = toy_vocabulary()
    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path / "t", words)))
    assert {w: tok.tokenize(w) for w in words if len(tok.tokenize(w)) != 1} == {}
    assert len(tok.tokenize("and triangle maroon green")) == 4
    assert len(tok.tokenize("zebra")) > 1  # other text still falls back to pieces


def test_fit_handle_inits_makes_a_multi_piece_handle_read_as_its_word(tiny_sd):
    """A handle whose init word is several pieces ("zebra" in the tiny vocabulary) starts from the mean of the
    pieces, which the encoder does not read as the word; fitting it brings the encoder's outputs (from the word
    on, in every template) closer to the word's. One-piece words and token ids stay copied rows,
    and the text encoder itself is untouched."""
    from scenetok.tokens import fit_handle_inits

    tok, te = load_tokenizer_and_text_encoder(tiny_sd)
    te.train()
    weights = {k: v.detach().clone() for k, v in te.state_dict().items()}
    h = add_handles(tok, te, ["<asset0>", "<asset1>", "<asset2>"], ["cat", "zebra", 5])
    flags = [p.requires_grad for p in te.parameters()]
    start = h.vectors(te).detach().clone()
    templates = ("a photo of a {}", "a red {} and a cat", "a {}")
    assert fit_handle_inits(tok, te, h, ["cat", "zebra", 5], steps=0, templates=templates) == {}
    assert torch.equal(h.vectors(te).detach(), start)
    report = fit_handle_inits(tok, te, h, ["cat", "zebra", 5], steps=150, lr=1e-2, templates=templates)
    assert set(report) == {"<asset1>", "<asset1>:start"}  # only the multi-piece handle is fitted
    assert report["<asset1>"] < 0.75 * report["<asset1>:start"], report  # measured: 0.56×
    after = h.vectors(te).detach()
    assert torch.equal(after[0], start[0]) and torch.equal(after[2], start[2])
    assert not torch.equal(after[1], start[1])
    assert te.training and [p.requires_grad for p in te.parameters()] == flags
    state = te.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if "embedding" not in k)
    assert h.module(te).override is None

    # the fitted handle, read in a sentence it was not fitted in, is closer to the word than the mean start was
    def out(prompt):
        ids = tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids)[0][0]

    word, handle = out("a cat and a zebra"), out("a cat and a <asset1>")
    n_word = len(word_ids(tok, "zebra"))
    fitted_err = (handle[5:40] - word[5 + n_word - 1:40 + n_word - 1]).pow(2).mean()
    h.module(te).vectors.data[1] = start[1]
    mean_err = (out("a cat and a <asset1>")[5:40] - word[5 + n_word - 1:40 + n_word - 1]).pow(2).mean()
    assert fitted_err < 0.7 * mean_err, (fitted_err, mean_err)
