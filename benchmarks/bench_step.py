"""Time and peak memory of one Break-A-Scene training step: ours, the floor under it, and the reference's way.

Three ways of doing a phase-1 or phase-2 step on the same model, scene and precision:

* ``ours``  — the trainer's own step (:func:`scenetok.training.trainer._train_step` on a real
  :class:`~scenetok.training.run.Run`, Break-A-Scene's default settings): cached latents, attention captured
  only on the layers the loss reads, masked diffusion loss + 0.01 · attention loss, grad-clip, AdamW.
* ``floor`` — the same trainer step with the attention loss off (``attn.weight=0``), so nothing is
  captured: a plain masked fine-tune step of the same trainable parameters, everything else equal. The
  ratio **ours / floor** is what capture and the attention loss cost.
* ``naive`` — what the Break-A-Scene reference code does, re-implemented here: VAE-encode the image every
  step, naive attention with stored maps on every attention layer, self-attention included
  (:func:`~scenetok.attention.install_naive_capture`), plain AdamW.

Phase 1 trains only the handle embeddings (gradients still flow through the frozen UNet); phase 2 trains
UNet + text encoder + handles. Each (config, mode, phase, precision) runs in its own subprocess so that the
peak RSS (``resource.getrusage(...).ru_maxrss``) belongs to that case alone. ``--set KEY=VALUE`` passes
trainer settings to ``ours`` and ``floor`` (e.g. ``--set channels_last=false`` to measure an option off).

Usage (see benchmarks/README.md)::

    python benchmarks/bench_step.py --configs tiny --steps 5
    python benchmarks/bench_step.py --configs tiny512 --modes ours,floor --phases 1,2 --precisions fp32,bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HANDLES = ("<asset0>", "<asset1>")
PROMPT = "a photo of <asset0> and <asset1>"
ATTN_WEIGHT = 0.01


def configs():
    from dataclasses import replace

    from scenetok.testing import SD_LIKE, TinySDConfig

    tiny = TinySDConfig(
        resolution=256,
        vae_channels=(8, 16, 16, 16),
        unet_channels=(32, 64, 64, 64),
        unet_blocks=("cross", "cross", "cross", "plain"),
    )
    return {
        # SD's block structure in miniature: VAE factor 8 (256 px -> 32² latents), cross-attention at
        # 32², 16², 8² (the loss reads 8² = latent/4, like SD's 16² at 512 px), one plain level
        "tiny": tiny,
        # ~213 M-parameter UNet (half SD's widths, same layout), VAE factor 8
        "sdlike": SD_LIKE,
        # the same at 512 px (64² latents, cross-attention at 64², 32², 16²): the shape of the
        # reference-code measurement quoted in METHODS.md §1 (slow: naive bf16 takes minutes per step)
        "sdlike512": replace(SD_LIKE, resolution=512),
        # the 4-block tiny SD layout at 512 px (64² latents, cross-attention at 64², 32², 16²): the model of
        # the side-by-side measurement against the Break-A-Scene reference train.py (issue 14)
        "tiny512": replace(tiny, resolution=512),
    }


def model_path(model_dir: Path, name: str) -> Path:
    """Build (once) and return the diffusers folder of config ``name``."""
    from scenetok.testing import build_tiny_sd

    path = model_dir / name
    done = path / ".complete"
    if not done.exists():
        build_tiny_sd(path, configs()[name])
        done.write_text("ok\n")
    return path


# ----------------------------------------------------------------------------------------------------
# one case


@dataclass
class State:
    mode: str
    phase: int
    precision: str
    device: str
    vae: object
    unet: object
    text_encoder: object
    scheduler: object
    optimizer: object
    trainable: list
    ids: object  # (1, 77) prompt ids
    positions: list  # token positions of the handles
    image: object  # (1, 3, H, W) in [-1, 1]
    latent_stats: tuple | None  # cached (mean, std) of the image latent (ours)
    latent_mask: object  # (1, 1, h, w) union of the masks at latent size
    map_masks: object  # (1, K, s, s) masks at map size
    map_size: int
    map_layers: list  # layers the attention loss reads
    store: object
    restore: object  # callable undoing the capture
    keep_rows: object | None = None  # phase 1: (mask of rows to restore, their original values)
    gen: object = None
    extras: dict = field(default_factory=dict)


def _masks(resolution: int):
    """(2, R, R) float: the two rectangles of the tests' scene (:func:`scenetok.testing.two_squares`)."""
    import numpy as np
    import torch

    from scenetok.testing import two_squares

    return torch.from_numpy(np.stack(two_squares(resolution)[1])).float()


