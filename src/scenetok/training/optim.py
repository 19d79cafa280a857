"""What trains in a phase, and its optimizer (AdamW, fused where it applies; 8-bit with bitsandbytes), stepped
after the backward pass or, with ``optim.step_in_backward``, inside it (:class:`StepInBackward`)."""

from __future__ import annotations

import functools
from typing import Callable

import torch

from scenetok import params as paramlib
from scenetok.errors import ConfigError
from scenetok.methods import Phase
from scenetok.training.run import Run


def setup_phase(run: Run, phase: Phase) -> torch.optim.Optimizer:
    """Freeze everything, unfreeze what ``phase`` trains, and build its optimizer."""
    m, cfg = run.model, run.cfg
    m.unet.requires_grad_(False)
    encoders = [te for _, _, te in m.text_encoders]  # SDXL: both, each with its own handle rows
    for te in encoders:
        te.requires_grad_(False)
    vectors = [run.handles.vectors(te) for te in encoders]
    for v in vectors:
        v.requires_grad_(False)
    params, handle_params = [], []
    if "handles" in phase.train:
        for v in vectors:
            v.requires_grad_(True)
            handle_params.append(v)
    # with LoRA (adapter.type=lora) the weight groups train through their adapters only
    adapters = run.lora.parameters(phase.train) if run.lora is not None else []
    for p in adapters:
        p.requires_grad_(True)
    if run.lora is None and "unet" in phase.train:
        m.unet.requires_grad_(True)
        params += [p for p in m.unet.parameters()]
    elif run.lora is None:
        partial = list(paramlib.partial_parameters(m.unet, phase.train).values())
        for p in partial:
            p.requires_grad_(True)
        params += partial
    if "text_encoder" in phase.train and run.lora is None:
        for te, vec in zip(encoders, vectors):  # the text_encoder group is every text encoder (SDXL: both)
            te.requires_grad_(True)
            base = run.handles.module(te).base.weight
            base.requires_grad_(False)  # the vocabulary never changes
            params += [p for p in te.parameters() if p is not vec and p is not base]
    m.unet.train("unet" in phase.train)
    for te in encoders:
        te.train("text_encoder" in phase.train)
    o = cfg["optim"]
    kwargs = dict(lr=phase.lr, betas=(o["beta1"], o["beta2"]), weight_decay=o["weight_decay"], eps=o["eps"])
    # the handles are their own group when they learn at another rate than the weights beside them
    scale = float(o.get("handles_lr_scale", 1.0))
    if handle_params and params and scale != 1.0:
        groups = [{"params": handle_params, "lr": phase.lr * scale}, {"params": params}]
    else:
        groups = [{"params": handle_params + params}] if handle_params or params else []
    params = handle_params + params
    if adapters:  # LoRA weights learn at their own rate (adapter.lr); the handles keep the phase's
        groups.append({"params": adapters, "lr": cfg["adapter"]["lr"]})
    if o["use_8bit"]:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim.use_8bit needs bitsandbytes", hint="pip install bitsandbytes") from None
        make = functools.partial(bnb.optim.AdamW8bit, **kwargs)
    else:
        make = functools.partial(adamw, fused=bool(o["fused"]), **kwargs)
    run.trainable = params + adapters
    if steps_in_backward(run, phase):
        return StepInBackward(groups, make, clip=float(o["grad_clip"]))
    return run.accelerator.prepare_optimizer(make(groups), device_placement=False)


def steps_in_backward(run: Run, phase: Phase) -> bool:
    """Whether ``phase`` steps its weights inside the backward pass: ``optim.step_in_backward`` is on and the
    phase trains UNet or text-encoder weights themselves (not LoRA adapters). A phase that trains only the
    handles (or adapters) keeps the ordinary step: its gradients are a few kilobytes to megabytes, there is
    nothing to save, and its clipping stays the global one."""
    weights = ("unet", "text_encoder", *paramlib.PARTIAL_GROUPS)
    return bool(run.cfg["optim"].get("step_in_backward")) and run.lora is None and any(
        g in phase.train for g in weights)


def release(optimizer) -> None:
    """End a phase's optimizer: a :class:`StepInBackward` removes its gradient hooks (others need nothing)."""
    if isinstance(optimizer, StepInBackward):
        optimizer.close()


