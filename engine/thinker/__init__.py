"""The thinker: Qwen2.5-Omni's LLM served by vLLM, streaming text and every token's hidden state."""
