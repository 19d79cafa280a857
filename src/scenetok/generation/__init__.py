"""Generation from a bundle: load the base pipeline with the handles, check prompts, make images."""

from scenetok.generation.pipeline import (
    MAX_PROMPT_CHARS,
    Generated,
    check_bundle_files,
    check_generate_options,
    check_prompt,
    check_prompt_tokens,
    generate,
    generate_many,
    handle_positions,
    load_pipeline,
    write_outputs,
)

__all__ = ["MAX_PROMPT_CHARS", "Generated", "check_bundle_files", "check_generate_options", "check_prompt", "check_prompt_tokens", "generate", "generate_many", "handle_positions", "load_pipeline", "write_outputs"]
