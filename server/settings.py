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
    max_model_len: int | None = None  # the thinker's context window; None: the checkpoint's
    max_num_seqs: int = 32  # requests the thinker runs at once
    max_concurrent_streams: int = 32  # beyond it: HTTP 429 / a Realtime error, with a retry hint
    max_message_bytes: int = 16 * 1024 * 1024  # largest HTTP body or WebSocket message accepted
    max_audio_seconds: float = 600.0  # longest input audio (or video soundtrack) accepted
    send_queue_size: int = 256  # per-connection outgoing events; a client slower than this is dropped
    speech_device: str = "cpu"
    realtime_max_session_s: float = 3600.0  # a Realtime session's longest life (OpenAI's: 60 minutes)
    realtime_context_tokens: int | None = None  # a Realtime response's prompt and answer at most; None: the context

    @property
    def ws_max_size(self) -> int:
        """uvicorn's WebSocket frame limit: a little above ours, so that an oversized message gets our
        Realtime `error` event (and the session lives on) instead of uvicorn closing the socket."""
        return self.max_message_bytes + 64 * 1024
