"""Decoding of user media (data URLs, audio, images, video) into the arrays Qwen2.5-Omni's processor takes."""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image, ImageOps

SAMPLE_RATE = 16_000  # what the audio encoder takes
VIDEO_FPS = 2.0  # Qwen2.5-Omni's processor assumes frames sampled at 2 fps

# qwen-omni-utils' frame-sampling constants (v2_5/vision_process.py): the vision encoder packs frames in
# pairs, so counts are even, and a video contributes between 4 and 768 frames.
_FRAME_FACTOR = 2
_MIN_FRAMES = 4
_MAX_FRAMES = 768

# Audio format names a caller may pass, mapped to the FFmpeg demuxer that reads them.
_DEMUXERS = {
    "wav": "wav",
    "mp3": "mp3",
    "flac": "flac",
    "ogg": "ogg",
    "opus": "ogg",
    "webm": "matroska",
    "m4a": "mov",
    "mp4": "mov",
    "aac": "aac",
}
PCM16 = "pcm16"
# The only FFmpeg demuxers inline media may reach: real audio and video containers. Never playlists (hls),
# concat lists (ffconcat), image sequences or anything else that opens other files or URLs.
_MEDIA_DEMUXERS = "wav,mp3,flac,ogg,matroska,webm,mov,mp4,m4a,aac,avi,mpegts,mpeg,flv"

# Qwen's image budget (qwen-omni-utils' smart_resize): sides rounded to multiples of 28, at most this many pixels.
IMAGE_FACTOR = 28
MAX_IMAGE_PIXELS = 16384 * 28 * 28  # the processor's own max_pixels: beyond it, an image is downscaled
_MAX_DECODED_PIXELS = 64_000_000  # an image or video frame larger than this is refused before decoding


class MediaError(ValueError):
    """Media that cannot be used; the message says what is wrong in words a client can act on."""


