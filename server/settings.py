"""Server settings: command-line flags override OMNITALK_* environment variables, which override defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OMNITALK_")

    model: Path | None = None
    """A local Qwen2.5-Omni checkpoint directory; None serves the built-in tiny random-weight model."""
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
