"""Full Break-A-Scene runs on real-size SD 2.1-base and SDXL architectures (random weights), on a GPU.

What it measures, per case (architecture × precision × mode × memory setting), each case in its own
subprocess so that its peak memory is its own:

* **s/step** of phase 1 (handles only) and of phase 2 (UNet + text encoder(s) + handles): the median of
  the timed steps of that phase after ``--warmup`` untimed ones (CUDA is synchronised after every step);
* **full-run wall time**: everything from loading the model to the end of training: loading, moving to the
  GPU, adding the handles, VAE-encoding the scene, both phases and, for *ours*, writing the bundle. When
  ``--budget-minutes`` (or ``--steps``) made a case run fewer steps than the full run (400 + 400 by
  default), the full-run time is **extrapolated** from the measured one with the phases' median s/step and
  the row says so (``~`` and ``extrapolated``);
* **peak GPU memory**: ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) over the whole
  case, and per phase. On CPU the peak RSS (``ru_maxrss``) stands in. An out-of-memory error becomes a row
  ("OOM at … GiB": what was allocated at its peak when the allocation failed), not a crash of the table.

Architectures (``--archs``), built once with random weights from their configs (nothing is downloaded;
configs from ``benchmarks/memory_budget.py``) and saved as diffusers folders under ``--model-dir``:

* ``sd21``: SD 2.1-base: 865.9 M UNet (epsilon prediction, 512 px, 64² latents), OpenCLIP-H text encoder
  (23 layers, 1024-d), VAE; CLIP tokenizer with the real 49,408-entry vocabulary size (a small BPE vocabulary
  padded with unused entries, so the embedding matrices have their real shape);
* ``sdxl``: SDXL base: 2,567.5 M UNet (1024 px, 128² latents), CLIP-L + OpenCLIP-G (with projection), VAE;
* ``tiny`` / ``tiny-xl``: the tiny random test models of ``scenetok.testing`` (for ``--smoke`` on a CPU).

UNet and VAE are stored in fp16 (half the disk; diffusers loads them as fp32), the text encoders in fp32
(transformers would load fp16 files as fp16). Every case trains fp32 weights, as from a real fp32 checkpoint:
*ours* casts after loading, *naive* checks that it got fp32.

Modes (``--modes``):

* ``ours``: the real trainer, ``scenetok.training.trainer.train(method="break-a-scene")`` with the method's
  paper settings (phase 1: 400 steps at 5e-4, phase 2: 400 steps at 2e-6, union sampling, masked loss,
  attention loss at latent/4); previews and checkpoints off (``--set`` turns them back on);
* ``naive``: the reference code's way, from ``benchmarks/bench_step.py`` (``setup`` / ``train_step``): every
  attention layer runs naive attention and stores its maps, the VAE encodes the image at every step, plain
  ``torch.optim.AdamW``, the whole embedding matrix trains in phase 1 (its non-handle rows put back after
  each step); the model is loaded once and switched from phase 1 to phase 2 in place. For SDXL, for which
  the reference has no code, the same step runs through both text encoders and the UNet's added
  conditioning. No model is saved at the end (the reference would save the whole pipeline).

Memory settings (``--memory``):

* ``normal``: fp32 weights, autocast in the case's precision, AdamW, no gradient checkpointing;
* ``low``: gradient checkpointing + 8-bit AdamW (bitsandbytes). For *ours* that is ``memory=low`` (the preset:
  checkpointing, frozen weights in half precision, VAE off the GPU after encoding, and in bf16 the optimizer
  step inside the backward pass, ``optim.step_in_backward``; fp16 cases keep the ordinary step) +
  ``optim.use_8bit=true``;
  for *naive* the reference script's ``--gradient_checkpointing --use_8bit_adam``. Without bitsandbytes the
  row is reported as skipped, with the reason;
* ``low-adamw``: the same with plain AdamW (runs without bitsandbytes).

Targets (issue 14): a full SD 2.1 run (ours) in ≤ 60 s on one H100/H200-class GPU (the paper reports about
4.5 min per scene), and SD 2.1 peak ≤ 12 GB with the memory preset (``--memory low``).

Usage (see benchmarks/README.md)::

    python benchmarks/bench_gpu.py --estimate                      # the plan and its time estimate only
    python benchmarks/bench_gpu.py --archs sd21 --budget-minutes 8 --out bench_gpu.json
    python benchmarks/bench_gpu.py --archs sd21,sdxl --precisions bf16,fp16 --modes ours,naive \\
        --memory normal,low --steps 400,400 --out bench_gpu.json   # everything, full runs (long)
    python benchmarks/bench_gpu.py --smoke                         # tiny model, CPU, 3 + 3 steps
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_step, memory_budget

ARCHS = ("sd21", "sdxl", "tiny", "tiny-xl")
MODES = ("ours", "naive")
MEMORY = ("normal", "low", "low-adamw")
PRECISIONS = ("bf16", "fp16", "fp32")
CLIP_VOCAB = 49408  # the real CLIP vocabulary size (SD 2.1 and both SDXL tokenizers)
WORDS = ("a", "photo", "of", "and", "the", "red", "blue", "square", "object", "background")
GIB = 2**30

# Rough prior guesses (NOT measurements) of what a case costs on one H100/H200-class GPU in bf16, used
# only to plan --budget-minutes and to print the up-front estimate (from FLOP and memory-traffic counts:
# an SD 2.1 UNet forward + backward at 512 px is ~2.5 TFLOP, AdamW on 1.2 B fp32 parameters moves ~20 GB).
# With --budget-minutes the finished cases re-plan the rest (their measured time / the prior's).
# arch: (build s, load + encode s, bundle write s, {(mode, memory): (s/step phase 1, s/step phase 2)})
PRIORS = {
    "sd21": (60.0, 15.0, 10.0, {("ours", "normal"): (0.05, 0.10), ("ours", "low"): (0.07, 0.14),
                                ("naive", "normal"): (0.12, 0.20), ("naive", "low"): (0.16, 0.26)}),
    "sdxl": (120.0, 30.0, 25.0, {("ours", "normal"): (0.12, 0.25), ("ours", "low"): (0.16, 0.35),
                                 ("naive", "normal"): (0.30, 0.50), ("naive", "low"): (0.40, 0.65)}),
    "tiny": (8.0, 6.0, 1.0, {("ours", "normal"): (0.05, 0.08), ("ours", "low"): (0.06, 0.10),
                             ("naive", "normal"): (0.05, 0.08), ("naive", "low"): (0.06, 0.10)}),
    "tiny-xl": (8.0, 8.0, 1.0, {("ours", "normal"): (0.08, 0.12), ("ours", "low"): (0.10, 0.15),
                                ("naive", "normal"): (0.08, 0.12), ("naive", "low"): (0.10, 0.15)}),
}
STARTUP_S = 10.0  # a case process's start (Python, torch, CUDA) before its clock starts; measured ones replace it
CPU_SLOWDOWN = {"sd21": 60.0, "sdxl": 80.0, "tiny": 1.0, "tiny-xl": 1.0}  # real-size archs on a CPU: very slow


def prior_parts(arch: str, mode: str, memory: str, precision: str, cpu: bool) -> tuple[float, float, float]:
    """Prior guess of a case's fixed time (load + encode, + bundle write for ours) and its s/step per phase."""
    _, load_s, bundle_s, steps = PRIORS[arch]
    s1, s2 = steps[(mode, "normal" if memory == "normal" else "low")]
    real = arch in ("sd21", "sdxl")
    scale = (2.5 if precision == "fp32" else 1.0) * (CPU_SLOWDOWN[arch] if cpu else 1.0)
    fixed = load_s * (3.0 if cpu and real else 1.0) + (bundle_s if mode == "ours" else 0.0)
    return fixed, s1 * scale, s2 * scale


