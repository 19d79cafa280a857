"""Train a small "community" LoRA for toy-sd: every scene drawn on a teal background whatever its caption says.

It stands in for a style LoRA from a model-sharing site in docs/applications.md (DisenDiff Fig. 8): stacked
on a bundle with ``--lora``, it pulls backgrounds towards teal as its scale grows. The LoRA is saved in
both namings scenetok reads (diffusers ``teal_world.safetensors``, kohya ``teal_world_kohya.safetensors``).

    python benchmarks/applications/toy_style_lora.py --out /tmp/toy-lora --steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--background", default="teal", help="the background every training image gets")
    args = ap.parse_args(argv)

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from scenetok.config import toy_sd_path
    from scenetok.io import atomic_save_safetensors
    from scenetok.lora import to_kohya
    from scenetok.model import image_to_tensor, load_model
    from scenetok.toyworld import world

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = load_model(str(toy_sd_path()))
    for p in list(model.unet.parameters()) + list(model.text_encoder.parameters()) + list(model.vae.parameters()):
        p.requires_grad_(False)
    model.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="style")
    params = [p for n, p in model.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr)
    sched = model.scheduler
    t0 = time.time()
    for step in range(args.steps):
        specs = [world.sample_scene(rng, n_objects=(1, 2)) for _ in range(args.batch)]
        captions = [world.caption(s) for s in specs]  # the caption keeps the scene's own background word
        images = [world.render(dataclasses.replace(s, background=args.background), size=64)[0] for s in specs]
        with torch.no_grad():
            x = torch.cat([image_to_tensor(im) for im in images])
            z = model.scale_latents(model.encode_images(x)[0])
            text = model.encode_prompt(captions)
        noise = torch.randn_like(z)
        t = torch.randint(0, sched.config.num_train_timesteps, (z.shape[0],))
        loss = torch.nn.functional.mse_loss(model.predict(sched.add_noise(z, noise, t), t, text), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model.unet, adapter_name="style").items()}
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=convert_state_dict_to_diffusers(state),
                                              weight_name="teal_world.safetensors")
    atomic_save_safetensors(to_kohya({"unet": state}, float(args.rank)), out / "teal_world_kohya.safetensors")
    print(f"saved {out}/teal_world.safetensors and teal_world_kohya.safetensors in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
