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
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from scenetok import params as paramlib
from scenetok.attention import capture_attention
from scenetok.bundle import check_output_dir
from scenetok.errors import ConfigError, ScenetokError
from scenetok.io import atomic_write_text
from scenetok.methods import Method, Outputs, Phase, get_method
from scenetok.model import Model
from scenetok.scene import Scene
from scenetok.training import checkpoint as ckpt
from scenetok.training.batch import make_batch
from scenetok.training.export import clear_run_dir, write_run_bundle
from scenetok.training.optim import setup_phase
from scenetok.training.previews import write_preview
from scenetok.training.run import Run, setup_run
from scenetok.training.settings import method_config


class TrainingInterrupted(ScenetokError):
    """Ctrl-C during training: a checkpoint was saved."""


def train(
    scene: Scene | list[Scene],
    out_dir: str | Path,
    *,
    method: str | Method = "break-a-scene",
    model: str | Model,
    cfg: dict | None = None,
    overrides=(),
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    on_preview: Callable[[int, dict], None] | None = None,
):
    """Train handles for ``scene`` with ``method`` on ``model`` and write a bundle to ``out_dir``.

    ``scene`` may be a list of scenes (e.g. a subject from one photo, a background from another): their
    concepts get handles in order. Returns the :class:`scenetok.bundle.Bundle`. With ``resume=True`` the
    run continues from the checkpoint in ``out_dir`` and ends with the same weights as an uninterrupted
    run.
    """
    method = get_method(method) if isinstance(method, str) else method
    cfg = method_config(method, None, overrides) if cfg is None else cfg
    out_dir = Path(out_dir)
    if resume:
        if not ckpt.has_checkpoint(out_dir):
            raise ScenetokError(f"--resume: {out_dir} holds no checkpoint", hint="start without --resume")
        saved_cfg = json.loads((out_dir / "run_config.json").read_text())
        if saved_cfg["method"] != method.name:
            raise ConfigError(f"--resume: {out_dir} was trained with {saved_cfg['method']}, not {method.name}")
        cfg = saved_cfg["config"]
    else:
        check_output_dir(out_dir, overwrite=overwrite)
        if out_dir.exists() and overwrite:
            clear_run_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            out_dir / "run_config.json", json.dumps({"method": method.name, "config": cfg}, indent=2)
        )
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

    run = setup_run(scenes, method, cfg, model, out_dir, device, progress)
    phases = [p for p in method.phases(cfg) if p.steps > 0]
    total = sum(p.steps for p in phases)
    start = {"phase": 0, "step": 0, "global": 0}
    state = None
    if resume:
        state = ckpt.load_checkpoint(out_dir)
        start = state["progress"]
        run.torch_gen.set_state(state["torch_rng"])
        run.np_rng.bit_generator.state = state["numpy_rng"]
        ckpt.load_trainable(run, state["trainable"])
        run.state = state.get("run_state") or {}
        log_path = out_dir / "train_log.jsonl"
        if log_path.exists():  # keep only the rows up to the checkpoint
            rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
            run.log_rows = [r for r in rows if r.get("global_step", 0) <= start["global"]]
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in run.log_rows))

    method.prepare(run)
    bar = _progress_bar(total, start["global"], progress)
    capture = _capture_context(run)
    sot = (paramlib.detach_start_token_kv(run.model.unet) if cfg["detach_start_token_kv"]
           else contextlib.nullcontext())
    previews = cfg["preview_every"] > 0  # 0: no previews at all (not even the first and the last)
    try:
        with capture as store, sot:
            for pi, phase in enumerate(phases):
                if pi < start["phase"]:
                    continue
                first_step = start["step"] if pi == start["phase"] else 0
                optimizer = setup_phase(run, phase)
                if state is not None and pi == start["phase"] and state["optimizer"] is not None and first_step > 0:
                    optimizer.load_state_dict(state["optimizer"])
                global_step = sum(p.steps for p in phases[:pi]) + first_step
                if global_step == 0 and previews:
                    write_preview(run, 0, on_preview)
                for step in range(first_step, phase.steps):
                    rng_before = (run.torch_gen.get_state(), run.np_rng.bit_generator.state)
                    try:
                        terms = _train_step(run, phase, optimizer, store)
                    except KeyboardInterrupt:
                        # drop the unfinished step: rewind the random streams so --resume redoes it exactly
                        run.torch_gen.set_state(rng_before[0])
                        run.np_rng.bit_generator.state = rng_before[1]
                        optimizer.zero_grad(set_to_none=True)
                        ckpt.save_run(run, optimizer, pi, step, global_step)
                        raise TrainingInterrupted(
                            f"training interrupted at step {global_step}/{total}; checkpoint saved in {out_dir}",
                            hint=f"continue with: scenetok extract ... -o {out_dir} --resume",
                        ) from None
                    global_step += 1
                    row = {"global_step": global_step, "phase": phase.name, "step": step + 1, "lr": phase.lr}
                    row.update({k: float(v) for k, v in terms.items()})
                    run.log(row)
                    event = method.after_step(run, global_step)
                    if event:
                        run.log({"global_step": global_step, "event": True, **event})
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()}, refresh=False)
                    done_phase = step + 1 == phase.steps
                    if previews and global_step % cfg["preview_every"] == 0 and global_step != total:
                        write_preview(run, global_step, on_preview)
                    if cfg["checkpoint_every"] and global_step % cfg["checkpoint_every"] == 0 and global_step != total:
                        if done_phase:
                            ckpt.save_run(run, None, pi + 1, 0, global_step)
                        else:
                            ckpt.save_run(run, optimizer, pi, step + 1, global_step)
                del optimizer
            if previews:
                write_preview(run, total, on_preview)
    finally:
        bar.close()
    result = write_run_bundle(run)
    ckpt.remove_checkpoint(out_dir)
    return result


def _capture_context(run: Run):
    if not run.attention_layers:
        return contextlib.nullcontext(None)
    return capture_attention(run.model.unet, run.attention_layers)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------
# one step


def _train_step(run: Run, phase: Phase, optimizer, store) -> dict[str, torch.Tensor]:
    m, cfg, acc = run.model, run.cfg, run.accelerator
    sums: dict[str, float] = {}
    for _ in range(cfg["grad_accum"]):
        batch, latents, ids = make_batch(run, cfg)
        noise = torch.randn(latents.shape, generator=run.torch_gen).to(run.device)
        t = torch.randint(0, m.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=run.torch_gen)
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
        out = Outputs(pred=pred.float(), target=target.float(), store=store, attention_size=run.attention_size,
                      attention_sizes=tuple(run.attention_sizes))
        terms = run.method.losses(batch, out, cfg)
        if batch.n_instance < pred.shape[0] and "prior" not in terms:  # a method may weigh its prior rows itself
            n = batch.n_instance
            terms["prior"] = cfg["prior"]["weight"] * F.mse_loss(out.pred[n:], out.target[n:])
        loss = sum(terms.values())
        acc.backward(loss / cfg["grad_accum"])
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg["grad_accum"]
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / cfg["grad_accum"]
    if cfg["optim"]["grad_clip"] > 0:
        acc.clip_grad_norm_(run.trainable, cfg["optim"]["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums
