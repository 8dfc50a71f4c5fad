"""pipecat's own OpenAI Realtime service (OpenAIRealtimeLLMService) in a minimal pipeline (its context aggregators
around the service, no transport) against the live server: a spoken reply, a barge-in through server VAD with no
error, the user's transcript in pipecat's context, and a tool call round trip forced with tool_choice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    LLMFullResponseEndFrame,
    LLMRunFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from realtime_client import CHUNK, MODEL, RATE, pcm16, silence, speech

WEATHER = FunctionSchema(
    name="get_weather",
    description="The weather in a city.",
    properties={"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    required=["city"],
)


class Recorder(FrameProcessor):
    """Every frame that passes, either way."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        self.frames.append(frame)
        await self.push_frame(frame, direction)

    def of(self, kind: type[Frame]) -> list[Frame]:
        return [f for f in self.frames if isinstance(f, kind)]


@dataclass
class Agent:
    service: OpenAIRealtimeLLMService
    context: LLMContext
    worker: PipelineWorker
    upstream: Recorder  # between the user aggregator and the service: what the service sends up (transcripts, errors)
    downstream: Recorder  # after the service: its audio and text
    logged: list[str] = field(default_factory=list)

    async def until(self, ready: Callable[[], object], timeout: float = 300) -> None:
        async with asyncio.timeout(timeout):
            while not ready():
                await asyncio.sleep(0.05)

    async def talk(self, samples: np.ndarray) -> None:
        data = pcm16(samples)
        for i in range(0, len(data), 2 * CHUNK):
            await self.worker.queue_frame(
                InputAudioRawFrame(audio=data[i : i + 2 * CHUNK], sample_rate=RATE, num_channels=1)
            )


@asynccontextmanager
async def pipecat_agent(url: str, session: events.SessionProperties, context: LLMContext) -> AsyncIterator[Agent]:
    ws_url = url.replace("http://", "ws://") + "/v1/realtime"
    settings = OpenAIRealtimeLLMService.Settings(model=MODEL, session_properties=session)
    service = OpenAIRealtimeLLMService(api_key="unused", base_url=ws_url, settings=settings)
    aggregators = LLMContextAggregatorPair(context)
    upstream, downstream = Recorder(), Recorder()
    pipeline = Pipeline([aggregators.user(), upstream, service, downstream, aggregators.assistant()])
    params = PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE)
    worker = PipelineWorker(pipeline, params=params, enable_rtvi=False, idle_timeout_secs=None)
    agent = Agent(service, context, worker, upstream, downstream)
    sink = logger.add(lambda message: agent.logged.append(str(message)), level="ERROR")
    runner = PipelineRunner(handle_sigint=False)
    running = asyncio.create_task(runner.run(worker))
    try:
        yield agent
    finally:
        await worker.cancel()
        await running
        logger.remove(sink)


def properties(**changes: object) -> events.SessionProperties:
    transcription = events.InputAudioTranscription(model="whisper-1")
    audio = events.AudioConfiguration(
        input=events.AudioInput(transcription=transcription, turn_detection=events.TurnDetection()),
        output=events.AudioOutput(voice="Chelsie"),
    )
    return events.SessionProperties(audio=audio, **changes)


async def test_a_spoken_reply_a_clean_barge_in_and_the_users_words_in_the_context(server):
    url, _ = server
    context = LLMContext(messages=[{"role": "user", "content": "Tell a long story."}])

    def said() -> list[str]:
        return [m["content"] for m in context.get_messages() if m.get("role") == "user"]

    async with pipecat_agent(url, properties(max_output_tokens=40), context) as agent:
        await agent.worker.queue_frame(LLMRunFrame())
        await agent.until(lambda: agent.downstream.of(TTSAudioRawFrame))  # the reply is playing
        await agent.talk(np.concatenate([speech(1.0), silence(1.0)]))  # the user talks over it
        await agent.until(lambda: agent.upstream.of(TranscriptionFrame))
        [transcript] = agent.upstream.of(TranscriptionFrame)
        await agent.until(lambda: len(agent.downstream.of(LLMFullResponseEndFrame)) >= 2)  # VAD's answer, done
        await agent.until(lambda: len(said()) == 2)
        assert said() == ["Tell a long story.", transcript.text]
        audio = agent.downstream.of(TTSAudioRawFrame)
        assert all(f.sample_rate == RATE and f.num_channels == 1 and f.audio for f in audio)
        assert agent.upstream.of(ErrorFrame) == [] and agent.logged == []


async def test_a_forced_tool_call_round_trip(server):
    url, _ = server
    calls: list[dict] = []

    async def get_weather(params: FunctionCallParams) -> None:
        calls.append(params.arguments)
        if len(calls) == 1:  # the next forced call is left unanswered: the test stops there
            await params.result_callback({"sky": "clear"})

    context = LLMContext(messages=[{"role": "user", "content": "Weather in Rome?"}], tools=ToolsSchema([WEATHER]))
    async with pipecat_agent(url, properties(max_output_tokens=200, tool_choice="required"), context) as agent:
        agent.service.register_function("get_weather", get_weather)
        await agent.worker.queue_frame(LLMRunFrame())
        await agent.until(lambda: len(calls) == 2)  # the output fed a new response, forced to call again
        assert all(call["city"] in ("Paris", "Rome") for call in calls)
        messages = context.get_messages()
        first = next(m for m in messages if m.get("tool_calls"))["tool_calls"][0]
        assert first["function"]["name"] == "get_weather" and json.loads(first["function"]["arguments"]) == calls[0]
        result = next(m for m in messages if m.get("role") == "tool")
        assert result == {"role": "tool", "content": '{"sky": "clear"}', "tool_call_id": first["id"]}
        assert agent.downstream.of(TTSAudioRawFrame) == []  # calls are never spoken
        assert agent.upstream.of(ErrorFrame) == [] and agent.logged == []
