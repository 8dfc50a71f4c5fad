"""What both protocols decide about speech the same way: voice names and how long the talker may talk."""

from __future__ import annotations

from omnitalk.engine.talker.sampling import TalkerSampling

# OpenAI's built-in voices, mapped to Qwen2.5-Omni's two so that unmodified OpenAI clients work.
OPENAI_VOICES = {
    **dict.fromkeys(("alloy", "coral", "sage", "shimmer", "ballad", "marin"), "Chelsie"),
    **dict.fromkeys(("ash", "echo", "verse", "cedar"), "Ethan"),
}
# The talker stops at its codec eos; these bound one that never says it (50 codes = 1 s of speech).
# Speech runs at about 10-20 codes per text token; a real model never comes near 25.
SPEECH_CODES_PER_TEXT_TOKEN = 25
MIN_SPEECH_CODES = 50


def resolve_voice(voice: str, voices: list[str]) -> str:
    """The checkpoint's voice for a requested name: its own (any case) or an OpenAI built-in's stand-in.
    Raises ValueError naming every accepted voice."""
    found = {v.lower(): v for v in voices}.get(voice.lower()) or OPENAI_VOICES.get(voice.lower())
    if found in voices:
        return found
    named = ", ".join([*voices, *(v for v in OPENAI_VOICES if OPENAI_VOICES[v] in voices)])
    raise ValueError(f"unsupported voice {voice!r}; available voices: {named}")


def talker_max_codes(max_text_tokens: int) -> int:
    return min(TalkerSampling().max_tokens, MIN_SPEECH_CODES + SPEECH_CODES_PER_TEXT_TOKEN * max_text_tokens)
