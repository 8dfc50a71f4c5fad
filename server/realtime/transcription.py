"""Input transcription: the served thinker writes down what the user said in a committed audio item, beside the
response (the engine batches both, so the answer's first audio does not wait for it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from omnitalk.engine.omni import Finished, OmniEngine, OmniRequest, TextDelta
from omnitalk.engine.request import Audio, Message, Sampling, Text
from omnitalk.server.realtime import protocol as p
from omnitalk.server.realtime.outbox import Outbox
from omnitalk.server.realtime.session import Item

log = logging.getLogger(__name__)

# Qwen2.5-Omni's speech-recognition prompt (its cookbook's, without the language named).
SYSTEM = "You are a speech recognition model."
ASK = "Transcribe the audio into text."
TOKENS_PER_SECOND = 8  # a generous bound on a transcript's length: speech runs at 2-4 tokens a second
MIN_TOKENS = 32


async def transcribe(engine: OmniEngine, item: Item, outbox: Outbox) -> None:
    """Sends `conversation.item.input_audio_transcription.delta`s and `.completed` (or `.failed`) for the item's
    audio, and sets the transcript on the item."""
    part = item.parts[0]
    seconds = len(part.samples) / 16_000
    messages = (Message("system", (Text(SYSTEM),)), Message("user", (Audio(part.samples), Text(ASK))))
    sampling = Sampling(max_tokens=MIN_TOKENS + int(TOKENS_PER_SECOND * seconds), temperature=0.0)
    request = OmniRequest(f"transcribe-{item.id}-{uuid.uuid4().hex[:8]}", messages, sampling)
    ids = {"item_id": item.id, "content_index": 0}
    words: list[str] = []
    finished: Finished | None = None
    try:
        async with contextlib.aclosing(engine.generate(request)) as events:
            async for event in events:
                if isinstance(event, TextDelta) and event.text:
                    words.append(event.text)
                    outbox.send(p.event("conversation.item.input_audio_transcription.delta", **ids, delta=event.text))
                elif isinstance(event, Finished):
                    finished = event
    except asyncio.CancelledError:
        raise
    except Exception as error:
        log.warning("transcription of %s failed: %s", item.id, error)
        failure = {"type": "server_error", "code": "transcription_failed", "message": str(error), "param": None}
        outbox.send(p.event("conversation.item.input_audio_transcription.failed", **ids, error=failure))
        return
    part.text = "".join(words).strip()
    usage = finished.usage if finished else None
    prompt, text = (usage.prompt_tokens, usage.text_tokens) if usage else (0, len(words))
    outbox.send(
        p.event(
            "conversation.item.input_audio_transcription.completed",
            **ids,
            transcript=part.text,
            usage={
                "type": "tokens",
                "input_tokens": prompt,
                "output_tokens": text,
                "total_tokens": prompt + text,
                "input_token_details": {"text_tokens": 0, "audio_tokens": prompt},
            },
        )
    )
