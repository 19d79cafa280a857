"""Nested hyperparameter dictionaries: method defaults, config files and ``--set key=value`` overrides.

A method's defaults are a nested dict (``{"phase1": {"steps": 400, "lr": 5e-4}, ...}``). A YAML/JSON
config file and ``--set`` overrides may only change keys that exist (typos are errors that list the valid
keys); values given as text are parsed as YAML scalars (``1e-3``, ``true``, ``[16, 32]``) and must keep
the default's type (an int where a float is expected is fine).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Iterable

import yaml

from scenetok.errors import ConfigError, shorten

# image sampling (generate, variations, the demo): DPM-Solver++ 2M. On toy-sd its oracle scores are within
# noise of DDIM's in 15 steps instead of 25 (docs/benchmarks.md, "Sampling"); the 30 default steps are that
# ratio applied to the old default of DDIM 50.
SAMPLERS = ("ddim", "dpm", "euler", "euler_a", "pndm", "base")
DEFAULT_SAMPLER = "dpm"
DEFAULT_STEPS = 30
TOY_SAMPLER_STEPS = 15  # the demo and the toy-world benchmark (DPM-Solver++ 15 ≈ DDIM 25 on toy-sd)

TOY_SD_ENV = "SCENETOK_TOY_SD"


def toy_sd_path() -> Path:
    """Folder of the toy-sd model: the shipped one inside the installed package, or the folder named by the
    environment variable ``SCENETOK_TOY_SD`` (a toy-sd you trained yourself, used wherever the shipped one
    would be: extract's default model, demo, benchmark, tests)."""
    env = os.environ.get(TOY_SD_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent / "assets" / "toy-sd"


def default_model() -> str | None:
    """The toy model (:func:`toy_sd_path`), if this installation has it: the base model when none is given."""
    path = toy_sd_path()
    return str(path) if (path / "model_index.json").is_file() else None


def check_model_source(model_id: str | os.PathLike, what: str = "model", option: str | None = None) -> None:
    """Fail at once, in one line, when ``model_id`` can be neither read here nor downloaded.

    A local folder is fine. A Hub id must be in the local Hugging Face cache, or the Hub must be reachable;
    in offline mode (``HF_HUB_OFFLINE=1``) or without a network this raises :class:`ModelLoadError` right
    away instead of letting the loaders retry for a minute."""
    from scenetok.errors import ModelLoadError

    text = str(model_id)
    path = Path(text).expanduser()
    if path.exists():
        return
    flag = f" ({option})" if option else ""
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or not text.strip()
    if looks_local:
        raise ModelLoadError(f"the {what}{flag} {text} does not exist",
                             hint="give an existing local folder, or a Hub id such as owner/name")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - diffusers and transformers depend on it
        return
    try:
        snapshot_download(text, local_files_only=True)
        return  # cached
    except LocalEntryNotFoundError:
        pass
    except Exception:  # noqa: BLE001 - a malformed id or cache: let the loader say what is wrong
        return
    hint = (f"download {text} where there is a network (huggingface-cli download {text} --local-dir DIR), copy "
            "DIR here and pass the folder")
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"the {what}{flag} {text} is not in the local Hugging Face cache and offline mode is on "
                             "(HF_HUB_OFFLINE)", hint=hint)
    import socket
    from urllib.parse import urlparse

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError:
        raise ModelLoadError(f"the {what}{flag} {text} is not in the local Hugging Face cache and the Hub "
                             f"({host}) cannot be reached", hint=hint) from None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_ticks(stat_text: str, cpus: set[int] | None) -> tuple[int, int, int] | None:
    """(busy, total, lines) — jiffies summed over the ``cpuN`` lines of a ``/proc/stat`` text whose N is in
    ``cpus`` (None: every CPU), and how many such lines there were; None when there is none. Busy is
    everything but idle and iowait."""
    busy = total = seen = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit():
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        ticks = [int(v) for v in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        if len(ticks) < 5:
            continue
        seen += 1
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total, seen) if seen else None


def busy_cpus_between(before: str, after: str, cpus: set[int] | None = None) -> float | None:
    """How many of ``cpus`` were busy between two ``/proc/stat`` snapshots (e.g. 1.0 = one core's worth);
    None when the snapshots do not say (no matching ``cpuN`` lines, or no time passed)."""
    a, b = _cpu_ticks(before, cpus), _cpu_ticks(after, cpus)
    if a is None or b is None or b[1] <= a[1]:
        return None
    return b[2] * (b[0] - a[0]) / (b[1] - a[1])


def _busy_cpus_now(interval: float = 0.2) -> float | None:
    """CPUs of this process's affinity mask that other processes keep busy right now: two ``/proc/stat``
    reads ``interval`` seconds apart (this process sleeps in between, so it does not count). None where
    ``/proc/stat`` cannot be read (not Linux)."""
    import time

    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    try:
        before = Path("/proc/stat").read_text()
        time.sleep(interval)
        after = Path("/proc/stat").read_text()
    except OSError:
        return None
    return busy_cpus_between(before, after, cpus)


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """How many CPU threads torch should use, and why.

    ``requested`` (``--threads``) wins, then ``OMP_NUM_THREADS``; otherwise the CPUs of this process's
    affinity mask less the ones other processes keep busy, at least one. "Busy" is measured now (0.2 s of
    ``/proc/stat``); only where that cannot be read, the 1-minute load average stands in — it lags: right
    after a job ends it still counts it (a demo started just after ``pip install`` got one thread of two).
    torch's own default — every core — makes its threads wait on each other when another process holds a
    core: measured 5–7× slower on a shared 2-core machine (docs/reliability.md)."""
    cpus = available_cpus()
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads must be at least 1, got {requested}")
        return int(requested), "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    busy = _busy_cpus_now()
    how = "busy now"
    if busy is None:
        how = "load average"
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    free = int(cpus - busy + 0.5)
    return max(1, min(cpus, free)), f"{cpus} CPUs, {busy:.1f} {how}"


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# YAML 1.1 reads these words as booleans; a text setting (mixed_precision=no) keeps them as text
_YAML11_BOOLS = {"yes": True, "no": False, "on": True, "off": False, "y": True, "n": False}


def _coerce(key: str, value: Any, default: Any) -> Any:
    value = _coerce_type(key, value, default)
    if isinstance(value, float) and not math.isfinite(value):
        # a NaN or infinite learning rate or weight trains garbage from the first step: refuse it here
        raise ConfigError(f"{key} must be a finite number, got {value}", hint=f"give {key} an ordinary number")
    return value


def _coerce_type(key: str, value: Any, default: Any) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, str) and isinstance(value, bool):
        # YAML 1.1 files read `no`/`off`/`false` as booleans: a text setting such as mixed_precision: no
        return "yes" if value else "no"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _YAML11_BOOLS:
            return _YAML11_BOOLS[value.strip().lower()]
        raise ConfigError(f"{key} must be true or false, got {shorten(value)}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (int, float)) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as text
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {shorten(value)}") from None
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
        return [value]
    return value


def set_key(cfg: dict, key: str, value: Any) -> None:
    """Set dotted ``key`` in ``cfg`` (in place); the key must exist."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            valid = ", ".join(sorted(flatten(cfg)))
            raise ConfigError(f"unknown setting {shorten(key)}", hint=f"valid settings: {valid}")
        if i == len(parts) - 1:
            node[part] = _coerce(key, value, node[part])
        else:
            node = node[part]


def parse_assignment(text: str) -> tuple[str, Any]:
    if not isinstance(text, str):
        raise ConfigError(f"an override must be a 'key=value' string, got {type(text).__name__} {shorten(text)}",
                          hint='for example overrides=["phase1.steps=50"]')
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {shorten(text)}", hint="for example --set phase1.steps=50")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # "no", "off", … stay words; a boolean setting still accepts them (see _coerce)
    return key, value


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        detail = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}{where}: "
                          f"{' '.join(str(detail).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


def merge(base: dict, extra: dict) -> dict:
    """``base`` updated in place with ``extra``, nested dicts merged key by key (a method's
    ``{"prior": {"enabled": True}}`` changes one prior setting and keeps the others)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def resolve(defaults: dict, file_cfg: dict | None = None, overrides: Iterable[str] = ()) -> dict:
    """defaults ← config file ← ``key=value`` overrides; returns a new dict.

    ``file_cfg`` is a (possibly partial, nested) mapping; ``overrides`` a list of ``"key=value"`` strings
    (a single string is one override)."""
    cfg = copy.deepcopy(defaults)
    if file_cfg is not None and not isinstance(file_cfg, dict):
        raise ConfigError(f"the settings must be a mapping of setting names to values, got {type(file_cfg).__name__}",
                          hint='for example {"phase1": {"steps": 50}} or {"phase1.steps": 50}')
    overrides = [overrides] if isinstance(overrides, str) else list(overrides or ())
    if file_cfg:
        for key, value in flatten(file_cfg).items():
            set_key(cfg, key, value)
    for text in overrides:
        key, value = parse_assignment(text)
        set_key(cfg, key, value)
    return cfg


# ----------------------------------------------------------------------------------------------------
# typed settings: dataclasses whose fields carry a help text


def setting(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line ``help`` (shown by ``scenetok methods NAME`` and
    ``scenetok extract --help``). Lists and dicts are copied for every instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def group(cls: type, help: str = "") -> Any:
    """A dataclass field holding a nested settings dataclass (a dotted group such as ``phase1.*``)."""
    return field(default_factory=cls, metadata={"help": help})


def to_dict(settings: Any) -> dict:
    """A settings dataclass instance as the nested dict the trainer reads (field order kept)."""
    return dataclasses.asdict(settings)


def helps(cls: type, prefix: str = "") -> dict[str, str]:
    """``{dotted key: help}`` of every setting of the dataclass ``cls`` (nested groups flattened)."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind):
            out.update(helps(kind, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f.metadata.get("help", "")
    return out
