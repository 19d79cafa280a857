"""Train toy-sd from scratch on the procedural toy world, and score it with the toy-world oracle.

Stages (all on CPU in the shipped run):

0. data   render a fixed set of scenes (1–4 objects, 1–2 weighted up, held-out combinations excluded);
1. VAE    reconstruction (L1 + L2) + a small KL term; then the latent std sets ``vae.config.scaling_factor``;
2. UNet + text encoder, jointly, on pre-encoded latents (v-prediction, zero-terminal-SNR betas, 10 %
          caption dropout for classifier-free guidance, AdamW with warm-up and cosine decay, EMA weights).

Everything is drawn from ``seed``. ``--minutes`` caps stage 2 by wall time: the step count is then chosen
from the measured speed and printed, and passing that count as ``--unet-steps`` with ``--minutes 0``
repeats the run. The defaults are the one-command recipe of docs/toy-sd.md (40 000 scenes, min-SNR-γ 5,
bf16 autocast where the device computes bf16 natively, 11 000 UNet steps — a fixed count, so the same
command gives the same model on every machine; about 135 minutes on a 2-core CPU with AVX-512 BF16, about 5
hours on an AVX2-only one, minutes on a GPU; ``--minutes 120`` time-boxes it instead):

    scenetok toyworld train --out DIR            # = python -m scenetok.toyworld.train --out DIR
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

N_OBJECT_WEIGHTS = {1: 0.35, 2: 0.35, 3: 0.18, 4: 0.12}
CAPTION_DROPOUT = 0.1
EVAL_SEED_OFFSET = 1_000_003  # evaluation scenes come from seeds the training data never uses


def _duration(seconds: float) -> str:
    """``seconds`` as "42 min" or "4.4 h" (log lines of a run that may last hours)."""
    minutes = max(0.0, seconds) / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _log(msg: str) -> None:
    print(f"[toy-sd {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- data
def parse_object_weights(text: str) -> dict[int, float]:
    """``"1:0.15,2:0.35,3:0.3,4:0.2"`` → ``{1: 0.15, 2: 0.35, 3: 0.3, 4: 0.2}`` (object count → relative weight
    of scenes with that many objects); a ValueError names what is wrong."""
    out: dict[int, float] = {}
    for part in text.split(","):
        k, sep, w = part.strip().partition(":")
        try:
            k_i, w_f = int(k), float(w)
        except ValueError:
            k_i, w_f = 0, -1.0
        if not sep or not 1 <= k_i <= 4 or not w_f >= 0 or k_i in out:
            raise ValueError(f"object weights {text!r}: each entry is COUNT:WEIGHT with COUNT in 1..4 given once "
                             f"and WEIGHT >= 0, e.g. 1:0.35,2:0.35,3:0.18,4:0.12")
        out[k_i] = w_f
    if sum(out.values()) <= 0:
        raise ValueError(f"object weights {text!r}: at least one weight must be above 0")
    return out


def render_dataset(n: int, seed: int, *, max_seconds: float | None = None, with_masks: bool = False,
                   specs_only: bool = False, object_weights: dict[int, float] | None = None):
    """Render ``n`` training scenes: (uint8 images (n,64,64,3), list of SceneSpec) and, with
    ``with_masks``, the union of each scene's object masks (bool (n,64,64)). ``specs_only``: draw the same
    scenes without rendering them (images and masks are None; a resumed run whose latents are cached).
    ``object_weights`` (object count → weight) replaces :data:`N_OBJECT_WEIGHTS`."""
    from scenetok.toyworld import world

    rng = np.random.default_rng([seed, 1])
    weights = dict(object_weights or N_OBJECT_WEIGHTS)
    ks = np.array(sorted(weights))
    p = np.array([weights[k] for k in ks], dtype=float)
    images, specs, fg = [], [], []
    t0 = time.time()
    for i in range(n):
        k = int(rng.choice(ks, p=p / p.sum()))
        spec = world.sample_scene(rng, n_objects=(k, k), allow_held_out=False)
        specs.append(spec)
        if not specs_only:
            img, masks = world.render(spec, size=64)
            images.append(img)
            fg.append(masks.any(axis=0))
        if max_seconds is not None and time.time() - t0 > max_seconds:
            _log(f"render budget reached after {i + 1} scenes")
            break
        if (i + 1) % 2000 == 0:
            _log(f"rendered {i + 1}/{n} scenes ({time.time() - t0:.0f}s)")
    if specs_only:
        return (None, specs, None) if with_masks else (None, specs)
    if with_masks:
        return np.stack(images), specs, np.stack(fg)
    return np.stack(images), specs


def _weights_key(weights: dict[int, float]) -> str:
    """Object-count weights as the string kept in ``training_info.json`` ("1:0.35,2:0.35,3:0.18,4:0.12")."""
    return ",".join(f"{k}:{weights[k]:g}" for k in sorted(weights))


LATENTS_CACHE = "latents.safetensors"


def _vae_digest(vae) -> str:
    """A fingerprint of the VAE's weights (the cached latents are valid only for the VAE that made them)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cache_matches(path: Path, *, n: int, seed: int, vae_digest: str | None = None) -> bool:
    """Whether ``path`` holds the encoded latents of these ``n`` scenes of ``seed`` (and, when given, of the
    VAE with this digest); a missing, torn or foreign file is simply not a match."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable: encode again
        return False
    return (meta.get("n") == str(n) and meta.get("seed") == str(seed) and "mean_order" in meta
            and "std_order" in meta and (vae_digest is None or meta.get("vae") == vae_digest))


# The encoder's output keeps the memory layout its convolutions chose (on a CPU, channels-last), and the UNet
# steps compute (and round) differently on another layout; so the cache stores each tensor in its memory order
# and gives it back with the very same strides: a resumed run then trains bit for bit like an uninterrupted one.
def _memory_order(t) -> list[int]:
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def _read_latent_cache(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        out = []
        for name in ("mean", "std"):
            order = json.loads(meta[f"{name}_order"])
            out.append(f.get_tensor(name).permute(*np.argsort(order).tolist()))
        return tuple(out)


def _write_latent_cache(path: Path, mean, std, *, n: int, seed: int, vae_digest: str) -> None:
    from safetensors.torch import save_file

    tmp = path.parent / f".{path.name}.tmp"
    orders = {name: _memory_order(t) for name, t in (("mean", mean), ("std", std))}
    save_file({"mean": mean.permute(*orders["mean"]).contiguous(), "std": std.permute(*orders["std"]).contiguous()},
              str(tmp), metadata={"n": str(n), "seed": str(seed), "vae": vae_digest,
                                  **{f"{k}_order": json.dumps(v) for k, v in orders.items()}})
    os.replace(tmp, path)


def train_vae(vae, images: np.ndarray, fg: np.ndarray, *, steps: int, batch_size: int, lr: float, crop: int,
              fg_weight: float, rng: np.random.Generator, gen, device: str = "cpu", log_every: int = 100,
              minutes: float | None = None) -> int:
    """Stage 1: reconstruction (object-weighted L1 + L2) + a small KL term, on random ``crop``-pixel crops
    (the VAE is fully convolutional; crops make each step cheaper and every crop position a sample).

    Objects cover a small part of each image, so a plain loss lets the VAE trade object colours for
    background accuracy (seen: red decoded as orange, green as grey); object pixels therefore weigh
    ``1 + fg_weight``. Returns the number of steps run."""
    import torch
    import torch.nn.functional as F

    n, size = images.shape[0], images.shape[1]
    crop = min(int(crop), size)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    total_ref = [steps]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(100, max(1, steps // 10)), total_ref))
    vae.train()
    t0 = time.time()
    step = 0
    while step < total_ref[0]:
        idx = rng.integers(0, n, batch_size)
        oy, ox = (int(v) * 4 for v in rng.integers(0, (size - crop) // 4 + 1, 2))
        x = _to_tensor(images[idx, oy:oy + crop, ox:ox + crop]).to(device)
        w = 1.0 + fg_weight * torch.from_numpy(fg[idx, oy:oy + crop, ox:ox + crop]).float()[:, None].to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen) if device == "cpu" else post.sample()).sample
        l1 = ((rec - x).abs() * w).sum() / (w.sum() * 3)
        l2 = F.mse_loss(rec, x)
        kl = post.kl().mean() / (post.mean[0].numel())
        loss = l1 + l2 + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if minutes and step % 25 == 0:  # re-plan the step count from the measured speed
            total_ref[0] = _replan(step, steps, t0, minutes)
        if step % log_every == 0 or step == total_ref[0]:
            _log(f"vae step {step}/{total_ref[0]} weighted-l1={l1.item():.4f} l2={l2.item():.4f} kl={kl.item():.3f}")
    vae.eval()
    return step


def _to_tensor(images: np.ndarray):
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


# -------------------------------------------------------------------------------------------- helpers
def _lr_lambda(warmup: int, total_ref: list[int], floor: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        total = max(total_ref[0], warmup + 1)
        prog = min(1.0, (step - warmup) / (total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def _replan(step: int, max_steps: int, t0: float, minutes: float) -> int:
    """Steps that fit in ``minutes`` since ``t0`` at the speed measured so far (the machine is shared, so
    the plan is revised as the speed changes); never more than ``max_steps``, never fewer than ``step``."""
    elapsed = time.time() - t0
    rate = elapsed / step
    return max(step, min(max_steps, step + int((minutes * 60 - elapsed) / rate)))


class _StopRequest:
    """While open (main thread only), the first SIGINT or SIGTERM only asks the UNet loop to stop: the loop ends
    the step it is in, writes the resumable state, and then :meth:`reraise` raises what the signal would have
    (``KeyboardInterrupt``, or ``SystemExit(128 + signum)``). A second signal stops at once."""

    def __init__(self):
        import signal
        import threading

        self.signum: int | None = None
        self._old: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.close()
            raise KeyboardInterrupt
        self.signum = signum
        _log("stop requested: finishing this step and writing the training state (press Ctrl-C again to stop at "
             "once, without it)")

    def close(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def reraise(self):
        import signal

        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(self.signum))


class _EMA:
    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    def update(self, step: int):
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    def swap(self):
        import torch

        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                tmp = p.detach().clone()
                p.copy_(s)
                s.copy_(tmp)


def save_pipeline(pipe, out_dir: str | Path, *, extra_info: dict | None = None) -> Path:
    """Save ``pipe`` as a diffusers folder (safetensors), atomically (temp dir, then rename).

    The UNet is stored in fp16 (diffusers loads it back as fp32); the VAE and the text encoder stay fp32
    (transformers would otherwise load the text encoder as fp16).
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    dtypes = {}
    for name in ("unet",):
        mod = getattr(pipe, name)
        dtypes[name] = next(mod.parameters()).dtype
        mod.to(torch.float16)
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    finally:
        for name, dt in dtypes.items():
            getattr(pipe, name).to(dt)
    keep = {}
    if out_dir.exists():  # keep hand-written files (model card) across re-saves
        for f in ("README.md",):
            if (out_dir / f).exists():
                keep[f] = (out_dir / f).read_bytes()
    if extra_info:
        (tmp / "training_info.json").write_text(json.dumps(extra_info, indent=2))
    for f, b in keep.items():
        (tmp / f).write_bytes(b)
    for f in tmp.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