@dataclass(frozen=True, slots=True)
class Video:
    """Frames sampled from a video, with its soundtrack when asked for."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    fps: float  # the rate the frames were actually sampled at: the processor's `fps` for this video
    audio: np.ndarray | None  # float32 mono at SAMPLE_RATE, as long as the video


def decode_data_url(url: str) -> tuple[str, bytes]:
    """The mime type (lower case, without parameters) and the bytes of a base64 `data:` URL."""
    if not url.startswith("data:"):
        raise MediaError("expected a data: URL")
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise MediaError("malformed data: URL: no ',' between the header and the data")
    mime, *parameters = header.split(";")
    if "base64" not in parameters:
        raise MediaError("data: URLs must be base64-encoded (data:<mime type>;base64,<data>)")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise MediaError(f"the data: URL's payload is not valid base64: {exc}") from exc
    if not data:
        raise MediaError("the data: URL carries no data")
    return mime.strip().lower() or "text/plain", data


def load_audio(
    data: bytes,
    *,
    format: str | None = None,
    sample_rate: int | None = None,
    channels: int = 1,
    max_seconds: float = math.inf,
) -> np.ndarray:
    """Float32 mono audio at SAMPLE_RATE in [-1, 1].

    `format` is a container name (wav, mp3, flac, ogg, opus, webm, m4a, mp4, aac), None to recognise it
    from the bytes, or "pcm16": raw little-endian 16-bit samples, `channels` of them interleaved, at
    `sample_rate` (which only raw audio needs). Channels are averaged. Audio longer than `max_seconds` is refused
    before it is resampled (raw audio) or as soon as decoding reaches that length (containers).
    """
    if not data:
        raise MediaError("the audio is empty (0 bytes)")
    if format == PCM16:
        frame = _pcm16_frame(data, sample_rate, channels)
        _check_seconds(frame.samples / frame.sample_rate, max_seconds, "audio")
        audio = _resample([frame])
    elif format is None or format in _DEMUXERS:
        audio = _decode_audio(data, None if format is None else _DEMUXERS[format], max_seconds)
    else:
        raise MediaError(f"unsupported audio format {format!r}; use one of {', '.join([*_DEMUXERS, PCM16])}")
    if audio.size == 0:
        raise MediaError("the audio contains no samples" + (f" (is it really {format}?)" if format else ""))
    return audio


def load_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A fully loaded RGB image, turned upright by its EXIF orientation, transparency flattened onto white, and
    downscaled the way Qwen's processor bounds images when it has more than `max_pixels` pixels."""
    if not data:
        raise MediaError("the image is empty (0 bytes)")
    with _decoding("image"):
        try:
            image = Image.open(io.BytesIO(data))
        except Image.UnidentifiedImageError as exc:
            raise MediaError("the image is not in a format that can be read (png, jpeg, webp, gif, ...)") from exc
        except Image.DecompressionBombError as exc:
            raise MediaError(f"the image is too large: {exc}") from exc
        width, height = image.size  # read from the header: nothing is decoded yet
        if width * height > _MAX_DECODED_PIXELS:
            raise MediaError(f"the image is too large: {width}x{height} pixels, at most {_MAX_DECODED_PIXELS}")
        size = budget_size(width, height, max_pixels)
        if size != (width, height):
            image.draft("RGB", size)  # JPEG decodes at a reduced scale directly; other formats ignore it
        image = ImageOps.exif_transpose(image)  # also loads the pixels, so nothing is left lazy
        image = _to_rgb(image)
        size = budget_size(*image.size, max_pixels)
        return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def budget_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) unchanged when within `max_pixels`, else scaled down keeping the aspect ratio to sides that
    are multiples of 28 (qwen-omni-utils' smart_resize, which floors both sides on the scaled grid)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(width * height / max_pixels)
    return _grid_floor(width / scale), _grid_floor(height / scale)


def _grid_floor(side: float) -> int:
    return max(IMAGE_FACTOR, math.floor(side / IMAGE_FACTOR) * IMAGE_FACTOR)


def load_video(
    data: bytes, *, fps: float = VIDEO_FPS, with_audio: bool = False, max_seconds: float = math.inf
) -> Video:
    """Frames sampled at about `fps` as qwen-omni-utils samples them, and the soundtrack when `with_audio`; a
    video longer than `max_seconds` is refused before any frame is decoded."""
    if not data:
        raise MediaError("the video is empty (0 bytes)")
    if not fps > 0:
        raise MediaError(f"the frame sampling rate must be positive, got {fps}")
    with _decoding("video"):
        total, video_fps = _count_frames(data)
        _check_seconds(total / video_fps, max_seconds, "video")
        count = _sample_count(total, video_fps, fps)
        indices = np.linspace(0, total - 1, count).round().astype(int)
        frames, audio = _decode_video(data, set(indices.tolist()), with_audio)
    if not frames:
        raise MediaError("the video has no frames that can be decoded")
    # A decoder may drop a few (corrupt) frames the container counted; repeat the last kept one instead.
    frames += [frames[-1]] * (count - len(frames))
    if audio is not None:
        audio = _fit(audio, round(total / video_fps * SAMPLE_RATE))
    return Video(frames=np.stack(frames), fps=count / total * video_fps, audio=audio)


@contextmanager
def _decoding(what: str) -> Iterator[None]:
    """Turns any failure of a decoder into a MediaError naming `what`."""
    try:
        yield
    except MediaError:
        raise
    # PIL and PyAV raise many types on bad input (OSError, SyntaxError, EOFError, struct.error, ...).
    except Exception as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise MediaError(f"the {what} could not be decoded (is the file whole and valid?): {reason}") from exc


def _check_seconds(seconds: float, max_seconds: float, what: str) -> None:
    if seconds > max_seconds:
        raise MediaError(f"the {what} lasts {seconds:.1f} s; this server takes at most {max_seconds:g} s")


@contextmanager
def _open(data: bytes, what: str, format: str | None = None) -> Iterator[av.container.InputContainer]:
    """The container, read only by one of the media demuxers and opening nothing else (no files, no URLs)."""
    options = {"format_whitelist": _MEDIA_DEMUXERS, "protocol_whitelist": "none"}
    try:
        container = av.open(io.BytesIO(data), format=format, options=options)
    except (av.error.ArgumentError, av.error.InvalidDataError) as exc:
        raise MediaError(
            f"the {what} could not be decoded (is it a whole {what} file, in one of {_MEDIA_DEMUXERS}?)"
        ) from exc
    with container:
        yield container


def _pcm16_frame(data: bytes, sample_rate: int | None, channels: int) -> av.AudioFrame:
    if sample_rate is None:
        raise MediaError("raw pcm16 audio needs its sample rate")
    if sample_rate <= 0 or channels < 1:
        raise MediaError(f"invalid pcm16 parameters: sample_rate={sample_rate}, channels={channels}")
    if len(data) % (2 * channels):
        raise MediaError(f"raw pcm16 audio must hold whole {channels}-channel 16-bit frames; got {len(data)} bytes")
    samples = np.frombuffer(data, dtype="<i2").reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(samples, format="s16", layout=f"{channels}c")
    frame.sample_rate = sample_rate
    return frame


def _decode_audio(data: bytes, demuxer: str | None, max_seconds: float) -> np.ndarray:
    with _decoding("audio"), _open(data, "audio", demuxer) as container:
        if not container.streams.audio:
            raise MediaError("the file has no audio stream (is it a whole audio file?)")
        if container.duration is not None:  # what the header says; the decoded length is checked as it grows
            _check_seconds(container.duration / av.time_base, max_seconds, "audio")
        return _resample(_bounded(container.decode(container.streams.audio[0]), max_seconds))


def _bounded(frames: Iterable[av.AudioFrame], max_seconds: float) -> Iterator[av.AudioFrame]:
    seconds = 0.0
    for frame in frames:
        seconds += frame.samples / (frame.sample_rate or SAMPLE_RATE)
        _check_seconds(seconds, max_seconds, "audio")
        yield frame


class _Resampler:
    """Resamples decoded frames to SAMPLE_RATE (libswresample) and averages their channels."""

    def __init__(self) -> None:
        self._resampler: av.AudioResampler | None = None
        self._chunks: list[np.ndarray] = []

    def push(self, frame: av.AudioFrame | None) -> None:
        """Adds one frame; None flushes the resampler's buffered tail."""
        if self._resampler is None:
            if frame is None:
                return
            # Keeping the layout lets us take the plain mean: swresample's own downmix scales by 1/sqrt(2).
            self._resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=SAMPLE_RATE)
        self._chunks.extend(out.to_ndarray() for out in self._resampler.resample(frame))

    def finish(self) -> np.ndarray:
        self.push(None)
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        mono = np.concatenate(self._chunks, axis=1).mean(axis=0)
        return np.clip(mono, -1.0, 1.0)  # the resampling filter can ring past full scale


