"""Enroll, Verify by speaker id, Identify and the speaker RPCs through the real front server and
Triton; durability across SIGKILL; two replicas on one PostgreSQL store."""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.api.voicegate.v1 import audio_pb2, speaker_pb2, speaker_pb2_grpc
from server.config import Settings
from server.fusion import Calibration
from server.mfcc import MFCC_DIMENSION
from server.store import Enrollment
from server.triton_process import free_ports
from tests import serving, speech

pytestmark = pytest.mark.integration


def pieces(path: Path, count: int) -> list[audio_pb2.Audio]:
    """A recording cut into `count` consecutive pieces, each a WAV file."""
    samples, rate = speech.read(path)
    bounds = np.linspace(0, len(samples), count + 1).astype(int)
    return [speech.content(samples[a:b], rate) for a, b in itertools.pairwise(bounds)]


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_enroll_then_verify_by_speaker_id(speaker_stub, speech_files: list[Path]) -> None:
    first, second, probe = pieces(speech_files[40], 3)
    reply = await speaker_stub.Enroll(
        speaker_pb2.EnrollRequest(speaker_id="verify-40", audio=[first, second])
    )
    speaker = reply.speaker
    assert (speaker.speaker_id, speaker.enrollment_count, speaker.model) == (
        "verify-40",
        2,
        "ge2e_int8",
    )
    assert speaker.model_version == "ge2e_int8@1"
    assert speaker.speech_seconds > 2.0
    assert speaker.create_time.seconds > 0 and speaker.revision > 0
    got = await speaker_stub.GetSpeaker(speaker_pb2.GetSpeakerRequest(speaker_id="verify-40"))
    assert got.speaker == speaker

    same = await speaker_stub.Verify(speaker_pb2.VerifyRequest(speaker_id="verify-40", probe=probe))
    other = pieces(speech_files[41], 3)[2]
    different = await speaker_stub.Verify(
        speaker_pb2.VerifyRequest(speaker_id="verify-40", probe=other)
    )
    assert same.same_speaker and not different.same_speaker
    assert same.score > different.score
    assert {s.model for s in same.scores} == {"ge2e", "mfcc"}
    # The operating point it used, from the calibration file.
    calibration = Calibration.load()
    point = same.operating_point
    assert point.threshold == pytest.approx(same.threshold) == pytest.approx(calibration.threshold)
    assert point.rule and 0.0 < point.calibrated_far < 0.2
    # Audio references report it too.
    by_audio = await speaker_stub.Verify(speaker_pb2.VerifyRequest(reference=first, probe=probe))
    assert by_audio.operating_point == point


async def test_identify_finds_the_enrolled_speaker(speaker_stub, speech_files: list[Path]) -> None:
    files = speech_files[50:56]
    halves = [speech.halves(path) for path in files]
    await asyncio.gather(
        *(
            speaker_stub.Enroll(speaker_pb2.EnrollRequest(speaker_id=f"id-{i}", audio=[a]))
            for i, (a, _) in enumerate(halves)
        )
    )
    for target in (1, 4):
        reply = await speaker_stub.Identify(
            speaker_pb2.IdentifyRequest(audio=halves[target][1], top_k=3)
        )
        assert len(reply.matches) == 3
        best = reply.matches[0]
        assert best.speaker_id == f"id-{target}"
        assert best.same_speaker and best.score >= reply.operating_point.threshold
        scores = [m.score for m in reply.matches]
        assert scores == sorted(scores, reverse=True)
        assert reply.compared_speaker_count >= 6 and reply.speech_seconds > 1.0
        verified = await speaker_stub.Verify(
            speaker_pb2.VerifyRequest(speaker_id=best.speaker_id, probe=halves[target][1])
        )
        assert best.score == pytest.approx(verified.score, abs=1e-4)
        assert {s.model: s.score for s in best.scores} == pytest.approx(
            {s.model: s.score for s in verified.scores}, abs=1e-4
        )
    default = await speaker_stub.Identify(speaker_pb2.IdentifyRequest(audio=halves[0][1]))
    assert len(default.matches) == 5