# ---------------------------------------------------------------------------------------------- train
def remap_token_embeddings(weight, src_tokenizer, tokenizer):
    """The token embedding table of ``src_tokenizer``'s text encoder, re-indexed for ``tokenizer``.

    A row whose token string the source's BPE produces is copied by that string (ids differ between the two
    vocabularies); a whole word that the source cut into pieces (its own row there was never trained) starts from
    the mean of the pieces' rows; any other token keeps the source's row of the same string, or the mean row.
    Returns the new table and the words that were cut in the source."""
    import torch

    src_vocab = src_tokenizer.get_vocab()
    table = weight.mean(0, keepdim=True).repeat(len(tokenizer), 1)
    split: list[str] = []
    for token, index in tokenizer.get_vocab().items():
        if token.endswith("</w>") and len(token) > 5:  # a word (not a single character)
            pieces = src_tokenizer(token[:-4], add_special_tokens=False).input_ids
            if len(pieces) > 1:
                table[index] = weight[torch.tensor(pieces)].mean(0)
                split.append(token[:-4])
                continue
        if token in src_vocab:
            table[index] = weight[src_vocab[token]]
    return table, sorted(split)


def checkpoint_dir(out_dir: str | Path) -> Path:
    """Where a run that writes ``out_dir`` keeps its resumable state (beside it, never inside it)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.train-state"


def _rng_state(rng: np.random.Generator, gen) -> dict:
    return {"np": rng.bit_generator.state, "torch": gen.get_state()}


def train_toy_sd(
    out_dir: str | Path,
    *,
    seed: int = 0,
    arch=None,
    vae_steps: int = 1500,
    unet_steps: int = 11000,
    batch_size: int = 32,
    vae_batch_size: int = 32,
    vae_crop: int = 32,
    vae_fg_weight: float = 4.0,
    n_images: int = 40000,
    minutes: float | None = None,
    vae_minutes: float | None = None,
    render_minutes: float | None = None,
    save_every_minutes: float | None = 10.0,
    checkpoint_every_minutes: float | None = 5.0,
    eval_every_minutes: float | None = 20.0,
    eval_n: int = 96,
    log_every: int = 50,
    lr: float = 3e-4,
    vae_lr: float = 1e-3,
    ema_decay: float = 0.999,
    bf16: bool | None = None,
    device: str = "cpu",
    threads: int | None = 2,
    vae_from: str | Path | None = None,
    init_from: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    snr_gamma: float | None = 5.0,
    bare_nouns: float = 0.0,
    object_weights: dict[int, float] | None = None,
    whole_words: bool = False,
) -> Path:
    """Train toy-sd from scratch and save it (diffusers folder, safetensors) at ``out_dir``.

    Every ``checkpoint_every_minutes`` the whole state (weights, EMA, optimizer, position in the schedule,
    random streams) goes to :func:`checkpoint_dir`; ``resume=True`` continues from there to the same
    schedule (the data set is drawn again from ``seed``: the same scenes, bit for bit; the encoded latents are
    kept beside the state, so a resumed UNet stage neither renders nor encodes them again). Every
    ``eval_every_minutes`` the EMA weights are scored by the oracle on ``eval_n`` unseen captions; the
    scores are printed and kept in ``training_info.json`` (``scores``).

    ``init_from`` warm-starts from a trained toy-sd folder of the same arch: its VAE is kept (stage 1 is
    skipped) and its UNet and text encoder are the starting weights of stage 2, which then runs its own
    warm-up and cosine schedule (a continuation with a fresh optimizer).

    ``snr_gamma`` turns on min-SNR-γ loss weighting (Hang et al. 2023): each sample's v-prediction loss is
    weighted by ``min(SNR, γ) / (SNR + 1)`` (:func:`min_snr_weights`), so the many nearly clean timesteps
    stop dominating the gradient.

    ``bare_nouns`` names each object of a training caption by its shape word alone with this probability
    (:func:`scenetok.toyworld.world.caption`): toy-sd trained on full captions only localizes a bare shape
    noun poorly (docs/toy-sd.md), which the mask-free methods rely on.

    ``object_weights`` (object count → relative weight) sets how often a training scene has 1, 2, 3 or 4
    objects (default :data:`N_OBJECT_WEIGHTS`).

    ``whole_words`` (with ``init_from``) replaces the source model's tokenizer by a fresh one that keeps every
    caption word whole (toy-sd v1d's cuts green, orange, cyan, maroon and triangle into pieces): each token row of
    the source's embedding table is copied by its string, and a word the source cut into pieces starts from the
    mean of its pieces' rows (:func:`remap_token_embeddings`); the fine-tuning then teaches the model the words."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    from scenetok.losses import min_snr_weights
    from scenetok.toyworld import world
    from scenetok.toyworld.model import ToySDArch, build_toy_sd, count_params
    from scenetok.training.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
    from scenetok.training.memory import computes_bf16

    if threads:
        torch.set_num_threads(threads)
    if bf16 is None:  # auto: only where bf16 math is native (emulated bf16 on an AVX2 CPU is ~100× slower)
        bf16 = computes_bf16(device)
    arch = arch or ToySDArch()
    if init_from is not None:
        if vae_from is not None and Path(vae_from) != Path(init_from):
            raise ValueError("init_from already gives the VAE; leave vae_from unset")
        vae_from = init_from
    elif whole_words:
        raise ValueError("whole_words re-maps a warm start's tokenizer; it needs init_from (a fresh model's "
                         "tokenizer keeps every word whole already)")
    obj_weights = _weights_key(object_weights or N_OBJECT_WEIGHTS)
    t_start = time.time()
    out_dir = Path(out_dir)
    ckpt = checkpoint_dir(out_dir)
    state = None
    if resume:
        if not has_checkpoint(ckpt):
            raise FileNotFoundError(f"no training state to resume from in {ckpt}; start without --resume")
        state = load_checkpoint(ckpt)
        saved = state["run_state"]["args"]
        if saved["seed"] != seed or saved["arch"] != json.loads(json.dumps(arch.to_dict())):
            raise ValueError(f"{ckpt} was written by a run with seed {saved['seed']} and arch {saved['arch']}; "
                             f"resume with the same settings")
        saved_info = state["run_state"]["info"]
        # settings that change what is trained: a resumed run must keep them, or it would silently become
        # another run (the VAE's only while the VAE stage is unfinished; older states lack bare_nouns)
        keep = [("lr", lr, None), ("batch_size", batch_size, None), ("ema_decay", ema_decay, None),
                ("snr_gamma", snr_gamma, None), ("bare_nouns", bare_nouns, 0.0),
                ("object_weights", obj_weights, _weights_key(N_OBJECT_WEIGHTS)), ("whole_words", whole_words, False)]
        if state["progress"].get("stage") == "vae":
            keep += [("vae_lr", vae_lr, None), ("vae_batch_size", vae_batch_size, None), ("vae_crop", vae_crop, None),
                     ("vae_fg_weight", vae_fg_weight, None)]
        for key, value, default in keep:
            was = saved_info.get(key, default)
            if was != value:
                raise ValueError(f"{ckpt} was written by a run with {key}={was}, and this one has {key}={value}; "
                                 f"resume with the same setting")
    elif has_checkpoint(ckpt):
        raise FileExistsError(f"{ckpt} holds the state of an unfinished run; pass --resume to continue it, or "
                              f"remove that folder to start again")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 2])

    # ---- data (rendered again on resume: the same seed gives the same scenes; a resumed UNet stage whose
    # encoded latents are cached beside its state draws the scenes' captions only)
    cache = ckpt / LATENTS_CACHE
    cached = (state is not None and state["progress"].get("stage") == "unet"
              and _cache_matches(cache, n=state["run_state"]["info"]["n_images"], seed=seed))
    images, specs, fg = render_dataset(n_images, seed, max_seconds=None if not render_minutes else render_minutes * 60,
                                       with_masks=True, specs_only=cached, object_weights=object_weights)
    n = len(specs)
    _log(f"data: {n} scenes {'drawn (their latents are cached)' if cached else 'rendered'} in "
         f"{time.time() - t_start:.0f}s")
    if state is not None and n != state["run_state"]["info"]["n_images"]:
        raise RuntimeError(f"rendered {n} scenes but the saved run had {state['run_state']['info']['n_images']}; "
                           "resume without --render-minutes")

    # ---- scheduler: zero terminal SNR, v-prediction, trailing spacing
    pipe = build_toy_sd(None, seed, arch)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    if init_from is not None and not whole_words:
        # a warm start keeps the source model's tokenizer: its text encoder learnt those ids (the shipped v1d's
        # tokenizer splits some colour words into pieces; a fresh one keeps them whole, with other ids)
        from transformers import CLIPTokenizer

        pipe.tokenizer = CLIPTokenizer.from_pretrained(str(Path(init_from) / "tokenizer"))
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    vae, unet, te, tok = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    vae.to(device), unet.to(device), te.to(device)
    info = {
        "seed": seed, "arch": arch.to_dict(),
        "params": {k: count_params(getattr(pipe, k)) for k in ("vae", "unet", "text_encoder")},
        "n_images": n, "batch_size": batch_size, "vae_batch_size": vae_batch_size, "vae_crop": vae_crop,
        "vae_fg_weight": vae_fg_weight, "lr": lr, "vae_lr": vae_lr, "bf16": bf16,
        "ema_decay": ema_decay, "snr_gamma": snr_gamma, "bare_nouns": bare_nouns,
        "object_weights": obj_weights, "whole_words": whole_words, "caption_dropout": CAPTION_DROPOUT, "threads": threads, "device": device,
        "scores": [],
    }
    args_key = {"seed": seed, "arch": arch.to_dict()}
    if state is not None:
        info = state["run_state"]["info"]
        info["bf16"] = bf16  # this machine's precision (a resumed run may move to a CPU without bf16)
    _log(f"params: {info['params']}")
    prog = dict(state["progress"]) if state is not None else {"stage": "vae", "step": 0}
    last_ckpt = time.time()

    def checkpoint(tensors: dict, opt, progress_now: dict):
        save_checkpoint(ckpt, trainable=tensors, optimizer=opt, torch_gen=gen, np_rng=rng, progress=progress_now,
                        run_state={"info": info, "args": args_key})

    # ---- stage 1: VAE (or a VAE trained by an earlier run of the same seed: stage 2 draws from its own
    # random streams, so training the UNet on a loaded VAE gives the same result as the full run)
    if vae_from and prog["stage"] == "vae":
        from diffusers import AutoencoderKL

        loaded = AutoencoderKL.from_pretrained(str(vae_from), subfolder="vae", use_safetensors=True)
        vae.load_state_dict(loaded.state_dict())
        info["vae_from"] = str(vae_from)
        _log(f"VAE loaded from {vae_from}; stage 1 skipped")
    elif prog["stage"] == "vae":
        t_vae = time.time()
        info["vae_steps"] = train_vae(vae, images, fg, steps=vae_steps, batch_size=vae_batch_size, lr=vae_lr,
                                      crop=vae_crop, fg_weight=vae_fg_weight, rng=rng, gen=gen, device=device,
                                      log_every=log_every, minutes=vae_minutes)
        info["vae_seconds"] = round(time.time() - t_vae)
    else:
        vae.load_state_dict({k[4:]: v for k, v in state["trainable"].items() if k.startswith("vae.")})
        _log(f"resumed: VAE restored, UNet stage at step {prog['step']}")
    vae.eval()
    vae.requires_grad_(False)
    if prog["stage"] == "vae":  # stage 2's own random streams
        gen = torch.Generator().manual_seed(seed + 1)
        rng = np.random.default_rng([seed, 3])
        prog = {"stage": "unet", "step": 0, "seconds": 0.0}
        checkpoint({f"vae.{k}": v for k, v in vae.state_dict().items()}, None, prog)
        last_ckpt = time.time()

    # ---- encode the data set once
    t_enc = time.time()
    enc_gen = torch.Generator().manual_seed(seed + 2)
    # both the images and their mirror images (every toy shape is left-right symmetric and captions never
    # name positions, so a flip is a free second view of each scene): index [flip, scene]
    digest = _vae_digest(vae)
    if cached and not _cache_matches(cache, n=n, seed=seed, vae_digest=digest):
        _log(f"{cache} was made by another VAE; rendering and encoding again")
        cached = False
        images, _, fg = render_dataset(n_images, seed, with_masks=True, object_weights=object_weights)
    if cached:
        lat_mean, lat_std = _read_latent_cache(cache)
        images = np.stack([world.render(sp, size=64)[0] for sp in specs[:64]])  # for the reconstruction check
        info["latents_from_cache"] = True
    else:
        means, stds = [[], []], [[], []]
        with torch.no_grad():
            for flip in (0, 1):
                for i in range(0, n, 128):
                    x = _to_tensor(images[i:i + 128])
                    post = vae.encode((x.flip(-1) if flip else x).to(device)).latent_dist
                    means[flip].append(post.mean.cpu())
                    stds[flip].append(post.std.cpu())
        lat_mean = torch.stack([torch.cat(m) for m in means])
        lat_std = torch.stack([torch.cat(s) for s in stds])
        if checkpoint_every_minutes:  # a resumed run reads them back instead of rendering and encoding again
            _write_latent_cache(cache, lat_mean, lat_std, n=n, seed=seed, vae_digest=digest)
    with torch.no_grad():
        sample = lat_mean[0] + lat_std[0] * torch.randn(lat_mean[0].shape, generator=enc_gen)
        recon = vae.decode(sample[:64].to(device)).sample.cpu()
        rec_err = (recon - _to_tensor(images[:64])).abs().mean().item()
    scaling = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scaling)
    info["vae_scaling_factor"] = scaling
    info["vae_recon_l1_eval"] = rec_err
    _log(f"encoded {n} scenes (and their mirror images) in {time.time() - t_enc:.0f}s; latent std {sample.std():.3f} -> scaling "
         f"{scaling:.4f}; recon L1 {rec_err:.4f} (on [-1,1])")
    lat_mean = lat_mean * scaling
    lat_std = lat_std * scaling
    del images, fg

    # ---- stage 2: UNet + text encoder
    def encode_captions(caps):
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids.to(device))[0]

    acp = pipe.scheduler.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, betas=(0.9, 0.99))
    total_ref = [int(prog.get("total", unet_steps))]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(200, max(1, unet_steps // 10)), total_ref))
    ema = _EMA(params, ema_decay)
    step = int(prog["step"])
    if init_from is not None and step == 0:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        src_unet = UNet2DConditionModel.from_pretrained(str(init_from), subfolder="unet", use_safetensors=True)
        src_te = CLIPTextModel.from_pretrained(str(init_from), subfolder="text_encoder", use_safetensors=True)
        unet.load_state_dict({k: v.float() for k, v in src_unet.state_dict().items()})
        te_state = {k: v.float() for k, v in src_te.state_dict().items()}
        if whole_words:
            from transformers import CLIPTokenizer

            key = next(k for k in te_state if k.endswith("token_embedding.weight"))
            src_tok = CLIPTokenizer.from_pretrained(str(Path(init_from) / "tokenizer"))
            te_state[key], split_words = remap_token_embeddings(te_state[key], src_tok, tok)
            info["whole_words_split_in_source"] = split_words
            _log(f"tokenizer: every word whole; {len(split_words)} word(s) the source cut into pieces start from "
                 f"the mean of their pieces ({', '.join(split_words) or 'none'})")
        te.load_state_dict(te_state)
        del src_unet, src_te
        ema = _EMA(params, ema_decay)  # the EMA starts from the loaded weights
        prev = Path(init_from) / "training_info.json"
        info["init_from"] = {"path": str(init_from),
                             "unet_steps": json.loads(prev.read_text()).get("unet_steps") if prev.exists() else None}
        _log(f"UNet and text encoder loaded from {init_from} (warm start)")
    if state is not None and step > 0:
        tr = state["trainable"]
        unet.load_state_dict({k[5:]: v for k, v in tr.items() if k.startswith("unet.")})
        te.load_state_dict({k[3:]: v for k, v in tr.items() if k.startswith("te.")})
        with torch.no_grad():
            for i, s_ in enumerate(ema.shadow):
                s_.copy_(tr[f"ema.{i}"])
        opt.load_state_dict(state["optimizer"])
        sched.last_epoch = step
        for g_, lr_ in zip(opt.param_groups, sched.get_lr()):
            g_["lr"] = lr_
    if state is not None and prog["stage"] == "unet":
        gen.set_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]
    unet.train()
    te.train()
    seconds_before = float(prog.get("seconds", 0.0))
    t_unet = time.time() - seconds_before
    last_save = last_eval = time.time()
    run_loss, n_loss = 0.0, 0
    amp = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)

    def save_unet_state() -> None:
        """The resumable state after UNet step ``step`` (weights, EMA, optimizer, schedule position)."""
        tensors = {f"vae.{k}": v for k, v in vae.state_dict().items()}
        tensors.update({f"unet.{k}": v for k, v in unet.state_dict().items()})
        tensors.update({f"te.{k}": v for k, v in te.state_dict().items()})
        tensors.update({f"ema.{i}": s_ for i, s_ in enumerate(ema.shadow)})
        checkpoint(tensors, opt, {"stage": "unet", "step": step, "total": total_ref[0],
                                  "seconds": time.time() - t_unet})

    def score_now() -> dict:
        ema.swap()
        unet.eval(), te.eval()
        try:
            res = evaluate_toy_sd(pipe=pipe, n=eval_n, seed=seed + 17, steps=20, guidance=5.0, batch=eval_n)
        finally:
            unet.train(), te.train()
            ema.swap()
        row = {"step": step, "minutes": round((time.time() - t_unet) / 60, 1), "n": eval_n,
               **{k: round(res[k], 4) for k in ("background", "color", "shape", "texture", "no_extra", "all_ok")}}
        info["scores"].append(row)
        _log("oracle (EMA, %d captions): " % eval_n + " ".join(f"{k}={v}" for k, v in row.items()))
        return row

    bar = tqdm(total=total_ref[0], initial=step, desc="toy-sd UNet", disable=not progress, dynamic_ncols=True,
               mininterval=2.0)
    stop = _StopRequest()  # Ctrl-C / SIGTERM: finish the step, write the state, then stop
    t_here, step_here = time.time(), step  # this process's speed, for the time left in the log lines
    try:
        while step < total_ref[0]:
            idx = rng.integers(0, n, batch_size)
            caps = [world.caption(specs[i], rng, bare_nouns=bare_nouns) if rng.random() >= CAPTION_DROPOUT else ""
                    for i in idx]
            ti = torch.from_numpy(idx)
            fl = torch.from_numpy(rng.integers(0, 2, batch_size))
            mu, sd = lat_mean[fl, ti], lat_std[fl, ti]
            x0 = (mu + sd * torch.randn(mu.shape, generator=gen)).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, acp.numel(), (batch_size,), generator=gen).to(device)
            a = acp[t].sqrt().view(-1, 1, 1, 1)
            s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
            xt = a * x0 + s * noise
            target = a * noise - s * x0
            with amp:
                pred = unet(xt, t, encode_captions(caps)).sample
            if snr_gamma:
                per = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
                loss = (per * min_snr_weights(acp[t], snr_gamma)).mean()
            else:
                loss = F.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            ema.update(step)
            step += 1
            run_loss += loss.item()
            n_loss += 1
            bar.update(1)
            if minutes and step % 25 == 0:  # re-plan the step count from the measured speed
                total_ref[0] = _replan(step, unet_steps, t_unet, minutes)
                bar.total = total_ref[0]
            if step % log_every == 0 or step == total_ref[0]:
                el = time.time() - t_unet
                bar.set_postfix(loss=f"{run_loss / n_loss:.4f}", refresh=False)
                if not progress:
                    left = (total_ref[0] - step) * (time.time() - t_here) / (step - step_here)
                    _log(f"unet step {step}/{total_ref[0]} loss={run_loss / n_loss:.4f} lr={sched.get_last_lr()[0]:.2e} "
                         f"elapsed {el / 60:.1f}min, about {_duration(left)} left")
                run_loss, n_loss = 0.0, 0
            now = time.time()
            if eval_every_minutes and now - last_eval > eval_every_minutes * 60 and step < total_ref[0]:
                score_now()
                last_eval = time.time()
            if save_every_minutes and now - last_save > save_every_minutes * 60 and step < total_ref[0]:
                ema.swap()
                save_pipeline(pipe, out_dir, extra_info={**info, "unet_steps": step, "snapshot": True})
                ema.swap()
                last_save = time.time()
            if checkpoint_every_minutes and now - last_ckpt > checkpoint_every_minutes * 60 and step < total_ref[0]:
                save_unet_state()
                last_ckpt = time.time()
            if stop.signum is not None and step < total_ref[0]:
                bar.close()
                if checkpoint_every_minutes:
                    save_unet_state()
                    _log(f"stopped after UNet step {step}; the state is in {ckpt} (continue with --resume)")
                stop.reraise()  # the finally below gives the signal handlers back
    finally:
        stop.close()
    bar.close()
    info["unet_steps"] = step
    info["unet_seconds"] = round(time.time() - t_unet)
    info["total_seconds"] = round(time.time() - t_start) + round(seconds_before)
    if eval_every_minutes:
        score_now()
    ema.swap()
    unet.eval()
    te.eval()
    path = save_pipeline(pipe, out_dir, extra_info=info)
    shutil.rmtree(ckpt, ignore_errors=True)
    _log(f"saved {path} after {info['unet_seconds'] / 60:.1f} min of UNet training")
    return path


