"""Prompt sets for evaluation, and the prompt variants the metrics read.

A *prompt set* is a list of :class:`EvalPrompt`: the prompt with handles (what is generated), the
handles it asks for, where it came from (a template, a file line), and its seeds. Two sources:

* **templates** — Break-A-Scene's 10 templates (:data:`BAS_TEMPLATES`) × every non-empty subset of the
  bundle's handles (subsets by size, then in bundle order; within a subset the handles keep bundle order,
  joined by " and ", as in training prompts): ``10 × (2**K - 1)`` prompts for ``K`` handles.
* **a paper's protocol** (:data:`PROTOCOLS`, ``scenetok eval --protocol``) — Break-A-Scene's (the
  templates above), DisenDiff's (10 prompts naming all concepts + 10 per concept, 16 samples, DDIM 50,
  guidance 6) or Textual Localization's (10 prompts per concept and 10 for the group, 50 samples).
* **a prompt file** — one prompt per line (blank lines and lines starting with ``#`` are skipped). A line
  with the placeholder ``{tokens}`` is a template (expanded over every subset like the built-in ones);
  any other line is used as it is and asks for the handles it names.

``{tokens}`` is filled the way the bundle's method trained (``join``): bare handles joined by " and "
for the handle-only methods, "<asset0> cat and <asset1> dog" for DisenDiff, "a <asset0> bucket and a
<asset1> doll" for Textual Localization (:meth:`scenetok.methods.Method.token_phrase`).

Each prompt gets ``n`` samples; sample ``i`` of prompt ``k`` has the seed ``seed + k * n + i`` (the seed
:func:`scenetok.generation.generate` gives it), so every image of a set has its own recorded seed and can
be regenerated alone.

Prompt variants for scoring text alignment (the learned handles mean nothing to the CLIP text encoder):

* :func:`class_word_prompt` — each handle replaced by its class word with an indefinite article
  ("a photo of <asset0> at the beach" → "a photo of a cat at the beach"). Break-A-Scene's *prompt
  similarity*; DisenDiff's *text alignment* uses the same kind of prompt. In the modifier + class style
  ("a <asset0> cat") the handle is dropped instead ("a cat").
* :func:`identifier_removed_prompt` — the handles deleted ("a photo of <asset0> at the beach" → "a photo
  of at the beach"; "photo of a <v1> bucket" → "photo of a bucket"). Textual Localization's *CLIP-T*.

This module needs only the standard library.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from scenetok.errors import ConfigError, PromptError

HANDLE_RE = re.compile(r"<[^<>\s|][^<>\s]*>")
PLACEHOLDER = "{tokens}"

#: Break-A-Scene's evaluation templates (paper, Sec. 4 / supplementary).
BAS_TEMPLATES: tuple[str, ...] = (
    "a photo of {tokens} at the beach",
    "a photo of {tokens} in the jungle",
    "a photo of {tokens} in the snow",
    "a photo of {tokens} in the street",
    "a photo of {tokens} on top of a pink fabric",
    "a photo of {tokens} on top of a wooden floor",
    "a photo of {tokens} with a city in the background",
    "a photo of {tokens} with a mountain in the background",
    "a photo of {tokens} with the Eiffel tower in the background",
    "a photo of {tokens} floating on top of water",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"bas": BAS_TEMPLATES}

#: DisenDiff's protocol (paper Sec. 4.1): per image 10 prompts naming both concepts and 10 per concept. The
#: paper prints only examples ("V1 cat and V2 dog in a garden", "V1 cat wearing a hat", "A pink V2 dog") and
#: names the kinds of edit (scene change, object addition, style, property change, accessory, interaction);
#: these sets are written here in that style around its examples.
DISENDIFF_COMBINED: tuple[str, ...] = (
    "{tokens} in a garden",
    "{tokens} on the beach",
    "{tokens} in the snow",
    "{tokens} in a living room",
    "{tokens} with a city in the background",
    "{tokens} next to a red ball",
    "{tokens} playing together on the grass",
    "a watercolor painting of {tokens}",
    "a pencil sketch of {tokens}",
    "{tokens} wearing hats",
)
DISENDIFF_SINGLE: tuple[str, ...] = (
    "{tokens} wearing a hat",
    "a pink {tokens}",
    "{tokens} in a garden",
    "{tokens} on the beach",
    "{tokens} in the snow",
    "{tokens} with a city in the background",
    "{tokens} next to a cup of coffee",
    "a watercolor painting of {tokens}",
    "{tokens} in the style of Van Gogh",
    "{tokens} wearing sunglasses",
)
#: Textual Localization's protocol (paper Sec. 4.2–4.3): per target concept 10 prompts, and per
#: multi-concept group 10 prompts, 50 samples each. The paper shows only examples ("V1 helmet and V2
#: headphone at a beach with a view of the seashore", "A watercolor painting of V1 pot and V2 penbag",
#: "V1 cat figurine in woods with falling leaves in the background", "V doll under water"); these sets are
#: written around them.
TL_PROMPTS: tuple[str, ...] = (
    "{tokens} at a beach with a view of the seashore",
    "a watercolor painting of {tokens}",
    "{tokens} in woods with falling leaves in the background",
    "{tokens} under water",
    "{tokens} on a wooden table",
    "{tokens} in the snow",
    "{tokens} on top of a mountain",
    "{tokens} in a city street at night",
    "an oil painting of {tokens}",
    "{tokens} on a purple rug in a forest",
)


@dataclass(frozen=True)
class Protocol:
    """A paper's evaluation protocol: which handle subsets get which templates, and how images are sampled.

    ``subsets``: templates for every non-empty subset of the handles (Break-A-Scene), or None. ``combined``
    / ``single``: templates for the set of all handles, and for each handle alone (DisenDiff, Textual
    Localization). ``n``, ``steps``, ``guidance``: samples per prompt, DDIM steps, guidance scale (None: the
    paper does not say; ``scenetok eval``'s defaults apply)."""

    name: str
    paper: str
    subsets: tuple[str, ...] | None = None
    combined: tuple[str, ...] | None = None
    single: tuple[str, ...] | None = None
    n: int | None = None
    steps: int | None = None
    guidance: float | None = None

    def groups(self, tokens: Sequence[str]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """``(handles, templates)`` in prompt order: the subsets (by size), or the combined set then each
        handle alone (a one-handle bundle gets only the single-concept prompts)."""
        tokens = tuple(tokens)
        if self.subsets is not None:
            return [(s, self.subsets) for s in handle_subsets(tokens)]
        out = []
        if self.combined and len(tokens) > 1:
            out.append((tokens, self.combined))
        if self.single:
            out += [((t,), self.single) for t in tokens]
        return out


#: ``scenetok eval --protocol NAME``
PROTOCOLS: dict[str, Protocol] = {
    "bas": Protocol("bas", "Break-A-Scene: 10 templates x every non-empty handle subset", subsets=BAS_TEMPLATES),
    "disendiff": Protocol("disendiff", "DisenDiff: 10 combined + 10 per concept, 16 samples, DDIM 50, guidance 6",
                          combined=DISENDIFF_COMBINED, single=DISENDIFF_SINGLE, n=16, steps=50, guidance=6.0),
    "tl": Protocol("tl", "Textual Localization: 10 per concept + 10 for the group, 50 samples each",
                   combined=TL_PROMPTS, single=TL_PROMPTS, n=50),
}

# words that already stand before a noun: no article is added after them
_DETERMINERS = {"a", "an", "the", "my", "your", "his", "her", "its", "our", "their", "this", "that", "these",
                "those", "some", "one", "two", "three", "every", "each", "another"}


@dataclass
class EvalPrompt:
    """One prompt of a prompt set.

    ``index``: position in the set. ``prompt``: the text generated from (with handles). ``handles``: the
    handles it asks for, in bundle order. ``template``: the template it came from (None for a literal
    line). ``source``: ``"template"`` or ``"file:LINE"``. ``seeds``: one per sample.
    ``class_prompt`` / ``removed_prompt``: the scoring variants (see the module docstring).
    """

    index: int
    prompt: str
    handles: tuple[str, ...]
    template: str | None
    source: str
    seeds: list[int] = field(default_factory=list)
    class_prompt: str = ""
    removed_prompt: str = ""

    @property
    def subset(self) -> str:
        """The handle subset as one key, e.g. ``"<asset0>+<asset1>"`` (``"-"`` for none)."""
        return subset_key(self.handles)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["handles"] = list(self.handles)
        d["subset"] = self.subset
        return d


def subset_key(handles: Sequence[str]) -> str:
    return "+".join(handles) if handles else "-"


def handle_subsets(tokens: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``tokens``: by size, then in the order of ``tokens`` (``2**K - 1`` of them)."""
    tokens = list(tokens)
    return [c for k in range(1, len(tokens) + 1) for c in itertools.combinations(tokens, k)]


def join_handles(handles: Sequence[str]) -> str:
    """``("<asset0>", "<asset1>")`` → ``"<asset0> and <asset1>"`` (the training prompts' form of
    handle-only methods)."""
    return " and ".join(handles)


#: how ``{tokens}`` is filled for a handle subset: bare handles, or a method's own form
#: (``"<asset0> cat and <asset1> dog"``; see :meth:`scenetok.methods.Method.token_phrase`)
Joiner = Callable[[Sequence[str]], str]


def fill_template(template: str, handles: Sequence[str], join: Joiner | None = None) -> str:
    if PLACEHOLDER not in template:
        raise ConfigError(f"template {template!r} has no {PLACEHOLDER} placeholder",
                          hint=f"write e.g. \"a photo of {PLACEHOLDER} in the snow\"")
    text = (join or join_handles)(handles)
    return " ".join(template.replace(PLACEHOLDER, text).split())


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def class_word_prompt(prompt: str, class_words: dict[str, str], article: bool = True) -> str:
    """``prompt`` with each handle replaced by its class word (Break-A-Scene's prompt-similarity text).

    An indefinite article is put before the class word unless the word before the handle is already a
    determiner ("a", "the", "my" …). A handle directly followed by its own class word (modifier + class
    style, "a <asset0> cat") is removed instead of replaced. Handles missing from ``class_words`` are
    removed.
    """
    words = prompt.split()
    out: list[str] = []
    for i, w in enumerate(words):
        core, tail = _strip_punct(w)
        if not HANDLE_RE.fullmatch(core):
            out.append(w)
            continue
        cw = class_words.get(core)
        followed_by_class = cw is not None and not tail and _same_words(words[i + 1 : i + 1 + len(cw.split())], cw)
        if cw is None or followed_by_class:  # drop the handle (keep any punctuation it carried)
            if tail and out:
                out[-1] += tail
            elif followed_by_class and article and (out[-1].lower() if out else "") not in _DETERMINERS:
                out.append(_article(cw))  # "a photo of <asset0> cat" -> "a photo of a cat"
            continue
        prev = out[-1].lower() if out else ""
        phrase = cw if (not article or prev in _DETERMINERS) else f"{_article(cw)} {cw}"
        out.append(phrase + tail)
    return " ".join(out)


def identifier_removed_prompt(prompt: str, handles: Iterable[str] | None = None) -> str:
    """``prompt`` with the handles deleted (Textual Localization's CLIP-T text). ``handles``: which
    tokens count as handles (default: anything shaped like ``<name>``)."""
    wanted = set(handles) if handles is not None else None

    def drop(m: re.Match) -> str:
        return "" if wanted is None or m.group(0) in wanted else m.group(0)

    text = HANDLE_RE.sub(drop, prompt)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    return " ".join(text.split())


def _strip_punct(word: str) -> tuple[str, str]:
    m = re.match(r"^(.*?)([,.;:!?]*)$", word)
    return m.group(1), m.group(2)


def _same_words(words: Sequence[str], phrase: str) -> bool:
    target = phrase.lower().split()
    got = [_strip_punct(w)[0].lower() for w in words]
    return got == target


# ----------------------------------------------------------------------------------------------------
# prompt sets


def template_prompts(tokens: Sequence[str], templates: Sequence[str] = BAS_TEMPLATES,
                     join: Joiner | None = None) -> list[tuple[str, tuple, str]]:
    """``(prompt, handles, template)`` for every non-empty subset of ``tokens`` × every template
    (subset-major: all templates of the first subset, then the next subset). ``join`` fills ``{tokens}``
    (default: bare handles joined by " and ")."""
    return [(fill_template(t, s, join), s, t) for s in handle_subsets(tokens) for t in templates]


def protocol_prompts(tokens: Sequence[str], protocol: str | Protocol, join: Joiner | None = None
                     ) -> list[tuple[str, tuple, str]]:
    """``(prompt, handles, template)`` of a paper's protocol (:data:`PROTOCOLS`)."""
    proto = get_protocol(protocol) if isinstance(protocol, str) else protocol
    return [(fill_template(t, s, join), s, t) for s, templates in proto.groups(tokens) for t in templates]


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {name!r}", hint=f"choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def read_prompt_file(path: str | Path, tokens: Sequence[str],
                     join: Joiner | None = None) -> list[tuple[str, tuple, str | None, str]]:
    """Parse a prompt file: ``(prompt, handles, template_or_None, source)`` per prompt.

    A line holding ``{tokens}`` is expanded over every subset of ``tokens``; any other line is used as
    written and must name only handles in ``tokens``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"prompt file {p} does not exist", hint="give a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the prompt file {p}: {e}", hint="save it as UTF-8 text") from None
    known = set(tokens)
    out = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = " ".join(raw.split())
        if not line or line.startswith("#"):
            continue
        if PLACEHOLDER in line:
            for s in handle_subsets(tokens):
                out.append((fill_template(line, s, join), s, line, f"file:{lineno}"))
            continue
        found = list(dict.fromkeys(HANDLE_RE.findall(line)))
        unknown = [t for t in found if t not in known]
        if unknown:
            raise PromptError(f"{p}, line {lineno}: {', '.join(unknown)} is not a handle of this bundle",
                              hint=f"known handles: {', '.join(tokens)}; or write {PLACEHOLDER} for every subset")
        ordered = tuple(t for t in tokens if t in found)
        out.append((line, ordered, None, f"file:{lineno}"))
    if not out:
        raise ConfigError(f"prompt file {p} holds no prompt",
                          hint=f"write one prompt per line, e.g. \"a photo of {PLACEHOLDER} in the snow\"")
    return out


def build_prompt_set(tokens: Sequence[str], class_words: dict[str, str], *, templates: str | Sequence[str] | None = "bas",
                     prompts_file: str | Path | None = None, n: int = 4, seed: int = 0,
                     protocol: str | None = None, join: Joiner | None = None) -> list[EvalPrompt]:
    """The prompt set of one bundle: from ``prompts_file`` when given, else from ``protocol`` (a name in
    :data:`PROTOCOLS`) when given, else from ``templates`` (a name in :data:`TEMPLATE_SETS` or a list of
    template strings), each with ``n`` recorded seeds. ``join`` fills ``{tokens}`` the way the bundle's
    method trained (``"<asset0> cat and <asset1> dog"`` for DisenDiff); default: bare handles."""
    if n < 1:
        raise ConfigError(f"-n must be at least 1 (got {n})")
    if prompts_file is not None:
        raw = read_prompt_file(prompts_file, tokens, join)
    elif protocol is not None:
        raw = [(p, s, t, "template") for p, s, t in protocol_prompts(tokens, protocol, join)]
    else:
        if templates is None:
            templates = "bas"
        if isinstance(templates, str):
            if templates not in TEMPLATE_SETS:
                raise ConfigError(f"unknown template set {templates!r}",
                                  hint=f"choose one of {', '.join(TEMPLATE_SETS)}, or give --prompts FILE")
            templates = TEMPLATE_SETS[templates]
        raw = [(p, s, t, "template") for p, s, t in template_prompts(tokens, templates, join)]
    out = []
    for k, (prompt, handles, template, source) in enumerate(raw):
        out.append(EvalPrompt(
            index=k, prompt=prompt, handles=tuple(handles), template=template, source=source,
            seeds=[seed + k * n + i for i in range(n)],
            class_prompt=class_word_prompt(prompt, class_words),
            removed_prompt=identifier_removed_prompt(prompt, tokens),
        ))
    return out
