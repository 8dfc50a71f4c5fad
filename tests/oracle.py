"""Reference oracle: transformers' Qwen2.5-Omni generate() end to end, with every intermediate captured."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from transformers import BatchFeature, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

# The system prompt Qwen2.5-Omni needs to answer with speech.
SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
    "and visual inputs, as well as generating text and speech."
)
TALKER_EOS_IDS = (8292, 8294)  # generate()'s talker stop ids: codec pad and codec eos
SAMPLES_PER_CODE = 480  # 2 mel frames x hop 240 at 24 kHz

# Processor outputs the talker needs too (its TMRoPE positions). generate() itself routes input_ids,
# attention_mask, input_features and feature_attention_mask; every other key is thinker-only and is
# passed as `thinker_<key>`: an un-prefixed pixel_values reaches the talker and crashes its generate().
_TALKER_SHARED_KEYS = frozenset({"image_grid_thw", "video_grid_thw", "video_second_per_grid"})
_ROUTED_KEYS = frozenset({"input_ids", "attention_mask", "input_features", "feature_attention_mask"})


@dataclass
class ReferenceAudio:
    """token2wav's output for one code sequence, with the DiT's initial noise."""

    mel: torch.Tensor  # [2 * n_codes, 80] DiT output
    waveform: torch.Tensor  # [n_codes * 480] 24 kHz float32
    noise: torch.Tensor  # [1, 2 * n_codes, 80] the DiT's initial state x_0


@dataclass
class ReferenceOutput:
    """One reference run. Tensors are fp32 on CPU; L = len(prompt_ids), N = len(thinker_tokens)."""

    prompt_ids: list[int]
    thinker_tokens: list[int]  # generated thinker ids (incl. the final eos if produced)
    hidden_states: torch.Tensor  # [L + N - 1, H] post-final-norm thinker states: the lm_head inputs
    talker_codes: list[int] | None  # codec ids before the first talker eos (None: no audio requested)
    mel: torch.Tensor | None  # [2 * n_codes, 80]
    waveform: torch.Tensor | None  # [n_codes * 480] at 24 kHz
    # Raw codec_head logits of the last position of every talker forward: row i scored code i, before
    # repetition penalty / suppression. len(talker_codes) + 1 rows when the talker stopped on eos.
    talker_logits: torch.Tensor | None = None  # [steps, 8448]
    # What generate() handed the talker, before thinker_to_talker_proj and before the talker's forward
    # adds the codec pad/bos embeddings to the last two rows: rows 0..L-1 are h + emb (multimodal
    # rows of emb zeroed), row L the speaker bos embedding, row L+1 is h(g0) + E(g0).
    talker_inputs_embeds: torch.Tensor | None = None  # [L + 2, E]
    # The text side added at each talker decode step: h(g_j) + E(g_j) for j = 1..N-2, then text_eos, text_pad.
    talker_reply_part: torch.Tensor | None = None  # [N, E]
    dit_noise: torch.Tensor | None = None  # [1, 2 * n_codes, 80] the DiT noise used


class _ServeNoise(TorchFunctionMode):
    """Answers the torch.randn call in DiT sample() with the caller's noise (thread-local, not global)."""

    def __init__(self, make_noise: Callable[[tuple[int, ...]], torch.Tensor]) -> None:
        super().__init__()
        self.make_noise = make_noise
        self.served: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.randn:
            return func(*args, **kwargs)
        shape = tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else tuple(args)
        noise = self.make_noise(shape)
        self.served.append(noise)
        return noise.to(dtype=kwargs.get("dtype") or noise.dtype, device=kwargs.get("device") or noise.device)


def _noise_source(
    noise: torch.Tensor | torch.Generator | int | None,
) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """A tensor serves its first frames (it may be longer than needed); a generator or seed draws randn."""
    if isinstance(noise, torch.Tensor):
        buffer = noise.detach().to("cpu", torch.float32)

        def take(shape: tuple[int, ...]) -> torch.Tensor:
            batch, frames, mel_dim = shape
            if buffer.ndim != 3 or buffer.shape[0] != batch or buffer.shape[2] != mel_dim or buffer.shape[1] < frames:
                raise ValueError(f"dit_noise has shape {tuple(buffer.shape)}, need [{batch}, >={frames}, {mel_dim}]")
            return buffer[:, :frames].clone()

        return take
    generator = noise if isinstance(noise, torch.Generator) else torch.Generator().manual_seed(noise or 0)
    return lambda shape: torch.randn(shape, generator=generator)


