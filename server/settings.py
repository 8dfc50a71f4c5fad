"""Server settings: command-line flags override OMNITALK_* environment variables, which override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Settings that are vLLM engine arguments: `omnitalk serve` takes them under vLLM's own flag names and types.
VLLM_FIELDS = (
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "enforce_eager",
    "kv_cache_dtype",
    "quantization",
    "enable_prefix_caching",
    "distributed_executor_backend",
)
SPEECH_FIELDS = (
    "speech_device",
    "speech_dtype",
    "talker_memory_gib",
    "first_chunk_codes",
    "ode_solver",
    "code2wav_workers",
    "speech_threads",
)


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OMNITALK_", use_attribute_docstrings=True)

    model: Path | None = None
    """local Qwen2.5-Omni checkpoint directory; none: the built-in tiny random-weight model"""
    host: str = "127.0.0.1"
    """address to listen on"""
    port: int = 8000
    """port to listen on"""
    log_level: str = "info"
    """uvicorn's log level"""
    max_concurrent_streams: int = 32
    """streams served at once; beyond it: HTTP 429 / a Realtime error, with a retry hint"""
    max_message_bytes: int = 16 * 1024 * 1024
    """largest HTTP body or WebSocket message accepted"""
    max_audio_seconds: float = 600.0
    """longest input audio (or video soundtrack) accepted"""
    failure_grace_s: float = 1.0
    """after a stage dies, /health says why for this long, then the process exits non-zero"""

    # Who may call.
    api_key: Annotated[list[str], NoDecode] = []
    """a key that guards every /v1 route (repeatable; OMNITALK_API_KEY: comma-separated): `Authorization: Bearer
    KEY`, or on the WebSocket the subprotocol `openai-insecure-api-key.KEY`; none: no authentication"""
    api_key_file: Path | None = None
    """more keys, one per line ('#' starts a comment)"""
    api_key_guards_metrics: bool = False
    """/metrics needs a key too (/health and /ready never do)"""
    allowed_origins: Annotated[list[str], NoDecode] = []
    """origins (scheme://host[:port]) whose pages may open WebSockets or POST, besides the server's own; *: any"""
    max_client_lag_s: float = 20.0
    """Realtime audio queued for a client beyond this many seconds: it is dropped as too slow"""
    max_queued_bytes: int = 32 * 1024 * 1024
    """outgoing bytes queued per Realtime connection, at most"""
    realtime_max_session_s: float = 3600.0
    """a Realtime session's longest life, in seconds (OpenAI's: 60 minutes)"""
    realtime_idle_timeout_s: float | None = None
    """a Realtime session with no client event and no live response for this long is closed; none: never (as OpenAI)"""
    realtime_context_tokens: int | None = None
    """a Realtime response's prompt and answer together, at most (older items are truncated); none: the context"""
    ingest_audio: bool = True
    """Realtime: prefill the thinker with the user's audio while they speak (streaming input), not at commit"""
    session_state: bool = True
    """Realtime: a turn reuses the thinker state of the session's earlier turns (prefix cache under the session's
    salt, their hidden-state rows kept); off: every turn is prefilled whole, alone"""

    # The speech stage.
    speech_device: str = "auto"
    """where the talker and Code2Wav run: auto (the thinker's GPU on CUDA, else cpu), cpu, cuda:N"""
    speech_dtype: str = "auto"
    """the talker's and Code2Wav's dtype: auto (bfloat16 on CUDA, float32 on cpu), bfloat16, float16, float32"""
    talker_memory_gib: float | None = None
    """GiB for the talker's shared KV pool (streams wait when it is full); none: 15% of the GPU, 1 GiB on cpu"""
    first_chunk_codes: int = 48
    """codec codes before a stream's first audio: 48 (Qwen's), 24 or 12 (sooner, with less look-ahead)"""
    ode_solver: str = "rk4"
    """Code2Wav's flow-matching solver: rk4 (transformers') or euler (a quarter of the DiT calls)"""
    code2wav_workers: int | None = None
    """processes that decode a share of each Code2Wav batch beside the speech thread (a speech stage on cpu only);
    none: 1 on a multi-core cpu, 0 on a GPU"""
    speech_threads: int | None = None
    """torch threads of the server process (speech stage, input features); none: 1 without CUDA (vLLM's CPU worker
    holds every other core), else torch's default"""

    # The thinker (vLLM engine arguments; None: omnitalk's or vLLM's default).
    dtype: str = "auto"
    """auto: the checkpoint's own torch_dtype (fp32 for the tiny model), not vLLM's downcast to bf16"""
    max_model_len: int | None = None
    """the thinker's context window; none: the checkpoint's"""
    max_num_seqs: int = 32
    """requests the thinker runs at once"""
    max_num_batched_tokens: int | None = None
    """tokens per engine step (the chunked-prefill budget); none: vLLM's default"""
    gpu_memory_utilization: float | None = None
    """share of the GPU (on CPU: of RAM) for the thinker's weights and KV cache; none: 0.6, on CPU 0.25"""
    tensor_parallel_size: int = 1
    """GPUs the thinker is split over"""
    enforce_eager: bool = False
    """no CUDA graphs (the thinker's, the talker's and Code2Wav's)"""
    kv_cache_dtype: str = "auto"
    """the thinker's KV cache dtype"""
    quantization: str | None = None
    """the thinker's weight quantization method; none: as the checkpoint says"""
    enable_prefix_caching: bool = True
    """reuse cached prompt prefixes: text-only requests, and a Realtime session's earlier turns (session_state);
    other spoken requests bypass the cache (they need every row)"""
    distributed_executor_backend: str | None = None
    """how vLLM runs tensor-parallel workers (mp, ray, ...); none: vLLM's choice"""

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
