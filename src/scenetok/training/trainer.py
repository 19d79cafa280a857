"""The one training loop. Every method runs through :func:`train`.

Read top to bottom: load the base model → add handles → encode the training images once per flip state
(:mod:`scenetok.training.data`) → let the method prepare (e.g. estimate masks) → for each phase of the
method: choose what trains (:mod:`scenetok.params`), build the optimizer, and step: pick a
training image, the concepts and prompt of each batch element, noise the cached latents, run the UNet with
attention capture only where a loss reads maps, sum the method's loss terms (+ prior preservation), step,
let the method react (``after_step``), log, preview, checkpoint. At the end the bundle is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from scenetok import params as paramlib
from scenetok.attention import capture_attention
from scenetok.config import default_model
from scenetok.bundle import read_bundle
from scenetok.errors import ConfigError, ScenetokError
from scenetok.io import atomic_write_text
from scenetok.losses import min_snr_weights
from scenetok.methods import Method, Outputs, Phase, get_method
from scenetok.model import Model
from scenetok.scene import Scene
from scenetok.tokens import HandleEmbedding
from scenetok.training import checkpoint as ckpt
from scenetok.training.batch import make_batch
from scenetok.training.export import write_run_bundle
from scenetok.training.optim import StepInBackward, release, setup_phase
from scenetok.training.previews import write_preview
from scenetok.training.run import Run, setup_run
from scenetok.training.rundir import checkpoint_step, finish_run, resume_run, resume_threads, start_run
from scenetok.training.settings import method_config
from scenetok.training.signals import deferred_interrupts


class TrainingInterrupted(ScenetokError):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved (or the last one kept)."""


class TrainingDiverged(ScenetokError):
    """The loss became NaN or infinite: the run stops before the bad update is applied."""


