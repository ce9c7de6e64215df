"""The audio limits as settings: each one refuses what is over it with INVALID_ARGUMENT, a
message naming the field and the limit, and a `google.rpc.BadRequest` detail; the request size
limit is gRPC's own RESOURCE_EXHAUSTED. And every InvalidArgument the server raises names its
field."""

from __future__ import annotations

import ast
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import soundfile
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.api.voicegate.v1 import audio_pb2, speaker_pb2, speaker_pb2_grpc
from server.audio import AudioLimits, RawAudioSpec, SampleFormat, decode_content, decode_raw
from server.config import Settings
from server.errors import DeadlineExceeded, InvalidArgument
from server.grpc_errors import rich_status
from tests import speech

ROOT = Path(__file__).resolve().parents[1]
LIMITED = {
    "max_audio_seconds": 3.0,
    "min_speech_seconds": 1.0,
    "min_sample_rate_hz": 11_025,
    "max_sample_rate_hz": 24_000,
    "max_channels": 2,
    "max_message_bytes": 512 * 1024,
}


def wav(seconds: float, rate: int = 16_000, channels: int = 1) -> bytes:
    return speech.wav_bytes(speech.tone(seconds, rate, channels), rate, "WAV", "PCM_16")


def raw(seconds: float, rate: int = 16_000, channels: int = 1) -> audio_pb2.Audio:
    return speech.raw16(speech.tone(seconds, rate, channels), rate)


# --- in process -------------------------------------------------------------------------------


def test_settings_become_audio_limits() -> None:
    settings = Settings.load(LIMITED, environ={})
    assert settings.audio_limits == AudioLimits(
        max_seconds=3.0,
        min_sample_rate_hz=11_025,
        max_sample_rate_hz=24_000,
        max_channels=2,
        min_speech_seconds=1.0,
    )
    assert Settings.load(environ={}).audio_limits == AudioLimits()


def test_limits_are_checked_from_the_header_before_decoding(monkeypatch) -> None:
    """Over-long, too-fast or too-wide files are refused without reading a sample."""
    import soundfile as sf

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("samples were read")

    monkeypatch.setattr(sf.SoundFile, "read", no_reading)
    limits = Settings.load(LIMITED, environ={}).audio_limits
    for content, message in [
        (wav(4.0), r"audio.content lasts 4.0 s, over the limit of 3 s"),
        (wav(0.5, rate=44_100), r"sample rate 44100 Hz is outside the accepted 11025..24000 Hz"),
        (wav(0.5, channels=3), r"3 channels; 1..2 are accepted"),
    ]:
        with pytest.raises(InvalidArgument, match=message) as caught:
            decode_content(content, limits)
        assert caught.value.field == "audio.content"


def test_raw_limits_are_checked_from_the_byte_length() -> None:
    limits = AudioLimits(max_seconds=1.0)
    samples = np.zeros(16_001, "<i2").tobytes()  # one frame over
    with pytest.raises(InvalidArgument, match=r"lasts 1\.0 s, over the limit of 1 s") as caught:
        decode_raw(RawAudioSpec(samples, SampleFormat.LINEAR16, 16_000), limits)
    assert caught.value.field == "audio.raw.samples"


