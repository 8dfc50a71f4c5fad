"""Serves one chat completion: request -> OmniRequest, run the engine, a response body or a stream of chunks."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import numpy as np

from omnitalk.engine.omni import AudioDelta, Finished, OmniEngine, OmniEvent, OmniRequest, Speech, TextDelta
from omnitalk.engine.request import Sampling
from omnitalk.engine.talker.sampling import TalkerSampling
from omnitalk.server import audio
from omnitalk.server.chat import protocol
from omnitalk.server.chat.messages import Conversation, TranscriptCache, convert, prompt_details
from omnitalk.server.chat.protocol import ChatCompletionRequest
from omnitalk.server.chat.sse import Stream
from omnitalk.server.context import BudgetError, answer_budget
from omnitalk.server.errors import APIError
from omnitalk.server.metrics import ResponseTimer
from omnitalk.server.speech import resolve_voice, talker_max_codes
from omnitalk.server.state import ServerState
from omnitalk.server.tool_calls import CallEvent, CallParser, ToolCall
from omnitalk.server.tools import call_tokens

AUDIO_TTL_S = 3600  # how long an answer's audio id stays usable in a later request (its transcript is kept)


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _finish_reason(r: ChatCompletionRequest, thinker: str, called: bool) -> str:
    """OpenAI's: "tool_calls" when the model chose to call, "stop" when a named function was forced on it."""
    if not called or thinker == "length":
        return thinker
    return "stop" if r.tool_set.choice.mode == "function" else "tool_calls"


def _voice(voice: str | dict, voices: list[str]) -> str:
    if not isinstance(voice, str):
        raise APIError(f"unsupported voice {voice!r}: give a voice name", param="audio.voice")
    try:
        return resolve_voice(voice, voices)
    except ValueError as error:
        raise APIError(str(error), param="audio.voice") from error