def train(
    scene: Scene | list[Scene],
    out_dir: str | Path,
    *,
    method: str | Method = "break-a-scene",
    model: str | Model | None = None,
    cfg: dict | None = None,
    overrides=(),
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    on_preview: Callable[[int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
):
    """Train handles for ``scene`` with ``method`` on ``model`` and write a bundle to ``out_dir``.

    ``scene`` may be a list of scenes (e.g. a subject from one photo, a background from another): their
    concepts get handles in order. Returns the :class:`scenetok.bundle.Bundle`. ``model`` defaults to
    the shipped toy model; ``cfg`` may be partial (it is merged over the method's defaults, then
    ``overrides``).

    The run works in ``<out_dir>.partial`` (:mod:`scenetok.training.rundir`) and swaps the finished bundle
    into ``out_dir`` at the end, so an existing bundle there (replaced only with ``overwrite``) survives
    any failure. Ctrl-C or SIGTERM stops the run after the current step with a checkpoint; with
    ``resume=True`` the run continues from the last checkpoint and ends with the same weights, bit for
    bit, as an uninterrupted run. ``should_stop`` (e.g. ``threading.Event().is_set``, from a web app's
    worker thread, where no signal handler can be installed) is asked after each step: when it returns
    true the run stops exactly as on Ctrl-C.
    """
    method = get_method(method) if isinstance(method, str) else method
    out_dir = Path(out_dir)
    scenes = list(scene) if isinstance(scene, (list, tuple)) else [scene]
    if not scenes or not all(isinstance(s, Scene) for s in scenes):
        raise ScenetokError("train() needs a Scene or a list of Scenes", hint="load one with scenetok.scene.load_scene")
    if not any(s.concepts for s in scenes):
        raise ScenetokError(f"the scene has no concepts to learn ({scenes[0].source})",
                            hint="give masks (mask0.png …) or name the concepts (--concepts \"cat, dog\")")
    if method.needs_masks and not all(s.masks_known for s in scenes):
        raise ScenetokError(f"{method.name} needs a mask per concept and {scenes[0].source} has concepts named "
                            "by words only", hint="give masks (mask0.png …, or scenetok masks), or pick a mask-free "
                            "method such as em-masks or disendiff")
    if resume:
        run_path, cfg = resume_run(out_dir, method.name)
        threads = resume_threads(run_path)
        if threads and threads != torch.get_num_threads():  # the same bits as the uninterrupted run
            torch.set_num_threads(threads)
    else:
        if cfg is not None and not isinstance(cfg, dict):
            raise ConfigError(f"cfg must be a dict of settings, got {type(cfg).__name__}")
        if isinstance(overrides, str):
            overrides = [overrides]
        cfg = method_config(method, cfg, overrides)
        inputs = [s.source for s in scenes if s.source and not s.source.startswith("<")]
        run_path = start_run(out_dir, method.name, cfg, overwrite=overwrite, inputs=inputs)

    if model is None:
        model = default_model()
        if model is None:
            raise ScenetokError("no base model given and no shipped toy model in this installation",
                                hint="pass model= (a Hub id or a local diffusers folder)")
    run = setup_run(scenes, method, cfg, model, run_path, device, progress)
    phases = [p for p in method.phases(cfg) if p.steps > 0]
    total = sum(p.steps for p in phases)
    start = {"phase": 0, "step": 0, "global": 0}
    state = None
    if resume:
        state = ckpt.load_checkpoint(run_path)
        start = state["progress"]
        run.torch_gen.set_state(state["torch_rng"])
        run.np_rng.bit_generator.state = state["numpy_rng"]
        ckpt.load_trainable(run, state["trainable"])
        run.state = state.get("run_state") or {}
        log_path = run_path / "train_log.jsonl"
        if log_path.exists():  # keep only the rows up to the checkpoint
            rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
            run.log_rows = [r for r in rows if r.get("global_step", 0) <= start["global"]]
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in run.log_rows))

    if run.init_fit and not resume:  # which handles started from a fitted vector, and how well it reads as the word
        run.log({"event": True, "global_step": 0, "init_fit": run.init_fit})
    method.prepare(run)
    bar = _progress_bar(total, start["global"], progress)
    capture = _capture_context(run)
    sot = (paramlib.detach_start_token_kv(run.model.unet) if cfg["detach_start_token_kv"]
           else contextlib.nullcontext())
    previews = cfg["preview_every"] > 0  # 0: no previews at all (not even the first and the last)
    every_s = float(cfg.get("checkpoint_minutes") or 0) * 60
    last_ckpt = time.monotonic()
    hint = f"continue with the same command and --resume (the checkpoint is in {run_path})"
    global_step = start["global"]
    optimizer = None
    try:
        with capture as store, sot, deferred_interrupts() as stop:
            for pi, phase in enumerate(phases):
                if pi < start["phase"]:
                    continue
                first_step = start["step"] if pi == start["phase"] else 0
                optimizer = setup_phase(run, phase)
                base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a checkpoint's (decayed) ones
                if state is not None and pi == start["phase"] and state["optimizer"] is not None and first_step > 0:
                    optimizer.load_state_dict(state["optimizer"])
                global_step = sum(p.steps for p in phases[:pi]) + first_step
                if global_step == 0 and previews:
                    write_preview(run, 0, on_preview)
                for step in range(first_step, phase.steps):
                    factor = lr_factor(cfg["optim"], step, phase.steps)
                    for g, lr in zip(optimizer.param_groups, base_lrs):
                        g["lr"] = lr * factor
                    terms = _train_step(run, phase, optimizer, store, global_step + 1)
                    global_step += 1
                    row = {"global_step": global_step, "phase": phase.name, "step": step + 1, "lr": phase.lr * factor}
                    row.update({k: float(v) for k, v in terms.items()})
                    run.log(row)
                    event = method.after_step(run, global_step)
                    if event:
                        run.log({"global_step": global_step, "event": True, **event})
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()}, refresh=False)
                    if should_stop is not None and not stop and should_stop():
                        stop.request("a cancel request")
                    if global_step == total:
                        continue
                    if previews and global_step % cfg["preview_every"] == 0:
                        write_preview(run, global_step, on_preview)
                    due = ((cfg["checkpoint_every"] and global_step % cfg["checkpoint_every"] == 0)
                           or (every_s and time.monotonic() - last_ckpt >= every_s) or stop)
                    if due:
                        if step + 1 == phase.steps:
                            ckpt.save_run(run, None, pi + 1, 0, global_step)
                        else:
                            ckpt.save_run(run, optimizer, pi, step + 1, global_step)
                        last_ckpt = time.monotonic()
                    if stop:
                        raise TrainingInterrupted(f"training stopped by {stop.name} after step {global_step}/{total}; "
                                                  f"checkpoint saved in {run_path}", hint=hint)
                release(optimizer)
                optimizer = None
            if previews:
                write_preview(run, total, on_preview)
    except KeyboardInterrupt:  # Ctrl-C pressed twice, or raised outside a step: keep the last checkpoint
        saved = checkpoint_step(run_path)
        where = f"the checkpoint of step {saved} is kept in {run_path}" if saved is not None else \
            "no checkpoint had been written yet"
        raise TrainingInterrupted(f"training stopped at once at step {global_step}/{total}; {where}",
                                  hint=hint if saved is not None else "start it again without --resume") from None
    finally:
        release(optimizer)  # a step-in-backward optimizer unhooks its tensors (also when the run stops early)
        bar.close()
    write_run_bundle(run)
    finish_run(run_path, out_dir)
    return read_bundle(out_dir)


