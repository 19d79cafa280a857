"""How multi-vector handles are written in text: the tokenizer entries of a handle of N vectors and the prompt
with each such handle written out (no dependency on the rest of scenetok, so both :mod:`scenetok.model` and
:mod:`scenetok.tokens` use it)."""

from __future__ import annotations

import re

__all__ = ["MAX_VECTORS", "expand_handles", "multi_vector_handles", "vector_tokens"]

#: Most vectors one handle may have (textual inversion's multi-vector tokens).
MAX_VECTORS = 16


def vector_tokens(token: str, n: int) -> list[str]:
    """The tokenizer entries of a handle of ``n`` vectors: the handle itself, then ``<token>_1`` …
    ``<token>_{n-1}``, diffusers' naming for a multi-vector textual inversion (its ``load_textual_inversion``
    makes the same entries from an ``(n, D)`` tensor, and its pipelines expand the handle in a prompt)."""
    return [token] + [f"{token}_{j}" for j in range(1, n)]


def multi_vector_handles(tokenizer) -> dict[str, str]:
    """``{handle: "handle handle_1 … handle_{n-1}"}`` for every added token of ``tokenizer`` that has
    ``_1`` siblings (a multi-vector handle); empty when there is none."""
    added = getattr(tokenizer, "get_added_vocab", None)
    vocab = added() if added is not None else {}
    out = {}
    for tok in vocab:
        if f"{tok}_1" in vocab and not re.search(r"_\d+$", tok):
            n = 1
            while f"{tok}_{n}" in vocab:
                n += 1
            out[tok] = " ".join(vector_tokens(tok, n))
    return out


def expand_handles(tokenizer, prompt: str) -> str:
    """``prompt`` with each multi-vector handle written out as its vectors' tokens (``<asset0>`` → ``<asset0>
    <asset0>_1 <asset0>_2``), as the text encoder must read it; a prompt already written out is unchanged, and
    so is every prompt of a tokenizer without multi-vector handles."""
    spans = multi_vector_handles(tokenizer)
    for tok, phrase in spans.items():
        # the handle not already followed by its own second vector, and not part of a longer name
        prompt = re.sub(re.escape(tok) + r"(?!_\d)(?!\s*" + re.escape(f"{tok}_1") + r")", phrase, prompt)
    return prompt
