"""Handles: the new tokens (``<asset0>``, ``<asset1>`` …) that stand for the concepts of a scene.

The handles are added to the tokenizer and the text encoder's vocabulary. While training, the token
embedding matrix stays frozen and the handle rows live in a small separate parameter
(:class:`HandleEmbedding`): every other vocabulary row is bit-for-bit unchanged by construction (no
restore-after-step dance, no weight-decay drift), and the optimizer only holds ``K × D`` numbers instead
of the whole vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scenetok.errors import ConfigError
from scenetok.handle_text import MAX_VECTORS, expand_handles, multi_vector_handles, vector_tokens  # noqa: F401
from scenetok import model as modellib


def handle_token(i: int) -> str:
    return f"<asset{i}>"


def word_ids(tokenizer, word: str) -> list[int]:
    """Token ids of ``word`` without special tokens (several for a multi-piece word)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(f"init word {word!r} tokenizes to nothing", hint="pick a plain word such as 'object'")
    return list(ids)


class HandleEmbedding(nn.Module):
    """Token embedding whose handle rows come from a trainable ``(K, D)`` parameter.

    ``base`` is the (frozen) resized vocabulary embedding; ids ``first_id .. first_id + K - 1`` are the
    handles' vectors (``K`` = handles × vectors per handle) and read from :attr:`vectors` instead of ``base``.
    """

    def __init__(self, base: nn.Embedding, first_id: int, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_id = int(first_id)
        self.vectors = nn.Parameter(vectors.detach().clone())
        self._mean_norm: float | None = None  # the vocabulary's mean norm, for cap_norms (computed once)
        self.override: torch.Tensor | None = None  # read instead of ``vectors`` while set (fit_handle_inits)

    @property
    def weight(self) -> torch.Tensor:  # code that reads get_input_embeddings().weight sees the base rows
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def cap_norms(self, factor: float) -> None:
        """Scale every handle vector whose norm exceeds ``factor`` × the vocabulary's mean embedding norm down
        to that norm (in place, no gradient); ``factor`` <= 0 does nothing."""
        if factor <= 0:
            return
        if self._mean_norm is None:
            self._mean_norm = float(torch.linalg.vector_norm(self.base.weight.detach().float(), dim=-1).mean())
        with torch.no_grad():
            norms = torch.linalg.vector_norm(self.vectors.float(), dim=-1, keepdim=True)
            scale = (factor * self._mean_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
            self.vectors.mul_(scale.to(self.vectors.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        k = self.vectors.shape[0]
        rel = input_ids - self.first_id
        is_handle = (rel >= 0) & (rel < k)
        if not bool(is_handle.any()):
            return out
        vectors = self.vectors if self.override is None else self.override
        picked = vectors.to(out.dtype)[rel.clamp(0, k - 1)]
        return torch.where(is_handle.unsqueeze(-1), picked, out)


@dataclass
class Handles:
    """The handles of one training run: tokens, their ids, and how they were initialised.

    ``ids`` holds each handle's own id (its first vector); a handle of ``num_vectors`` > 1 also owns the
    next ``num_vectors - 1`` ids (``<asset0>_1`` …), which a prompt gets right after the handle
    (:func:`expand_handles`)."""

    tokens: list[str]
    ids: list[int]
    init_words: list[str]
    num_vectors: int = 1

    def module(self, text_encoder) -> HandleEmbedding:
        emb = text_encoder.get_input_embeddings()
        if not isinstance(emb, HandleEmbedding):
            raise RuntimeError("the text encoder's handles are not attached")
        return emb

    def vectors(self, text_encoder) -> torch.Tensor:
        """The current handle embeddings, ``(K × num_vectors, D)`` (handle k's rows are ``k·n … k·n + n - 1``)."""
        return self.module(text_encoder).vectors

    def as_dict(self, text_encoder) -> dict[str, torch.Tensor]:
        """token → its ``(D,)`` vector, or ``(num_vectors, D)`` rows for a multi-vector handle."""
        vecs = self.vectors(text_encoder).detach().float().cpu()
        n = self.num_vectors
        if n == 1:
            return {t: vecs[i].clone() for i, t in enumerate(self.tokens)}
        return {t: vecs[i * n:(i + 1) * n].clone() for i, t in enumerate(self.tokens)}

    def detach(self, text_encoder) -> None:
        """Write the learned rows into a plain ``nn.Embedding`` again (for saving/inference)."""
        mod = self.module(text_encoder)
        base = mod.base
        with torch.no_grad():
            base.weight[mod.first_id : mod.first_id + mod.vectors.shape[0]] = mod.vectors.to(base.weight.dtype)
        text_encoder.set_input_embeddings(base)


def add_handles(tokenizer, text_encoder, tokens: list[str], init_words: list[str | int],
                num_vectors: int = 1) -> Handles:
    """Add ``tokens`` to the tokenizer and text encoder; initialise each from its init word.

    A word of several BPE pieces is initialised with the mean of its pieces; an int is a token id whose
    row is copied (e.g. a rare vocabulary token). ``Handles.init_words`` records each as text. The embedding matrix is
    frozen afterwards and the handle rows become the trainable :class:`HandleEmbedding` parameter.
    ``num_vectors`` > 1 gives each handle that many vectors (:func:`vector_tokens`), all starting from its
    init word; prompts tokenized with :func:`scenetok.model.token_ids` get them written out.
    """
    if len(tokens) != len(init_words):
        raise ValueError("one init word per handle is needed")
    if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or not 1 <= num_vectors <= MAX_VECTORS:
        raise ConfigError(f"num_vectors must be a whole number from 1 to {MAX_VECTORS}, got {num_vectors!r}")
    entries = [v for tok in tokens for v in vector_tokens(tok, num_vectors)]
    for tok in entries:
        if tok in tokenizer.get_vocab():
            raise ConfigError(
                f"the handle {tok!r} already exists in the tokenizer",
                hint="this base model already knows it; pick another handle prefix",
            )
    init_vectors = []
    base_emb = text_encoder.get_input_embeddings()
    if isinstance(base_emb, HandleEmbedding):
        raise RuntimeError("handles are already attached to this text encoder")
    names = []
    with torch.no_grad():
        for word in init_words:
            if isinstance(word, int) and not isinstance(word, bool):  # a token id (e.g. a rare token)
                if not 0 <= word < base_emb.weight.shape[0]:
                    raise ConfigError(f"init token id {word} is outside the vocabulary (0..{base_emb.weight.shape[0] - 1})")
                init_vectors.append(base_emb.weight[word].float())
                names.append(str(tokenizer.convert_ids_to_tokens(word)))
                continue
            ids = word_ids(tokenizer, word)
            init_vectors.append(base_emb.weight[ids].float().mean(0))
            names.append(str(word))
    added = tokenizer.add_tokens(entries)
    if added != len(entries):
        raise RuntimeError(f"tokenizer added {added} of {len(entries)} handle entries")
    ids = tokenizer.convert_tokens_to_ids(entries)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise RuntimeError(f"handle ids are not contiguous: {ids}")
    text_encoder.resize_token_embeddings(len(tokenizer))
    base = text_encoder.get_input_embeddings()
    vecs = torch.stack(init_vectors).repeat_interleave(num_vectors, dim=0).to(base.weight.dtype)
    with torch.no_grad():
        base.weight[ids[0] : ids[0] + len(ids)] = vecs
    base.weight.requires_grad_(False)
    text_encoder.set_input_embeddings(HandleEmbedding(base, ids[0], vecs.float()))
    return Handles(tokens=list(tokens), ids=list(ids[::num_vectors]), init_words=names, num_vectors=num_vectors)


# The sentences a fitted handle must read like its word in (the training setting init_fit_templates): the word
# alone, after an adjective, and followed by more text (the encoder's later positions, which the UNet's
# cross-attention also reads, depend on the word). They must be in the base model's caption language.
FIT_TEMPLATES = ("a photo of a {}", "a red {}", "a photo of a small blue {} on a white background",
                 "a close-up photo of the {} in a room", "a {} and a dog")


def fit_handle_inits(tokenizer, text_encoder, handles: "Handles", init_words: list[str | int], steps: int,
                     lr: float = 3e-3, templates: tuple[str, ...] = FIT_TEMPLATES) -> dict[str, float]:
    """Re-start every handle whose init word is several BPE pieces from a vector fitted to read as that word.

    The mean of a multi-piece word's piece embeddings ("triangle" → five pieces on toy-sd) is a point the text
    encoder never saw as that word (on toy-sd it draws squares and crosses where the word draws triangles).
    Here each such handle's vector (all its vectors, for a multi-vector handle) is optimized for ``steps``
    Adam steps so that the encoder's output for each of ``templates`` with the handle — at the handle's
    position and at every position after it (the rest of the sentence, end-of-text and padding, which the
    UNet's cross-attention reads as well) — matches its output for the same sentence with the word (from the
    word's last piece on). Single-piece words and token ids keep their copied row. The text encoder's weights
    are not changed (only the handle rows receive gradients). ``init_words``: what :func:`add_handles` was
    given (words or token ids). Returns ``{token: final mean squared error}`` of the fitted handles, and their
    error at the start as ``{token + ':start': …}``."""
    if steps <= 0:
        return {}
    mod = handles.module(text_encoder)
    n = handles.num_vectors
    report: dict[str, float] = {}
    dev = mod.vectors.device
    was_training = text_encoder.training
    text_encoder.eval()
    frozen = [(p, p.requires_grad) for p in text_encoder.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        for k, (tok, word) in enumerate(zip(handles.tokens, init_words)):
            if not isinstance(word, str) or len(word_ids(tokenizer, word)) < 2:
                continue  # a token id or a one-piece word: its row is the word's own
            w_prompts = [t.format(word) for t in templates]
            w_ids = modellib.token_ids(tokenizer, w_prompts).to(dev)
            h_ids = modellib.token_ids(tokenizer, [t.format(tok) for t in templates]).to(dev)
            length = w_ids.shape[1]
            rows_w, rows_h = [], []  # (sentence, position) pairs compared: word's last piece on ↔ handle's last vector on
            for b, pieces in enumerate(word_positions(tokenizer, w_prompts, word)):
                h_at = (h_ids[b] == handles.ids[k]).nonzero()
                if not pieces or not len(h_at):
                    continue
                w_from, h_from = pieces[-1], int(h_at[0]) + n - 1
                span = min(length - w_from, length - h_from)
                rows_w += [(b, w_from + j) for j in range(span)]
                rows_h += [(b, h_from + j) for j in range(span)]
            if not rows_w:
                continue
            wb, wp = (torch.tensor(x, device=dev) for x in zip(*rows_w))
            hb, hp = (torch.tensor(x, device=dev) for x in zip(*rows_h))
            with torch.no_grad():
                target = text_encoder(w_ids)[0][wb, wp].float()
            rows = slice(k * n, (k + 1) * n)
            others = mod.vectors.detach().float()
            vec = nn.Parameter(others[rows].clone())
            opt = torch.optim.Adam([vec], lr=lr)
            first = last = None
            for _ in range(int(steps)):
                # the handle rows as a differentiable function of vec, swapped in for this forward only
                mod.override = torch.cat([others[:rows.start], vec, others[rows.stop:]]).to(mod.vectors.dtype)
                try:
                    out = text_encoder(h_ids)[0][hb, hp].float()
                finally:
                    mod.override = None
                loss = torch.nn.functional.mse_loss(out, target)
                first = float(loss.detach()) if first is None else first
                last = float(loss.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                mod.vectors[rows] = vec.detach().to(mod.vectors.dtype)
            report[tok] = last
            report[tok + ":start"] = first
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        text_encoder.train(was_training)
    return report


def token_positions(tokenizer, prompts: list[str], token_ids: list[int]) -> torch.Tensor:
    """Position of each token id in each tokenized prompt (padding as the text encoder sees it).

    Returns ``(B, K)`` long; -1 where the token is absent. Positions are found by tokenizing, never
    assumed.
    """
    enc = modellib.token_ids(tokenizer, prompts, tensors=False)
    out = torch.full((len(prompts), len(token_ids)), -1, dtype=torch.long)
    for b, row in enumerate(enc):
        for k, tid in enumerate(token_ids):
            if tid in row:
                out[b, k] = row.index(tid)
    return out


def word_positions(tokenizer, prompts: list[str], word: str, after: list[int] | None = None) -> list[list[int]]:
    """Positions of every BPE piece of ``word`` in each tokenized prompt (padding as the text encoder sees it).

    ``word`` is tokenized in context (with a leading space, as it appears inside a prompt) and its
    pieces are searched as a contiguous run; ``after`` (one position per prompt, or -1) restricts the
    search to the first occurrence after that position (e.g. the class noun after a modifier handle).
    Returns one list per prompt: the piece positions, empty when the word is absent. A class noun of
    several pieces ("hedgehog" → "hedge", "hog") thus yields several positions; never a fixed index.
    """
    pieces = tokenizer(word.strip(), add_special_tokens=False).input_ids
    if not pieces:
        raise ConfigError(f"the word {word!r} tokenizes to nothing", hint="use a plain word")
    enc = modellib.token_ids(tokenizer, prompts, tensors=False)
    out = []
    n = len(pieces)
    for b, row in enumerate(enc):
        start = 0 if after is None or after[b] is None or after[b] < 0 else int(after[b]) + 1
        found: list[int] = []
        for i in range(start, len(row) - n + 1):
            if row[i:i + n] == pieces:
                found = list(range(i, i + n))
                break
        out.append(found)
    return out


# ----------------------------------------------------------------------------------------------------
# a word-level CLIP tokenizer written from local files (the toy model's and the test models' tokenizer)

SPECIAL_BOS = "<|startoftext|>"
SPECIAL_EOS = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word with the merges ``ranks``: always merge the lowest-ranked adjacent pair (every
    occurrence of it), until no ranked pair is left."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks[p], p) for p in zip(pieces, pieces[1:]) if p in ranks]
        if not pairs:
            break
        a, b = min(pairs)[1]
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and pieces[i] == a and pieces[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def _merge_path(pieces: list[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that join ``pieces`` into one."""
    merges = []
    while len(pieces) > 1:
        a, b = pieces[0], pieces[1]
        merges.append((a, b))
        pieces = [a + b] + pieces[2:]
    return merges


def write_clip_tokenizer(path: str | Path, words: list[str] | tuple[str, ...] = (), model_max_length: int = 77) -> Path:
    """Write a CLIP BPE tokenizer folder that covers every byte (no input becomes UNK).

    ``words`` become single tokens (so "cat" is one piece, like in the real CLIP vocabulary); any other
    text falls back to byte-level pieces.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        word = word.lower()
        if len(word) < 2:
            continue
        # what the merges so far make of this word, then joined left to right by new, later-ranked merges: the
        # earlier words keep their single pieces (a later merge never wins over an earlier one), and this word
        # becomes one piece too (merging each word from its characters instead let one word's merges break
        # another's path: "triangle" came out as tri an g l e)
        for a, b in _merge_path(_bpe(word, ranks)):
            if (a, b) in ranks:
                continue
            ranks[(a, b)] = len(merges)
            merges.append((a, b))
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
    vocab[SPECIAL_BOS] = len(vocab)
    vocab[SPECIAL_EOS] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer.from_pretrained(str(path), model_max_length=model_max_length)
    tok.save_pretrained(str(path))
    return path
