"""``optim.step_in_backward``: each trained tensor stepped inside the backward pass (no gradient buffer for the
model weights). The optimizer on its own (same updates as one AdamW, per-tensor clipping, state layout), the
settings (refusals, the memory=low preset) and the trainer (same weights as the ordinary step, hooks removed);
resuming is tested with the other resume cases (tests/test_training.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

from scenetok.errors import ConfigError
from scenetok.training.optim import StepInBackward, adamw

SHORT = ["phase1.steps=2", "phase2.steps=3", "checkpoint_every=0", "preview_every=0"]


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.GELU(),
                               torch.nn.Linear(16, 3))


def _loss(net: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, generator=g) * (1 + 20 * (step % 2))  # every other batch large: big gradients
    return (net(x) ** 2).mean()


def _groups(net):
    first, rest = list(net[0].parameters()), [p for m in net[2:] for p in m.parameters()]
    return [{"params": first}, {"params": rest, "lr": 3e-3}]


KW = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


def _step_both(ref, opt, net, sib, step: int, on_ref_grads=None) -> None:
    """One step of the reference optimizer on ``ref`` (``on_ref_grads`` sees its gradients first) and one of
    the step-in-backward optimizer on ``net``, from the same loss."""
    _loss(ref, step).backward()
    if on_ref_grads is not None:
        on_ref_grads()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _loss(net, step).backward()
    sib.step()


@pytest.mark.parametrize("fused", [True, False])
def test_same_updates_as_one_adamw_and_no_gradient_kept(fused):
    ref, net = _net(), _net()
    alive = []

    def count(_p):  # registered first, so it runs before the optimizer's hook of the same tensor
        alive.append(sum(q.grad is not None for q in net.parameters()))

    extra = [p.register_post_accumulate_grad_hook(count) for p in net.parameters()]
    opt = adamw(_groups(ref), fused=fused, **KW)
    sib = StepInBackward(_groups(net), lambda g: adamw(g, fused=fused, **KW))
    try:
        for step in range(4):
            _step_both(ref, opt, net, sib, step)
            assert all(p.grad is None for p in net.parameters())
    finally:
        sib.close()
        for h in extra:
            h.remove()
    for a, b in zip(ref.parameters(), net.parameters()):
        assert torch.equal(a, b)  # bit for bit: AdamW's update is elementwise, its step count per tensor
    assert max(alive) <= 2  # a weight's gradient and its bias's, never the whole set
    before = [p.detach().clone() for p in net.parameters()]
    _loss(net, 9).backward()  # closed: the tensors are no longer stepped
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_clipping_is_per_tensor():
    clip = 0.05
    ref, net = _net(), _net()
    opt = adamw(_groups(ref), **KW)
    sib = StepInBackward(_groups(net), lambda g: adamw(g, **KW), clip=clip)
    clipped = []

    def clip_each():  # the reference: clip_grad_norm_ applied to each tensor on its own
        for p in ref.parameters():
            clipped.append(bool(torch.nn.utils.clip_grad_norm_([p], clip) > clip))

    try:
        for step in range(4):
            _step_both(ref, opt, net, sib, step, on_ref_grads=clip_each)
    finally:
        sib.close()
    assert sum(clipped) > 3  # the test does clip
    for a, b in zip(ref.parameters(), net.parameters()):
        # bit for bit: torch's norm of the one norm is that norm (sqrt of a square, correctly rounded)
        assert torch.equal(a, b)


def test_state_dict_has_the_layout_of_one_optimizer():
    ref, net = _net(), _net()
    opt = adamw(_groups(ref), **KW)
    sib = StepInBackward(_groups(net), lambda g: adamw(g, **KW))
    try:
        for step in range(2):
            _step_both(ref, opt, net, sib, step)
        a, b = opt.state_dict(), sib.state_dict()
        assert a["param_groups"] == b["param_groups"]
        assert a["state"].keys() == b["state"].keys()
        for k in a["state"]:
            assert a["state"][k].keys() == b["state"][k].keys()
            assert all(torch.equal(a["state"][k][n], b["state"][k][n]) for n in a["state"][k])
        # a fresh step-in-backward optimizer resumes from either and goes on exactly like the original
        again = _net()
        with torch.no_grad():
            for p, q in zip(again.parameters(), net.parameters()):
                p.copy_(q)
        resumed = StepInBackward(_groups(again), lambda g: adamw(g, **KW))
        try:
            resumed.load_state_dict(copy.deepcopy(a))
            resumed.param_groups[1]["lr"] = sib.param_groups[1]["lr"] = 1e-3  # an option changed on the groups
            for step in range(2, 4):
                _loss(net, step).backward()
                sib.step()
                _loss(again, step).backward()
                resumed.step()
        finally:
            resumed.close()
        assert all(torch.equal(p, q) for p, q in zip(again.parameters(), net.parameters()))
        assert sib._optimizers[-1].param_groups[0]["lr"] == 1e-3
        with pytest.raises(ValueError, match="parameter groups"):
            resumed.load_state_dict({"state": {}, "param_groups": a["param_groups"][:1]})
    finally:
        sib.close()


def test_a_gradient_arriving_twice_in_one_backward_is_refused():
    net = _net()
    sib = StepInBackward([{"params": list(net.parameters())}], lambda g: adamw(g, **KW))
    try:
        _loss(net, 0).backward()
        with pytest.raises(RuntimeError, match="step_in_backward"):
            _loss(net, 1).backward()  # no step() in between: as if a tensor's gradient came in two parts
    finally:
        sib.close()


# ----------------------------------------------------------------------------------------------------
# settings


def _cfg(*overrides):
    from scenetok.methods import get_method
    from scenetok.training.settings import method_config

    return method_config(get_method("break-a-scene"), None, list(overrides))


def test_off_by_default_and_on_with_memory_low():
    assert _cfg()["optim"]["step_in_backward"] is False
    assert _cfg("memory=low")["optim"]["step_in_backward"] is True
    # an explicit setting wins, before or after memory=low (the CLI appends --memory low after --set)
    assert _cfg("optim.step_in_backward=false", "memory=low")["optim"]["step_in_backward"] is False
    assert _cfg("memory=low", "optim.step_in_backward=false")["optim"]["step_in_backward"] is False
    from scenetok.methods import get_method
    from scenetok.training.settings import method_config

    low = method_config(get_method("break-a-scene"), {"memory": "low", "optim": {"step_in_backward": False}})
    assert low["optim"]["step_in_backward"] is False
    # where it cannot work the preset leaves it off instead of refusing the run
    assert _cfg("memory=low", "grad_accum=2")["optim"]["step_in_backward"] is False
    assert _cfg("memory=low", "mixed_precision=fp16")["optim"]["step_in_backward"] is False
    assert _cfg("memory=low", "mixed_precision=bf16")["optim"]["step_in_backward"] is True


@pytest.mark.parametrize("overrides,words", [
    (["optim.step_in_backward=true", "grad_accum=2"], ("optim.step_in_backward", "grad_accum=2")),
    (["optim.step_in_backward=true", "mixed_precision=fp16"], ("optim.step_in_backward", "mixed_precision=fp16")),
    (["memory=low", "optim.step_in_backward=true", "grad_accum=4"], ("optim.step_in_backward", "grad_accum=4")),
])
def test_impossible_combinations_are_refused(overrides, words):
    with pytest.raises(ConfigError) as e:
        _cfg(*overrides)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "optim.step_in_backward=false" in (e.value.hint or "")


def test_memory_low_on_a_gpu_without_bf16_turns_it_off(monkeypatch):
    from scenetok.training.memory import apply_low_memory_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = _cfg("memory=low")
    with pytest.warns(UserWarning, match="optim.step_in_backward is off"):
        apply_low_memory_precision(cfg, torch.device("cuda"))
    assert cfg["mixed_precision"] == "fp16" and cfg["optim"]["step_in_backward"] is False
    cfg = _cfg("memory=low")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_low_memory_precision(cfg, torch.device("cpu"))  # bf16: stays on, no warning
    assert cfg["mixed_precision"] == "bf16" and cfg["optim"]["step_in_backward"] is True
    # a CPU that only emulates bf16: still bf16 (memory is what was asked for), with the speed warning
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    cfg = _cfg("memory=low")
    with pytest.warns(UserWarning, match="no native bf16"):
        apply_low_memory_precision(cfg, torch.device("cpu"))
    assert cfg["mixed_precision"] == "bf16"


@pytest.mark.parametrize("sets,on", [([], True), (["--set", "optim.step_in_backward=false"], False)])
def test_cli_memory_low_turns_it_on_unless_set_off(tiny_sd, tmp_path, sets, on):
    import json

    from conftest import write_scene_folder

    from scenetok.cli import main

    scene = write_scene_folder(tmp_path / "scene")
    out = tmp_path / "bundle"
    assert main(["extract", str(scene), "--model", str(tiny_sd), "-o", str(out), "--quiet", "--memory", "low",
                 "--set", "phase1.steps=1", "--set", "phase2.steps=1", "--set", "preview_every=0", *sets]) == 0
    hyper = json.loads((out / "manifest.json").read_text())["hyperparameters"]
    assert hyper["memory"] == "low" and hyper["optim"]["step_in_backward"] is on


# ----------------------------------------------------------------------------------------------------
# in the trainer


def _weights(out):
    out_ = {}
    for f in sorted(out.rglob("*.safetensors")):
        if "checkpoint" not in f.parts:
            out_.update({f"{f.relative_to(out)}:{k}": v for k, v in load_file(str(f)).items()})
    return out_


@pytest.mark.parametrize("clip", ["0", "1e6"])
def test_two_phase_run_gives_the_same_weights(tiny_sd, two_square_scene, tmp_path, monkeypatch, clip):
    """grad_clip=0: no clipping anywhere. 1e6: the global clip never fires, so neither does the per-tensor one
    (both multiply by exactly 1). Either way every weight and handle row must match bit for bit."""
    from scenetok.training import optim as optim_mod
    from scenetok.training import train

    kinds = []
    real = optim_mod.setup_phase

    def spy(run, phase):
        opt = real(run, phase)
        kinds.append((phase.name, isinstance(opt, StepInBackward)))
        return opt

    monkeypatch.setattr("scenetok.training.trainer.setup_phase", spy)
    sets = SHORT + [f"optim.grad_clip={clip}"]
    train(two_square_scene, tmp_path / "plain", model=str(tiny_sd), overrides=sets, progress=False)
    train(two_square_scene, tmp_path / "sib", model=str(tiny_sd), overrides=sets + ["optim.step_in_backward=true"],
          progress=False)
    # phase 1 (handles only) keeps the ordinary step; phase 2 (UNet + text encoder) steps in the backward pass
    assert kinds == [("phase1", False), ("phase2", False), ("phase1", False), ("phase2", True)]
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "sib")
    assert a.keys() == b.keys() and any("unet" in k for k in a) and any("asset0" in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_hooks_are_removed_when_a_run_stops(tiny_sd, two_square_scene, tmp_path, interrupted_train):
    from scenetok.model import load_model

    model = load_model(tiny_sd)
    interrupted_train(3, two_square_scene, tmp_path / "run", model=model, progress=False,
                      overrides=["phase1.steps=1", "phase2.steps=3", "preview_every=0", "checkpoint_every=1",
                                 "optim.step_in_backward=true"])
    params = [*model.unet.parameters(), *model.text_encoder.parameters()]
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in params)


def test_eight_bit_adamw_gets_one_optimizer_per_tensor(tiny_sd, two_square_scene, tmp_path, monkeypatch):
    """bitsandbytes is not installed here: a stand-in records how its AdamW8bit is built."""
    import sys
    import types

    from scenetok.training import train

    made = []

    class FakeAdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            params = list(params)
            made.append([len(g["params"]) for g in params])
            super().__init__(params, **kwargs)

    bnb = types.ModuleType("bitsandbytes")
    bnb.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    train(two_square_scene, tmp_path / "b", model=str(tiny_sd), progress=False,
          overrides=["phase1.steps=1", "phase2.steps=1", "preview_every=0", "checkpoint_every=0",
                     "optim.use_8bit=true", "optim.step_in_backward=true"])
    assert made[0] == [1]  # phase 1: one optimizer over the handle rows
    assert len(made) > 100 and all(m == [1] for m in made[1:])  # phase 2: one per tensor
