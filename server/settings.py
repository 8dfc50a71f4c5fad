"""Server settings: command-line flags override OMNITALK_* environment variables, which override defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

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
SPEECH_FIELDS = ("speech_device", "speech_dtype")


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
    send_queue_size: int = 256
    """outgoing events queued per connection; a client slower than this is dropped"""

    # The speech stage.
    speech_device: str = "auto"
    """where the talker and Code2Wav run: auto (the thinker's GPU on CUDA, else cpu), cpu, cuda:N"""
    speech_dtype: str = "auto"
    """the talker's dtype (Code2Wav stays float32): auto (bfloat16 on CUDA, float32 on cpu), bfloat16,
    float16, float32"""

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
    """no CUDA graphs"""
    kv_cache_dtype: str = "auto"
    """the thinker's KV cache dtype"""
    quantization: str | None = None
    """the thinker's weight quantization method; none: as the checkpoint says"""
    enable_prefix_caching: bool = False
    """reuse cached prompt prefixes for text-only requests (spoken ones bypass the cache: they need every row)"""
    distributed_executor_backend: str | None = None
    """how vLLM runs tensor-parallel workers (mp, ray, ...); none: vLLM's choice"""

    @property
    def ws_max_size(self) -> int:
        """uvicorn's WebSocket frame limit: a little above ours, so that an oversized message gets our
        Realtime `error` event (and the session lives on) instead of uvicorn closing the socket."""
        return self.max_message_bytes + 64 * 1024
