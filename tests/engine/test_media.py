"""Tests for decoding user media: every input is generated here, in memory."""

from __future__ import annotations

import base64
import contextlib
import io

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omnitalk.engine.media import (
    SAMPLE_RATE,
    MediaError,
    decode_data_url,
    load_audio,
    load_image,
    load_video,
)

TONE_HZ = 440.0


def sine(rate: int, samples: int, hz: float = TONE_HZ, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(samples) / rate)).astype(np.float32)


def dominant_hz(audio: np.ndarray) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(audio)))) * SAMPLE_RATE / audio.size


def soundfile_bytes(signal: np.ndarray, rate: int, format: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, signal, rate, format=format, subtype=subtype)
    return buffer.getvalue()


def pyav_audio_bytes(signal: np.ndarray, rate: int, container_format: str, codec: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        _mux_audio(container, stream, signal, rate)
    return buffer.getvalue()


def _mux_audio(container: av.container.OutputContainer, stream: av.AudioStream, signal, rate: int) -> None:
    frame = av.AudioFrame.from_ndarray(signal[None], format="flt", layout="mono")
    frame.sample_rate = rate
    for packet in [*stream.encode(frame), *stream.encode(None)]:
        container.mux(packet)


def video_bytes(
    frames: int,
    rate: int = 10,
    container_format: str = "mp4",
    codec: str = "mpeg4",
    audio_codec: str | None = None,
    size: tuple[int, int] = (64, 48),
) -> bytes:
    """A video whose frame i shows i in binary as 8 black or white stripes, with a 440 Hz soundtrack if asked."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, options={"qscale": "1"} if codec == "mpeg4" else {})
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if audio_codec is not None:
            audio_rate = 48_000
            audio = container.add_stream(audio_codec, rate=audio_rate, layout="mono")
            _mux_audio(container, audio, sine(audio_rate, audio_rate * frames // rate), audio_rate)
        for index in range(frames):
            pixels = np.repeat(stripes(index), size[0] // 8, axis=1).repeat(size[1], axis=0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def stripes(index: int) -> np.ndarray:
    """Bits of `index`, most significant first, as a [1, 8, 3] row of black and white pixels."""
    bits = (index >> np.arange(7, -1, -1)) & 1
    return np.repeat(bits.astype(np.uint8)[None, :, None] * 255, 3, axis=2)


def frame_index(frame: np.ndarray) -> int:
    bits = frame.reshape(frame.shape[0], 8, -1, 3).mean(axis=(0, 2, 3)) > 128
    return int(sum(int(bit) << (7 - position) for position, bit in enumerate(bits)))


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


# --- data URLs ---


def test_decode_data_url() -> None:
    payload = b"\x00\x01binary\xff"
    url = "data:Audio/WAV;codecs=1;base64," + base64.b64encode(payload).decode()
    assert decode_data_url(url) == ("audio/wav", payload)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/a.wav", "expected a data: URL"),
        ("data:audio/wav;base64", "no ','"),
        ("data:audio/wav,plain%20text", "base64-encoded"),
        ("data:audio/wav;base64,not base64!", "not valid base64"),
        ("data:audio/wav;base64,", "no data"),
    ],
)
def test_decode_data_url_rejects(url: str, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        decode_data_url(url)


# --- audio ---

ONE_SECOND_44K = sine(44_100, 44_100)
CONTAINERS = {
    "wav": lambda: soundfile_bytes(ONE_SECOND_44K, 44_100, "WAV"),
    "flac": lambda: soundfile_bytes(ONE_SECOND_44K, 44_100, "FLAC"),
    "ogg-vorbis": lambda: soundfile_bytes(ONE_SECOND_44K, 44_100, "OGG", "VORBIS"),
    "ogg-opus": lambda: soundfile_bytes(sine(48_000, 48_000), 48_000, "OGG", "OPUS"),
    "mp3": lambda: soundfile_bytes(ONE_SECOND_44K, 44_100, "MP3", "MPEG_LAYER_III"),
    "m4a-aac": lambda: pyav_audio_bytes(ONE_SECOND_44K, 44_100, "mp4", "aac"),
    "webm-opus": lambda: pyav_audio_bytes(sine(48_000, 48_000), 48_000, "webm", "libopus"),
}
FORMAT_NAMES = {"ogg-vorbis": "ogg", "ogg-opus": "opus", "m4a-aac": "m4a", "webm-opus": "webm"}


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("named", [False, True], ids=["sniffed", "named"])
def test_audio_containers_decode_to_16k_mono(container: str, named: bool) -> None:
    format = FORMAT_NAMES.get(container, container) if named else None
    audio = load_audio(CONTAINERS[container](), format=format)
    assert audio.dtype == np.float32 and audio.ndim == 1
    # Lossy codecs add a little encoder delay and padding; lossless ones must be exact.
    tolerance = 1 if container in ("wav", "flac") else 0.05 * SAMPLE_RATE
    assert abs(audio.size - SAMPLE_RATE) <= tolerance
    assert abs(dominant_hz(audio) - TONE_HZ) <= 2
    assert np.abs(audio).max() <= 1.0


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000, 16_000])
@pytest.mark.parametrize("raw", [False, True], ids=["wav", "pcm16"])
def test_resampling_keeps_length_and_pitch(rate: int, raw: bool) -> None:
    samples = rate * 3 // 2 + 7  # an awkward length: 1.5 s and a few samples
    signal = sine(rate, samples, hz=1_000.0)
    if raw:
        audio = load_audio((signal * 32767).astype("<i2").tobytes(), format="pcm16", sample_rate=rate)
    else:
        audio = load_audio(soundfile_bytes(signal, rate, "WAV"))
    assert abs(audio.size - round(samples * SAMPLE_RATE / rate)) <= 1
    assert abs(dominant_hz(audio) - 1_000.0) <= 1
    assert np.abs(audio[1_000:-1_000]).max() == pytest.approx(0.5, abs=0.01)  # the edges ring a little


@pytest.mark.parametrize("raw", [False, True], ids=["wav", "pcm16"])
def test_stereo_is_the_mean_of_its_channels(raw: bool) -> None:
    left = sine(16_000, 16_000, amplitude=0.8)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    if raw:
        data = (stereo * 32767).astype("<i2").tobytes()
        audio = load_audio(data, format="pcm16", sample_rate=16_000, channels=2)
    else:
        audio = load_audio(soundfile_bytes(stereo, 16_000, "WAV"))
    assert audio.size == 16_000
    np.testing.assert_allclose(audio, left / 2, atol=1e-3)


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (b"", {}, "empty"),
        (b"\x00\x01" * 100, {"format": "pcm16"}, "needs its sample rate"),
        (b"\x00\x01\x02", {"format": "pcm16", "sample_rate": 16_000}, "whole 1-channel 16-bit frames"),
        (b"\x00\x01" * 3, {"format": "pcm16", "sample_rate": 16_000, "channels": 2}, "whole 2-channel"),
        (b"\x00\x01", {"format": "pcm16", "sample_rate": 0}, "invalid pcm16 parameters"),
        (b"RIFF", {"format": "aiff"}, "unsupported audio format 'aiff'"),
        (np.random.default_rng(0).bytes(5_000), {}, "could not be decoded"),
        (soundfile_bytes(ONE_SECOND_44K, 44_100, "WAV"), {"format": "flac"}, "no samples .is it really flac"),
        (soundfile_bytes(ONE_SECOND_44K, 44_100, "WAV")[:44], {}, "no samples"),
        (soundfile_bytes(ONE_SECOND_44K, 44_100, "WAV")[:20], {}, "could not be decoded"),
        (png_bytes(Image.new("RGB", (8, 8))), {}, "could not be decoded .is it a whole audio file"),
    ],
    ids=[
        "empty",
        "pcm16-no-rate",
        "pcm16-odd-bytes",
        "pcm16-partial-frame",
        "pcm16-bad-rate",
        "unknown-format",
        "garbage",
        "wrong-format",
        "header-only",
        "truncated-header",
        "image",
    ],
)
def test_bad_audio_raises_media_error(data: bytes, kwargs: dict, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        load_audio(data, **kwargs)


def test_truncated_mp4_audio_raises_media_error() -> None:
    data = pyav_audio_bytes(ONE_SECOND_44K, 44_100, "mp4", "aac")  # the index (moov) is written last
    with pytest.raises(MediaError, match="could not be decoded"):
        load_audio(data[: len(data) // 2])


# --- images ---


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_images_round_trip(format: str) -> None:
    original = Image.new("RGB", (37, 21), (200, 30, 90))
    image = load_image(png_bytes(original, format))
    assert image.mode == "RGB" and image.size == (37, 21)
    assert np.abs(np.asarray(image, dtype=int) - (200, 30, 90)).max() <= 8  # lossy formats shift colours a little


def test_image_is_fully_loaded() -> None:
    buffer = io.BytesIO(png_bytes(Image.new("RGB", (4, 4), (1, 2, 3))))
    image = load_image(buffer.getvalue())
    buffer.close()
    assert image.getpixel((0, 0)) == (1, 2, 3)


def test_transparency_becomes_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    image = load_image(png_bytes(rgba))
    assert image.getpixel((0, 0)) == (10, 20, 30)
    assert image.getpixel((3, 3)) == (255, 255, 255)


def test_grey_and_palette_images_become_rgb() -> None:
    for source in (Image.new("L", (5, 5), 77), Image.new("RGB", (5, 5), (9, 99, 199)).convert("P")):
        image = load_image(png_bytes(source))
        assert image.mode == "RGB" and image.getpixel((2, 2)) == source.convert("RGB").getpixel((2, 2))


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    Image.new("RGB", (40, 10)).save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (10, 40)


def test_decompression_bomb_raises_media_error(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png_bytes(Image.new("RGB", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # PIL refuses images over twice this
    with pytest.raises(MediaError, match="too large"):
        load_image(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"GIF89a but not really an image at all", "could not be decoded|not in a format"),
        (np.random.default_rng(1).bytes(2_000), "not in a format"),
        (png_bytes(Image.effect_noise((64, 64), 50))[:300], "could not be decoded"),
        (soundfile_bytes(ONE_SECOND_44K, 44_100, "WAV"), "not in a format"),
    ],
    ids=["empty", "bad-gif", "garbage", "truncated-png", "audio"],
)
def test_bad_images_raise_media_error(data: bytes, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        load_image(data)


# --- video ---


@pytest.mark.parametrize(
    ("frames", "expected"),
    [(10, 4), (50, 10), (33, 6), (25, 4), (3, 2), (1_000, 200)],
    ids=["1s", "5s", "3.3s", "2.5s", "3-frames", "100s"],
)
def test_video_frame_count_follows_qwen(frames: int, expected: int) -> None:
    video = load_video(video_bytes(frames, size=(16, 16)))
    assert video.frames.shape == (expected, 16, 16, 3)
    assert video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(expected / frames * 10)
    assert video.audio is None


def test_video_frame_count_caps() -> None:
    assert load_video(video_bytes(33), fps=50).frames.shape[0] == 32  # no more than the video has
    assert load_video(video_bytes(2_000, rate=25, size=(16, 16)), fps=50).frames.shape[0] == 768


@pytest.mark.parametrize(("frames", "count"), [(50, 10), (33, 6), (10, 4)])
@pytest.mark.parametrize(("container_format", "codec"), [("mp4", "mpeg4"), ("mp4", "libx264"), ("webm", "libvpx")])
def test_video_frames_are_spread_uniformly(frames: int, count: int, container_format: str, codec: str) -> None:
    video = load_video(video_bytes(frames, container_format=container_format, codec=codec))
    expected = np.linspace(0, frames - 1, count).round().astype(int).tolist()
    assert [frame_index(frame) for frame in video.frames] == expected


@pytest.mark.parametrize(
    ("container_format", "codec", "audio_codec"),
    [("mp4", "mpeg4", "aac"), ("mp4", "libx264", "aac"), ("webm", "libvpx", "libopus")],
)
def test_video_soundtrack_covers_the_video(container_format: str, codec: str, audio_codec: str) -> None:
    data = video_bytes(33, container_format=container_format, codec=codec, audio_codec=audio_codec)
    video = load_video(data, with_audio=True)
    assert video.frames.shape == (6, 48, 64, 3)
    assert video.audio is not None and video.audio.dtype == np.float32
    assert video.audio.size == round(3.3 * SAMPLE_RATE)
    assert abs(dominant_hz(video.audio) - TONE_HZ) <= 2
    assert load_video(data).audio is None


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (b"", {}, "empty"),
        (np.random.default_rng(2).bytes(5_000), {}, "could not be decoded"),
        (soundfile_bytes(ONE_SECOND_44K, 44_100, "WAV"), {}, "no video stream"),
        (video_bytes(10), {"with_audio": True}, "no soundtrack"),
        (video_bytes(1), {}, "too short"),
        (video_bytes(10)[:700], {}, "is it a whole video file"),
        (video_bytes(10), {"fps": 0}, "must be positive"),
    ],
    ids=["empty", "garbage", "audio-only", "silent", "one-frame", "truncated", "zero-fps"],
)
def test_bad_video_raises_media_error(data: bytes, kwargs: dict, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        load_video(data, **kwargs)


# --- damaged files ---


@pytest.mark.parametrize(
    ("loader", "make"),
    [
        (load_audio, CONTAINERS["mp3"]),
        (load_audio, CONTAINERS["m4a-aac"]),
        (load_audio, CONTAINERS["ogg-vorbis"]),
        (load_image, lambda: png_bytes(Image.effect_noise((32, 32), 50).convert("RGB"), "JPEG")),
        (load_image, lambda: png_bytes(Image.new("RGB", (20, 20)), "WEBP")),
        (lambda data: load_video(data, with_audio=True), lambda: video_bytes(20, audio_codec="aac")),
    ],
    ids=["mp3", "m4a", "ogg", "jpeg", "webp", "mp4"],
)
def test_damaged_files_raise_only_media_error(loader, make) -> None:
    """Cut or scribbled-over files either still decode or raise MediaError, never a decoder's own exception."""
    data = make()
    rng = np.random.default_rng(3)
    for trial in range(30):
        damaged = bytearray(data[: rng.integers(len(data))] if trial % 2 else data)
        for position in rng.integers(len(damaged), size=0 if trial % 2 else 10):
            damaged[position] = rng.integers(256)
        with contextlib.suppress(MediaError):
            loader(bytes(damaged))


# --- hostile input ---


def test_concat_lists_never_open_files(tmp_path, monkeypatch) -> None:
    """An ffconcat list naming a real file is refused before any demuxer reads it (no local file read)."""
    (tmp_path / "secret.wav").write_bytes(soundfile_bytes(ONE_SECOND_44K, 44_100, "WAV"))
    monkeypatch.chdir(tmp_path)
    listing = b"ffconcat version 1.0\nfile 'secret.wav'\n"
    missing = b"ffconcat version 1.0\nfile 'missing.wav'\n"
    errors = []
    for data in (listing, missing):
        with pytest.raises(MediaError, match="could not be decoded") as caught:
            load_audio(data)
        errors.append(str(caught.value))
        with pytest.raises(MediaError, match="could not be decoded"):
            load_video(data)
    assert errors[0] == errors[1]  # nothing tells whether a path exists


def test_hls_playlists_are_refused() -> None:
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    with pytest.raises(MediaError, match="could not be decoded"):
        load_audio(playlist)


def test_raw_audio_duration_is_checked_before_resampling() -> None:
    """20 kB of pcm16 at 1 Hz would be 10,000 s once resampled: refused from its length alone."""
    with pytest.raises(MediaError, match=r"lasts 10000\.0 s"):
        load_audio(b"\x00\x01" * 10_000, format="pcm16", sample_rate=1, max_seconds=600)


def test_container_audio_longer_than_the_limit_is_refused() -> None:
    with pytest.raises(MediaError, match=r"lasts 1\.0 s; this server takes at most 0\.5 s"):
        load_audio(soundfile_bytes(ONE_SECOND_44K, 44_100, "WAV"), max_seconds=0.5)


def test_video_longer_than_the_limit_is_refused() -> None:
    with pytest.raises(MediaError, match="this server takes at most 1 s"):
        load_video(video_bytes(30), max_seconds=1)


def test_images_beyond_the_pixel_budget_are_downscaled_on_the_28_grid() -> None:
    image = load_image(png_bytes(Image.new("RGB", (600, 300))), max_pixels=28 * 28 * 50)
    assert image.size == (280, 140)
    assert image.width * image.height <= 28 * 28 * 50
    assert load_image(png_bytes(Image.new("RGB", (60, 30))), max_pixels=28 * 28 * 50).size == (60, 30)
