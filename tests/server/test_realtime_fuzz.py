"""A Realtime event fuzzer: over 1000 mixed valid and invalid client events in one session (malformed JSON,
binary frames, wrong types, oversized messages, events out of order). Every bad one is answered by exactly one
`error` (carrying its event_id), every good one by none, and the session still answers a response after."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import Callable
from typing import Any

import websockets

MODEL = "omnitalk-tiny-random"
NUM_EVENTS = 1000
BOUND_S = 120  # a hang guard
ANCHOR = "item_anchor"
SYNC = "item_sync"  # retrieved after every fuzzed event: what came before it answered that event
MANUAL = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}  # no VAD: appends answer nothing


def text_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "user", "content": [{"type": "input_text", "text": text}]}


def bad_events(rng: random.Random, big: int) -> list[Callable[[str], str | bytes | list[str]]]:
    """Makers of one invalid event each (a frame, or valid frames and then it), given an event_id (frames that
    cannot carry one ignore it)."""
    audio = base64.b64encode(bytes(rng.randrange(2, 400, 2))).decode()
    return [
        lambda eid: "{not json",
        lambda eid: b'{"type": "input_audio_buffer.clear"}',  # binary frame
        lambda eid: "[1, 2, 3]",
        lambda eid: "[" * 200 + "]" * 200,
        lambda eid: json.dumps({"type": 5, "event_id": eid}),
        lambda eid: json.dumps({"type": "response.dance", "event_id": eid}),
        lambda eid: json.dumps({"type": "session.update", "event_id": eid, "session": "x"}),
        lambda eid: json.dumps({"type": "session.update", "event_id": eid, "session": {"type": "realtime", "x": 1}}),
        lambda eid: json.dumps({"type": "input_audio_buffer.append", "event_id": eid, "audio": 12}),
        lambda eid: json.dumps({"type": "input_audio_buffer.append", "event_id": eid, "audio": "%%%" + audio}),
        lambda eid: [  # a commit of an empty buffer: out of order
            json.dumps({"type": "input_audio_buffer.clear"}),
            json.dumps({"type": "input_audio_buffer.commit", "event_id": eid}),
        ],
        lambda eid: json.dumps({"type": "response.cancel", "event_id": eid}),  # nothing to cancel
        lambda eid: json.dumps({"type": "conversation.item.retrieve", "event_id": eid, "item_id": "item_nope"}),
        lambda eid: json.dumps({"type": "conversation.item.delete", "event_id": eid, "item_id": "item_nope"}),
        lambda eid: json.dumps(
            {
                "type": "conversation.item.truncate",
                "event_id": eid,
                "item_id": ANCHOR,
                "content_index": 0,
                "audio_end_ms": 0,
            }
        ),
        lambda eid: json.dumps({"type": "conversation.item.create", "event_id": eid, "item": text_item(ANCHOR, "x")}),
        lambda eid: json.dumps({"type": "input_audio_buffer.append", "event_id": eid, "audio": "A" * big}),
    ]


def good_events(rng: random.Random) -> list[Callable[[str], list[str]]]:
    """Makers of valid frames (one or two), given an event_id."""
    audio = base64.b64encode(bytes(rng.randrange(2, 4800, 2))).decode()

    def create_then_delete(eid: str) -> list[str]:
        item = text_item(f"item_{eid}", "".join(rng.choices("abc def", k=rng.randrange(1, 80))))
        return [json.dumps({"type": "conversation.item.create", "event_id": eid, "item": item}),
                json.dumps({"type": "conversation.item.delete", "item_id": f"item_{eid}"})]  # fmt: skip

    return [
        lambda eid: [
            json.dumps(
                {
                    "type": "session.update",
                    "event_id": eid,
                    "session": {"type": "realtime", "instructions": f"Be brief {eid}."},
                }
            )
        ],
        lambda eid: [json.dumps({"type": "input_audio_buffer.append", "event_id": eid, "audio": audio})],
        lambda eid: [json.dumps({"type": "input_audio_buffer.clear", "event_id": eid})],
        lambda eid: [json.dumps({"type": "conversation.item.retrieve", "event_id": eid, "item_id": ANCHOR})],
        create_then_delete,
    ]


async def test_a_thousand_mixed_events_in_one_session(server):
    url, state = server
    rng = random.Random(11)
    limit = state.settings.max_message_bytes
    state.settings.max_message_bytes = 64 * 1024  # an oversized message costs little to send
    try:
        async with websockets.connect(url.replace("http://", "ws://") + f"/v1/realtime?model={MODEL}") as ws:

            async def until(kind: str, item_id: str | None = None) -> list[dict[str, Any]]:
                seen = []
                while True:
                    event = json.loads(await asyncio.wait_for(ws.recv(), BOUND_S))
                    seen.append(event)
                    if event["type"] == kind and (item_id is None or event["item"]["id"] == item_id):
                        return seen

            await until("session.created")
            await ws.send(json.dumps({"type": "session.update", "session": MANUAL}))
            await until("session.updated")
            for item_id in (ANCHOR, SYNC):
                await ws.send(json.dumps({"type": "conversation.item.create", "item": text_item(item_id, "Say hi.")}))
                await until("conversation.item.done")
            bad, good = bad_events(rng, 70 * 1024), good_events(rng)
            num_bad = 0
            for n in range(NUM_EVENTS):
                eid = f"ev_{n}"
                is_bad = rng.random() < 0.5
                frames = rng.choice(bad)(eid) if is_bad else rng.choice(good)(eid)
                frames = frames if isinstance(frames, list) else [frames]
                for frame in frames:
                    await ws.send(frame)
                await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": SYNC}))  # a sync mark
                answered = await until("conversation.item.retrieved", SYNC)
                errors = [e["error"] for e in answered if e["type"] == "error"]
                assert len(errors) == (1 if is_bad else 0), (frames, errors)
                if is_bad:
                    num_bad += 1
                    assert errors[0]["type"] == "invalid_request_error", errors
                    assert errors[0].get("event_id") in (eid, None), errors
            assert 0 < num_bad < NUM_EVENTS
            await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 4}}))
            done = (await until("response.done"))[-1]
            assert done["response"]["status"] in ("completed", "incomplete"), done
    finally:
        state.settings.max_message_bytes = limit
