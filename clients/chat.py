"""`omnitalk chat`: one turn with a running server from the terminal, over the wire only (streamed chat completions).

The transcript streams to the terminal as it is generated; the speech goes to a WAV file."""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
from pathlib import Path

import httpx
import numpy as np
import soundfile

from omnitalk.clients.client import Reply, ServerError, add_chunk, chat_request, stream_chunks

RATE = 24000  # pcm16 out of the server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="omnitalk chat", description=__doc__)
    parser.add_argument("prompt", nargs="?", help="what to say (text); with --audio, said after the audio")
    parser.add_argument("--audio", type=Path, help="a spoken question: any sound file (wav, flac, ogg, ...)")
    parser.add_argument("--out", type=Path, default=Path("answer.wav"), help="where the spoken answer goes")
    parser.add_argument("--voice", default="alloy", help="an OpenAI voice name or the checkpoint's (Chelsie, Ethan)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's root URL")
    parser.add_argument("--api-key", help="sent as a Bearer token, for servers that require one")
    parser.add_argument("--max-tokens", type=int, help="a cap on the answer's text tokens")
    args = parser.parse_args(argv)
    if not args.prompt and not args.audio:
        parser.error("give a prompt, --audio FILE, or both")
    return args


def question_wav(path: Path) -> bytes:
    """The file as 16-bit mono WAV (what chat completions' input_audio takes), whatever its own format."""
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (OSError, soundfile.LibsndfileError) as error:
        raise SystemExit(f"omnitalk chat: cannot read {path}: {error}") from error
    buffer = io.BytesIO()
    soundfile.write(buffer, samples.mean(axis=1), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


async def run(args: argparse.Namespace) -> Reply:
    """Streams one answer, printing its transcript as it comes."""
    wav = question_wav(args.audio) if args.audio else None
    body = chat_request("default", args.prompt, wav, voice=args.voice, max_tokens=args.max_tokens)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    reply = Reply()
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=300.0), headers=headers) as http:
        async for chunk in stream_chunks(http, args.url.rstrip("/") + "/v1/chat/completions", body):
            text, _ = add_chunk(reply, chunk)
            print(text, end="", flush=True)
    print()
    return reply


def main(argv: list[str] | None = None) -> int:
    """0: answered; 1: the server refused or failed the request; 2: it cannot be reached."""
    args = parse_args(argv)
    try:
        reply = asyncio.run(run(args))
    except httpx.TransportError as error:
        print(f"omnitalk chat: cannot reach the server at {args.url}: {error or type(error).__name__}", file=sys.stderr)
        return 2
    except ServerError as error:
        print(f"\nomnitalk chat: the server refused the request: {error}", file=sys.stderr)
        return 1
    samples = np.frombuffer(bytes(reply.audio), dtype="<i2")
    soundfile.write(args.out, samples, RATE, subtype="PCM_16")
    print(f"speech: {args.out} ({len(samples) / RATE:.1f} s)", file=sys.stderr)
    return 0
