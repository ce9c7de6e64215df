"""A small synchronous client for the `voicegate` CLI's embed and verify commands."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from server.api.voicegate.v1 import audio_pb2, speaker_pb2, speaker_pb2_grpc

TIMEOUT_S = 60.0


def embed_file(target: str, path: Path, model: str = "") -> speaker_pb2.EmbedResponse:
    """Embed one local audio file with the server at `target`."""
    with grpc.insecure_channel(target) as channel:
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        request = speaker_pb2.EmbedRequest(audio=_audio(path), model=model)
        response: speaker_pb2.EmbedResponse = stub.Embed(request, timeout=TIMEOUT_S)
        return response


def verify_files(target: str, reference: Path, probe: Path) -> speaker_pb2.VerifyResponse:
    """Verify whether two local audio files hold the same speaker."""
    with grpc.insecure_channel(target) as channel:
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        request = speaker_pb2.VerifyRequest(reference=_audio(reference), probe=_audio(probe))
        response: speaker_pb2.VerifyResponse = stub.Verify(request, timeout=TIMEOUT_S)
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