def _media(conversation: Sequence[Mapping[str, Any]], use_audio_in_video: bool) -> dict[str, list]:
    """Media arrays in conversation order; a video's own audio is listed in the video's place."""
    media: dict[str, list] = {"audio": [], "images": [], "videos": []}
    for message in conversation:
        content = message["content"]
        for part in [] if isinstance(content, str) else content:
            kind = part.get("type")
            if kind == "audio":
                media["audio"].append(part["audio"])
            elif kind == "image":
                media["images"].append(part["image"])
            elif kind == "video":
                media["videos"].append(part["video"])
                if use_audio_in_video:
                    if part.get("video_audio") is None:
                        raise ValueError("use_audio_in_video needs each video part to carry 'video_audio'")
                    media["audio"].append(part["video_audio"])
    return media


class Reference:
    """transformers' Qwen2_5OmniForConditionalGeneration (fp32, eval, CPU) and its processor, as the oracle.

    Conversations use the Qwen chat format: ``[{"role": ..., "content": str | [part, ...]}]`` with parts
    ``{"type": "text", "text": str}``, ``{"type": "audio", "audio": float32 ndarray [samples], mono 16 kHz}``,
    ``{"type": "image", "image": PIL.Image}`` and ``{"type": "video", "video": uint8 ndarray [T, H, W, 3]}``
    (frames already sampled at 2 fps, which the processor assumes). With ``use_audio_in_video`` every video
    part also carries its soundtrack as ``"video_audio"`` (float32 16 kHz); it is not keyed ``"audio"``,
    since the chat template renders any part with an ``audio`` key as an audio part.
    Audio output needs ``SYSTEM_PROMPT`` as the system message. Not thread-safe: a run instruments the model.
    """

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.model = Qwen2_5OmniForConditionalGeneration.from_pretrained(self.checkpoint, dtype=torch.float32)
        self.model.eval()
        self.processor = Qwen2_5OmniProcessor.from_pretrained(self.checkpoint)

    @property
    def thinker_eos_ids(self) -> list[int]:
        """The checkpoint's eos ids plus the tokenizer's (the thinker's own generation config has none)."""
        configured = self.model.generation_config.eos_token_id
        ids = [configured] if isinstance(configured, int) else list(configured or [])
        return list(dict.fromkeys([*ids, self.processor.tokenizer.eos_token_id]))

    def prompt_inputs(
        self,
        conversation: Sequence[Mapping[str, Any]],
        *,
        use_audio_in_video: bool = False,
        **processor_kwargs: Any,
    ) -> BatchFeature:
        """The chat template rendered with a generation prompt, then the processor's tensors for it."""
        text = self.processor.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=False)
        media = {k: v for k, v in _media(conversation, use_audio_in_video).items() if v}
        return self.processor(
            text=text, return_tensors="pt", use_audio_in_video=use_audio_in_video, **media, **processor_kwargs
        )

    def generate(
        self, conversation: Sequence[Mapping[str, Any]], *, use_audio_in_video: bool = False, **kwargs: Any
    ) -> ReferenceOutput:
        """`generate_from_inputs` on `prompt_inputs(conversation)`."""
        inputs = self.prompt_inputs(conversation, use_audio_in_video=use_audio_in_video)
        return self.generate_from_inputs(inputs, use_audio_in_video=use_audio_in_video, **kwargs)

    def generate_from_inputs(
        self,
        inputs: Mapping[str, Any],
        *,
        max_new_tokens: int,
        audio: bool = True,
        speaker: str = "Chelsie",
        use_audio_in_video: bool = False,
        thinker_kwargs: Mapping[str, Any] | None = None,
        talker_max_new_tokens: int = 4096,
        talker_do_sample: bool = False,
        talker_temperature: float = 0.9,
        talker_top_k: int = 40,
        talker_top_p: float = 0.8,
        talker_repetition_penalty: float = 1.05,
        seed: int = 0,
        dit_noise: torch.Tensor | torch.Generator | None = None,
        fix_talker_mask: bool = True,
    ) -> ReferenceOutput:
        """One `model.generate` call on processor outputs (batch 1).

        The thinker is greedy and stops on `thinker_eos_ids` unless `thinker_kwargs` (generate() kwargs, e.g.
        do_sample, repetition_penalty, eos_token_id) say otherwise. The talker is greedy by default, still
        with generate()'s repetition penalty 1.05 and codec-bos suppression; `talker_do_sample` samples with
        the given settings (generate()'s defaults). `seed` seeds any sampling (the global RNG is
        restored afterwards) and, when `dit_noise` is None, the DiT noise. `dit_noise` is a tensor
        [1, >= 2 * n_codes, 80] (its first 2 * n_codes frames are used) or a generator.
        `fix_talker_mask=False` reproduces transformers' unpatched talker (no TMRoPE, no codec pad/bos
        embeddings), for tests only.
        """
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise ValueError("the reference runs one conversation at a time")
        if audio and max_new_tokens < 2:  # generate() cats an empty reply list when the thinker stops at once
            raise ValueError("audio needs at least 2 thinker tokens: the talker starts after g0 is fed back")
        kwargs: dict[str, Any] = {}
        for key, value in inputs.items():
            is_talker_input = key in _ROUTED_KEYS or key in _TALKER_SHARED_KEYS
            kwargs[key if is_talker_input else f"thinker_{key}"] = value
        thinker_settings = {
            "do_sample": False,
            "eos_token_id": self.thinker_eos_ids,
            **(thinker_kwargs or {}),
        }
        kwargs.update({f"thinker_{k}": v for k, v in thinker_settings.items()})
        captured: dict[str, Any] = {}
        with (
            torch.random.fork_rng(devices=[]),
            self._instrumented(captured, dit_noise, seed, fix_talker_mask),
        ):
            torch.manual_seed(seed)
            result = self.model.generate(
                speaker=speaker,
                use_audio_in_video=use_audio_in_video,
                generation_mode="audio" if audio else "text",
                thinker_max_new_tokens=max_new_tokens,
                talker_max_new_tokens=talker_max_new_tokens,
                talker_do_sample=talker_do_sample,
                talker_temperature=talker_temperature,
                talker_top_k=talker_top_k,
                talker_top_p=talker_top_p,
                talker_repetition_penalty=talker_repetition_penalty,
                **kwargs,
            )
        return self._collect(input_ids, captured, result if audio else None)

    def code2wav(
        self,
        codes: Sequence[int] | torch.Tensor,
        *,
        speaker: str = "Chelsie",
        noise: torch.Tensor | torch.Generator | None = None,
        seed: int = 0,
    ) -> ReferenceAudio:
        """token2wav alone, one-shot; `noise` as generate()'s `dit_noise` (None: drawn from `seed`)."""
        params = self.model.speaker_map[speaker]
        code = torch.as_tensor(codes, dtype=torch.long).reshape(1, -1)
        captured: dict[str, Any] = {}
        with torch.no_grad(), self._dit_instrumented(captured, noise if noise is not None else seed):
            waveform = self.model.token2wav(
                code, conditioning=params["cond"].float(), reference_mel=params["ref_mel"].float()
            )
        return ReferenceAudio(mel=captured["mel"], waveform=waveform.reshape(-1).float(), noise=captured["noise"])

    def _collect(self, input_ids: torch.Tensor, captured: dict[str, Any], result: Any) -> ReferenceOutput:
        thinker = captured["thinker"]
        prompt_len = input_ids.shape[1]
        steps = thinker.hidden_states  # per forward: per layer (embeddings first), [1, T, H]
        hidden_states = torch.cat([step[-1][0] for step in steps], dim=0).float()
        output = ReferenceOutput(
            prompt_ids=input_ids[0].tolist(),
            thinker_tokens=thinker.sequences[0, prompt_len:].tolist(),
            hidden_states=hidden_states,
            talker_codes=None,
            mel=None,
            waveform=None,
        )
        if result is None:
            return output
        talker_new = captured["talker_sequences"][0, prompt_len + 2 :].tolist()
        stops = [i for i, code in enumerate(talker_new) if code in TALKER_EOS_IDS]
        output.talker_codes = talker_new[: stops[0]] if stops else talker_new
        output.talker_logits = torch.stack(captured["talker_logits"]).float()
        output.talker_inputs_embeds = captured["talker_inputs_embeds"][0].float()
        output.talker_reply_part = captured["talker_reply_part"][0].float()
        output.mel = captured["mel"]
        output.dit_noise = captured["noise"]
        output.waveform = result[1].reshape(-1).float()
        return output

    @contextlib.contextmanager
    def _instrumented(
        self,
        captured: dict[str, Any],
        dit_noise: torch.Tensor | torch.Generator | None,
        seed: int,
        fix_mask: bool,
    ) -> Iterator[None]:
        """Per-instance wrappers and a hook on the sub-models; all removed on exit."""
        thinker, talker = self.model.thinker, self.model.talker
        patches: dict[torch.nn.Module, dict[str, Callable]] = {
            thinker: {"generate": _capturing_thinker_generate(thinker.generate, captured)},
            talker: {"generate": _capturing_talker_generate(talker.generate, captured)},
        }
        if fix_mask:
            patches[talker]["prepare_inputs_for_generation"] = _keeping_all_ones_mask(
                talker.prepare_inputs_for_generation
            )
        captured["talker_logits"] = []
        hook = talker.register_forward_hook(
            lambda _module, _args, out: captured["talker_logits"].append(out.logits[0, -1].detach().clone())
        )
        try:
            for module, attrs in patches.items():
                for name, fn in attrs.items():
                    object.__setattr__(module, name, fn)
            with self._dit_instrumented(captured, dit_noise if dit_noise is not None else seed):
                yield
        finally:
            hook.remove()
            for module, attrs in patches.items():
                for name in attrs:
                    module.__dict__.pop(name, None)

    @contextlib.contextmanager
    def _dit_instrumented(
        self, captured: dict[str, Any], noise: torch.Tensor | torch.Generator | int
    ) -> Iterator[None]:
        """Serves `noise` to the DiT's sample() and records its noise and mel; removed on exit."""
        dit = self.model.token2wav.code2wav_dit_model
        original = dit.sample
        make_noise = _noise_source(noise)

        @functools.wraps(original)
        def sample(*args: Any, **kwargs: Any) -> torch.Tensor:
            mode = _ServeNoise(make_noise)
            with mode:
                mel = original(*args, **kwargs)
            if len(mode.served) != 1:
                raise RuntimeError(f"DiT sample() drew noise {len(mode.served)} times; the oracle expects once")
            captured["noise"] = mode.served[0]
            captured["mel"] = mel[0].transpose(0, 1).float().contiguous()  # [80, T] -> [T, 80]
            return mel

        object.__setattr__(dit, "sample", sample)
        try:
            yield
        finally:
            dit.__dict__.pop("sample", None)


