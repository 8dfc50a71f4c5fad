"""Server settings: command-line flags override OMNITALK_* environment variables, which override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OMNITALK_")

    model: Path | None = None
    """A local Qwen2.5-Omni checkpoint directory; None serves the built-in tiny random-weight model."""
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    max_model_len: int | None = None  # the thinker's context window; None: the checkpoint's
    max_num_seqs: int = 32  # requests the thinker runs at once
    max_concurrent_streams: int = 32  # beyond it: HTTP 429 / a Realtime error, with a retry hint
    max_message_bytes: int = 16 * 1024 * 1024  # largest HTTP body or WebSocket message accepted
    max_audio_seconds: float = 600.0  # longest input audio (or video soundtrack) accepted
    speech_device: str = "cpu"
    gpu_memory_utilization: float | None = None  # the thinker's share of the device (of RAM on CPU); None: its default
    failure_grace_s: float = 1.0  # a dead stage: /health says why this long, then the process exits non-zero
    # Who may call. Keys guard every /v1 route: `Authorization: Bearer <key>`, or on the WebSocket the subprotocol
    # `openai-insecure-api-key.<key>`. OMNITALK_API_KEY holds one key (or several, comma-separated).
    api_key: Annotated[list[str], NoDecode] = []  # repeatable; none: no authentication
    api_key_file: Path | None = None  # more keys, one per line ('#' starts a comment)
    api_key_guards_metrics: bool = False  # /metrics needs a key too (/health and /ready never do)
    # Origins (scheme://host[:port]) whose pages may open WebSockets or POST; the server's own always may, "*": any.
    allowed_origins: Annotated[list[str], NoDecode] = []
    max_client_lag_s: float = 20.0  # Realtime audio queued for a client beyond this: it is dropped as too slow
    max_queued_bytes: int = 32 * 1024 * 1024  # outgoing bytes queued per Realtime connection, at most

    @field_validator("api_key", "allowed_origins", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    def all_api_keys(self) -> list[str]:
        """The keys given directly and those in `api_key_file`."""
        keys = list(self.api_key)
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return keys

    @property
    def ws_max_size(self) -> int:
        """uvicorn's WebSocket frame limit: a little above ours, so that an oversized message gets our
        Realtime `error` event (and the session lives on) instead of uvicorn closing the socket."""
        return self.max_message_bytes + 64 * 1024
