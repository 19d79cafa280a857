"""Memory budget of SD 2.1 and SDXL training, on paper: exact parameter counts of the real architectures
(random weights, never downloaded) × bytes per parameter, plus the activation memory one training step keeps
for the backward pass, *traced* (not run) with PyTorch's FakeTensorMode at each resolution: every tensor
autograd saves is counted once (by storage), parameters excluded. No GPU needed; the numbers are estimates
of what ``torch.cuda.max_memory_allocated`` would show (allocator slack, CUDA context and cuDNN workspaces
are not in them). Results: docs/benchmarks.md ("Memory budget: SD 2.1 and SDXL").

The budget of a Break-A-Scene phase 2 (UNet + text encoders + handles train) is built from them per setting:
weights, gradients, optimizer state, activations. With ``optim.step_in_backward`` (on with ``--memory low``)
there is no gradient buffer for the trained weights: each tensor is stepped, and its gradient freed, as soon
as the backward pass has completed it, so only the largest tensor's gradient (and its bias's) is counted.

    python benchmarks/memory_budget.py            # prints the markdown tables
    python benchmarks/memory_budget.py --budget-only  # the phase-2 budget tables, activations from the last trace
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SD21_UNET = dict(sample_size=96, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                 attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, projection_dim=1024, hidden_act="gelu")
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), latent_channels=4,
           layers_per_block=2)


def _count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def param_counts() -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return {
        "sdxl_unet": _count(lambda: UNet2DConditionModel(**SDXL_UNET)),
        "sd21_unet": _count(lambda: UNet2DConditionModel(**SD21_UNET)),
        "clip_l": _count(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))),
        "clip_g": _count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))),
        "openclip_h": _count(lambda: CLIPTextModel(CLIPTextConfig(**OPENCLIP_H))),
        "vae": _count(lambda: AutoencoderKL(**VAE)),
    }


def trained_tensors(arch: str) -> dict[str, list[int]]:
    """Element counts of the tensors a Break-A-Scene phase 2 trains on ``arch`` (``sdxl`` or ``sd21``), per
    component: the whole UNet, the text encoder(s) but their vocabulary (``token_embedding``; the handle
    rows, a few kilobytes, are left out), built on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def sizes(build, skip=None):
        with torch.device("meta"):
            return [p.numel() for n, p in build().named_parameters() if skip is None or skip not in n]

    if arch == "sdxl":
        return {"unet": sizes(lambda: UNet2DConditionModel(**SDXL_UNET)),
                "clip_l": sizes(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)), "token_embedding"),
                "clip_g": sizes(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), "token_embedding")}
    return {"unet": sizes(lambda: UNet2DConditionModel(**SD21_UNET)),
            "openclip_h": sizes(lambda: CLIPTextModel(CLIPTextConfig(**OPENCLIP_H)), "token_embedding")}


# 8-bit AdamW (bitsandbytes) keeps two 8-bit moments for tensors of at least this many elements (its
# min_8bit_size) plus a float per 2048-element block; smaller tensors keep fp32 moments
BNB_MIN_8BIT = 4096


def adam_state_bytes(numels: list[int], eight_bit: bool) -> int:
    if not eight_bit:
        return 8 * sum(numels)
    return sum(2 * n + 2 * 4 * -(-n // 2048) if n >= BNB_MIN_8BIT else 8 * n for n in numels)


def phase2_budget(arch: str, act_saved: float, act_block: float, act_fp32: float) -> list[tuple]:
    """Rows ``(setting, weights, gradients, optimizer, activations, total)`` in bytes of a Break-A-Scene
    phase 2 on ``arch``. ``act_saved``: what a checkpointed UNet keeps for backward (bf16); ``act_block``: the
    largest top-level block's saved set, recomputed during the backward pass; ``act_fp32``: everything an
    fp32 UNet without checkpointing keeps.

    Activation gradients: in the backward pass the gradients of the tensors a checkpointed UNet keeps (block
    boundaries, skip connections) are alive, about as large as those tensors, so ``act_saved`` is counted a
    second time for them (and ``act_fp32``'s checkpoint share, doubled for fp32, without checkpointing).
    Weights: every trained component in fp32 (the VAE is on the CPU with ``--memory low``; on the GPU, fp32,
    in the default row); the frozen vocabulary rows count as weights, not as trained tensors."""
    counts = param_counts()
    trained = trained_tensors(arch)
    numels = [n for sizes in trained.values() for n in sizes]
    total_trained = sum(numels)
    if arch == "sdxl":
        weights = counts["sdxl_unet"] + counts["clip_l"] + counts["clip_g"]
    else:
        weights = counts["sd21_unet"] + counts["openclip_h"]
    largest = 2 * 4 * max(numels)  # the largest tensor's gradient and one more (a bias, the next tensor)
    low_act = act_saved + act_block + act_saved
    rows = [
        ("default (fp32, AdamW, no checkpointing)", 4 * (weights + counts["vae"]), 4 * total_trained,
         adam_state_bytes(numels, False), act_fp32 + 2 * act_saved),
        ("`--memory low --set optim.step_in_backward=false` + `optim.use_8bit=true`", 4 * weights,
         4 * total_trained, adam_state_bytes(numels, True), low_act),
        ("`--memory low` (AdamW, steps in backward)", 4 * weights, largest, adam_state_bytes(numels, False), low_act),
        ("**`--memory low` + `optim.use_8bit=true` (steps in backward)**", 4 * weights, largest,
         adam_state_bytes(numels, True), low_act),
    ]
    return [(name, w, g, o, a, w + g + o + a) for name, w, g, o, a in rows]


def _build_unet(cfg: dict, dtype):
    from diffusers import UNet2DConditionModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # (fake tensors cannot be cast after construction)
    try:
        return UNet2DConditionModel(**cfg)
    finally:
        torch.set_default_dtype(old)


def saved_activation_bytes(unet_cfg: dict, resolution: int, *, checkpointing: bool, batch: int = 1,
                           dtype=torch.bfloat16) -> int:
    """Bytes autograd keeps for the backward pass of one UNet forward (bf16 weights), traced, not run."""
    latent = resolution // 8
    saved: dict[int, int] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet = _build_unet(unet_cfg, dtype)
        unet.train()
        unet.requires_grad_(True)  # full fine-tuning (phase 2): everything needs gradients
        if checkpointing:
            unet.enable_gradient_checkpointing()
        params = {p.untyped_storage()._cdata for p in unet.parameters()}

        def pack(t):
            key = t.untyped_storage()._cdata
            if key not in params:
                saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
            return t

        x = torch.randn(batch, 4, latent, latent, dtype=dtype)
        ctx = torch.randn(batch, 77, unet_cfg["cross_attention_dim"], dtype=dtype)
        extra = {}
        if unet_cfg.get("addition_embed_type") == "text_time":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, dtype=dtype),
                                          "time_ids": torch.randn(batch, 6, dtype=dtype)}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, torch.tensor([500] * batch), ctx, **extra)
    return sum(saved.values())


