"""vLLM plugin (entry point `vllm.general_plugins`): loaded in every vLLM process, it swaps in our thinker class."""

from __future__ import annotations

# The architecture names a Qwen2.5-Omni config.json may carry; both map to the thinker in vLLM.
ARCHITECTURES = ("Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniModel")
MODEL_CLASS = "omnitalk.engine.thinker.model:OmniThinkerForConditionalGeneration"


def register() -> None:
    from vllm import ModelRegistry

    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(architecture, MODEL_CLASS)
