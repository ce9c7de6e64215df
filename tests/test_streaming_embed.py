"""StreamingEmbed through the real server and Triton: the same embedding as Embed of the whole
recording (both silence trims), bounded memory, the duration limit, and a client that goes
away mid-stream leaving nothing behind."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio

from server.api.voicegate.v1 import audio_pb2, speaker_pb2, speaker_pb2_grpc
from server.config import Settings
from tests import speech

pytestmark = pytest.mark.integration

TOLERANCE = 1e-4  # max abs difference per embedding dimension, the contract
MAX_STREAM_SECONDS = 90.0  # of the "vad" app below, small enough for the limit test


def _samples(path: Path) -> np.ndarray:
    import soundfile

    wav, rate = soundfile.read(path, dtype="float32", always_2d=False)
    assert rate == 16_000 and wav.ndim == 1
    return wav


def _random_chunks(data: bytes, rng: np.random.Generator, largest: int) -> list[bytes]:
    """`data` cut at random places, sample and frame boundaries ignored (some chunks empty)."""
    chunks, at = [], 0
    while at < len(data):
        size = int(rng.integers(0, largest))
        chunks.append(data[at : at + size])
        at += size
    return chunks


def _requests(
    config: speaker_pb2.StreamingEmbedConfig, chunks: Sequence[bytes]
) -> Iterator[speaker_pb2.StreamingEmbedRequest]:
    yield speaker_pb2.StreamingEmbedRequest(config=config)
    for chunk in chunks:
        yield speaker_pb2.StreamingEmbedRequest(audio_chunk=chunk)


def _sample(app: Any, name: str, labels: dict[str, str] | None = None) -> float:
    value = app.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vad_app(base_settings: Settings, triton: Any) -> AsyncIterator[Any]:
    """A second front server on the session's Triton, trimming with the VAD."""
    from server.app import VoicegateApp

    settings = base_settings.replace(
        triton_url=triton.grpc_url, trim="vad", max_stream_seconds=MAX_STREAM_SECONDS
    )
    async with VoicegateApp(settings) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vad_stub(vad_app: Any) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{vad_app.port}") as channel:
        yield speaker_pb2_grpc.SpeakerServiceStub(channel)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def energy_stub(base_settings: Settings, triton: Any) -> AsyncIterator[Any]:
    """A front server on the session's Triton trimming with the energy rule (not the default)."""
    from server.app import VoicegateApp

    settings = base_settings.replace(triton_url=triton.grpc_url, trim="energy")
    async with (
        VoicegateApp(settings) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        yield speaker_pb2_grpc.SpeakerServiceStub(channel)


@pytest.fixture(params=["energy", "vad"])
def trim_stub(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    yield request.param, request.getfixturevalue(f"{request.param}_stub")


async def _embed_both(
    stub: Any,
    audio: audio_pb2.RawAudio,
    config: speaker_pb2.StreamingEmbedConfig,
    chunks: Sequence[bytes],
) -> tuple[Any, Any]:
    whole = await stub.Embed(speaker_pb2.EmbedRequest(audio=audio_pb2.Audio(raw=audio)), timeout=60)
    streamed = await stub.StreamingEmbed(_requests(config, chunks), timeout=60)
    return whole, streamed


def _difference(whole: Any, streamed: Any) -> float:
    assert streamed.model == whole.model
    assert streamed.partial_count == whole.partial_count
    assert streamed.speech_seconds == pytest.approx(whole.speech_seconds, abs=1e-6)
    a = np.asarray(whole.embedding, dtype=np.float64)
    b = np.asarray(streamed.embedding, dtype=np.float64)
    assert a.shape == b.shape == (256,)
    return float(np.abs(a - b).max())


async def test_streaming_embed_equals_embed(
    trim_stub: tuple[str, Any], speech_files: list[Path], report: Callable[[str], None]
) -> None:
    """16 kHz LINEAR16 split at random bytes (odd ones too): Embed's embedding within 1e-4."""
    trim, stub = trim_stub
    rng = np.random.default_rng(7)
    worst = 0.0
    for path in speech_files[:4]:
        data = speech.pcm16(_samples(path), rounded=True)
        audio = audio_pb2.RawAudio(
            samples=data, format=audio_pb2.SAMPLE_FORMAT_LINEAR16, sample_rate_hz=16_000
        )
        config = speaker_pb2.StreamingEmbedConfig(
            format=audio_pb2.SAMPLE_FORMAT_LINEAR16, sample_rate_hz=16_000
        )
        whole, streamed = await _embed_both(stub, audio, config, _random_chunks(data, rng, 20_000))
        worst = max(worst, _difference(whole, streamed))
    report(f"StreamingEmbed vs Embed, trim={trim}, 16 kHz LINEAR16: max abs diff {worst:.2e}")
    assert worst <= TOLERANCE


async def test_streaming_embed_resampled_stereo_equals_embed(
    trim_stub: tuple[str, Any], speech_files: list[Path], report: Callable[[str], None]
) -> None:
    """44.1 kHz stereo FLOAT32: the streamed resampler must give Embed's samples."""
    import soxr

    trim, stub = trim_stub
    rng = np.random.default_rng(11)
    wav = soxr.resample(_samples(speech_files[5]), 16_000, 44_100).astype(np.float32)
    stereo = np.stack([wav, 0.5 * wav], axis=1)
    data = stereo.astype("<f4").tobytes()
    audio = audio_pb2.RawAudio(
        samples=data, format=audio_pb2.SAMPLE_FORMAT_FLOAT32, sample_rate_hz=44_100, channels=2
    )
    config = speaker_pb2.StreamingEmbedConfig(
        format=audio_pb2.SAMPLE_FORMAT_FLOAT32, sample_rate_hz=44_100, channels=2
    )
    whole, streamed = await _embed_both(stub, audio, config, _random_chunks(data, rng, 50_000))
    difference = _difference(whole, streamed)
    report(f"StreamingEmbed vs Embed, trim={trim}, 44.1 kHz stereo: max abs diff {difference:.2e}")
    assert difference <= TOLERANCE


async def test_streaming_memory_is_bounded_by_the_partial_window(
    vad_app: Any, vad_stub: Any, speech_files: list[Path], report: Callable[[str], None]
) -> None:
    """trim="vad": 88 s of audio (just under the app's limit) with long silences in it; the
    server never holds more than a constant (VAD window, undecided audio, one partial window's
    mel frames, the cut windows not yet encoded), however long the recording and its speech."""
    rng = np.random.default_rng(3)
    pieces = []
    for path in speech_files[10:18]:
        pieces += [_samples(path)[: 16_000 * 8], np.zeros(16_000 * 3, np.float32)]
    wav = np.concatenate(pieces)
    data = speech.pcm16(wav, rounded=True)
    config = speaker_pb2.StreamingEmbedConfig(
        format=audio_pb2.SAMPLE_FORMAT_LINEAR16, sample_rate_hz=16_000
    )
    chunks = _random_chunks(data, rng, 16_000)
    peaks = [0.0, 0.0]  # in the first and the second half of the stream
    sent = 0
    held = "voicegate_streaming_embed_held_bytes"

    async def requests() -> AsyncIterator[speaker_pb2.StreamingEmbedRequest]:
        nonlocal sent
        yield speaker_pb2.StreamingEmbedRequest(config=config)
        for chunk in chunks:
            yield speaker_pb2.StreamingEmbedRequest(audio_chunk=chunk)
            sent += len(chunk)
            await asyncio.sleep(0.002)  # let the server keep up, as a real-time source would
            half = 0 if sent < len(data) // 2 else 1
            peaks[half] = max(peaks[half], _sample(vad_app, held))

    response = await vad_stub.StreamingEmbed(requests(), timeout=180)
    mel_of_speech = response.speech_seconds * 16_000  # what holding the speech's mel would take
    # VAD window (64 frames of float32) and undecided audio (< 1 s), the decoder's chunk, one
    # partial window's mel frames plus an STFT block, 3 windows cut and not yet encoded
    bound = 64 * 512 * 4 + 16_000 * 4 + 16_000 * 2 + (160 + 77 + 64) * 160 + 3 * 25_600
    report(
        f"StreamingEmbed trim=vad, {len(wav) / 16_000:.0f} s of audio, "
        f"{response.speech_seconds:.1f} s speech: peak held {max(peaks) / 1e3:.0f} KB "
        f"(first half {peaks[0] / 1e3:.0f} KB, second {peaks[1] / 1e3:.0f} KB; the speech's mel "
        f"would be {mel_of_speech / 1e3:.0f} KB, the decoded audio {len(wav) * 4 / 1e3:.0f} KB)"
    )
    assert response.partial_count > 50
    assert 0 < max(peaks) <= bound < mel_of_speech
    assert _sample(vad_app, held) == 0


async def test_stream_over_the_duration_limit_fails_at_once(vad_stub: Any) -> None:
    one_second = bytes(32_000)  # LINEAR16 silence
    config = speaker_pb2.StreamingEmbedConfig(
        format=audio_pb2.SAMPLE_FORMAT_LINEAR16, sample_rate_hz=16_000
    )
    never = asyncio.Event()

    async def requests() -> AsyncIterator[speaker_pb2.StreamingEmbedRequest]:
        yield speaker_pb2.StreamingEmbedRequest(config=config)
        for _ in range(int(MAX_STREAM_SECONDS) + 5):
            yield speaker_pb2.StreamingEmbedRequest(audio_chunk=one_second)
        await never.wait()  # the client would go on: the server must not wait for the end

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await vad_stub.StreamingEmbed(requests(), timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not DEADLINE_EXCEEDED
    assert "max_stream_seconds" in (failure.value.details() or "")


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([], "config is required"),
        (["chunk"], "config is required"),
        (["config", "config"], "only be sent in the first"),
        (["config"], "no audio"),
        (["config", "odd"], "not a whole number"),
    ],
)
async def test_stream_protocol_errors(speaker_stub: Any, messages: list[str], words: str) -> None:
    config = speaker_pb2.StreamingEmbedConfig(
        format=audio_pb2.SAMPLE_FORMAT_LINEAR16, sample_rate_hz=16_000
    )
    kinds = {
        "config": speaker_pb2.StreamingEmbedRequest(config=config),
        "chunk": speaker_pb2.StreamingEmbedRequest(audio_chunk=bytes(3200)),
        "odd": speaker_pb2.StreamingEmbedRequest(audio_chunk=bytes(3201)),
    }
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await speaker_stub.StreamingEmbed(iter([kinds[m] for m in messages]), timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (failure.value.details() or "")


async def test_bad_config_and_model_are_refused(speaker_stub: Any) -> None:
    for config, words in [
        (speaker_pb2.StreamingEmbedConfig(sample_rate_hz=16_000), "format is required"),
        (
            speaker_pb2.StreamingEmbedConfig(
                format=audio_pb2.SAMPLE_FORMAT_LINEAR16, sample_rate_hz=4_000
            ),
            "sample rate",
        ),
        (
            speaker_pb2.StreamingEmbedConfig(
                format=audio_pb2.SAMPLE_FORMAT_LINEAR16, sample_rate_hz=16_000, model="nope"
            ),
            "not served",
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await speaker_stub.StreamingEmbed(_requests(config, [bytes(32_000)]), timeout=30)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (failure.value.details() or "")


async def test_client_gone_mid_stream_leaves_nothing_behind(
    vad_app: Any, vad_stub: Any, speech_files: list[Path]
) -> None:
    """The client cancels after a few seconds of audio: the server's session ends at once, its
    memory is released, and no more VAD or encoder requests go to Triton."""
    from server.streaming_embed import live_sessions

    data = speech.pcm16(_samples(speech_files[2]), rounded=True)
    config = speaker_pb2.StreamingEmbedConfig(
        format=audio_pb2.SAMPLE_FORMAT_LINEAR16, sample_rate_hz=16_000
    )
    never = asyncio.Event()

    async def requests() -> AsyncIterator[speaker_pb2.StreamingEmbedRequest]:
        yield speaker_pb2.StreamingEmbedRequest(config=config)
        for at in range(0, 32_000 * 4, 8_000):
            yield speaker_pb2.StreamingEmbedRequest(audio_chunk=data[at : at + 8_000])
        await never.wait()  # a client still "recording", then gone

    def vad_requests() -> float:
        return _sample(
            vad_app, "voicegate_triton_requests_total", {"model": "silero_vad", "grpc_code": "OK"}
        )

    def encoder_requests() -> float:
        return sum(
            _sample(vad_app, "voicegate_triton_requests_total", {"model": m, "grpc_code": "OK"})
            for m in vad_app.settings.encoder_models
        )

    vad_before, encoder_before = vad_requests(), encoder_requests()
    call = vad_stub.StreamingEmbed(requests(), timeout=60)
    core = vad_app.core
    for _ in range(500):  # the server has taken the audio in and asked the VAD
        if core.active_streams == 1 and vad_requests() >= vad_before + 3:
            break
        await asyncio.sleep(0.01)
    assert core.active_streams == 1
    assert _sample(vad_app, "voicegate_streaming_embed_sessions") == 1
    assert _sample(vad_app, "voicegate_streaming_embed_held_bytes") > 0

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(300):
        if core.active_streams == 0:
            break
        await asyncio.sleep(0.01)
    assert core.active_streams == 0
    assert _sample(vad_app, "voicegate_streaming_embed_sessions") == 0
    assert _sample(vad_app, "voicegate_streaming_embed_held_bytes") == 0
    gc.collect()
    assert live_sessions() == 0
    vad_after = vad_requests()
    await asyncio.sleep(1.0)
    assert vad_requests() == vad_after  # nothing more is sent for the cancelled call
    assert encoder_requests() == encoder_before  # the encoder was never called


# ---------------------------------------------------------------- the pieces, without servers


def test_partial_cutter_is_bit_identical_however_cut_and_bounded() -> None:
    """Speech fed in random pieces, windows taken as they are cut: the windows of one piece, bit
    for bit; memory bounded by a window; and features.partial_windows to float rounding."""
    from server.features import partial_windows
    from server.streaming_embed import PartialCutter

    rng = np.random.default_rng(0)
    # quiet, then loud, then quiet: the gain differs per window
    x = np.concatenate(
        [
            0.002 * rng.standard_normal(16_000 * 20 + 123),
            0.3 * rng.standard_normal(16_000 * 5),
            0.001 * rng.standard_normal(16_000 * 15),
        ]
    ).astype(np.float32)

    def windows(cuts: Sequence[int]) -> tuple[np.ndarray, int]:
        cutter, at, taken, peak = PartialCutter(), 0, [], 0
        for size in cuts:
            cutter.feed(x[at : at + size])
            at += size
            peak = max(peak, cutter.nbytes)
            taken += cutter.take()
        cutter.feed(x[at:])
        return np.stack(taken + cutter.finish()), peak

    whole, _ = windows([])
    pieces, peak = windows(list(rng.integers(1, 3_000, 400)))
    assert np.array_equal(whole, pieces)
    assert peak <= (160 + 77 + 64) * 160 + 3_000 * 4 + 25_600
    reference = partial_windows(x)
    assert reference.shape == whole.shape
    scale = reference.max(axis=(1, 2), keepdims=True)
    assert np.abs(whole - reference).max(axis=(1, 2)).max() <= 1e-5 * scale.max()
    assert (np.abs(whole - reference) <= 1e-5 * scale).all()


def test_partial_windows_are_loudness_normalised_one_by_one() -> None:
    """Each window of quiet speech is raised to -30 dBFS by its own samples: a recording at
    -60 and at -40 dBFS gives the same windows, and a loud window next to quiet ones is left
    as it is."""
    from server.features import HOP, partial_slices, partial_windows, power_mel

    rng = np.random.default_rng(1)
    x = rng.standard_normal(16_000 * 6).astype(np.float32)
    quiet = partial_windows((0.001 * x).astype(np.float32))
    less_quiet = partial_windows((0.01 * x).astype(np.float32))
    np.testing.assert_allclose(quiet, less_quiet, rtol=1e-4)
    signal = np.concatenate([0.001 * x, 0.5 * x]).astype(np.float32)
    mixed = partial_windows(signal)
    np.testing.assert_allclose(mixed[0], quiet[0], rtol=1e-4)  # raised by its own samples
    last = partial_slices(len(signal))[-1]
    unscaled = power_mel(np.pad(signal, (0, max(0, last.stop * HOP - len(signal)))))[last]
    assert np.array_equal(mixed[-1], unscaled)  # loud: left as it is


def test_vad_speech_streamed_equals_whole_and_keeps_little_audio() -> None:
    """Synthetic probabilities: the streamed features equal Embed's (`vad_features`) bit for
    bit, the speech is exactly the segments' samples, and the audio kept stays bounded."""
    from server.streaming_embed import VadSpeechFeatures, vad_features
    from server.vad import VadParams, frame_count, speech_segments

    rng = np.random.default_rng(5)
    n = 16_000 * 60 + 321
    wav = (0.05 * rng.standard_normal(n)).astype(np.float32)
    frames = frame_count(n)
    # speech in bursts of 0.2-4 s, silences of 0.05-3 s
    probabilities = np.zeros(frames, np.float32)
    at, speaking = 0, False
    while at < frames:
        length = int(rng.integers(2, 125) if speaking else rng.integers(2, 95))
        probabilities[at : at + length] = rng.uniform(0.6, 1.0) if speaking else 0.1
        at, speaking = at + length, not speaking
    params = VadParams()
    segments = speech_segments(probabilities, n, params)
    expected = sum(s.end_sample - s.start_sample for s in segments)

    whole = vad_features(wav, probabilities, params, 32)
    assert whole.speech_samples == expected
    assert [(s.start_sample, s.end_sample) for s in whole.segments] == [
        (s.start_sample, s.end_sample) for s in segments
    ]

    streamed = VadSpeechFeatures(params, 32)
    sent, at, kept = 0, 0, 0
    while True:
        size = int(rng.integers(1, 20_000))
        streamed.add(wav[at : at + size])
        at = min(n, at + size)
        final = at >= n
        while (window := streamed.window(final)) is not None:
            samples, count = window
            step = len(samples) // 512
            streamed.accept(probabilities[sent : sent + step], count, None, final)
            sent += step
            kept = max(kept, streamed.nbytes - streamed.cutter.nbytes)
            if final:
                break
        if final:
            break
    assert streamed.speech_samples == expected
    assert np.array_equal(streamed.partials(), whole.partials())
    # audio kept: the VAD window not yet sent (32 frames) plus what is undecided (< 0.5 s)
    assert kept <= 4 * (32 * 512 + 20_000 + 8_000)
