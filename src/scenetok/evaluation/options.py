"""Evaluation options (:class:`EvalOptions`), the metric names, and the plan of one bundle's evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


from scenetok.errors import ConfigError
from scenetok.evaluation.metrics import DEFAULT_CLIP, DEFAULT_DINO
from scenetok.evaluation.prompts import EvalPrompt, get_protocol
from scenetok.evaluation.segment import DEFAULT_MASKFORMER, SEGMENTERS


METRICS = ("clip_t", "clip_i", "identity", "kid", "lpips")
DEFAULT_METRICS = ("clip_t", "clip_i", "identity", "kid")
KID_FEATURES = ("dino", "clip")
IMAGE_METRICS = ("prompt_similarity", "clip_t", "clip_i", "identity")
PARTIAL_DIR = ".partial"


@dataclass
class EvalOptions:
    """Everything ``scenetok eval`` can set; :func:`evaluate_bundles` takes these as keyword arguments."""

    templates: str | list[str] | None = "bas"  # template set name or list of templates (ignored with prompts)
    prompts: str | None = None  # prompt file (one prompt per line)
    protocol: str | None = None  # a paper's protocol (prompts.PROTOCOLS): its prompts and, unless given, n/steps/guidance
    n: int | None = None  # samples per prompt (None: the protocol's, else 4)
    seed: int = 0  # sample i of prompt k uses seed + k*n + i
    steps: int | None = None  # DDIM steps (None: the protocol's, else 50)
    guidance: float | None = None  # guidance scale (None: the protocol's, else 7.5)
    batch_size: int = 4  # images generated at once
    size: int | None = None  # image side (default: the bundle's resolution)
    scheduler: str = "ddim"
    dtype: str | None = None  # pipeline dtype: fp32 (default), fp16, bf16
    base_model: str | None = None
    device: str | None = None
    metrics: tuple[str, ...] | list[str] | str | None = None  # default: DEFAULT_METRICS (+ lpips with weights)
    clip_model: str = DEFAULT_CLIP
    dino_model: str = DEFAULT_DINO
    segmenter: str = "maskformer"
    maskformer_model: str = DEFAULT_MASKFORMER
    maskformer_threshold: float = 0.5
    detector: str | None = None  # text-sam: GroundingDINO id/folder (None: scenetok.masks' default)
    sam_model: str | None = None  # text-sam: SAM id/folder (None: scenetok.masks' default)
    lpips_weights: str | None = None
    kid_features: str = "dino"
    kid_views: int = 32
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    fill: int = 128  # grey level outside masks in masked images
    score_batch_size: int = 32
    html_thumb: int = 160  # thumbnail side in index.html
    progress: bool = True

    def __post_init__(self):
        proto = get_protocol(self.protocol) if self.protocol is not None else None
        if proto is not None and self.prompts is not None:
            raise ConfigError("--protocol and --prompts both choose the prompts", hint="give one of them")
        for name, fallback in (("n", 4), ("steps", 50), ("guidance", 7.5)):
            if getattr(self, name) is None:
                value = getattr(proto, name) if proto is not None else None
                setattr(self, name, fallback if value is None else value)
        m = self.metrics
        if m is None:
            m = list(DEFAULT_METRICS) + (["lpips"] if self.lpips_weights else [])
        elif isinstance(m, str):
            m = [x.strip() for x in m.split(",") if x.strip()]
        unknown = [x for x in m if x not in METRICS]
        if unknown:
            raise ConfigError(f"unknown metric(s) {', '.join(unknown)} in --metrics",
                              hint=f"choose from {','.join(METRICS)}")
        self.metrics = tuple(x for x in METRICS if x in m)
        if "lpips" in self.metrics and not self.lpips_weights:
            raise ConfigError("--metrics lpips needs LPIPS weights (--lpips-weights FILE.safetensors)",
                              hint="convert the lpips package's weights once (see docs/evaluation.md), or drop lpips")
        if self.segmenter not in SEGMENTERS:
            raise ConfigError(f"unknown segmenter {self.segmenter!r}", hint=f"choose one of {', '.join(SEGMENTERS)}")
        if self.kid_features not in KID_FEATURES:
            raise ConfigError(f"unknown KID features {self.kid_features!r}", hint=f"choose one of {', '.join(KID_FEATURES)}")
        for name in ("n", "steps", "batch_size", "kid_views", "kid_subsets", "kid_subset_size", "score_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.kid_views < 2 and "kid" in self.metrics:
            raise ConfigError("KID needs at least 2 input views", hint="raise --kid-views")
        if not 0 <= int(self.fill) <= 255:
            raise ConfigError(f"fill must be a grey level 0..255 (got {self.fill})")

    def public(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("progress",)}
        d["metrics"] = list(self.metrics)
        return d


@dataclass
class _Plan:
    """One bundle to evaluate: its prompt set and where its references come from."""

    index: int
    name: str
    bundle: Any
    prompts: list[EvalPrompt]
    scene: Any = None
    out_dir: Path | None = None
    _refs: dict | None = field(default=None, repr=False)

    @property
    def tokens(self) -> list[str]:
        return [h.token for h in self.bundle.handles]

    def class_words(self) -> dict[str, str]:
        return {h.token: h.class_word for h in self.bundle.handles}
