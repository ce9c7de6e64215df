"""Malformed audio thrown at the decode path: truncated and corrupted WAV, FLAC, OGG and MP3,
wrong headers, zero bytes, huge declared sizes, NaN and Inf samples, raw buffers whose length
does not fit their format, paths and URLs instead of audio.

In process (hypothesis, derandomized: the same cases on every run): every case either decodes
to a finite mono 16 kHz waveform within the limits or raises an `InvalidArgument` (nothing
else escapes), within CASE_SECONDS, with bounded memory growth. Then a smaller set through the
real server over gRPC: INVALID_ARGUMENT with a `google.rpc.BadRequest` detail (or a normal
reply when the corruption left decodable speech), and the server still embeds a valid clip
afterwards. The counts are printed and repeated in pytest's terminal summary.
"""

from __future__ import annotations

import random
import resource
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.audio import (
    SAMPLE_RATE,
    AudioLimits,
    RawAudioSpec,
    SampleFormat,
    decode_content,
    decode_raw,
)
from server.errors import InvalidArgument, InvalidAudio
from tests import speech

LIMITS = AudioLimits()  # the service's defaults
ENCODED_CASES = 2000
RAW_CASES = 1000
GRPC_CASES = 50
CASE_SECONDS = 2.0  # per decode; valid cases take milliseconds (a 0.75 s clip)
RSS_GROWTH_MB = 256.0
FUZZ_SETTINGS = {
    "derandomize": True,  # reproducible in CI: the same cases every run
    "deadline": None,  # our own per-case bound below (hypothesis' would count shrinking too)
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

Pick = Callable[[int, int], int]  # an integer in [low, high]: hypothesis or random.Random


# --- the cases ------------------------------------------------------------------------------


def _clip(rate: int, channels: int, seconds: float = 0.75) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.random.default_rng(0).standard_normal(
        len(t)
    )
    return np.repeat(wave.astype(np.float32)[:, None], channels, axis=1)


def _encode(fmt: str, subtype: str | None, rate: int, channels: int) -> bytes:
    return speech.wav_bytes(_clip(rate, channels), rate, fmt, subtype)


@cache
def bases() -> dict[str, bytes]:
    """Valid files to corrupt: every container and codec the service takes."""
    return {
        "wav16": _encode("WAV", "PCM_16", 22_050, 2),
        "wavfloat": _encode("WAV", "FLOAT", 16_000, 1),
        "wav24": _encode("WAV", "PCM_24", 8_000, 1),
        "flac": _encode("FLAC", "PCM_16", 22_050, 2),
        "vorbis": _encode("OGG", "VORBIS", 22_050, 1),
        "opus": _encode("OGG", "OPUS", 48_000, 1),
        "mp3": _encode("MP3", "MPEG_LAYER_III", 22_050, 1),
    }


MAGICS = [b"", b"RIFF", b"RIFF\xff\xff\xff\xffWAVE", b"fLaC", b"OggS", b"ID3", b"\xff\xfb"]
EXTREMES_32 = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1]
WAV_RATES = [0, 1, 7_999, 8_000, 16_000, 44_100, 192_000, 192_001, 2**31 - 1, 2**32 - 1]
WAV_CHANNELS = [0, 1, 2, 8, 9, 255, 65_535]
WAV_BITS = [0, 7, 8, 16, 24, 32, 64, 65_535]
WAV_TAGS = [0, 1, 2, 3, 6, 7, 0x55, 0xFFFE, 0xFFFF]
FLAC_RATES = [0, 1, 7_999, 8_000, 44_100, 192_000, 655_350, 2**20 - 1]
FLAC_TOTALS = [0, 1, 16_537, 2**32, 2**36 - 1]
ENCODED_KINDS = [
    "truncate",
    "bitflip",
    "splice",
    "delete",
    "repeat",
    "field",
    "wrong_header",
    "zeros",
    "noise",
    "wav_header",
    "flac_streaminfo",
    "path",
]


def _choice(pick: Pick, items: list[Any]) -> Any:
    return items[pick(0, len(items) - 1)]


def _noise(pick: Pick, size: int) -> bytes:
    return random.Random(pick(0, 2**32 - 1)).randbytes(size)