def lr_factor(optim_cfg: dict, step: int, steps: int) -> float:
    """The learning-rate multiplier of a phase's ``step`` (0-based) of ``steps``: 1 throughout for
    ``optim.lr_schedule=constant`` (the papers); ``linear`` / ``cosine`` go from 1 at the first step to
    ``optim.lr_final`` at the last."""
    kind = optim_cfg.get("lr_schedule", "constant")
    if kind == "constant" or steps <= 1:
        return 1.0
    final = float(optim_cfg.get("lr_final", 0.0))
    x = step / (steps - 1)
    shape = (1.0 - x) if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * x))
    return final + (1.0 - final) * shape


def _capture_context(run: Run):
    if not run.attention_layers:
        return contextlib.nullcontext(None)
    return capture_attention(run.model.unet, run.attention_layers)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------
# one step


def _snr_weighted(scheduler, t: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, gamma: float):
    """``pred`` and ``target`` with each row scaled by the square root of its min-SNR-γ weight, so every
    method's squared-error diffusion term (masked, region, prior) becomes the weighted one without knowing
    of it; unchanged when ``gamma`` is 0. The attention terms read the attention maps and are untouched."""
    if not gamma:
        return pred, target
    acp = scheduler.alphas_cumprod.to(t.device)[t]
    w = min_snr_weights(acp, float(gamma), scheduler.config.prediction_type).sqrt()
    w = w.to(pred.device, pred.dtype).view(-1, *([1] * (pred.dim() - 1)))
    return pred * w, target * w


def timestep_bounds(cfg: dict, total: int) -> tuple[int, int]:
    """``(low, high)`` for ``torch.randint``: the timesteps ``timestep_min`` … ``timestep_max`` allow (at least one)."""
    low = min(int(round(cfg.get("timestep_min", 0.0) * total)), total - 1)
    high = max(int(round(cfg.get("timestep_max", 1.0) * total)), low + 1)
    return low, high


def _train_step(run: Run, phase: Phase, optimizer, store, global_step: int) -> dict[str, torch.Tensor]:
    m, cfg, acc = run.model, run.cfg, run.accelerator
    sums: dict[str, float] = {}
    for _ in range(cfg["grad_accum"]):
        batch, latents, ids = make_batch(run, cfg)
        noise = torch.randn(latents.shape, generator=run.torch_gen).to(run.device)
        t = torch.randint(*timestep_bounds(cfg, m.scheduler.config.num_train_timesteps), (latents.shape[0],),
                          generator=run.torch_gen)
        t = t.to(run.device)
        batch.timesteps = t
        noisy = m.scheduler.add_noise(latents, noise, t)
        if m.scheduler.config.prediction_type == "v_prediction":
            target = m.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        if store is not None:
            store.reset()
        with acc.autocast():
            pred = m.predict(noisy, t, m.encode_prompt(ids))
        pred, target = _snr_weighted(m.scheduler, t, pred.float(), target.float(), cfg.get("snr_gamma", 0.0))
        out = Outputs(pred=pred, target=target, store=store, attention_size=run.attention_size,
                      attention_sizes=tuple(run.attention_sizes))
        terms = run.method.losses(batch, out, cfg)
        if batch.n_instance < pred.shape[0] and "prior" not in terms:  # a method may weigh its prior rows itself
            n = batch.n_instance
            terms["prior"] = cfg["prior"]["weight"] * F.mse_loss(out.pred[n:], out.target[n:])
        loss = sum(terms.values())
        if not torch.isfinite(loss.detach()):
            bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
            saved = checkpoint_step(run.out_dir)
            raise TrainingDiverged(
                f"the loss is not finite at step {global_step} ({phase.name}, lr={phase.lr:g}: {bad}); training "
                "stopped" + (f", the checkpoint of step {saved} is kept in {run.out_dir}" if saved is not None else ""),
                hint=f"lower the learning rate (--set {phase.name}.lr=...) or the loss weights, or try "
                     "--mixed-precision no")
        acc.backward(loss / cfg["grad_accum"])
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg["grad_accum"]
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / cfg["grad_accum"]
    if cfg["optim"]["grad_clip"] > 0 and not isinstance(optimizer, StepInBackward):
        acc.clip_grad_norm_(run.trainable, cfg["optim"]["grad_clip"])
    optimizer.step()  # a StepInBackward optimizer stepped (and clipped) each tensor in the backward pass
    optimizer.zero_grad(set_to_none=True)
    cap = cfg["optim"].get("handle_norm_cap", 0.0)
    if cap > 0:
        for _, _, te in m.text_encoders:
            emb = te.get_input_embeddings()
            if isinstance(emb, HandleEmbedding):
                emb.cap_norms(cap)
    return sums
