"""One response: the engine's stream as Realtime events, from response.created to response.done."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omnitalk.engine.media import MediaError
from omnitalk.engine.omni import AudioDelta, Finished, OmniEngine, OmniRequest, Speech, TextDelta
from omnitalk.engine.request import Message, Sampling, Text
from omnitalk.engine.talker.sampling import TalkerSampling
from omnitalk.engine.thinker.engine import ThinkerInputError
from omnitalk.engine.thinker.prompt import PromptError, audio_token_count
from omnitalk.engine.thinker.streaming import ThinkerIngest
from omnitalk.server import audio
from omnitalk.server.context import BudgetError, answer_budget, first_kept, prompt_size
from omnitalk.server.metrics import ResponseTimer
from omnitalk.server.realtime import protocol as p
from omnitalk.server.realtime.outbox import Outbox
from omnitalk.server.realtime.protocol import SAMPLE_RATE, ClientError
from omnitalk.server.realtime.session import (
    Item,
    ItemPart,
    RealtimeSession,
    build_item,
    conversation_messages,
    resolve_voice,
    tool_set,
    tools_json,
)
from omnitalk.server.speech import talker_max_codes
from omnitalk.server.state import ServerState
from omnitalk.server.tool_calls import CallEvent, CallParser
from omnitalk.server.tools import Tools, call_tokens, with_tools

log = logging.getLogger(__name__)

DELTA_SAMPLES = SAMPLE_RATE // 10  # 100 ms of audio per output_audio.delta
INF_TOKENS = 4096  # max_output_tokens "inf"


@dataclass(frozen=True, slots=True)
class ResponseSpec:
    """A response.create resolved against the session: what to say, how, and where the output goes."""

    context: tuple[Item, ...]  # the conversation (or the response's own input) the answer follows
    instructions: str
    audio: bool  # speak (with a transcript) or write text only
    modalities: list[str]
    voice: str  # the checkpoint's
    voice_name: str  # as the client named it
    max_output_tokens: int | str
    temperature: float
    conversation: str  # "auto": the answer joins the conversation; "none": it does not
    metadata: dict[str, str] | None
    tools: Tools
    messages: tuple[Message, ...]  # what the thinker reads: instructions, tools and the context
    max_tokens: int  # the thinker's budget: max_output_tokens, or for "inf" what the context leaves


async def plan(
    session: RealtimeSession,
    params: p.ResponseParams | None,
    engine: OmniEngine,
    max_seconds: float,
    context_tokens: int | None = None,
) -> ResponseSpec:
    """What a response.create asks for, checked against the session and the context window (decodes media of
    inline input items)."""
    params = params or p.ResponseParams()
    config = session.config
    voices = engine.voices
    if params.conversation not in ("auto", "none"):
        raise ClientError('conversation is "auto" or "none"', param="response.conversation")
    output = params.audio.output if params.audio else None
    voice_name = output.voice if output and output.voice else config.voice
    voice = resolve_voice(voice_name, voices, "response.audio.output.voice")
    if params.input is None:
        context = tuple(session.conversation.items)
    else:  # a context of its own for this response: items, or references to the conversation's
        context = tuple([await _input_item(session, item, max_seconds, i) for i, item in enumerate(params.input)])
    modalities = params.output_modalities or config.output_modalities
    tools_given = tools_json(params.tools, params.tool_choice)
    tool_choice = tools_given.get("tool_choice", config.tool_choice)
    tools = tool_set(tools_given.get("tools", config.tools), tool_choice, "response.tool_choice")
    instructions = config.instructions if params.instructions is None else params.instructions
    system = [Message("system", (Text(instructions),))] if instructions else []
    max_output_tokens = params.max_output_tokens or config.max_output_tokens
    requested = None if max_output_tokens == "inf" else int(max_output_tokens)
    window = min(engine.thinker.max_model_len, context_tokens or engine.thinker.max_model_len)
    sizes: dict[int, int] = {}

    def size(start: int) -> int:  # the prompt's length without context[:start]
        if start not in sizes:
            messages = with_tools(tuple(system + conversation_messages(context[start:])), tools)
            try:
                sizes[start] = prompt_size(messages, engine.thinker.tokenizer).known_tokens
            except PromptError:
                sizes[start] = 0  # the response fails with the reason, as it would without the check
        return sizes[start]

    kept = 0
    if config.retention is not None:  # drop the oldest items while the prompt and the budget overflow the window
        limit = window - (requested or min(INF_TOKENS, window // 2))  # "inf" keeps half the window at most
        kept = await asyncio.to_thread(first_kept, len(context), size, limit, config.retention)
    prompt = await asyncio.to_thread(size, kept)
    messages = with_tools(tuple(system + conversation_messages(context[kept:])), tools)
    try:
        max_tokens = answer_budget(requested, INF_TOKENS, prompt, window)
    except BudgetError as error:
        param = "response.max_output_tokens" if params.max_output_tokens else "session.max_output_tokens"
        raise ClientError(str(error), "context_length_exceeded", param) from error
    return ResponseSpec(
        context=context[kept:],
        instructions=instructions,
        audio="audio" in modalities,
        modalities=modalities,
        voice=voice,
        voice_name=voice_name,
        max_output_tokens=max_output_tokens,
        temperature=config.temperature if params.temperature is None else params.temperature,
        conversation=params.conversation,
        metadata=params.metadata,
        tools=tools,
        messages=messages,
        max_tokens=max_tokens,
    )


async def _input_item(session: RealtimeSession, item: p.Item, max_seconds: float, index: int) -> Item:
    if item.type == "item_reference":
        if item.id is None:
            param = f"response.input[{index}].id"
            raise ClientError("an item_reference needs the id", code="missing_required_parameter", param=param)
        return session.conversation.find(item.id, f"response.input[{index}].id")
    return await asyncio.to_thread(build_item, item, max_seconds)


@dataclass(slots=True)
class LiveResponse:
    """The response being generated: `start` opens it, the task streams it, `cancel` or its end closes it."""

    spec: ResponseSpec
    session: RealtimeSession
    state: ServerState
    outbox: Outbox
    id: str = field(default_factory=lambda: p.new_id("resp"))
    item: Item = field(default_factory=lambda: Item(p.new_id("item"), "assistant", [], "in_progress"))
    task: asyncio.Task | None = None
    timer: ResponseTimer | None = None
    previous_item_id: str | None = None
    calls: list[Item] = field(default_factory=list)  # function_call items, after the message (if any)
    parser: CallParser | None = None
    previous_call_id: str | None = None  # the open call's previous_item_id in the conversation
    num_text_tokens: int = 0
    finished: bool = False
    ingest: ThinkerIngest | None = None  # the user turn it answers, prefilled while spoken (streaming input)

    @property
    def speaks(self) -> bool:
        """The answer has a message item; a forced call is the whole answer, with none."""
        return not self.spec.tools.forced

    def start(self) -> None:
        """Takes a stream slot (Busy if none is free), sends the opening events and starts generating."""
        self.state.limiter.acquire()
        self.state.metrics.live_streams.inc()
        self.timer = ResponseTimer(self.state.metrics)
        self.parser = CallParser(self.spec.tools)
        self.session.response = self
        self.outbox.send(p.event("response.created", response=self._json("in_progress")))
        if self.speaks:
            part = ItemPart("output_audio", "") if self.spec.audio else ItemPart("output_text", "")
            self.outbox.send(
                p.event("response.output_item.added", response_id=self.id, output_index=0, item=self._item_json())
            )
            if self.spec.conversation == "auto":
                self.previous_item_id = self.session.conversation.insert(self.item)
                added = {"previous_item_id": self.previous_item_id, "item": self._item_json()}
                self.outbox.send(p.event("conversation.item.added", **added))
            self.item.parts.append(part)
            self.outbox.send(p.event("response.content_part.added", **self._ids(), part=self._part_json()))
        self.task = asyncio.create_task(self._run())

    async def cancel(self, reason: str | None) -> None:
        """Stops generating (every engine stage) and sends response.done, cancelled for `reason`; None: the client
        is gone, nothing is sent."""
        if self.finished:
            return
        assert self.task is not None
        self.task.cancel()  # closes the engine's stream: the thinker, talker and Code2Wav all drop the request
        try:
            await asyncio.wait({self.task})  # unlike `await task`, never swallows a cancellation of our own
        finally:
            if self.ingest is not None:  # a task cancelled before its first step never ran `_run`, which closes it
                await self.ingest.close()
            if reason is not None:
                self.outbox.drop(self.id)  # deltas still queued for it are dropped: the client stops it now
            self._finish("cancelled", {"type": "cancelled", "reason": reason}, None, notify=reason is not None)

    async def _run(self) -> None:
        finished: Finished | None = None
        try:
            async with contextlib.aclosing(self.state.engine.generate(self._request(), self.ingest)) as events:
                async for event in events:
                    match event:
                        case TextDelta():
                            self._text(event)
                        case AudioDelta():
                            self._audio(event.samples)
                        case Finished():
                            finished = event
            if self.ingest is not None:
                self.state.metrics.ingested(self.ingest.fallback, self.ingest.prefilled_blocks)
            if finished is None:
                raise RuntimeError("the engine's stream ended without Finished")
            self.state.metrics.thinker_cached_tokens.inc(finished.usage.cached_tokens)
            self._words(*self.parser.finish())
        except (MediaError, ThinkerInputError, PromptError, BudgetError) as error:
            details = {"type": "invalid_request_error", "code": "invalid_prompt", "message": str(error)}
            self._finish("failed", {"type": "failed", "error": details}, None)
            return
        except Exception:
            log.exception("realtime response %s failed", self.id)
            details = {"type": "server_error", "code": None, "message": "internal server error"}
            self._finish("failed", {"type": "failed", "error": details}, None)
            return
        finally:  # a stream that never started leaves its ingest to us
            if self.ingest is not None:
                await self.ingest.close()
        if finished.finish_reason == "length":
            self._finish("incomplete", {"type": "incomplete", "reason": "max_output_tokens"}, finished)
        else:
            self._finish("completed", None, finished)

    def _request(self) -> OmniRequest:
        spec = self.spec
        sampling = Sampling(
            max_tokens=spec.max_tokens, temperature=spec.temperature, json_schema=spec.tools.json_schema()
        )
        speech = None
        if spec.audio and not spec.tools.forced:  # a forced answer is a call: nothing to say
            until = call_tokens(self.state.engine.thinker.tokenizer) if spec.tools.active else frozenset()
            speech = Speech(spec.voice, TalkerSampling(max_tokens=talker_max_codes(spec.max_tokens)), until)
        # A spoken answer reuses the session's earlier turns (prefix cache and rows) unless that is turned off.
        session = self.session.id if speech is not None and self.state.settings.session_state else None
        return OmniRequest(self.id, spec.messages, sampling, speech, session=session)

    def _text(self, delta: TextDelta) -> None:
        self.num_text_tokens += len(delta.token_ids)
        if delta.text:
            self.timer.text()
            self._words(*self.parser.feed(delta.text))

    def _words(self, text: str, events: list[CallEvent]) -> None:
        if text and self.speaks and not (self.calls and not text.strip()):  # whitespace between calls: no words
            self.item.parts[0].text += text
            kind = "response.output_audio_transcript.delta" if self.spec.audio else "response.output_text.delta"
            self.outbox.send(p.event(kind, **self._ids(), delta=text), self.id)
        for event in events:
            self._call(event)

    def _call(self, event: CallEvent) -> None:
        """A function_call output item as it forms: added before its arguments (pipecat and livekit want it so),
        the arguments streamed, done with them whole."""
        call = event.call
        if event.kind == "open":
            item = Item(p.new_id("item"), "assistant", [], "in_progress", "function_call", call.id, call.name)
            self.calls.append(item)
        item = self.calls[-1]
        at = {"response_id": self.id, "output_index": len(self.calls) - 1 + self.speaks}
        ids = {**at, "item_id": item.id, "call_id": call.id}
        conversation = self.spec.conversation == "auto"
        if event.kind == "open":
            self.outbox.send(p.event("response.output_item.added", **at, item=item.to_json()))
            if conversation:
                self.previous_call_id = self.session.conversation.insert(item)
                added = {"previous_item_id": self.previous_call_id, "item": item.to_json()}
                self.outbox.send(p.event("conversation.item.added", **added))
        elif event.kind == "arguments":
            item.arguments += call.arguments
            self.outbox.send(p.event("response.function_call_arguments.delta", **ids, delta=call.arguments))
        else:
            item.arguments, item.status = call.arguments, "completed"
            done = {**ids, "name": call.name, "arguments": call.arguments}
            self.outbox.send(p.event("response.function_call_arguments.done", **done))
            self.outbox.send(p.event("response.output_item.done", **at, item=item.to_json()))
            if conversation:
                finished = {"previous_item_id": self.previous_call_id, "item": item.to_json()}
                self.outbox.send(p.event("conversation.item.done", **finished))

    def _audio(self, samples: np.ndarray) -> None:
        self.timer.audio(len(samples))
        self.item.parts[0].audio_ms += len(samples) * 1000 / SAMPLE_RATE
        pcm = audio.to_pcm16(samples)
        for start in range(0, len(pcm), 2 * DELTA_SAMPLES):
            piece = pcm[start : start + 2 * DELTA_SAMPLES]
            delta = base64.b64encode(piece).decode("ascii")
            event = p.event("response.output_audio.delta", **self._ids(), delta=delta)
            self.outbox.send(event, self.id, audio_s=len(piece) / 2 / SAMPLE_RATE)

    def _finish(self, status: str, details: dict | None, finished: Finished | None, notify: bool = True) -> None:
        """Gives the stream slot back and sends the closing events, once, however the response ended."""
        if self.finished:
            return
        self.finished = True
        u = finished.usage if finished else None
        self.state.limiter.release()
        self.state.metrics.live_streams.dec()
        label = {"completed": "ok", "incomplete": "ok", "cancelled": "cancelled"}.get(status, "error")
        self.timer.finish(label, *((u.prompt_tokens, u.text_tokens, u.audio_tokens) if u else ()))
        if self.session.response is self:
            self.session.response = None
        self.item.status = "completed" if status == "completed" else "incomplete"
        if notify and self.speaks:
            self._close_message()
        if self.calls and self.calls[-1].status == "in_progress":  # cut while its arguments streamed
            self.calls[-1].status = "incomplete"
            if notify:
                at = {"response_id": self.id, "output_index": len(self.calls) - 1 + self.speaks}
                self.outbox.send(p.event("response.output_item.done", **at, item=self.calls[-1].to_json()))
                if self.spec.conversation == "auto":
                    done = {"previous_item_id": self.previous_call_id, "item": self.calls[-1].to_json()}
                    self.outbox.send(p.event("conversation.item.done", **done))
        if notify:
            self.outbox.send(p.event("response.done", response=self._json(status, details, self._usage(finished))))

    def _close_message(self) -> None:
        part = self.item.parts[0]
        if self.spec.audio:
            self.outbox.send(p.event("response.output_audio.done", **self._ids()))
            self.outbox.send(p.event("response.output_audio_transcript.done", **self._ids(), transcript=part.text))
        else:
            self.outbox.send(p.event("response.output_text.done", **self._ids(), text=part.text))
        self.outbox.send(p.event("response.content_part.done", **self._ids(), part=self._part_json()))
        self.outbox.send(
            p.event("response.output_item.done", response_id=self.id, output_index=0, item=self._item_json())
        )
        if self.spec.conversation == "auto":
            done = {"previous_item_id": self.previous_item_id, "item": self._item_json()}
            self.outbox.send(p.event("conversation.item.done", **done))

    def _usage(self, finished: Finished | None) -> dict[str, Any]:
        """Token counts; a cancelled response counts what it generated and, its prompt unknown, no input."""
        if finished is not None:
            prompt, text, codes = finished.usage.prompt_tokens, finished.usage.text_tokens, finished.usage.audio_tokens
            cached = finished.usage.cached_tokens
        else:  # 50 codes per second of audio
            audio_ms = self.item.parts[0].audio_ms if self.item.parts else 0.0
            prompt, text, codes, cached = 0, self.num_text_tokens, round(audio_ms / 20), 0
        clips = [q.samples for i in self.spec.context for q in i.parts if q.samples is not None]
        heard = sum(audio_token_count(len(clip)) for clip in clips)
        audio_in = min(prompt, heard)
        return {
            "total_tokens": prompt + text + codes,
            "input_tokens": prompt,
            "output_tokens": text + codes,
            "input_token_details": {
                "text_tokens": prompt - audio_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": cached,
            },
            "output_token_details": {"text_tokens": text, "audio_tokens": codes},
        }

    def _ids(self) -> dict[str, Any]:
        return {"response_id": self.id, "item_id": self.item.id, "output_index": 0, "content_index": 0}

    def _part_json(self) -> dict[str, Any]:
        part = self.item.parts[0]
        return {"type": "audio", "transcript": part.text} if self.spec.audio else {"type": "text", "text": part.text}

    def _item_json(self) -> dict[str, Any]:
        return self.item.to_json()

    def _json(self, status: str, details: dict | None = None, usage: dict | None = None) -> dict[str, Any]:
        spec = self.spec
        return {
            "object": "realtime.response",
            "id": self.id,
            "status": status,
            "status_details": details,
            "output": [] if status == "in_progress" else [i.to_json() for i in [self.item][: self.speaks] + self.calls],
            "conversation_id": self.session.conversation_id if spec.conversation == "auto" else None,
            "output_modalities": spec.modalities,
            "max_output_tokens": spec.max_output_tokens,
            "audio": {"output": {"format": p.PCM, "voice": spec.voice_name}},
            "usage": usage,
            "metadata": spec.metadata,
        }
