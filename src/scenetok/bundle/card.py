"""The bundle's model card (``README.md``): what was learned, and how to use it in diffusers and elsewhere."""

from __future__ import annotations

import json

from scenetok.bundle.content import (
    EMBEDDINGS_DIR,
    A1111_DIR,
    file_stem,
    _json_default,
)

# ----------------------------------------------------------------------------------------------------
# model card


def model_card(manifest: dict, folder_name: str = "my-bundle") -> str:
    """The human-readable ``README.md`` of a bundle, from its manifest."""
    handles = manifest["handles"]
    tokens = [h["token"] for h in handles]
    base = manifest["base_model"]
    comps = manifest.get("components") or []
    partial = manifest.get("partial_components") or {}
    lora = manifest.get("lora") or None
    example = "a photo of " + " and ".join(tokens)
    b = folder_name
    sdxl = manifest.get("family") == "sdxl"
    pipeline_class = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    lines = [
        f"# scenetok bundle: {', '.join(h['name'] for h in handles)}",
        "",
        f"Learned handles (text tokens) for the objects of one scene, made with "
        f"scenetok {manifest.get('scenetok_version', '')} using the method "
        f"**{manifest['method']}** on the base model `{base}` at {manifest['resolution']}×{manifest['resolution']} "
        f"pixels ({manifest.get('created', '')}).",
        "",
        "## Handles",
        "",
        "| token | concept | class word | init word | background | file |",
        "|---|---|---|---|---|---|",
    ]
    for h in handles:
        lines.append(f"| `{h['token']}` | {h['name']} | {h['class_word']} | {h['init_word']} | "
                     f"{'yes' if h.get('is_background') else 'no'} | `{h['file']}` |")
    lines += [
        "",
        "## Weights",
        "",
        (f"Besides the token embeddings the method fine-tuned: {', '.join(f'`{c}`' for c in comps)} "
         f"(diffusers folders under `weights/`). The handles only work as trained together with these weights."
         if comps else "Only the token embeddings were trained; the base model's weights are unchanged."
         if not (partial or lora) else "Besides the token embeddings the method trained:"),
        "",
    ]
    for c, e in partial.items():
        lines.append(f"- a few tensors of `{c}` ({', '.join(e['groups'])}: {e['tensors']} tensors), stored in "
                     f"`{e['file']}` as their trained values; load them over the base {c} "
                     "(`load_state_dict(..., strict=False)`), or use scenetok's `load_pipeline`.")
    if lora:
        lines.append(f"- LoRA adapters (rank {lora['rank']}, alpha {lora['alpha']:g}) on "
                     f"{' and '.join(f'`{c}`' for c in lora['components'])}: `{lora['file']}` (diffusers, "
                     f"`pipe.load_lora_weights`) and `{lora['kohya_file']}` (kohya format for AUTOMATIC1111 / "
                     "ComfyUI: copy it into `models/Lora/`).")
    if partial or lora:
        lines.append("")
    nv = max((int(h.get("vectors", 1)) for h in handles), default=1)  # vectors per handle (the same for all)
    lines += [
        "## Use with scenetok",
        "",
        "```bash",
        f'scenetok generate {b} "{example} on the beach" -n 4 -o images/',
        f'scenetok generate {b} "{example}" --attention -o images/   # with per-handle attention overlays',
        f"scenetok info {b}",
        "```",
        "",
        "## Use with diffusers",
        "",
        "```python",
        f"from diffusers import {pipeline_class}" + (", UNet2DConditionModel" if "unet" in comps else ""),
    ]
    if any(c.startswith("text_encoder") for c in comps):
        lines.append("from transformers import CLIPTextModel" + (", CLIPTextModelWithProjection" if sdxl else ""))
    lines += ["", f'pipe = {pipeline_class}.from_pretrained("{base}")']
    if lora:
        lines.append(f'pipe.load_lora_weights("{b}/{lora["dir"]}")')
    for c in comps:  # changed components first: the handles are added to the text encoder in use
        if c == "unet":
            lines.append(f'pipe.unet = UNet2DConditionModel.from_pretrained("{b}/weights/unet")')
        elif c.startswith("text_encoder"):
            cls = "CLIPTextModelWithProjection" if c == "text_encoder_2" else "CLIPTextModel"
            lines.append(f'pipe.{c} = {cls}.from_pretrained("{b}/weights/{c}")')
        else:
            lines.append(f"# also replace pipe.{c} with the folder {b}/weights/{c}")
    for h in handles:
        lines.append(f'pipe.load_textual_inversion("{b}/{h["file"]}")')
        if sdxl and h.get("file_2"):
            lines.append(f'pipe.load_textual_inversion("{b}/{h["file_2"]}", text_encoder=pipe.text_encoder_2, '
                         "tokenizer=pipe.tokenizer_2)")
    lines += [
        f'image = pipe("{example}", num_inference_steps=50, guidance_scale=7.5).images[0]',
        "```",
        "",
        "## Use with AUTOMATIC1111 / ComfyUI",
        "",
        f"The files in `{EMBEDDINGS_DIR}/{A1111_DIR}/` hold "
        + (f'`{{"clip_l": ({nv}, 768), "clip_g": ({nv}, 1280)}}`, the SDXL embedding format' if sdxl
           else f'`{{"emb_params": ({nv}, D)}}`, the embedding format')
        + " those tools read. The prompt word is the file name:",
        "",
        "- AUTOMATIC1111: copy them into `stable-diffusion-webui/embeddings/` and write e.g. "
        f"`a photo of {file_stem(tokens[0])}`.",
        f"- ComfyUI: copy them into `ComfyUI/models/embeddings/` and write `embedding:{file_stem(tokens[0])}`.",
        f"- Use them with the same base model (`{base}`).",
    ]
    if comps or partial:
        lines.append("- This bundle also changed model weights; the embeddings alone will not reproduce its results "
                     "in these tools.")
    if lora:
        lines.append(f"- Load the LoRA `{lora['kohya_file']}` too (AUTOMATIC1111: `models/Lora/`, prompt "
                     "`<lora:lora_kohya:1>`; ComfyUI: `models/loras/` and a LoraLoader node).")
    lines += [
        "",
        "## Hyperparameters",
        "",
        "```json",
        json.dumps(manifest.get("hyperparameters", {}), indent=2, default=_json_default),
        "```",
        "",
    ]
    return "\n".join(lines)