def plan_steps(fixed: float, s1: float, s2: float, allowance: float, n1: int, n2: int,
               min_steps: int) -> tuple[list[int], float]:
    """Steps per phase (the same share of each) so that ``fixed`` + the steps fit ``allowance`` seconds; never
    fewer than ``min_steps`` per phase nor more than asked. Returns them and their estimated time."""
    k = min(1.0, max(0.0, allowance - fixed) / max(n1 * s1 + n2 * s2, 1e-9))
    steps = [min(n, max(min_steps, int(n * k))) for n in (n1, n2)]
    return steps, fixed + steps[0] * s1 + steps[1] * s2


# ----------------------------------------------------------------------------------------------------
# the models: real-size architectures with random weights, built once


def _write_tokenizer(path: Path, vocab_size: int = CLIP_VOCAB) -> Path:
    """A CLIP BPE tokenizer (vocab.json + merges.txt) whose vocabulary has ``vocab_size`` entries: the small
    byte-level vocabulary of :func:`scenetok.tokens.write_clip_tokenizer` padded with entries BPE never
    produces, start/end tokens last (ids 49406/49407, as in CLIP)."""
    from scenetok.tokens import SPECIAL_BOS, SPECIAL_EOS, write_clip_tokenizer

    small = write_clip_tokenizer(path.parent / (path.name + "-small"), WORDS)
    vocab = json.loads((small / "vocab.json").read_text())
    pieces = [k for k, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if k not in (SPECIAL_BOS, SPECIAL_EOS)]
    i = 0
    while len(pieces) < vocab_size - 2:
        pieces.append(f"<unused{i}>")
        i += 1
    pieces += [SPECIAL_BOS, SPECIAL_EOS]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({p: n for n, p in enumerate(pieces)}, ensure_ascii=False))
    shutil.copyfile(small / "merges.txt", path / "merges.txt")
    shutil.rmtree(small)
    return path


def build_real(path: Path, arch: str, device: str = "cpu") -> Path:
    """Build the SD 2.1-base (``sd21``) or SDXL (``sdxl``) architecture with random weights (initialised on
    ``device``) and save it as a diffusers folder at ``path``."""
    tok_dir = _write_tokenizer(path.parent / (path.name + "-tok"))
    real_pipeline(arch, tok_dir, device).save_pretrained(str(path), safe_serialization=True)
    shutil.rmtree(tok_dir)
    return path