async def test_speaker_errors(app, speaker_stub, speech_files: list[Path]) -> None:
    audio = speech.halves(speech_files[60])[0]
    cases = [
        (speaker_pb2.VerifyRequest(speaker_id="nobody", probe=audio), "Verify", "NOT_FOUND"),
        (speaker_pb2.GetSpeakerRequest(speaker_id="nobody"), "GetSpeaker", "NOT_FOUND"),
        (speaker_pb2.DeleteSpeakerRequest(speaker_id="nobody"), "DeleteSpeaker", "NOT_FOUND"),
        (speaker_pb2.EnrollRequest(speaker_id="bad id", audio=[audio]), "Enroll", "INVALID"),
        (speaker_pb2.EnrollRequest(speaker_id="no-audio"), "Enroll", "INVALID"),
        (
            speaker_pb2.EnrollRequest(
                speaker_id="x", audio=[audio], mode=speaker_pb2.ENROLL_MODE_APPEND
            ),
            "Enroll",
            "NOT_FOUND",
        ),
        (speaker_pb2.IdentifyRequest(audio=audio, top_k=-1), "Identify", "INVALID"),
        (speaker_pb2.ListSpeakersRequest(page_token="garbage"), "ListSpeakers", "INVALID"),
    ]
    for request, method, code in cases:
        error = await rpc_error(getattr(speaker_stub, method)(request))
        assert error.code().name.startswith(code), (method, error)
    bad = audio_pb2.Audio(content=b"\x00garbage" * 50)
    error = await rpc_error(
        speaker_stub.Enroll(speaker_pb2.EnrollRequest(speaker_id="two", audio=[audio, bad]))
    )
    assert "audio[1].content" in error.details()
    error = await rpc_error(
        speaker_stub.GetSpeaker(speaker_pb2.GetSpeakerRequest(speaker_id="two"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND  # nothing stored from a failed call

    create = speaker_pb2.EnrollRequest(
        speaker_id="once", audio=[audio], mode=speaker_pb2.ENROLL_MODE_CREATE
    )
    await speaker_stub.Enroll(create)
    assert (await rpc_error(speaker_stub.Enroll(create))).code() == grpc.StatusCode.ALREADY_EXISTS

    # A voiceprint made by another encoder version.
    rng = np.random.default_rng(0)
    app.speakers.store.enroll(
        "stale",
        Enrollment("ge2e_int8", "ge2e_int8@0", rng.random(256), rng.random(MFCC_DIMENSION), 1, 3.0),
    )
    error = await rpc_error(
        speaker_stub.Verify(speaker_pb2.VerifyRequest(speaker_id="stale", probe=audio))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "re-enrolled" in error.details()
    error = await rpc_error(
        speaker_stub.Enroll(speaker_pb2.EnrollRequest(speaker_id="stale", audio=[audio]))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    identified = await speaker_stub.Identify(speaker_pb2.IdentifyRequest(audio=audio))
    assert identified.stale_speaker_count >= 1
    assert "stale" not in [m.speaker_id for m in identified.matches]
    replaced = await speaker_stub.Enroll(
        speaker_pb2.EnrollRequest(
            speaker_id="stale", audio=[audio], mode=speaker_pb2.ENROLL_MODE_REPLACE
        )
    )
    assert replaced.speaker.model_version == "ge2e_int8@1"
    assert replaced.speaker.enrollment_count == 1


async def test_list_and_delete(speaker_stub, speech_files: list[Path]) -> None:
    audio = speech.halves(speech_files[70])[0]
    ids = [f"list-{i}" for i in range(5)]
    for speaker_id in ids:
        await speaker_stub.Enroll(speaker_pb2.EnrollRequest(speaker_id=speaker_id, audio=[audio]))
    listed, token = [], ""
    while True:
        page = await speaker_stub.ListSpeakers(
            speaker_pb2.ListSpeakersRequest(page_size=2, page_token=token)
        )
        assert len(page.speakers) <= 2
        listed += [s.speaker_id for s in page.speakers]
        token = page.next_page_token
        if not token:
            break
    assert listed == sorted(listed) and set(ids) <= set(listed)
    await speaker_stub.DeleteSpeaker(speaker_pb2.DeleteSpeakerRequest(speaker_id="list-2"))
    error = await rpc_error(
        speaker_stub.GetSpeaker(speaker_pb2.GetSpeakerRequest(speaker_id="list-2"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    found = await speaker_stub.Identify(speaker_pb2.IdentifyRequest(audio=audio, top_k=100))
    names = [m.speaker_id for m in found.matches]
    assert "list-2" not in names and {"list-0", "list-4"} <= set(names)


async def test_concurrent_enrolls_of_one_speaker_lose_nothing(
    speaker_stub, speech_files: list[Path]
) -> None:
    recordings = pieces(speech_files[80], 4) + pieces(speech_files[80], 4)
    replies = await asyncio.gather(
        *(
            speaker_stub.Enroll(speaker_pb2.EnrollRequest(speaker_id="busy", audio=[r]))
            for r in recordings
        )
    )
    counts = sorted(r.speaker.enrollment_count for r in replies)
    assert counts == list(range(1, len(recordings) + 1))  # each saw all before it
    got = await speaker_stub.GetSpeaker(speaker_pb2.GetSpeakerRequest(speaker_id="busy"))
    assert got.speaker.enrollment_count == len(recordings)


# ------------------------------------------------------------------ durability


class ServerProcess:
    """`python -m server.cli serve` against the session's Triton, its log in `state_dir`."""

    def __init__(self, state_dir: Path, triton_url: str) -> None:
        (self.port,) = free_ports(1)
        self.log_path = state_dir / f"serve-{self.port}.log"
        env = {
            "VOICEGATE_STATE_DIR": str(state_dir),
            "VOICEGATE_HOST": "127.0.0.1",
            "VOICEGATE_PORT": str(self.port),
            "VOICEGATE_METRICS_PORT": "0",
            "VOICEGATE_TRITON_URL": triton_url,
            "VOICEGATE_GRACE_SECONDS": "1",
        }
        self.process = serving.start_serve(self.log_path, env, timeout_s=120)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def server_processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


def test_acknowledged_enrollments_survive_sigkill(
    tmp_path: Path, triton: object, speech_files: list[Path], server_processes
) -> None:
    triton_url = triton.grpc_url  # type: ignore[attr-defined]
    server = ServerProcess(tmp_path, triton_url)
    server_processes.append(server)
    samples, rate = speech.read(speech_files[90])
    audio = speech.content(samples[: 3 * rate], rate)
    acknowledged: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def enroll_until_killed(worker: int) -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
            for i in range(200):
                speaker_id = f"durable-{worker}-{i}"
                try:
                    stub.Enroll(
                        speaker_pb2.EnrollRequest(speaker_id=speaker_id, audio=[audio]), timeout=30
                    )
                except grpc.RpcError:
                    return  # the server is gone
                with lock:
                    acknowledged.append(speaker_id)
                    if len(acknowledged) >= 12:
                        enough.set()

    workers = [threading.Thread(target=enroll_until_killed, args=(w,)) for w in range(3)]
    for worker in workers:
        worker.start()
    assert enough.wait(timeout=120), "12 enrollments were not acknowledged within 120 s"
    server.kill()  # at once, with the other workers' calls in flight
    for worker in workers:
        worker.join(timeout=60)
    with lock:
        acked = set(acknowledged)
    assert len(acked) >= 12

    restarted = ServerProcess(tmp_path, triton_url)
    server_processes.append(restarted)
    with grpc.insecure_channel(restarted.target) as channel:
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        stored: dict[str, int] = {}
        token = ""
        while True:
            page = stub.ListSpeakers(
                speaker_pb2.ListSpeakersRequest(page_size=1000, page_token=token), timeout=30
            )
            stored.update({s.speaker_id: s.enrollment_count for s in page.speakers})
            token = page.next_page_token
            if not token:
                break
        missing = acked - set(stored)
        assert not missing, f"acknowledged but lost: {sorted(missing)}"
        assert all(stored[speaker_id] == 1 for speaker_id in acked)
        found = stub.Identify(speaker_pb2.IdentifyRequest(audio=audio, top_k=1), timeout=30)
        assert found.compared_speaker_count == len(stored)
        assert found.matches[0].speaker_id in stored


# ------------------------------------------------------------------ replicas on PostgreSQL


async def test_two_replicas_share_a_postgres_store(
    base_settings: Settings, triton: object, pg_url: str, speech_files: list[Path]
) -> None:
    import psycopg

    from server.app import VoicegateApp

    with psycopg.connect(pg_url, autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS speakers, speaker_tombstones, speaker_store_state")
    settings = base_settings.replace(
        triton_url=triton.grpc_url,  # type: ignore[attr-defined]
        store_url=pg_url,
    )
    halves = [speech.halves(path) for path in speech_files[100:104]]
    async with (
        VoicegateApp(settings) as first,
        VoicegateApp(settings) as second,
        grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel_b,
    ):
        a = speaker_pb2_grpc.SpeakerServiceStub(channel_a)
        b = speaker_pb2_grpc.SpeakerServiceStub(channel_b)
        for i, (enrol, _) in enumerate(halves):
            await (a if i % 2 else b).Enroll(
                speaker_pb2.EnrollRequest(speaker_id=f"pg-{i}", audio=[enrol])
            )
        # Each replica sees the other's enrollments at its next Identify.
        for stub in (a, b):
            for target in (0, 3):
                found = await stub.Identify(
                    speaker_pb2.IdentifyRequest(audio=halves[target][1], top_k=2)
                )
                assert found.compared_speaker_count == 4
                assert found.matches[0].speaker_id == f"pg-{target}"
        await a.DeleteSpeaker(speaker_pb2.DeleteSpeakerRequest(speaker_id="pg-3"))
        found = await b.Identify(speaker_pb2.IdentifyRequest(audio=halves[3][1], top_k=5))
        assert found.compared_speaker_count == 3
        assert "pg-3" not in [m.speaker_id for m in found.matches]
        # Concurrent appends through both replicas.
        await asyncio.gather(
            *(
                (a, b)[i % 2].Enroll(
                    speaker_pb2.EnrollRequest(speaker_id="pg-0", audio=[halves[0][1]])
                )
                for i in range(6)
            )
        )
        got = await a.GetSpeaker(speaker_pb2.GetSpeakerRequest(speaker_id="pg-0"))
        assert got.speaker.enrollment_count == 7