class _Run:
    """One request's hold on the server: a stream slot, the live-streams gauge, its timer, the engine's stream.
    `close` gives all of it back, once, however the request ends."""

    def __init__(self, state: ServerState) -> None:
        state.limiter.acquire()
        self.state, self.events, self.closed = state, None, False
        self.request_id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.timer = ResponseTimer(state.metrics)
        state.metrics.live_streams.inc()

    def observe(self, event: OmniEvent) -> OmniEvent:
        if isinstance(event, TextDelta) and event.text:
            self.timer.text()
        elif isinstance(event, AudioDelta):
            self.timer.audio(len(event.samples))
        return event

    async def close(self, status: str, finished: Finished | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with anyio.CancelScope(shield=True):  # runs to the end even when the client's task is cancelled
                if self.events is not None:
                    await self.events.aclose()  # cancels the request in the thinker, talker and Code2Wav
        finally:
            self.state.limiter.release()
            self.state.metrics.live_streams.dec()
            u = finished.usage if finished else None
            self.timer.finish(status, *((u.prompt_tokens, u.text_tokens, u.audio_tokens) if u else ()))


class ChatServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transcripts = TranscriptCache()

    async def create(self, request: ChatCompletionRequest) -> dict[str, Any] | Stream:
        """The response body, or (stream=true) its chunks. Errors before the engine's first event raise here, so
        they get their HTTP status (a prompt too long, media the processor rejects); later ones end the stream."""
        engine = self._engine()
        voice = _voice(request.audio.voice, engine.voices) if request.wants_audio else None
        run = _Run(self.state)
        try:
            settings = self.state.settings
            conversation = await asyncio.to_thread(
                convert, request, self.transcripts, engine.thinker.tokenizer, settings.max_audio_seconds
            )
            run.events = engine.generate(self._omni_request(run.request_id, request, conversation, voice))
            first = run.observe(await anext(run.events))
            if request.stream:
                return Stream(self._stream(request, conversation, run, first), lambda: run.close("cancelled"))
            return await self._complete(request, conversation, run, first)
        except BaseException as error:
            await run.close("cancelled" if isinstance(error, asyncio.CancelledError) else "error")
            raise

    def _engine(self) -> OmniEngine:
        if self.state.failure is not None:
            raise APIError(f"{self.state.failure}; this server is restarting", 503, "server_error")
        if self.state.engine is None:
            raise APIError("the model is still loading; retry once /ready answers 200", 503, "server_error")
        return self.state.engine

    def _omni_request(
        self, request_id: str, r: ChatCompletionRequest, conversation: Conversation, voice: str | None
    ) -> OmniRequest:
        requested = r.max_completion_tokens or r.max_tokens
        prompt_tokens = conversation.num_text_tokens + conversation.num_audio_tokens
        context = self._engine().thinker.max_model_len
        try:
            max_tokens = answer_budget(requested, Sampling().max_tokens, prompt_tokens, context)
        except BudgetError as error:
            param = "max_completion_tokens" if r.max_completion_tokens else "max_tokens"
            raise APIError(str(error), param=param, code="context_length_exceeded") from error
        tool_set = r.tool_set
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=1.0 if r.temperature is None else r.temperature,  # OpenAI's default, not Qwen's
            top_p=1.0 if r.top_p is None else r.top_p,
            top_k=r.top_k or 0,
            repetition_penalty=r.repetition_penalty or 1.0,
            seed=r.seed,
            stop=(r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ()),
            json_schema=tool_set.json_schema(),
        )
        speech = None
        if voice is not None and not tool_set.forced:  # a forced answer is a call: nothing to say
            until = call_tokens(self._engine().thinker.tokenizer) if tool_set.active else frozenset()
            speech = Speech(voice, TalkerSampling(seed=r.seed, max_tokens=talker_max_codes(max_tokens)), until)
        return OmniRequest(
            request_id,
            conversation.messages,
            sampling,
            speech,
            use_audio_in_video=r.omnitalk.use_audio_in_video,
        )

    async def _complete(
        self, r: ChatCompletionRequest, conversation: Conversation, run: _Run, event: OmniEvent
    ) -> dict[str, Any]:
        text: list[str] = []
        chunks: list[np.ndarray] = []
        parser = CallParser(r.tool_set)
        status = "cancelled"
        try:
            while not isinstance(event, Finished):
                if isinstance(event, TextDelta):
                    text.append(parser.feed(event.text)[0])
                else:
                    chunks.append(event.samples)
                event = run.observe(await anext(run.events))
            text.append(parser.finish()[0])
            status = "ok"
        except Exception:
            status = "error"
            raise
        finally:
            await run.close(status, event if isinstance(event, Finished) else None)
        transcript = "".join(text).strip() if parser.calls else "".join(text)
        message: dict[str, Any] = {"role": "assistant", "content": transcript, "refusal": None, "audio": None}
        if parser.calls:
            message["content"] = transcript or None
            message["tool_calls"] = [_call_json(call) for call in parser.calls]
        if r.wants_audio and (chunks or not parser.calls):
            samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
            data = await asyncio.to_thread(audio.encode, samples, r.audio.format)
            audio_id, expires_at = self._remember(transcript)
            message["content"] = None  # as OpenAI: the words are the audio's transcript
            message["audio"] = {
                "id": audio_id,
                "data": base64.b64encode(data).decode("ascii"),
                "expires_at": expires_at,
                "transcript": transcript,
            }
        reason = _finish_reason(r, event.finish_reason, bool(parser.calls))
        return {
            **self._head(run, "chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
            "usage": self._usage(conversation, event),
        }

    async def _stream(
        self, r: ChatCompletionRequest, conversation: Conversation, run: _Run, event: OmniEvent
    ) -> AsyncIterator[dict[str, Any]]:
        head = self._head(run, "chat.completion.chunk")
        extra = {"usage": None} if r.include_usage else {}
        audio_id = f"audio_{uuid.uuid4().hex}" if r.wants_audio else None
        parser = CallParser(r.tool_set)

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**head, "choices": [choice], **extra}

        def deltas(words: str, events: list[CallEvent]) -> list[dict[str, Any]]:
            if parser.calling and not words.strip():
                words = ""  # the whitespace between calls is no answer
            out = [chunk({"audio": {"id": audio_id, "transcript": words}} if audio_id else {"content": words})]
            for event in events:  # OpenAI's steps: the call's id and name, then its arguments piece by piece
                call = event.call
                if event.kind == "open":
                    first = {"index": call.index, "id": call.id, "type": "function"}
                    out.append(chunk({"tool_calls": [{**first, "function": {"name": call.name, "arguments": ""}}]}))
                elif event.kind == "arguments":
                    piece = {"index": call.index, "function": {"arguments": call.arguments}}
                    out.append(chunk({"tool_calls": [piece]}))
            return out[0 if words else 1 :]

        status = "cancelled"
        text: list[str] = []
        try:
            yield chunk({"role": "assistant", "content": None if audio_id else "", "refusal": None})
            while not isinstance(event, Finished):
                if isinstance(event, TextDelta) and event.text:
                    words, calls = parser.feed(event.text)
                    text.append(words)
                    for item in deltas(words, calls):
                        yield item
                elif isinstance(event, AudioDelta):
                    yield chunk({"audio": {"id": audio_id, "data": audio.pcm16_base64(event.samples)}})
                event = run.observe(await anext(run.events))
            words, calls = parser.finish()
            text.append(words)
            for item in deltas(words, calls):
                yield item
            yield chunk({}, _finish_reason(r, event.finish_reason, bool(parser.calls)))
            if audio_id:  # OpenAI's closing audio update: the expiry alone, no finish_reason
                yield chunk({"audio": {"expires_at": self._remember("".join(text), audio_id)[1]}})
            if r.include_usage:
                yield {**head, "choices": [], "usage": self._usage(conversation, event)}
            status = "ok"
        except Exception:
            status = "error"
            raise
        finally:
            await run.close(status, event if isinstance(event, Finished) else None)

    def _head(self, run: _Run, kind: str) -> dict[str, Any]:
        return {"id": run.request_id, "object": kind, "created": run.created, "model": self.state.model_name,
                "system_fingerprint": None}  # fmt: skip

    def _remember(self, transcript: str, audio_id: str | None = None) -> tuple[str, int]:
        audio_id = audio_id or f"audio_{uuid.uuid4().hex}"
        expires_at = int(time.time()) + AUDIO_TTL_S
        self.transcripts.put(audio_id, transcript, expires_at)
        return audio_id, expires_at

    @staticmethod
    def _usage(conversation: Conversation, finished: Finished) -> dict[str, Any]:
        u = finished.usage
        details = prompt_details(conversation, u.prompt_tokens)
        return protocol.usage(details, u.text_tokens, u.audio_tokens, u.cached_tokens)
