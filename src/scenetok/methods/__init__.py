"""The method registry: ``get_method(name)`` returns a method with paper defaults.

Every :class:`Method` subclass that sets its own ``name`` registers itself when its module is imported
(like peft's tuners); this package imports each of its modules, so adding a method is adding one file here.
A method defined elsewhere registers the same way as soon as its module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil

from scenetok.errors import ConfigError
from scenetok.methods.base import METHODS, Batch, Method, Outputs, Phase, union_sample

_NOT_METHODS = {"base", "switches"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_METHODS:
        importlib.import_module(f"{__name__}.{_info.name}")


def register(cls: type[Method]) -> type[Method]:
    """Register ``cls`` under ``cls.name`` (for a class that does not register itself, e.g. one that reuses
    a parent's name on purpose); returns ``cls``, so it works as a decorator."""
    METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}", hint=f"available methods: {', '.join(available_methods())}"
        ) from None


__all__ = ["Batch", "Method", "Outputs", "Phase", "union_sample", "get_method", "available_methods", "register",
           "METHODS"]
