"""Community LoRAs on top of a bundle (DisenDiff Fig. 8): ``--lora FILE --lora-scale S``.

A LoRA file (diffusers / peft keys, or kohya / AUTOMATIC1111 keys; safetensors only) is first read and
checked against the pipeline it is meant for: every adapted layer must name a module of the UNet or the
text encoder, with the same input and output sizes. A LoRA trained for another base model (SD 1.x on
SD 2.x, SDXL on SD 1.x …) fails here with one line naming a layer that does not fit, before anything is
changed. Then it is loaded with diffusers' ``load_lora_weights`` as a *named* peft adapter, beside the
bundle's own adapter (``scenetok``) if the bundle has one, and the weights of every adapter are set
explicitly (the bundle's at 1.0, each community LoRA at its scale). :func:`remove_lora` deletes one
again; the pipeline then computes what it computed before the LoRA was added.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from scenetok.errors import ConfigError
from scenetok.lora import ADAPTER_NAME

# the pipeline attribute holding {adapter name: weight} of the community LoRAs this module added
_SCALES_ATTR = "_scenetok_lora_scales"

_KOHYA = re.compile(r"^(lora_unet|lora_te\d?)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_DIFFUSERS = re.compile(
    r"^(?:(unet|text_encoder|text_encoder_2|transformer)\.)?(.+?)\."
    r"(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight|"
    r"lora_linear_layer\.up\.weight|alpha|lora_A\.bias|lora_B\.bias)$")
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


@dataclass
class LoraLayer:
    """One adapted layer of a LoRA file: the component and module it names, its down (A) and up (B) shapes."""

    component: str  # "unet" or "text_encoder" (what the file says; "text_encoder_2" etc. never fit SD 1/2)
    module: str  # the file's module name (kohya: underscores; diffusers: dotted path)
    down: tuple[int, ...] | None = None
    up: tuple[int, ...] | None = None


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"LoRA file {path} does not exist" if not path.exists() else f"LoRA {path} is not a file",
                          hint="pass the path of a .safetensors LoRA file with --lora")
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"LoRA file {path} is not a .safetensors file; scenetok loads no pickled weights",
                          hint="convert it to safetensors (most LoRA sites offer that form), then pass it again")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ConfigError(f"LoRA file {path} cannot be read as safetensors: {str(e).splitlines()[0]}",
                          hint="the file is damaged or not a LoRA; download it again") from None


def read_lora_layers(path: str | Path) -> tuple[str, list[LoraLayer]]:
    """The format (``"kohya"`` or ``"diffusers"``) and the adapted layers of a LoRA file."""
    path = Path(path)
    state = _read_state(path)
    layers: dict[tuple[str, str], LoraLayer] = {}
    kohya = [k for k in state if k.startswith(("lora_unet_", "lora_te"))]
    fmt = "kohya" if kohya else "diffusers"
    unknown = []
    for key, value in state.items():
        if fmt == "kohya":
            m = _KOHYA.match(key)
            if not m:
                unknown.append(key)
                continue
            prefix, module, part = m.groups()
            comp = "unet" if prefix == "lora_unet" else ("text_encoder" if prefix == "lora_te" else prefix)
        else:
            m = _DIFFUSERS.match(key)
            if not m:
                unknown.append(key)
                continue
            comp, module, part = m.groups()
            comp = comp or "unet"
            module = _OLD_PROCESSOR.sub(lambda mm: "." + mm.group(1) + (".0" if mm.group(1) == "to_out" else ""),
                                        module)
        layer = layers.setdefault((comp, module), LoraLayer(comp, module))
        if part.endswith("weight"):
            if "down" in part or "lora_A" in part:
                layer.down = tuple(value.shape)
            else:
                layer.up = tuple(value.shape)
    if unknown:
        raise ConfigError(f"LoRA file {path}: {len(unknown)} tensor(s) are in no LoRA layout scenetok reads "
                          f"(e.g. {unknown[0]!r})",
                          hint="scenetok reads diffusers/peft LoRAs and kohya/AUTOMATIC1111 LoRAs (lora_down/lora_up); "
                          "LyCORIS (LoHa, LoKr) files are not supported")
    if not layers:
        raise ConfigError(f"LoRA file {path} holds no LoRA layers", hint="pass a LoRA .safetensors file")
    return fmt, list(layers.values())


def _module_table(pipe, fmt: str) -> dict[tuple[str, str], torch.nn.Module]:
    """(component, name as the file would write it) → the module (its base layer when peft wraps it)."""
    out = {}
    for comp in ("unet", "text_encoder"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for name, mod in model.named_modules():
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if name.endswith(".base_layer"):  # a layer peft already wraps: named as before wrapping
                name = name[: -len(".base_layer")]
            elif ".lora_" in name:
                continue
            keys = [name]
            if comp == "text_encoder":
                keys.append(name[len("text_model."):] if name.startswith("text_model.") else "text_model." + name)
            for key in keys:
                out[(comp, key.replace(".", "_") if fmt == "kohya" else key)] = mod
    return out


def _sizes(mod: torch.nn.Module) -> tuple[int, int]:
    if isinstance(mod, torch.nn.Conv2d):
        return mod.in_channels, mod.out_channels
    return mod.in_features, mod.out_features


def check_lora_fits(pipe, path: str | Path, base: str = "the base model") -> list[LoraLayer]:
    """Raise :class:`ConfigError` unless every layer of the LoRA at ``path`` fits a module of ``pipe``."""
    path = Path(path)
    fmt, layers = read_lora_layers(path)
    table = _module_table(pipe, fmt)
    hint = (f"use a LoRA trained for {base} (SD 1.x LoRAs do not fit SD 2.x models, SDXL LoRAs fit neither)")
    missing = [ly for ly in layers if (ly.component, ly.module) not in table]
    if missing:
        ex = missing[0]
        raise ConfigError(f"LoRA {path.name} was made for another base model: {len(missing)} of its {len(layers)} "
                          f"layers name no module of {base} (e.g. {ex.component} {ex.module})", hint=hint)
    for ly in layers:
        if ly.down is None or ly.up is None:
            raise ConfigError(f"LoRA {path.name}: layer {ly.module} lacks its "
                              f"{'down (A)' if ly.down is None else 'up (B)'} matrix",
                              hint="the file is damaged or incomplete")
        want_in, want_out = _sizes(table[(ly.component, ly.module)])
        have_in, have_out = ly.down[1], ly.up[0]
        if (have_in, have_out) != (want_in, want_out) or ly.down[0] != ly.up[1]:
            raise ConfigError(f"LoRA {path.name} was made for another base model: layer {ly.module} of {base} maps "
                              f"{want_in} → {want_out} features, the LoRA's {have_in} → {have_out}", hint=hint)
    return layers


def _adapter_name(pipe, path: Path, name: str | None) -> str:
    taken = set(lora_scales(pipe)) | {ADAPTER_NAME}
    for comp_adapters in (pipe.get_list_adapters() or {}).values():
        taken |= set(comp_adapters)
    if name is not None:
        if name in taken:
            raise ConfigError(f"a LoRA named {name!r} is already loaded", hint="give each LoRA its own name")
        return name
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", path.stem).strip("_") or "lora"
    cand, i = stem, 2
    while cand in taken:
        cand, i = f"{stem}_{i}", i + 1
    return cand


def lora_scales(pipe) -> dict[str, float]:
    """The community LoRAs added by :func:`add_lora` and their weights."""
    return dict(getattr(pipe, _SCALES_ATTR, {}) or {})


def _apply_weights(pipe) -> None:
    names, weights = [], []
    present = set()
    for comp_adapters in (pipe.get_list_adapters() or {}).values():
        present |= set(comp_adapters)
    if ADAPTER_NAME in present:
        names.append(ADAPTER_NAME)
        weights.append(1.0)
    for name, w in lora_scales(pipe).items():
        names.append(name)
        weights.append(float(w))
    if names:
        pipe.set_adapters(names, weights)


def add_lora(pipe, path: str | Path, scale: float = 1.0, *, name: str | None = None,
             base: str = "the base model") -> str:
    """Check the LoRA at ``path`` against ``pipe`` (:func:`check_lora_fits`), load it as a named peft
    adapter stacked with what the pipeline already has, set every adapter's weight explicitly (the
    bundle's ``scenetok`` adapter 1.0, this one ``scale``) and return the adapter name."""
    path = Path(path).expanduser()
    layers = check_lora_fits(pipe, path, base=base)
    adapter = _adapter_name(pipe, path, name)
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # peft's note that the model now has several adapters: that is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ConfigError(f"LoRA {path} could not be loaded on {base}: {str(e).splitlines()[0]}",
                          hint="use a LoRA trained for this base model") from None
    finally:
        dlogging.set_verbosity(level)
    loaded = sum(1 for comp in ("unet", "text_encoder") if getattr(pipe, comp, None) is not None
                 for mod in getattr(pipe, comp).modules() if adapter in getattr(mod, "lora_A", {}))
    if loaded != len(layers):
        remove_lora(pipe, adapter)
        raise ConfigError(f"LoRA {path.name}: only {loaded} of its {len(layers)} layers were applied",
                          hint="the file's layout is not one diffusers maps onto this model")
    scales = lora_scales(pipe)
    scales[adapter] = float(scale)
    setattr(pipe, _SCALES_ATTR, scales)
    _apply_weights(pipe)
    return adapter


def add_loras(pipe, loras, scales=None, *, base: str = "the base model") -> list[str]:
    """:func:`add_lora` for each file of ``loras`` (one scale for all, or one per file)."""
    loras = [loras] if isinstance(loras, (str, Path)) else list(loras or [])
    if scales is None:
        scales = [1.0] * len(loras)
    elif isinstance(scales, (int, float)):
        scales = [float(scales)] * len(loras)
    scales = list(scales)
    if len(scales) == 1 and len(loras) > 1:
        scales = scales * len(loras)
    if len(scales) != len(loras):
        raise ConfigError(f"{len(loras)} LoRA file(s) but {len(scales)} --lora-scale value(s)",
                          hint="give one --lora-scale for all, or one per --lora")
    return [add_lora(pipe, f, s, base=base) for f, s in zip(loras, scales)]


def remove_lora(pipe, name: str) -> None:
    """Delete the adapter ``name`` from the pipeline and restore the weights of the others."""
    pipe.delete_adapters([name])
    scales = lora_scales(pipe)
    scales.pop(name, None)
    setattr(pipe, _SCALES_ATTR, scales)
    _apply_weights(pipe)