def block_peak_bytes(unet_cfg: dict, resolution: int, dtype=torch.bfloat16) -> int:
    """The largest activation set one top-level block keeps (what a checkpointed block recomputes in the
    backward pass on top of the checkpoints), traced."""
    latent = resolution // 8
    per_block: dict[str, int] = {}
    current = {"name": None}
    seen: set[int] = set()
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet = _build_unet(unet_cfg, dtype)
        unet.requires_grad_(True)
        params = {p.untyped_storage()._cdata for p in unet.parameters()}
        blocks = [(f"down{i}", b) for i, b in enumerate(unet.down_blocks)] + [("mid", unet.mid_block)]
        blocks += [(f"up{i}", b) for i, b in enumerate(unet.up_blocks)]
        for name, b in blocks:
            b.register_forward_pre_hook(lambda m, a, n=name: current.update(name=n))
            b.register_forward_hook(lambda m, a, o: current.update(name=None))

        def pack(t):
            key = t.untyped_storage()._cdata
            if current["name"] and key not in params and key not in seen:
                seen.add(key)
                per_block[current["name"]] = per_block.get(current["name"], 0) + t.untyped_storage().nbytes()
            return t

        x = torch.randn(1, 4, latent, latent, dtype=dtype)
        ctx = torch.randn(1, 77, unet_cfg["cross_attention_dim"], dtype=dtype)
        extra = {}
        if unet_cfg.get("addition_embed_type") == "text_time":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, dtype=dtype),
                                          "time_ids": torch.randn(1, 6, dtype=dtype)}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, torch.tensor([500]), ctx, **extra)
    return max(per_block.values())


# the traced activations in GiB (``full``, ``checkpointed``, ``largest block``), as main() last printed them
# (docs/benchmarks.md); --budget-only builds the budget from these instead of tracing again
TRACED_GIB = {("sd21", 512): (0.87, 0.14, 0.31), ("sd21", 768): (1.96, 0.32, 0.68),
              ("sdxl", 512): (1.62, 0.14, 0.55), ("sdxl", 768): (3.62, 0.31, 1.22),
              ("sdxl", 1024): (6.41, 0.55, 2.16)}
BUDGETS = (("sdxl", "SDXL", 1024), ("sd21", "SD 2.1", 512), ("sd21", "SD 2.1", 768))


def print_budget(traced: dict) -> None:
    gb = 2 ** 30
    for arch, name, res in BUDGETS:
        full, ck, block = (v * gb for v in traced[(arch, res)])
        trained = sum(n for sizes in trained_tensors(arch).values() for n in sizes)
        print(f"\n**{name} phase 2 at {res}** ({trained / 1e6:,.0f} M trained parameters)\n")
        print("| setting | weights | gradients | optimizer | activations | total (estimate) |\n|---|---:|---:|---:|---:|---:|")
        for setting, *parts in phase2_budget(arch, ck, block, 2 * full):
            print(f"| {setting} | " + " | ".join(f"{v / gb:.1f} GiB" for v in parts[:-1]) + f" | **{parts[-1] / gb:.1f} GiB** |")


def main(budget_only: bool = False) -> None:
    gb = 2 ** 30
    if budget_only:
        print_budget(TRACED_GIB)
        return
    counts = param_counts()
    print("| part | parameters |\n|---|---:|")
    for k, v in counts.items():
        print(f"| {k} | {v / 1e6:,.1f} M |")
    print()
    print("| model | resolution | saved activations, no checkpointing | with checkpointing | + largest block "
          "recomputed |\n|---|---:|---:|---:|---:|")
    traced = {}
    for arch, name, cfg, sizes in (("sd21", "SD 2.1", SD21_UNET, (512, 768)),
                                   ("sdxl", "SDXL", SDXL_UNET, (512, 768, 1024))):
        for res in sizes:
            full = saved_activation_bytes(cfg, res, checkpointing=False)
            ck = saved_activation_bytes(cfg, res, checkpointing=True)
            peak = block_peak_bytes(cfg, res)
            traced[(arch, res)] = (full / gb, ck / gb, peak / gb)
            print(f"| {name} | {res} | {full / gb:.2f} GiB | {ck / gb:.2f} GiB | {(ck + peak) / gb:.2f} GiB |")
    print_budget(traced)


if __name__ == "__main__":
    import sys

    with contextlib.suppress(KeyboardInterrupt):
        main(budget_only="--budget-only" in sys.argv[1:])