def test_a_compressed_bomb_stops_at_the_limit_with_bounded_memory() -> None:
    """A FLAC of silence whose header understates its length: decoding stops at the limit."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((48_000 * 20, 2), np.float32), 48_000, format="FLAC")
    content = bytearray(buffer.getvalue())
    offset = 8 + 10 + 4  # STREAMINFO: the low 32 bits of the 36-bit total sample count
    content[offset : offset + 4] = (48_000).to_bytes(4, "big")  # "1 s"
    wave = decode_content(bytes(content), AudioLimits(max_seconds=5.0))
    assert len(wave) <= 16_000  # libsndfile stops where the header says the stream ends
    full = decode_content(buffer.getvalue(), AudioLimits(max_seconds=30.0))
    assert len(full) == 20 * 16_000


def test_decoding_stops_at_the_deadline() -> None:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((48_000 * 5, 2), np.float32), 48_000, format="FLAC")
    with pytest.raises(DeadlineExceeded, match=r"while decoding audio\.content"):
        decode_content(buffer.getvalue(), AudioLimits(), deadline=time.monotonic() - 1)
    raw_audio = RawAudioSpec(b"\x00\x00" * 16_000, SampleFormat.LINEAR16, 16_000)
    with pytest.raises(DeadlineExceeded, match=r"while decoding audio\.raw\.samples"):
        decode_raw(raw_audio, AudioLimits(), deadline=time.monotonic() - 1)


def test_rich_status_carries_a_bad_request() -> None:
    status = rich_status(InvalidArgument("top_k must be 0 to 100", field="top_k"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "top_k must be 0 to 100"
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    decoded = rpc_status.status_pb2.Status.FromString(value)
    found = error_details_pb2.BadRequest()
    assert decoded.details[0].Unpack(found)
    assert found.field_violations[0].field == "top_k"
    assert found.field_violations[0].description == "top_k must be 0 to 100"


INVALID_ARGUMENT_CLASSES = {"InvalidArgument", "InvalidAudio", "NotEnoughSpeech"}


def test_every_invalid_argument_names_its_field() -> None:
    """Each InvalidArgument the server constructs passes `field=` (the BadRequest's path)."""
    missing = []
    for path in sorted((ROOT / "server").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in INVALID_ARGUMENT_CLASSES
                and not any(keyword.arg == "field" for keyword in node.keywords)
            ):
                missing.append(f"{path.name}:{node.lineno}")
    assert not missing, f"InvalidArgument without field=: {missing}"


# --- through a server with tight limits -------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def limited_stub(base_settings: Settings, triton: object) -> AsyncIterator[Any]:
    from server.app import VoicegateApp

    settings = base_settings.replace(
        triton_url=triton.grpc_url,  # type: ignore[attr-defined]
        **LIMITED,
    )
    async with (
        VoicegateApp(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield speaker_pb2_grpc.SpeakerServiceStub(channel)


LIMIT_CASES = [
    ("max_audio_seconds", raw(4.0), "audio.raw.samples", "over the limit of 3 s"),
    ("max_audio_seconds", audio_pb2.Audio(content=wav(4.0)), "audio.content", "limit of 3 s"),
    ("min_sample_rate_hz", raw(1.5, rate=8_000), "audio.raw.sample_rate_hz", "11025..24000 Hz"),
    (
        "max_sample_rate_hz",
        audio_pb2.Audio(content=wav(1.5, rate=44_100)),
        "audio.content",
        "sample rate 44100 Hz is outside the accepted 11025..24000 Hz",
    ),
    ("max_channels", raw(1.5, channels=3), "audio.raw.channels", "3 channels; 1..2 are accepted"),
    (
        "min_speech_seconds",
        audio_pb2.Audio(content=wav(0.8)),
        "audio",
        "s of speech after silence trimming; at least 1.00 s is needed",
    ),
]


@pytest.mark.integration
@pytest.mark.parametrize(("setting", "audio", "field", "message"), LIMIT_CASES)
async def test_each_limit_is_invalid_argument_with_a_bad_request(
    limited_stub: Any, setting: str, audio: audio_pb2.Audio, field: str, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await limited_stub.Embed(speaker_pb2.EmbedRequest(audio=audio), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, setting
    assert message in caught.value.details(), setting
    assert caught.value.details().startswith(field), setting
    violation = speech.bad_request(caught.value)
    assert violation.field == field
    assert violation.description == caught.value.details()


@pytest.mark.integration
async def test_within_the_limits_is_embedded(limited_stub: Any, speech_files: list[Path]) -> None:
    import soxr

    wav, rate = speech.read(speech_files[0])
    resampled = soxr.resample(wav[: int(2.5 * rate)], rate, 22_050).astype(np.float32)
    stereo = speech.raw16(np.stack([resampled, 0.8 * resampled], axis=1), 22_050)
    reply = await limited_stub.Embed(speaker_pb2.EmbedRequest(audio=stereo), timeout=30)
    assert len(reply.embedding) == 256


@pytest.mark.integration
async def test_fields_name_the_side_and_the_item(limited_stub: Any) -> None:
    good = audio_pb2.Audio(content=wav(1.5))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await limited_stub.Verify(
            speaker_pb2.VerifyRequest(reference=good, probe=raw(1.5, rate=8_000)), timeout=30
        )
    assert speech.bad_request(caught.value).field == "probe.raw.sample_rate_hz"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await limited_stub.Enroll(
            speaker_pb2.EnrollRequest(speaker_id="limits-1", audio=[good, raw(4.0)]), timeout=30
        )
    assert speech.bad_request(caught.value).field == "audio[1].raw.samples"


@pytest.mark.integration
async def test_a_request_over_max_message_bytes_is_resource_exhausted(limited_stub: Any) -> None:
    """gRPC refuses it before the service sees it: no BadRequest detail, gRPC's message."""
    audio = audio_pb2.Audio(content=b"\x00" * (600 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await limited_stub.Embed(speaker_pb2.EmbedRequest(audio=audio), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.details()
    assert f"{512 * 1024}" in caught.value.details()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("request_kind", "field"),
    [("model", "model"), ("top_k", "top_k"), ("speaker_id", "speaker_id"), ("none", "audio")],
)
async def test_other_invalid_arguments_carry_their_field(
    speaker_stub: Any, request_kind: str, field: str
) -> None:
    audio = audio_pb2.Audio(content=wav(1.5))
    calls = {
        "model": lambda: speaker_stub.Embed(speaker_pb2.EmbedRequest(audio=audio, model="x")),
        "top_k": lambda: speaker_stub.Identify(speaker_pb2.IdentifyRequest(audio=audio, top_k=999)),
        "speaker_id": lambda: speaker_stub.GetSpeaker(
            speaker_pb2.GetSpeakerRequest(speaker_id="no spaces allowed")
        ),
        "none": lambda: speaker_stub.Embed(speaker_pb2.EmbedRequest()),
    }
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await calls[request_kind]()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert speech.bad_request(caught.value).field == field