# ------------------------------------------------------------------------------------------- evaluate
def eval_scenes(n: int, seed: int, n_objects=(1, 2), allow_held_out: bool = False):
    """``n`` evaluation scenes from a seed stream the training data never uses."""
    from scenetok.toyworld import world

    rng = np.random.default_rng([seed + EVAL_SEED_OFFSET, 3])
    return [(s, world.caption(s, rng)) for s in
            (world.sample_scene(rng, n_objects=n_objects, allow_held_out=allow_held_out) for _ in range(n))]


def evaluate_toy_sd(
    path: str | Path | None = None,
    n: int = 200,
    seed: int = 0,
    *,
    steps: int = 25,
    guidance: float = 5.0,
    batch: int = 50,
    scenes=None,
    pipe=None,
    return_images: bool = False,
    return_rows: bool = False,
) -> dict:
    """Generate ``n`` unseen 1–2-object captions and score them with the oracle.

    Returns rates in [0, 1]: ``background``, ``color``, ``shape``, ``texture``, ``object_ok`` (per object),
    ``no_extra`` (per image) and ``all_ok`` (per image: background, every object and nothing extra).
    ``return_rows=True`` adds ``rows``: per image, the counts behind these rates (for paired comparisons of
    two samplers on the same captions and noise).
    """
    import torch

    from scenetok.toyworld import oracle
    from scenetok.toyworld.model import build_toy_sd, toy_sd_path

    if pipe is None:
        pipe = build_toy_sd(path or toy_sd_path())
    pipe.set_progress_bar_config(disable=True)
    scenes = scenes if scenes is not None else eval_scenes(n, seed)
    counts = {"background": 0, "color": 0, "shape": 0, "texture": 0, "object_ok": 0, "no_extra": 0, "all_ok": 0}
    n_obj = 0
    images, rows = [], []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        g = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            out = pipe([c for _, c in chunk], height=64, width=64, num_inference_steps=steps,
                       guidance_scale=guidance, generator=g, output_type="np").images
        imgs = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        for (spec, _), img in zip(chunk, imgs):
            objs = [{"shape": o.shape, "color": o.color, "texture": o.texture} for o in spec.objects]
            j = oracle.judge(img, objects=objs, background=spec.background)
            counts["background"] += bool(j.background_ok)
            for m in j.matches:
                n_obj += 1
                counts["color"] += bool(m["color_ok"])
                counts["shape"] += bool(m["shape_ok"])
                counts["texture"] += bool(m["texture_ok"])
                counts["object_ok"] += bool(m["ok"])
            counts["no_extra"] += len(j.extra) == 0
            counts["all_ok"] += bool(j.background_ok and all(m["ok"] for m in j.matches) and not j.extra)
            if return_rows:
                rows.append({"background": int(bool(j.background_ok)), "n_objects": len(j.matches),
                             **{k: sum(bool(m[f"{k}_ok"]) for m in j.matches) for k in ("color", "shape", "texture")},
                             "object_ok": sum(bool(m["ok"]) for m in j.matches), "no_extra": int(not j.extra),
                             "all_ok": int(bool(j.background_ok and all(m["ok"] for m in j.matches) and not j.extra))})
        if return_images:
            images.extend(imgs)
    m = len(scenes)
    res = {k: counts[k] / (n_obj if k in ("color", "shape", "texture", "object_ok") else m) for k in counts}
    res.update(n_images=m, n_objects=n_obj, steps=steps, guidance=guidance, seed=seed)
    if return_images:
        res["images"] = images
    if return_rows:
        res["rows"] = rows
    return res


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None, prog: str = "python -m scenetok.toyworld.train") -> int:
    # the CLI's defaults are train_toy_sd's (one source of truth); "0 = none" options map None to 0
    d = {k: v.default for k, v in inspect.signature(train_toy_sd).parameters.items()
         if v.default is not inspect.Parameter.empty}
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (diffusers pipeline)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seeds the scenes, the noise and the weights")
    p.add_argument("--vae-steps", type=int, default=d["vae_steps"], help="stage 1: VAE steps")
    p.add_argument("--unet-steps", type=int, default=d["unet_steps"], help="UNet steps (the cap when --minutes ends first)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="stage 2: scenes per UNet step")
    p.add_argument("--vae-batch-size", type=int, default=d["vae_batch_size"], help="stage 1: crops per VAE step")
    p.add_argument("--vae-crop", type=int, default=d["vae_crop"], help="VAE trains on random crops of this side")
    p.add_argument("--vae-fg-weight", type=float, default=d["vae_fg_weight"], help="extra weight of object pixels in the VAE loss")
    p.add_argument("--n-images", type=int, default=d["n_images"], help="scenes rendered (each also used mirrored)")
    p.add_argument("--minutes", type=float, default=d["minutes"] or 0, help="wall-time cap for the UNet stage (0 = none)")
    p.add_argument("--vae-minutes", type=float, default=d["vae_minutes"] or 0, help="wall-time cap for the VAE stage (0 = none)")
    p.add_argument("--render-minutes", type=float, default=d["render_minutes"] or 0, help="wall-time cap for rendering (0 = none)")
    p.add_argument("--save-every-minutes", type=float, default=d["save_every_minutes"] or 0,
                   help="write the EMA weights to OUT this often, as a usable snapshot (0 = only at the end)")
    p.add_argument("--log-every", type=int, default=d["log_every"], help="steps between log lines (--no-progress)")
    p.add_argument("--lr", type=float, default=d["lr"], help="stage 2: peak learning rate (warm-up, then cosine to 10 %%)")
    p.add_argument("--arch", default="v1", help="model sizes: v1 (16×16 latents, the shipped model) or v2 (×2 VAE, "
                   "32×32 latents)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=d["bf16"],
                   help="bf16 autocast for the UNet stage (default: on where the device computes bf16 natively "
                        "— CUDA, CPUs with AVX-512 BF16 or AMX, ~25 %% faster there — else fp32; on an AVX2-only "
                        "CPU bf16 is emulated and ~100× slower)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.train-state")
    p.add_argument("--checkpoint-every-minutes", type=float, default=d["checkpoint_every_minutes"] or 0,
                   help="write the resumable state this often (0 = never)")
    p.add_argument("--eval-every-minutes", type=float, default=d["eval_every_minutes"] or 0,
                   help="score the EMA weights with the oracle this often, and at the end (0 = never)")
    p.add_argument("--eval-n", type=int, default=d["eval_n"], help="captions per periodic oracle score")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--device", default=d["device"], help="cpu or cuda")
    p.add_argument("--threads", type=int, default=d["threads"], help="CPU threads")
    p.add_argument("--vae-from", default=None, help="skip stage 1: take the VAE of this toy-sd folder (trained "
                   "by an earlier run with the same seed gives the same result as the full run)")
    p.add_argument("--init-from", default=None, help="warm start: VAE, UNet and text encoder from this toy-sd folder "
                   "(same --arch); stage 2 then runs its own schedule")
    p.add_argument("--snr-gamma", type=float, default=d["snr_gamma"] or 0,
                   help="min-SNR-γ loss weighting with this γ (0: the plain v-prediction loss of v1/v1c; 5 made "
                        "toy-sd v1d: docs/toy-sd.md)")
    p.add_argument("--bare-nouns", type=float, default=d["bare_nouns"],
                   help="probability that a training caption names an object by its shape word alone ('a star'), "
                        "so the model learns where a bare noun is (0: full phrases only, every model so far)")
    p.add_argument("--object-weights", default=_weights_key(N_OBJECT_WEIGHTS),
                   help="how often a training scene has 1, 2, 3 or 4 objects, as COUNT:WEIGHT pairs")
    p.add_argument("--whole-words", action="store_true",
                   help="with --init-from: a fresh tokenizer that keeps every caption word whole, the source's "
                        "token rows copied and each word it cut into pieces started from their mean")
    p.add_argument("--eval", type=int, default=0, help="after training, score N unseen captions with the oracle")
    a = p.parse_args(argv)
    if a.whole_words and not a.init_from:
        p.error("--whole-words re-maps a warm start's tokenizer: pass --init-from (a fresh model keeps words whole)")
    from scenetok.toyworld.model import ARCHS

    if a.arch not in ARCHS:
        p.error(f"--arch must be one of {', '.join(ARCHS)}")
    if min(a.vae_steps, a.unet_steps, a.batch_size, a.n_images) < 1:
        p.error("--vae-steps, --unet-steps, --batch-size and --n-images must be >= 1")
    try:
        object_weights = parse_object_weights(a.object_weights)
    except ValueError as e:
        p.error(f"--object-weights: {e}")
    path = train_toy_sd(
        a.out, seed=a.seed, vae_steps=a.vae_steps, unet_steps=a.unet_steps, batch_size=a.batch_size,
        vae_batch_size=a.vae_batch_size, vae_crop=a.vae_crop, vae_fg_weight=a.vae_fg_weight, n_images=a.n_images, minutes=a.minutes or None,
        vae_minutes=a.vae_minutes or None, render_minutes=a.render_minutes or None,
        save_every_minutes=a.save_every_minutes or None, log_every=a.log_every, lr=a.lr, device=a.device,
        threads=a.threads, vae_from=a.vae_from, init_from=a.init_from, arch=ARCHS[a.arch], bf16=a.bf16, resume=a.resume,
        checkpoint_every_minutes=a.checkpoint_every_minutes or None, eval_every_minutes=a.eval_every_minutes or None,
        eval_n=a.eval_n, progress=not a.no_progress, snr_gamma=a.snr_gamma or None, bare_nouns=a.bare_nouns,
        object_weights=object_weights, whole_words=a.whole_words,
    )
    if a.eval:
        res = evaluate_toy_sd(path, n=a.eval, seed=a.seed)
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