def wav_file(channels: int, rate: int, bits: int, tag: int, declared: int, data: bytes) -> bytes:
    """A WAV whose header says whatever it is told to, over `data`."""
    block_align = (channels * bits // 8) & 0xFFFF
    fmt = struct.pack(
        "<HHIIHH",
        tag,
        channels & 0xFFFF,
        rate & 0xFFFFFFFF,
        (rate * block_align) & 0xFFFFFFFF,
        block_align,
        bits & 0xFFFF,
    )
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", declared & 0xFFFFFFFF) + data
    return b"RIFF" + struct.pack("<I", min(len(body), 2**32 - 1)) + body


def flac_with_streaminfo(base: bytes, rate: int, channels: int, bits: int, total: int) -> bytes:
    """The FLAC `base` with its STREAMINFO rate, channels, bit depth and total samples set."""
    out = bytearray(base)
    offset = 8 + 10  # "fLaC", the block header, min/max block size, min/max frame size
    packed = (
        (rate & 0xFFFFF) << 44 | ((channels - 1) & 0x7) << 41 | ((bits - 1) & 0x1F) << 36 | total
    )
    out[offset : offset + 8] = (packed & (2**64 - 1)).to_bytes(8, "big")
    return bytes(out)


def encoded_case(pick: Pick) -> tuple[str, bytes]:
    """One malformed (or occasionally intact) encoded file and what was done to it."""
    kind = _choice(pick, ENCODED_KINDS)
    name = _choice(pick, sorted(bases()))
    base = bases()[name]
    if kind == "truncate":
        return f"{kind} {name}", base[: pick(0, len(base))]
    if kind == "bitflip":
        data = bytearray(base)
        span = 64 * 8 if pick(0, 1) else len(base) * 8  # half of them in the headers
        for _ in range(pick(1, 16)):
            bit = pick(0, span - 1)
            data[bit // 8] ^= 1 << (bit % 8)
        return f"{kind} {name}", bytes(data)
    if kind == "splice":
        donor = bases()[_choice(pick, sorted(bases()))]
        length, src, dst = pick(1, 512), pick(0, len(donor) - 1), pick(0, len(base) - 1)
        return f"{kind} {name}", base[:dst] + donor[src : src + length] + base[dst + length :]
    if kind == "delete":
        start = pick(0, len(base) - 1)
        return f"{kind} {name}", base[:start] + base[start + pick(1, 2048) :]
    if kind == "repeat":
        start = pick(0, len(base) - 1)
        chunk = base[start : start + pick(1, 1024)]
        return f"{kind} {name}", base[:start] + chunk * pick(2, 8) + base[start:]
    if kind == "field":  # an extreme 16- or 32-bit value somewhere in the headers
        data = bytearray(base)
        offset, width = pick(0, 60), _choice(pick, [2, 4])
        value = _choice(pick, EXTREMES_32) & (2 ** (8 * width) - 1)
        data[offset : offset + width] = value.to_bytes(width, _choice(pick, ["little", "big"]))
        return f"{kind} {name}@{offset}", bytes(data)
    if kind == "wrong_header":
        other = _choice(pick, sorted(bases()))
        cut = pick(4, 128)
        return f"{kind} {other} on {name}", bases()[other][:cut] + base[cut:]
    if kind == "zeros":
        return kind, _choice(pick, MAGICS) + b"\x00" * pick(0, 4096)
    if kind == "noise":
        return kind, _choice(pick, MAGICS) + _noise(pick, pick(0, 4096))
    if kind == "wav_header":  # huge or nonsensical declared sizes, rates, channels, depths
        data = _noise(pick, pick(0, 4096)) if pick(0, 1) else b"\x00" * pick(0, 4096)
        declared = _choice(pick, [0, len(data), len(data) + 1, 2**31, 2**32 - 1])
        header = (
            _choice(pick, WAV_CHANNELS),
            _choice(pick, WAV_RATES),
            _choice(pick, WAV_BITS),
            _choice(pick, WAV_TAGS),
        )
        return f"{kind} {header} declared={declared}", wav_file(*header, declared, data)
    if kind == "flac_streaminfo":
        info = (
            _choice(pick, FLAC_RATES),
            pick(1, 8),
            _choice(pick, [4, 8, 16, 24, 32]),
            _choice(pick, FLAC_TOTALS),
        )
        data = flac_with_streaminfo(bases()["flac"], *info)
        return f"{kind} {info}", data[: pick(42, len(data))]
    # a path or URL where audio belongs: it is bytes, never a name to open
    target = _choice(pick, ["/etc/passwd", "file:///etc/passwd", "http://127.0.0.1:9/a.wav"])
    return f"{kind} {target}", target.encode()


RAW_RATES = [-(2**31), -1, 0, 1, 7_999, 8_000, 16_000, 44_100, 192_000, 192_001, 2**31 - 1]
RAW_CHANNELS = [-5, -1, 0, 1, 2, 3, 8, 9, 1000, 2**31 - 1]
SPECIAL_FLOATS = [np.nan, np.inf, -np.inf, 1e38, -1e38, 1e-45, 0.0, 2.0, -2.0]


def raw_case(pick: Pick) -> tuple[str, RawAudioSpec]:
    """Raw samples: any format, rate and channel count, lengths that may not fit the frame
    size, and float samples with NaN, Inf and out-of-range values spliced in."""
    plausible = pick(0, 1) == 1  # half the time only the samples themselves are the test
    if plausible:
        fmt = _choice(pick, [SampleFormat.LINEAR16, SampleFormat.FLOAT32])
        rate, channels = _choice(pick, [8_000, 16_000, 44_100, 192_000]), pick(0, 8)
    else:
        fmt = _choice(pick, [None, SampleFormat.LINEAR16, SampleFormat.FLOAT32])
        rate, channels = _choice(pick, RAW_RATES), _choice(pick, RAW_CHANNELS)
    seed = pick(0, 2**32 - 1)
    rng = np.random.default_rng(seed)
    count = pick(0, 24_000)
    if fmt is SampleFormat.FLOAT32:
        values = rng.uniform(-1.0, 1.0, count).astype("<f4")
        for _ in range(pick(0, 3)):
            if count:
                values[pick(0, count - 1)] = _choice(pick, SPECIAL_FLOATS)
        samples = values.tobytes()
    else:
        samples = rng.integers(-(2**15), 2**15, count, dtype="<i2").tobytes()
    samples = samples[: len(samples) - pick(0, 3)]  # often not a whole number of frames
    if plausible and pick(0, 1):
        samples = samples[: len(samples) - len(samples) % (4 * max(channels, 1))]
    label = f"raw {fmt} rate={rate} channels={channels} bytes={len(samples)} seed={seed}"
    return label, RawAudioSpec(samples, fmt, rate, channels)


# The one handcrafted case that decodes: libsndfile reads the 32 frames that are there and
# does not trust the header's size.
DECODABLE = {"WAV declaring 2^32-1 data bytes"}


def handcrafted_cases() -> list[tuple[str, bytes]]:
    """The named nasties, besides whatever hypothesis draws."""
    flac = bases()["flac"]
    return [
        ("empty", b""),
        ("one zero byte", b"\x00"),
        ("64 KiB of zeros", b"\x00" * 65_536),
        ("RIFF and zeros", b"RIFF" + b"\x00" * 4096),
        ("WAV declaring 2^32-1 data bytes", wav_file(1, 16_000, 16, 1, 2**32 - 1, b"\x01" * 64)),
        ("WAV declaring 2^31 bytes, none there", wav_file(2, 48_000, 16, 1, 2**31, b"")),
        ("WAV with 65535 channels", wav_file(65_535, 16_000, 16, 1, 1024, b"\x00" * 1024)),
        ("WAV at rate 0", wav_file(1, 0, 16, 1, 1024, b"\x00" * 1024)),
        ("WAV at 4 GHz", wav_file(1, 2**32 - 1, 16, 1, 1024, b"\x00" * 1024)),
        (
            "WAV of float NaN",
            wav_file(1, 16_000, 32, 3, 4096, np.full(1024, np.nan, "<f4").tobytes()),
        ),
        (
            "WAV of float Inf",
            wav_file(1, 16_000, 32, 3, 4096, np.full(1024, np.inf, "<f4").tobytes()),
        ),
        ("FLAC of unknown length", flac_with_streaminfo(flac, 22_050, 2, 16, 0)),
        ("FLAC declaring 2^36-1 samples", flac_with_streaminfo(flac, 22_050, 2, 16, 2**36 - 1)),
        ("FLAC at 655350 Hz", flac_with_streaminfo(flac, 655_350, 2, 16, 16_537)),
        ("FLAC header only", flac[:42]),
        ("OGG page header only", bases()["vorbis"][:27]),
        ("MP3 sync word only", b"\xff\xfb\x90\x00"),
        ("ID3 tag only", b"ID3\x04\x00\x00\x00\x00\x00\x00"),
        ("ID3 tag claiming 256 MiB", b"ID3\x04\x00\x00\x7f\x7f\x7f\x7f" + b"\x00" * 64),
        ("AIFF (not accepted)", _encode("AIFF", "PCM_16", 16_000, 1)),
        ("AU (not accepted)", _encode("AU", "PCM_16", 16_000, 1)),
        (
            "AIFF behind an ID3 tag",
            b"ID3\x04\x00\x00\x00\x00\x00\x02\x00\x00" + _encode("AIFF", "PCM_16", 16_000, 1),
        ),
    ]


# --- the in-process fuzzing ------------------------------------------------------------------


@dataclass
class Tally:
    """What a fuzz run tried and how long its slowest case took."""

    cases: int = 0
    decoded: int = 0
    rejected: int = 0
    slowest_s: float = 0.0
    slowest: str = ""

    def summary(self, what: str, seconds: float, rss_growth_mb: float) -> str:
        return (
            f"fuzz {what}: {self.cases} cases in {seconds:.1f} s ({self.rejected} rejected "
            f"with INVALID_ARGUMENT, {self.decoded} decoded); slowest {self.slowest_s * 1000:.1f}"
            f" ms ({self.slowest}); max RSS growth {rss_growth_mb:.0f} MB"
        )


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def check_decode(tally: Tally, label: str, decode: Callable[[], np.ndarray]) -> None:
    """Decode one case: a sane waveform or an InvalidArgument, within CASE_SECONDS."""
    start = time.perf_counter()
    try:
        wave = decode()
    except InvalidArgument as exc:
        assert exc.message and exc.field, label  # a caller-safe message naming the field
        tally.rejected += 1
    else:
        assert wave.dtype == np.float32 and wave.ndim == 1, label
        assert np.isfinite(wave).all(), label
        assert len(wave) <= LIMITS.max_seconds * SAMPLE_RATE + SAMPLE_RATE, label
        tally.decoded += 1
    elapsed = time.perf_counter() - start
    tally.cases += 1
    if elapsed > tally.slowest_s:
        tally.slowest_s, tally.slowest = elapsed, label
    assert elapsed < CASE_SECONDS, f"{label}: decoding took {elapsed:.2f} s"


@pytest.fixture(scope="module")
def rss_start() -> float:
    bases()  # the encoders' own memory is not the decoder's
    decode_content(bases()["mp3"])
    return _rss_mb()


def test_handcrafted_malformed_files_are_rejected_cleanly(report, rss_start: float) -> None:
    tally = Tally()
    start = time.perf_counter()
    for label, content in handcrafted_cases():
        decoded = tally.decoded
        check_decode(tally, label, lambda content=content: decode_content(content, LIMITS))
        assert (tally.decoded > decoded) == (label in DECODABLE), label
    report(tally.summary("decode, handcrafted", time.perf_counter() - start, 0.0))


def test_fuzz_encoded_files(report, rss_start: float) -> None:
    tally = Tally()
    start = time.perf_counter()

    @settings(max_examples=ENCODED_CASES, **FUZZ_SETTINGS)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        label, content = encoded_case(lambda low, high: data.draw(st.integers(low, high)))
        check_decode(tally, label, lambda: decode_content(content, LIMITS))

    run()
    growth = _rss_mb() - rss_start
    report(tally.summary("decode, encoded", time.perf_counter() - start, growth))
    assert tally.cases >= ENCODED_CASES * 0.9
    assert tally.rejected and tally.decoded  # both outcomes were exercised
    assert growth < RSS_GROWTH_MB


def test_fuzz_raw_samples(report, rss_start: float) -> None:
    tally = Tally()
    start = time.perf_counter()

    @settings(max_examples=RAW_CASES, **FUZZ_SETTINGS)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        label, raw = raw_case(lambda low, high: data.draw(st.integers(low, high)))
        check_decode(tally, label, lambda: decode_raw(raw, LIMITS))

    run()
    growth = _rss_mb() - rss_start
    report(tally.summary("decode, raw", time.perf_counter() - start, growth))
    assert tally.cases >= RAW_CASES * 0.9
    assert tally.rejected and tally.decoded
    assert growth < RSS_GROWTH_MB


# --- paths and URLs are never opened ---------------------------------------------------------

_OPENED: list[str] = []
_WATCHING: list[bool] = [False]


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _WATCHING[0] and event in {"open", "os.open", "urllib.Request", "socket.connect"}:
        target = args[0]
        _OPENED.append(
            target.decode(errors="replace") if isinstance(target, bytes) else str(target)
        )


@pytest.fixture(scope="module")
def audit() -> Callable[[], list[str]]:
    """Records every file open, URL request and socket connect while `_WATCHING[0]`."""
    sys.addaudithook(_audit)  # hooks cannot be removed; this one is idle unless watching

    def opened_during(action: Callable[[], object]) -> list[str]:
        _OPENED.clear()
        _WATCHING[0] = True
        try:
            action()
        finally:
            _WATCHING[0] = False
        return list(_OPENED)

    return opened_during  # type: ignore[return-value]


@pytest.fixture(scope="module")
def wav_on_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid WAV file: were its path ever opened, it would decode."""
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    path.write_bytes(bases()["wav16"])
    return path


def path_contents(path: Path) -> list[bytes]:
    return [str(path).encode(), path.as_uri().encode(), b"http://127.0.0.1:9/speech.wav"]


def test_a_path_or_url_in_content_is_bytes_not_a_file(audit: Any, wav_on_disk: Path) -> None:
    for content in path_contents(wav_on_disk):

        def decode(content: bytes = content) -> None:
            with pytest.raises(InvalidAudio, match="not a decodable audio file"):
                decode_content(content, LIMITS)

        opened = audit(decode)
        assert not [target for target in opened if wav_on_disk.name in target], opened
        assert not [t for t in opened if t.startswith(("http", "file:", "/etc"))], opened


# --- through the real server -----------------------------------------------------------------


@pytest.mark.integration
async def test_fuzz_through_the_server(
    speaker_stub, report, audit: Any, wav_on_disk: Path, speech_files: list[Path]
) -> None:
    from server.api.voicegate.v1 import audio_pb2, speaker_pb2

    rng = random.Random(7)
    requests: list[tuple[str, audio_pb2.Audio]] = []
    for index in range(GRPC_CASES):
        if index % 5 == 4:
            label, raw = raw_case(rng.randint)
            audio = audio_pb2.Audio(
                raw=audio_pb2.RawAudio(
                    samples=raw.samples,
                    format={
                        None: audio_pb2.SAMPLE_FORMAT_UNSPECIFIED,
                        SampleFormat.LINEAR16: audio_pb2.SAMPLE_FORMAT_LINEAR16,
                        SampleFormat.FLOAT32: audio_pb2.SAMPLE_FORMAT_FLOAT32,
                    }[raw.format],
                    sample_rate_hz=raw.sample_rate_hz,
                    channels=raw.channels,
                )
            )
        else:
            label, content = encoded_case(rng.randint)
            audio = audio_pb2.Audio(content=content)
        requests.append((label, audio))
    requests += [(f"path {c!r}", audio_pb2.Audio(content=c)) for c in path_contents(wav_on_disk)]
    requests += [(label, audio_pb2.Audio(content=c)) for label, c in handcrafted_cases()[1:]]

    start = time.perf_counter()
    codes: dict[str, int] = {}
    for label, audio in requests:
        error: grpc.aio.AioRpcError | None = None

        async def call(audio: audio_pb2.Audio = audio) -> None:
            nonlocal error
            try:
                await speaker_stub.Embed(speaker_pb2.EmbedRequest(audio=audio), timeout=30)
            except grpc.aio.AioRpcError as exc:
                error = exc

        opened: list[str] = []
        if label.startswith("path"):
            _OPENED.clear()
            _WATCHING[0] = True
            try:
                await call()
            finally:
                _WATCHING[0] = False
            opened = [target for target in _OPENED if wav_on_disk.name in target]
        else:
            await call()
        assert not opened, f"{label}: the server opened {opened}"
        code = "OK" if error is None else error.code().name
        codes[code] = codes.get(code, 0) + 1
        if error is not None:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{label}: {error}"
            violation = speech.bad_request(error)
            assert violation.field.startswith("audio"), (label, violation)
            assert violation.description, label
    elapsed = time.perf_counter() - start
    valid = speaker_pb2.EmbedRequest(audio=speech.clip(speech_files[0], 2.0))
    reply = await speaker_stub.Embed(valid, timeout=30)
    assert len(reply.embedding) == 256
    report(
        f"fuzz gRPC Embed: {len(requests)} malformed requests in {elapsed:.1f} s "
        f"({', '.join(f'{n} {code}' for code, n in sorted(codes.items()))}); "
        "the server still embeds afterwards"
    )
    assert codes.get("INVALID_ARGUMENT", 0) >= len(requests) // 2