def _capturing_thinker_generate(generate: Callable, captured: dict[str, Any]) -> Callable:
    """Always asks for per-step hidden states (text-only runs too) and keeps the thinker's result."""

    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(output_hidden_states=True, return_dict_in_generate=True)
        captured["thinker"] = generate(*args, **kwargs)
        return captured["thinker"]

    return wrapper


def _capturing_talker_generate(generate: Callable, captured: dict[str, Any]) -> Callable:
    """Keeps the talker's inputs (before its forward edits them in place) and its output sequences."""

    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        captured["talker_inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()
        captured["talker_reply_part"] = kwargs["thinker_reply_part"].detach().clone()
        captured["talker_sequences"] = generate(*args, **kwargs)
        return captured["talker_sequences"]

    return wrapper


def _keeping_all_ones_mask(prepare: Callable) -> Callable:
    """Restores the all-ones attention mask generate() drops (transformers 5.19, generation/utils.py).

    The talker's forward only computes TMRoPE positions (get_rope_index + rope_deltas) and adds the codec
    pad/bos embeddings when it gets an attention mask; without one it silently runs on plain positions.
    """

    @functools.wraps(prepare)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        model_inputs = prepare(*args, **kwargs)
        if model_inputs.get("attention_mask") is None:
            embeds = model_inputs.get("inputs_embeds")
            current = embeds if embeds is not None else model_inputs["input_ids"]
            cache = model_inputs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            model_inputs["attention_mask"] = torch.ones(
                current.shape[0], past + current.shape[1], dtype=torch.long, device=current.device
            )
        return model_inputs

    return wrapper
