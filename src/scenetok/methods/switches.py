"""Ablation switches: each method names a few (``--no-attn-loss``, ``--mask-source crf``) that stand for
``--set`` overrides. These tables gather them over every registered method, by flag, and turn the flags
a caller gives into the overrides of one method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from scenetok.errors import ScenetokError
from scenetok.methods import available_methods, get_method


@dataclass(frozen=True)
class Switch:
    """One ablation switch (``--FLAG``) as the methods that have it define it."""

    flag: str
    help: str
    overrides: dict[str, list[str]]  # method name -> its overrides


@dataclass(frozen=True)
class Option:
    """One ablation switch with a value (``--FLAG VALUE``)."""

    flag: str
    help: str
    keys: dict[str, tuple[str, tuple[str, ...]]]  # method name -> (config key, choices)


def method_switches() -> dict[str, Switch]:
    """Every method's ablation switches, by flag."""
    out: dict[str, Switch] = {}
    for name in available_methods():
        for flag, (text, overrides) in get_method(name).switches.items():
            sw = out.setdefault(flag, Switch(flag, text, {}))
            sw.overrides[name] = list(overrides)
    return out


def method_options() -> dict[str, Option]:
    """Every method's switches with a value, by flag."""
    out: dict[str, Option] = {}
    for name in available_methods():
        for flag, (text, key, choices) in get_method(name).options.items():
            op = out.setdefault(flag, Option(flag, text, {}))
            op.keys[name] = (key, tuple(choices))
    return out


def switch_overrides(method_name: str, switches: Sequence[str] = (), options: dict[str, str] | None = None) -> list[str]:
    """The ``--set`` overrides of the ablation ``switches`` (flags) and ``options`` (flag → value) for
    ``method_name``; a flag the method does not have, or a value it does not offer, is an error."""
    out: list[str] = []
    known = method_switches()
    for flag in switches:
        sw = known.get(flag)
        if sw is None or method_name not in sw.overrides:
            owners = ", ".join(sw.overrides) if sw else "no method"
            raise ScenetokError(f"--{flag} is not a switch of {method_name}", hint=f"it belongs to: {owners}")
        out += sw.overrides[method_name]
    known_opts = method_options()
    for flag, value in (options or {}).items():
        op = known_opts.get(flag)
        if op is None or method_name not in op.keys:
            owners = ", ".join(op.keys) if op else "no method"
            raise ScenetokError(f"--{flag} is not an option of {method_name}", hint=f"it belongs to: {owners}")
        key, choices = op.keys[method_name]
        if value not in choices:
            raise ScenetokError(f"--{flag} {value} is not a choice of {method_name}",
                                hint=f"choose one of: {', '.join(choices)}")
        out.append(f"{key}={value}")
    return out