def _resample(frames: Iterable[av.AudioFrame]) -> np.ndarray:
    resampler = _Resampler()
    for frame in frames:
        resampler.push(frame)
    return resampler.finish()


def _count_frames(data: bytes) -> tuple[int, float]:
    """The video stream's frame count (its packets, without decoding them) and frame rate."""
    with _open(data, "video") as container:
        if not container.streams.video:
            raise MediaError("the file has no video stream (is it a whole video file?)")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > _MAX_DECODED_PIXELS:
            raise MediaError(f"the video's frames are too large: {width}x{height}, at most {_MAX_DECODED_PIXELS}")
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise MediaError("the video does not say its frame rate")
        total = sum(1 for packet in container.demux(stream) if packet.size)
    return total, float(rate)


def _sample_count(total_frames: int, video_fps: float, fps: float) -> int:
    """How many frames to sample: qwen-omni-utils' `smart_nframes` with `fps` and its default bounds."""
    max_frames = _floor_even(min(_MAX_FRAMES, total_frames))
    count = _floor_even(min(max(total_frames / video_fps * fps, _MIN_FRAMES), max_frames))
    if count < _FRAME_FACTOR:
        raise MediaError(f"the video is too short: {total_frames} frame(s), at least {_FRAME_FACTOR} needed")
    return count


def _floor_even(value: float) -> int:
    return math.floor(value / _FRAME_FACTOR) * _FRAME_FACTOR


def _decode_video(data: bytes, indices: set[int], with_audio: bool) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The RGB frames at `indices` (in decoding order) and, when `with_audio`, the whole soundtrack."""
    with _open(data, "video") as container:
        video = container.streams.video[0]
        if with_audio and not container.streams.audio:
            raise MediaError("the video has no soundtrack; send it without asking for its audio")
        streams = [video, container.streams.audio[0]] if with_audio else [video]
        resampler = _Resampler()
        # Frames keep the stream's size even where the resolution changes midway (WebRTC recordings do).
        size = {"width": video.codec_context.width or None, "height": video.codec_context.height or None}
        frames: list[np.ndarray] = []
        position = 0
        for packet in container.demux(*streams):
            for frame in packet.decode():
                if packet.stream.index != video.index:
                    resampler.push(frame)
                    continue
                if position in indices:
                    frames.append(frame.to_ndarray(format="rgb24", **size))
                position += 1
    return frames, resampler.finish() if with_audio else None


def _fit(audio: np.ndarray, length: int) -> np.ndarray:
    """`audio` cut or padded with silence to `length` samples."""
    return np.pad(audio[:length], (0, max(0, length - audio.size)))


def _to_rgb(image: Image.Image) -> Image.Image:
    # As qwen-omni-utils does: transparent pixels become white rather than whatever colour they hide.
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image.convert("RGBA"))
        image = background
    return image.convert("RGB")
