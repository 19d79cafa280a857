"""The end of a run: the trained state as a bundle (:func:`write_run_bundle`)."""

from __future__ import annotations

from scenetok import params as paramlib
from scenetok import viz
from scenetok.bundle import Bundle, BundleContent, HandleInfo, write_bundle
from scenetok.training.checkpoint import trained_parts
from scenetok.training.run import Run


def bundle_content(run: Run) -> BundleContent:
    """What the run learned, as the bundle writer's content: handles, changed weights (full, partial or
    LoRA), the input images and the masks (given or estimated)."""
    m = run.model
    trained = trained_parts(run)
    embeddings = run.handles.as_dict(m.text_encoder)
    embeddings_2 = run.handles.as_dict(m.text_encoder_2) if m.text_encoder_2 is not None else None
    base_vocab = min(run.handles.ids)
    components, partial, lora = {}, {}, None
    if run.lora is not None:
        lora = {"states": {c: run.lora.peft_state(c) for c in run.lora.modules}, "configs": run.lora.configs,
                "rank": run.lora.rank, "alpha": run.lora.alpha,
                "layers_per_block": _first(getattr(m.unet.config, "layers_per_block", 2))}
        trained = trained & {"handles"}
    if "unet" in trained:
        components["unet"] = m.unet
    elif any(g in trained for g in paramlib.PARTIAL_GROUPS):
        groups = sorted(g for g in trained if g in paramlib.PARTIAL_GROUPS)
        partial["unet"] = (groups, paramlib.partial_state(m.unet, groups))
    if "text_encoder" in trained:
        for comp, _, te in m.text_encoders:
            run.handles.detach(te)
            components[comp] = te
    handles = [
        HandleInfo(token=t, name=c.name, class_word=c.class_word, init_word=w, is_background=c.is_background)
        for t, c, w in zip(run.handles.tokens, run.concepts, run.handles.init_words)
    ]
    masks_known = run.masks_estimated or all(c.mask_known for c in run.concepts)
    extra = {"scenes": len(run.scenes), "masks": "estimated" if run.masks_estimated else
             ("given" if masks_known else "none")}
    return BundleContent(
        method=run.method.name, base_model=m.model_id, handles=handles, embeddings=embeddings,
        family=m.family.name, embeddings_2=embeddings_2,
        components=components or None, partial_weights=partial or None, lora=lora,
        text_encoder_vocab_size=base_vocab, config=run.cfg, resolution=run.resolution,
        input_hashes=run.scene.input_hashes, image=run.scene.image,
        masks=run.concept_masks() if masks_known else None,
        mask_names=[c.name for c in run.concepts] if masks_known else None, extra=extra,
        scene_images=[sc.image for sc in run.scenes[1:]] or None,
        mask_scenes=[i for i, sc in enumerate(run.scenes) for _ in sc.concepts] if masks_known else None,
    )


def _first(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def write_run_bundle(run: Run) -> Bundle:
    """The loss plot, then the bundle (into the run's own folder, beside its logs and previews)."""
    rows = [r for r in run.log_rows if not r.get("preview") and not r.get("event")]
    viz.loss_plot(rows, run.out_dir / "loss.png")
    return write_bundle(run.out_dir, bundle_content(run), check=False)
