"""A small synchronous client for the `voicegate` CLI's embed, verify and vad commands."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.api.voicegate.v1 import audio_pb2, speaker_pb2, speaker_pb2_grpc, vad_pb2, vad_pb2_grpc

TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Connection:
    """Where and how to reach the server: TLS when `tls_ca` is set (with a client certificate
    for mutual TLS), and a bearer token sent as `authorization` metadata when `token` is set."""

    target: str
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = None

    def channel(self) -> grpc.Channel:
        if self.tls_ca is None:
            return grpc.insecure_channel(self.target)
        key = self.tls_key.read_bytes() if self.tls_key else None
        cert = self.tls_cert.read_bytes() if self.tls_cert else None
        credentials = grpc.ssl_channel_credentials(self.tls_ca.read_bytes(), key, cert)
        return grpc.secure_channel(self.target, credentials)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def embed_file(connection: Connection, path: Path, model: str = "") -> speaker_pb2.EmbedResponse:
    """Embed one local audio file with the server at `connection`."""
    with connection.channel() as channel:
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        request = speaker_pb2.EmbedRequest(audio=_audio(path), model=model)
        response: speaker_pb2.EmbedResponse = stub.Embed(
            request, timeout=TIMEOUT_S, metadata=connection.metadata
        )
        return response


def verify_files(
    connection: Connection, reference: Path, probe: Path
) -> speaker_pb2.VerifyResponse:
    """Verify whether two local audio files hold the same speaker."""
    with connection.channel() as channel:
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        request = speaker_pb2.VerifyRequest(reference=_audio(reference), probe=_audio(probe))
        response: speaker_pb2.VerifyResponse = stub.Verify(
            request, timeout=TIMEOUT_S, metadata=connection.metadata
        )
        return response


def detect_speech_file(connection: Connection, path: Path) -> vad_pb2.DetectSpeechResponse:
    """The speech segments of one local audio file (silero's default rules)."""
    with connection.channel() as channel:
        stub = vad_pb2_grpc.VoiceActivityServiceStub(channel)
        request = vad_pb2.DetectSpeechRequest(audio=_audio(path))
        response: vad_pb2.DetectSpeechResponse = stub.DetectSpeech(
            request, timeout=TIMEOUT_S, metadata=connection.metadata
        )
        return response


@contextlib.contextmanager
def report_rpc_error() -> Iterator[None]:
    """Turn a failed call into one readable line and exit status 1."""
    try:
        yield
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"voicegate: {code}: {details}", file=sys.stderr)
        raise SystemExit(1) from None


def _audio(path: Path) -> audio_pb2.Audio:
    return audio_pb2.Audio(content=path.read_bytes())
