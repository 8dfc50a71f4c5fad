"""Tiny random-weight Qwen2.5-Omni checkpoint for tests and the default server (its output is noise)."""
