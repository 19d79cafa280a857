"""Resumable checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint holds the trainable state (handle vectors; UNet / text-encoder weights once a phase trains
them), the optimizer state, the random generators and the position in the schedule. Only the latest
checkpoint is kept; it is written to a temporary folder and renamed into place, so a crash while saving
never destroys the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from scenetok import params as paramlib
from scenetok.errors import BundleError, ScenetokError
from scenetok.training.run import Run

CHECKPOINT_DIR = "checkpoint"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, extra in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    out_dir: Path,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    torch_gen: torch.Generator,
    np_rng: np.random.Generator,
    progress: dict,
    run_state: dict | None = None,
) -> Path:
    final = Path(out_dir) / CHECKPOINT_DIR
    tmp = Path(out_dir) / f".{CHECKPOINT_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    opt_meta = None
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file({k: v.contiguous() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
    save_file({"torch_rng": torch_gen.get_state()}, str(tmp / "rng.safetensors"))
    meta = {"progress": progress, "optimizer": opt_meta, "numpy_rng": np_rng.bit_generator.state,
            "run_state": run_state or {}}
    (tmp / "state.json").write_text(json.dumps(meta, default=_json_default))
    old = Path(out_dir) / f".{CHECKPOINT_DIR}.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"cannot store {type(obj)} in a checkpoint")


def has_checkpoint(out_dir: Path) -> bool:
    return (Path(out_dir) / CHECKPOINT_DIR / "state.json").is_file()


def load_checkpoint(out_dir: Path) -> dict:
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not has_checkpoint(out_dir):
        raise BundleError(
            f"no checkpoint to resume from in {out_dir}",
            hint="run without --resume to start a new training run",
        )
    meta = json.loads((folder / "state.json").read_text())
    out = {
        "trainable": load_file(str(folder / "trainable.safetensors")),
        "torch_rng": load_file(str(folder / "rng.safetensors"))["torch_rng"],
        "numpy_rng": meta["numpy_rng"],
        "progress": meta["progress"],
        "run_state": meta.get("run_state") or {},
        "optimizer": None,
    }
    if meta["optimizer"] is not None:
        out["optimizer"] = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), meta["optimizer"])
    return out


def remove_checkpoint(out_dir: Path) -> None:
    folder = Path(out_dir) / CHECKPOINT_DIR
    if folder.exists():
        shutil.rmtree(folder)


# ----------------------------------------------------------------------------------------------------
# what a run's checkpoint holds


def trained_parts(run: Run, upto: int | None = None) -> set[str]:
    """What the phases ``[0, upto]`` (all when None) train; phases with 0 steps are skipped."""
    phases = [p for p in run.method.phases(run.cfg) if p.steps > 0]
    trained: set[str] = set()
    for phase in phases if upto is None else phases[: upto + 1]:
        trained.update(phase.train)
    return trained


def trainable_state(run: Run, phase_idx: int) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: handles, the weights the phases so far have changed, and the masks
    when a method has estimated them."""
    m = run.model
    state = {"handles": run.handles.vectors(m.text_encoder).detach().clone()}
    if m.text_encoder_2 is not None:
        state["handles_2"] = run.handles.vectors(m.text_encoder_2).detach().clone()
    trained = trained_parts(run, phase_idx)
    if run.lora is not None:  # adapters only (the base weights never change)
        state.update({f"lora.{k}": v for k, v in run.lora.state().items()})
        trained = trained & {"handles"}
    if "unet" in trained:
        state.update({f"unet.{k}": v for k, v in m.unet.state_dict().items()})
    else:
        state.update({f"unet_partial.{k}": v for k, v in paramlib.partial_state(m.unet, trained).items()})
    if "text_encoder" in trained:
        for comp, _, te in m.text_encoders:
            state.update({f"{comp}.{k}": v for k, v in te.state_dict().items() if "token_embedding" not in k})
    if run.masks_estimated:
        state.update({f"masks.{i}": src.masks[False].detach().cpu() for i, src in enumerate(run.sources)})
    return state


def load_trainable(run: Run, state: dict[str, torch.Tensor]) -> None:
    m = run.model
    with torch.no_grad():
        run.handles.vectors(m.text_encoder).copy_(state["handles"])
        if m.text_encoder_2 is not None:
            run.handles.vectors(m.text_encoder_2).copy_(state["handles_2"])
    unet_sd = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
    if unet_sd:
        m.unet.load_state_dict(unet_sd, strict=True)
    partial = {k[len("unet_partial."):]: v for k, v in state.items() if k.startswith("unet_partial.")}
    if partial:
        paramlib.load_partial_state(m.unet, partial)
    for comp, _, te in m.text_encoders:
        te_sd = {k[len(comp) + 1:]: v for k, v in state.items() if k.startswith(comp + ".")}
        if te_sd:
            missing, unexpected = te.load_state_dict(te_sd, strict=False)
            if unexpected or any("token_embedding" not in k for k in missing):
                raise ScenetokError(f"the checkpoint's {comp.replace('_', ' ')} does not match the base model")
    adapter_state = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
    if run.lora is not None:
        run.lora.load_state(adapter_state)
    elif adapter_state:
        raise ScenetokError("the checkpoint holds LoRA adapters but the run has none")
    masks = {int(k[6:]): v for k, v in state.items() if k.startswith("masks.")}
    for i, mk in masks.items():
        run.sources[i].set_masks(mk)
    run.masks_estimated = run.masks_estimated or bool(masks)


def save_run(run: Run, optimizer, phase_idx: int, step: int, global_step: int) -> None:
    save_checkpoint(
        run.out_dir,
        trainable=trainable_state(run, phase_idx),
        optimizer=optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        torch_gen=run.torch_gen,
        np_rng=run.np_rng,
        progress={"phase": phase_idx, "step": step, "global": global_step},
        run_state=run.state,
    )
