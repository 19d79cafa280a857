"""LoRA adapters: train low-rank updates of the attention projections instead of full weights.

With ``adapter.type=lora`` (CLI: ``--adapter lora --rank R``) every phase that would train ``unet``,
``text_encoder``, ``unet_kv`` or ``unet_q`` trains peft LoRA adapters on the matching linear layers
instead, and the base weights stay bit-for-bit unchanged:

=================  ===========================================================================
group              LoRA on
=================  ===========================================================================
``unet``           every UNet module whose name ends in one of ``adapter.targets``
                   (default: the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``)
``unet_kv``        the key/value projections of the cross-attention layers only (Custom Diffusion)
``unet_q``         the query projections of the cross-attention layers only
``text_encoder``   every text-encoder module whose name ends in one of
                   ``adapter.text_encoder_targets`` (default ``q_proj``, ``k_proj``, ``v_proj``,
                   ``out_proj``); the vocabulary (and so the handles) is never adapted
=================  ===========================================================================

The adapters are injected with the diffusers / transformers peft integration (``add_adapter``), so the
attention modules keep their processors (and :func:`scenetok.attention.capture_attention` keeps working).
A bundle stores them twice (:func:`write_lora_dir`): as a diffusers LoRA
(``pytorch_lora_weights.safetensors``, read by ``pipe.load_lora_weights``; rank and alpha travel in the
file's metadata) and in the kohya key format AUTOMATIC1111 and ComfyUI read (:func:`to_kohya`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from scenetok.config import setting, to_dict
from scenetok.errors import ConfigError
from scenetok.io import atomic_save_safetensors
from scenetok.params import cross_attention_modules

ADAPTER_NAME = "scenetok"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
KOHYA_FILE = "lora_kohya.safetensors"
LORA_GROUPS = ("unet", "unet_kv", "unet_q", "text_encoder")
UNET_GROUPS = ("unet", "unet_kv", "unet_q")

@dataclass
class AdapterSettings:
    type: str = setting("none", "none, or lora: LoRA adapters instead of the UNet / text-encoder weights")
    rank: int = setting(4, "LoRA rank (size of the low-rank update)")
    alpha: float = setting(0.0, "LoRA alpha (0: equal to the rank, scale 1)")
    lr: float = setting(1e-4, "learning rate of the adapter weights (the phase's lr still applies to the handles)")
    dropout: float = setting(0.0, "LoRA dropout")
    targets: list = setting(["to_q", "to_k", "to_v", "to_out.0"], "UNet attention projections that get adapters")
    text_encoder_targets: list = setting(["q_proj", "k_proj", "v_proj", "out_proj"],
                                         "text-encoder attention projections that get adapters")


ADAPTER_DEFAULTS: dict = to_dict(AdapterSettings())


def enabled(cfg: dict) -> bool:
    """True when the run's config asks for LoRA adapters."""
    return (cfg.get("adapter") or {}).get("type", "none") == "lora"


def validate(acfg: dict) -> None:
    """Check the ``adapter.*`` settings; raise :class:`ConfigError` naming the bad one."""
    if acfg["type"] not in ("none", "lora"):
        raise ConfigError(f"adapter.type must be none or lora, got {acfg['type']!r}",
                          hint="use --adapter lora (or --set adapter.type=lora)")
    if not isinstance(acfg["rank"], int) or acfg["rank"] < 1:
        raise ConfigError(f"adapter.rank must be a positive integer, got {acfg['rank']!r}", hint="e.g. --rank 4")
    if acfg["alpha"] < 0:
        raise ConfigError(f"adapter.alpha must be >= 0 (0: equal to the rank), got {acfg['alpha']}")
    if not 0.0 <= acfg["dropout"] < 1.0:
        raise ConfigError(f"adapter.dropout must be in [0, 1), got {acfg['dropout']}")
    for key in ("targets", "text_encoder_targets"):
        if not acfg[key] or not all(isinstance(t, str) and t for t in acfg[key]):
            raise ConfigError(f"adapter.{key} must be a non-empty list of module names",
                              hint="e.g. --set adapter.targets=[to_k,to_v]")


def alpha_of(acfg: dict) -> float:
    return float(acfg["alpha"]) if acfg["alpha"] > 0 else float(acfg["rank"])


