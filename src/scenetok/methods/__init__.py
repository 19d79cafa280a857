"""The method registry: ``get_method(name)`` returns a method with paper defaults."""

from __future__ import annotations

from scenetok.errors import ConfigError
from scenetok.methods.base import Batch, Method, Outputs, Phase, union_sample
from scenetok.methods.baselines import CustomDiffusionM, DreamBoothM, TextualInversionM
from scenetok.methods.break_a_scene import BreakAScene
from scenetok.methods.disendiff import DisenDiff
from scenetok.methods.em_masks import EMMasks
from scenetok.methods.textual_localization import TextualLocalization

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls
    return cls


register(BreakAScene)
register(DisenDiff)
register(TextualLocalization)
register(EMMasks)
for _baseline in (TextualInversionM, DreamBoothM, CustomDiffusionM):
    register(_baseline)


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}", hint=f"available methods: {', '.join(available_methods())}"
        ) from None


__all__ = ["Batch", "Method", "Outputs", "Phase", "union_sample", "get_method", "available_methods", "register"]
