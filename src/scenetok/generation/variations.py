"""Image variations (Break-A-Scene §4.2, Fig. 10): new images of the learned scene from its handles alone.

The prompt is the one the bundle's method trained with, naming the chosen handles — "a photo of
<asset0> and <asset1>" for Break-A-Scene and the baselines, "photo of a <asset0> cat and <asset1> dog"
(handle + class word) for DisenDiff and Textual Localization — so the model redraws the objects in new
layouts and poses. Image ``i`` uses seed ``seed + i`` (the same seed gives the same image).
"""

from __future__ import annotations

from typing import Sequence

from scenetok.bundle import Bundle, read_bundle
from scenetok.errors import ConfigError, PromptError
from scenetok.methods import METHODS, get_method


def chosen_handles(bundle: Bundle, handles: Sequence[int | str] | str | None = None,
                   background: bool = False) -> list[int]:
    """Indices of the handles a variation names: ``handles`` (indices, tokens, or ``"0,2"``), default every
    object handle; the background handle only with ``background=True``."""
    tokens = bundle.tokens
    bg = [i for i, h in enumerate(bundle.handles) if h.is_background]
    if isinstance(handles, str):
        handles = [h.strip() for h in handles.split(",") if h.strip()]
    if handles is None or len(handles) == 0:
        chosen = [i for i in range(len(tokens)) if i not in bg]
    else:
        chosen = []
        for h in handles:
            if isinstance(h, str) and not h.lstrip("-").isdigit():
                if h not in tokens:
                    raise PromptError(f"bundle {bundle.path} has no handle {h}",
                                      hint="its handles: " + ", ".join(f"{i}={t}" for i, t in enumerate(tokens)))
                i = tokens.index(h)
            else:
                i = int(h)
                if not 0 <= i < len(tokens):
                    raise PromptError(f"bundle {bundle.path} has no handle number {i} (it has {len(tokens)})",
                                      hint="its handles: " + ", ".join(f"{k}={t}" for k, t in enumerate(tokens)))
            if i not in chosen:
                chosen.append(i)
    if background:
        if not bg:
            raise ConfigError(f"bundle {bundle.path} has no background handle",
                              hint="leave out --background, or extract the scene with --background")
        chosen += [i for i in bg if i not in chosen]
    if not chosen:
        raise ConfigError("no handle chosen for the variations", hint="e.g. --handles 0,1")
    return chosen


def variation_prompt(bundle, handles: Sequence[int | str] | str | None = None, background: bool = False,
                     suffix: str = "") -> str:
    """The prompt of :func:`variations`, in the form the bundle's method trained with."""
    bundle = read_bundle(bundle)
    chosen = chosen_handles(bundle, handles, background)
    method = get_method(bundle.method) if bundle.method in METHODS else None
    class_words = [h.class_word for h in bundle.handles]
    cfg = dict(bundle.config or {})
    if method is None:
        prompt = "a photo of " + " and ".join(bundle.tokens[i] for i in chosen)
    else:
        prompt = method.prompt(bundle.tokens, chosen, cfg, class_words)
    return f"{prompt} {suffix.strip()}".strip() if suffix else prompt


def contact_sheet(results, title_of=lambda r: f"seed {r.seed}"):
    """One image of every result, labelled."""
    from scenetok import viz

    return viz.grid([r.image for r in results], labels=[title_of(r) for r in results])