@dataclass
class LoraSet:
    """The adapters of one run: which groups have them, their configs, and their parameters."""

    rank: int
    alpha: float
    configs: dict = field(default_factory=dict)  # "unet" / "text_encoder" -> peft LoraConfig
    params: dict = field(default_factory=dict)  # group -> [Parameter]
    modules: dict = field(default_factory=dict)  # "unet" / "text_encoder" -> the adapted module

    def parameters(self, groups) -> list[torch.nn.Parameter]:
        """The adapter parameters of ``groups`` (each parameter once, in a fixed order)."""
        out, seen = [], set()
        for g in LORA_GROUPS:
            if g in groups:
                for p in self.params.get(g, []):
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor, keyed ``"<component>.<parameter name>"`` (for checkpoints)."""
        out = {}
        for comp, module in self.modules.items():
            for name, p in module.named_parameters():
                if _is_lora_param(name):
                    out[f"{comp}.{name}"] = p.detach().clone()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for comp, module in self.modules.items():
            params = dict(module.named_parameters())
            prefix = comp + "."
            mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            missing = [n for n in params if _is_lora_param(n) and n not in mine]
            unknown = [n for n in mine if n not in params]
            if missing or unknown:
                raise ValueError(f"the checkpoint's {comp} LoRA does not match this run "
                                 f"({len(missing)} missing, {len(unknown)} unknown tensors)")
            with torch.no_grad():
                for n, v in mine.items():
                    params[n].copy_(v.to(params[n].dtype))

    def peft_state(self, comp: str) -> dict[str, torch.Tensor]:
        """peft-format state dict of one component, without the adapter name
        (``...to_q.lora_A.weight``)."""
        from peft.utils import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.modules[comp], adapter_name=ADAPTER_NAME,
                                       save_embedding_layers=False)
        return {k: v.detach().cpu().float().contiguous() for k, v in sd.items()}


def _is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _cross_attention_targets(unet, projections) -> list[str]:
    return [f"{name}.{proj}" for name in cross_attention_modules(unet) for proj in projections]


def _config(rank: int, alpha: float, dropout: float, targets: list[str]):
    from peft import LoraConfig

    # B = 0 at the start, so an adapted model computes exactly what the base model does
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      init_lora_weights="gaussian")


def _reinit(module, names: list[str], rank: int, seed: int) -> None:
    """A fresh, seeded gaussian init of every ``lora_A`` (std 1/rank, peft's "gaussian") and zero
    ``lora_B``: the same adapters for the same seed, whatever the global random state."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n in names:
            p = params[n]
            if ".lora_A." in n:
                p.copy_((torch.randn(p.shape, generator=gen) / rank).to(p.dtype))
            else:
                p.zero_()


def add_lora(unet, text_encoder, groups, acfg: dict, seed: int = 0, text_encoder_2=None) -> LoraSet | None:
    """Inject LoRA adapters for the trainable ``groups`` (see the module docstring); ``None`` when no
    group has adapters. Every adapter starts at zero (the model's output is unchanged). ``text_encoder_2``
    (SDXL's second encoder) gets adapters too when the ``text_encoder`` group trains."""
    rank, alpha = int(acfg["rank"]), alpha_of(acfg)
    lora = LoraSet(rank=rank, alpha=alpha)
    unet_targets: list[str] = []
    if "unet" in groups:
        unet_targets += list(acfg["targets"])
    if "unet_kv" in groups:
        unet_targets += _cross_attention_targets(unet, ("to_k", "to_v"))
    if "unet_q" in groups:
        unet_targets += _cross_attention_targets(unet, ("to_q",))
    unet_targets = list(dict.fromkeys(unet_targets))
    if unet_targets:
        cfg = _config(rank, alpha, acfg["dropout"], unet_targets)
        try:
            unet.add_adapter(cfg, adapter_name=ADAPTER_NAME)
        except ValueError as e:  # peft: no module matches
            raise ConfigError(f"adapter.targets {acfg['targets']} match no UNet module: {e}",
                              hint="name linear layers of the UNet, e.g. [to_q, to_k, to_v, to_out.0]") from None
        lora.configs["unet"], lora.modules["unet"] = cfg, unet
        names = [n for n, _ in unet.named_parameters() if _is_lora_param(n)]
        _reinit(unet, names, rank, seed)
        params = dict(unet.named_parameters())
        lora.params["unet"] = [params[n] for n in names]
        for group, projs in (("unet_kv", ("to_k", "to_v")), ("unet_q", ("to_q",))):
            if group in groups:
                wanted = tuple(f"{t}." for t in _cross_attention_targets(unet, projs))
                lora.params[group] = [params[n] for n in names if n.startswith(wanted)]
    encoders = [("text_encoder", text_encoder)] + ([("text_encoder_2", text_encoder_2)] if text_encoder_2 is not None
                                                   else [])
    for i, (comp, te) in enumerate(encoders if "text_encoder" in groups else []):
        cfg = _config(rank, alpha, acfg["dropout"], list(acfg["text_encoder_targets"]))
        try:
            te.add_adapter(cfg, adapter_name=ADAPTER_NAME)
        except ValueError as e:
            if "version of PEFT" in str(e):  # transformers' PEFT integration refuses the installed peft
                raise ConfigError(f"text-encoder LoRA: the installed transformers and peft do not work together ({e})",
                                  hint="pip install 'transformers<5.24' (or a newer peft)") from None
            raise ConfigError(f"adapter.text_encoder_targets {acfg['text_encoder_targets']} match no "
                              f"text-encoder module: {e}",
                              hint="name linear layers of the text encoder, e.g. "
                              "[q_proj, k_proj, v_proj, out_proj]") from None
        lora.configs[comp], lora.modules[comp] = cfg, te
        names = [n for n, _ in te.named_parameters() if _is_lora_param(n)]
        _reinit(te, names, rank, seed + 1 + i)
        params = dict(te.named_parameters())
        lora.params["text_encoder"] = lora.params.get("text_encoder", []) + [params[n] for n in names]
    if not lora.modules:
        return None
    for comp, module in lora.modules.items():  # adapters live where the base weights live
        module.to(next(p for n, p in module.named_parameters() if not _is_lora_param(n)).device)
    return lora


# ------------------------------------------------------------------------------------------- export


def sgm_unet_module(module: str, layers_per_block: int = 2) -> str:
    """The original (SGM / kohya sd-scripts) name of a diffusers SDXL UNet attention module:
    ``down_blocks.1.attentions.0.…`` → ``input_blocks.4.1.…``, ``mid_block.attentions.0.…`` →
    ``middle_block.1.…``, ``up_blocks.0.attentions.2.…`` → ``output_blocks.2.1.…`` (``to_out.0`` →
    ``to_out.0`` stays). ``layers_per_block``: the UNet's (SDXL: 2; an up block has one more)."""
    parts = module.split(".")
    n = int(layers_per_block)
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        head = ["input_blocks", str(1 + int(parts[1]) * (n + 1) + int(parts[3])), "1"]
    elif parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    elif parts[0] == "up_blocks" and parts[2] == "attentions":
        head = ["output_blocks", str(int(parts[1]) * (n + 1) + int(parts[3])), "1"]
    else:
        raise ValueError(f"no SGM name for the UNet module {module!r}")
    return ".".join(head + parts[4:])


def _kohya_module(comp: str, module: str, family: str = "sd", layers_per_block: int = 2) -> str:
    """kohya's name of one adapted module: ``lora_unet_down_blocks_0_..._to_q`` /
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (dots become underscores; the text
    encoder's modules are named as in the original CLIP checkpoint, under ``text_model``). SDXL (as
    kohya's sd-scripts write it): UNet modules by their SGM names (``lora_unet_input_blocks_4_1_…``,
    :func:`sgm_unet_module`), the text encoders as ``lora_te1_…`` and ``lora_te2_…``."""
    if comp == "unet":
        if family == "sdxl":
            module = sgm_unet_module(module, layers_per_block)
        return "lora_unet_" + module.replace(".", "_")
    if comp in ("text_encoder", "text_encoder_2"):
        if not module.startswith("text_model."):
            module = "text_model." + module  # transformers 5 names CLIPTextModel's modules without it
        prefix = "lora_te" if family != "sdxl" else ("lora_te1" if comp == "text_encoder" else "lora_te2")
        return prefix + "_" + module.replace(".", "_")
    raise ValueError(f"no kohya name for component {comp!r}")


def to_kohya(states: dict[str, dict[str, torch.Tensor]], alpha: float, family: str = "sd",
             layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """peft-format LoRA state dicts (``{"unet": {...lora_A.weight}, "text_encoder": {...}}``) in the
    kohya key format (``<module>.lora_down.weight`` = A, ``.lora_up.weight`` = B, ``.alpha``); ``family``
    ``sdxl`` names modules as kohya's SDXL LoRAs do (see :func:`_kohya_module`)."""
    out: dict[str, torch.Tensor] = {}
    for comp, sd in states.items():
        for key, value in sd.items():
            module, sep, rest = key.rpartition(".lora_")
            if not sep or rest not in ("A.weight", "B.weight"):
                raise ValueError(f"not a peft LoRA key: {key!r}")
            name = _kohya_module(comp, module, family, layers_per_block)
            out[f"{name}.lora_{'down' if rest[0] == 'A' else 'up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def write_lora_dir(folder: str | Path, states: dict[str, dict[str, torch.Tensor]], configs: dict,
                   rank: int, alpha: float, base_model: str = "", family: str = "sd",
                   layers_per_block: int = 2) -> list[str]:
    """Write the diffusers LoRA (:data:`DIFFUSERS_FILE`) and its kohya export (:data:`KOHYA_FILE`) into
    ``folder``; returns the file names. ``states`` / ``configs`` map ``"unet"`` / ``"text_encoder"`` (SDXL:
    also ``"text_encoder_2"``) to a peft state dict (see :meth:`LoraSet.peft_state`) and its ``LoraConfig``.
    ``family="sdxl"`` writes with ``StableDiffusionXLPipeline.save_lora_weights`` and kohya's SDXL names."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    comps = ("unet", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ())
    for comp in comps:
        if comp in states:
            kwargs[f"{comp}_lora_layers"] = convert_state_dict_to_diffusers(states[comp])
            kwargs[f"{comp}_lora_adapter_metadata"] = configs[comp].to_dict()
    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipeline.save_lora_weights(str(folder), weight_name=DIFFUSERS_FILE, **kwargs)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
            "scenetok_base_model": str(base_model)}
    if family == "sdxl":
        meta["ss_base_model_version"] = "sdxl_base_v1-0"
    atomic_save_safetensors(to_kohya(states, alpha, family, layers_per_block), folder / KOHYA_FILE, metadata=meta)
    return [DIFFUSERS_FILE, KOHYA_FILE]