class StepInBackward:
    """The optimizer of a phase with ``optim.step_in_backward``: one optimizer per trained tensor, stepped by
    that tensor's post-accumulate-grad hook as soon as the backward pass has completed its gradient, which is
    then freed (PyTorch's "optimizer step in backward" pattern). At most a few gradients exist at any time
    instead of one per trained weight.

    ``groups`` are torch-style parameter groups (``{"params": [...], "lr": ...}``), ``make`` builds an
    optimizer from such a list (AdamW, fused where it applies, or 8-bit AdamW); each tensor gets
    ``make([{"params": [p], **its group's options}])``. Per tensor the update is exactly the one the same
    optimizer over all tensors makes (AdamW's update is elementwise, its step count per tensor).

    ``clip`` > 0 clips each tensor's gradient by *its own* norm, with the formula of
    ``torch.nn.utils.clip_grad_norm_`` (scale by ``clip / (norm + 1e-6)`` where that is below 1): the
    global norm over all tensors does not exist yet when the first tensor is stepped. Where the global clip
    would not scale (global norm + 1e-6 <= clip) neither does this one, since no tensor's norm exceeds the
    global norm; where it would, only the tensors whose own norm exceeds ``clip`` are scaled, each to ``clip``.

    For the trainer and checkpoints it looks like one optimizer over ``groups``: ``param_groups`` (changing an
    option there, e.g. ``lr``, reaches every tensor's optimizer at its next step), ``state_dict()`` /
    ``load_state_dict()`` in the layout of a single torch optimizer over the same groups, ``step()`` (ends
    the step: the updates were applied in the backward pass) and ``zero_grad()``. :meth:`close` removes the
    hooks; the trainer calls it when the phase ends.
    """

    def __init__(self, groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer], clip: float = 0.0):
        self.clip = float(clip)
        self.param_groups: list[dict] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._group_of: list[int] = []
        self._stepped: set[int] = set()
        self._hooks = []
        try:
            for gi, group in enumerate(groups):
                options = {k: v for k, v in group.items() if k != "params"}
                params = list(group["params"])
                for p in params:
                    index = len(self._optimizers)
                    self._optimizers.append(make([{"params": [p], **options}]))
                    self._group_of.append(gi)
                    self._hooks.append(p.register_post_accumulate_grad_hook(functools.partial(self._step, index)))
                if params:  # the options as the optimizer filled them in (betas, eps, fused …)
                    options = {k: v for k, v in self._optimizers[-1].param_groups[0].items() if k != "params"}
                self.param_groups.append({"params": params, **options})
        except BaseException:
            self.close()
            raise

    def _step(self, index: int, p: torch.Tensor) -> None:
        if index in self._stepped:
            raise RuntimeError("optim.step_in_backward: a trained tensor received its gradient twice in one backward "
                               "pass (reentrant gradient checkpointing?), so its gradient was not complete when it "
                               "was stepped; train with --set optim.step_in_backward=false")
        self._stepped.add(index)
        opt = self._optimizers[index]
        inner = opt.param_groups[0]
        for key, value in self.param_groups[self._group_of[index]].items():
            if key != "params":
                inner[key] = value
        if self.clip > 0:
            grad = p.grad
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            grad.mul_(torch.clamp(self.clip / (norm + 1e-6), max=1.0).to(grad.dtype))
        opt.step()
        p.grad = None

    def step(self) -> None:
        """End the optimizer step of one batch. The updates were applied in the backward pass, each tensor's
        as its gradient was complete; a tensor that got no gradient was not stepped (as in AdamW)."""
        self._stepped.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The hooks free each gradient after its step; this only drops one left from elsewhere."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self) -> dict:
        """Every tensor's optimizer state in the layout of one torch optimizer over the same groups: state
        keyed by the tensor's index across the groups, groups listing those indices."""
        state: dict[int, dict] = {}
        groups = []
        index = 0
        for group in self.param_groups:
            ids = []
            for _ in group["params"]:
                inner = self._optimizers[index].state_dict()["state"]
                if 0 in inner:
                    state[index] = inner[0]
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (of this or of one torch optimizer over the same groups)."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)):
            raise ValueError("the saved optimizer state has other parameter groups than this phase's optimizer")
        index = 0
        for group, saved_group in zip(self.param_groups, saved):
            options = {k: v for k, v in saved_group.items() if k != "params"}
            for pid in saved_group["params"]:
                state = state_dict["state"].get(pid, state_dict["state"].get(str(pid)))
                self._optimizers[index].load_state_dict(
                    {"state": {0: state} if state is not None else {}, "param_groups": [{**options, "params": [0]}]})
                index += 1
            group.update(options)

    def close(self) -> None:
        """Remove the hooks: the tensors are stepped by this optimizer no more."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def adamw(groups, *, fused: bool = True, **kwargs):
    """``torch.optim.AdamW``, with PyTorch's fused kernel where it applies (floating-point parameters on
    CPU or CUDA). On CPU the default multi-tensor path costs ~0.5 s per 100 M parameters per step, the fused
    one ~0.06 s (measured, 2 cores): most of a full fine-tuning step of an SD-sized UNet at 256 px.
    ``fused=False`` (``--set optim.fused=false``) keeps the multi-tensor path."""
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if fused and params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass  # a torch build or parameter the fused kernel does not support
    return torch.optim.AdamW(groups, **kwargs)