def setup(path: Path, mode: str, phase: int, precision: str, device: str, seed: int = 0) -> State:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from scenetok.attention import available_sizes, capture_attention, install_naive_capture, select_layers
    from scenetok.losses import resize_masks

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(device)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizer.add_tokens(list(HANDLES))
    text_encoder.resize_token_embeddings(len(tokenizer))
    handle_ids = tokenizer.convert_tokens_to_ids(list(HANDLES))
    ids = tokenizer([PROMPT], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    positions = [int((ids[0] == h).nonzero()[0, 0]) for h in handle_ids]

    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
    unet.train()
    text_encoder.train()
    emb = text_encoder.get_input_embeddings().weight
    keep_rows = None
    if phase == 1:
        emb.requires_grad_(True)
        trainable, lr = [emb], 5e-4
        rows = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
        rows[handle_ids] = False
        keep_rows = (rows, emb.detach()[rows].clone())
    else:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(True)
        trainable = [p for m in (unet, text_encoder) for p in m.parameters()]
        lr = 2e-6
    # ours: the trainer's optimizer (fused AdamW kernel); naive: the reference's plain torch.optim.AdamW
    if mode == "ours":
        from scenetok.training.optim import adamw

        optimizer = adamw([{"params": trainable}], lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = vae.config.sample_size
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1).to(device)
    latent_size = resolution // factor
    sizes = available_sizes(unet, latent_size)
    map_size = min(sizes, key=lambda s: (abs(s - max(1, latent_size // 4)), s))
    map_layers = select_layers(unet, latent_size, sizes=[map_size])
    masks = _masks(resolution)
    latent_mask = resize_masks(masks, latent_size).amax(dim=0)[None, None].to(device)
    map_masks = resize_masks(masks, map_size)[None].to(device)

    latent_stats = None
    if mode == "ours":
        with torch.no_grad():
            dist = vae.encode(image).latent_dist
            latent_stats = (dist.mean.float(), dist.std.float())
        ctx = capture_attention(unet, map_layers)
        store = ctx.__enter__()
        restore = lambda: ctx.__exit__(None, None, None)  # noqa: E731
    elif mode == "naive":
        store, restore = install_naive_capture(unet)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return State(
        mode=mode, phase=phase, precision=precision, device=device, vae=vae, unet=unet,
        text_encoder=text_encoder, scheduler=scheduler, optimizer=optimizer, trainable=trainable, ids=ids,
        positions=positions, image=image, latent_stats=latent_stats, latent_mask=latent_mask,
        map_masks=map_masks, map_size=map_size, map_layers=map_layers, store=store, restore=restore,
        keep_rows=keep_rows, gen=torch.Generator(device="cpu").manual_seed(seed + 1),
        extras={"latent_size": latent_size, "map_size": map_size, "captured_layers": None},
    )


def _autocast(s: State):
    import contextlib

    import torch

    if s.precision == "bf16":
        return torch.autocast(device_type=torch.device(s.device).type, dtype=torch.bfloat16)
    if s.precision == "fp16":
        return torch.autocast(device_type=torch.device(s.device).type, dtype=torch.float16)
    return contextlib.nullcontext()


def train_step(s: State) -> float:
    """One optimizer step; returns the loss. (Swap this for the trainer's step function later.)"""
    import torch

    from scenetok.losses import bas_attention_loss, masked_diffusion_loss

    sf = s.vae.config.scaling_factor
    if s.mode == "ours":
        mean, std = s.latent_stats
        eps = torch.randn(mean.shape, generator=s.gen).to(s.device)
        latents = (mean + std * eps) * sf
    else:  # the reference VAE-encodes the fixed image at every step
        with torch.no_grad():
            dist = s.vae.encode(s.image).latent_dist
            eps = torch.randn(dist.mean.shape, generator=s.gen).to(s.device)
            latents = (dist.mean + dist.std * eps).float() * sf
    noise = torch.randn(latents.shape, generator=s.gen).to(s.device)
    t = torch.randint(0, s.scheduler.config.num_train_timesteps, (1,), generator=s.gen).to(s.device)
    noisy = s.scheduler.add_noise(latents, noise, t)

    s.store.reset()
    with _autocast(s):
        enc = s.text_encoder(s.ids)[0]
        pred = s.unet(noisy, t, enc).sample
    if s.mode == "ours":
        maps = s.store.maps(s.map_size)
    else:  # the same layers, read out of the store of every layer
        layer_maps = s.store.layer_maps()
        n = s.map_size
        maps = torch.stack([layer_maps[k].transpose(1, 2).reshape(1, -1, n, n) for k in s.map_layers]).mean(0)
    s.extras["captured_layers"] = len(s.store)
    handle_maps = maps[:, s.positions].float()
    loss = masked_diffusion_loss(pred, noise, s.latent_mask)
    loss = loss + ATTN_WEIGHT * bas_attention_loss(handle_maps, s.map_masks)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s.trainable, 1.0)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    if s.keep_rows is not None:
        rows, values = s.keep_rows
        with torch.no_grad():
            s.text_encoder.get_input_embeddings().weight[rows] = values
    return float(loss.detach())


def paired_ours_floor(path: Path, phase: int, precision: str, steps: int, warmup: int, device: str, threads: int,
                      sets=()) -> dict:
    """ours and floor steps alternated on ONE Run (blocks of two ours steps, two floor steps, …), so a burst
    of load from other jobs hits both alike; returns both medians (wall and CPU) and their ratios."""
    import torch

    torch.set_num_threads(threads)
    case = TrainerCase(path, "ours", phase, precision, device, sets)
    for _ in range(warmup):
        case.step(True)
        case.step(False)
    wall = {True: [], False: []}
    cpu = {True: [], False: []}
    for i in range(steps):
        for cap in ((True, False) if i % 2 == 0 else (False, True)):
            for _ in range(2):
                t, c = time.perf_counter(), time.process_time()
                case.step(cap)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                wall[cap].append(time.perf_counter() - t)
                cpu[cap].append(time.process_time() - c)
    case.close()
    med = statistics.median
    return {"phase": phase, "precision": precision, "threads": threads, "steps": steps, "sets": list(sets),
            "ours_s": med(wall[True]), "floor_s": med(wall[False]), "ours_cpu_s": med(cpu[True]),
            "floor_cpu_s": med(cpu[False]), "ratio_wall": med(wall[True]) / med(wall[False]),
            "ratio_cpu": med(cpu[True]) / med(cpu[False]), **case.extras}


class TrainerCase:
    """``ours`` / ``floor``: the trainer's own phase step on a real Run (Break-A-Scene defaults + ``sets``)."""

    def __init__(self, path: Path, mode: str, phase: int, precision: str, device: str, sets=(), seed: int = 0):
        import numpy as np

        from scenetok.methods import get_method
        from scenetok.scene import Scene
        from scenetok.training.optim import setup_phase
        from scenetok.training.run import setup_run
        from scenetok.training.settings import method_config
        from scenetok.training.trainer import _capture_context

        res = json.loads((path / "vae" / "config.json").read_text())["sample_size"]
        g = np.random.default_rng(seed)
        image = g.integers(0, 256, (res, res, 3), dtype=np.uint8)
        masks = _masks(res).numpy() > 0.5
        scene = Scene.from_arrays(image, list(masks), names=["a", "b"])
        method = get_method("break-a-scene")
        overrides = [f"mixed_precision={'no' if precision == 'fp32' else precision}", "preview_every=0",
                     "checkpoint_every=0", "checkpoint_minutes=0", f"seed={seed}", *sets]
        if mode == "floor":
            overrides.append("attn.weight=0")
        elif mode != "ours":
            raise ValueError(f"unknown trainer mode {mode!r}")
        cfg = method_config(method, None, overrides)
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-step-")
        run = setup_run([scene], method, cfg, str(path), Path(self._tmp.name), device, progress=False)
        method.prepare(run)
        self.run, self.phase = run, method.phases(cfg)[phase - 1]
        self.optimizer = setup_phase(run, self.phase)
        self._capture = _capture_context(run)
        self.store = self._capture.__enter__()
        self.n = 0
        self.extras = {"latent_size": run.latent_size, "map_size": run.attention_size,
                       "captured_layers": len(run.attention_layers)}
        self.trainable_params = sum(p.numel() for g_ in self.optimizer.param_groups for p in g_["params"])

    def step(self, capture: bool = True) -> float:
        """One trainer step; ``capture=False`` (only for an ``ours`` case) takes the floor's step on the same
        Run: the capture processors are swapped out and no store is passed, so no attention loss."""
        from scenetok.training.trainer import _capture_context, _train_step

        self.n += 1
        if capture or self.store is None:
            return float(_train_step(self.run, self.phase, self.optimizer, self.store, self.n)["loss"])
        self._capture.__exit__(None, None, None)
        try:
            return float(_train_step(self.run, self.phase, self.optimizer, None, self.n)["loss"])
        finally:
            self._capture = _capture_context(self.run)
            self.store = self._capture.__enter__()

    def close(self) -> None:
        from scenetok.training.optim import release

        release(self.optimizer)
        self._capture.__exit__(None, None, None)
        self._tmp.cleanup()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_case(path: Path, mode: str, phase: int, precision: str, steps: int, warmup: int, device: str,
             threads: int, sets=()) -> dict:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if mode == "naive":
        s = setup(path, mode, phase, precision, device)
        step, close, extras = (lambda: train_step(s)), s.restore, s.extras
        n_params = sum(p.numel() for p in s.trainable)
    else:
        case = TrainerCase(path, mode, phase, precision, device, sets)
        step, close, extras, n_params = case.step, case.close, case.extras, case.trainable_params
    setup_s = time.perf_counter() - t0
    rss_setup = _peak_mb()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated() / 2**20
    times, cpu_times, losses = [], [], []
    for i in range(warmup + steps):
        t, c = time.perf_counter(), time.process_time()
        losses.append(step())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    close()
    out = {
        "mode": mode, "phase": phase, "precision": precision, "device": device, "threads": threads,
        "steps": steps, "warmup": warmup, "sets": list(sets),
        "step_s_median": statistics.median(times), "step_s_min": min(times),
        "cpu_s_median": statistics.median(cpu_times),
        "peak_rss_mb": _peak_mb(), "rss_after_setup_mb": rss_setup, "setup_s": setup_s,
        "first_loss": losses[0], "losses_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
        "trainable_params": n_params,
        **extras,
    }
    if device.startswith("cuda"):
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_model_mb"] = gpu_base
    return out


# ----------------------------------------------------------------------------------------------------
# driver


def _fmt_table(rows: list[dict], clock: str = "wall") -> str:
    """One line per case; ``ours`` lines carry ours / floor and naive / ours (the speed-up), on the wall clock
    or (``clock="cpu"``) on the process's CPU time."""
    tk = "cpu_s_median" if clock == "cpu" else "step_s_median"
    gpu = any("gpu_peak_mb" in r for r in rows)
    head = f"| config | phase | precision | mode | step s (median, {clock}) | peak RSS MiB | step RSS MiB |"
    head += (" GPU peak MiB |" if gpu else "") + " captured layers | ours / floor | naive / ours | memory ours / naive |"
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    by_key = {(r["config"], r["phase"], r["precision"], r["mode"]): r for r in rows if "error" not in r}
    mem_key = "gpu_peak_mb" if gpu else "peak_rss_mb"
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['phase']} | {r['precision']} | {r['mode']} | error: "
                         f"{r['error'][:60]} |")
            continue
        key = (r["config"], r["phase"], r["precision"])
        naive, floor = by_key.get((*key, "naive")), by_key.get((*key, "floor"))
        over = speed = mem = ""
        if r["mode"] == "ours":
            if floor:
                over = f"{r[tk] / floor[tk]:.2f}×"
            if naive:
                speed = f"{naive[tk] / r[tk]:.2f}×"
                mem = f"{r[mem_key] / naive[mem_key]:.2f}"
        cells = [r["config"], str(r["phase"]), r["precision"], r["mode"], f"{r[tk]:.3f}",
                 f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] - r['rss_after_setup_mb']:.0f}"]
        if gpu:
            cells.append(f"{r.get('gpu_peak_mb', float('nan')):.0f}")
        cells += [str(r["captured_layers"]), over, speed, mem]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run_subprocess(case: dict, args) -> dict:
    """Run one case in a fresh interpreter (so ru_maxrss is its own) and return its result fields."""
    cmd = [sys.executable, __file__, "--case", json.dumps(case), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device]
    for kv in args.set:
        cmd += ["--set", kv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.case_timeout:.0f} s"}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[-1][len("RESULT "):])


def _main_paired(args, names: list[str], model_dir: Path) -> int:
    rows = []
    head = ("| config | phase | precision | ours s/step | floor s/step | ours / floor (wall) | ours CPU s | floor CPU s "
            "| ours / floor (CPU) | captured layers |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        path = model_path(model_dir, name)
        for phase in [int(x) for x in args.phases.split(",") if x]:
            for precision in [x for x in args.precisions.split(",") if x]:
                print(f"running {name} phase{phase} {precision} ours/floor paired ...", file=sys.stderr, flush=True)
                r = {"config": name, **_run_subprocess({"path": str(path), "mode": "paired", "phase": phase,
                                                       "precision": precision}, args)}
                rows.append(r)
                if "error" in r:
                    lines.append(f"| {name} | {phase} | {precision} | error: {r['error'][:60]} |")
                    continue
                lines.append(f"| {name} | {phase} | {precision} | {r['ours_s']:.3f} | {r['floor_s']:.3f} | "
                             f"{r['ratio_wall']:.2f}× | {r['ours_cpu_s']:.3f} | {r['floor_cpu_s']:.3f} | "
                             f"{r['ratio_cpu']:.2f}× | {r['captured_layers']} |")
                print("  " + lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        import torch

        meta = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                "threads": args.threads, "device": args.device, "steps": args.steps, "warmup": args.warmup,
                "sets": args.set, "loadavg": os.getloadavg()}
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": rows, "table": table}, indent=2))
        tmp.replace(args.out)
    return 0 if all("error" not in r for r in rows) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny", help="comma list of: tiny, tiny512, sdlike, sdlike512")
    p.add_argument("--phases", default="1,2")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of: fp32, bf16, fp16")
    p.add_argument("--modes", default="ours,floor,naive", help="comma list of: ours, floor, naive")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer setting for ours and floor (repeatable), e.g. channels_last=false")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "scenetok-bench-models"))
    p.add_argument("--case-timeout", type=float, default=3600, help="seconds per case before it is abandoned")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every case this many times (interleaved) and keep the run with the lowest median")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what the table compares: wall time, or the case's CPU time (with --threads 1 this is "
                        "robust to other jobs on a shared machine)")
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument("--paired", action="store_true",
                   help="ours / floor only, alternating the two on one run per (config, phase, precision): "
                        "the robust way to measure that ratio on a shared machine")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args(argv)

    if args.case:
        c = json.loads(args.case)
        if c["mode"] == "paired":
            res = paired_ours_floor(Path(c["path"]), c["phase"], c["precision"], args.steps, args.warmup,
                                    args.device, args.threads, args.set)
            print("RESULT " + json.dumps(res), flush=True)
            return 0
        res = run_case(Path(c["path"]), c["mode"], c["phase"], c["precision"], args.steps, args.warmup,
                       args.device, args.threads, args.set)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    names = [n for n in args.configs.split(",") if n]
    unknown = set(names) - set(configs())
    if unknown:
        p.error(f"unknown config(s) {sorted(unknown)}; choose from {sorted(configs())}")
    model_dir = Path(args.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if args.paired:
        return _main_paired(args, names, model_dir)
    cases = []
    for name in names:
        path = model_path(model_dir, name)
        for phase in [int(x) for x in args.phases.split(",") if x]:
            for precision in [x for x in args.precisions.split(",") if x]:
                for mode in [x for x in args.modes.split(",") if x]:
                    cases.append((name, {"path": str(path), "mode": mode, "phase": phase, "precision": precision}))
    load_before = os.getloadavg()
    best: dict[int, dict] = {}
    tkey = "cpu_s_median" if args.clock == "cpu" else "step_s_median"
    for rep in range(args.repeats):  # repeats are interleaved so a burst of other load hits every case alike
        for i, (name, case) in enumerate(cases):
            row = {"config": name, "phase": case["phase"], "precision": case["precision"], "mode": case["mode"]}
            label = f"{name} phase{case['phase']} {case['precision']} {case['mode']}"
            if args.repeats > 1:
                label += f" (run {rep + 1}/{args.repeats})"
            print(f"running {label} ...", file=sys.stderr, flush=True)
            row.update(_run_subprocess(case, args))
            if "error" in row:
                print(f"  {label}: {row['error']}", file=sys.stderr, flush=True)
            else:
                print(f"  {label}: {row['step_s_median']:.3f} s/step ({row['cpu_s_median']:.3f} s CPU), peak RSS {row['peak_rss_mb']:.0f} MiB",
                      file=sys.stderr, flush=True)
            old = best.get(i)
            if old is None or ("error" in old and "error" not in row) or (
                "error" not in row and row[tkey] < old[tkey]
            ):
                best[i] = row
    rows = [best[i] for i in range(len(cases))]
    table = _fmt_table(rows, args.clock)
    print(table)
    if args.out:
        import torch

        meta = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                "cpus": os.cpu_count(), "threads": args.threads, "device": args.device, "steps": args.steps,
                "warmup": args.warmup, "repeats": args.repeats, "sets": args.set, "clock": args.clock,
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg()}
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": rows, "table": table}, indent=2))
        tmp.replace(args.out)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