def real_pipeline(arch: str, tok_dir: Path, device: str = "cpu"):
    """The random-weight pipeline of ``arch`` (``device="meta"``: no memory, e.g. to count parameters), its
    tokenizer(s) read from ``tok_dir`` (:func:`_write_tokenizer`); UNet and VAE cast to fp16 for storage."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import memory_budget as mb

    torch.manual_seed(0)
    # SD 2.x's tokenizer and SDXL's second one pad with "!", CLIP-L's (SDXL's first) with its end token
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="!", model_max_length=77)
    assert len(tokenizer) == CLIP_VOCAB, len(tokenizer)
    ids = dict(max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if arch not in ("sd21", "sdxl"):
        raise ValueError(arch)
    with torch.device(device):  # the weights only; schedulers and pipelines keep their CPU tensors
        if arch == "sd21":
            unet = UNet2DConditionModel(**{**mb.SD21_UNET, "sample_size": 64})  # 2.1-base: 512 px
            vae = AutoencoderKL(**mb.VAE, sample_size=512)
            te = CLIPTextModel(CLIPTextConfig(**mb.OPENCLIP_H, **ids))
        else:
            unet = UNet2DConditionModel(**mb.SDXL_UNET)
            vae = AutoencoderKL(**mb.VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
            te = CLIPTextModel(CLIPTextConfig(**mb.CLIP_L, **ids))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**mb.CLIP_G, **ids))
    if arch == "sd21":
        scheduler = DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")
        return StableDiffusionPipeline(vae=vae.half(), text_encoder=te, tokenizer=tokenizer, unet=unet.half(),
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    tokenizer_1 = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    scheduler = EulerDiscreteScheduler(**betas, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae.half(), text_encoder=te, text_encoder_2=te2, tokenizer=tokenizer_1,
                                     tokenizer_2=tokenizer, unet=unet.half(), scheduler=scheduler,
                                     add_watermarker=False)


def model_path(model_dir: Path, arch: str) -> Path:
    """Where ``arch`` lives under ``model_dir`` (prefixed: bench_step.py keeps other models of the same names there)."""
    return model_dir / f"bench_gpu-{arch}"


def build_model(model_dir: Path, arch: str, device: str) -> Path:
    """The diffusers folder of ``arch`` under ``model_dir``, built first when it is not there (complete)."""
    path = model_path(model_dir, arch)
    if (path / ".complete").exists():
        return path
    tmp = path.parent / (path.name + ".building")
    for p in (path, tmp):
        if p.exists():
            shutil.rmtree(p)
    if arch in ("sd21", "sdxl"):
        build_real(tmp, arch, device)
    elif arch == "tiny":
        from scenetok.testing import TinySDConfig, build_tiny_sd

        build_tiny_sd(tmp, TinySDConfig(resolution=32))
    else:
        from scenetok.testing import TinySDXLConfig, build_tiny_sdxl

        build_tiny_sdxl(tmp, TinySDXLConfig())
    tmp.rename(path)
    (path / ".complete").write_text("ok\n")
    return path


# ----------------------------------------------------------------------------------------------------
# one case (runs in its own process)


class DeadlineReached(Exception):
    """The case's time allowance (--budget-minutes) ran out: the steps stop, what was measured is kept."""


class Timer:
    """Per-step wall times (CUDA synchronised), per-phase peak memory, and the case's deadline."""

    def __init__(self, device: str, n1: int, deadline: float | None):
        self.cuda = device.startswith("cuda")
        self.n1 = n1
        self.t0 = time.perf_counter()
        self.deadline = deadline
        self.ready_t: float | None = None
        self.ends: list[float] = []  # end time of every step
        self.phase_peaks: list[tuple[int, int]] = []  # (allocated, reserved) peaks of phase 1 and 2

    def _sync(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def ready(self) -> None:
        self.ready_t = self._sync()

    def end_phase(self) -> None:
        if self.cuda:
            import torch

            self.phase_peaks.append((torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()))
            torch.cuda.reset_peak_memory_stats()

    def step(self, global_step: int) -> None:
        t = self._sync()
        self.ends.append(t)
        if global_step == self.n1:
            self.end_phase()
        if self.deadline is not None and t - self.t0 > self.deadline:
            raise DeadlineReached(f"time allowance of {self.deadline:.0f} s reached after step {global_step}")

    def durations(self) -> tuple[list[float], list[float]]:
        """Step durations of phase 1 and phase 2 (the first one of phase 2 includes building its optimizer)."""
        if self.ready_t is None or not self.ends:
            return [], []
        starts = [self.ready_t] + self.ends[:-1]
        d = [e - s for s, e in zip(starts, self.ends)]
        return d[: self.n1], d[self.n1:]


def _scene(resolution: int):
    """The tests' scene (a red and a blue rectangle on grey, :func:`scenetok.testing.two_squares`) at ``resolution``."""
    from scenetok.scene import Scene
    from scenetok.testing import two_squares

    img, masks = two_squares(resolution)
    return Scene.from_arrays(img, masks, names=["red", "blue"], class_words=["square", "square"])


def _fp32(*modules) -> None:
    for m in modules:
        if m is not None:
            m.float()


def run_ours(c: dict, timer: Timer) -> dict:
    from scenetok.methods.break_a_scene import BreakAScene
    from scenetok.model import load_model
    from scenetok.training.trainer import train

    info = {}

    class TimedBreakAScene(BreakAScene):  # the paper method, with a stopwatch in its hooks
        def prepare(self, run):
            super().prepare(run)
            info["resolution"] = run.resolution  # the native one unless --set resolution=...
            timer.ready()

        def after_step(self, run, global_step):
            event = super().after_step(run, global_step)
            timer.step(global_step)
            return event

    n1, n2 = c["steps_run"]
    cfg = {"phase1": {"steps": n1}, "phase2": {"steps": n2},
           "mixed_precision": "no" if c["precision"] == "fp32" else c["precision"],
           "memory": "normal" if c["memory"] == "normal" else "low", "optim": {"use_8bit": c["memory"] == "low"},
           "preview_every": 0, "checkpoint_every": 0, "checkpoint_minutes": 0}
    model = load_model(c["path"])
    _fp32(model.unet, model.vae, model.text_encoder, model.text_encoder_2)
    scene = _scene(model.native_resolution)
    out = Path(c["work_dir"]) / "bundle"
    try:
        train(scene, out, method=TimedBreakAScene(), model=model, cfg=cfg, overrides=c.get("set", []),
              device=c["device"], progress=False)
        info["finish_s"] = timer._sync() - timer.ends[-1] if timer.ends else None  # loss plot + bundle write
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / (out.name + ".partial"), ignore_errors=True)
    return info


