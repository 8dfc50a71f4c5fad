"""WebSocket /v1/realtime: accept, one receive loop that handles client events in order, one writer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import APIRouter, WebSocket

from omnitalk.server.realtime import protocol as p
from omnitalk.server.realtime.input_audio import Ingestion
from omnitalk.server.realtime.outbox import Outbox
from omnitalk.server.realtime.protocol import ClientError
from omnitalk.server.realtime.response import LiveResponse, plan
from omnitalk.server.realtime.session import RealtimeSession, SessionConfig, build_item, user_audio_item
from omnitalk.server.realtime.transcription import transcribe
from omnitalk.server.realtime.vad import SpeechStarted, SpeechStopped
from omnitalk.server.state import Busy, ServerState

log = logging.getLogger(__name__)
router = APIRouter()

MIN_COMMIT_MS = 100  # as OpenAI: a shorter buffer is "empty"
CLOSE_NORMAL = 1000
CLOSE_TOO_SLOW = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket) -> None:
    state: ServerState = ws.app.state.omnitalk
    # Browsers pass their key as a subprotocol next to "realtime"; accept the latter if offered.
    await ws.accept(subprotocol="realtime" if "realtime" in ws.scope.get("subprotocols", ()) else None)
    if state.engine is None or state.failure is not None:
        why = f"{state.failure}; this server is restarting" if state.failure else "the model is still loading"
        refusal = ClientError(f"{why}; retry once /ready answers 200", "model_not_ready", type="server_error")
        await ws.send_text(json.dumps(p.error_event(refusal)))
        await ws.close(CLOSE_TRY_LATER)
        return
    await Connection(ws, state).serve()


class Connection:
    """One client: its session, its writer, and the handlers of its events."""

    def __init__(self, ws: WebSocket, state: ServerState) -> None:
        self.ws, self.state, self.settings = ws, state, state.settings
        voices = state.engine.voices
        config = SessionConfig(model=state.model_name, voice="Chelsie" if "Chelsie" in voices else voices[0])
        self.session = RealtimeSession(p.new_id("sess"), config)
        self.outbox = Outbox(ws, state.metrics, self.settings.max_queued_bytes, self.settings.max_client_lag_s)
        self.transcriptions: set[asyncio.Task] = set()
        self.idle = False  # the session was closed for want of client events
        self.ingestion = Ingestion(state.engine, self.settings.ingest_audio, state.metrics)

    async def serve(self) -> None:
        writer = self.outbox.start()
        self.outbox.send(p.event("session.created", session=self.session.config.to_json(self.session.id)))
        reader = asyncio.create_task(self._receive())
        expired = False
        try:
            lifetime = self.settings.realtime_max_session_s
            done, _ = await asyncio.wait({reader, writer}, timeout=lifetime, return_when=asyncio.FIRST_COMPLETED)
            expired = not done
        finally:
            for task in (reader, writer):  # the reader first: it must not start anything new
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            if self.session.response is not None:  # the client is gone: stop every stage of its response
                await self.session.response.cancel(None)
            for task in self.transcriptions:
                task.cancel()
            await asyncio.gather(*self.transcriptions, return_exceptions=True)
            await self.ingestion.close()
            if self.state.engine is not None:  # the session's stored thinker rows and talker blocks go with it
                self.state.engine.forget_session(self.session.id)
        code = CLOSE_TOO_SLOW if self.outbox.overflowed else None
        if expired or self.idle:
            await self._end(expired)
            code = CLOSE_NORMAL
        if not reader.cancelled() and reader.exception() is not None:
            log.error("realtime: the receive loop failed", exc_info=reader.exception())
            code = CLOSE_INTERNAL
        if code is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code), timeout=5)

    async def _end(self, expired: bool) -> None:
        """OpenAI's end of a session that reached its maximum duration (an error, then the close); an idle one
        ends the same way, with its own code (OpenAI has no idle limit)."""
        if expired:
            minutes = self.settings.realtime_max_session_s / 60
            why = ClientError(f"Your session hit the maximum duration of {minutes:g} minutes.", "session_expired")
        else:
            seconds = self.settings.realtime_idle_timeout_s
            why = ClientError(f"The session was idle for {seconds:g} seconds and has been closed.", "session_idle")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.send_text(json.dumps(p.error_event(why))), timeout=5)

    async def _next_message(self) -> dict | None:
        """The next WebSocket message; none once the session has been idle too long (a live response or a
        transcription is not idle)."""
        while True:
            try:
                return await asyncio.wait_for(self.ws.receive(), self.settings.realtime_idle_timeout_s)
            except TimeoutError:
                if self.session.response is None and not self.transcriptions:
                    self.idle = True
                    return None

    async def _receive(self) -> None:
        while True:
            message = await self._next_message()
            if message is None:
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:  # OpenAI's Realtime speaks JSON text frames only; audio travels base64 inside them
                binary = ClientError("binary frames are not supported: send client events as JSON text", "invalid_json")
                self.outbox.send(p.error_event(binary))
                continue
            await self._handle(text)

    async def _handle(self, text: str) -> None:
        event_id = None
        try:
            if len(text) > self.settings.max_message_bytes:
                limit = self.settings.max_message_bytes
                raise ClientError(
                    f"the message has {len(text)} bytes; at most {limit} are accepted", "message_too_large"
                )
            event = p.parse(text)
            event_id = event.event_id
            await self._dispatch(event)
        except ClientError as error:
            error.event_id = error.event_id or event_id
            self.outbox.send(p.error_event(error))
        except Exception:
            log.exception("realtime: handling a client event failed")
            error = ClientError("internal server error", None, type="server_error")
            error.event_id = event_id
            self.outbox.send(p.error_event(error))

    async def _dispatch(self, event: p.ClientEvent) -> None:
        match event:
            case p.SessionUpdate():
                await self._update_session(event.session)
            case p.BufferAppend():
                await self._append(p.decode_pcm16(event.audio, "audio"))
            case p.BufferCommit():
                await self._commit_manually()
            case p.BufferClear():
                self.session.buffer.take()
                self._end_turn()
                await self.ingestion.drop()
                self.outbox.send(p.event("input_audio_buffer.cleared"))
            case p.ItemCreate():
                item = await asyncio.to_thread(build_item, event.item, self.settings.max_audio_seconds)
                self._add_item(item, event.previous_item_id)
            case p.ItemTruncate():
                await self._truncate(event)
            case p.ItemDelete():
                self.session.conversation.find(event.item_id, action="delete")
                await self._stop_writing(event.item_id)
                self.session.conversation.remove(event.item_id)
                self.outbox.send(p.event("conversation.item.deleted", item_id=event.item_id))
            case p.ItemRetrieve():
                item = self.session.conversation.find(event.item_id, action="retrieve")
                self.outbox.send(p.event("conversation.item.retrieved", item=item.to_json()))
            case p.ResponseCreate():
                await self._create_response(event.response)
            case p.ResponseCancel():
                live = self.session.response
                if live is None or event.response_id not in (None, live.id):
                    raise ClientError("Cancellation failed: no active response found", "response_cancel_not_active")
                await live.cancel("client_cancelled")

    async def _update_session(self, update: p.Session) -> None:
        self.session.config = self.session.config.updated(update, self.state.engine.voices)
        audio_input = update.audio.input if update.audio is not None else None
        if audio_input is not None and "turn_detection" in audio_input.model_fields_set:
            self.session.vad = self.session.config.vad(self.session.buffer.end)
            self.session.turn_item_id = None
            await self.ingestion.drop()  # a turn the old detector started will not be committed by the new one
        self.outbox.send(p.event("session.updated", session=self.session.config.to_json(self.session.id)))

    async def _append(self, pcm: bytes) -> None:
        buffer, limit = self.session.buffer, self.settings.max_audio_seconds
        if (len(buffer.pcm) + len(pcm)) / 2 / p.SAMPLE_RATE > limit:
            raise ClientError(f"the input audio buffer holds at most {limit:g} s: commit or clear it", param="audio")
        buffer.append(pcm)
        vad = self.session.vad
        if vad is None:
            if self.ingestion.turn is None and self.session.response is None:
                await self._open_turn(p.new_id("item"))
            self.ingestion.push()
            return
        for found in await asyncio.to_thread(vad.push, pcm):
            try:
                if isinstance(found, SpeechStarted):
                    await self._speech_started(found.audio_start_ms)
                else:
                    await self._speech_stopped(found)
            except ClientError as error:  # e.g. no stream free for the automatic response: the turn goes on
                self.outbox.send(p.error_event(error))
        if not vad.speaking:  # keep only what a turn starting now would include
            buffer.keep_from(buffer.end // 24 - vad.prefix_padding_ms)
        # Up to what the detector judged (less 2 ms of rounding): a turn it ends later is cut there at the earliest.
        self.ingestion.push(buffer.index(vad.position * 3 // 2) - 32)

    async def _open_turn(self, request_id: str) -> None:
        """Starts ingesting the turn beginning at the buffer's start, for the conversation as a response now would
        read it (streaming input; a turn whose conversation changes before its response falls back)."""
        if not self.ingestion.enabled:
            return
        settings, buffer = self.settings, self.session.buffer
        try:
            spec = await plan(self.session, None, self.state.engine, settings.max_audio_seconds,
                              settings.realtime_context_tokens)  # fmt: skip
        except ClientError:
            return  # the response will say why
        hidden = spec.audio and not spec.tools.forced
        # Salted by the session as the response's request will be (`LiveResponse._request`): the history comes
        # from the prefix cache and the session's stored rows, and the ingested turn's rows are stored for the next.
        session = self.session.id if hidden and settings.session_state else None
        begin = buffer.index(buffer.start)
        await self.ingestion.open(request_id, spec.messages, hidden, buffer.audio, begin, session)

    async def _speech_started(self, audio_start_ms: int) -> None:
        self.session.buffer.keep_from(audio_start_ms)
        self.session.turn_item_id = p.new_id("item")
        self.outbox.send(
            p.event(
                "input_audio_buffer.speech_started", audio_start_ms=audio_start_ms, item_id=self.session.turn_item_id
            )
        )
        turn = self.session.config.turn_detection
        if turn is not None and turn.interrupt_response and self.session.response is not None:
            await self.session.response.cancel("turn_detected")  # barge-in
        await self.ingestion.drop()
        if self.session.response is None:
            await self._open_turn(self.session.turn_item_id)

    async def _speech_stopped(self, stopped: SpeechStopped) -> None:
        item_id = self.session.turn_item_id or p.new_id("item")
        self.session.turn_item_id = None
        self.outbox.send(
            p.event("input_audio_buffer.speech_stopped", audio_end_ms=stopped.audio_end_ms, item_id=item_id)
        )
        await self._commit(item_id, stopped.audio_end_ms)
        turn = self.session.config.turn_detection
        if turn is not None and turn.create_response and self.session.response is None:
            await self._create_response(None)

    async def _commit_manually(self) -> None:
        ms = len(self.session.buffer.pcm) // 48
        if ms < MIN_COMMIT_MS:
            raise ClientError(
                f"the buffer holds {ms} ms of audio; at least {MIN_COMMIT_MS} ms can be committed",
                "input_audio_buffer_commit_empty",
            )
        item_id = self.session.turn_item_id or p.new_id("item")
        self._end_turn()
        await self._commit(item_id, None)

    async def _commit(self, item_id: str, until_ms: int | None) -> None:
        buffer = self.session.buffer
        turn = self.ingestion.before_take(buffer.audio, buffer.index(buffer.start))
        samples = buffer.take(until_ms)
        try:
            item = user_audio_item(item_id, samples, self.settings.max_audio_seconds)
        except ClientError:
            await self.ingestion.committed(None, None)
            raise
        await self.ingestion.committed(turn, samples)
        previous = self.session.conversation.last_id
        self.outbox.send(p.event("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous))
        self._add_item(item, None)
        if self.session.config.transcription is not None:
            task = asyncio.create_task(transcribe(self.state.engine, item, self.outbox))
            self.transcriptions.add(task)
            task.add_done_callback(self.transcriptions.discard)

    def _end_turn(self) -> None:
        if self.session.vad is not None:
            self.session.vad.end_turn()
        self.session.turn_item_id = None

    def _add_item(self, item, previous_item_id: str | None) -> None:
        previous = self.session.conversation.insert(item, previous_item_id)
        for kind in ("conversation.item.added", "conversation.item.done"):
            self.outbox.send(p.event(kind, previous_item_id=previous, item=item.to_json()))

    async def _truncate(self, event: p.ItemTruncate) -> None:
        """Keeps the part of an assistant's audio the client played, and as much of its transcript: the transcript
        is cut in proportion (audio_end_ms / the audio's length, in characters), text and speech not being
        aligned word by word."""
        item = self.session.conversation.find(event.item_id, action="truncate")
        part = item.parts[event.content_index] if event.content_index < len(item.parts) else None
        if item.role != "assistant" or part is None or part.type != "output_audio":
            raise ClientError("only an assistant's audio content can be truncated", param="content_index")
        await self._stop_writing(item.id)
        if event.audio_end_ms > part.audio_ms + 1:  # 1 ms: the client's rounding
            raise ClientError(
                f"audio_end_ms {event.audio_end_ms} is beyond the audio ({part.audio_ms:.0f} ms)", param="audio_end_ms"
            )
        keep = event.audio_end_ms / part.audio_ms if part.audio_ms else 0.0
        part.text = (part.text or "")[: round(len(part.text or "") * keep)]
        part.audio_ms = min(part.audio_ms, event.audio_end_ms)
        self.outbox.send(
            p.event(
                "conversation.item.truncated",
                item_id=item.id,
                content_index=event.content_index,
                audio_end_ms=event.audio_end_ms,
            )
        )

    async def _stop_writing(self, item_id: str) -> None:
        """An item the live response is still writing stops being written (truncate, delete)."""
        live = self.session.response
        if live is not None and live.item.id == item_id:
            await live.cancel("client_cancelled")

    async def _create_response(self, params: p.ResponseParams | None) -> None:
        if self.session.response is not None:
            raise ClientError(
                f"response {self.session.response.id} is still in progress; cancel it or wait",
                "conversation_already_has_active_response",
            )
        settings = self.settings
        spec = await plan(
            self.session, params, self.state.engine, settings.max_audio_seconds, settings.realtime_context_tokens
        )
        response = LiveResponse(spec, self.session, self.state, self.outbox, ingest=self.ingestion.hand_over())
        try:
            response.start()
        except Busy as error:
            if response.ingest is not None:
                await response.ingest.close()
            raise ClientError(
                f"{error}; retry in {Busy.retry_after} s", "rate_limit_exceeded", type="rate_limit_error"
            ) from error
