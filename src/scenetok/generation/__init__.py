"""Generation from a bundle: load the base pipeline with the handles, check prompts, make images."""

from scenetok.generation.pipeline import (
    Generated,
    check_prompt,
    generate,
    handle_positions,
    load_pipeline,
    write_outputs,
)

__all__ = ["Generated", "check_prompt", "generate", "handle_positions", "load_pipeline", "write_outputs"]
