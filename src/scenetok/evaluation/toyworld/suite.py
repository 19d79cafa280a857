"""The toy-world benchmark suite: held-out scenes, prompt sets, method variants and the toy training settings.

Everything here is fixed data or a pure function of it, so a suite is the same on every machine:

* :data:`SCENES` — eight hand-placed toy scenes (2–4 concepts; touching / overlapping objects; a
  background concept; (colour, shape, texture) combinations from :data:`world.HELD_OUT`, which toy-sd
  never saw). :data:`QUICK_SCENES` names the ``--quick`` subset.
* :func:`scene_prompts` — per scene: each concept alone on two new backgrounds, every pair, and all
  concepts together on one new background (seeded choice of backgrounds; never the scene's own);
  ``seeds`` images per prompt, with seeds shared by every method so comparisons are paired.
* :func:`expand_variants` — method variants: each method's paper recipe plus one variant per ablation
  switch (``--no-attn-loss`` …) and per non-default value of a valued option (``--guidance soft``).
* :data:`TOY_SETTINGS` — per-method training settings on toy-sd (one table, documented in
  ``docs/benchmarks.md``), :func:`toy_overrides` for any method (an automatic rule for methods without an
  entry).
* :func:`prompt_text` — a method's generation prompt: exactly its training prompt
  (:meth:`Method.prompt`, so handle-only and modifier + class methods each get their own form) followed
  by "on a <colour> background" when a background is requested.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from scenetok import config as cfglib
from scenetok.errors import ConfigError
from scenetok.methods import available_methods, get_method
from scenetok.scene import Scene
from scenetok.toyworld import world
from scenetok.toyworld.settings import (  # noqa: F401  (re-exported; they live beside the toy world for the demo)
    TOY_BATCH,
    TOY_COMMON,
    TOY_LR_FACTOR,
    TOY_SETTINGS,
    TOY_STEPS,
)
from scenetok.toyworld.world import ObjectSpec, SceneSpec
from scenetok.training import method_config

SUITE_VERSION = 1
SIZE = 64  # toy-sd's resolution; scenes render at it

# ----------------------------------------------------------------------------------------------------
# scenes


@dataclass(frozen=True)
class SuiteScene:
    """One benchmark scene: a toy-world spec, optionally with the background as one more concept."""

    name: str
    spec: SceneSpec
    background_concept: bool = False
    note: str = ""

    @property
    def n_concepts(self) -> int:
        return len(self.spec.objects) + int(self.background_concept)

    def concepts(self) -> list[dict]:
        """What each handle should show, in handle order: ``{"kind": "object", "name", "class_word",
        "color", "shape", "texture", "held_out"}`` per object, then ``{"kind": "background", "name":
        "background", "class_word": "background", "background": <colour>}`` if the background is a concept."""
        out = []
        for o in self.spec.objects:
            out.append({"kind": "object", "name": world.object_phrase(o).replace(" ", "-"), "class_word": o.shape,
                        "color": o.color, "shape": o.shape, "texture": o.texture,
                        "held_out": (o.color, o.shape, o.texture) in world.HELD_OUT})
        if self.background_concept:
            out.append({"kind": "background", "name": "background", "class_word": "background",
                        "background": self.spec.background})
        return out

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        """The image and the true masks of every concept (the background concept's mask is every pixel no
        object covers)."""
        image, masks = world.render(self.spec, size=SIZE)
        if self.background_concept:
            masks = np.concatenate([masks, ~masks.any(axis=0, keepdims=True)])
        return image, masks

    def training_scene(self, masks: bool = True, background: bool | None = None):
        """The :class:`~scenetok.scene.Scene` a method trains on. ``masks=False``: concepts named by words
        only (mask-free methods never see the true masks). ``background=False`` leaves the background
        concept out (methods that cannot learn one). Handles start from the class word (the shape, or
        "background") unless the method chooses its own init words."""

        use_bg = self.background_concept if background is None else (background and self.background_concept)
        image, obj_masks = world.render(self.spec, size=SIZE)
        concepts = self.concepts()[: len(self.spec.objects) + int(use_bg)]
        names = [c["name"] for c in concepts]
        words = [c["class_word"] for c in concepts]
        if masks:
            objs = concepts[: len(self.spec.objects)]
            return Scene.from_arrays(image, list(obj_masks), names=[c["name"] for c in objs],
                                     class_words=[c["class_word"] for c in objs],
                                     init_words=[c["class_word"] for c in objs], background=use_bg)
        plain = Scene.from_arrays(image, [])
        return plain.with_named_concepts(names, class_words=words, init_words=words)


def _scene(name, objects, background, pattern="flat", background_concept=False, note=""):
    spec = SceneSpec(tuple(ObjectSpec(*o) for o in objects), background, pattern)
    return SuiteScene(name, spec, background_concept, note)


# (shape, colour, texture, cx, cy, size): every scene has distinct shapes (class words) and colours
SCENES: tuple[SuiteScene, ...] = (
    _scene("pair-apart", [("star", "red", "striped", 0.30, 0.33, 0.38), ("square", "blue", "plain", 0.70, 0.68, 0.32)],
           "gray", note="2 objects apart; red striped star held out"),
    _scene("pair-touching", [("circle", "blue", "dotted", 0.38, 0.50, 0.40),
                             ("triangle", "yellow", "plain", 0.63, 0.54, 0.36)],
           "beige", note="2 objects, the triangle overlaps the circle; blue dotted circle held out"),
    _scene("trio-apart", [("triangle", "green", "plain", 0.25, 0.28, 0.32), ("circle", "purple", "striped", 0.73, 0.30, 0.32),
                          ("square", "orange", "dotted", 0.50, 0.74, 0.30)],
           "white", note="3 objects apart; green plain triangle held out"),
    _scene("trio-overlap", [("circle", "pink", "striped", 0.36, 0.40, 0.38), ("cross", "cyan", "plain", 0.62, 0.50, 0.34),
                            ("ring", "yellow", "dotted", 0.34, 0.76, 0.30)],
           "olive", "gradient", note="3 objects, the cross overlaps the circle; pink striped circle held out; gradient"),
    _scene("pair-bg", [("cross", "orange", "plain", 0.30, 0.35, 0.34), ("square", "green", "striped", 0.68, 0.64, 0.32)],
           "teal", background_concept=True, note="2 objects + the teal background as a concept; orange plain cross held out"),
    _scene("single-bg", [("ring", "purple", "dotted", 0.50, 0.50, 0.44)],
           "maroon", background_concept=True, note="1 object + the maroon background as a concept; purple dotted ring held out"),
    _scene("quad-apart", [("star", "cyan", "dotted", 0.26, 0.26, 0.34), ("circle", "red", "plain", 0.74, 0.26, 0.28),
                          ("triangle", "yellow", "striped", 0.26, 0.74, 0.30), ("cross", "blue", "plain", 0.74, 0.74, 0.28)],
           "black", note="4 objects apart; cyan dotted star held out"),
    _scene("quad-overlap", [("square", "purple", "plain", 0.32, 0.34, 0.32), ("star", "orange", "striped", 0.55, 0.42, 0.34),
                            ("circle", "green", "dotted", 0.70, 0.70, 0.30), ("ring", "pink", "plain", 0.30, 0.70, 0.30)],
           "navy", "gradient", note="4 objects, the star overlaps the square; gradient"),
)

QUICK_SCENES: tuple[str, ...] = ("trio-overlap", "pair-bg")

# Scenes for tuning the toy settings (steps, learning rates), never for reporting: no scene, object or
# placement of :data:`SCENES` repeats here, so settings chosen on these are not fitted to the suite. Like
# the suite they mix apart / touching objects, 2–4 concepts, a background concept and one held-out
# combination (the yellow striped square, the one held-out combination the suite does not use).
TUNING_SCENES: tuple[SuiteScene, ...] = (
    _scene("tune-pair", [("square", "yellow", "striped", 0.32, 0.62, 0.36), ("ring", "red", "plain", 0.68, 0.36, 0.34)],
           "navy", note="2 objects apart; yellow striped square held out"),
    _scene("tune-trio", [("cross", "purple", "dotted", 0.28, 0.30, 0.34), ("star", "green", "plain", 0.70, 0.34, 0.36),
                         ("circle", "orange", "striped", 0.48, 0.72, 0.32)],
           "gray", note="3 objects apart"),
    _scene("tune-touching-bg", [("triangle", "cyan", "striped", 0.40, 0.46, 0.38), ("circle", "pink", "plain", 0.64, 0.58, 0.34)],
           "beige", background_concept=True, note="2 objects touching + the beige background as a concept"),
    _scene("tune-quad", [("ring", "blue", "striped", 0.26, 0.28, 0.30), ("square", "red", "dotted", 0.72, 0.28, 0.28),
                         ("star", "yellow", "plain", 0.28, 0.72, 0.32), ("triangle", "purple", "striped", 0.72, 0.72, 0.30)],
           "teal", note="4 objects apart"),
)
# A second opinion for choosing between settings or models (2026-12-04): four more tuning scenes, so that one
# fragile handle is not a quarter of a decision. New objects (none of the suite's or the first tuning set's
# (colour, shape, texture) triples, none held out), the same mix of layouts.
TUNING_B_SCENES: tuple[SuiteScene, ...] = (
    _scene("tuneb-pair-overlap", [("cross", "green", "dotted", 0.40, 0.44, 0.36), ("square", "pink", "striped", 0.63, 0.60, 0.34)],
           "white", note="2 objects, the square overlaps the cross"),
    _scene("tuneb-trio", [("triangle", "blue", "dotted", 0.27, 0.30, 0.34), ("circle", "yellow", "striped", 0.72, 0.32, 0.32),
                          ("cross", "red", "plain", 0.50, 0.73, 0.32)],
           "black", note="3 objects apart"),
    _scene("tuneb-single-bg", [("ring", "cyan", "plain", 0.50, 0.50, 0.44)],
           "olive", background_concept=True, note="1 object + the olive background as a concept"),
    _scene("tuneb-quad", [("star", "orange", "dotted", 0.27, 0.27, 0.34), ("circle", "purple", "plain", 0.73, 0.27, 0.28),
                          ("triangle", "pink", "plain", 0.27, 0.73, 0.32), ("ring", "green", "striped", 0.73, 0.73, 0.32)],
           "white", "gradient", note="4 objects apart; gradient"),
)
SCENE_SETS: dict[str, tuple[SuiteScene, ...]] = {"suite": SCENES, "tuning": TUNING_SCENES, "tuning-b": TUNING_B_SCENES,
                                                 "tuning-all": TUNING_SCENES + TUNING_B_SCENES}


def scene_names(scene_set: str = "suite") -> list[str]:
    return [s.name for s in _scene_set(scene_set)]


def _scene_set(name: str) -> tuple[SuiteScene, ...]:
    if name not in SCENE_SETS:
        raise ConfigError(f"unknown scene set {name!r}", hint=f"choose one of: {', '.join(SCENE_SETS)}")
    return SCENE_SETS[name]


def find_scene(name: str) -> SuiteScene:
    """A scene of any set by its name (names are unique across sets)."""
    for pool in SCENE_SETS.values():
        for sc in pool:
            if sc.name == name:
                return sc
    raise ConfigError(f"unknown benchmark scene {name!r}", hint=f"suite scenes: {', '.join(scene_names())}")


def get_scenes(names=None, quick: bool = False, scene_set: str = "suite") -> list[SuiteScene]:
    """The scenes of a set (``suite``: the benchmark's; ``tuning``: the scenes toy settings are tuned on;
    ``quick``: the suite's quick subset), or the ones named, in set order."""
    pool = _scene_set(scene_set)
    by_name = {s.name: s for s in pool}
    if names:
        names = [n.strip() for n in names if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"unknown benchmark scene(s): {', '.join(unknown)}",
                              hint=f"suite scenes: {', '.join(by_name)}")
        return [s for s in pool if s.name in names]
    if quick and scene_set == "suite":
        return [by_name[n] for n in QUICK_SCENES]
    return list(pool)


# ----------------------------------------------------------------------------------------------------
# prompts


@dataclass(frozen=True)
class BenchPrompt:
    """One prompt of a scene: the concepts it asks for (handle indices), the background it asks for
    (None when the background handle is asked for instead), its kind and the seeds of its images."""

    index: int
    handles: tuple[int, ...]
    background: str | None
    kind: str  # single | pair | all
    seeds: tuple[int, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return {"index": self.index, "handles": list(self.handles), "background": self.background,
                "kind": self.kind, "seeds": list(self.seeds)}


SINGLE_BACKGROUNDS = 2  # new backgrounds per single-concept prompt


def scene_prompts(scene: SuiteScene, seeds: int = 2) -> list[BenchPrompt]:
    """Each concept alone on :data:`SINGLE_BACKGROUNDS` new backgrounds, every pair, and (3+ concepts)
    all together on one new background. A prompt that asks for the background concept asks for no
    background colour. New backgrounds are drawn (seeded by the scene's name) from the palette minus the
    scene's own. Image ``i`` of prompt ``k`` has seed ``1000 * k + i``."""
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    concepts = scene.concepts()
    n = len(concepts)
    bg_index = n - 1 if scene.background_concept else None
    rng = np.random.default_rng([SUITE_VERSION, zlib.crc32(scene.name.encode())])
    palette = [b for b in world.BACKGROUNDS if b != scene.spec.background]
    groups: list[tuple[tuple[int, ...], str]] = []
    for i in range(n):
        if i == bg_index:
            groups.append(((i,), "single"))
            continue
        for b in rng.choice(palette, size=SINGLE_BACKGROUNDS, replace=False):
            groups.append(((i,), "single:" + str(b)))
    for pair in itertools.combinations(range(n), 2):
        groups.append((pair, "pair"))
    if n > 2:
        groups.append((tuple(range(n)), "all"))
    out = []
    for k, (handles, kind) in enumerate(groups):
        if bg_index is not None and bg_index in handles:
            background = None
        elif kind.startswith("single:"):
            background = kind.split(":", 1)[1]
        else:
            background = str(rng.choice(palette))
        out.append(BenchPrompt(index=k, handles=handles, background=background, kind=kind.split(":")[0],
                               seeds=tuple(1000 * k + i for i in range(seeds))))
    return out


def prompt_text(method, cfg: dict, tokens: list[str], class_words: list[str], handles, background: str | None) -> str:
    """The generation prompt of ``method``: its own training prompt for these handles
    (:meth:`Method.prompt` with the run's config), then "on a <colour> background" if one is asked for."""
    text = method.prompt(list(tokens), [int(h) for h in handles], cfg, list(class_words))
    if background:
        text = f"{text} on {world.with_article(background)} background"
    return text


# ----------------------------------------------------------------------------------------------------
# method variants


@dataclass(frozen=True)
class Variant:
    """A method with at most one ablation: ``flag`` is a switch name (``no-attn-loss``), a valued option
    (``guidance=soft``), ``adapter=lora``, or a ``--set`` assignment (``attn.weight=0.02``)."""

    method: str
    flag: str | None = None
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if not self.flag:
            return self.method
        if " " in self.flag:  # several --set assignments
            return f"{self.method} " + " ".join(f"--set {a}" for a in self.flag.split())
        key, eq, value = self.flag.partition("=")
        if not eq:
            return f"{self.method} --{key}"
        if "." in key:
            return f"{self.method} --set {self.flag}"
        return f"{self.method} --{key} {value}"

    @property
    def slug(self) -> str:
        """A folder name: ``break-a-scene``, ``break-a-scene__no-attn-loss``, ``textual-localization__guidance-soft``."""
        if not self.flag:
            return self.method
        safe = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in self.flag)
        return f"{self.method}__{safe}"

    @property
    def is_ablation(self) -> bool:
        return bool(self.flag)


def _option_default(method, key: str):
    node = method_config(method)
    for part in key.split("."):
        node = node[part]
    return node


def method_variants(name: str, ablations: bool = True) -> list[Variant]:
    """The paper recipe of ``name`` and (``ablations``) one variant per switch and per non-default
    value of each valued option."""

    m = get_method(name)
    out = [Variant(name)]
    if not ablations:
        return out
    for flag, (_, overrides) in m.switches.items():
        out.append(Variant(name, flag, tuple(overrides)))
    for flag, (_, key, choices) in m.options.items():
        default = _option_default(m, key)
        for value in choices:
            if value != default:
                out.append(Variant(name, f"{flag}={value}", (f"{key}={value}",)))
    return out


def parse_variant(text: str) -> list[Variant]:
    """``method`` (recipe + every ablation), ``method:base`` (recipe only), ``method:no-attn-loss``,
    ``method:guidance=soft``, ``method:adapter=lora``, ``method:some.key=value``, or several settings at once
    separated by spaces (``"method:timestep_min=0.2 timestep_max=0.8"``). Settings are checked here, so a
    wrong value fails before any run starts."""

    name, _, flag = text.strip().partition(":")
    name, flag = name.strip(), flag.strip()
    m = get_method(name)  # unknown names raise with the list of methods
    if not flag:
        return method_variants(name)
    if flag == "base":
        return [Variant(name)]
    if len(flag.split()) > 1:
        parts = tuple(flag.split())
        for part in parts:
            if not _is_setting(m, part):
                raise ConfigError(f"variant {text!r}: {part!r} is not a KEY=VALUE setting of {name}",
                                  hint="several settings in one variant: METHOD:KEY=VALUE KEY2=VALUE2 (quoted)")
        _check_settings(m, text, parts)
        return [Variant(name, " ".join(parts), parts)]
    key, eq, value = flag.partition("=")
    if not eq:
        if key not in m.switches:
            raise ConfigError(f"{name} has no ablation switch {key!r}",
                              hint=f"its switches: {', '.join(m.switches) or 'none'} (methods: {', '.join(available_methods())})")
        return [Variant(name, key, tuple(m.switches[key][1]))]
    if key in m.options:
        _, cfg_key, choices = m.options[key]
        if value not in choices:
            raise ConfigError(f"--{key} of {name} must be one of {', '.join(choices)}, got {value!r}")
        return [Variant(name, flag, (f"{cfg_key}={value}",))]
    if key == "adapter":
        return [Variant(name, flag, (f"adapter.type={value}",))]
    if _is_setting(m, flag):
        _check_settings(m, text, (flag,))
        return [Variant(name, flag, (flag,))]
    raise ConfigError(f"unknown variant {text!r}",
                      hint=f"write METHOD, METHOD:base, METHOD:SWITCH ({', '.join(m.switches) or 'none'}), "
                           f"METHOD:OPTION=VALUE ({', '.join(m.options) or 'none'}), METHOD:adapter=lora or METHOD:KEY=VALUE")


def _is_setting(method, part: str) -> bool:
    """Whether ``part`` is a ``KEY=VALUE`` assignment of one of ``method``'s settings (a dotted key or a top-level one)."""
    key, eq, _ = part.partition("=")
    return bool(eq) and ("." in key or key in _top_level_keys(method))


def _check_settings(method, text: str, overrides) -> None:
    try:
        method_config(method, None, list(overrides))
    except ConfigError as e:
        raise ConfigError(f"variant {text!r}: {e.message}", hint=e.hint) from e


def _top_level_keys(method) -> set[str]:
    return set(method_config(method))


def expand_variants(methods=None, ablations: bool = True) -> list[Variant]:
    """Variants of the named methods / variant specs (default: every registered method), without
    duplicates, in the order given."""

    specs = [m for m in (methods or available_methods()) if str(m).strip()]
    out: list[Variant] = []
    for spec in specs:
        vs = parse_variant(spec) if ":" in spec else method_variants(spec.strip(), ablations)
        for v in vs:
            if v not in out:
                out.append(v)
    return out


# ----------------------------------------------------------------------------------------------------
# toy training settings



def auto_toy_overrides(method) -> tuple[str, ...]:
    """For a method without a :data:`TOY_SETTINGS` entry: scale its phases' steps to :data:`TOY_STEPS`
    in all (keeping their ratio), multiply their learning rates by :data:`TOY_LR_FACTOR` (the batch is
    :data:`TOY_COMMON`'s)."""

    cfg = method_config(method)
    flat = cfglib.flatten(cfg)
    steps = {k: v for k, v in flat.items() if k.endswith(".steps") and not k.startswith("prior.")
             and isinstance(v, int) and v > 0}
    total = sum(steps.values())
    out = []
    for k, v in steps.items():
        out.append(f"{k}={max(1, round(TOY_STEPS * v / total))}")
        lr_key = k[: -len("steps")] + "lr"
        if isinstance(flat.get(lr_key), float):
            out.append(f"{lr_key}={flat[lr_key] * TOY_LR_FACTOR:g}")
    return tuple(out)  # batch and accumulation: TOY_COMMON's


def scaled_steps(method, overrides, total: int) -> tuple[str, ...]:
    """Overrides that rescale the phase steps of ``method`` (after ``overrides``) to exactly ``total`` in all,
    keeping their ratio (largest remainders; each phase that has steps keeps at least 1)."""

    if total < 1:
        raise ConfigError(f"train steps must be at least 1, got {total}")
    flat = cfglib.flatten(method_config(method, None, list(overrides)))
    steps = {k: v for k, v in flat.items() if k.endswith(".steps") and not k.startswith("prior.")
             and isinstance(v, int) and v > 0}
    have = sum(steps.values())
    if not have:
        return ()
    raw = {k: total * v / have for k, v in steps.items()}
    alloc = {k: max(1, int(r)) for k, r in raw.items()}
    # largest remainders up to the total; with more phases than steps each phase still keeps 1
    while sum(alloc.values()) < total:
        k = max(raw, key=lambda q: raw[q] - alloc[q])
        alloc[k] += 1
    while sum(alloc.values()) > total and any(a > 1 for a in alloc.values()):
        k = min((q for q in alloc if alloc[q] > 1), key=lambda q: raw[q] - alloc[q])
        alloc[k] -= 1
    return tuple(f"{k}={alloc[k]}" for k in steps)


def _for_method(extra, method: str) -> list[str]:
    """The ``--set`` items that apply to ``method``: plain ``key=value`` ones and ``method:key=value``."""
    out = []
    for item in extra:
        prefix, sep, rest = str(item).partition(":")
        if sep and "=" not in prefix:
            if prefix.strip() == method:
                out.append(rest.strip())
        else:
            out.append(str(item))
    return out


def toy_overrides(variant: Variant, extra=(), train_steps: int | None = None) -> list[str]:
    """Every ``--set`` override of ``variant`` on toy-sd: shared, per-method (or automatic), the steps
    rescaled to ``train_steps`` in all (when given), the variant's ablation, then the items of ``extra``
    that apply to this method (``key=value`` for all, ``method:key=value`` for one)."""

    method = get_method(variant.method)
    per_method = TOY_SETTINGS.get(variant.method)
    if per_method is None:
        per_method = auto_toy_overrides(method)
    base = [*TOY_COMMON, *per_method]
    if train_steps is not None:
        base += list(scaled_steps(method, base, int(train_steps)))
    return [*base, *variant.overrides, *_for_method(extra, variant.method)]


def suite_description(scenes: list[SuiteScene], seeds: int) -> dict:
    """A JSON-ready description of the scenes and their prompts (what ``suite.json`` holds)."""
    return {
        "version": SUITE_VERSION,
        "seeds": seeds,
        "scenes": [{"name": s.name, "note": s.note, "background": s.spec.background, "pattern": s.spec.pattern,
                    "background_concept": s.background_concept, "concepts": s.concepts(),
                    "objects": [asdict(o) for o in s.spec.objects],
                    "prompts": [p.as_dict() for p in scene_prompts(s, seeds)]} for s in scenes],
    }
