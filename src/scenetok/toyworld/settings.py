"""Every method's training settings on toy-sd: the toy-world benchmark's (:mod:`scenetok.evaluation.toyworld.suite`)
and, for Break-A-Scene, the demo's. Documented in docs/benchmarks.md; tuned on the benchmark's tuning scenes only
(docs/toy-sd.md)."""

from __future__ import annotations

__all__ = ["TOY_BATCH", "TOY_COMMON", "TOY_FIT_TEMPLATES", "TOY_LR_FACTOR", "TOY_SETTINGS", "TOY_STEPS"]

#: Optimizer steps every method gets on toy-sd (batch :data:`TOY_BATCH`, plus the prior-preservation rows of
#: its recipe). Re-tuned on toy-sd v1d with Break-A-Scene on the tuning scenes (docs/toy-sd.md): handles need
#: about 2 000 image rows to leave the empty-prompt loss; at 180 steps of batch 1, a quarter drew nothing.
TOY_STEPS = 600
#: Scene rows per step for every method on toy-sd (see :data:`TOY_STEPS`).
TOY_BATCH = 4
#: The papers' learning rates are for SD's 49 k-token vocabulary; toy-sd's handles need ~10× larger steps
#: (the demo's finding), so every method's learning rate is its paper value × 10.
TOY_LR_FACTOR = 10

#: Shared by every method: batch :data:`TOY_BATCH`, no previews / checkpoints (short runs), 8 prior images per
#: prompt at 20 steps.
TOY_COMMON: tuple[str, ...] = (f"batch_size={TOY_BATCH}", "grad_accum=1", "preview_every=0", "checkpoint_every=0",
                               "prior.num_images=8", "prior.steps=20")

#: Sentences in toy-sd's caption language for ``init_fit_templates`` (a handle's multi-piece init word, such as
#: "triangle" on toy-sd v1d's tokenizer, is matched in these; docs/toy-sd.md).
TOY_FIT_TEMPLATES = ("a photo of a pink {} on a white background | a photo of a blue striped {} on a black background | "
                     "a photo of a red dotted {} and a green circle on a gray background | a photo of a {} | "
                     "a photo of a yellow star and a purple {} on a navy background")

#: Per-method toy settings (applied after :data:`TOY_COMMON`). Each: :data:`TOY_STEPS` steps at batch
#: :data:`TOY_BATCH`, paper lr × 10; the modifier + class methods use toy-sd's caption grammar ("a photo of a
#: <asset0> circle …").
TOY_SETTINGS: dict[str, tuple[str, ...]] = {
    # paper 400 @ 5e-4 + 400 @ 2e-6, split 4 : 1; the masked loss also sees a 1-latent-pixel outline (a toy
    # object is ~5 latent pixels wide, so its shape is its outline); L_attn reads toy-sd's 16x16 layers
    # (latent/1), where a toy object spans ~5 cells as an SD object does in the paper's 16x16 maps (latent/4
    # would be 8x8 here: 2-3 cells). Both tuned on the tuning scenes, docs/toy-sd.md
    "break-a-scene": ("phase1.steps=480", "phase1.lr=5e-3", "phase2.steps=120", "phase2.lr=2e-5", "mask_margin=1",
                      "attn.downscale=1"),
    # the same split as Break-A-Scene: EM stage (tokens, masks re-estimated) then joint stage; its masked loss
    # on the estimated masks gets the same 1-pixel outline (tuning scenes: identity 0.28 -> 0.39) and its L_attn
    # the same 16x16 maps (tuning scenes: mask IoU 0.35 -> 0.53, scene leakage 0.17 -> 0.04)
    "em-masks": ("em.steps=480", "em.lr=5e-3", "em.every=120", "joint.steps=120", "joint.lr=2e-5", "mask_margin=1",
                 "attn.downscale=1"),
    # paper 250 @ 8e-5 at batch 2 × accumulation 4; here the batch of every other method
    "disendiff": ("train.steps=600", "train.lr=8e-4",
                  "prompt_template=a photo of a {tokens}"),
    # paper 800 @ 6e-5
    "textual-localization": ("train.steps=600", "train.lr=6e-4", "prompt_template=a photo of {tokens}"),
    # Break-A-Scene's phase-1 / phase-2 settings on the collage collection
    "ti-m": ("train.steps=600", "train.lr=5e-3"),
    "db-m": ("train.steps=600", "train.lr=2e-5"),
    # paper 500 @ 1e-5 (× 2 with prior, CD's scale_lr)
    "cd-m": ("train.steps=600", "train.lr=1e-4", "collage.num_images=50"),
}
