"""Input transcription on /v1/realtime: every committed user audio item is transcribed by the served thinker,
beside the response, and its transcript is kept on the item."""

from __future__ import annotations

from realtime_client import MANUAL, of, realtime, send_audio, speech


async def test_committed_audio_is_transcribed_beside_the_response(server):
    url, _ = server
    async with realtime(url) as (conn, events):
        session = {**MANUAL, "audio": {"input": {"turn_detection": None, "transcription": {"model": "whisper-1"}}}}
        await conn.session.update(session=session)
        echoed = (await events.until("session.updated"))[-1]["session"]
        assert echoed["audio"]["input"]["transcription"] == {"model": "whisper-1"}
        await send_audio(conn, speech(1.0))
        await conn.input_audio_buffer.commit()
        item_id = (await events.until("conversation.item.done"))[-1]["item"]["id"]
        await conn.response.create(response={"max_output_tokens": 4})
        seen = await events.until("response.done")
        while not of(seen, "conversation.item.input_audio_transcription.completed"):
            seen.append(await events.next())
        deltas = of(seen, "conversation.item.input_audio_transcription.delta")
        [completed] = of(seen, "conversation.item.input_audio_transcription.completed")
        assert {e["item_id"] for e in deltas} <= {item_id} == {completed["item_id"]}
        assert completed["content_index"] == 0
        assert completed["transcript"] == "".join(e["delta"] for e in deltas).strip()
        assert completed["usage"]["input_tokens"] > 0 and completed["usage"]["type"] == "tokens"
        await conn.conversation.item.retrieve(item_id=item_id)
        item = (await events.until("conversation.item.retrieved"))[-1]["item"]
        assert item["content"][0]["transcript"] == completed["transcript"]
