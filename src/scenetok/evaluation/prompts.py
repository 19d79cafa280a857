"""Prompt sets for evaluation, and the prompt variants the metrics read.

A *prompt set* is a list of :class:`EvalPrompt`: the prompt with handles (what is generated), the
handles it asks for, where it came from (a template, a file line), and its seeds. Two sources:

* **templates** — Break-A-Scene's 10 templates (:data:`BAS_TEMPLATES`) × every non-empty subset of the
  bundle's handles (subsets by size, then in bundle order; within a subset the handles keep bundle order,
  joined by " and ", as in training prompts): ``10 × (2**K - 1)`` prompts for ``K`` handles.
* **a prompt file** — one prompt per line (blank lines and lines starting with ``#`` are skipped). A line
  with the placeholder ``{tokens}`` is a template (expanded over every subset like the built-in ones);
  any other line is used as it is and asks for the handles it names.

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
from typing import Iterable, Sequence

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
    """``("<asset0>", "<asset1>")`` → ``"<asset0> and <asset1>"`` (the training prompts' form)."""
    return " and ".join(handles)


def fill_template(template: str, handles: Sequence[str]) -> str:
    if PLACEHOLDER not in template:
        raise ConfigError(f"template {template!r} has no {PLACEHOLDER} placeholder",
                          hint=f"write e.g. \"a photo of {PLACEHOLDER} in the snow\"")
    return " ".join(template.replace(PLACEHOLDER, join_handles(handles)).split())


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


def template_prompts(tokens: Sequence[str], templates: Sequence[str] = BAS_TEMPLATES) -> list[tuple[str, tuple, str]]:
    """``(prompt, handles, template)`` for every non-empty subset of ``tokens`` × every template
    (subset-major: all templates of the first subset, then the next subset)."""
    return [(fill_template(t, s), s, t) for s in handle_subsets(tokens) for t in templates]


def read_prompt_file(path: str | Path, tokens: Sequence[str]) -> list[tuple[str, tuple, str | None, str]]:
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
                out.append((fill_template(line, s), s, line, f"file:{lineno}"))
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
                     prompts_file: str | Path | None = None, n: int = 4, seed: int = 0) -> list[EvalPrompt]:
    """The prompt set of one bundle: from ``prompts_file`` when given, else from ``templates`` (a name in
    :data:`TEMPLATE_SETS` or a list of template strings), each with ``n`` recorded seeds."""
    if n < 1:
        raise ConfigError(f"-n must be at least 1 (got {n})")
    if prompts_file is not None:
        raw = read_prompt_file(prompts_file, tokens)
    else:
        if templates is None:
            templates = "bas"
        if isinstance(templates, str):
            if templates not in TEMPLATE_SETS:
                raise ConfigError(f"unknown template set {templates!r}",
                                  hint=f"choose one of {', '.join(TEMPLATE_SETS)}, or give --prompts FILE")
            templates = TEMPLATE_SETS[templates]
        raw = [(p, s, t, "template") for p, s, t in template_prompts(tokens, templates)]
    out = []
    for k, (prompt, handles, template, source) in enumerate(raw):
        out.append(EvalPrompt(
            index=k, prompt=prompt, handles=tuple(handles), template=template, source=source,
            seeds=[seed + k * n + i for i in range(n)],
            class_prompt=class_word_prompt(prompt, class_words),
            removed_prompt=identifier_removed_prompt(prompt, tokens),
        ))
    return out