class _XLText:
    """SDXL's two text encoders behind bench_step's ``text_encoder(ids)[0]`` call."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids):
        return (self.model.encode_prompt(ids),)


class _XLUNet:
    """The SDXL UNet behind bench_step's ``unet(noisy, t, enc)`` call (adds the pooled text and size ids)."""

    def __init__(self, model, resolution: int):
        self.model, self.resolution = model, resolution

    def __call__(self, noisy, t, enc):
        extra = self.model.extra_conditioning(noisy.shape[0], self.resolution, self.resolution)
        return self.model.unet(noisy, t, enc, **extra)


def _naive_setup_xl(path: str, precision: str, device: str, seed: int = 0):
    """bench_step.setup(path, "naive", 1, ...) for SDXL: the same State, its text encoder and UNet wrapped so
    that bench_step.train_step runs unchanged; both encoders' embedding matrices train in phase 1."""
    import torch

    import bench_step as bs
    from scenetok.attention import available_sizes, install_naive_capture, select_layers
    from scenetok.losses import resize_masks
    from scenetok.model import load_model

    torch.manual_seed(seed)
    m = load_model(path)
    _fp32(m.unet, m.vae, m.text_encoder, m.text_encoder_2)
    for module in (m.vae, m.unet, m.text_encoder, m.text_encoder_2):
        module.to(device).requires_grad_(False)
    encoders = [m.text_encoder, m.text_encoder_2]
    for tok, te in ((m.tokenizer, m.text_encoder), (m.tokenizer_2, m.text_encoder_2)):
        tok.add_tokens(list(bs.HANDLES))
        te.resize_token_embeddings(len(tok))
    handle_ids = m.tokenizer.convert_tokens_to_ids(list(bs.HANDLES))
    ids = m.token_ids(bs.PROMPT).to(device)
    positions = [int((ids[0, 0] == h).nonzero()[0, 0]) for h in handle_ids]
    m.unet.train()
    embs = [te.get_input_embeddings().weight for te in encoders]
    rows = torch.ones(embs[0].shape[0], dtype=torch.bool, device=device)
    rows[handle_ids] = False
    for te, e in zip(encoders, embs):
        te.train()
        e.requires_grad_(True)
    keep = [(e, e.detach()[rows].clone()) for e in embs]
    optimizer = torch.optim.AdamW(embs, lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    factor = 2 ** (len(m.vae.config.block_out_channels) - 1)
    resolution = m.vae.config.sample_size
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1).to(device)
    latent_size = resolution // factor
    sizes = available_sizes(m.unet, latent_size)
    map_size = min(sizes, key=lambda s: (abs(s - max(1, latent_size // 4)), s))
    map_layers = select_layers(m.unet, latent_size, sizes=[map_size])
    masks = bs._masks(resolution)
    store, restore = install_naive_capture(m.unet)
    state = bs.State(
        mode="naive", phase=1, precision=precision, device=device, vae=m.vae, unet=_XLUNet(m, resolution),
        text_encoder=_XLText(m), scheduler=m.scheduler, optimizer=optimizer, trainable=embs, ids=ids,
        positions=positions, image=image, latent_stats=None,
        latent_mask=resize_masks(masks, latent_size).amax(dim=0)[None, None].to(device),
        map_masks=resize_masks(masks, map_size)[None].to(device), map_size=map_size, map_layers=map_layers,
        store=store, restore=restore, keep_rows=None, gen=torch.Generator(device="cpu").manual_seed(seed + 1),
        extras={"latent_size": latent_size, "map_size": map_size, "captured_layers": None},
    )
    modules = {"unet": m.unet, "text_encoders": encoders}
    return state, modules, (rows, keep)


def _optimizer_like(old, params, lr: float, use_8bit: bool):
    """A new optimizer over ``params`` with ``old``'s betas, eps and weight decay (8-bit AdamW or the same
    class as ``old``)."""
    g = old.param_groups[0]
    kw = dict(lr=lr, betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"])
    if use_8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    return type(old)(params, **kw)


def run_naive(c: dict, timer: Timer) -> dict:
    import torch

    import bench_step as bs
    from scenetok.methods import get_method

    n1, n2 = c["steps_run"]
    device, precision = c["device"], c["precision"]
    xl = c["arch"] in ("sdxl", "tiny-xl")
    if xl:
        s, modules, restore_rows = _naive_setup_xl(c["path"], precision, device)
    else:
        s = bs.setup(Path(c["path"]), "naive", 1, precision, device)
        modules, restore_rows = {"unet": s.unet, "text_encoders": [s.text_encoder]}, None
    unet, encoders = modules["unet"], modules["text_encoders"]
    wrong = {str(p.dtype) for mod in [unet, *encoders, s.vae] for p in mod.parameters()} - {"torch.float32"}
    if wrong:
        raise RuntimeError(f"the naive set-up loaded weights in {sorted(wrong)}, not fp32")
    low = c["memory"] != "normal"
    if low:  # the reference script's --gradient_checkpointing (and --use_8bit_adam)
        unet.enable_gradient_checkpointing()
        for te in encoders:
            te.gradient_checkpointing_enable()
    if c["memory"] == "low":
        s.optimizer = _optimizer_like(s.optimizer, s.trainable, s.optimizer.param_groups[0]["lr"], True)
    lr2 = get_method("break-a-scene").defaults()["phase2"]["lr"]

    def step():
        loss = bs.train_step(s)
        if restore_rows is not None and s.phase == 1:  # SDXL: both encoders' non-handle rows put back
            rows, keep = restore_rows
            with torch.no_grad():
                for emb, values in keep:
                    emb[rows] = values
        return loss

    losses = []
    timer.ready()
    for i in range(n1):
        losses.append(step())
        timer.step(i + 1)
    if n1 == 0:
        timer.end_phase()
    # phase 2 in place (bench_step.setup's phase-2 branch): UNet + text encoder(s) train, plain AdamW at 2e-6
    s.phase, s.keep_rows = 2, None
    unet.requires_grad_(True)
    for te in encoders:
        te.requires_grad_(True)
    s.trainable = [p for mod in [unet, *encoders] for p in mod.parameters()]
    s.optimizer = _optimizer_like(s.optimizer, s.trainable, lr2, c["memory"] == "low")
    for i in range(n2):
        losses.append(step())
        timer.step(n1 + i + 1)
    s.restore()
    finite = all(math.isfinite(v) for v in losses)
    note = {} if finite else {"note": "the loss was not finite at some step (random weights; the naive path has no "
                                      "fp16 loss scaling): the timing stands, the numbers trained do not"}
    return {**note, "resolution": s.image.shape[-1], "first_loss": losses[0] if losses else None, "losses_finite": finite,
            "captured_layers": s.extras.get("captured_layers"), "finish_s": timer._sync() - timer.ends[-1]
            if timer.ends else None}


def _median_timed(d: list[float], warmup: int) -> tuple[float | None, int]:
    if not d:
        return None, 0
    timed = d[min(warmup, len(d) - 1):]
    return statistics.median(timed), len(timed)


def _start_up(cuda: bool) -> None:
    """What every Python process pays once before any run (imports, the CUDA context), kept off the clock."""
    import torch

    import bench_step  # noqa: F401
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from scenetok.training import trainer  # noqa: F401

    if cuda:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()


def run_case(c: dict) -> dict:
    t = time.perf_counter()
    import torch

    if c.get("threads"):
        torch.set_num_threads(c["threads"])
    cuda = c["device"].startswith("cuda")
    _start_up(cuda)
    startup_s = time.perf_counter() - t
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = Timer(c["device"], c["steps_run"][0], c.get("deadline_s"))
    res: dict = {"status": "ok", "startup_s": startup_s}
    try:
        res.update((run_ours if c["mode"] == "ours" else run_naive)(c, timer))
    except DeadlineReached as exc:
        res.update(status="stopped", note=str(exc))
    except Exception as exc:  # noqa: BLE001 - an OOM (or any failure) becomes a row, not a crash
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        if oom and cuda:
            at = torch.cuda.max_memory_allocated() / GIB
            res.update(status="oom", oom_at_gib=at, note=f"OOM at {at:.1f} GiB allocated: {str(exc).splitlines()[0]}")
        else:
            first = (str(exc).splitlines() or [""])[0]
            res.update(status="error", error=f"{type(exc).__name__}: {first}"[:300])
    total = timer._sync() - timer.t0
    d1, d2 = timer.durations()
    s1, k1 = _median_timed(d1, c["warmup"])
    s2, k2 = _median_timed(d2, c["warmup"])
    n1, n2 = c["steps"]
    r1, r2 = len(d1), len(d2)
    res.update(steps_done=[r1, r2], s_step_p1=s1, s_step_p2=s2, timed_steps=[k1, k2],
               setup_s=(timer.ready_t - timer.t0) if timer.ready_t else None, total_measured_s=total,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    complete = res["status"] == "ok" and (r1, r2) == (n1, n2)
    missing = [(n - r, s) for n, r, s in ((n1, r1, s1), (n2, r2, s2)) if n > r]
    if complete:
        res.update(total_s=total, extrapolated=False)
    elif res["status"] in ("ok", "stopped") and all(s is not None for _, s in missing):
        extra = sum(k * s for k, s in missing)
        if res["status"] == "stopped" and c["mode"] == "ours":  # the bundle was not written: add the prior's
            extra += PRIORS[c["arch"]][2]
            res["note"] = res.get("note", "") + "; bundle write time from the prior guess"
        res.update(total_s=total + extra, extrapolated=True)
    else:
        res.update(total_s=None, extrapolated=False)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        res.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB)
        final = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())  # since phase 1 ended
        peaks = timer.phase_peaks + [final]
        res.update(peak_alloc_gib=max(a for a, _ in peaks) / GIB, peak_reserved_gib=max(r for _, r in peaks) / GIB,
                   peak_alloc_p1_gib=timer.phase_peaks[0][0] / GIB if timer.phase_peaks else None,  # incl. set-up
                   peak_alloc_p2_gib=final[0] / GIB if timer.phase_peaks else None)  # incl. the bundle write
    return res


# ----------------------------------------------------------------------------------------------------
# driver


def _fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def fmt_table(rows: list[dict], cuda: bool) -> str:
    mem = ["peak alloc GiB", "peak reserved GiB"] if cuda else ["peak RSS MiB"]
    full = "+".join(map(str, rows[0]["steps"])) if rows else "400+400"
    head = ["arch", "px", "precision", "mode", "memory", "steps run", "s/step p1", "s/step p2",
            f"full run s ({full})", *mem, "naive ÷ ours time", "ours ÷ naive peak", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    by_key = {(r["arch"], r["precision"], r["memory"], r["mode"]): r for r in rows}
    for r in rows:
        full = f"{r['steps'][0]}+{r['steps'][1]}"
        note = r.get("note") or r.get("error") or ""
        if r["status"] == "skipped":
            cells = [r["arch"], "", r["precision"], r["mode"], r["memory"], "–", "–", "–", "–", *["–"] * len(mem),
                     "", "", f"skipped: {note}"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        total = _fmt(r.get("total_s"), ".1f")
        if r.get("extrapolated"):
            total = f"~{total} (extrapolated)"
        if cuda:
            memcells = [_fmt(r.get("peak_alloc_gib"), ".2f"), _fmt(r.get("peak_reserved_gib"), ".2f")]
        else:
            memcells = [_fmt(r.get("peak_rss_mib"), ".0f")]
        vs_time = vs_mem = ""
        naive = by_key.get((r["arch"], r["precision"], r["memory"], "naive"))
        if r["mode"] == "ours" and naive:
            if r.get("total_s") and naive.get("total_s"):
                vs_time = f"{naive['total_s'] / r['total_s']:.2f}×"
            key = "peak_alloc_gib" if cuda else "peak_rss_mib"
            if r.get(key) and naive.get(key) and naive["status"] == "ok":
                vs_mem = f"{r[key] / naive[key]:.2f}×"
        status = "" if r["status"] == "ok" else r["status"] + ": "
        done = r.get("steps_done") or [0, 0]
        cells = [r["arch"], str(r.get("resolution") or ""), r["precision"], r["mode"], r["memory"],
                 f"{done[0]}+{done[1]} of {full}", _fmt(r.get("s_step_p1"), ".3f"), _fmt(r.get("s_step_p2"), ".3f"),
                 total, *memcells, vs_time, vs_mem, (status + note).replace("|", "/")[:160]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(rows: list[dict], cuda: bool) -> list[str]:
    """The issue's two targets, checked on the SD 2.1 rows (GPU only)."""
    sd = [r for r in rows if r["arch"] == "sd21" and r["mode"] == "ours" and r["status"] == "ok"]
    if not cuda or not sd:
        return []
    out = []
    timed = [r for r in sd if r.get("total_s")]
    if timed:
        best = min(timed, key=lambda r: r["total_s"])
        verdict = "met" if best["total_s"] <= 60 else "NOT met"
        how = "extrapolated" if best["extrapolated"] else "measured"
        out.append(f"target: full SD 2.1 run (ours) <= 60 s: {best['total_s']:.1f} s ({how}; {best['precision']}, "
                   f"memory {best['memory']}) -> {verdict}")
    low = [r for r in sd if r["memory"] == "low" and r.get("peak_alloc_gib")]
    if low:
        best = min(low, key=lambda r: r["peak_alloc_gib"])
        gb = best["peak_alloc_gib"] * GIB / 1e9
        out.append(f"target: SD 2.1 peak <= 12 GB with the memory preset (ours, memory low): {best['peak_alloc_gib']:.2f} "
                   f"GiB = {gb:.2f} GB ({best['precision']}) -> {'met' if gb <= 12 else 'NOT met'}")
    else:
        out.append("target: SD 2.1 peak <= 12 GB with the memory preset: no completed 'ours, memory low' SD 2.1 row")
    return out


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _meta(args, cuda: bool) -> dict:
    import diffusers
    import torch
    import transformers

    meta = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "device": args.device, "steps": args.steps, "warmup": args.warmup, "budget_minutes": args.budget_minutes,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg": os.getloadavg()}
    if cuda:  # the GPU's name comes from the first case (no CUDA context in this process)
        meta.update(cuda=torch.version.cuda)
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is not None:
        from importlib.metadata import version

        meta["bitsandbytes"] = version("bitsandbytes")
    return meta


def _run_subprocess(flag: str, payload: str, timeout: float | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, payload]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"killed after {timeout:.0f} s (--case-timeout / the budget)"}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode and proc.returncode < 0:
            tail = f"killed by signal {-proc.returncode} (out of host memory?); {tail}"
        return {"status": "error", "error": tail[:300]}
    return json.loads(line[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", help=f"comma list of: {', '.join(ARCHS)} (default sd21,sdxl; --smoke: tiny)")
    p.add_argument("--precisions", help="comma list of: bf16, fp16, fp32 (default bf16,fp16; --smoke: bf16)")
    p.add_argument("--modes", default="ours,naive", help="comma list of: ours, naive")
    p.add_argument("--memory", help="comma list of: normal, low (checkpointing + 8-bit AdamW), low-adamw "
                                    "(checkpointing, plain AdamW) (default normal,low; --smoke: normal,low-adamw)")
    p.add_argument("--steps", help="phase 1,phase 2 steps of the full run (default 400,400; --smoke: 3,3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of each phase (default 5; "
                                                            "--smoke: 1); the median of the rest is reported")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="fit the whole table (model builds included) in about this time: each case runs fewer "
                        "steps and its full-run time is extrapolated (labelled); each case also stops at its "
                        "share of the budget")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (--smoke: cpu)")
    p.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, a few steps: tests the script")
    p.add_argument("--estimate", action="store_true", help="print the plan and its time estimate, run nothing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra trainer setting for the ours rows (e.g. preview_every=100); repeatable")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per case (default: torch's)")
    p.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "scenetok-bench-models"),
                   help="random models are built here once and reused (SDXL: ~7 GB)")
    p.add_argument("--work-dir", default=None, help="scratch folder of the ours bundles (default: a temp folder)")
    p.add_argument("--case-timeout", type=float, default=3600, help="seconds per case before it is killed")
    p.add_argument("--out", help="JSON with every field of every row plus machine metadata (rewritten after "
                                 "each case, atomically)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print RESULT json
    p.add_argument("--build", help=argparse.SUPPRESS)  # internal: build one model, print RESULT json
    args = p.parse_args(argv)

    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return 0
    if args.build:
        b = json.loads(args.build)
        t = time.perf_counter()
        path = build_model(Path(b["model_dir"]), b["arch"], b["device"])
        print("RESULT " + json.dumps({"status": "ok", "path": str(path), "build_s": time.perf_counter() - t}))
        return 0

    smoke = args.smoke
    args.archs = args.archs or ("tiny" if smoke else "sd21,sdxl")
    args.precisions = args.precisions or ("bf16" if smoke else "bf16,fp16")
    args.memory = args.memory or ("normal,low-adamw" if smoke else "normal,low")
    args.steps = args.steps or ("3,3" if smoke else "400,400")
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    args.device = args.device or ("cpu" if smoke else "cuda")

    def items(value: str, allowed, what: str) -> list[str]:
        got = [x.strip() for x in value.split(",") if x.strip()]
        bad = [x for x in got if x not in allowed]
        if bad or not got:
            p.error(f"--{what}: unknown {bad or value!r}; choose from {', '.join(allowed)}")
        return got

    archs = items(args.archs, ARCHS, "archs")
    precisions = items(args.precisions, PRECISIONS, "precisions")
    modes = items(args.modes, MODES, "modes")
    memories = items(args.memory, MEMORY, "memory")
    try:
        n1, n2 = (int(x) for x in args.steps.split(","))
        assert n1 >= 0 and n2 >= 0 and n1 + n2 > 0
    except (ValueError, AssertionError):
        p.error(f"--steps: expected two step counts like 400,400, got {args.steps!r}")
    cuda = args.device.startswith("cuda")
    cpu = not cuda

    if cuda and not args.estimate:
        import torch

        if not torch.cuda.is_available():
            print(f"bench_gpu: no CUDA device here (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
                  "run it on a GPU machine, or pass --device cpu (--smoke: the tiny model)", file=sys.stderr)
            return 2
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None

    # ---- the plan
    cases = []
    for arch in archs:
        for precision in precisions:
            for memory in memories:
                for mode in modes:
                    row = {"arch": arch, "precision": precision, "mode": mode, "memory": memory, "steps": [n1, n2]}
                    if memory == "low" and not have_bnb:
                        row.update(status="skipped", note="8-bit AdamW needs bitsandbytes, which is not installed "
                                                          "(pip install 'scenetok[lowmem]'); see the low-adamw rows")
                    cases.append(row)
    model_dir = Path(args.model_dir)
    to_build = [a for a in archs if not (model_path(model_dir, a) / ".complete").exists()]
    build_est = sum(PRIORS[a][0] * (3.0 if cpu and a in ("sd21", "sdxl") else 1.0) for a in to_build)
    runnable = [c for c in cases if c.get("status") != "skipped"]
    budget = args.budget_minutes * 60 if args.budget_minutes else None
    min_steps = min(max(2, args.warmup + 2), max(n1, n2))
    print(f"plan: {len(runnable)} cases ({len(cases) - len(runnable)} skipped), full run {n1}+{n2} steps, "
          f"warm-up {args.warmup}, device {args.device}" + (f", budget {budget / 60:.1f} min" if budget else ""),
          file=sys.stderr)
    if to_build:
        print(f"  build random models: {', '.join(to_build)} (~{build_est:.0f} s)", file=sys.stderr)
    est_total = build_est
    for c in runnable:
        fixed, s1, s2 = prior_parts(c["arch"], c["mode"], c["memory"], c["precision"], cpu)
        allowance = max(0.0, budget - build_est) / len(runnable) - STARTUP_S if budget else math.inf
        c["steps_plan"], est = plan_steps(fixed, s1, s2, allowance, n1, n2, min_steps)
        est += STARTUP_S
        est_total += est
        print(f"  {c['arch']} {c['precision']} {c['mode']} memory={c['memory']}: {c['steps_plan'][0]}+"
              f"{c['steps_plan'][1]} steps, ~{est:.0f} s", file=sys.stderr)
    print(f"estimate: ~{est_total / 60:.1f} min in all (prior guesses for one H100/H200-class GPU"
          f"{', scaled for a CPU' if cpu else ''}, not measurements; with --budget-minutes the measured cases "
          "re-plan the rest)", file=sys.stderr)
    if args.estimate:
        return 0

    # ---- the models
    t_start = time.perf_counter()
    paths = {}
    build_s = {}
    for arch in archs:
        print(f"model {arch} ...", file=sys.stderr, flush=True)
        res = _run_subprocess("--build", json.dumps({"model_dir": str(model_dir), "arch": arch,
                                                      "device": args.device}), args.case_timeout)
        if res.get("status") != "ok":
            print(f"bench_gpu: building the {arch} model failed: {res.get('error')}", file=sys.stderr)
            return 1
        paths[arch], build_s[arch] = res["path"], res["build_s"]
        print(f"  {res['path']} ({res['build_s']:.0f} s)", file=sys.stderr, flush=True)

    # ---- the cases
    work_root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    work_root.mkdir(parents=True, exist_ok=True)
    meta = _meta(args, cuda)
    meta["model_build_s"] = build_s
    startups = []  # seconds each case process spent outside its own clock (start-up, exit)
    calib = []  # (measured fixed s, prior fixed s, measured step s, prior step s) of the finished cases
    rows = []

    def write_out(final: bool) -> str:
        table = fmt_table(rows, cuda)
        if args.out:
            _atomic_write(Path(args.out), json.dumps({"meta": meta, "complete": final, "results": rows,
                                                      "table": table, "targets": target_lines(rows, cuda)}, indent=2))
        return table

    left = list(runnable)
    for c in cases:
        if c.get("status") == "skipped":
            rows.append(dict(c))
            continue
        left.remove(c)
        steps_run, deadline = c["steps_plan"], None
        if budget:  # re-plan with what the finished cases measured (their time / the prior's, fixed and steps apart)
            fixed, s1, s2 = prior_parts(c["arch"], c["mode"], c["memory"], c["precision"], cpu)
            if calib:
                f_fixed = min(10.0, max(0.1, sum(x[0] for x in calib) / max(sum(x[1] for x in calib), 1e-9)))
                f_step = min(10.0, max(0.1, sum(x[2] for x in calib) / max(sum(x[3] for x in calib), 1e-9)))
                fixed, s1, s2 = fixed * f_fixed, s1 * f_step, s2 * f_step
            startup = statistics.mean(startups) if startups else STARTUP_S
            allowance = (budget - (time.perf_counter() - t_start)) / (len(left) + 1) - startup
            steps_run, _ = plan_steps(fixed, s1, s2, allowance, n1, n2, min_steps)
            _, least = plan_steps(fixed, s1, s2, 0.0, n1, n2, min_steps)
            deadline = 1.5 * max(allowance, least, 30.0)  # the steps stop there (the minimum always gets its time)
        work = Path(tempfile.mkdtemp(prefix="case-", dir=work_root))
        case = {"arch": c["arch"], "path": paths[c["arch"]], "mode": c["mode"], "memory": c["memory"],
                "precision": c["precision"], "device": args.device, "steps": [n1, n2], "steps_run": steps_run,
                "warmup": args.warmup, "deadline_s": deadline, "threads": args.threads, "set": args.set,
                "work_dir": str(work)}
        label = f"{c['arch']} {c['precision']} {c['mode']} memory={c['memory']} ({steps_run[0]}+{steps_run[1]} steps)"
        print(f"running {label} ...", file=sys.stderr, flush=True)
        timeout = args.case_timeout if deadline is None else min(args.case_timeout, deadline + 300)
        t_case = time.perf_counter()
        res = _run_subprocess("--case", json.dumps(case), timeout)
        if res.get("total_measured_s"):
            startups.append(time.perf_counter() - t_case - res["total_measured_s"])
        shutil.rmtree(work, ignore_errors=True)
        row = {"arch": c["arch"], "precision": c["precision"], "mode": c["mode"], "memory": c["memory"],
               "steps": [n1, n2], "steps_planned": steps_run, **res}
        rows.append(row)
        if row.get("gpu") and "gpu" not in meta:
            meta.update(gpu=row["gpu"], gpu_memory_gib=row["gpu_memory_gib"])
        if row.get("total_measured_s") and row["status"] in ("ok", "stopped"):
            done = row.get("steps_done") or steps_run
            fixed, s1, s2 = prior_parts(c["arch"], c["mode"], c["memory"], c["precision"], cpu)
            meas_fixed = (row.get("setup_s") or 0.0) + (row.get("finish_s") or 0.0)
            calib.append((meas_fixed, fixed, row["total_measured_s"] - meas_fixed, done[0] * s1 + done[1] * s2))
        msg = row.get("note") or row.get("error") or ""
        print(f"  {row['status']}: p1 {_fmt(row.get('s_step_p1'), '.3f')} s/step, p2 "
              f"{_fmt(row.get('s_step_p2'), '.3f')} s/step, full run {_fmt(row.get('total_s'), '.1f')} s"
              f"{' (extrapolated)' if row.get('extrapolated') else ''}"
              + (f", peak {row['peak_alloc_gib']:.2f} GiB" if row.get("peak_alloc_gib") else "")
              + (f" — {msg}" if msg else ""), file=sys.stderr, flush=True)
        write_out(final=False)
    if not args.work_dir:
        shutil.rmtree(work_root, ignore_errors=True)

    table = write_out(final=True)
    print(table)
    for line in target_lines(rows, cuda):
        print(line)
    print(f"(wall time of the whole table: {(time.perf_counter() - t_start) / 60:.1f} min)", file=sys.stderr)
    return 0 if all(r["status"] in ("ok", "skipped", "oom", "stopped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
